//! Outer strategy `loss-rescaling` on the coordinator (docs/algorithms.md §5): owns Ω (an MLP from a
//! sample's features to one logit; weight = sigmoid), ships it with every round plan, averages
//! the workers' meta-gradients in assignment order and steps Adam(W) on it. Pure.

use super::domain_weights::DomainWeights;
use super::{mean_meta_loss, OmegaProbe, OuterStrategy, RoundDesign, StrategyReport};
use crate::checkpoint;
use metaloop_common::model;
use metaloop_proto::config::{Directional, JobConfig, RescaleMode, StrategyConfig, StrategyKind};
use metaloop_proto::features::Feature;
use metaloop_proto::proto::{
    self, Ask, AssignmentResult, DirectionalMethod, ModelSpec, RescalerPlan, Signal, SmallTensor,
};
use metaloop_proto::rng::derive_seed;
use metaloop_proto::tensor::{Bundle, HostTensor};
use metaloop_proto::weights::AdamW;
use std::collections::BTreeMap;

/// The strategy: inner steps on the (uniform) mixture, each sample's loss weighted by Ω
/// (mode `none`: by 1, the baseline).
#[derive(Debug, Clone)]
pub struct LossRescaling {
    mixture: DomainWeights,
    /// `None` for mode `none`.
    omega: Option<LossRescaler>,
    mode: RescaleMode,
    rounds: u64,
}

impl LossRescaling {
    pub fn new(config: &JobConfig, mixture: DomainWeights) -> Self {
        Self {
            mixture,
            omega: LossRescaler::new(&config.strategy, config.seed),
            mode: config.strategy.mode,
            rounds: config.rounds,
        }
    }
}

impl OuterStrategy for LossRescaling {
    fn name(&self) -> String {
        format!("loss-rescaling/{}", self.mode.as_str())
    }

    fn plan(&mut self, round: u64) -> RoundDesign {
        let mixture = self.mixture.plan(round);
        match &self.omega {
            Some(omega) => RoundDesign {
                ask: Ask::LossRescaling(omega.plan(round as f64 / self.rounds as f64)),
                ..mixture
            },
            None => mixture,
        }
    }

    fn check(&self, result: &AssignmentResult) -> Result<(), &'static str> {
        match (&self.omega, &result.signal) {
            (None, _) => self.mixture.check(result),
            (Some(omega), Signal::LossRescaling(grad)) if omega.valid_gradient(grad) => Ok(()),
            (Some(_), _) => Err("bad_rescaler_gradient"),
        }
    }

    fn update(&mut self, results: &[&AssignmentResult]) -> StrategyReport {
        if let Some(omega) = &mut self.omega {
            omega.update(results);
        }
        StrategyReport {
            meta_loss: mean_meta_loss(results),
            omega_grad_norm: self.omega.as_ref().and_then(LossRescaler::last_grad_norm),
            ..StrategyReport::default()
        }
    }

    fn domain_weights(&self) -> BTreeMap<String, f64> {
        self.mixture.by_name()
    }

    fn omega_probe(&self) -> Option<OmegaProbe> {
        self.omega.as_ref().map(|o| OmegaProbe {
            omega: o.omega(),
            features: o.features.clone(),
            passes: o.passes,
        })
    }

    /// The mixture's state, then Ω's.
    fn state(&self) -> Vec<(String, Vec<f64>)> {
        let mut state = self.mixture.named_state();
        state.extend(self.omega.iter().flat_map(LossRescaler::state));
        state
    }

    fn restore(&mut self, state: &[(String, Vec<f64>)]) -> anyhow::Result<()> {
        self.mixture.restore_named(state)?;
        match &mut self.omega {
            Some(o) => o.restore(state),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LossRescaler {
    mode: proto::RescaleMode,
    features: Vec<Feature>,
    normalize: bool,
    directional: DirectionalMethod,
    passes: u32,
    /// Ω's tensors: names and shapes; the values live flat in `params` (f64 master copy).
    layout: Vec<(String, Vec<usize>)>,
    params: Vec<f64>,
    adam: AdamW,
    last_grad_norm: Option<f64>,
}

impl LossRescaler {
    /// Ω for a job, or `None` when the job does not rescale losses (mode `none`).
    pub fn new(config: &StrategyConfig, seed: u64) -> Option<Self> {
        let mode = match (config.kind, config.mode) {
            (StrategyKind::LossRescaling, RescaleMode::CleanMeta) => proto::RescaleMode::CleanMeta,
            (StrategyKind::LossRescaling, RescaleMode::SelfTaught) => proto::RescaleMode::SelfTaught,
            _ => return None,
        };
        let spec = ModelSpec::Mlp {
            inputs: config.features.len() as u32,
            hidden: vec![config.omega_hidden],
            classes: 1,
            dropout: 0.0,
        };
        let init = model::init_params(&spec, derive_seed(seed, &[0x0E6A]));
        let layout = init.tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect();
        let params: Vec<f64> = init
            .tensors
            .iter()
            .flat_map(|t| t.data.iter().map(|&v| f64::from(v)))
            .collect();
        Some(Self {
            mode,
            features: config.features.clone(),
            normalize: config.normalize,
            passes: config.passes,
            directional: match config.directional {
                Directional::Exact => DirectionalMethod::Exact,
                Directional::FiniteDifference => DirectionalMethod::FiniteDifference,
            },
            adam: AdamW::new(params.len(), config.omega_lr, config.omega_weight_decay),
            layout,
            params,
            last_grad_norm: None,
        })
    }

    /// Ω's current parameters as a bundle (f32).
    pub fn omega(&self) -> Bundle {
        let mut offset = 0;
        let tensors = self
            .layout
            .iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let data = self.params[offset..offset + n].iter().map(|&v| v as f32).collect();
                offset += n;
                HostTensor {
                    name: name.clone(),
                    shape: shape.clone(),
                    data,
                }
            })
            .collect();
        Bundle { tensors }
    }

    /// What the workers need this round.
    pub fn plan(&self, progress: f64) -> RescalerPlan {
        RescalerPlan {
            mode: self.mode,
            omega: SmallTensor::from_bundle(self.omega()),
            features: self.features.iter().map(|f| f.code()).collect(),
            normalize: self.normalize,
            directional: self.directional,
            progress: progress as f32,
            passes: self.passes,
        }
    }

    /// ‖∇Ω‖ of the last update.
    pub fn last_grad_norm(&self) -> Option<f64> {
        self.last_grad_norm
    }

    /// Averages the round's meta-gradients (in assignment order) and steps AdamW on Ω. Results
    /// without a gradient of Ω's exact size are ignored (the run loop has validated them).
    pub fn update(&mut self, results: &[&AssignmentResult]) {
        let mut sum = vec![0.0f64; self.params.len()];
        let mut n = 0usize;
        for r in results {
            let Signal::LossRescaling(grad) = &r.signal else {
                continue;
            };
            let flat: Vec<f64> = grad.iter().flat_map(|t| t.data.iter().map(|&v| f64::from(v))).collect();
            if flat.len() != sum.len() {
                continue;
            }
            for (s, g) in sum.iter_mut().zip(&flat) {
                *s += g;
            }
            n += 1;
        }
        if n == 0 {
            self.last_grad_norm = None;
            return;
        }
        let grad: Vec<f64> = sum.iter().map(|s| s / n as f64).collect();
        self.last_grad_norm = Some(grad.iter().map(|g| g * g).sum::<f64>().sqrt());
        self.adam.step(&mut self.params, &grad);
    }

    /// True when a result's gradient has Ω's layout and is finite.
    pub fn valid_gradient(&self, grad: &[SmallTensor]) -> bool {
        grad.len() == self.layout.len()
            && grad.iter().zip(&self.layout).all(|(g, (name, shape))| {
                g.name == *name
                    && g.shape.iter().map(|&d| d as usize).eq(shape.iter().copied())
                    && g.data.len() == shape.iter().product::<usize>()
                    && g.data.iter().all(|v| v.is_finite())
            })
    }

    /// Ω and its optimizer as named vectors, for checkpoints.
    pub fn state(&self) -> Vec<(String, Vec<f64>)> {
        let mut state = vec![("rescaler.omega".into(), self.params.clone())];
        state.extend(checkpoint::adam_state("rescaler", &self.adam));
        state
    }

    /// Takes over a state written by [`LossRescaler::state`].
    ///
    /// # Errors
    /// When an entry is missing or has the wrong length.
    pub fn restore(&mut self, state: &[(String, Vec<f64>)]) -> anyhow::Result<()> {
        let n = self.params.len();
        let params = checkpoint::named(state, "rescaler.omega", n)?;
        checkpoint::restore_adam(state, "rescaler", &mut self.adam, n)?;
        self.params = params;
        Ok(())
    }
}

/// How well Ω's weights separate clean from corrupted samples.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Separation {
    pub clean: usize,
    pub corrupted: usize,
    pub mean_weight_clean: f64,
    pub mean_weight_corrupted: f64,
    /// P(weight of a random clean sample > that of a random corrupted one), ties count half.
    pub auc: f64,
    /// Quartiles (25%, 50%, 75%) of each group's weights.
    pub quartiles_clean: [f64; 3],
    pub quartiles_corrupted: [f64; 3],
}

/// Separation statistics of per-sample weights; `None` when either group is empty.
pub fn separation(clean: &[f64], corrupted: &[f64]) -> Option<Separation> {
    if clean.is_empty() || corrupted.is_empty() {
        return None;
    }
    // Mann–Whitney U via ranks over the pooled, sorted weights (average ranks for ties).
    let mut pooled: Vec<(f64, bool)> = clean
        .iter()
        .map(|&w| (w, true))
        .chain(corrupted.iter().map(|&w| (w, false)))
        .collect();
    pooled.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut rank_sum_clean = 0.0;
    let mut i = 0;
    while i < pooled.len() {
        let mut j = i;
        while j + 1 < pooled.len() && pooled[j + 1].0 == pooled[i].0 {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum_clean += pooled[i..=j].iter().filter(|p| p.1).count() as f64 * avg_rank;
        i = j + 1;
    }
    let (nc, nn) = (clean.len() as f64, corrupted.len() as f64);
    let u = rank_sum_clean - nc * (nc + 1.0) / 2.0;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let quartiles = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        // Linear interpolation between closest ranks (numpy's default).
        let q = |p: f64| {
            let pos = (s.len() - 1) as f64 * p;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
        };
        [q(0.25), q(0.5), q(0.75)]
    };
    Some(Separation {
        clean: clean.len(),
        corrupted: corrupted.len(),
        mean_weight_clean: mean(clean),
        mean_weight_corrupted: mean(corrupted),
        auc: u / (nc * nn),
        quartiles_clean: quartiles(clean),
        quartiles_corrupted: quartiles(corrupted),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_counts_pairs_and_ties() {
        let s = separation(&[0.9, 0.8, 0.5], &[0.1, 0.5]).expect("both groups");
        // Pairs (clean > corrupted): 0.9 beats both, 0.8 both, 0.5 beats 0.1 and ties 0.5: 5.5 / 6.
        assert!((s.auc - 5.5 / 6.0).abs() < 1e-12, "{}", s.auc);
        for (q, e) in s.quartiles_clean.iter().zip([0.65, 0.8, 0.85]) {
            assert!((q - e).abs() < 1e-12, "{:?}", s.quartiles_clean);
        }
        assert!((s.mean_weight_corrupted - 0.3).abs() < 1e-12);
        assert!(separation(&[], &[0.1]).is_none());
    }

    #[test]
    fn update_averages_gradients_and_checkpoints_roundtrip() {
        let cfg = StrategyConfig {
            kind: StrategyKind::LossRescaling,
            mode: RescaleMode::CleanMeta,
            ..StrategyConfig::default()
        };
        let mut r = LossRescaler::new(&cfg, 1).expect("clean-meta has Ω");
        let plan = r.plan(0.0);
        let grad = |v: f32| -> Vec<SmallTensor> {
            plan.omega
                .iter()
                .map(|t| SmallTensor {
                    data: vec![v; t.data.len()],
                    ..t.clone()
                })
                .collect()
        };
        assert!(r.valid_gradient(&grad(1.0)) && !r.valid_gradient(&grad(f32::NAN)));
        let result = |g| AssignmentResult {
            train_loss: 1.0,
            samples: 1,
            signal: Signal::LossRescaling(g),
            ..AssignmentResult::new(0, 0, 0)
        };
        let before = r.omega();
        r.update(&[&result(grad(1.0)), &result(grad(3.0))]);
        let n = r.params.len() as f64;
        assert!(
            (r.last_grad_norm().expect("stepped") - (4.0 * n).sqrt()).abs() < 1e-9,
            "mean gradient is 2 everywhere"
        );
        assert_ne!(r.omega(), before);
        let mut other = LossRescaler::new(&cfg, 1).expect("Ω");
        other.restore(&r.state()).expect("restore");
        assert_eq!(other.state(), r.state());
        assert!(
            LossRescaler::new(
                &StrategyConfig {
                    kind: StrategyKind::LossRescaling,
                    ..StrategyConfig::default()
                },
                1
            )
            .is_none(),
            "mode none"
        );
    }
}
