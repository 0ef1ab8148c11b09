//! Outer strategy `domain-weights` (docs/algorithms.md §3, §4): one weight per training domain,
//! uniform, fixed, learned by the closed-form hypergradient with AdamW on raw λ, or by DoReMi's
//! exponentiated gradient on excess loss over a reference model. Pure: it plans what the
//! workers need and updates from their results.

use super::{mean_meta_loss, OuterStrategy, PhaseChange, RoundDesign, Shards, StrategyReport};
use crate::checkpoint;
use crate::outer::Combine;
use metaloop_proto::config::{Directional, JobConfig, StrategyConfig, WeightMethod};
use metaloop_proto::proto::{Ask, AssignmentResult, DirectionalMethod, HypergradientSpec, Signal};
use metaloop_proto::weights::{self, AdamW};
use std::collections::BTreeMap;

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
    /// Every domain's mean d_k = ⟨∇ℓ_k, ∇L_meta⟩ per probed sample in the last update (for the
    /// round's record; not state).
    last_alignment: Option<Vec<f64>>,
    doremi: Option<Doremi>,
    shards: Shards,
    /// DoReMi's reference phase ends before this round.
    reference_rounds: u64,
    /// What the round in progress asked for.
    ask: Ask,
}

/// DoReMi's state: the mixture α, its running average (what is reported), the last excess
/// loss per domain, and the reference model's loss on every training sample (empty during the
/// reference phase).
#[derive(Debug, Clone)]
struct Doremi {
    eta: f64,
    smoothing: f64,
    probe: u32,
    alpha: Vec<f64>,
    avg_sum: Vec<f64>,
    avg_n: u64,
    excess: Vec<f64>,
    reference_loss: Vec<Vec<f64>>,
}

impl Doremi {
    /// Clipped excess loss per domain from the probes (a domain with no probe keeps its last).
    fn excess(&self, results: &[&AssignmentResult]) -> Vec<f64> {
        let k = self.alpha.len();
        let (mut sum, mut n) = (vec![0.0f64; k], vec![0u64; k]);
        for r in results {
            let Signal::Doremi(probes) = &r.signal else { continue };
            for (i, p) in probes.iter().enumerate().take(k) {
                for (&row, &loss) in p.rows.iter().zip(&p.losses) {
                    if let Some(reference) = self.reference_loss[i].get(row as usize) {
                        sum[i] += (f64::from(loss) - reference).max(0.0);
                        n[i] += 1;
                    }
                }
            }
        }
        (0..k)
            .map(|i| if n[i] > 0 { sum[i] / n[i] as f64 } else { self.excess[i] })
            .collect()
    }
}

impl DomainWeights {
    /// The job's domain weights over its training domains `names`.
    pub fn new(job: &JobConfig, names: Vec<String>) -> Self {
        Self {
            shards: Shards::of(job),
            reference_rounds: job.reference_rounds(),
            ..Self::with_strategy(&job.strategy, names)
        }
    }

    fn with_strategy(config: &StrategyConfig, names: Vec<String>) -> Self {
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
            last_alignment: None,
            doremi: (config.method == WeightMethod::Doremi).then(|| Doremi {
                eta: config.eta,
                smoothing: config.smoothing,
                probe: config.probe,
                alpha: vec![1.0 / k as f64; k],
                avg_sum: vec![0.0; k],
                avg_n: 0,
                excess: vec![0.0; k],
                reference_loss: Vec::new(),
            }),
            shards: Shards::default(),
            reference_rounds: 0,
            ask: Ask::Nothing,
        }
    }

    /// True while DoReMi still needs its reference model's losses (the reference phase).
    pub fn needs_reference(&self) -> bool {
        self.doremi.as_ref().is_some_and(|d| d.reference_loss.is_empty())
    }

    /// Ends DoReMi's reference phase: the reference model's loss on every sample of every
    /// domain (in job order).
    pub fn set_reference(&mut self, losses: Vec<Vec<f64>>) {
        if let Some(d) = &mut self.doremi {
            d.reference_loss = losses;
        }
    }

    /// Rows per domain whose losses the workers should return this round (DoReMi's proxy phase).
    pub fn probe_request(&self) -> Option<u32> {
        self.doremi
            .as_ref()
            .filter(|d| !d.reference_loss.is_empty())
            .map(|d| d.probe)
    }

    /// The last excess loss per domain (DoReMi).
    pub fn excess(&self) -> Option<&[f64]> {
        self.doremi.as_ref().map(|d| d.excess.as_slice())
    }

    /// Current weights, mean 1, in domain order.
    pub fn weights(&self) -> Vec<f64> {
        match self.method {
            WeightMethod::Uniform => vec![1.0; self.names.len()],
            WeightMethod::Fixed => self.fixed.clone(),
            WeightMethod::Hypergradient => weights::normalized(&self.lambda),
            WeightMethod::Doremi => match &self.doremi {
                Some(d) if d.avg_n > 0 => d
                    .avg_sum
                    .iter()
                    .map(|s| s / d.avg_n as f64 * d.alpha.len() as f64)
                    .collect(),
                _ => vec![1.0; self.names.len()],
            },
        }
    }

    /// The weights the workers train with: for DoReMi the current α (scaled to mean 1) in the
    /// proxy phase and uniform in the reference phase; otherwise the reported weights.
    pub fn training_weights(&self) -> Vec<f64> {
        match &self.doremi {
            Some(d) if !d.reference_loss.is_empty() => d.alpha.iter().map(|a| a * d.alpha.len() as f64).collect(),
            Some(_) => vec![1.0; self.names.len()],
            None => self.weights(),
        }
    }

    /// What the workers measure this round: d_k (hypergradient), the probe losses (DoReMi's
    /// proxy phase), or nothing.
    fn round_ask(&self) -> Ask {
        if self.method == WeightMethod::Hypergradient {
            Ask::Hypergradient(self.hyper)
        } else if let Some(probe) = self.probe_request() {
            Ask::Doremi { probe }
        } else {
            Ask::Nothing
        }
    }

    /// One outer step from a round's results (in assignment order): d_k is the
    /// sample-weighted mean of the workers' Σ c_i, then the closed-form gradient and AdamW.
    fn learn(&mut self, results: &[&AssignmentResult]) {
        if let Some(d) = &mut self.doremi {
            if !d.reference_loss.is_empty() {
                d.excess = d.excess(results);
                d.alpha = weights::doremi_step(&d.alpha, &d.excess, d.eta, d.smoothing);
                for (s, a) in d.avg_sum.iter_mut().zip(&d.alpha) {
                    *s += a;
                }
                d.avg_n += 1;
            }
            return;
        }
        if self.method != WeightMethod::Hypergradient {
            return;
        }
        let k = self.names.len();
        let (mut sums, mut counts) = (vec![0.0f64; k], vec![0u64; k]);
        for r in results {
            let Signal::Hypergradient(domains) = &r.signal else {
                continue;
            };
            for (i, s) in domains.iter().enumerate().take(k) {
                sums[i] += s.d_sum;
                counts[i] += s.count;
            }
        }
        if counts.contains(&0) {
            tracing::warn!("a domain had no probe samples this round; λ left unchanged");
            self.last_grad_norm = None;
            self.last_alignment = None;
            return;
        }
        let d: Vec<f64> = sums.iter().zip(&counts).map(|(s, &c)| s / c as f64).collect();
        let grad = weights::hypergradient(&self.lambda, &d);
        self.last_grad_norm = Some(grad.iter().map(|g| g * g).sum::<f64>().sqrt());
        self.last_alignment = Some(d);
        self.adam.step(&mut self.lambda, &grad);
    }

    /// The whole outer state as named vectors: λ, AdamW's moments and step, the fixed weights.
    pub fn named_state(&self) -> Vec<(String, Vec<f64>)> {
        let mut state = vec![("domain_weights.lambda".into(), self.lambda.clone())];
        state.extend(checkpoint::adam_state("domain_weights", &self.adam));
        state.push(("domain_weights.fixed".into(), self.fixed.clone()));
        if let Some(d) = &self.doremi {
            state.push(("doremi.alpha".into(), d.alpha.clone()));
            state.push(("doremi.avg_sum".into(), d.avg_sum.clone()));
            state.push(("doremi.avg_n".into(), vec![d.avg_n as f64]));
            state.push(("doremi.excess".into(), d.excess.clone()));
            for (i, l) in d.reference_loss.iter().enumerate() {
                state.push((format!("doremi.reference_loss.{i}"), l.clone()));
            }
        }
        state
    }

    /// Takes over a state written by [`DomainWeights::named_state`].
    ///
    /// # Errors
    /// When names or lengths do not match this job's domains.
    pub fn restore_named(&mut self, state: &[(String, Vec<f64>)]) -> anyhow::Result<()> {
        let get = |name: &str, len: usize| checkpoint::named(state, name, len);
        let k = self.names.len();
        let (lambda, fixed) = (get("domain_weights.lambda", k)?, get("domain_weights.fixed", k)?);
        checkpoint::restore_adam(state, "domain_weights", &mut self.adam, k)?;
        self.lambda = lambda;
        self.fixed = fixed;
        if let Some(d) = &mut self.doremi {
            d.alpha = get("doremi.alpha", k)?;
            d.avg_sum = get("doremi.avg_sum", k)?;
            d.avg_n = get("doremi.avg_n", 1)?[0] as u64;
            d.excess = get("doremi.excess", k)?;
            // The reference losses exist only once the reference phase is over.
            d.reference_loss = (0..k)
                .map_while(|i| {
                    state
                        .iter()
                        .find(|(n, _)| *n == format!("doremi.reference_loss.{i}"))
                        .map(|(_, v)| v.clone())
                })
                .collect();
            anyhow::ensure!(
                d.reference_loss.is_empty() || d.reference_loss.len() == k,
                "outer state has reference losses for only some domains"
            );
        }
        Ok(())
    }

    /// The weights by domain name, as the record shows them.
    pub fn by_name(&self) -> BTreeMap<String, f64> {
        self.names.iter().cloned().zip(self.weights()).collect()
    }
}

impl OuterStrategy for DomainWeights {
    fn name(&self) -> String {
        self.method.as_str().to_string()
    }

    fn phase_change(&self, round: u64) -> Option<PhaseChange> {
        (self.needs_reference() && round >= self.reference_rounds).then_some(PhaseChange::RestartAfterReference)
    }

    fn set_reference(&mut self, losses: Vec<Vec<f64>>) {
        DomainWeights::set_reference(self, losses);
    }

    fn plan(&mut self, round: u64) -> RoundDesign {
        self.ask = self.round_ask();
        RoundDesign {
            assignments: self.shards.assignments(round),
            domain_weights: self.training_weights(),
            ask: self.ask.clone(),
            combine: Combine::Mean,
        }
    }

    fn check(&self, result: &AssignmentResult) -> Result<(), &'static str> {
        let k = self.names.len();
        match (&self.ask, &result.signal) {
            (Ask::Nothing, Signal::Nothing) => Ok(()),
            (Ask::Hypergradient(_), Signal::Hypergradient(domains))
                if domains.len() == k && domains.iter().all(|d| d.d_sum.is_finite()) =>
            {
                Ok(())
            }
            (Ask::Hypergradient(_), _) => Err("bad_hypergradient"),
            (Ask::Doremi { .. }, Signal::Doremi(probes))
                if probes.len() == k
                    && probes
                        .iter()
                        .all(|p| p.rows.len() == p.losses.len() && p.losses.iter().all(|l| l.is_finite())) =>
            {
                Ok(())
            }
            (Ask::Doremi { .. }, _) => Err("bad_probe"),
            _ => Err("unexpected_signal"),
        }
    }

    fn update(&mut self, results: &[&AssignmentResult]) -> StrategyReport {
        self.learn(results);
        StrategyReport {
            meta_loss: mean_meta_loss(results),
            hypergradient_norm: self.last_grad_norm,
            alignment: self
                .last_alignment
                .as_ref()
                .map(|d| self.names.iter().cloned().zip(d.iter().copied()).collect()),
            excess_loss: self
                .probe_request()
                .and(self.excess())
                .map(|e| self.names.iter().cloned().zip(e.iter().copied()).collect()),
            ..StrategyReport::default()
        }
    }

    fn domain_weights(&self) -> BTreeMap<String, f64> {
        self.by_name()
    }

    fn state(&self) -> Vec<(String, Vec<f64>)> {
        self.named_state()
    }

    fn restore(&mut self, state: &[(String, Vec<f64>)]) -> anyhow::Result<()> {
        self.restore_named(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metaloop_proto::proto::{DomainProbe, DomainStat};

    fn result(signal: Signal) -> AssignmentResult {
        AssignmentResult {
            train_loss: 1.0,
            samples: 1,
            meta_loss: Some(1.0),
            signal,
            ..AssignmentResult::new(0, 0, 0)
        }
    }

    fn stats(stats: &[(f64, u64)]) -> AssignmentResult {
        result(Signal::Hypergradient(
            stats
                .iter()
                .map(|&(d_sum, count)| DomainStat { d_sum, count })
                .collect(),
        ))
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
        let mut s =
            DomainWeights::with_strategy(&config(WeightMethod::Hypergradient), vec!["good".into(), "bad".into()]);
        assert_eq!(s.weights(), vec![1.0, 1.0]);
        // Worker A: d_good = 4/2, d_bad = -2/2; worker B: d_good = 0/2, d_bad = -6/2.
        // Count-weighted: d = (1, -2), not the mean of per-worker means... which is equal here,
        // so B gets more probe samples to tell them apart: d_good = (4 + 0)/(2 + 6) = 0.5.
        let (a, b) = (stats(&[(4.0, 2), (-2.0, 2)]), stats(&[(0.0, 6), (-6.0, 2)]));
        assert_eq!(s.plan(0).ask, Ask::Hypergradient(s.hyper));
        assert_eq!(s.check(&a), Ok(()));
        assert_eq!(
            s.check(&stats(&[(1.0, 1)])),
            Err("bad_hypergradient"),
            "one domain of two"
        );
        assert_eq!(s.check(&stats(&[(f64::NAN, 1), (1.0, 1)])), Err("bad_hypergradient"));
        let report = s.update(&[&a, &b]);
        assert_eq!(report.meta_loss, Some(1.0));
        let w = s.weights();
        assert!(w[0] > 1.0 && w[1] < 1.0, "{w:?}");
        let expected = weights::hypergradient(&[0.0, 0.0], &[0.5, -2.0]);
        let norm = expected.iter().map(|g| g * g).sum::<f64>().sqrt();
        assert!((report.hypergradient_norm.expect("updated") - norm).abs() < 1e-12);
        // The record names each domain's count-weighted mean d_k.
        let alignment = report.alignment.expect("reported");
        assert_eq!(alignment.get("good"), Some(&0.5));
        assert_eq!(alignment.get("bad"), Some(&-2.0));
    }

    #[test]
    fn doremi_moves_weight_toward_the_domain_with_excess_loss() {
        let cfg = StrategyConfig {
            method: WeightMethod::Doremi,
            probe: 2,
            ..StrategyConfig::default()
        };
        let mut s = DomainWeights::with_strategy(&cfg, vec!["a".into(), "b".into()]);
        assert!(s.needs_reference() && s.probe_request().is_none());
        s.reference_rounds = 3;
        assert_eq!(s.phase_change(2), None);
        assert_eq!(s.phase_change(3), Some(PhaseChange::RestartAfterReference));
        let reference = s.plan(0);
        assert_eq!(
            reference.domain_weights,
            vec![1.0, 1.0],
            "uniform during the reference phase"
        );
        assert_eq!(reference.ask, Ask::Nothing);
        s.set_reference(vec![vec![1.0, 1.0, 1.0], vec![2.0, 2.0]]);
        assert_eq!(s.phase_change(3), None, "once");
        assert_eq!(s.plan(3).ask, Ask::Doremi { probe: 2 });
        let r = result(Signal::Doremi(vec![
            DomainProbe {
                rows: vec![0, 2],
                losses: vec![1.5, 0.5],
            }, // excess (0.5, 0) → 0.25
            DomainProbe {
                rows: vec![1],
                losses: vec![1.0],
            }, // below the reference → 0
        ]));
        assert_eq!(s.check(&r), Ok(()));
        assert_eq!(s.check(&result(Signal::Nothing)), Err("bad_probe"));
        s.update(&[&r]);
        let expect = weights::doremi_step(&[0.5, 0.5], &[0.25, 0.0], 1.0, 1e-3);
        assert_eq!(s.excess(), Some(&[0.25, 0.0][..]));
        let w = s.weights();
        assert!(
            (w[0] - 2.0 * expect[0]).abs() < 1e-12 && w[0] > 1.0 && w[1] < 1.0,
            "{w:?}"
        );
        // A round without probes for a domain keeps its last excess loss; the state roundtrips.
        let mut other = DomainWeights::with_strategy(&cfg, vec!["a".into(), "b".into()]);
        other.restore(&s.state()).expect("restore");
        assert_eq!(other.state(), s.state());
        assert!(!other.needs_reference());
    }

    #[test]
    fn baselines_do_not_move() {
        let mut u = DomainWeights::with_strategy(&config(WeightMethod::Uniform), vec!["a".into(), "b".into()]);
        let mut f = DomainWeights::with_strategy(&config(WeightMethod::Fixed), vec!["a".into(), "b".into()]);
        let r = result(Signal::Nothing);
        for s in [&mut u, &mut f] {
            assert_eq!(s.plan(0).ask, Ask::Nothing);
            assert_eq!(s.check(&r), Ok(()));
            assert_eq!(s.check(&stats(&[(1.0, 1), (-1.0, 1)])), Err("unexpected_signal"));
            s.update(&[&r]);
        }
        assert_eq!(u.weights(), vec![1.0, 1.0]);
        assert_eq!(f.weights(), vec![1.5, 0.5], "fixed weights are normalised to mean 1");
    }
}
