//! Outer strategy `domain-weights` (DESIGN.md §6.1): one weight per training domain, uniform,
//! fixed, or learned by the closed-form hypergradient with AdamW on raw λ. Pure: it plans what
//! the workers need and updates from their results.

use crate::checkpoint;
use metaloop_common::checksum::StateHasher;
use metaloop_common::config::{Directional, StrategyConfig, WeightMethod};
use metaloop_common::proto::{AssignmentResult, DirectionalMethod, HypergradientSpec};
use metaloop_common::weights::{self, AdamW};

#[derive(Debug, Clone)]
pub struct DomainWeights {
    names: Vec<String>,
    method: WeightMethod,
    /// Raw λ for `hypergradient`; for `fixed`, the log-free given weights are kept in `fixed`.
    lambda: Vec<f64>,
    fixed: Vec<f64>,
    adam: AdamW,
    hyper: HypergradientSpec,
    /// ‖dL_meta/dλ‖ of the last update.
    last_grad_norm: Option<f64>,
}

impl DomainWeights {
    pub fn new(config: &StrategyConfig, names: Vec<String>) -> Self {
        let k = names.len();
        let fixed = if config.method == WeightMethod::Fixed && config.weights.len() == k {
            let mean = config.weights.iter().sum::<f64>() / k as f64;
            config.weights.iter().map(|w| w / mean).collect()
        } else {
            vec![1.0; k]
        };
        Self {
            names,
            method: config.method,
            lambda: vec![0.0; k],
            fixed,
            adam: AdamW::new(k, config.lr, config.weight_decay),
            hyper: HypergradientSpec {
                directional: match config.directional {
                    Directional::Exact => DirectionalMethod::Exact,
                    Directional::FiniteDifference => DirectionalMethod::FiniteDifference,
                },
                probe: config.probe,
            },
            last_grad_norm: None,
        }
    }

    pub fn method(&self) -> WeightMethod {
        self.method
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Current weights, mean 1, in domain order.
    pub fn weights(&self) -> Vec<f64> {
        match self.method {
            WeightMethod::Uniform => vec![1.0; self.names.len()],
            WeightMethod::Fixed => self.fixed.clone(),
            WeightMethod::Hypergradient => weights::normalized(&self.lambda),
        }
    }

    /// What the workers need this round: the weights and whether to measure d_k.
    pub fn plan(&self) -> (Vec<f64>, Option<HypergradientSpec>) {
        let hyper = (self.method == WeightMethod::Hypergradient).then_some(self.hyper);
        (self.weights(), hyper)
    }

    /// ‖dL_meta/dλ‖ of the last update, if any.
    pub fn last_grad_norm(&self) -> Option<f64> {
        self.last_grad_norm
    }

    /// One outer step from a round's results (in assignment order): d_k is the
    /// sample-weighted mean of the workers' Σ c_i, then the closed-form gradient and AdamW.
    pub fn update(&mut self, results: &[&AssignmentResult]) {
        if self.method != WeightMethod::Hypergradient {
            return;
        }
        let k = self.names.len();
        let (mut sums, mut counts) = (vec![0.0f64; k], vec![0u64; k]);
        for r in results {
            for (i, s) in r.domains.iter().enumerate().take(k) {
                sums[i] += s.d_sum;
                counts[i] += s.count;
            }
        }
        if counts.contains(&0) {
            tracing::warn!("a domain had no probe samples this round; λ left unchanged");
            self.last_grad_norm = None;
            return;
        }
        let d: Vec<f64> = sums.iter().zip(&counts).map(|(s, &c)| s / c as f64).collect();
        let grad = weights::hypergradient(&self.lambda, &d);
        self.last_grad_norm = Some(grad.iter().map(|g| g * g).sum::<f64>().sqrt());
        self.adam.step(&mut self.lambda, &grad);
    }

    /// The whole outer state as named vectors: λ, AdamW's moments and step, the fixed weights.
    pub fn state(&self) -> Vec<(String, Vec<f64>)> {
        vec![
            ("domain_weights.lambda".into(), self.lambda.clone()),
            ("domain_weights.adam_m".into(), self.adam.m.clone()),
            ("domain_weights.adam_v".into(), self.adam.v.clone()),
            ("domain_weights.adam_step".into(), vec![self.adam.t as f64]),
            ("domain_weights.fixed".into(), self.fixed.clone()),
        ]
    }

    /// Takes over a state written by [`DomainWeights::state`].
    ///
    /// # Errors
    /// When names or lengths do not match this job's domains.
    pub fn restore(&mut self, state: &[(String, Vec<f64>)]) -> anyhow::Result<()> {
        let get = |name: &str, len: usize| checkpoint::named(state, name, len);
        let k = self.names.len();
        let (lambda, m, v, fixed) = (
            get("domain_weights.lambda", k)?,
            get("domain_weights.adam_m", k)?,
            get("domain_weights.adam_v", k)?,
            get("domain_weights.fixed", k)?,
        );
        let t = get("domain_weights.adam_step", 1)?[0];
        self.lambda = lambda;
        self.adam.m = m;
        self.adam.v = v;
        self.adam.t = t as u64;
        self.fixed = fixed;
        Ok(())
    }

    /// Adds the outer state to a state checksum.
    pub fn hash_into(&self, h: &mut StateHasher) {
        checkpoint::hash_named(h, &self.state());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metaloop_common::proto::DomainStat;

    fn result(stats: &[(f64, u64)]) -> AssignmentResult {
        AssignmentResult {
            round: 0,
            assignment: 0,
            delta_transfer: 0,
            train_loss: 1.0,
            samples: 1,
            compute_seconds: 0.0,
            meta_loss: Some(1.0),
            domains: stats
                .iter()
                .map(|&(d_sum, count)| DomainStat { d_sum, count })
                .collect(),
            omega_grad: Vec::new(),
        }
    }

    fn config(method: WeightMethod) -> StrategyConfig {
        StrategyConfig {
            method,
            weights: vec![3.0, 1.0],
            ..StrategyConfig::default()
        }
    }

    #[test]
    fn aligned_domains_gain_weight_and_d_is_count_weighted() {
        let mut s = DomainWeights::new(&config(WeightMethod::Hypergradient), vec!["good".into(), "bad".into()]);
        assert_eq!(s.weights(), vec![1.0, 1.0]);
        // Worker A: d_good = 4/2, d_bad = -2/2; worker B: d_good = 0/2, d_bad = -6/2.
        // Count-weighted: d = (1, -2), not the mean of per-worker means... which is equal here,
        // so B gets more probe samples to tell them apart: d_good = (4 + 0)/(2 + 6) = 0.5.
        let (a, b) = (result(&[(4.0, 2), (-2.0, 2)]), result(&[(0.0, 6), (-6.0, 2)]));
        s.update(&[&a, &b]);
        let w = s.weights();
        assert!(w[0] > 1.0 && w[1] < 1.0, "{w:?}");
        let expected = weights::hypergradient(&[0.0, 0.0], &[0.5, -2.0]);
        let norm = expected.iter().map(|g| g * g).sum::<f64>().sqrt();
        assert!((s.last_grad_norm().expect("updated") - norm).abs() < 1e-12);
    }

    #[test]
    fn baselines_do_not_move() {
        let mut u = DomainWeights::new(&config(WeightMethod::Uniform), vec!["a".into(), "b".into()]);
        let mut f = DomainWeights::new(&config(WeightMethod::Fixed), vec!["a".into(), "b".into()]);
        let r = result(&[(1.0, 1), (-1.0, 1)]);
        u.update(&[&r]);
        f.update(&[&r]);
        assert_eq!(u.weights(), vec![1.0, 1.0]);
        assert_eq!(f.weights(), vec![1.5, 0.5], "fixed weights are normalised to mean 1");
        assert!(u.plan().1.is_none() && f.plan().1.is_none());
    }
}
