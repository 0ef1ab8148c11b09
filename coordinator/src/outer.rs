//! The outer model update: average the workers' pseudo-gradients (θ_after − θ_before) in
//! assignment order and turn them into the exact update the coordinator applies and ships.

use metaloop_proto::config::{OuterConfig, OuterMethod};
use metaloop_proto::tensor::Bundle;
use std::sync::Arc;

/// Outer optimizer state (the Nesterov momentum buffer, in Δ's sign convention; shared with
/// a checkpoint being written rather than copied).
#[derive(Debug, Clone)]
pub struct OuterOptimizer {
    config: OuterConfig,
    momentum: Option<Arc<Bundle>>,
}

impl OuterOptimizer {
    pub fn new(config: OuterConfig) -> Self {
        Self { config, momentum: None }
    }

    /// The momentum buffer, for checkpoints and the state checksum.
    pub fn momentum(&self) -> Option<&Arc<Bundle>> {
        self.momentum.as_ref()
    }

    /// Restores the momentum buffer from a checkpoint.
    pub fn set_momentum(&mut self, momentum: Option<Arc<Bundle>>) {
        self.momentum = momentum;
    }

    /// The update u to apply as θ ← θ + u, from the combined delta Δ̄ (an [`OrderedSum`]'s
    /// result), computed in place:
    /// * `average`:  u = lr · Δ̄
    /// * `nesterov`: b ← μ·b + Δ̄;  u = lr · (Δ̄ + μ·b)  (PyTorch's Nesterov SGD on −Δ̄, as DiLoCo)
    pub fn step(&mut self, mut mean: Bundle) -> Bundle {
        let (lr, mu) = (self.config.lr as f32, self.config.momentum as f32);
        match self.config.method {
            OuterMethod::Average => {
                for v in values(&mut mean) {
                    *v *= lr;
                }
            }
            OuterMethod::Nesterov => {
                let mut shared = self.momentum.take().unwrap_or_else(|| Arc::new(mean.zeros_like()));
                // In place unless a checkpoint still holds it.
                let buf = Arc::make_mut(&mut shared);
                for (b, d) in buf.tensors.iter_mut().zip(&mut mean.tensors) {
                    for (bv, dv) in b.data.iter_mut().zip(&mut d.data) {
                        *bv = mu * *bv + *dv;
                        *dv = lr * (*dv + mu * *bv);
                    }
                }
                self.momentum = Some(shared);
            }
        }
        mean
    }
}

/// How a round's deltas are combined.
#[derive(Debug, Clone, PartialEq)]
pub enum Combine {
    /// Their mean.
    Mean,
    /// Σ_j ω_j Δ_j over the first `ω.len()` assignments (the weights sum to 1): the task
    /// policy's Reptile step; later assignments' deltas are not used.
    Weighted(Vec<f64>),
    /// The first assignment's delta alone (a fine-tuning round).
    First,
}

/// Combines a round's deltas in assignment order as they arrive: a delta is folded in and
/// dropped as soon as every earlier one has been, so the coordinator holds the running sum
/// plus only the deltas that arrived ahead of their turn, not one per worker. The result is
/// bit-identical to summing the complete list in order.
#[derive(Debug)]
pub struct OrderedSum {
    combine: Combine,
    n: usize,
    next: usize,
    sum: Option<Bundle>,
    waiting: std::collections::BTreeMap<usize, Bundle>,
}

impl OrderedSum {
    /// A sum over assignments `0..n`.
    pub fn new(combine: Combine, n: usize) -> Self {
        Self {
            combine,
            n,
            next: 0,
            sum: None,
            waiting: std::collections::BTreeMap::new(),
        }
    }

    /// Assignment `index`'s delta (each index once; the caller checks layouts).
    pub fn add(&mut self, index: usize, delta: Bundle) {
        self.waiting.insert(index, delta);
        while let Some(d) = self.waiting.remove(&self.next) {
            self.fold(self.next, d);
            self.next += 1;
        }
    }

    fn fold(&mut self, index: usize, mut d: Bundle) {
        let weight = match &self.combine {
            Combine::Mean => 1.0,
            Combine::Weighted(w) => match w.get(index) {
                Some(&w) => w as f32,
                None => return,
            },
            Combine::First => {
                if index == 0 {
                    self.sum = Some(d);
                }
                return;
            }
        };
        match &mut self.sum {
            // 0 + w·v, exactly as when adding into zeros (−0 becomes +0).
            None => {
                for v in values(&mut d) {
                    *v = 0.0 + if weight == 1.0 { *v } else { weight * *v };
                }
                self.sum = Some(d);
            }
            Some(sum) => {
                for (s, t) in sum.tensors.iter_mut().zip(&d.tensors) {
                    for (sv, tv) in s.data.iter_mut().zip(&t.data) {
                        *sv += if weight == 1.0 { *tv } else { weight * tv };
                    }
                }
            }
        }
    }

    /// The assignment whose delta is folded in next (`n` once all are).
    pub fn next(&self) -> usize {
        self.next
    }

    /// Deltas that arrived ahead of their turn, waiting.
    pub fn buffered(&self) -> usize {
        self.waiting.len()
    }

    /// The combined delta (the mean for [`Combine::Mean`]), once all `n` have been added.
    pub fn finish(self) -> Option<Bundle> {
        if self.next < self.n {
            return None;
        }
        let mut sum = self.sum?;
        if self.combine == Combine::Mean {
            let scale = 1.0 / self.n as f32;
            for v in values(&mut sum) {
                *v *= scale;
            }
        }
        Some(sum)
    }
}

fn values(b: &mut Bundle) -> impl Iterator<Item = &mut f32> {
    b.tensors.iter_mut().flat_map(|t| t.data.iter_mut())
}

#[cfg(test)]
mod tests {
    use super::*;
    use metaloop_proto::tensor::HostTensor;

    fn b(v: &[f32]) -> Bundle {
        Bundle {
            tensors: vec![HostTensor {
                name: "w".into(),
                shape: vec![v.len()],
                data: v.to_vec(),
            }],
        }
    }

    /// The deltas added in order.
    fn combine(how: Combine, deltas: Vec<Bundle>) -> Bundle {
        let mut s = OrderedSum::new(how, deltas.len());
        for (i, d) in deltas.into_iter().enumerate() {
            s.add(i, d);
        }
        s.finish().expect("complete")
    }

    /// Arrival order does not change a bit of the result, and a delta that arrives ahead of
    /// its turn waits; nothing is returned before every assignment is in.
    #[test]
    fn ordered_sum_is_bit_identical_in_any_arrival_order() {
        let deltas: Vec<Bundle> = (0..5)
            .map(|i| b(&[0.1 * i as f32 + 1e-7, -0.0, 3.3e-3 / (i as f32 + 1.0)]))
            .collect();
        for how in [
            Combine::Mean,
            Combine::Weighted(vec![0.1, 0.2, 0.3, 0.4]),
            Combine::First,
        ] {
            let in_order = combine(how.clone(), deltas.clone());
            for order in [[4, 3, 2, 1, 0], [2, 0, 4, 1, 3], [1, 2, 3, 4, 0]] {
                let mut s = OrderedSum::new(how.clone(), deltas.len());
                for (k, &i) in order.iter().enumerate() {
                    s.add(i, deltas[i].clone());
                    if k + 1 < order.len() {
                        assert!(s.waiting.len() + s.next < 6, "nothing is held twice");
                    }
                }
                let got = s.finish().expect("complete");
                let bits = |x: &Bundle| x.tensors[0].data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&in_order), "{how:?} {order:?}");
            }
        }
        // The mean adds into zeros: −0 + −0 gives +0, as the plain loop did.
        assert_eq!(
            combine(Combine::Mean, vec![b(&[-0.0]), b(&[-0.0])]).tensors[0].data[0].to_bits(),
            0
        );
        let mut s = OrderedSum::new(Combine::Mean, 3);
        s.add(0, b(&[1.0]));
        s.add(2, b(&[1.0]));
        assert!(s.finish().is_none(), "a sum with a missing delta must not finish");
    }

    #[test]
    fn average_is_the_scaled_mean() {
        let mut o = OuterOptimizer::new(OuterConfig {
            method: OuterMethod::Average,
            lr: 1.0,
            momentum: 0.0,
            delta_dtype: metaloop_proto::config::DeltaDType::F32,
            delta_block: None,
            max_receiving: 2,
        });
        assert_eq!(
            o.step(combine(Combine::Mean, vec![b(&[1.0, 2.0]), b(&[3.0, -2.0])])),
            b(&[2.0, 0.0])
        );
    }

    #[test]
    fn reptile_is_the_weighted_mean_scaled_by_lr() {
        let mut o = OuterOptimizer::new(OuterConfig {
            method: OuterMethod::Average,
            lr: 0.5,
            momentum: 0.0,
            delta_dtype: metaloop_proto::config::DeltaDType::F32,
            delta_block: None,
            max_receiving: 2,
        });
        // 0.5 · (0.25·(4, 0) + 0.75·(0, −8)) = (0.5, −3).
        let u = o.step(combine(
            Combine::Weighted(vec![0.25, 0.75]),
            vec![b(&[4.0, 0.0]), b(&[0.0, -8.0]), b(&[100.0, 100.0])],
        ));
        assert_eq!(u, b(&[0.5, -3.0]));
    }

    #[test]
    fn nesterov_matches_hand_computed_steps() {
        let mut o = OuterOptimizer::new(OuterConfig {
            method: OuterMethod::Nesterov,
            lr: 0.5,
            momentum: 0.9,
            delta_dtype: metaloop_proto::config::DeltaDType::F32,
            delta_block: None,
            max_receiving: 2,
        });
        // Round 1: Δ̄ = 2; b = 2; u = 0.5·(2 + 0.9·2) = 1.9.
        let u1 = o.step(combine(Combine::Mean, vec![b(&[1.0]), b(&[3.0])]));
        assert!((u1.tensors[0].data[0] - 1.9).abs() < 1e-6);
        // Round 2: Δ̄ = 1; b = 0.9·2 + 1 = 2.8; u = 0.5·(1 + 0.9·2.8) = 1.76.
        let u2 = o.step(combine(Combine::Mean, vec![b(&[1.0])]));
        assert!((u2.tensors[0].data[0] - 1.76).abs() < 1e-6);
        assert!((o.momentum().expect("buf").tensors[0].data[0] - 2.8).abs() < 1e-6);
    }
}
