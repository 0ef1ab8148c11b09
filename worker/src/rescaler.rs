//! Meta loss rescaling on the worker (docs/algorithms.md §5): the network Ω maps each sample's
//! features to a weight on its loss, and its meta-gradient is taken through one virtual step:
//! θ' = θ − α ∇θ (1/n) Σ_i w̃_i ℓ_i(θ), u = ∇θ' L_val(θ'), c_i = ⟨∇θ ℓ_i(θ), u⟩,
//! ∇Ω = −(α/n) Σ_i c_i ∂w̃_i/∂Ω (+ the direct derivative of L_val in self-taught mode).
//! Written against the `Model` trait only, for θ and for Ω.

use crate::primitives::{self, FD_RADIUS};
use metaloop_common::model::{Inputs, Model};
use metaloop_proto::proto::DirectionalMethod;
use tch::Tensor;

/// Ω's weights `[n]` in (0, 1) for features `[n, F]`.
pub fn omega_weights(omega: &dyn Model, features: &Tensor) -> Tensor {
    omega
        .forward(&Inputs::Dense(features.shallow_clone()))
        .sigmoid()
        .squeeze_dim(1)
}

/// Training weights from raw Ω outputs: normalised to mean 1 within the batch when `normalize`
/// (the collapse guard), else used as they are.
pub fn batch_weights(raw: &Tensor, normalize: bool) -> Tensor {
    if normalize {
        raw / raw.mean(raw.kind()).clamp_min(1e-12)
    } else {
        raw.shallow_clone()
    }
}

/// Where L_val comes from.
#[derive(Debug)]
pub enum Validation<'a> {
    /// Meta-Weight-Net: mean loss on a trusted clean batch.
    Clean { x: &'a Inputs, y: &'a Tensor },
    /// Self-taught: a batch of the noisy training data, its loss weighted by Ω and normalised:
    /// L_val = Σ_j Ω(f_j) ℓ_j(θ') / Σ_j Ω(f_j).
    SelfTaught {
        x: &'a Inputs,
        y: &'a Tensor,
        features: &'a Tensor,
    },
}

/// A training batch with Ω's input features.
#[derive(Debug)]
pub struct Batch<'a> {
    pub x: &'a Inputs,
    pub y: &'a Tensor,
    pub features: &'a Tensor,
}

/// How the virtual step is taken and differentiated.
#[derive(Debug, Clone, Copy)]
pub struct VirtualStep {
    /// The inner learning rate α.
    pub alpha: f64,
    /// Normalise Ω's weights to mean 1 in the batch.
    pub normalize: bool,
    pub directional: DirectionalMethod,
}

/// The meta-gradient of Ω (one tensor per Ω parameter) and L_val(θ').
pub fn meta_gradient(
    model: &dyn Model,
    omega: &dyn Model,
    batch: &Batch<'_>,
    val: &Validation<'_>,
    step: VirtualStep,
) -> (Vec<Tensor>, f64) {
    let Batch { x, y, features } = *batch;
    let VirtualStep {
        alpha,
        normalize,
        directional,
    } = step;
    let n = y.size()[0] as f64;
    let w = batch_weights(&omega_weights(omega, features), normalize);
    // Virtual step with the weights as constants.
    let inner = (primitives::per_sample_loss(model, x, y) * w.detach()).mean(w.kind());
    let g = primitives::gradient(model, &inner);
    let saved: Vec<Tensor> = tch::no_grad(|| model.parameters().iter().map(Tensor::copy).collect());
    tch::no_grad(|| {
        for ((p, s), g) in model.parameters().iter().zip(&saved).zip(&g) {
            let mut p = p.shallow_clone();
            p.copy_(s);
            primitives::axpy(&mut p, -alpha, g);
        }
    });
    let (val_loss, u, direct) = match val {
        Validation::Clean { x, y } => {
            let l = primitives::per_sample_loss(model, x, y).mean(w.kind());
            let u = primitives::gradient(model, &l);
            (l.double_value(&[]), u, None)
        }
        Validation::SelfTaught { x, y, features } => {
            let lv = primitives::per_sample_loss(model, x, y);
            let wv = omega_weights(omega, features);
            let l = (&lv * wv.detach()).sum(w.kind()) / wv.detach().sum(w.kind());
            let u = primitives::gradient(model, &l);
            // The direct path: L_val's own dependence on Ω at fixed θ'.
            let direct = (lv.detach() * &wv).sum(w.kind()) / wv.sum(w.kind());
            (l.double_value(&[]), u, Some(direct))
        }
    };
    tch::no_grad(|| {
        for (p, s) in model.parameters().iter().zip(&saved) {
            let mut p = p.shallow_clone();
            p.copy_(s);
        }
    });
    let c = match directional {
        DirectionalMethod::Exact => primitives::directional_exact(model, x, y, &u),
        DirectionalMethod::FiniteDifference => primitives::directional_fd(model, x, y, &u, FD_RADIUS),
    }
    .to_kind(w.kind())
    .detach();
    let mut objective = (c * &w).sum(w.kind()) * (-alpha / n);
    if let Some(d) = direct {
        objective += d;
    }
    let grads = Tensor::run_backward(&[&objective], omega.parameters(), false, false);
    (grads, val_loss)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{net, randn, Net};
    use metaloop_proto::rng::SplitMix64;
    use tch::Kind;

    fn shifted(omega: &Net, dir: &[Tensor], h: f64) -> Net {
        Net {
            params: omega
                .params
                .iter()
                .zip(dir)
                .map(|(p, d)| (p.detach() + d * h).set_requires_grad(true))
                .collect(),
            names: omega.names.clone(),
        }
    }

    /// L_val(θ'(Ω)) computed from scratch: the virtual step, then the validation loss.
    fn outer_loss(theta: &Net, omega: &Net, batch: &Batch<'_>, val: &Validation<'_>, step: VirtualStep) -> f64 {
        let Batch { x, y, features: f } = *batch;
        let alpha = step.alpha;
        let w = batch_weights(&omega_weights(omega, f), step.normalize).detach();
        let inner = (primitives::per_sample_loss(theta, x, y) * &w).mean(Kind::Double);
        let stepped = theta.stepped(&primitives::gradient(theta, &inner), alpha);
        tch::no_grad(|| match val {
            Validation::Clean { x, y } => primitives::per_sample_loss(&stepped, x, y)
                .mean(Kind::Double)
                .double_value(&[]),
            Validation::SelfTaught { x, y, features } => {
                let lv = primitives::per_sample_loss(&stepped, x, y);
                let wv = omega_weights(omega, features);
                ((lv * &wv).sum(Kind::Double) / wv.sum(Kind::Double)).double_value(&[])
            }
        })
    }

    fn check(mode: &str, normalize: bool) {
        let theta = net(1, [3, 4, 3]);
        let omega = net(2, [2, 3, 1]);
        let mut rng = SplitMix64::new(3);
        let x = Inputs::Dense(randn(&mut rng, &[6, 3]));
        let y = Tensor::from_slice(&[0i64, 1, 2, 2, 1, 0]);
        let f = randn(&mut rng, &[6, 2]);
        let vx = Inputs::Dense(randn(&mut rng, &[5, 3]));
        let vy = Tensor::from_slice(&[1i64, 0, 2, 1, 1]);
        let vf = randn(&mut rng, &[5, 2]);
        let val = match mode {
            "clean" => Validation::Clean { x: &vx, y: &vy },
            _ => Validation::SelfTaught {
                x: &vx,
                y: &vy,
                features: &vf,
            },
        };
        let alpha = 0.5;
        for method in [DirectionalMethod::Exact, DirectionalMethod::FiniteDifference] {
            let batch = Batch {
                x: &x,
                y: &y,
                features: &f,
            };
            let step = VirtualStep {
                alpha,
                normalize,
                directional: method,
            };
            let (grads, _) = meta_gradient(&theta, &omega, &batch, &val, step);
            for trial in 0..3 {
                let dir: Vec<Tensor> = omega
                    .params
                    .iter()
                    .map(|p| randn(&mut SplitMix64::new(10 + trial), &p.size()))
                    .collect();
                let analytic: f64 = grads
                    .iter()
                    .zip(&dir)
                    .map(|(g, d)| (g * d).sum(Kind::Double).double_value(&[]))
                    .sum();
                let h = 1e-5;
                let numeric = (outer_loss(&theta, &shifted(&omega, &dir, h), &batch, &val, step)
                    - outer_loss(&theta, &shifted(&omega, &dir, -h), &batch, &val, step))
                    / (2.0 * h);
                // Exact: θ' is affine in the weights, so only finite-difference error remains.
                // Finite-difference c_i adds an O(ε²) error with ε‖u‖ = 0.01.
                let tol = match method {
                    DirectionalMethod::Exact => 1e-6 + 1e-5 * numeric.abs(),
                    DirectionalMethod::FiniteDifference => 1e-4 + 1e-2 * numeric.abs(),
                };
                assert!(
                    (analytic - numeric).abs() <= tol,
                    "{mode} normalize={normalize} {method:?}: {analytic} vs {numeric}"
                );
            }
        }
    }

    #[test]
    fn clean_meta_gradient_matches_finite_differences_through_a_virtual_step() {
        check("clean", false);
        check("clean", true);
    }

    #[test]
    fn self_taught_gradient_matches_finite_differences_including_the_direct_term() {
        check("self-taught", true);
        check("self-taught", false);
    }
}
