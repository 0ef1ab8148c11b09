//! Job configuration: TOML read into one typed struct per section, then validated with every
//! problem collected (each with its key path) before anything starts: the structural ones
//! (unknown keys, wrong types, missing keys; `structure`) and the semantic ones (ranges, missing
//! files, settings that contradict each other; `JobConfig::problems`) together, and with
//! `JobConfig::load_checked` those of the data files themselves (`data`).

mod data;
pub use data::meta_subset_rows;
mod structure;

pub use crate::domains::DomainConfig;
use crate::features::Feature;
pub use crate::proto::Autocast;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A problem with a config file; `Display` lists every finding with its key path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The io error's text is in the message, not a `source` a chain printer would repeat.
    #[error("cannot read config {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
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
    /// Evaluate the global model on the test and meta sets after every this many rounds (and
    /// after the last); rounds in between record no test figures. 1: every round.
    #[serde(default = "defaults::eval_every")]
    pub eval_every: u64,
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
    /// Only these rows of the meta file (`{ start, count }`): a small labelled target, say, cut
    /// from a larger file.
    #[serde(default)]
    pub meta_subset: Option<crate::domains::Subset>,
    /// Number of classes; labels must lie in `0..classes`. For text data, the number of
    /// `labels` unless given.
    #[serde(default)]
    pub classes: u32,
    /// Text data: the label names of the task, class i being `labels[i]`; a row's label column
    /// holds one of them (a domain may map its own names with its `labels`).
    #[serde(default)]
    pub labels: Vec<String>,
    /// Text data: the column holding the text (default `text`).
    #[serde(default = "defaults::text_column")]
    pub text_column: String,
    /// Text data: the column holding the label (default `label`).
    #[serde(default = "defaults::label_column")]
    pub label_column: String,
    /// Rows of the meta set each assignment samples for its meta loss and meta-gradients
    /// (seeded by the assignment); 0: the whole meta set every time.
    #[serde(default)]
    pub meta_batch: u32,
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
    /// mode collapsed without it (docs/algorithms.md §5).
    pub normalize: bool,
    /// `loss-rescaling`: Adam on Ω; Meta-Weight-Net's defaults are lr 1e-3, weight decay 1e-4.
    pub omega_lr: f64,
    pub omega_weight_decay: f64,
    /// `loss-rescaling`: Ω's hidden units.
    pub omega_hidden: u32,
    /// `loss-rescaling`: the step size α of the virtual step θ' = θ − α∇θ through which Ω's
    /// meta-gradient flows: always one plain SGD step, whatever `inner.optimizer` is
    /// (docs/algorithms.md §5). Default: `inner.lr`.
    pub virtual_lr: Option<f64>,
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
            virtual_lr: None,
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
#[serde(from = "ModelToml")]
pub enum ModelConfig {
    /// Multi-layer perceptron with ReLU between layers, on dense features.
    Mlp {
        hidden: Vec<u32>,
        /// Drop probability after every hidden layer while training (0: none). Also what the
        /// `label-prob-mean`/`label-prob-spread` features sample from.
        dropout: f64,
        /// Keys given that only another kind reads (reported by the checks).
        unread: Vec<&'static str>,
    },
    /// A pretrained BERT-family encoder with a seeded classification head, on text.
    Bert {
        /// A Hugging Face model directory: `config.json`, `model.safetensors`, `tokenizer.json`
        /// (empty when not given; reported by the checks).
        path: PathBuf,
        pooling: Pooling,
        /// Tokens per text, `[CLS]` and `[SEP]` included; longer texts are truncated.
        max_len: u32,
        /// Keys given that only another kind reads (reported by the checks).
        unread: Vec<&'static str>,
    },
    /// A user's TorchScript module (`torch.jit.script` or `torch.jit.trace`) whose `forward`
    /// takes the batch's dense features `[n, features]` — or, with a `tokenizer`, token ids and
    /// the attention mask `[n, len]` — and returns logits `[n, classes]`; trained first-order
    /// only (docs/torchscript.md).
    TorchScript {
        /// The module file (empty when not given; reported by the checks).
        path: PathBuf,
        /// A Hugging Face `tokenizer.json`: the model reads text, tokenized by it.
        tokenizer: Option<PathBuf>,
        /// Tokens per text with a tokenizer, specials included; longer texts are truncated.
        max_len: u32,
        /// Keys given that only another kind reads (reported by the checks).
        unread: Vec<&'static str>,
    },
}

/// How a BERT classifier turns a sequence's hidden states into one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pooling {
    /// The `[CLS]` token's state through the encoder's pooler (as `BertForSequenceClassification`).
    Cls,
    /// The mean over the attended tokens (what sentence-transformers checkpoints were trained with).
    Mean,
}

impl ModelConfig {
    /// Whether the model reads text (token ids) rather than dense features.
    pub fn reads_text(&self) -> bool {
        self.tokenizer().is_some()
    }

    /// The `tokenizer.json` a text model's texts are tokenized by, and the tokens per text.
    pub fn tokenizer(&self) -> Option<(PathBuf, u32)> {
        match self {
            ModelConfig::Bert { path, max_len, .. } => Some((path.join("tokenizer.json"), *max_len)),
            ModelConfig::TorchScript {
                tokenizer: Some(t),
                max_len,
                ..
            } => Some((t.clone(), *max_len)),
            ModelConfig::TorchScript { .. } | ModelConfig::Mlp { .. } => None,
        }
    }
}

/// `[model]` as written, `kind` naming the variant. A flat struct rather than an internally
/// tagged enum: serde buffers a tagged enum's fields, and errors inside the buffer lose their key.
/// A key of the other kind is kept to be reported by the checks.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelToml {
    kind: ModelKind,
    hidden: Option<Vec<u32>>,
    #[serde(default)]
    dropout: f64,
    path: Option<PathBuf>,
    pooling: Option<Pooling>,
    max_len: Option<u32>,
    tokenizer: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum ModelKind {
    Mlp,
    Bert,
    #[serde(rename = "torchscript")]
    TorchScript,
}

impl From<ModelToml> for ModelConfig {
    fn from(m: ModelToml) -> Self {
        let given = |keys: &[(&'static str, bool)]| keys.iter().filter(|(_, set)| *set).map(|(k, _)| *k).collect();
        match m.kind {
            ModelKind::Mlp => ModelConfig::Mlp {
                unread: given(&[
                    ("path", m.path.is_some()),
                    ("pooling", m.pooling.is_some()),
                    ("max_len", m.max_len.is_some()),
                    ("tokenizer", m.tokenizer.is_some()),
                ]),
                hidden: m.hidden.unwrap_or_else(defaults::hidden),
                dropout: m.dropout,
            },
            ModelKind::Bert => ModelConfig::Bert {
                unread: given(&[
                    ("hidden", m.hidden.is_some()),
                    ("dropout", m.dropout != 0.0),
                    ("tokenizer", m.tokenizer.is_some()),
                ]),
                path: m.path.unwrap_or_default(),
                pooling: m.pooling.unwrap_or(Pooling::Mean),
                max_len: m.max_len.unwrap_or(128),
            },
            ModelKind::TorchScript => ModelConfig::TorchScript {
                unread: given(&[
                    ("hidden", m.hidden.is_some()),
                    ("dropout", m.dropout != 0.0),
                    ("pooling", m.pooling.is_some()),
                    // Without a tokenizer nothing is tokenized.
                    ("max_len", m.max_len.is_some() && m.tokenizer.is_none()),
                ]),
                path: m.path.unwrap_or_default(),
                tokenizer: m.tokenizer,
                max_len: m.max_len.unwrap_or(128),
            },
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig::Mlp {
            hidden: defaults::hidden(),
            dropout: 0.0,
            unread: Vec::new(),
        }
    }
}

/// The workers' local optimizer (SGD with momentum, or AdamW), reset at the start of every
/// assignment so an assignment's result depends only on the model and the assignment; its
/// learning rate follows a schedule over the job's global inner steps
/// (round × `steps` + j), so it too is a function of the assignment.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InnerConfig {
    /// H: local steps per round (DiLoCo's inner steps).
    pub steps: u32,
    pub batch_size: u32,
    /// The base learning rate (the schedule's peak).
    pub lr: f64,
    /// `sgd` (torch.optim.SGD) or `adamw` (torch.optim.AdamW).
    pub optimizer: InnerOptimizerKind,
    /// `sgd`: momentum (default 0.9).
    pub momentum: Option<f64>,
    /// `sgd`: coupled (added to the gradient); `adamw`: decoupled (θ ← θ − lr·wd·θ).
    pub weight_decay: f64,
    /// `adamw`: (β1, β2) (default [0.9, 0.999]).
    pub betas: Option<Vec<f64>>,
    /// `adamw`: ε (default 1e-8).
    pub eps: Option<f64>,
    /// Linear warmup of the learning rate from 0 over this many global steps.
    pub warmup_steps: u64,
    /// After the warmup: `none` (constant) or `linear` (to 0 at the job's last step).
    pub decay: LrDecayKind,
    /// Clip the gradient's global L2 norm to this (as clip_grad_norm_); default: no clipping.
    pub clip_norm: Option<f64>,
    /// Micro-batches per step (gradient accumulation), for batches larger than memory.
    pub accumulate: u32,
    /// `none`, or `bf16`: the workers run the model's forward passes under bf16 autocast.
    pub autocast: Autocast,
}

impl Default for InnerConfig {
    fn default() -> Self {
        Self {
            steps: 20,
            batch_size: 32,
            lr: 0.05,
            optimizer: InnerOptimizerKind::Sgd,
            momentum: None,
            weight_decay: 0.0,
            betas: None,
            eps: None,
            warmup_steps: 0,
            decay: LrDecayKind::None,
            clip_norm: None,
            accumulate: 1,
            autocast: Autocast::None,
        }
    }
}

impl InnerConfig {
    /// SGD's momentum (0.9 unless set).
    pub fn momentum(&self) -> f64 {
        self.momentum.unwrap_or(0.9)
    }

    /// AdamW's (β1, β2) ([0.9, 0.999] unless set; a wrong count falls back to the default,
    /// and validation reports it).
    pub fn betas(&self) -> (f64, f64) {
        match self.betas.as_deref() {
            Some(&[b1, b2]) => (b1, b2),
            _ => (0.9, 0.999),
        }
    }

    /// AdamW's ε (1e-8 unless set).
    pub fn eps(&self) -> f64 {
        self.eps.unwrap_or(1e-8)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InnerOptimizerKind {
    /// SGD with momentum and coupled weight decay (torch.optim.SGD).
    Sgd,
    /// Adam with decoupled weight decay (torch.optim.AdamW).
    #[serde(rename = "adamw")]
    AdamW,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LrDecayKind {
    /// The base learning rate after the warmup.
    None,
    /// Linear decay to 0 at the job's last inner step (rounds × steps).
    Linear,
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
    /// How workers send their deltas: `f32` (exact), `bf16` (half the bytes; each value
    /// rounded to 8 significant bits) or `int8` (blockwise absmax: about a quarter).
    pub delta_dtype: DeltaDType,
    /// `int8`: values per scale (default [`DEFAULT_DELTA_BLOCK`]).
    pub delta_block: Option<u32>,
    /// Most deltas the coordinator holds decoded or is reading at once, besides the round's
    /// running sum: the one the sum needs next, and `max_receiving − 1` read ahead of their
    /// turn. The rest wait unread (their senders held back by QUIC flow control), so its memory
    /// does not grow with the number of workers. Does not change results.
    pub max_receiving: u32,
}

/// Values per scale of int8 deltas unless `[outer] delta_block` says otherwise: 64 values and
/// a 4-byte scale in 68 bytes, 0.266 of f32's.
pub const DEFAULT_DELTA_BLOCK: u32 = 64;

impl OuterConfig {
    /// The wire dtype of the workers' deltas.
    pub fn delta_wire_dtype(&self) -> crate::proto::DType {
        use crate::proto::DType;
        match self.delta_dtype {
            DeltaDType::F32 => DType::F32,
            DeltaDType::Bf16 => DType::BF16,
            DeltaDType::Int8 => DType::Int8 {
                block: self.delta_block.unwrap_or(DEFAULT_DELTA_BLOCK),
            },
        }
    }
}

impl Default for OuterConfig {
    fn default() -> Self {
        Self {
            method: OuterMethod::Nesterov,
            lr: 0.7,
            momentum: 0.9,
            delta_dtype: DeltaDType::F32,
            delta_block: None,
            max_receiving: 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeltaDType {
    F32,
    Bf16,
    Int8,
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
    pub fn eval_every() -> u64 {
        1
    }
    pub fn text_column() -> String {
        "text".into()
    }
    pub fn label_column() -> String {
        "label".into()
    }
}

impl JobConfig {
    /// Reads, parses and validates a config; relative data paths are resolved against the
    /// config file's directory. The data files are only checked to exist ([`Self::load_checked`]
    /// opens them).
    ///
    /// # Errors
    /// `Read`, `Parse` (not TOML at all; the message gives the line and column) or `Invalid`
    /// with every problem found, structural and semantic, each with its key path.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with(path, Depth::Config).map(|c| c.config)
    }

    /// As [`Self::load`], and also opens every data file the config names and checks it whole
    /// and against the settings (what `validate` and the commands that run a job do before
    /// anything starts); the warnings are settings the job clamps to the data.
    ///
    /// # Errors
    /// As [`Self::load`]; `Invalid` also lists every problem with the data (format, dtype,
    /// shape, labels, features, rows), each with its key path, its file and the numbers.
    pub fn load_checked(path: &Path) -> Result<Checked, ConfigError> {
        Self::load_with(path, Depth::Data)
    }

    fn load_with(path: &Path, depth: Depth) -> Result<Checked, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse_with(&text, base, depth).map_err(|e| match e {
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
    ///
    /// # Errors
    /// `Syntax` when the text is not TOML; otherwise `Invalid` with every unknown key, wrong
    /// type and missing key, and every semantic problem that does not depend on one of those.
    pub fn parse(text: &str, base: &Path) -> Result<Self, ParseFailure> {
        Self::parse_with(text, base, Depth::Config).map(|c| c.config)
    }

    /// As [`Self::parse`], and also checks the data files (see [`Self::load_checked`]).
    ///
    /// # Errors
    /// As [`Self::parse`], with the data's problems among the others.
    pub fn parse_checked(text: &str, base: &Path) -> Result<Checked, ParseFailure> {
        Self::parse_with(text, base, Depth::Data)
    }

    fn parse_with(text: &str, base: &Path, depth: Depth) -> Result<Checked, ParseFailure> {
        let table: toml::Table = toml::from_str(text).map_err(|e| ParseFailure::Syntax(e.to_string()))?;
        let (cfg, structural) = structure::deserialize::<JobConfig>(table);
        let mut problems: Vec<String> = structural.iter().map(|p| format!("{}: {}", p.key, p.why)).collect();
        let Some(mut cfg) = cfg else {
            return Err(ParseFailure::Invalid(problems));
        };
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
                    labels: None,
                    token_noise: 0.0,
                },
            );
            cfg.data.train_shorthand = true;
        }
        if cfg.data.classes == 0 {
            cfg.data.classes = cfg.data.labels.len() as u32;
        }
        let paths = cfg
            .data
            .domains
            .iter_mut()
            .map(|d| &mut d.source)
            .chain([&mut cfg.data.test])
            .chain(cfg.data.meta.as_mut())
            .chain(match &mut cfg.model {
                ModelConfig::Bert { path, .. } if !path.as_os_str().is_empty() => vec![path],
                ModelConfig::TorchScript { path, tokenizer, .. } => {
                    let path = Some(path).filter(|p| !p.as_os_str().is_empty());
                    path.into_iter().chain(tokenizer.as_mut()).collect()
                }
                ModelConfig::Bert { .. } | ModelConfig::Mlp { .. } => vec![],
            });
        for p in paths {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        // Where a value was wrong or missing a placeholder stands in, so a semantic finding
        // about that key (or a key under it), or one whose check read it, would only repeat the
        // problem or be spurious.
        let mut findings = cfg.findings();
        let mut warnings = Vec::new();
        // Text files are read by the text module (`metaloop_common::text::check_job`), which
        // this crate does not link.
        if depth == Depth::Data && !cfg.model.reads_text() {
            let data = data::check(&cfg);
            findings.extend(data.problems);
            warnings = data.warnings;
        }
        let stands = |f: &Finding| {
            !structural
                .iter()
                .any(|p| structure::within(&f.key, &p.key) || f.uses.iter().any(|u| structure::overlaps(u, &p.key)))
        };
        problems.extend(findings.into_iter().filter(stands).map(|f| f.to_string()));
        if problems.is_empty() {
            Ok(Checked {
                config: cfg,
                warnings: warnings.into_iter().map(|f| f.to_string()).collect(),
            })
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
        self.findings().into_iter().map(|f| f.to_string()).collect()
    }

    /// Every semantic problem with its key and the other keys its check read, section by
    /// section (strategy checks that name a `data` key among them, where they always were).
    fn findings(&self) -> Vec<Finding> {
        let mut p = Findings::default();
        p.range("rounds", self.rounds, Range::at_least(1));
        p.range("eval_every", self.eval_every, Range::at_least(1));
        self.check_data(&mut p);
        self.check_strategy(&mut p);
        self.check_model(&mut p);
        self.check_inner(&mut p);
        self.check_checkpoint(&mut p);
        self.check_outer(&mut p);
        p.0
    }

    /// `[data]`: the counts, the training domains, and that the files exist.
    fn check_data(&self, p: &mut Findings) {
        let d = &self.data;
        let text = self.model.reads_text();
        if d.classes == 0 && d.labels.is_empty() {
            // Required for dense data; a text job gives `labels` instead (reported below).
            p.check(text, "data.classes", "missing (required)".into());
        } else {
            p.range("data.classes", d.classes, Range::at_least(2));
        }
        p.range("data.shards", d.shards, Range::at_least(1));
        if text {
            p.check_using(
                d.labels.len() >= 2,
                "data.labels",
                &["model.kind"],
                "a text model needs the task's label names, at least two (class i is labels[i])".into(),
            );
            p.check_using(
                d.labels.is_empty() || d.classes as usize == d.labels.len(),
                "data.classes",
                &["data.labels"],
                format!("{} classes but {} labels", d.classes, d.labels.len()),
            );
            let mut seen = std::collections::BTreeSet::new();
            for l in &d.labels {
                p.check(seen.insert(l), "data.labels", format!("`{l}` is given twice"));
            }
        } else {
            p.check_using(
                d.labels.is_empty(),
                "data.labels",
                &["model.kind"],
                "only a text model (`model.kind = \"bert\"`, or a TorchScript model with a `tokenizer`) \
                 reads labels by name"
                    .into(),
            );
        }
        p.check_using(
            !d.domains.is_empty(),
            "data",
            &["data.domains", "data.train"],
            "needs `train` or at least one [[data.domains]]".into(),
        );
        p.check_using(
            !(d.train_shorthand && d.domains.len() > 1),
            "data.train",
            &["data.domains"],
            "give either `train` or [[data.domains]], not both".into(),
        );
        let mut names = std::collections::BTreeSet::new();
        for (i, dom) in d.domains.iter().enumerate() {
            Self::check_domain(d, text, i, dom, &mut names, p);
        }
        p.check(
            d.test.is_file(),
            "data.test",
            format!("file {} does not exist", d.test.display()),
        );
        if let Some(meta) = &d.meta {
            p.check(
                meta.is_file(),
                "data.meta",
                format!("file {} does not exist", meta.display()),
            );
        }
        if let Some(s) = d.meta_subset {
            p.check_using(
                d.meta.is_some(),
                "data.meta_subset",
                &["data.meta"],
                "needs a meta set".into(),
            );
            p.check(s.count > 0, "data.meta_subset.count", "must be at least 1".into());
        }
    }

    /// One training domain, the `i`-th (`data.train` for the shorthand); `names` are those
    /// of the domains before it.
    fn check_domain(
        d: &DataConfig,
        text: bool,
        i: usize,
        dom: &DomainConfig,
        names: &mut std::collections::BTreeSet<String>,
        p: &mut Findings,
    ) {
        let key = if d.train_shorthand {
            "data.train".to_string()
        } else {
            format!("data.domains[{i}]")
        };
        p.check(!dom.name.is_empty(), &format!("{key}.name"), "must not be empty".into());
        p.check(
            dom.name.is_empty() || names.insert(dom.name.clone()),
            &format!("{key}.name"),
            format!("`{}` is used twice", dom.name),
        );
        let src_key = if d.train_shorthand {
            key.clone()
        } else {
            format!("{key}.source")
        };
        p.check(
            dom.source.is_file(),
            &src_key,
            format!("file {} does not exist", dom.source.display()),
        );
        p.range(&format!("{key}.label_noise"), dom.label_noise, Range::UNIT);
        p.range(&format!("{key}.feature_noise"), dom.feature_noise, Range::NON_NEGATIVE);
        p.range(&format!("{key}.token_noise"), dom.token_noise, Range::UNIT);
        let only = |set: bool, field: &str, kind: &str, p: &mut Findings| {
            p.check_using(
                !set,
                &format!("{key}.{field}"),
                &["model.kind"],
                format!("only applies to {kind} data"),
            );
        };
        if text {
            only(dom.feature_noise != 0.0, "feature_noise", "dense-feature", p);
            only(dom.permute_features, "permute_features", "dense-feature", p);
            if let Some(labels) = &dom.labels {
                p.check_using(
                    !labels.is_empty() && labels.len() <= d.classes as usize,
                    &format!("{key}.labels"),
                    &["data.classes"],
                    format!(
                        "maps a domain's own label names to classes 0..; needs 1 to {} names, got {}",
                        d.classes,
                        labels.len()
                    ),
                );
            }
        } else {
            only(dom.token_noise != 0.0, "token_noise", "text", p);
            only(dom.labels.is_some(), "labels", "text", p);
        }
        if let Some(s) = dom.subset {
            p.check_using(
                s.count >= d.shards as usize,
                &format!("{key}.subset.count"),
                &["data.shards"],
                format!("{} samples cannot fill {} shards", s.count, d.shards),
            );
        }
    }

    /// `[strategy]`: the domain-weight method, then each kind's own settings.
    fn check_strategy(&self, p: &mut Findings) {
        self.check_weight_method(p);
        self.check_loss_rescaling(p);
        self.check_task_policy(p);
    }

    /// `strategy.method` and the settings only one method reads.
    fn check_weight_method(&self, p: &mut Findings) {
        let (d, s) = (&self.data, &self.strategy);
        match s.method {
            WeightMethod::Hypergradient => {
                p.check_using(
                    d.meta.is_some(),
                    "data.meta",
                    &["strategy.method"],
                    "method `hypergradient` needs a meta set".into(),
                );
                p.range("strategy.lr", s.lr, Range::POSITIVE);
                p.range("strategy.weight_decay", s.weight_decay, Range::NON_NEGATIVE);
            }
            WeightMethod::Fixed => {
                let k = d.domains.len();
                p.check_using(
                    s.weights.len() == k,
                    "strategy.weights",
                    &["data.domains", "data.train"],
                    format!("needs one weight per domain ({k}), got {}", s.weights.len()),
                );
                p.check(
                    s.weights.iter().all(|&w| Range::POSITIVE.holds(w)),
                    "strategy.weights",
                    "every weight must be positive".into(),
                );
            }
            WeightMethod::Doremi => {
                let rounds = Range::at_least(1).below_key("rounds", self.rounds);
                p.range("strategy.reference_rounds", self.reference_rounds(), rounds);
                p.range("strategy.eta", s.eta, Range::POSITIVE);
                p.range("strategy.smoothing", s.smoothing, Range::UNIT_OPEN);
            }
            WeightMethod::Uniform => {}
        }
        if matches!(s.method, WeightMethod::Hypergradient | WeightMethod::Doremi) {
            p.range("strategy.probe", s.probe, Range::at_least(1));
        }
        p.check_using(
            s.method == WeightMethod::Fixed || s.weights.is_empty(),
            "strategy.weights",
            &["strategy.method"],
            "only for method = \"fixed\"".into(),
        );
        p.check_using(
            s.method == WeightMethod::Doremi || s.reference_rounds.is_none(),
            "strategy.reference_rounds",
            &["strategy.method"],
            "only for method = \"doremi\"".into(),
        );
    }

    /// Kind `loss-rescaling`'s settings (Ω), or that `mode` is left out for another kind.
    fn check_loss_rescaling(&self, p: &mut Findings) {
        let s = &self.strategy;
        if s.kind != StrategyKind::LossRescaling {
            p.check_using(
                s.mode == RescaleMode::None,
                "strategy.mode",
                &["strategy.kind"],
                "only for kind = \"loss-rescaling\"".into(),
            );
            p.check_using(
                s.virtual_lr.is_none(),
                "strategy.virtual_lr",
                &["strategy.kind"],
                "only for kind = \"loss-rescaling\" (the only virtual step)".into(),
            );
            return;
        }
        if let Some(lr) = s.virtual_lr {
            p.range("strategy.virtual_lr", lr, Range::POSITIVE);
        }
        p.check_using(
            s.method == WeightMethod::Uniform,
            "strategy.method",
            &["strategy.kind"],
            "loss-rescaling keeps domain weights uniform; leave `method` out".into(),
        );
        p.check_using(
            !(s.mode == RescaleMode::CleanMeta && self.data.meta.is_none()),
            "data.meta",
            &["strategy.kind", "strategy.mode"],
            "mode `clean-meta` needs a meta set".into(),
        );
        p.check(
            !s.features.is_empty(),
            "strategy.features",
            "Ω needs at least one feature".into(),
        );
        p.range("strategy.omega_lr", s.omega_lr, Range::POSITIVE);
        p.range("strategy.omega_weight_decay", s.omega_weight_decay, Range::NON_NEGATIVE);
        p.range("strategy.omega_hidden", s.omega_hidden, Range::at_least(1));
        p.range("strategy.passes", s.passes, Range::at_least(1));
        // A BERT's dropout is its config.json's.
        let dropout = match &self.model {
            ModelConfig::Mlp { dropout, .. } => *dropout,
            // A BERT's dropout is its config.json's; a TorchScript module's is its own (a
            // module without dropout gives the same probability on every pass).
            ModelConfig::Bert { .. } | ModelConfig::TorchScript { .. } => 0.1,
        };
        p.check_using(
            !(s.features.iter().any(|f| f.stochastic()) && dropout == 0.0),
            "strategy.features",
            &["model.dropout"],
            "`label-prob-mean` and `label-prob-spread` sample dropout passes; they need model.dropout > 0".into(),
        );
    }

    /// Kind `task-policy`'s settings, or that its keys are left out for another kind.
    fn check_task_policy(&self, p: &mut Findings) {
        let (d, s) = (&self.data, &self.strategy);
        if s.kind != StrategyKind::TaskPolicy {
            p.check_using(
                s.policy == PolicyMethod::Learned && s.sources_per_round.is_none() && s.finetune_rounds.is_none(),
                "strategy",
                &[
                    "strategy.kind",
                    "strategy.policy",
                    "strategy.sources_per_round",
                    "strategy.finetune_rounds",
                ],
                "`policy`, `sources_per_round` and `finetune_rounds` are only for kind = \"task-policy\"".into(),
            );
            return;
        }
        p.check_using(
            s.method == WeightMethod::Uniform,
            "strategy.method",
            &["strategy.kind"],
            "task-policy picks sources with its `policy`; leave `method` out".into(),
        );
        p.check_using(
            d.meta.is_some(),
            "data.meta",
            &["strategy.kind"],
            "task-policy needs the target's labelled examples as the meta set".into(),
        );
        p.check_using(
            d.shards == 1,
            "data.shards",
            &["strategy.kind"],
            format!("task-policy trains on whole source tasks; must be 1, got {}", d.shards),
        );
        p.range("strategy.epsilon", s.epsilon, Range::UNIT);
        p.range("strategy.policy_lr", s.policy_lr, Range::POSITIVE);
        p.range("strategy.entropy_bonus", s.entropy_bonus, Range::NON_NEGATIVE);
        p.range("strategy.baseline_decay", s.baseline_decay, Range::UNIT_OPEN);
        p.range("strategy.policy_hidden", s.policy_hidden, Range::at_least(1));
        p.range("strategy.target_batch", s.target_batch, Range::at_least(1));
        let sources = self.sources_per_round();
        let domains = ["data.domains", "data.train"];
        p.range_using("strategy.sources_per_round", &domains, sources, Range::at_least(1));
        if s.policy != PolicyMethod::TargetOnly {
            let rounds = Range::ANY.below_key("rounds", self.rounds);
            p.range("strategy.finetune_rounds", self.finetune_rounds(), rounds);
        }
    }

    /// `[model]`.
    fn check_model(&self, p: &mut Findings) {
        let (kind, unread) = match &self.model {
            ModelConfig::Mlp { unread, .. } => ("mlp", unread),
            ModelConfig::Bert { unread, .. } => ("bert", unread),
            ModelConfig::TorchScript { unread, .. } => ("torchscript", unread),
        };
        for key in unread {
            p.check_using(
                false,
                &format!("model.{key}"),
                &["model.kind"],
                format!("`kind = \"{kind}\"` does not read it"),
            );
        }
        match &self.model {
            ModelConfig::Mlp { hidden, dropout, .. } => {
                p.range("model.dropout", *dropout, Range::UNIT_OPEN);
                p.check(
                    hidden.iter().all(|&h| h >= 1),
                    "model.hidden",
                    format!("every layer needs at least one unit, got {hidden:?}"),
                );
            }
            ModelConfig::TorchScript {
                path,
                tokenizer,
                max_len,
                ..
            } => {
                if let Some(t) = tokenizer {
                    p.range("model.max_len", *max_len, Range::at_least(3));
                    p.check(
                        t.is_file(),
                        "model.tokenizer",
                        format!("file {} does not exist", t.display()),
                    );
                }
                if path.as_os_str().is_empty() {
                    p.check(
                        false,
                        "model.path",
                        "`kind = \"torchscript\"` needs the module file (`torch.jit.save`)".into(),
                    );
                } else {
                    p.check(
                        path.is_file(),
                        "model.path",
                        format!("file {} does not exist", path.display()),
                    );
                }
                let s = &self.strategy;
                let second_order = s.method == WeightMethod::Hypergradient
                    || (s.kind == StrategyKind::LossRescaling && s.mode != RescaleMode::None);
                p.check_using(
                    !(second_order && s.directional == Directional::Exact),
                    "strategy.directional",
                    &["model.kind", "strategy.method", "strategy.mode"],
                    "a TorchScript model trains first-order only: the exact (double-backward) \
                     meta-gradient is not reliable through the TorchScript executor; set \
                     directional = \"finite-difference\""
                        .into(),
                );
            }
            ModelConfig::Bert { path, max_len, .. } => {
                // [CLS], [SEP] and at least one token of text.
                p.range("model.max_len", *max_len, Range::at_least(3));
                if path.as_os_str().is_empty() {
                    p.check(
                        false,
                        "model.path",
                        "`kind = \"bert\"` needs a Hugging Face model directory".into(),
                    );
                    return;
                }
                p.check(
                    path.is_dir(),
                    "model.path",
                    format!("directory {} does not exist", path.display()),
                );
                for file in ["config.json", "model.safetensors", "tokenizer.json"] {
                    p.check(
                        !path.is_dir() || path.join(file).is_file(),
                        "model.path",
                        format!(
                            "{} has no {file}: a Hugging Face model directory has config.json, \
                             model.safetensors and tokenizer.json",
                            path.display()
                        ),
                    );
                }
            }
        }
    }

    /// `[inner]`: the optimizer and the settings only it reads, the schedule, clipping and
    /// accumulation.
    fn check_inner(&self, p: &mut Findings) {
        let i = &self.inner;
        p.range("inner.steps", i.steps, Range::at_least(1));
        p.range("inner.batch_size", i.batch_size, Range::at_least(1));
        p.range("inner.lr", i.lr, Range::POSITIVE);
        match i.optimizer {
            InnerOptimizerKind::Sgd => {
                p.range("inner.momentum", i.momentum(), Range::UNIT_OPEN);
                for (key, given) in [("inner.betas", i.betas.is_some()), ("inner.eps", i.eps.is_some())] {
                    p.check_using(
                        !given,
                        key,
                        &["inner.optimizer"],
                        "only for optimizer = \"adamw\"".into(),
                    );
                }
            }
            InnerOptimizerKind::AdamW => {
                p.check_using(
                    i.momentum.is_none(),
                    "inner.momentum",
                    &["inner.optimizer"],
                    "only for optimizer = \"sgd\" (AdamW's moments are set by `betas`)".into(),
                );
                match i.betas.as_deref() {
                    None => {}
                    Some(&[b1, b2]) => {
                        p.range("inner.betas[0]", b1, Range::UNIT_OPEN);
                        p.range("inner.betas[1]", b2, Range::UNIT_OPEN);
                    }
                    Some(b) => p.check(
                        false,
                        "inner.betas",
                        format!("needs two values [β1, β2], got {}", b.len()),
                    ),
                }
                p.range("inner.eps", i.eps(), Range::POSITIVE);
            }
        }
        p.range("inner.weight_decay", i.weight_decay, Range::NON_NEGATIVE);
        let total = self.rounds.saturating_mul(u64::from(i.steps));
        p.check_using(
            i.warmup_steps <= total,
            "inner.warmup_steps",
            &["rounds", "inner.steps"],
            format!(
                "must be at most the job's inner steps, rounds × inner.steps ({total}), got {}",
                i.warmup_steps
            ),
        );
        p.check_using(
            !(i.decay == LrDecayKind::Linear && i.warmup_steps == total),
            "inner.warmup_steps",
            &["rounds", "inner.steps", "inner.decay"],
            format!("with decay = \"linear\" must be below rounds × inner.steps ({total}): nothing would decay"),
        );
        if let Some(clip) = i.clip_norm {
            p.range("inner.clip_norm", clip, Range::POSITIVE);
        }
        p.range("inner.accumulate", i.accumulate, Range::at_least(1));
        p.check_using(
            i.accumulate <= i.batch_size,
            "inner.accumulate",
            &["inner.batch_size"],
            format!(
                "must be at most inner.batch_size ({}): every micro-batch needs a row, got {}",
                i.batch_size, i.accumulate
            ),
        );
    }

    /// `[checkpoint]`.
    fn check_checkpoint(&self, p: &mut Findings) {
        p.range("checkpoint.keep", self.checkpoint.keep, Range::at_least(1));
    }

    /// `[outer]`.
    fn check_outer(&self, p: &mut Findings) {
        let o = &self.outer;
        p.range("outer.lr", o.lr, Range::POSITIVE);
        p.range("outer.momentum", o.momentum, Range::UNIT_OPEN);
        if let Some(block) = o.delta_block {
            p.check_using(
                o.delta_dtype == DeltaDType::Int8,
                "outer.delta_block",
                &["outer.delta_dtype"],
                "only for delta_dtype = \"int8\"".into(),
            );
            // Below 16 the scales cost more than int8 saves over bf16; past 2^20 values one
            // outlier flattens a megabyte of the delta.
            p.range("outer.delta_block", block, Range::within(16, 1 << 20));
        }
        p.range("outer.max_receiving", o.max_receiving, Range::within(1, 4096));
    }
}

/// A config whose data files were opened and checked too.
#[derive(Debug, Clone)]
pub struct Checked {
    pub config: JobConfig,
    /// Settings larger than the data they draw from, which the job clamps (`key: why`); worth
    /// printing, not refusing.
    pub warnings: Vec<String>,
}

/// How far a config is checked: its text alone (data files only checked to exist), or also
/// every data file opened and read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Depth {
    Config,
    Data,
}

/// Why config text was refused.
#[derive(Debug)]
pub enum ParseFailure {
    /// Not TOML at all: the parser's message, with line and column.
    Syntax(String),
    /// Every problem found, each `key.path: why`.
    Invalid(Vec<String>),
}

/// A semantic problem: the key it is about, the other keys its check read, and why.
#[derive(Debug)]
struct Finding {
    key: String,
    uses: Vec<String>,
    why: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.why)
    }
}

#[derive(Debug, Default)]
struct Findings(Vec<Finding>);

impl Findings {
    fn check(&mut self, ok: bool, key: &str, why: String) {
        self.check_using(ok, key, &[], why);
    }

    /// A check that also read `uses`, so that a structural problem there voids it.
    fn check_using(&mut self, ok: bool, key: &str, uses: &[&str], why: String) {
        if !ok {
            self.0.push(Finding {
                key: key.to_string(),
                uses: uses.iter().map(|u| (*u).to_string()).collect(),
                why,
            });
        }
    }

    /// A range check: `value` is what `key` holds, and must lie in `range`.
    fn range<T: Number>(&mut self, key: &str, value: T, range: Range<T>) {
        self.range_using(key, &[], value, range);
    }

    /// A range check whose value was also derived from `uses` (the key an end of the range is
    /// the value of is read too, without being named here).
    fn range_using<T: Number>(&mut self, key: &str, uses: &[&str], value: T, range: Range<T>) {
        if !range.holds(value) {
            let uses: Vec<&str> = uses.iter().copied().chain(range.high_key).collect();
            self.check_using(false, key, &uses, format!("must be {}, got {value}", range.wording()));
        }
    }
}

/// A number a [`Range`] bounds: the value of an integer or a float key.
trait Number: Copy + PartialOrd + std::fmt::Display {
    /// Integer ranges read "at least n" and "a..b"; float ones "≥ x", "positive" and "[a, b)".
    const INTEGER: bool;
    const ZERO: Self;
    /// A float must also be finite, wherever its range ends.
    fn is_finite(self) -> bool {
        true
    }
}

macro_rules! integer_numbers {
    ($($t:ty),*) => {
        $(impl Number for $t {
            const INTEGER: bool = true;
            const ZERO: Self = 0;
        })*
    };
}
integer_numbers!(u32, u64, usize);

impl Number for f64 {
    const INTEGER: bool = false;
    const ZERO: Self = 0.0;
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
}

/// One end of a [`Range`].
#[derive(Debug, Clone, Copy)]
enum End<T> {
    /// The bound itself is allowed.
    Closed(T),
    /// Only values short of the bound are.
    Open(T),
}

/// The values a numeric key may hold: a lower and an upper end, each closed, open or absent (a
/// float must be finite too). Each key's range is declared once, in one `Findings::range` line,
/// and every message is worded by [`Range::wording`].
#[derive(Debug, Clone, Copy)]
struct Range<T> {
    low: Option<End<T>>,
    high: Option<End<T>>,
    /// The key whose value the upper end is: named in the message, and read by the check.
    high_key: Option<&'static str>,
}

impl Range<f64> {
    /// Above 0.
    const POSITIVE: Self = Self::float(Some(End::Open(0.0)), None);
    /// 0 or more.
    const NON_NEGATIVE: Self = Self::float(Some(End::Closed(0.0)), None);
    /// [0, 1]: a probability.
    const UNIT: Self = Self::float(Some(End::Closed(0.0)), Some(End::Closed(1.0)));
    /// [0, 1): a momentum, a decay, a drop probability.
    const UNIT_OPEN: Self = Self::float(Some(End::Closed(0.0)), Some(End::Open(1.0)));

    const fn float(low: Option<End<f64>>, high: Option<End<f64>>) -> Self {
        Self {
            low,
            high,
            high_key: None,
        }
    }
}

impl<T: Number> Range<T> {
    /// Any value (any finite one, for a float) until an end is added.
    const ANY: Self = Self {
        low: None,
        high: None,
        high_key: None,
    };

    /// `n` or more.
    fn at_least(n: T) -> Self {
        Self {
            low: Some(End::Closed(n)),
            ..Self::ANY
        }
    }

    /// From `low` to `high`, both allowed.
    fn within(low: T, high: T) -> Self {
        Self {
            low: Some(End::Closed(low)),
            high: Some(End::Closed(high)),
            high_key: None,
        }
    }

    /// Also below `high`, the value of the key `key`.
    fn below_key(self, key: &'static str, high: T) -> Self {
        Self {
            high: Some(End::Open(high)),
            high_key: Some(key),
            ..self
        }
    }

    fn holds(&self, v: T) -> bool {
        let above = match self.low {
            None => true,
            Some(End::Closed(l)) => v >= l,
            Some(End::Open(l)) => v > l,
        };
        let below = match self.high {
            None => true,
            Some(End::Closed(h)) => v <= h,
            Some(End::Open(h)) => v < h,
        };
        v.is_finite() && above && below
    }

    /// What a value must be: "at least 1", "positive", "≥ 0", "in [0, 1)", "in 1..8 (rounds)",
    /// "below rounds (8)".
    fn wording(&self) -> String {
        use End::{Closed, Open};
        let text = match (self.low, self.high) {
            (None, None) => "finite".into(),
            (Some(Closed(l)), None) if T::INTEGER => format!("at least {l}"),
            (Some(Closed(l)), None) => format!("≥ {l}"),
            (Some(Open(l)), None) if l == T::ZERO => "positive".into(),
            (Some(Open(l)), None) => format!("> {l}"),
            (None, Some(high)) => {
                let (word, h) = match high {
                    Closed(h) => ("at most", h),
                    Open(h) => ("below", h),
                };
                return match self.high_key {
                    Some(key) => format!("{word} {key} ({h})"),
                    None => format!("{word} {h}"),
                };
            }
            (Some(Closed(l)), Some(Open(h))) if T::INTEGER => format!("in {l}..{h}"),
            (Some(Closed(l)), Some(Closed(h))) if T::INTEGER => format!("in {l}..={h}"),
            (Some(low), Some(high)) => {
                let (open, l) = match low {
                    Closed(l) => ('[', l),
                    Open(l) => ('(', l),
                };
                let (close, h) = match high {
                    Closed(h) => (']', h),
                    Open(h) => (')', h),
                };
                format!("in {open}{l}, {h}{close}")
            }
        };
        match self.high_key {
            Some(key) => format!("{text} ({key})"),
            None => text,
        }
    }
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
            Err(ParseFailure::Invalid(p)) => assert_eq!(
                p,
                ["inner.step: unknown key (expected one of: steps, batch_size, lr, optimizer, momentum, weight_decay, \
                  betas, eps, warmup_steps, decay, clip_norm, accumulate, autocast); did you mean `steps`?"]
            ),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    fn invalid(text: &str, base: &Path) -> Vec<String> {
        match JobConfig::parse(text, base) {
            Err(ParseFailure::Invalid(p)) => p,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn a_text_job_takes_its_classes_from_its_labels_and_resolves_the_model_path() {
        let dir = base_with_data();
        let model = dir.path().join("bert");
        std::fs::create_dir(&model).expect("mkdir");
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::write(model.join(f), b"{}").expect("write");
        }
        let cfg = JobConfig::parse(
            "rounds = 3\n[data]\ntrain = \"train.st\"\ntest = \"test.st\"\nlabels = [\"neg\", \"pos\"]\n\
             meta_batch = 8\n[model]\nkind = \"bert\"\npath = \"bert\"\n",
            dir.path(),
        )
        .expect("valid");
        assert_eq!(cfg.data.classes, 2);
        assert_eq!(cfg.data.meta_batch, 8);
        assert!(cfg.model.reads_text());
        let ModelConfig::Bert {
            path, pooling, max_len, ..
        } = &cfg.model
        else {
            panic!("a BERT")
        };
        assert_eq!((path, *pooling, *max_len), (&model, Pooling::Mean, 128));
    }

    #[test]
    fn keys_of_the_other_model_or_data_kind_are_refused_by_name() {
        let dir = base_with_data();
        let problems = invalid(
            "rounds = 3\n[data]\ntest = \"test.st\"\nlabels = [\"a\", \"b\", \"a\"]\nclasses = 2\n\
             [[data.domains]]\nname = \"d\"\nsource = \"train.st\"\nfeature_noise = 1.0\n\
             [model]\nkind = \"bert\"\nhidden = [4]\nmax_len = 2\n",
            dir.path(),
        );
        assert_problems(
            &problems,
            &[
                "model.hidden: `kind = \"bert\"` does not read it",
                "model.path: `kind = \"bert\"` needs a Hugging Face model directory",
                "model.max_len: must be at least 3, got 2",
                "data.classes: 2 classes but 3 labels",
                "data.labels: `a` is given twice",
                "data.domains[0].feature_noise: only applies to dense-feature data",
            ],
        );
        let problems = invalid(
            "rounds = 3\n[data]\ntrain = \"train.st\"\ntest = \"test.st\"\nclasses = 2\nlabels = [\"a\", \"b\"]\n\
             [model]\nkind = \"mlp\"\npath = \"x\"\n",
            dir.path(),
        );
        assert_problems(
            &problems,
            &[
                "model.path: `kind = \"mlp\"` does not read it",
                "data.labels: only a text model (`model.kind = \"bert\"`, or a TorchScript model with a \
                 `tokenizer`) reads labels by name",
            ],
        );
    }

    #[test]
    fn a_torchscript_model_needs_its_file_and_first_order_meta_gradients() {
        let dir = base_with_data();
        std::fs::write(dir.path().join("m.pt"), b"x").expect("write");
        let job = |model: &str, strategy: &str| {
            format!(
                "rounds = 3\n[data]\ntrain = \"train.st\"\ntest = \"test.st\"\nmeta = \"test.st\"\nclasses = 2\n\
                 [model]\nkind = \"torchscript\"\n{model}[strategy]\n{strategy}"
            )
        };
        let problems = invalid(
            &job(
                "hidden = [4]\n",
                "kind = \"domain-weights\"\nmethod = \"hypergradient\"\n",
            ),
            dir.path(),
        );
        assert_problems(
            &problems,
            &[
                "model.hidden: `kind = \"torchscript\"` does not read it",
                "model.path: `kind = \"torchscript\"` needs the module file (`torch.jit.save`)",
                "strategy.directional: a TorchScript model trains first-order only: the exact (double-backward) \
                 meta-gradient is not reliable through the TorchScript executor; set directional = \"finite-difference\"",
            ],
        );
        let problems = invalid(
            &job(
                "path = \"none.pt\"\n",
                "kind = \"loss-rescaling\"\nmode = \"self-taught\"\n",
            ),
            dir.path(),
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("model.path: file ") && problems[0].ends_with("none.pt does not exist"));
        assert!(problems[1].starts_with("strategy.directional: a TorchScript model trains first-order only"));
        // A tokenizer makes it a text model; `max_len` without one tokenizes nothing.
        let problems = invalid(
            &job(
                "path = \"m.pt\"\nmax_len = 16\n",
                "kind = \"domain-weights\"\nmethod = \"doremi\"\nreference_rounds = 1\n",
            ),
            dir.path(),
        );
        assert_problems(&problems, &["model.max_len: `kind = \"torchscript\"` does not read it"]);
        let problems = invalid(
            &job(
                "path = \"m.pt\"\ntokenizer = \"t.json\"\nmax_len = 2\n",
                "kind = \"domain-weights\"\nmethod = \"doremi\"\nreference_rounds = 1\n",
            ),
            dir.path(),
        );
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems.contains(&"model.max_len: must be at least 3, got 2".to_string()));
        assert!(problems
            .iter()
            .any(|p| p.starts_with("model.tokenizer: file ") && p.ends_with("t.json does not exist")));
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("data.labels: a text model needs")),
            "{problems:?}"
        );
        // First-order settings and strategies that need no meta-gradient are fine.
        for strategy in [
            "kind = \"domain-weights\"\nmethod = \"hypergradient\"\ndirectional = \"finite-difference\"\n",
            "kind = \"loss-rescaling\"\nmode = \"clean-meta\"\ndirectional = \"finite-difference\"\n",
            "kind = \"domain-weights\"\nmethod = \"doremi\"\nreference_rounds = 1\n",
            "kind = \"loss-rescaling\"\nmode = \"none\"\n",
        ] {
            let cfg = JobConfig::parse(&job("path = \"m.pt\"\n", strategy), dir.path()).expect(strategy);
            let ModelConfig::TorchScript { path, .. } = &cfg.model else {
                panic!("not torchscript")
            };
            assert_eq!(path, &dir.path().join("m.pt"), "relative to the config");
            assert!(!cfg.model.reads_text());
        }
    }

    /// Asserts that `problems` holds exactly `expected`, in any order.
    fn assert_problems(problems: &[String], expected: &[&str]) {
        let joined = problems.join("\n");
        for e in expected {
            assert!(problems.iter().any(|p| p == e), "missing `{e}` in:\n{joined}");
        }
        assert_eq!(problems.len(), expected.len(), "unexpected problems in:\n{joined}");
    }

    #[test]
    fn structural_and_semantic_problems_are_reported_together() {
        let dir = base_with_data();
        let text = "rounds = 3\nsed = 7\n\
            [data]\ntest = \"test.st\"\n\
            [[data.domains]]\nname = \"a\"\nsource = \"train.st\"\n\
            [[data.domains]]\nname = \"b\"\nsource = \"train.st\"\nlabel_noise = \"high\"\n\
            [inner]\nstep = 5\nlr = -1.0\n";
        let Err(ParseFailure::Invalid(problems)) = JobConfig::parse(text, dir.path()) else {
            panic!("expected Invalid")
        };
        assert_problems(
            &problems,
            &[
                "sed: unknown key (expected one of: seed, rounds, eval_every, data, model, inner, outer, strategy, checkpoint); \
                 did you mean `seed`?",
                "inner.step: unknown key (expected one of: steps, batch_size, lr, optimizer, momentum, \
                 weight_decay, betas, eps, warmup_steps, decay, clip_norm, accumulate, autocast); did you mean `steps`?",
                "data.domains[1].label_noise: wrong type: expected a float, got a string (\"high\")",
                "data.classes: missing (required)",
                "inner.lr: must be positive, got -1",
            ],
        );
    }

    #[test]
    fn config_error_lists_every_problem_with_the_file() {
        let dir = base_with_data();
        let path = dir.path().join("bad.toml");
        std::fs::write(
            &path,
            "rounds = \"three\"\n[data]\ntrain = \"train.st\"\ntest = \"test.st\"\n",
        )
        .expect("write");
        let err = JobConfig::load(&path).expect_err("invalid");
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("config {} has 2 problem(s):", path.display())),
            "{text}"
        );
        assert!(
            text.contains("\n  - rounds: wrong type: expected a non-negative integer, got a string (\"three\")"),
            "{text}"
        );
        assert!(text.contains("\n  - data.classes: missing (required)"), "{text}");
        let missing = JobConfig::load(&dir.path().join("nope.toml")).expect_err("no file");
        assert!(matches!(missing, ConfigError::Read { .. }), "{missing}");
    }

    #[test]
    fn a_syntax_error_is_one_problem_with_its_line() {
        let dir = base_with_data();
        let err = JobConfig::parse("rounds = 3\n[data\ntest = \"test.st\"\n", dir.path());
        match err {
            Err(ParseFailure::Syntax(m)) => assert!(m.contains("line 2"), "{m}"),
            other => panic!("expected a syntax error, got {other:?}"),
        }
    }

    #[test]
    fn checks_that_read_a_broken_key_are_left_out() {
        let dir = base_with_data();
        let head = "[data]\ntrain = \"train.st\"\ntest = \"test.st\"\nclasses = 10\n";
        // A placeholder 0 for `rounds` must not also fail the DoReMi phase check.
        let text = format!("rounds = \"ten\"\n{head}[strategy]\nmethod = \"doremi\"\n");
        let Err(ParseFailure::Invalid(problems)) = JobConfig::parse(&text, dir.path()) else {
            panic!("expected Invalid")
        };
        assert_problems(
            &problems,
            &["rounds: wrong type: expected a non-negative integer, got a string (\"ten\")"],
        );
        let text = format!("rounds = 3\n{head}[strategy]\nmethod = \"hypergrad\"\nlr = 0.0\n");
        let Err(ParseFailure::Invalid(problems)) = JobConfig::parse(&text, dir.path()) else {
            panic!("expected Invalid")
        };
        assert_problems(
            &problems,
            &[
                "strategy.method: unknown value \"hypergrad\" (expected one of: \"uniform\", \"fixed\", \
               \"hypergradient\", \"doremi\"); did you mean \"hypergradient\"?",
            ],
        );
        let text = format!("rounds = -3\n{head}[model]\nkind = \"cnn\"\nhiden = [3]\n[checkpoint]\nkeep = 0\n");
        let Err(ParseFailure::Invalid(problems)) = JobConfig::parse(&text, dir.path()) else {
            panic!("expected Invalid")
        };
        assert_problems(
            &problems,
            &[
                "rounds: out of range: expected a non-negative integer, got -3",
                "model.kind: unknown value \"cnn\" (expected one of: \"mlp\", \"bert\", \"torchscript\")",
                "model.hiden: unknown key (expected one of: kind, hidden, dropout, path, pooling, max_len, tokenizer); did you mean `hidden`?",
                "checkpoint.keep: must be at least 1, got 0",
            ],
        );
        // A finding about a section still counts when only one key inside it is broken.
        let text = "rounds = 3\n[data]\ntest = \"test.st\"\n[outer]\nlr = [0.7]\n";
        let Err(ParseFailure::Invalid(problems)) = JobConfig::parse(text, dir.path()) else {
            panic!("expected Invalid")
        };
        assert_problems(
            &problems,
            &[
                "data.classes: missing (required)",
                "outer.lr: wrong type: expected a float, got an array",
                "data: needs `train` or at least one [[data.domains]]",
            ],
        );
        let text = format!("rounds = 3\n{head}[model]\nhidden = [16]\n");
        let Err(ParseFailure::Invalid(problems)) = JobConfig::parse(&text, dir.path()) else {
            panic!("expected Invalid")
        };
        assert_problems(&problems, &["model.kind: missing (required)"]);
    }

    #[test]
    fn settings_for_another_method_or_without_dropout_are_inconsistent() {
        let dir = base_with_data();
        let head = "rounds = 4\n[data]\ntrain = \"train.st\"\ntest = \"test.st\"\nclasses = 10\n";
        let text = format!("{head}[strategy]\nweights = [1.0]\nreference_rounds = 2\n");
        let Err(ParseFailure::Invalid(problems)) = JobConfig::parse(&text, dir.path()) else {
            panic!("expected Invalid")
        };
        assert_problems(
            &problems,
            &[
                "strategy.weights: only for method = \"fixed\"",
                "strategy.reference_rounds: only for method = \"doremi\"",
            ],
        );
        let text =
            format!("{head}[strategy]\nkind = \"loss-rescaling\"\nfeatures = [\"loss\", \"label-prob-spread\"]\n");
        let Err(ParseFailure::Invalid(problems)) = JobConfig::parse(&text, dir.path()) else {
            panic!("expected Invalid")
        };
        assert_problems(
            &problems,
            &[
                "strategy.features: `label-prob-mean` and `label-prob-spread` sample dropout passes; they need \
               model.dropout > 0",
            ],
        );
        let with_dropout = format!("{text}[model]\nkind = \"mlp\"\ndropout = 0.2\n");
        JobConfig::parse(&with_dropout, dir.path()).expect("valid with dropout");
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
            meta_subset = { start = 0, count = 0 }\n\
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
            "data.meta_subset: needs a meta set",
            "data.meta_subset.count: must be at least 1",
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
    fn int8_deltas_and_their_block_size_are_checked() {
        use crate::proto::DType;
        let dir = base_with_data();
        let head = "rounds = 3\n[data]\ntrain = \"train.st\"\ntest = \"test.st\"\nclasses = 10\n";
        let parse = |outer: &str| JobConfig::parse(&format!("{head}[outer]\n{outer}"), dir.path());
        let wire = |outer: &str| parse(outer).expect("valid").outer.delta_wire_dtype();
        assert_eq!(wire(""), DType::F32);
        assert_eq!(wire("delta_dtype = \"bf16\""), DType::BF16);
        assert_eq!(
            wire("delta_dtype = \"int8\""),
            DType::Int8 {
                block: DEFAULT_DELTA_BLOCK
            }
        );
        assert_eq!(
            wire("delta_dtype = \"int8\"\ndelta_block = 256"),
            DType::Int8 { block: 256 }
        );
        let problems = |outer: &str| match parse(outer) {
            Err(ParseFailure::Invalid(problems)) => problems,
            other => panic!("expected Invalid, got {other:?}"),
        };
        assert_problems(
            &problems("delta_dtype = \"bf16\"\ndelta_block = 64"),
            &["outer.delta_block: only for delta_dtype = \"int8\""],
        );
        assert_problems(
            &problems("delta_dtype = \"int8\"\ndelta_block = 8"),
            &["outer.delta_block: must be in 16..=1048576, got 8"],
        );
    }

    #[test]
    fn the_inner_optimizer_s_settings_are_checked() {
        let dir = base_with_data();
        let head = "rounds = 3\n[data]\ntrain = \"train.st\"\ntest = \"test.st\"\nclasses = 10\n";
        let problems = |inner: &str| match JobConfig::parse(&format!("{head}[inner]\n{inner}"), dir.path()) {
            Err(ParseFailure::Invalid(problems)) => problems,
            other => panic!("expected Invalid, got {other:?}"),
        };
        // The defaults are today's SGD, with no schedule, clipping or accumulation.
        let cfg = JobConfig::parse(head, dir.path()).expect("valid");
        let i = &cfg.inner;
        assert_eq!(i.optimizer, InnerOptimizerKind::Sgd);
        assert_eq!((i.momentum(), i.weight_decay, i.warmup_steps), (0.9, 0.0, 0));
        assert_eq!((i.decay, i.clip_norm, i.accumulate), (LrDecayKind::None, None, 1));
        assert_eq!((i.betas(), i.eps()), ((0.9, 0.999), 1e-8));
        assert_eq!(cfg.strategy.virtual_lr, None);
        let adamw = "optimizer = \"adamw\"\nlr = 5e-5\nbetas = [0.9, 0.98]\nweight_decay = 0.01\n\
                     warmup_steps = 6\ndecay = \"linear\"\nclip_norm = 1.0\naccumulate = 4\n";
        let cfg = JobConfig::parse(&format!("{head}[inner]\n{adamw}"), dir.path()).expect("valid AdamW");
        assert_eq!(cfg.inner.optimizer, InnerOptimizerKind::AdamW);
        assert_eq!((cfg.inner.betas(), cfg.inner.eps()), ((0.9, 0.98), 1e-8));
        assert_eq!((i.autocast, cfg.inner.autocast), (Autocast::None, Autocast::None));
        let bf16 = JobConfig::parse(&format!("{head}[inner]\nautocast = \"bf16\"\n"), dir.path()).expect("bf16");
        assert_eq!(bf16.inner.autocast, Autocast::Bf16);
        match JobConfig::parse(&format!("{head}[inner]\nautocast = \"fp16\"\n"), dir.path()) {
            Err(e) => {
                let e = format!("{e:?}");
                assert!(e.contains("fp16") && e.contains("bf16"), "{e}");
            }
            Ok(_) => panic!("autocast = \"fp16\" was accepted"),
        }
        assert_problems(
            &problems("betas = [0.9, 0.999]\neps = 1e-6\n"),
            &[
                "inner.betas: only for optimizer = \"adamw\"",
                "inner.eps: only for optimizer = \"adamw\"",
            ],
        );
        assert_problems(
            &problems("optimizer = \"adamw\"\nmomentum = 0.9\nbetas = [1.0, -0.1]\neps = 0.0\n"),
            &[
                "inner.momentum: only for optimizer = \"sgd\" (AdamW's moments are set by `betas`)",
                "inner.betas[0]: must be in [0, 1), got 1",
                "inner.betas[1]: must be in [0, 1), got -0.1",
                "inner.eps: must be positive, got 0",
            ],
        );
        assert_problems(
            &problems("optimizer = \"adamw\"\nbetas = [0.9]\n"),
            &["inner.betas: needs two values [β1, β2], got 1"],
        );
        assert_problems(
            &problems("steps = 5\nbatch_size = 4\nwarmup_steps = 16\nclip_norm = 0.0\naccumulate = 5\n"),
            &[
                "inner.warmup_steps: must be at most the job's inner steps, rounds × inner.steps (15), got 16",
                "inner.clip_norm: must be positive, got 0",
                "inner.accumulate: must be at most inner.batch_size (4): every micro-batch needs a row, got 5",
            ],
        );
        assert_problems(
            &problems("steps = 5\nwarmup_steps = 15\ndecay = \"linear\"\naccumulate = 0\n"),
            &[
                "inner.warmup_steps: with decay = \"linear\" must be below rounds × inner.steps (15): nothing would \
                 decay",
                "inner.accumulate: must be at least 1, got 0",
            ],
        );
        JobConfig::parse(&format!("{head}[inner]\nsteps = 5\nwarmup_steps = 15\n"), dir.path())
            .expect("a warmup over the whole job without decay");
        // The virtual step's size: loss rescaling's alone.
        let stray = format!("{head}[strategy]\nvirtual_lr = 0.1\n");
        let Err(ParseFailure::Invalid(problems)) = JobConfig::parse(&stray, dir.path()) else {
            panic!("expected Invalid")
        };
        assert_problems(
            &problems,
            &["strategy.virtual_lr: only for kind = \"loss-rescaling\" (the only virtual step)"],
        );
        let rescaling = format!("{head}[strategy]\nkind = \"loss-rescaling\"\nmode = \"self-taught\"\n");
        let Err(ParseFailure::Invalid(problems)) =
            JobConfig::parse(&format!("{rescaling}virtual_lr = -1.0\n"), dir.path())
        else {
            panic!("expected Invalid")
        };
        assert_problems(&problems, &["strategy.virtual_lr: must be positive, got -1"]);
        let cfg = JobConfig::parse(&format!("{rescaling}virtual_lr = 0.05\n"), dir.path()).expect("valid");
        assert_eq!(cfg.strategy.virtual_lr, Some(0.05));
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
    fn every_range_shape_has_its_wording() {
        let dir = base_with_data();
        let head = "[data]\ntrain = \"train.st\"\ntest = \"test.st\"\nclasses = 10\n";
        let text = format!(
            "rounds = 3\n{head}[strategy]\nmethod = \"doremi\"\nreference_rounds = 3\neta = nan\n\
             [inner]\nsteps = 0\nmomentum = 1.0\nweight_decay = inf\n"
        );
        let Err(ParseFailure::Invalid(problems)) = JobConfig::parse(&text, dir.path()) else {
            panic!("expected Invalid")
        };
        assert_eq!(
            problems,
            [
                "strategy.reference_rounds: must be in 1..3 (rounds), got 3",
                "strategy.eta: must be positive, got NaN",
                "inner.steps: must be at least 1, got 0",
                "inner.momentum: must be in [0, 1), got 1",
                "inner.weight_decay: must be ≥ 0, got inf",
            ]
        );
        let text = format!("rounds = 4\n{head}meta = \"test.st\"\nshards = 1\n[strategy]\nkind = \"task-policy\"\nepsilon = -0.5\nfinetune_rounds = 4\n");
        let Err(ParseFailure::Invalid(problems)) = JobConfig::parse(&text, dir.path()) else {
            panic!("expected Invalid")
        };
        assert_eq!(
            problems,
            [
                "strategy.epsilon: must be in [0, 1], got -0.5",
                "strategy.finetune_rounds: must be below rounds (4), got 4",
            ]
        );
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
