//! The inner loop (docs/algorithms.md §2): an assignment's SGD-with-momentum steps on its batch
//! stream, alone or as one replica of several with the gradients summed through the collective.

use crate::collective::{self, Collective};
use crate::data::Batches;
use crate::primitives;
use crate::train::TrainError;
use metaloop_common::model::{self, Inputs, Model};
use metaloop_proto::proto::{Assignment, InnerSpec};
use metaloop_proto::rng::derive_seed;
use tch::{Device, Tensor};

/// What the inner steps did.
pub(crate) struct Trained {
    /// The sum of the steps' batch losses.
    pub(crate) loss_sum: f64,
    /// Rows seen over all steps.
    pub(crate) samples: u64,
}

/// The assignment's `a.steps` SGD-with-momentum steps on `batches` from the model as it is,
/// with fresh optimizer state. Dropout draws from libtorch's generator, seeded here from `a.seed`.
/// `sample_weights`, when it gives weights for a batch, multiplies each row's loss weight by
/// them. With a `collective`, each step runs on this replica's share of the batch
/// ([`shared_step`]). Leaves the model in eval mode.
///
/// # Errors
/// `Diverged` at a non-finite loss, `Collective`, or a libtorch failure.
pub(crate) fn train(
    model: &dyn Model,
    collective: Option<&dyn Collective>,
    inner: &InnerSpec,
    batches: &mut Batches<'_>,
    a: &Assignment,
    device: Device,
    sample_weights: impl Fn(&dyn Model, &Inputs, &Tensor) -> Option<Tensor>,
) -> Result<Trained, TrainError> {
    // Dropout draws from libtorch's generator: seeded by the assignment, like all else.
    tch::manual_seed(derive_seed(a.seed, &[5 << 32]) as i64);
    model.set_train(true);
    let mut momentum: Vec<Option<Tensor>> = model.parameters().iter().map(|_| None).collect();
    let mut loss_sum = 0.0f64;
    let mut samples = 0u64;
    for step in 0..a.steps {
        let (xs, ys, ws) = batches.next();
        samples += ys.len() as u64;
        let (x, y) = model::batch_tensors(&xs, &ys, batches.features(), device);
        let mut w = Tensor::from_slice(&ws).to_device(device);
        if let Some(s) = sample_weights(model, &x, &y) {
            w *= s;
        }
        let (value, grads) = match collective {
            None => {
                let logits = model.forward(&x);
                let loss = (primitives::cross_entropy(&logits, &y) * w).sum(tch::Kind::Float);
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
            Some(c) => shared_step(model, c, &x, &y, &w)?,
        };
        if !value.is_finite() {
            return Err(TrainError::Diverged { step });
        }
        loss_sum += value;
        sgd_step(
            model.parameters(),
            &grads,
            &mut momentum,
            inner.lr,
            inner.momentum,
            inner.weight_decay,
        );
    }
    model.set_train(false);
    Ok(Trained { loss_sum, samples })
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
) -> Result<(f64, Vec<Tensor>), TrainError> {
    zero_grads(model.parameters());
    let rows = collective::share(y.size()[0] as usize, collective.rank(), collective.size());
    let (start, len) = (rows.start as i64, rows.len() as i64);
    let logits = model.forward(&x.narrow(start, len));
    let loss =
        (primitives::cross_entropy(&logits, &y.narrow(0, start, len)) * w.narrow(0, start, len)).sum(tch::Kind::Float);
    loss.backward();
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
    parts.push(loss.detach().reshape([1]));
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
