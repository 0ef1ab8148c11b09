//! The inner loop (docs/algorithms.md §2): an assignment's optimizer steps (SGD with momentum,
//! or AdamW) on its batch stream, alone or as one replica of several with the gradients summed
//! through the collective; with gradient accumulation, global-norm clipping and the job's
//! learning-rate schedule.

use crate::adamw_cpu;
use crate::collective::{self, Collective};
use crate::data::Batches;
use crate::primitives;
use crate::train::TrainError;
use metaloop_common::model::{self, Inputs, Model};
use metaloop_proto::proto::{Assignment, InnerOptimizer, InnerSpec};
use metaloop_proto::rng::derive_seed;
use tch::{Device, Kind, Tensor};

/// What the inner steps did.
pub(crate) struct Trained {
    /// The sum of the steps' batch losses.
    pub(crate) loss_sum: f64,
    /// Rows seen over all steps.
    pub(crate) samples: u64,
}

/// The assignment's `a.steps` optimizer steps on `batches` from the model as it is, with fresh
/// optimizer state (SGD's momentum buffers; AdamW's moments and step count): the j-th step's
/// learning rate is the job schedule's at global step `round` × steps per round + j. Each step
/// sums the gradients of `inner.accumulate` micro-batches of the batch, clips their global
/// norm when `inner.clip_norm` is set, and takes one optimizer step. Dropout draws from
/// libtorch's generator, seeded here from `a.seed`. `sample_weights`, when it gives weights
/// for a batch, multiplies each row's loss weight by them (computed on the whole batch). With a
/// `collective`, each step runs on this replica's share of the batch ([`shared_step`]). Leaves
/// the model in eval mode.
///
/// # Errors
/// `Diverged` at a non-finite loss, `Collective`, or a libtorch failure.
#[allow(clippy::too_many_arguments)]
pub(crate) fn train(
    model: &dyn Model,
    collective: Option<&dyn Collective>,
    inner: &InnerSpec,
    batches: &mut Batches<'_>,
    a: &Assignment,
    round: u64,
    device: Device,
    sample_weights: impl Fn(&dyn Model, &Inputs, &Tensor) -> Option<Tensor>,
) -> Result<Trained, TrainError> {
    // Dropout draws from libtorch's generator: seeded by the assignment, like all else.
    tch::manual_seed(derive_seed(a.seed, &[5 << 32]) as i64);
    model.set_train(true);
    let mut optimizer = Optimizer::new(inner, model.parameters().len());
    let micro = inner.accumulate.max(1) as usize;
    let mut loss_sum = 0.0f64;
    let mut samples = 0u64;
    for step in 0..a.steps {
        let (rows, ws) = batches.next();
        samples += rows.len() as u64;
        let (x, y) = rows.tensors(device);
        let mut w = Tensor::from_slice(&ws).to_device(device);
        if let Some(s) = sample_weights(model, &x, &y) {
            w *= s;
        }
        let (value, grads) = match collective {
            None if micro == 1 => {
                let logits = model.forward(&x);
                let loss = (primitives::cross_entropy(&logits, &y) * w).sum(Kind::Float);
                let value = loss.f_double_value(&[]).map_err(model::ModelError::from)?;
                // Fresh gradients, as torch's zero_grad(set_to_none) then backward: no
                // pass to zero them and none to accumulate into them.
                let grads = if value.is_finite() {
                    primitives::gradient(model, &loss)
                } else {
                    Vec::new()
                };
                (value, grads)
            }
            None => accumulated_step(model, &x, &y, &w, micro)?,
            Some(c) => shared_step(model, c, &x, &y, &w, micro)?,
        };
        if !value.is_finite() {
            return Err(TrainError::Diverged { step });
        }
        loss_sum += value;
        if let Some(max_norm) = inner.clip_norm {
            clip_grad_norm(&grads, max_norm);
        }
        let lr = inner.schedule.lr(inner.lr, round, step);
        optimizer.step(model.parameters(), &grads, lr);
    }
    model.set_train(false);
    Ok(Trained { loss_sum, samples })
}

/// The rows of the `m`-th of `micro` micro-batches of `rows` (contiguous, in order, sizes
/// differing by at most one).
fn micro_batch(rows: std::ops::Range<usize>, m: usize, micro: usize) -> (i64, i64) {
    let part = collective::share(rows.len(), m, micro);
    ((rows.start + part.start) as i64, part.len() as i64)
}

/// One step's loss and gradients from `micro` micro-batches of the batch (gradient
/// accumulation): each micro-batch's part Σ_{i∈part} w_i ℓ_i of the weighted loss is
/// backpropagated alone and the gradients summed, so only one micro-batch's activations are
/// alive at a time and the sum is the whole batch's loss and gradient. Stops at the first
/// non-finite part (returning its loss and no gradients).
fn accumulated_step(
    model: &dyn Model,
    x: &Inputs,
    y: &Tensor,
    w: &Tensor,
    micro: usize,
) -> Result<(f64, Vec<Tensor>), TrainError> {
    let n = y.size()[0] as usize;
    let mut value = 0.0;
    let mut grads: Vec<Tensor> = Vec::new();
    for m in 0..micro {
        let (start, len) = micro_batch(0..n, m, micro);
        if len == 0 {
            continue;
        }
        let logits = model.forward(&x.narrow(start, len));
        let loss =
            (primitives::cross_entropy(&logits, &y.narrow(0, start, len)) * w.narrow(0, start, len)).sum(Kind::Float);
        let part = loss.f_double_value(&[]).map_err(model::ModelError::from)?;
        value += part;
        if !part.is_finite() {
            return Ok((value, Vec::new()));
        }
        let g = primitives::gradient(model, &loss);
        if grads.is_empty() {
            grads = g;
        } else {
            tch::no_grad(|| {
                for (sum, g) in grads.iter_mut().zip(&g) {
                    if g.defined() {
                        let _ = sum.f_add_(g);
                    }
                }
            });
        }
    }
    Ok((value, grads))
}

/// Zeroes the parameters' accumulated gradients, where they have any.
pub(crate) fn zero_grads(params: &[Tensor]) {
    for p in params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

/// One inner step's loss and gradients when the batch is shared among replicas. This
/// replica's rows' part of the weighted loss Σ_i w_i ℓ_i is backpropagated; then its gradients
/// and its loss, flattened into one buffer (the loss last), are summed over the replicas in
/// one all-reduce, so every replica gets the whole batch's gradient and loss and takes the
/// same decision on divergence. Returns the total loss and the summed gradients (views of the
/// buffer, shaped like the parameters).
fn shared_step(
    model: &dyn Model,
    collective: &dyn Collective,
    x: &Inputs,
    y: &Tensor,
    w: &Tensor,
    micro: usize,
) -> Result<(f64, Vec<Tensor>), TrainError> {
    zero_grads(model.parameters());
    let rows = collective::share(y.size()[0] as usize, collective.rank(), collective.size());
    // This replica's share in `micro` micro-batches, their gradients accumulated in the
    // parameters' `grad` by successive backward passes.
    let mut loss: Option<Tensor> = None;
    for m in 0..micro {
        let (start, len) = micro_batch(rows.clone(), m, micro);
        if micro > 1 && len == 0 {
            continue;
        }
        let logits = model.forward(&x.narrow(start, len));
        let part =
            (primitives::cross_entropy(&logits, &y.narrow(0, start, len)) * w.narrow(0, start, len)).sum(Kind::Float);
        part.backward();
        let part = part.detach();
        loss = Some(match loss {
            None => part,
            Some(sum) => sum + part,
        });
    }
    let loss = loss.unwrap_or_else(|| Tensor::zeros([], (Kind::Float, y.device())));
    let params = model.parameters();
    let mut parts: Vec<Tensor> = params
        .iter()
        .map(|p| {
            let g = p.grad();
            // A replica with no rows (a batch smaller than the replica count) adds nothing.
            let g = if g.defined() { g } else { p.zeros_like() };
            g.reshape([-1])
        })
        .collect();
    parts.push(loss.reshape([1]));
    let mut flat = Tensor::f_cat(&parts, 0).map_err(model::ModelError::from)?;
    collective.all_reduce_sum(&mut flat)?;
    let total = flat.numel() as i64;
    let value = flat.f_double_value(&[total - 1]).map_err(model::ModelError::from)?;
    let mut offset = 0;
    let grads = params
        .iter()
        .map(|p| {
            let n = p.numel() as i64;
            let g = flat.narrow(0, offset, n).view_as(p);
            offset += n;
            g
        })
        .collect();
    Ok((value, grads))
}

/// The inner optimizer's state for one assignment: created fresh, dropped at its end.
enum Optimizer {
    /// SGD's momentum buffer per parameter.
    Sgd {
        momentum: f64,
        weight_decay: f64,
        buffers: Vec<Option<Tensor>>,
    },
    /// AdamW's moments and step count per parameter.
    AdamW {
        betas: (f64, f64),
        eps: f64,
        weight_decay: f64,
        moments: Vec<Option<Moments>>,
    },
}

/// One parameter's AdamW state, as torch.optim.AdamW's `state[p]`.
struct Moments {
    /// m: `exp_avg`.
    first: Tensor,
    /// v: `exp_avg_sq`.
    second: Tensor,
    /// The bias correction's step count.
    step: u32,
}

impl Optimizer {
    /// Fresh state for `n` parameters.
    fn new(inner: &InnerSpec, n: usize) -> Self {
        match inner.optimizer {
            InnerOptimizer::Sgd => Optimizer::Sgd {
                momentum: inner.momentum,
                weight_decay: inner.weight_decay,
                buffers: (0..n).map(|_| None).collect(),
            },
            InnerOptimizer::AdamW { beta1, beta2, eps } => Optimizer::AdamW {
                betas: (beta1, beta2),
                eps,
                weight_decay: inner.weight_decay,
                moments: (0..n).map(|_| None).collect(),
            },
        }
    }

    /// One step at learning rate `lr`; `grads` are the parameters' gradients, in their order
    /// (undefined ones are skipped, their state untouched, as torch skips a `None` grad).
    fn step(&mut self, params: &[Tensor], grads: &[Tensor], lr: f64) {
        match self {
            Optimizer::Sgd {
                momentum,
                weight_decay,
                buffers,
            } => sgd_step(params, grads, buffers, lr, *momentum, *weight_decay),
            Optimizer::AdamW {
                betas,
                eps,
                weight_decay,
                moments,
            } => adamw_step(params, grads, moments, lr, *betas, *eps, *weight_decay),
        }
    }
}

/// PyTorch's SGD: g ← ∇ + wd·θ; b ← μ·b + g (b = g on the first step); θ ← θ − lr·b. `grads`
/// are the parameters' gradients, in their order (undefined ones are skipped).
fn sgd_step(params: &[Tensor], grads: &[Tensor], momentum: &mut [Option<Tensor>], lr: f64, mu: f64, wd: f64) {
    tch::no_grad(|| {
        for ((p, g), buf) in params.iter().zip(grads).zip(momentum.iter_mut()) {
            if !g.defined() {
                continue;
            }
            // In place, as torch.optim.SGD: no temporary the size of the model.
            let mut g = g.shallow_clone();
            if wd != 0.0 {
                primitives::axpy(&mut g, wd, p);
            }
            let b = match buf.take() {
                Some(mut b) if mu != 0.0 => {
                    let _ = b.f_mul_scalar_(mu).and_then(|_| b.f_add_(&g));
                    b
                }
                _ => g.copy(),
            };
            let mut p = p.shallow_clone();
            primitives::axpy(&mut p, -lr, &b);
            *buf = Some(b);
        }
    });
}

/// torch.optim.AdamW's step (`_single_tensor_adam`, foreach=False, not capturable): t ← t + 1;
/// θ ← θ·(1 − lr·wd); m ← lerp(m, g, 1 − β1); v ← β2·v + (1 − β2)·g²;
/// θ ← θ − (lr / (1 − β1^t))·m / (√v / √(1 − β2^t) + ε). Fresh moments (zeros) and t = 0 at a
/// parameter's first step. A contiguous f32 parameter on the CPU takes one pass over its memory
/// (`adamw_cpu`); any other the same operations as tensor ops ([`adamw_ops`]).
fn adamw_step(
    params: &[Tensor],
    grads: &[Tensor],
    moments: &mut [Option<Moments>],
    lr: f64,
    betas: (f64, f64),
    eps: f64,
    wd: f64,
) {
    tch::no_grad(|| {
        for ((p, g), state) in params.iter().zip(grads).zip(moments.iter_mut()) {
            if !g.defined() {
                continue;
            }
            let s = state.get_or_insert_with(|| Moments {
                first: p.zeros_like(),
                second: p.zeros_like(),
                step: 0,
            });
            s.step += 1;
            let scalars = adamw_cpu::Scalars::new(lr, betas, eps, wd, s.step);
            let g = g.contiguous();
            let fused = adamw_cpu::with_slices(p, &g, &s.first, &s.second, |p, g, m, v| {
                adamw_cpu::update(p, g, m, v, scalars);
            });
            if !fused {
                adamw_ops(p, &g, s, lr, betas, eps, wd);
            }
        }
    });
}

/// One parameter's AdamW step as tensor ops, op for op as torch, in the parameter's dtype with
/// its scalars computed in f64 as Python does (`s.step` already counts this step).
fn adamw_ops(p: &Tensor, g: &Tensor, s: &mut Moments, lr: f64, (beta1, beta2): (f64, f64), eps: f64, wd: f64) {
    let mut p = p.shallow_clone();
    if wd != 0.0 {
        let _ = p.f_mul_scalar_(1.0 - lr * wd);
    }
    let _ = s.first.f_lerp_(g, 1.0 - beta1);
    // addcmul_'s `value` as torch computes it, (value·g)·g: libtorch's C API has no `value`, so
    // value·g is formed first (the same float product).
    let _ = s
        .second
        .f_mul_scalar_(beta2)
        .and_then(|mut v| v.f_addcmul_(&(g * (1.0 - beta2)), g));
    let t = f64::from(s.step);
    let bias_correction1 = 1.0 - beta1.powf(t);
    let bias_correction2 = 1.0 - beta2.powf(t);
    let step_size = lr / bias_correction1;
    let mut denom = s.second.sqrt();
    let _ = denom
        .f_div_scalar_(bias_correction2.powf(0.5))
        .and_then(|mut d| d.f_add_scalar_(eps));
    // addcdiv_ with value −step_size: (value·m)/denom, as torch's kernel computes it.
    let _ = p.f_addcdiv_(&(&s.first * -step_size), &denom);
}

/// torch.nn.utils.clip_grad_norm_ (foreach=False, norm 2; libtorch's `norm` is its
/// `linalg_vector_norm`): the total norm is the L2 norm of the
/// gradients' L2 norms, the coefficient max_norm / (total + 1e-6) clamped at 1 multiplies every
/// gradient in place (a no-op when it is 1), all on the gradients' device without a sync.
pub(crate) fn clip_grad_norm(grads: &[Tensor], max_norm: f64) {
    tch::no_grad(|| {
        let norms: Vec<Tensor> = grads.iter().filter(|g| g.defined()).map(Tensor::norm).collect();
        if norms.is_empty() {
            return;
        }
        let total = Tensor::stack(&norms, 0).norm();
        // max_norm / t is torch's `Tensor.__rtruediv__`: reciprocal(t) · max_norm.
        let coef = ((total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
        for g in grads.iter().filter(|g| g.defined()) {
            let _ = g.shallow_clone().f_mul_(&coef);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Net;

    /// The float32 tanh MLP 3 → 4 → 2 of `scripts/adamw_reference.py`, with its inputs.
    fn reference_problem() -> (Net, Inputs, Tensor) {
        let shapes: [&[i64]; 4] = [&[4, 3], &[4], &[2, 4], &[2]];
        let params = shapes
            .iter()
            .enumerate()
            .map(|(k, shape)| {
                let n: i64 = shape.iter().product();
                // As Python: the fraction in f64, then rounded to f32.
                let v: Vec<f32> = (0..n)
                    .map(|i| (((7 * i + 3 * k as i64) % 11 - 5) as f64 / 10.0) as f32)
                    .collect();
                Tensor::from_slice(&v).reshape(*shape).set_requires_grad(true)
            })
            .collect();
        let x: Vec<f32> = (0..6)
            .flat_map(|r| (0..3).map(move |c| (((5 * r + 3 * c) % 7 - 3) as f64 / 4.0) as f32))
            .collect();
        let y: Vec<i64> = (0..6).map(|r| r % 2).collect();
        let net = Net {
            params,
            names: (0..4).map(|i| format!("p{i}")).collect(),
        };
        (
            net,
            Inputs::Dense(Tensor::from_slice(&x).reshape([6, 3])),
            Tensor::from_slice(&y),
        )
    }

    #[test]
    fn one_pass_adamw_agrees_with_the_tensor_ops() {
        // Five steps of both paths from the same parameter, gradients and (fresh) moments, with
        // and without weight decay and with a β1 below 0.5 (lerp's other branch).
        tch::manual_seed(11);
        for (betas, wd) in [((0.9, 0.999), 0.01), ((0.9, 0.999), 0.0), ((0.3, 0.99), 0.1)] {
            let p0 = Tensor::randn([1000], (Kind::Float, Device::Cpu));
            let (a, b) = (p0.copy(), p0.copy());
            let fresh = || Moments {
                first: p0.zeros_like(),
                second: p0.zeros_like(),
                step: 0,
            };
            let (mut sa, mut sb) = (fresh(), fresh());
            for (k, lr) in [0.0, 1e-3, 5e-2, 2e-3, 1e-3].into_iter().enumerate() {
                let g = Tensor::randn([1000], (Kind::Float, Device::Cpu)) * (k as f64 + 0.5);
                sa.step += 1;
                sb.step += 1;
                let scalars = adamw_cpu::Scalars::new(lr, betas, 1e-8, wd, sa.step);
                assert!(adamw_cpu::with_slices(&a, &g, &sa.first, &sa.second, |p, g, m, v| {
                    adamw_cpu::update(p, g, m, v, scalars);
                }));
                tch::no_grad(|| adamw_ops(&b, &g, &mut sb, lr, betas, 1e-8, wd));
            }
            for (x, y, what) in [
                (&a, &b, "θ"),
                (&sa.first, &sb.first, "m"),
                (&sa.second, &sb.second, "v"),
            ] {
                let (x, y) = (
                    Vec::<f32>::try_from(x).expect("f32"),
                    Vec::<f32>::try_from(y).expect("f32"),
                );
                // Equal but for float rounding where ATen's vectorized kernels fuse a multiply-add:
                // a few units in the last place of the tensor's scale.
                let scale = y.iter().fold(0.0f32, |a, y| a.max(y.abs()));
                let worst = x.iter().zip(&y).fold(0.0f32, |a, (x, y)| a.max((x - y).abs())) / scale;
                assert!(
                    worst < 1e-6,
                    "{what} (betas {betas:?}, wd {wd}): difference {worst:e} of its scale"
                );
            }
            assert!(
                bool::try_from(a.ne_tensor(&p0).any()).expect("bool"),
                "the one-pass step moved the parameter"
            );
        }
    }

    #[test]
    fn adamw_and_clipping_match_torch() {
        // Printed by `scripts/adamw_reference.py` with torch 2.11.0: the parameters after five
        // steps of torch.optim.AdamW (betas (0.9, 0.999), eps 1e-8, weight decay 0.1,
        // foreach=False) at learning rates 0, 0.05, 0.1, 0.075, 0.05, each after
        // clip_grad_norm_(0.5) (norms 1.31, 1.31, 1.11, 0.91, 0.90: every step clips).
        let want: [&[f64]; 4] = [
            &[
                -0.6551898121833801,
                0.4670051038265228,
                0.07595224678516388,
                0.6377588510513306,
                -0.17373499274253845,
                -0.5647384524345398,
                0.6543869376182556,
                0.26091891527175903,
                -0.13006775081157684,
                0.5595881938934326,
                0.16296172142028809,
                -0.22818855941295624,
            ],
            &[
                -0.05860162898898125,
                0.4331161081790924,
                -0.0006923973560333252,
                -0.5480004549026489,
            ],
            &[
                0.14354372024536133,
                -0.5578796863555908,
                0.1558045744895935,
                -0.24097955226898193,
                -0.43537577986717224,
                0.557879626750946,
                0.13602758944034576,
                -0.2454073429107666,
            ],
            &[0.41936808824539185, -0.030258996412158012],
        ];
        let (net, x, y) = reference_problem();
        let inner = InnerSpec {
            weight_decay: 0.1,
            optimizer: InnerOptimizer::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            ..InnerSpec::default()
        };
        let mut optimizer = Optimizer::new(&inner, net.params.len());
        for lr in [0.0, 0.05, 0.1, 0.075, 0.05] {
            let loss = primitives::cross_entropy(&net.forward(&x), &y).sum(Kind::Float);
            let grads = primitives::gradient(&net, &loss);
            clip_grad_norm(&grads, 0.5);
            optimizer.step(&net.params, &grads, lr);
        }
        // Relative to each tensor's scale: float rounding (ATen's vectorized kernels fuse some
        // multiply-adds; ours do not) moves a value near zero by ulps of its neighbours.
        let mut worst = 0.0f64;
        for (p, want) in net.params.iter().zip(want) {
            let got = Vec::<f32>::try_from(p.detach().reshape([-1])).expect("f32");
            assert_eq!(got.len(), want.len());
            let scale = want.iter().fold(0.0f64, |a, w| a.max(w.abs()));
            for (&g, &w) in got.iter().zip(want) {
                let rel = (f64::from(g) - w).abs() / scale;
                worst = worst.max(rel);
                assert!(
                    rel <= 1e-6,
                    "{g} against torch's {w}: difference {rel:e} of the tensor's scale"
                );
            }
        }
        eprintln!("largest difference from torch, relative to the tensor's scale: {worst:e}");
    }

    #[test]
    fn clipping_leaves_gradients_under_the_norm_alone() {
        let grads = [Tensor::from_slice(&[0.3f32, 0.4]), Tensor::from_slice(&[0.0f32])];
        let before: Vec<Vec<f32>> = grads.iter().map(|g| Vec::try_from(g).expect("f32")).collect();
        clip_grad_norm(&grads, 1.0);
        let after: Vec<Vec<f32>> = grads.iter().map(|g| Vec::try_from(g).expect("f32")).collect();
        assert_eq!(before, after);
        clip_grad_norm(&grads, 0.25);
        let clipped = Vec::<f32>::try_from(&grads[0]).expect("f32");
        assert!(
            (clipped[0] - 0.15).abs() < 1e-6 && (clipped[1] - 0.2).abs() < 1e-6,
            "{clipped:?}"
        );
    }

    #[test]
    fn accumulated_micro_batches_give_the_whole_batch_s_loss_and_gradient() {
        let (net, x, y) = reference_problem();
        let w = Tensor::from_slice(&[1.0f32, 0.5, 2.0, 1.0, 0.25, 1.5]);
        let (whole, g1) = accumulated_step(&net, &x, &y, &w, 1).expect("step");
        for micro in [2, 4, 6] {
            let (sum, g) = accumulated_step(&net, &x, &y, &w, micro).expect("step");
            assert!((sum - whole).abs() < 1e-5 * whole.abs(), "{sum} != {whole}");
            for (a, b) in g.iter().zip(&g1) {
                let diff = (a - b).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "micro {micro}: {diff}");
            }
        }
    }
}
