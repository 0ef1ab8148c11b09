//! Job configuration: TOML read into one typed struct per section, then validated with every
//! problem collected (each with its key path) before anything starts.

pub use crate::domains::DomainConfig;
use crate::features::Feature;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A problem with a config file; `Display` lists every finding with its key path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path} has {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid { path: PathBuf, problems: Vec<String> },
}

/// A whole job.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// Seeds model initialisation and every assignment's randomness.
    #[serde(default)]
    pub seed: u64,
    /// Number of outer rounds.
    pub rounds: u64,
    pub data: DataConfig,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub inner: InnerConfig,
    #[serde(default)]
    pub outer: OuterConfig,
    #[serde(default)]
    pub strategy: StrategyConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
}

/// Durable state: the whole coordinator state is written every `every` rounds (0: never) and
/// when the coordinator is stopped; the newest `keep` checkpoints are kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    pub every: u64,
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { every: 10, keep: 3 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Shorthand for a single training domain named `train` (safetensors with `x` and `y`).
    #[serde(default)]
    pub train: Option<PathBuf>,
    /// Training domains (`[[data.domains]]`), each a file or a seeded transform of one.
    #[serde(default)]
    pub domains: Vec<DomainConfig>,
    /// Held-out data for the final accuracy.
    pub test: PathBuf,
    /// Small clean set the outer objective is measured on (needed by `hypergradient`).
    #[serde(default)]
    pub meta: Option<PathBuf>,
    /// Number of classes; labels must lie in `0..classes`.
    pub classes: u32,
    /// Every domain is cut into this many contiguous shards; each round has one assignment
    /// per shard, so results do not depend on how many workers there are.
    #[serde(default = "defaults::shards")]
    pub shards: u32,
    /// Set when `train` was given, to report it if `domains` was given too.
    #[serde(skip)]
    pub train_shorthand: bool,
}

/// The outer strategy: what outer variables the coordinator learns.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StrategyConfig {
    pub kind: StrategyKind,
    pub method: WeightMethod,
    /// Per-domain weights for `fixed` (normalised to mean 1).
    pub weights: Vec<f64>,
    /// How workers compute d_k for `hypergradient`.
    pub directional: Directional,
    /// AdamW on λ; DreamPRM's code uses lr 0.01 and weight decay 1e-3.
    pub lr: f64,
    pub weight_decay: f64,
    /// Samples per domain (from the assignment's shard) on which d_k is measured.
    pub probe: u32,
    /// `loss-rescaling`: none (plain training), clean-meta or self-taught.
    pub mode: RescaleMode,
    /// `loss-rescaling`: Ω's inputs.
    pub features: Vec<Feature>,
    /// `loss-rescaling`: normalise Ω's weights to mean 1 in every training batch. Self-taught
    /// mode collapsed without it (DESIGN.md §6.3).
    pub normalize: bool,
    /// `loss-rescaling`: Adam on Ω; Meta-Weight-Net's defaults are lr 1e-3, weight decay 1e-4.
    pub omega_lr: f64,
    pub omega_weight_decay: f64,
    /// `loss-rescaling`: Ω's hidden units.
    pub omega_hidden: u32,
    /// `doremi`: rounds of the first phase (the reference model on uniform weights); the proxy
    /// phase takes the rest. Default: half of `rounds`.
    pub reference_rounds: Option<u64>,
    /// `doremi`: step size η of the exponentiated gradient (the paper's 1).
    pub eta: f64,
    /// `doremi`: smoothing c toward uniform (the paper's 1e-3).
    pub smoothing: f64,
    /// `loss-rescaling`: stochastic (dropout) forward passes G for the `label-prob-mean` and
    /// `label-prob-spread` features; they need `model.dropout` > 0 to differ.
    pub passes: u32,
    /// `task-policy`: learned (REINFORCE), uniform (fixed uniform weights: the baseline), or
    /// target-only (every round fine-tunes on the target: the other baseline).
    pub policy: PolicyMethod,
    /// `task-policy`: sources sampled per round, M (default: the number of domains).
    pub sources_per_round: Option<u32>,
    /// `task-policy`: exploration ε; sources are drawn from (1−ε)·w + ε·uniform.
    pub epsilon: f64,
    /// `task-policy`: the policy's learning rate η (gradient ascent on the REINFORCE objective).
    pub policy_lr: f64,
    /// `task-policy`: the entropy bonus β.
    pub entropy_bonus: f64,
    /// `task-policy`: the reward baseline b ← γ·b + (1−γ)·mean r; this is γ.
    pub baseline_decay: f64,
    /// `task-policy`: the LSTM's hidden units.
    pub policy_hidden: u32,
    /// `task-policy`: rows of the meta set (the target) in each round's shared target batch.
    pub target_batch: u32,
    /// `task-policy`: the last rounds fine-tune on the target instead (default: a tenth).
    pub finetune_rounds: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RescaleMode {
    /// Plain training: every sample weighs 1 (the baseline).
    None,
    /// Meta-Weight-Net: L_val on the trusted meta set.
    CleanMeta,
    /// L_val on a batch of the noisy training data, weighted by Ω.
    SelfTaught,
}

impl RescaleMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RescaleMode::None => "none",
            RescaleMode::CleanMeta => "clean-meta",
            RescaleMode::SelfTaught => "self-taught",
        }
    }
}

impl Default for StrategyConfig {
    fn default() -> Self {
        Self {
            kind: StrategyKind::DomainWeights,
            method: WeightMethod::Uniform,
            weights: Vec::new(),
            directional: Directional::Exact,
            lr: 0.01,
            weight_decay: 1e-3,
            probe: 64,
            mode: RescaleMode::None,
            features: crate::features::default_features(),
            normalize: true,
            omega_lr: 1e-3,
            omega_weight_decay: 1e-4,
            omega_hidden: 100,
            passes: 4,
            reference_rounds: None,
            eta: 1.0,
            smoothing: 1e-3,
            policy: PolicyMethod::Learned,
            sources_per_round: None,
            epsilon: 0.1,
            policy_lr: 0.05,
            entropy_bonus: 0.01,
            baseline_decay: 0.9,
            policy_hidden: 32,
            target_batch: 64,
            finetune_rounds: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyKind {
    /// One learned weight per training domain.
    DomainWeights,
    /// A network Ω that weights every sample's loss.
    LossRescaling,
    /// A policy over source tasks, learned from how much each helps the target (Meta-RTL).
    TaskPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyMethod {
    /// An LSTM policy trained by REINFORCE on the target-loss rewards.
    Learned,
    /// Every source equally likely, never updated.
    Uniform,
    /// No sources: every round fine-tunes on the target's own examples.
    TargetOnly,
}

impl PolicyMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyMethod::Learned => "learned",
            PolicyMethod::Uniform => "uniform",
            PolicyMethod::TargetOnly => "target-only",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WeightMethod {
    /// Every domain weighs 1 (the baseline).
    Uniform,
    /// The weights given in `strategy.weights`.
    Fixed,
    /// Learned by the DreamPRM-style hypergradient on the meta set.
    Hypergradient,
    /// DoReMi: a reference model first, then exponentiated gradient on per-domain excess loss.
    Doremi,
}

impl WeightMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            WeightMethod::Uniform => "uniform",
            WeightMethod::Fixed => "fixed",
            WeightMethod::Hypergradient => "hypergradient",
            WeightMethod::Doremi => "doremi",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Directional {
    /// One double backward.
    Exact,
    /// Two forward passes at θ ± εu.
    FiniteDifference,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "kebab-case")]
pub enum ModelConfig {
    /// Multi-layer perceptron with ReLU between layers.
    Mlp {
        #[serde(default = "defaults::hidden")]
        hidden: Vec<u32>,
        /// Drop probability after every hidden layer while training (0: none). Also what the
        /// `label-prob-mean`/`label-prob-spread` features sample from.
        #[serde(default)]
        dropout: f64,
    },
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig::Mlp {
            hidden: defaults::hidden(),
            dropout: 0.0,
        }
    }
}

/// The workers' local optimizer (SGD with momentum), reset at the start of every assignment so
/// an assignment's result depends only on the model and the assignment.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InnerConfig {
    /// H: local steps per round (DiLoCo's inner steps).
    pub steps: u32,
    pub batch_size: u32,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
}

impl Default for InnerConfig {
    fn default() -> Self {
        Self {
            steps: 20,
            batch_size: 32,
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 0.0,
        }
    }
}

/// How the coordinator applies the averaged pseudo-gradient (θ_after − θ_before).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OuterConfig {
    pub method: OuterMethod,
    /// Outer learning rate; DiLoCo uses 0.7 with Nesterov.
    pub lr: f64,
    /// Outer momentum; DiLoCo uses 0.9.
    pub momentum: f64,
}

impl Default for OuterConfig {
    fn default() -> Self {
        Self {
            method: OuterMethod::Nesterov,
            lr: 0.7,
            momentum: 0.9,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OuterMethod {
    /// θ ← θ + mean Δ (federated averaging).
    Average,
    /// Nesterov momentum on the averaged delta, as in DiLoCo.
    Nesterov,
}

mod defaults {
    pub fn shards() -> u32 {
        4
    }
    pub fn hidden() -> Vec<u32> {
        vec![128]
    }
}

impl JobConfig {
    /// Reads, parses and validates a config; relative data paths are resolved against the
    /// config file's directory.
    ///
    /// # Errors
    /// `Read`, `Parse` (unknown key, wrong type; the message names the key) or `Invalid` with
    /// every semantic problem found.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|e| match e {
            ParseFailure::Syntax(message) => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            ParseFailure::Invalid(problems) => ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            },
        })
    }

    /// Parses and validates config text; `base` resolves relative paths.
    pub fn parse(text: &str, base: &Path) -> Result<Self, ParseFailure> {
        let mut cfg: JobConfig = toml::from_str(text).map_err(|e| ParseFailure::Syntax(e.to_string()))?;
        if let Some(train) = cfg.data.train.take() {
            cfg.data.domains.insert(
                0,
                DomainConfig {
                    name: "train".into(),
                    source: train,
                    subset: None,
                    label_noise: 0.0,
                    permute_labels: false,
                    feature_noise: 0.0,
                    permute_features: false,
                },
            );
            cfg.data.train_shorthand = true;
        }
        let paths = cfg
            .data
            .domains
            .iter_mut()
            .map(|d| &mut d.source)
            .chain([&mut cfg.data.test])
            .chain(cfg.data.meta.as_mut());
        for p in paths {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        let problems = cfg.problems();
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ParseFailure::Invalid(problems))
        }
    }

    /// DoReMi's reference phase length (half the rounds unless set).
    pub fn reference_rounds(&self) -> u64 {
        self.strategy.reference_rounds.unwrap_or(self.rounds / 2)
    }

    /// The task policy's closing fine-tuning rounds (a tenth of the rounds unless set; all of
    /// them for `target-only`).
    pub fn finetune_rounds(&self) -> u64 {
        match self.strategy.policy {
            PolicyMethod::TargetOnly => self.rounds,
            _ => self.strategy.finetune_rounds.unwrap_or(self.rounds / 10),
        }
    }

    /// Sources sampled per task-policy round (all of them unless set).
    pub fn sources_per_round(&self) -> u32 {
        self.strategy
            .sources_per_round
            .unwrap_or(self.data.domains.len() as u32)
    }

    /// Every semantic problem, each prefixed with its key path.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let mut check = |ok: bool, key: &str, why: String| {
            if !ok {
                p.push(format!("{key}: {why}"));
            }
        };
        check(
            self.rounds >= 1,
            "rounds",
            format!("must be at least 1, got {}", self.rounds),
        );
        check(
            self.data.classes >= 2,
            "data.classes",
            format!("must be at least 2, got {}", self.data.classes),
        );
        check(
            self.data.shards >= 1,
            "data.shards",
            format!("must be at least 1, got {}", self.data.shards),
        );
        let d = &self.data;
        check(
            !d.domains.is_empty(),
            "data",
            "needs `train` or at least one [[data.domains]]".into(),
        );
        check(
            !(d.train_shorthand && d.domains.len() > 1),
            "data.train",
            "give either `train` or [[data.domains]], not both".into(),
        );
        let mut names = std::collections::BTreeSet::new();
        for (i, dom) in d.domains.iter().enumerate() {
            let key = if d.train_shorthand {
                "data.train".to_string()
            } else {
                format!("data.domains[{i}]")
            };
            check(!dom.name.is_empty(), &format!("{key}.name"), "must not be empty".into());
            check(
                names.insert(dom.name.clone()),
                &format!("{key}.name"),
                format!("`{}` is used twice", dom.name),
            );
            let src_key = if d.train_shorthand {
                key.clone()
            } else {
                format!("{key}.source")
            };
            check(
                dom.source.is_file(),
                &src_key,
                format!("file {} does not exist", dom.source.display()),
            );
            check(
                (0.0..=1.0).contains(&dom.label_noise),
                &format!("{key}.label_noise"),
                format!("must be in [0, 1], got {}", dom.label_noise),
            );
            check(
                dom.feature_noise.is_finite() && dom.feature_noise >= 0.0,
                &format!("{key}.feature_noise"),
                format!("must be ≥ 0, got {}", dom.feature_noise),
            );
            if let Some(s) = dom.subset {
                check(
                    s.count >= d.shards as usize,
                    &format!("{key}.subset.count"),
                    format!("{} samples cannot fill {} shards", s.count, d.shards),
                );
            }
        }
        check(
            d.test.is_file(),
            "data.test",
            format!("file {} does not exist", d.test.display()),
        );
        if let Some(meta) = &d.meta {
            check(
                meta.is_file(),
                "data.meta",
                format!("file {} does not exist", meta.display()),
            );
        }
        let s = &self.strategy;
        let k = d.domains.len();
        match s.method {
            WeightMethod::Hypergradient => {
                check(
                    d.meta.is_some(),
                    "data.meta",
                    "method `hypergradient` needs a meta set".into(),
                );
                check(
                    s.lr.is_finite() && s.lr > 0.0,
                    "strategy.lr",
                    format!("must be positive, got {}", s.lr),
                );
                check(
                    s.weight_decay.is_finite() && s.weight_decay >= 0.0,
                    "strategy.weight_decay",
                    format!("must be ≥ 0, got {}", s.weight_decay),
                );
                check(
                    s.probe >= 1,
                    "strategy.probe",
                    format!("must be at least 1, got {}", s.probe),
                );
            }
            WeightMethod::Fixed => {
                check(
                    s.weights.len() == k,
                    "strategy.weights",
                    format!("needs one weight per domain ({k}), got {}", s.weights.len()),
                );
                check(
                    s.weights.iter().all(|w| w.is_finite() && *w > 0.0),
                    "strategy.weights",
                    "every weight must be positive".into(),
                );
            }
            WeightMethod::Doremi => {
                let r = self.reference_rounds();
                check(
                    r >= 1 && r < self.rounds,
                    "strategy.reference_rounds",
                    format!("must be in 1..{} (rounds), got {r}", self.rounds),
                );
                check(
                    s.eta.is_finite() && s.eta > 0.0,
                    "strategy.eta",
                    format!("must be positive, got {}", s.eta),
                );
                check(
                    (0.0..1.0).contains(&s.smoothing),
                    "strategy.smoothing",
                    format!("must be in [0, 1), got {}", s.smoothing),
                );
                check(
                    s.probe >= 1,
                    "strategy.probe",
                    format!("must be at least 1, got {}", s.probe),
                );
            }
            WeightMethod::Uniform => {}
        }
        if s.kind == StrategyKind::LossRescaling {
            check(
                s.method == WeightMethod::Uniform,
                "strategy.method",
                "loss-rescaling keeps domain weights uniform; leave `method` out".into(),
            );
            check(
                !(s.mode == RescaleMode::CleanMeta && d.meta.is_none()),
                "data.meta",
                "mode `clean-meta` needs a meta set".into(),
            );
            check(
                !s.features.is_empty(),
                "strategy.features",
                "Ω needs at least one feature".into(),
            );
            check(
                s.omega_lr.is_finite() && s.omega_lr > 0.0,
                "strategy.omega_lr",
                format!("must be positive, got {}", s.omega_lr),
            );
            check(
                s.omega_weight_decay.is_finite() && s.omega_weight_decay >= 0.0,
                "strategy.omega_weight_decay",
                format!("must be ≥ 0, got {}", s.omega_weight_decay),
            );
            check(
                s.omega_hidden >= 1,
                "strategy.omega_hidden",
                format!("must be at least 1, got {}", s.omega_hidden),
            );
            check(
                s.passes >= 1,
                "strategy.passes",
                format!("must be at least 1, got {}", s.passes),
            );
        } else {
            check(
                s.mode == RescaleMode::None,
                "strategy.mode",
                "only for kind = \"loss-rescaling\"".into(),
            );
        }
        if s.kind == StrategyKind::TaskPolicy {
            check(
                s.method == WeightMethod::Uniform,
                "strategy.method",
                "task-policy picks sources with its `policy`; leave `method` out".into(),
            );
            check(
                d.meta.is_some(),
                "data.meta",
                "task-policy needs the target's labelled examples as the meta set".into(),
            );
            check(
                d.shards == 1,
                "data.shards",
                format!("task-policy trains on whole source tasks; must be 1, got {}", d.shards),
            );
            check(
                (0.0..=1.0).contains(&s.epsilon),
                "strategy.epsilon",
                format!("must be in [0, 1], got {}", s.epsilon),
            );
            check(
                s.policy_lr.is_finite() && s.policy_lr > 0.0,
                "strategy.policy_lr",
                format!("must be positive, got {}", s.policy_lr),
            );
            check(
                s.entropy_bonus.is_finite() && s.entropy_bonus >= 0.0,
                "strategy.entropy_bonus",
                format!("must be ≥ 0, got {}", s.entropy_bonus),
            );
            check(
                (0.0..1.0).contains(&s.baseline_decay),
                "strategy.baseline_decay",
                format!("must be in [0, 1), got {}", s.baseline_decay),
            );
            check(
                s.policy_hidden >= 1,
                "strategy.policy_hidden",
                format!("must be at least 1, got {}", s.policy_hidden),
            );
            check(
                s.target_batch >= 1,
                "strategy.target_batch",
                format!("must be at least 1, got {}", s.target_batch),
            );
            check(
                self.sources_per_round() >= 1,
                "strategy.sources_per_round",
                format!("must be at least 1, got {}", self.sources_per_round()),
            );
            if s.policy != PolicyMethod::TargetOnly {
                check(
                    self.finetune_rounds() < self.rounds,
                    "strategy.finetune_rounds",
                    format!("must be below rounds ({}), got {}", self.rounds, self.finetune_rounds()),
                );
            }
        } else {
            check(
                s.policy == PolicyMethod::Learned && s.sources_per_round.is_none() && s.finetune_rounds.is_none(),
                "strategy",
                "`policy`, `sources_per_round` and `finetune_rounds` are only for kind = \"task-policy\"".into(),
            );
        }
        let ModelConfig::Mlp { hidden, dropout } = &self.model;
        check(
            (0.0..1.0).contains(dropout),
            "model.dropout",
            format!("must be in [0, 1), got {dropout}"),
        );
        check(
            hidden.iter().all(|&h| h >= 1),
            "model.hidden",
            format!("every layer needs at least one unit, got {hidden:?}"),
        );
        let i = &self.inner;
        check(
            i.steps >= 1,
            "inner.steps",
            format!("must be at least 1, got {}", i.steps),
        );
        check(
            i.batch_size >= 1,
            "inner.batch_size",
            format!("must be at least 1, got {}", i.batch_size),
        );
        check(
            i.lr.is_finite() && i.lr > 0.0,
            "inner.lr",
            format!("must be positive, got {}", i.lr),
        );
        check(
            (0.0..1.0).contains(&i.momentum),
            "inner.momentum",
            format!("must be in [0, 1), got {}", i.momentum),
        );
        check(
            i.weight_decay.is_finite() && i.weight_decay >= 0.0,
            "inner.weight_decay",
            format!("must be ≥ 0, got {}", i.weight_decay),
        );
        check(
            self.checkpoint.keep >= 1,
            "checkpoint.keep",
            format!("must be at least 1, got {}", self.checkpoint.keep),
        );
        let o = &self.outer;
        check(
            o.lr.is_finite() && o.lr > 0.0,
            "outer.lr",
            format!("must be positive, got {}", o.lr),
        );
        check(
            (0.0..1.0).contains(&o.momentum),
            "outer.momentum",
            format!("must be in [0, 1), got {}", o.momentum),
        );
        p
    }
}

/// Why config text was refused.
#[derive(Debug)]
pub enum ParseFailure {
    Syntax(String),
    Invalid(Vec<String>),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base_with_data() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("train.st"), b"x").expect("write");
        std::fs::write(dir.path().join("test.st"), b"x").expect("write");
        dir
    }

    #[test]
    fn minimal_config_gets_defaults_and_resolves_paths() {
        let dir = base_with_data();
        let cfg = JobConfig::parse(
            "rounds = 3\n[data]\ntrain = \"train.st\"\ntest = \"test.st\"\nclasses = 10\n",
            dir.path(),
        )
        .expect("valid");
        assert_eq!(cfg.data.domains.len(), 1);
        assert_eq!(cfg.data.domains[0].source, dir.path().join("train.st"));
        assert_eq!(cfg.strategy.method, WeightMethod::Uniform);
        assert_eq!(cfg.inner.steps, 20);
        assert_eq!(cfg.outer.method, OuterMethod::Nesterov);
    }

    #[test]
    fn unknown_key_is_named() {
        let dir = base_with_data();
        let err = JobConfig::parse(
            "rounds = 3\n[data]\ntrain = \"train.st\"\ntest = \"test.st\"\nclasses = 10\n[inner]\nstep = 5\n",
            dir.path(),
        );
        match err {
            Err(ParseFailure::Syntax(m)) => assert!(m.contains("step"), "{m}"),
            other => panic!("expected a syntax error, got {other:?}"),
        }
    }

    #[test]
    fn all_semantic_problems_are_reported_together() {
        let dir = base_with_data();
        let err = JobConfig::parse(
            "rounds = 0\n[data]\ntrain = \"missing.st\"\ntest = \"test.st\"\nclasses = 1\n[inner]\nlr = -1.0\n",
            dir.path(),
        );
        let Err(ParseFailure::Invalid(problems)) = err else {
            panic!("expected Invalid")
        };
        let joined = problems.join("\n");
        for key in ["rounds:", "data.classes:", "data.train:", "inner.lr:"] {
            assert!(joined.contains(key), "missing {key} in {joined}");
        }
        assert_eq!(problems.len(), 4, "{joined}");
    }

    #[test]
    fn domain_jobs_are_checked_as_a_whole() {
        let dir = base_with_data();
        let text = "rounds = 3\n[data]\ntest = \"test.st\"\nclasses = 10\nshards = 4\n\
            [[data.domains]]\nname = \"a\"\nsource = \"train.st\"\nlabel_noise = 1.5\n\
            [[data.domains]]\nname = \"a\"\nsource = \"train.st\"\nsubset = { start = 0, count = 2 }\n\
            [strategy]\nmethod = \"hypergradient\"\n";
        let Err(ParseFailure::Invalid(problems)) = JobConfig::parse(text, dir.path()) else {
            panic!("expected Invalid")
        };
        let joined = problems.join("\n");
        for key in [
            "data.domains[0].label_noise:",
            "data.domains[1].name:",
            "data.domains[1].subset.count:",
            "data.meta:",
        ] {
            assert!(joined.contains(key), "missing {key} in {joined}");
        }
        let fixed = "rounds = 3\n[data]\ntrain = \"train.st\"\ntest = \"test.st\"\nclasses = 10\n[strategy]\nmethod = \"fixed\"\nweights = [1.0, 2.0]\n";
        let Err(ParseFailure::Invalid(problems)) = JobConfig::parse(fixed, dir.path()) else {
            panic!("expected Invalid")
        };
        assert!(
            problems.iter().any(|p| p.starts_with("strategy.weights:")),
            "{problems:?}"
        );
    }

    #[test]
    fn loss_rescaling_settings_are_checked() {
        let dir = base_with_data();
        let head = "rounds = 3\n[data]\ntrain = \"train.st\"\ntest = \"test.st\"\nclasses = 10\n";
        let bad = format!(
            "{head}[strategy]\nkind = \"loss-rescaling\"\nmode = \"clean-meta\"\nfeatures = []\nomega_lr = 0.0\n"
        );
        let Err(ParseFailure::Invalid(problems)) = JobConfig::parse(&bad, dir.path()) else {
            panic!("expected Invalid")
        };
        let joined = problems.join("\n");
        for key in ["data.meta:", "strategy.features:", "strategy.omega_lr:"] {
            assert!(joined.contains(key), "missing {key} in {joined}");
        }
        let stray = format!("{head}[strategy]\nmode = \"self-taught\"\n");
        let Err(ParseFailure::Invalid(problems)) = JobConfig::parse(&stray, dir.path()) else {
            panic!("expected Invalid")
        };
        assert!(problems.iter().any(|p| p.starts_with("strategy.mode:")), "{problems:?}");
        let ok = format!(
            "{head}[strategy]\nkind = \"loss-rescaling\"\nmode = \"self-taught\"\nfeatures = [\"loss\", \"margin\"]\n"
        );
        let cfg = JobConfig::parse(&ok, dir.path()).expect("self-taught needs no meta set");
        assert_eq!(cfg.strategy.features, vec![Feature::Loss, Feature::Margin]);
        assert!(cfg.strategy.normalize && cfg.strategy.omega_lr == 1e-3, "defaults");
    }

    #[test]
    fn task_policy_settings_are_checked() {
        let dir = base_with_data();
        let head = "rounds = 10\n[data]\ntrain = \"train.st\"\ntest = \"test.st\"\nclasses = 10\nshards = 2\n";
        let bad = format!(
            "{head}[strategy]\nkind = \"task-policy\"\nepsilon = 1.5\npolicy_lr = -1.0\nfinetune_rounds = 10\n"
        );
        let Err(ParseFailure::Invalid(problems)) = JobConfig::parse(&bad, dir.path()) else {
            panic!("expected Invalid")
        };
        let joined = problems.join("\n");
        for key in [
            "data.meta:",
            "data.shards:",
            "strategy.epsilon:",
            "strategy.policy_lr:",
            "strategy.finetune_rounds:",
        ] {
            assert!(joined.contains(key), "missing {key} in {joined}");
        }
        let stray = format!("{head}[strategy]\npolicy = \"uniform\"\n");
        let Err(ParseFailure::Invalid(problems)) = JobConfig::parse(&stray, dir.path()) else {
            panic!("expected Invalid")
        };
        assert!(problems.iter().any(|p| p.starts_with("strategy:")), "{problems:?}");
        std::fs::write(dir.path().join("meta.st"), b"x").expect("write");
        let ok = "rounds = 10\n[data]\ntrain = \"train.st\"\ntest = \"test.st\"\nmeta = \"meta.st\"\nclasses = 10\nshards = 1\n[strategy]\nkind = \"task-policy\"\n";
        let cfg = JobConfig::parse(ok, dir.path()).expect("valid");
        assert_eq!((cfg.finetune_rounds(), cfg.sources_per_round()), (1, 1));
    }
}
