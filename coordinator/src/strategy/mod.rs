//! Outer strategies: what a round asks of the workers and how their signals update the outer
//! variables. Each strategy is one module implementing [`OuterStrategy`]; the round loop and
//! the round core name none of them, only [`build`] does. Pure: no I/O, no libtorch.
//!
//! Adding a strategy: a config section, a module here (plus its `Ask`/`Signal` variant pair in
//! `proto`), and a signal producer on the worker; ARCHITECTURE.md lists the files.

mod domain_weights;
mod loss_rescaling;
mod task_policy;

pub use loss_rescaling::{separation, Separation};

use crate::checkpoint;
use crate::outer::Combine;
use domain_weights::DomainWeights;
use metaloop_proto::checksum::StateHasher;
use metaloop_proto::config::{JobConfig, StrategyKind};
use metaloop_proto::features::Feature;
use metaloop_proto::proto::{Ask, Assignment, AssignmentResult, TrainOn};
use metaloop_proto::rng::derive_seed;
use metaloop_proto::tensor::Bundle;
use std::collections::BTreeMap;

/// One round as a strategy designs it.
#[derive(Debug, Clone)]
pub struct RoundDesign {
    pub assignments: Vec<Assignment>,
    /// The inner loss weight of every domain, in job order (mean 1).
    pub domain_weights: Vec<f64>,
    /// What every assignment measures after its inner steps.
    pub ask: Ask,
    /// How the round's deltas combine into the update.
    pub combine: Combine,
}

/// What happens to the model before a round besides the strategy's own plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseChange {
    /// Measure the current model's loss on every sample of every training domain, hand the
    /// losses to [`OuterStrategy::set_reference`], then restart from the initial parameters
    /// (DoReMi: the reference model is done, the proxy starts).
    RestartAfterReference,
}

/// A strategy's part of a round's record (`metrics.jsonl`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StrategyReport {
    /// The round's meta loss (by default the mean of the results' meta losses).
    pub meta_loss: Option<f64>,
    pub hypergradient_norm: Option<f64>,
    /// Every domain's mean d_k = ⟨∇ℓ_k, ∇L_meta⟩ this round (`hypergradient`).
    pub alignment: Option<BTreeMap<String, f64>>,
    pub excess_loss: Option<BTreeMap<String, f64>>,
    pub omega_grad_norm: Option<f64>,
    pub rewards: Option<BTreeMap<String, f64>>,
    pub policy_grad_norm: Option<f64>,
}

/// Ω as the run's end measures it: its weights of every training sample, clean against
/// corrupted.
#[derive(Debug, Clone)]
pub struct OmegaProbe {
    pub omega: Bundle,
    pub features: Vec<Feature>,
    pub passes: u32,
}

/// An outer strategy: plans rounds, checks and learns from their signals, reports, and owns
/// its durable state. Deterministic in its state, the job seed and the round.
pub trait OuterStrategy: std::fmt::Debug + Send {
    /// How the summary and the metrics name it (`hypergradient`, `loss-rescaling/self-taught`).
    fn name(&self) -> String;

    /// A change due before round `round` is planned.
    fn phase_change(&self, _round: u64) -> Option<PhaseChange> {
        None
    }

    /// Takes over the per-sample losses a [`PhaseChange::RestartAfterReference`] measured.
    fn set_reference(&mut self, _losses: Vec<Vec<f64>>) {}

    /// Designs round `round` (after any phase change); the strategy keeps what its update needs.
    fn plan(&mut self, round: u64) -> RoundDesign;

    /// Checks one result's signal against the round's ask: the rejection reason when it is
    /// malformed (the worker is then dropped).
    ///
    /// # Errors
    /// A short, bounded reason label.
    fn check(&self, result: &AssignmentResult) -> Result<(), &'static str>;

    /// Learns from the round's results, in assignment order.
    fn update(&mut self, results: &[&AssignmentResult]) -> StrategyReport;

    /// The domain weights as the record and the summary show them (empty when the strategy has
    /// none).
    fn domain_weights(&self) -> BTreeMap<String, f64>;

    /// The weights over source tasks, when the strategy has them.
    fn source_weights(&self) -> Option<BTreeMap<String, f64>> {
        None
    }

    /// Ω, when the run's end should measure how it separates clean from corrupted samples.
    fn omega_probe(&self) -> Option<OmegaProbe> {
        None
    }

    /// The durable state as named vectors, for checkpoints and the state checksum.
    fn state(&self) -> Vec<(String, Vec<f64>)>;

    /// Takes over a state written by [`OuterStrategy::state`].
    ///
    /// # Errors
    /// When an entry is missing or has the wrong length.
    fn restore(&mut self, state: &[(String, Vec<f64>)]) -> anyhow::Result<()>;

    /// Adds the state to a checksum.
    fn hash_into(&self, h: &mut StateHasher) {
        checkpoint::hash_named(h, &self.state());
    }
}

/// The job's strategy over its training domains `names`, with `meta_len` rows in the meta set.
pub fn build(config: &JobConfig, names: Vec<String>, meta_len: usize) -> Box<dyn OuterStrategy> {
    // Every strategy trains on a mixture of the domains; its weights (uniform unless the
    // strategy learns them) are part of every strategy's state.
    let mixture = DomainWeights::new(config, names.clone());
    match config.strategy.kind {
        StrategyKind::DomainWeights => Box::new(mixture),
        StrategyKind::LossRescaling => Box::new(loss_rescaling::LossRescaling::new(config, mixture)),
        StrategyKind::TaskPolicy => Box::new(task_policy::TaskPolicy::new(config, names, meta_len, mixture)),
    }
}

/// How a job's rounds split into assignments when they train on the mixture: one per shard,
/// each on its shard of every domain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shards {
    seed: u64,
    shards: u32,
    steps: u32,
}

impl Shards {
    pub fn of(config: &JobConfig) -> Self {
        Self {
            seed: config.seed,
            shards: config.data.shards,
            steps: config.inner.steps,
        }
    }

    /// Round `round`'s assignments.
    pub fn assignments(&self, round: u64) -> Vec<Assignment> {
        (0..self.shards)
            .map(|i| Assignment {
                index: i,
                shard: i,
                steps: self.steps,
                seed: derive_seed(self.seed, &[round, u64::from(i)]),
                data: TrainOn::Mixture,
            })
            .collect()
    }
}

/// The mean of the results' meta losses (`None` when none has one).
pub fn mean_meta_loss(results: &[&AssignmentResult]) -> Option<f64> {
    let meta: Vec<f64> = results.iter().filter_map(|r| r.meta_loss.map(f64::from)).collect();
    (!meta.is_empty()).then(|| meta.iter().sum::<f64>() / meta.len() as f64)
}
