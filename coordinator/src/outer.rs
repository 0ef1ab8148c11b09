//! The outer model update: average the workers' pseudo-gradients (θ_after − θ_before) in
//! assignment order and turn them into the exact update the coordinator applies and ships.

use metaloop_common::config::{OuterConfig, OuterMethod};
use metaloop_common::tensor::Bundle;

/// Outer optimizer state (the Nesterov momentum buffer, in Δ's sign convention).
#[derive(Debug, Clone)]
pub struct OuterOptimizer {
    config: OuterConfig,
    momentum: Option<Bundle>,
}

impl OuterOptimizer {
    pub fn new(config: OuterConfig) -> Self {
        Self { config, momentum: None }
    }

    /// The momentum buffer, for checkpoints and the state checksum.
    pub fn momentum(&self) -> Option<&Bundle> {
        self.momentum.as_ref()
    }

    /// Restores the momentum buffer from a checkpoint.
    pub fn set_momentum(&mut self, momentum: Option<Bundle>) {
        self.momentum = momentum;
    }

    /// Averages `deltas` (already in assignment order, same layout) and returns the update
    /// u to apply as θ ← θ + u:
    /// * `average`:  u = lr · Δ̄
    /// * `nesterov`: b ← μ·b + Δ̄;  u = lr · (Δ̄ + μ·b)  (PyTorch's Nesterov SGD on −Δ̄, as DiLoCo)
    pub fn step(&mut self, deltas: &[&Bundle]) -> Bundle {
        let Some(first) = deltas.first() else {
            return Bundle::default();
        };
        let mut mean = first.zeros_like();
        for d in deltas {
            mean.add_assign(d);
        }
        let scale = 1.0 / deltas.len() as f32;
        for t in &mut mean.tensors {
            for v in &mut t.data {
                *v *= scale;
            }
        }
        self.apply(mean)
    }

    /// Like [`OuterOptimizer::step`] on the weighted mean Σ_j ω_j Δ_j (the weights sum to 1):
    /// the task policy's Reptile step θ ← θ + lr · Σ_j w̃_j (θ_j − θ).
    pub fn step_weighted(&mut self, deltas: &[&Bundle], weights: &[f64]) -> Bundle {
        let Some(first) = deltas.first() else {
            return Bundle::default();
        };
        let mut mean = first.zeros_like();
        for (d, &w) in deltas.iter().zip(weights) {
            for (m, t) in mean.tensors.iter_mut().zip(&d.tensors) {
                for (mv, tv) in m.data.iter_mut().zip(&t.data) {
                    *mv += w as f32 * tv;
                }
            }
        }
        self.apply(mean)
    }

    fn apply(&mut self, mean: Bundle) -> Bundle {
        let (lr, mu) = (self.config.lr as f32, self.config.momentum as f32);
        match self.config.method {
            OuterMethod::Average => map(&mean, None, |d, _| lr * d),
            OuterMethod::Nesterov => {
                let mut buf = self.momentum.take().unwrap_or_else(|| mean.zeros_like());
                for (b, d) in buf.tensors.iter_mut().zip(&mean.tensors) {
                    for (bv, dv) in b.data.iter_mut().zip(&d.data) {
                        *bv = mu * *bv + dv;
                    }
                }
                let update = map(&mean, Some(&buf), |d, b| lr * (d + mu * b));
                self.momentum = Some(buf);
                update
            }
        }
    }
}

fn map(a: &Bundle, b: Option<&Bundle>, f: impl Fn(f32, f32) -> f32) -> Bundle {
    let mut out = a.clone();
    for (i, t) in out.tensors.iter_mut().enumerate() {
        for (j, v) in t.data.iter_mut().enumerate() {
            *v = f(*v, b.map_or(0.0, |b| b.tensors[i].data[j]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use metaloop_common::tensor::HostTensor;

    fn b(v: &[f32]) -> Bundle {
        Bundle {
            tensors: vec![HostTensor {
                name: "w".into(),
                shape: vec![v.len()],
                data: v.to_vec(),
            }],
        }
    }

    #[test]
    fn average_is_the_scaled_mean() {
        let mut o = OuterOptimizer::new(OuterConfig {
            method: OuterMethod::Average,
            lr: 1.0,
            momentum: 0.0,
        });
        assert_eq!(o.step(&[&b(&[1.0, 2.0]), &b(&[3.0, -2.0])]), b(&[2.0, 0.0]));
    }

    #[test]
    fn reptile_is_the_weighted_mean_scaled_by_lr() {
        let mut o = OuterOptimizer::new(OuterConfig {
            method: OuterMethod::Average,
            lr: 0.5,
            momentum: 0.0,
        });
        // 0.5 · (0.25·(4, 0) + 0.75·(0, −8)) = (0.5, −3).
        let u = o.step_weighted(&[&b(&[4.0, 0.0]), &b(&[0.0, -8.0])], &[0.25, 0.75]);
        assert_eq!(u, b(&[0.5, -3.0]));
    }

    #[test]
    fn nesterov_matches_hand_computed_steps() {
        let mut o = OuterOptimizer::new(OuterConfig {
            method: OuterMethod::Nesterov,
            lr: 0.5,
            momentum: 0.9,
        });
        // Round 1: Δ̄ = 2; b = 2; u = 0.5·(2 + 0.9·2) = 1.9.
        let u1 = o.step(&[&b(&[1.0]), &b(&[3.0])]);
        assert!((u1.tensors[0].data[0] - 1.9).abs() < 1e-6);
        // Round 2: Δ̄ = 1; b = 0.9·2 + 1 = 2.8; u = 0.5·(1 + 0.9·2.8) = 1.76.
        let u2 = o.step(&[&b(&[1.0])]);
        assert!((u2.tensors[0].data[0] - 1.76).abs() < 1e-6);
        assert!((o.momentum().expect("buf").tensors[0].data[0] - 2.8).abs() < 1e-6);
    }
}
