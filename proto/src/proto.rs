//! The wire protocol, and the only place that knows it: message types, framing, the version
//! handshake, size limits and the tensor codec. Pure encode/decode; `net` moves the bytes.
//!
//! * Control frames: `u32` little-endian body length, then a postcard body; at most
//!   [`MAX_FRAME_BYTES`]. They travel on one long-lived bidirectional stream per worker.
//! * Tensor bundles: each on its own unidirectional stream: one control-style frame holding a
//!   [`BundleHeader`] (transfer id, names, dtypes, shapes), then the raw little-endian bytes of
//!   every tensor back to back, then the end of the stream.

use crate::tensor::{Bundle, HostTensor};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// ALPN protocol id: the protocol name and its major version. A peer speaking another major
/// version fails the TLS handshake itself.
pub const ALPN: &[u8] = b"metaloop/1";
/// Version carried in the hello; checked on both sides after ALPN agreed.
/// 2: `JobSpec::delta_dtype` and bf16 tensors. 3: one `Ask` and one `Signal` per strategy.
/// 4: `InnerSpec`'s optimizer (SGD or AdamW), learning-rate schedule, clipping, gradient
/// accumulation and virtual step size. 5: BERT models and text data (`ModelSpec::Bert`,
/// `JobSpec::text`, a domain's label names and token noise) and the meta batch.
/// 6: `InnerSpec::autocast`. 7: int8 deltas (`DType::Int8`) and the meta set's row subset
/// (`DataRef::subset`). 8: TorchScript models (`ModelSpec::TorchScript`, `CoordinatorMsg::ModulePart`).
pub const PROTOCOL_VERSION: u32 = 8;
/// Hard limit on one control frame. Control messages are small; anything big is a bundle.
pub const MAX_FRAME_BYTES: usize = 1 << 20;
/// Hard limit on one tensor bundle's payload (16 GiB): larger than any model we ship, small
/// enough that a lying header cannot make us reserve absurd memory before data arrives.
pub const MAX_BUNDLE_BYTES: u64 = 16 << 30;
/// Most tensors in one bundle and most dimensions in one tensor.
pub const MAX_BUNDLE_TENSORS: usize = 4096;
pub const MAX_RANK: usize = 8;

/// Errors from decoding bytes a peer sent. Each names what was wrong.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtoError {
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge { len: usize, limit: usize },
    #[error("truncated frame: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("undecodable {what}: {reason}")]
    Decode { what: &'static str, reason: String },
    #[error("{extra} or more unexpected trailing bytes after {what}")]
    Trailing { what: &'static str, extra: usize },
    #[error("tensor `{name}`: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("bundle payload of {len} bytes exceeds the limit of {limit} bytes")]
    BundleTooLarge { len: u64, limit: u64 },
    #[error("protocol version mismatch: we speak {ours}, peer speaks {theirs}")]
    VersionMismatch { ours: u32, theirs: u32 },
    /// A bundle header that is well-formed but not what this stream carries (another model's
    /// tensors, another dtype, a lying shape): refused before any of its payload is read.
    #[error("bundle {transfer}: {reason}")]
    UnexpectedLayout { transfer: u64, reason: String },
}

impl ProtoError {
    /// A short label for metrics and summaries (bounded: one per variant).
    pub fn reason(&self) -> &'static str {
        match self {
            ProtoError::FrameTooLarge { .. } => "frame_too_large",
            ProtoError::Truncated { .. } => "truncated",
            ProtoError::Decode { .. } => "undecodable",
            ProtoError::Trailing { .. } => "trailing_bytes",
            ProtoError::BadTensor { .. } => "bad_tensor",
            ProtoError::BundleTooLarge { .. } => "bundle_too_large",
            ProtoError::VersionMismatch { .. } => "version_mismatch",
            ProtoError::UnexpectedLayout { .. } => "unexpected_layout",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Messages

/// Worker → coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerMsg {
    Hello(Hello),
    /// An assignment finished; its delta arrives as bundle `delta_transfer`.
    Result(AssignmentResult),
    /// An assignment could not be run (for example the model checksum did not match).
    Failed {
        round: u64,
        assignment: u32,
        reason: String,
    },
}

/// Coordinator → worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CoordinatorMsg {
    Welcome(Box<Welcome>),
    /// Bytes `offset..offset + bytes.len()` of the job's TorchScript module file, sent in
    /// order right after the welcome of a job with a TorchScript model (each part well under
    /// the frame limit); the worker checks the whole file against the spec's size and sha256.
    ModulePart {
        offset: u64,
        bytes: Vec<u8>,
    },
    Reject {
        reason: String,
    },
    Round(RoundPlan),
    /// Leave this job. `finished`: the job is done, exit; otherwise the coordinator is stopping
    /// (a signal, a restart) and may come back: keep trying to reconnect.
    Shutdown {
        reason: String,
        finished: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    /// Free-form name for logs (host name, pod name).
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol_version: u32,
    pub worker_id: u64,
    pub job: JobSpec,
}

/// What a worker needs to know about the job, once, at join.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub seed: u64,
    pub model: ModelSpec,
    /// Training domains, built by the worker from these specs and checked against the checksums.
    pub domains: Vec<DomainSpec>,
    /// The meta set, when the job has one.
    pub meta: Option<DataRef>,
    pub shards: u32,
    pub inner: InnerSpec,
    /// How workers encode their deltas.
    pub delta_dtype: DType,
    /// Text data: how every data file is read and tokenized (`None`: dense features).
    pub text: Option<TextSpec>,
    /// Meta-set rows each assignment samples (seeded by it); 0: the whole meta set.
    pub meta_batch: u32,
}

/// How a text job's files are read and tokenized, the same on every machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextSpec {
    /// The model directory's `tokenizer.json`.
    pub tokenizer: String,
    pub max_len: u32,
    /// Class i is `labels[i]`.
    pub labels: Vec<String>,
    pub text_column: String,
    pub label_column: String,
}

/// A training domain: a file as the worker should open it, plus its seeded transforms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainSpec {
    pub name: String,
    pub source: String,
    /// (start, count) rows of the source.
    pub subset: Option<(u64, u64)>,
    pub label_noise: f64,
    pub permute_labels: bool,
    pub feature_noise: f64,
    pub permute_features: bool,
    /// Text: the domain's own label names (class i is `labels[i]`).
    pub labels: Option<Vec<String>>,
    pub token_noise: f64,
    /// Checksum of the built domain on the coordinator.
    pub checksum: [u8; 32],
}

/// A data file (or rows `start..start + count` of it) and the checksum of those rows on the
/// coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataRef {
    pub path: String,
    /// `(start, count)`; `None`: every row.
    pub subset: Option<(u64, u64)>,
    pub checksum: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ModelSpec {
    /// `dropout` is the drop probability after every hidden layer, in train mode only.
    Mlp {
        inputs: u32,
        hidden: Vec<u32>,
        classes: u32,
        dropout: f32,
    },
    /// A BERT-family encoder with a linear head to `classes`; the parameters (the pretrained
    /// encoder's and the seeded head's) arrive with the model, so a worker needs only the
    /// architecture.
    Bert {
        /// The model's `config.json`, as text.
        config: String,
        /// Pooling by the `[CLS]` token (true) or the mean over attended tokens (false).
        cls: bool,
        /// Whether the `[CLS]` state goes through the encoder's pooler (whose parameters are
        /// then among the model's).
        pooler: bool,
        classes: u32,
    },
    /// A user's TorchScript module (its `forward` takes the batch's inputs and returns logits
    /// `[n, classes]`), trained by parameter name. The file travels apart from the spec: on the
    /// coordinator `module` holds it; a worker receives it as `CoordinatorMsg::ModulePart`s
    /// after the welcome and checks it against `size` and `sha256`.
    TorchScript {
        sha256: [u8; 32],
        size: u64,
        /// The module's parameters (name and shape) in its `named_parameters` order.
        layout: Vec<(String, Vec<u32>)>,
        classes: u32,
        #[serde(skip)]
        module: ModuleBytes,
    },
}

/// Most bytes a TorchScript module file may have (a worker holds it in memory).
pub const MAX_MODULE_BYTES: u64 = 8 << 30;
/// Bytes per `CoordinatorMsg::ModulePart`.
pub const MODULE_PART_BYTES: usize = 512 << 10;

/// A TorchScript module file held in memory, shared without copies; not part of the wire
/// form or of a spec's equality (the spec's sha256 names the content).
#[derive(Clone, Default)]
pub struct ModuleBytes(pub Option<std::sync::Arc<[u8]>>);

impl std::fmt::Debug for ModuleBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(b) => write!(f, "ModuleBytes({} bytes)", b.len()),
            None => f.write_str("ModuleBytes(not received)"),
        }
    }
}

impl PartialEq for ModuleBytes {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Collects a module file from its `ModulePart`s, in order, and checks it against the spec.
#[derive(Debug)]
pub struct ModuleReceiver {
    sha256: [u8; 32],
    size: u64,
    bytes: Vec<u8>,
}

impl ModuleReceiver {
    /// A receiver for the module a spec names; `Err` when its announced size is past
    /// [`MAX_MODULE_BYTES`]. Nothing is reserved up front: a lying size costs nothing.
    pub fn new(sha256: [u8; 32], size: u64) -> Result<Self, ProtoError> {
        if size > MAX_MODULE_BYTES {
            return Err(ProtoError::Decode {
                what: "TorchScript module",
                reason: format!("announced size {size} exceeds the limit of {MAX_MODULE_BYTES} bytes"),
            });
        }
        Ok(ModuleReceiver {
            sha256,
            size,
            bytes: Vec::new(),
        })
    }

    /// Adds the next part; `Ok(Some(file))` once the whole file is in and matches the sha256.
    ///
    /// # Errors
    /// A part out of order or past the announced size, or a whole file whose sha256 differs.
    pub fn part(&mut self, offset: u64, part: &[u8]) -> Result<Option<std::sync::Arc<[u8]>>, ProtoError> {
        let bad = |reason: String| ProtoError::Decode {
            what: "TorchScript module",
            reason,
        };
        let have = self.bytes.len() as u64;
        if offset != have {
            return Err(bad(format!("part at offset {offset}, expected {have}")));
        }
        if part.is_empty() || have + part.len() as u64 > self.size {
            return Err(bad(format!(
                "part of {} bytes at {offset} does not fit the announced {} bytes",
                part.len(),
                self.size
            )));
        }
        self.bytes.extend_from_slice(part);
        if (self.bytes.len() as u64) < self.size {
            return Ok(None);
        }
        let got: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&self.bytes).into();
        if got != self.sha256 {
            return Err(bad(format!(
                "the received file's sha256 {} is not the announced {}",
                crate::checksum::hex(&got),
                crate::checksum::hex(&self.sha256)
            )));
        }
        Ok(Some(std::mem::take(&mut self.bytes).into()))
    }
}

impl ModelSpec {
    /// Classes the model's head predicts.
    pub fn classes(&self) -> u32 {
        match self {
            ModelSpec::Mlp { classes, .. }
            | ModelSpec::Bert { classes, .. }
            | ModelSpec::TorchScript { classes, .. } => *classes,
        }
    }
}

/// The workers' inner optimizer (docs/algorithms.md §2), with fresh state for every
/// assignment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InnerSpec {
    pub batch_size: u32,
    /// The base learning rate: the schedule's peak.
    pub lr: f64,
    /// SGD's momentum (AdamW ignores it).
    pub momentum: f64,
    /// SGD: coupled (wd·θ added to the gradient); AdamW: decoupled (θ ← θ − lr·wd·θ).
    pub weight_decay: f64,
    pub optimizer: InnerOptimizer,
    /// The learning rate at every inner step of the job.
    pub schedule: LrSchedule,
    /// Global gradient-norm clipping to this norm (as `torch.nn.utils.clip_grad_norm_`).
    pub clip_norm: Option<f64>,
    /// Micro-batches per inner step (gradient accumulation); 1: the whole batch at once.
    pub accumulate: u32,
    /// The step size of a virtual inner step (loss rescaling's θ' = θ − α∇θ, always plain
    /// SGD); `None`: `lr`.
    pub virtual_lr: Option<f64>,
    /// The precision of the model's forward passes on the workers.
    pub autocast: Autocast,
}

impl InnerSpec {
    /// The virtual step size α (docs/algorithms.md §5).
    pub fn virtual_lr(&self) -> f64 {
        self.virtual_lr.unwrap_or(self.lr)
    }
}

impl Default for InnerSpec {
    /// The config's defaults: SGD, batch 32, lr 0.05, momentum 0.9, a constant learning rate
    /// over 20 steps a round, no clipping, no accumulation.
    fn default() -> Self {
        Self {
            batch_size: 32,
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 0.0,
            optimizer: InnerOptimizer::Sgd,
            schedule: LrSchedule::constant(20),
            clip_norm: None,
            accumulate: 1,
            virtual_lr: None,
            autocast: Autocast::None,
        }
    }
}

/// Which inner optimizer, with the settings only it has.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum InnerOptimizer {
    /// `torch.optim.SGD` with momentum and coupled weight decay.
    Sgd,
    /// `torch.optim.AdamW`: bias-corrected moments, decoupled weight decay.
    AdamW { beta1: f64, beta2: f64, eps: f64 },
}

/// The learning rate as a pure function of the job's global inner step
/// s = round × steps_per_round + j: HF transformers' schedules (`get_constant_schedule_with_warmup`,
/// `get_linear_schedule_with_warmup`), lr_s = lr · f(s) with f(s) = s / warmup while
/// s < warmup, then 1 (`None`) or (total − s) / (total − warmup) down to 0 (`Linear`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// `inner.steps`: the global step of an assignment's j-th step is round × this + j.
    pub steps_per_round: u32,
    /// rounds × steps_per_round: where `Linear` reaches 0.
    pub total_steps: u64,
    pub warmup_steps: u64,
    pub decay: LrDecay,
}

/// Autocast of the workers' forward passes (`[inner] autocast`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Autocast {
    /// Every op in the parameters' dtype (f32).
    #[default]
    None,
    /// bf16 autocast: matrix products in bf16; parameters, gradients, optimizer state and
    /// deltas stay f32 (`torch.autocast(dtype=torch.bfloat16)` around the forward).
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LrDecay {
    None,
    Linear,
}

impl LrSchedule {
    /// The base learning rate at every step.
    pub fn constant(steps_per_round: u32) -> Self {
        Self {
            steps_per_round,
            total_steps: 0,
            warmup_steps: 0,
            decay: LrDecay::None,
        }
    }

    /// The job's global step index of the `j`-th inner step of an assignment of `round`.
    pub fn global_step(&self, round: u64, j: u32) -> u64 {
        round
            .saturating_mul(u64::from(self.steps_per_round))
            .saturating_add(u64::from(j))
    }

    /// The factor f(s) on the base learning rate at global step `s`, in [0, 1] (computed in
    /// f64 as transformers' Python does).
    pub fn factor(&self, s: u64) -> f64 {
        if s < self.warmup_steps {
            return s as f64 / self.warmup_steps.max(1) as f64;
        }
        match self.decay {
            LrDecay::None => 1.0,
            LrDecay::Linear => {
                let left = self.total_steps.saturating_sub(s) as f64;
                (left / self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64).max(0.0)
            }
        }
    }

    /// The learning rate of the `j`-th inner step of an assignment of `round`: `lr` itself, bit
    /// for bit, without warmup or decay.
    pub fn lr(&self, lr: f64, round: u64, j: u32) -> f64 {
        if self.warmup_steps == 0 && self.decay == LrDecay::None {
            return lr;
        }
        lr * self.factor(self.global_step(round, j))
    }
}

/// One round for one worker: how to get the current model, and what to run on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundPlan {
    pub round: u64,
    pub model: ModelSource,
    /// The inner loss weight of every domain, in job order (mean 1).
    pub domain_weights: Vec<f64>,
    /// What the round's outer strategy asks of every assignment after its inner steps.
    pub ask: Ask,
    pub assignments: Vec<Assignment>,
}

/// What an outer strategy asks of every assignment of a round besides its inner steps (one
/// variant per strategy that needs a signal; the answer is the [`Signal`] variant of the same
/// name). Every assignment also returns the meta loss when the job has a meta set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Ask {
    /// Inner steps only (uniform or fixed domain weights; DoReMi's reference phase).
    Nothing,
    /// d_k = ⟨∇ℓ_k, ∇L_meta⟩ per domain after the inner steps (docs/algorithms.md §3).
    Hypergradient(HypergradientSpec),
    /// Every domain's per-sample losses after the inner steps on a probe of this many rows of
    /// its shard (DoReMi's excess loss is computed from them, docs/algorithms.md §4).
    Doremi { probe: u32 },
    /// Weight every sample's loss by Ω and return Ω's meta-gradient (docs/algorithms.md §5).
    LossRescaling(RescalerPlan),
    /// Measure the meta loss on these rows of the meta set only: the target batch every
    /// assignment of a task-policy round shares (docs/algorithms.md §6).
    TaskPolicy { target_rows: Vec<u32> },
}

impl Ask {
    /// The [`Signal`] variant that answers this ask.
    pub fn answered_by(&self, signal: &Signal) -> bool {
        matches!(
            (self, signal),
            (Ask::Nothing | Ask::TaskPolicy { .. }, Signal::Nothing)
                | (Ask::Hypergradient(_), Signal::Hypergradient(_))
                | (Ask::Doremi { .. }, Signal::Doremi(_))
                | (Ask::LossRescaling(_), Signal::LossRescaling(_))
        )
    }
}

/// What an assignment returns for its round's [`Ask`], beside the delta and the meta loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Signal {
    /// For [`Ask::Nothing`] and [`Ask::TaskPolicy`] (whose signal is the meta loss).
    Nothing,
    /// Per domain, in job order: Σ c_i over its probe.
    Hypergradient(Vec<DomainStat>),
    /// Per domain, in job order: probe rows and their losses.
    Doremi(Vec<DomainProbe>),
    /// Ω's meta-gradient, tensor by tensor in Ω's order.
    LossRescaling(Vec<SmallTensor>),
}

/// A tensor small enough to travel inside a control frame (the rescaler network, its gradient).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SmallTensor {
    pub name: String,
    pub shape: Vec<u32>,
    pub data: Vec<f32>,
}

impl SmallTensor {
    /// A bundle's tensors, in order.
    pub fn from_bundle(bundle: Bundle) -> Vec<SmallTensor> {
        bundle
            .tensors
            .into_iter()
            .map(|t| SmallTensor {
                name: t.name,
                shape: t.shape.iter().map(|&d| d as u32).collect(),
                data: t.data,
            })
            .collect()
    }

    /// Small tensors as a bundle.
    pub fn to_bundle(tensors: &[SmallTensor]) -> Bundle {
        Bundle {
            tensors: tensors
                .iter()
                .map(|t| HostTensor {
                    name: t.name.clone(),
                    shape: t.shape.iter().map(|&d| d as usize).collect(),
                    data: t.data.clone(),
                })
                .collect(),
        }
    }
}

/// Meta loss rescaling for one round (docs/algorithms.md §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RescalerPlan {
    pub mode: RescaleMode,
    /// Ω's parameters (an MLP from features to one logit; weight = sigmoid).
    pub omega: Vec<SmallTensor>,
    /// Feature codes (`features::Feature::code`), in Ω's input order.
    pub features: Vec<u8>,
    /// Normalise Ω's weights to mean 1 within each training batch (the collapse guard).
    pub normalize: bool,
    pub directional: DirectionalMethod,
    /// Fraction of the run done, for the `progress` feature.
    pub progress: f32,
    /// Stochastic forward passes G for the `label-prob-mean`/`-spread` features.
    pub passes: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RescaleMode {
    /// L_val on the trusted meta set (Meta-Weight-Net).
    CleanMeta,
    /// L_val on a batch of the noisy training data, weighted by Ω and normalised.
    SelfTaught,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HypergradientSpec {
    pub directional: DirectionalMethod,
    /// Samples per domain on which d_k is measured.
    pub probe: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirectionalMethod {
    Exact,
    FiniteDifference,
}

/// How the worker obtains model version `version` (identified by `checksum`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ModelSource {
    /// The full parameters arrive as bundle `transfer`.
    Full {
        version: u64,
        checksum: [u8; 32],
        transfer: u64,
    },
    /// Add bundle `transfer` (the exact update the coordinator applied) to version `base`.
    Step {
        base: u64,
        version: u64,
        checksum: [u8; 32],
        transfer: u64,
    },
    /// The worker already holds this version.
    Unchanged { version: u64, checksum: [u8; 32] },
}

/// An assignment is fully determined by (job seed, round, index): same inputs, same result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub index: u32,
    pub shard: u32,
    pub steps: u32,
    pub seed: u64,
    pub data: TrainOn,
}

/// The data an assignment's inner steps train on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrainOn {
    /// Its shard of every domain, the losses weighted by the plan's domain weights.
    Mixture,
    /// One domain alone, all of it (a source task of the task policy).
    Domain(u32),
    /// The meta set (the task policy's target: its evaluation, with 0 steps, and fine-tuning).
    Meta,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssignmentResult {
    pub round: u64,
    pub assignment: u32,
    pub delta_transfer: u64,
    /// Mean (weighted) training loss over the inner steps.
    pub train_loss: f32,
    pub samples: u64,
    pub compute_seconds: f32,
    /// Loss on the meta set after the inner steps, when the job has one.
    pub meta_loss: Option<f32>,
    /// The answer to the round's [`Ask`].
    pub signal: Signal,
}

impl AssignmentResult {
    /// A result of assignment `assignment` of `round` with delta `delta_transfer`, nothing
    /// measured yet: set the other fields with struct update syntax or by assignment.
    pub fn new(round: u64, assignment: u32, delta_transfer: u64) -> Self {
        Self {
            round,
            assignment,
            delta_transfer,
            train_loss: 0.0,
            samples: 0,
            compute_seconds: 0.0,
            meta_loss: None,
            signal: Signal::Nothing,
        }
    }
}

/// Losses of the current model on some rows of one domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainProbe {
    pub rows: Vec<u32>,
    pub losses: Vec<f32>,
}

/// One domain's contribution to the hypergradient: Σ c_i over `count` probe samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DomainStat {
    pub d_sum: f64,
    pub count: u64,
}

// ---------------------------------------------------------------------------------------------
// Framing

/// Encodes one control frame: length prefix plus postcard body.
///
/// # Errors
/// `FrameTooLarge` when the body exceeds [`MAX_FRAME_BYTES`].
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtoError> {
    let mut out = vec![0u8; 4];
    out = postcard::to_extend(msg, out).map_err(|e| ProtoError::Decode {
        what: "outgoing frame",
        reason: e.to_string(),
    })?;
    let len = out.len() - 4;
    if len > MAX_FRAME_BYTES {
        return Err(ProtoError::FrameTooLarge {
            len,
            limit: MAX_FRAME_BYTES,
        });
    }
    out[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

/// Reads a length prefix and checks it against the limit before anything is allocated.
///
/// # Errors
/// `FrameTooLarge`.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, ProtoError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(ProtoError::FrameTooLarge {
            len,
            limit: MAX_FRAME_BYTES,
        });
    }
    Ok(len)
}

/// Decodes a frame body (without its prefix); the whole body must be one message.
///
/// # Errors
/// `Decode` or `Trailing`.
pub fn decode_body<T: DeserializeOwned>(what: &'static str, body: &[u8]) -> Result<T, ProtoError> {
    let (msg, rest) = postcard::take_from_bytes(body).map_err(|e| ProtoError::Decode {
        what,
        reason: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(ProtoError::Trailing {
            what,
            extra: rest.len(),
        });
    }
    Ok(msg)
}

/// Decodes one complete frame from the front of `bytes`; returns it and the bytes consumed.
///
/// # Errors
/// `Truncated`, `FrameTooLarge`, `Decode`, `Trailing`.
pub fn decode_frame<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<(T, usize), ProtoError> {
    let prefix: [u8; 4] = bytes
        .get(..4)
        .and_then(|p| p.try_into().ok())
        .ok_or(ProtoError::Truncated {
            need: 4,
            have: bytes.len(),
        })?;
    let len = frame_len(prefix)?;
    let body = bytes.get(4..4 + len).ok_or(ProtoError::Truncated {
        need: 4 + len,
        have: bytes.len(),
    })?;
    Ok((decode_body(what, body)?, 4 + len))
}

/// Checks the peer's hello version against ours.
///
/// # Errors
/// `VersionMismatch`.
pub fn check_version(theirs: u32) -> Result<(), ProtoError> {
    if theirs == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(ProtoError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor codec

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DType {
    F32,
    /// bfloat16: the top half of an f32, rounded to nearest even (workers' deltas, when the
    /// job compresses them); decoded back to f32.
    BF16,
    /// Blockwise absmax int8 (workers' deltas): each run of `block` values (the last may be
    /// shorter) has the scale s = max|x| / 127 and the values round(x / s) in [−127, 127]; the
    /// tensor's payload is every block's scale (f32) first, then every value (one byte). Decoded
    /// as q·s. A block with a non-finite value has the scale NaN, so it decodes to NaN and the
    /// receiver's finiteness check refuses it, as it would the f32 value.
    Int8 {
        block: u32,
    },
}

impl DType {
    /// Payload bytes of `n` values, or `None` on overflow or a zero block size.
    pub fn payload_bytes(self, n: u64) -> Option<u64> {
        match self {
            DType::F32 => n.checked_mul(4),
            DType::BF16 => n.checked_mul(2),
            DType::Int8 { block: 0 } => None,
            DType::Int8 { block } => n.div_ceil(u64::from(block)).checked_mul(4)?.checked_add(n),
        }
    }
}

/// The scale and values of one int8 block ([`DType::Int8`]).
fn quantize_block(xs: &[f32], out: &mut Vec<u8>) -> f32 {
    let mut absmax = 0.0f32;
    for &x in xs {
        if !x.is_finite() {
            out.extend(std::iter::repeat_n(0u8, xs.len()));
            return f32::NAN;
        }
        absmax = absmax.max(x.abs());
    }
    let scale = absmax / 127.0;
    for &x in xs {
        #[allow(clippy::cast_possible_truncation)]
        let q = if scale == 0.0 {
            0
        } else {
            (x / scale).round().clamp(-127.0, 127.0) as i8
        };
        out.push(q.to_le_bytes()[0]);
    }
    scale
}

/// `v` rounded to the nearest bfloat16 (ties to even), as its bits; NaN stays NaN.
pub fn bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        return ((bits >> 16) as u16) | 0x40;
    }
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    (rounded >> 16) as u16
}

/// The f32 a bfloat16 stands for (exact).
pub fn bf16_value(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorMeta {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
}

/// First frame of a bundle stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleHeader {
    pub transfer: u64,
    pub tensors: Vec<TensorMeta>,
}

impl BundleHeader {
    pub fn for_bundle(transfer: u64, bundle: &Bundle) -> Self {
        Self::for_bundle_as(transfer, bundle, DType::F32)
    }

    /// The header of `bundle` sent as `dtype`.
    pub fn for_bundle_as(transfer: u64, bundle: &Bundle, dtype: DType) -> Self {
        BundleHeader {
            transfer,
            tensors: bundle
                .tensors
                .iter()
                .map(|t| TensorMeta {
                    name: t.name.clone(),
                    dtype,
                    shape: t.shape.iter().map(|&d| d as u64).collect(),
                })
                .collect(),
        }
    }

    /// Byte count of the payload the header announces, checked for overflow and limits.
    ///
    /// # Errors
    /// `BadTensor` for an absurd shape, `BundleTooLarge` past [`MAX_BUNDLE_BYTES`].
    pub fn payload_len(&self) -> Result<u64, ProtoError> {
        if self.tensors.len() > MAX_BUNDLE_TENSORS {
            return Err(ProtoError::BadTensor {
                name: format!("<{} tensors>", self.tensors.len()),
                reason: format!("more than {MAX_BUNDLE_TENSORS} tensors in one bundle"),
            });
        }
        let mut total: u64 = 0;
        for t in &self.tensors {
            let bad = |reason: String| ProtoError::BadTensor {
                name: t.name.clone(),
                reason,
            };
            if t.shape.len() > MAX_RANK {
                return Err(bad(format!("rank {} exceeds {MAX_RANK}", t.shape.len())));
            }
            // Every dimension must be possible on its own, even beside a zero that makes the
            // tensor empty: code downstream (libtorch) takes dimensions as i64.
            if let Some(d) = t.shape.iter().find(|&&d| d > MAX_BUNDLE_BYTES) {
                return Err(bad(format!("dimension {d} exceeds {MAX_BUNDLE_BYTES}")));
            }
            if t.dtype == (DType::Int8 { block: 0 }) {
                return Err(bad("int8 block size 0".into()));
            }
            let bytes = t
                .shape
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .and_then(|n| t.dtype.payload_bytes(n))
                .ok_or_else(|| bad(format!("shape {:?} overflows", t.shape)))?;
            total = total
                .checked_add(bytes)
                .ok_or_else(|| bad("bundle size overflows".into()))?;
            if total > MAX_BUNDLE_BYTES {
                return Err(ProtoError::BundleTooLarge {
                    len: total,
                    limit: MAX_BUNDLE_BYTES,
                });
            }
        }
        Ok(total)
    }
}

/// What a receiver expects on a bundle stream: every tensor's name, dtype and shape, in order.
/// A header is checked against it before anything is allocated for the payload, so a peer
/// cannot make the receiver reserve memory for a shape it made up (the coordinator expects a
/// delta of the model's layout in the job's delta dtype; a worker expects the model in f32).
#[derive(Debug, Clone, PartialEq)]
pub struct BundleLayout {
    tensors: Vec<TensorMeta>,
}

impl BundleLayout {
    /// The layout of `bundle` sent as `dtype`.
    pub fn of(bundle: &Bundle, dtype: DType) -> Self {
        Self {
            tensors: BundleHeader::for_bundle_as(0, bundle, dtype).tensors,
        }
    }

    /// The layout of tensors with these names and shapes, in this order, sent as `dtype`.
    pub fn from_shapes(shapes: &[(String, Vec<usize>)], dtype: DType) -> Self {
        Self {
            tensors: shapes
                .iter()
                .map(|(name, shape)| TensorMeta {
                    name: name.clone(),
                    dtype,
                    shape: shape.iter().map(|&d| d as u64).collect(),
                })
                .collect(),
        }
    }

    /// Bytes the tensors take once decoded (f32 in memory, whatever the wire dtype).
    pub fn decoded_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.shape.iter().fold(4u64, |acc, &d| acc.saturating_mul(d)))
            .fold(0u64, u64::saturating_add)
    }

    /// Checks that `header` announces exactly this layout.
    ///
    /// # Errors
    /// `UnexpectedLayout` naming the first tensor that differs (its name, dtype or shape) or
    /// the tensor count.
    pub fn check(&self, header: &BundleHeader) -> Result<(), ProtoError> {
        let refuse = |reason: String| ProtoError::UnexpectedLayout {
            transfer: header.transfer,
            reason,
        };
        for (i, (want, got)) in self.tensors.iter().zip(&header.tensors).enumerate() {
            if want != got {
                return Err(refuse(format!(
                    "tensor {i} is `{}` {:?} {:?}, expected `{}` {:?} {:?}",
                    got.name, got.dtype, got.shape, want.name, want.dtype, want.shape
                )));
            }
        }
        if self.tensors.len() != header.tensors.len() {
            return Err(refuse(format!(
                "{} tensors, expected {}",
                header.tensors.len(),
                self.tensors.len()
            )));
        }
        Ok(())
    }
}

/// Raw little-endian payload of a bundle, tensor after tensor.
pub fn encode_payload(bundle: &Bundle) -> Vec<u8> {
    encode_payload_as(bundle, DType::F32)
}

/// The payload with every value as `dtype` (bf16 rounds to nearest even; int8 quantizes per
/// block).
///
/// # Panics
/// On `DType::Int8 { block: 0 }`.
pub fn encode_payload_as(bundle: &Bundle, dtype: DType) -> Vec<u8> {
    let bytes = dtype
        .payload_bytes(bundle.numel() as u64)
        .expect("a block size of at least 1");
    let mut out = Vec::with_capacity(usize::try_from(bytes).unwrap_or(0));
    for t in &bundle.tensors {
        match dtype {
            DType::F32 => out.extend(t.data.iter().flat_map(|v| v.to_le_bytes())),
            DType::BF16 => out.extend(t.data.iter().flat_map(|&v| bf16_bits(v).to_le_bytes())),
            DType::Int8 { block } => {
                let mut values = Vec::with_capacity(t.data.len());
                for xs in t.data.chunks(block as usize) {
                    out.extend(quantize_block(xs, &mut values).to_le_bytes());
                }
                out.extend(values);
            }
        }
    }
    out
}

/// Rebuilds a bundle from its header and exactly its payload bytes.
///
/// # Errors
/// `Truncated` or `Trailing` when the byte count disagrees with the shapes; `BadTensor` and
/// `BundleTooLarge` from the header.
pub fn decode_payload(header: &BundleHeader, payload: &[u8]) -> Result<Bundle, ProtoError> {
    let mut decoder = PayloadDecoder::new(header)?;
    decoder.push(payload)?;
    decoder.finish()
}

/// Decodes a payload as it arrives, in chunks of any size, straight into the tensors: the
/// bytes are never held whole, so a bundle costs its decoded size once. Nothing is reserved
/// from the header: each tensor's memory grows with the values that actually arrived
/// (doubling, capped at the tensor's announced size), so a header that lies about its shapes
/// costs the receiver at most about twice what the peer really sent.
#[derive(Debug)]
pub struct PayloadDecoder {
    need: u64,
    got: u64,
    tensors: Vec<HostTensor>,
    /// Values each tensor announced.
    announced: Vec<usize>,
    /// The payload's runs in order: a tensor's values, or an int8 tensor's scales then values.
    segments: Vec<Segment>,
    current: usize,
    /// The scales of the int8 tensor being decoded.
    scales: Vec<f32>,
    /// The bytes of a value split across two chunks.
    carry: [u8; 4],
    carry_len: usize,
}

#[derive(Debug, Clone, Copy)]
enum Run {
    F32,
    Bf16,
    /// An int8 tensor's block scales (f32).
    Scales,
    /// An int8 tensor's values, `block` to a scale.
    Int8 {
        block: usize,
    },
}

impl Run {
    fn size(self) -> usize {
        match self {
            Run::F32 | Run::Scales => 4,
            Run::Bf16 => 2,
            Run::Int8 { .. } => 1,
        }
    }
}

#[derive(Debug)]
struct Segment {
    tensor: usize,
    run: Run,
    remaining: usize,
}

impl PayloadDecoder {
    /// A decoder for the payload `header` announces. Allocates nothing for the payload.
    ///
    /// # Errors
    /// `BadTensor` and `BundleTooLarge` from the header.
    pub fn new(header: &BundleHeader) -> Result<Self, ProtoError> {
        let need = header.payload_len()?;
        // Bounded by the header frame (and `MAX_BUNDLE_TENSORS`), which has arrived whole.
        let mut tensors = Vec::with_capacity(header.tensors.len());
        let mut announced = Vec::with_capacity(header.tensors.len());
        let mut segments = Vec::with_capacity(header.tensors.len());
        for (i, t) in header.tensors.iter().enumerate() {
            let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
            let n: usize = shape.iter().product();
            tensors.push(HostTensor {
                name: t.name.clone(),
                shape,
                data: Vec::new(),
            });
            announced.push(n);
            let mut segment = |run, remaining| {
                segments.push(Segment {
                    tensor: i,
                    run,
                    remaining,
                })
            };
            match t.dtype {
                DType::F32 => segment(Run::F32, n),
                DType::BF16 => segment(Run::Bf16, n),
                // `payload_len` refused a zero block.
                DType::Int8 { block } => {
                    let block = block as usize;
                    segment(Run::Scales, n.div_ceil(block));
                    segment(Run::Int8 { block }, n);
                }
            }
        }
        Ok(Self {
            need,
            got: 0,
            tensors,
            announced,
            segments,
            current: 0,
            scales: Vec::new(),
            carry: [0; 4],
            carry_len: 0,
        })
    }

    /// Bytes reserved for tensor values so far (what the peer has made this decoder hold).
    pub fn reserved_bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.data.capacity() * 4).sum::<usize>() + self.scales.capacity() * 4
    }

    /// Room for `more` values in tensor `i`: at least doubling, never past what it announced.
    fn grow(&mut self, i: usize, more: usize) {
        let data = &mut self.tensors[i].data;
        let need = data.len() + more;
        if need > data.capacity() {
            let target = need
                .max(data.capacity().saturating_mul(2))
                .min(self.announced[i])
                .max(need);
            data.reserve_exact(target - data.len());
        }
    }

    /// Decodes whole values of the current segment from `bytes` (a multiple of its size).
    fn take(&mut self, bytes: &[u8]) {
        let Segment { tensor: i, run, .. } = self.segments[self.current];
        let count = bytes.len() / run.size();
        self.segments[self.current].remaining -= count;
        match run {
            Run::F32 => {
                self.grow(i, count);
                let values = bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                self.tensors[i].data.extend(values);
            }
            Run::Bf16 => {
                self.grow(i, count);
                let values = bytes
                    .chunks_exact(2)
                    .map(|c| bf16_value(u16::from_le_bytes([c[0], c[1]])));
                self.tensors[i].data.extend(values);
            }
            Run::Scales => {
                if self.scales.len() + count > self.scales.capacity() {
                    // Doubling, as `grow`: a lying header costs about what was really sent.
                    self.scales.reserve(count.max(self.scales.len()));
                }
                let values = bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                self.scales.extend(values);
            }
            Run::Int8 { block } => {
                self.grow(i, count);
                let data = &mut self.tensors[i].data;
                for &b in bytes {
                    let scale = self.scales[data.len() / block];
                    data.push(f32::from(i8::from_le_bytes([b])) * scale);
                }
            }
        }
    }

    /// Takes the next bytes of the payload.
    ///
    /// # Errors
    /// `Trailing` when they go past what the header announced.
    pub fn push(&mut self, mut bytes: &[u8]) -> Result<(), ProtoError> {
        let total = self.got + bytes.len() as u64;
        if total > self.need {
            return Err(ProtoError::Trailing {
                what: "bundle payload",
                extra: (total - self.need) as usize,
            });
        }
        self.got = total;
        while !bytes.is_empty() {
            while self.segments.get(self.current).is_some_and(|s| s.remaining == 0) {
                self.current += 1;
                if let Some(Segment { run: Run::Scales, .. }) = self.segments.get(self.current) {
                    self.scales.clear();
                }
            }
            // Cannot run out: the byte count was checked against the header above.
            let Some(segment) = self.segments.get(self.current) else {
                break;
            };
            let size = segment.run.size();
            if self.carry_len > 0 || bytes.len() < size {
                // A value split across chunks: gather its bytes first.
                let take = (size - self.carry_len).min(bytes.len());
                self.carry[self.carry_len..self.carry_len + take].copy_from_slice(&bytes[..take]);
                self.carry_len += take;
                bytes = &bytes[take..];
                if self.carry_len == size {
                    let carry = self.carry;
                    self.take(&carry[..size]);
                    self.carry_len = 0;
                }
                continue;
            }
            let count = (bytes.len() / size).min(segment.remaining);
            let (now, rest) = bytes.split_at(count * size);
            self.take(now);
            bytes = rest;
        }
        Ok(())
    }

    /// The bundle, once every announced byte has arrived.
    ///
    /// # Errors
    /// `Truncated` when some are missing.
    pub fn finish(self) -> Result<Bundle, ProtoError> {
        if self.got < self.need {
            return Err(ProtoError::Truncated {
                need: self.need as usize,
                have: self.got as usize,
            });
        }
        Ok(Bundle { tensors: self.tensors })
    }
}

/// A whole bundle stream as bytes (header frame, then payload): what `net` writes.
///
/// # Errors
/// `FrameTooLarge` for a header with too many tensors to fit one frame.
pub fn encode_bundle(transfer: u64, bundle: &Bundle) -> Result<Vec<u8>, ProtoError> {
    let mut out = encode_frame(&BundleHeader::for_bundle(transfer, bundle))?;
    out.extend_from_slice(&encode_payload(bundle));
    Ok(out)
}

/// Decodes a whole bundle stream held in memory.
///
/// # Errors
/// Any framing or tensor error.
pub fn decode_bundle(bytes: &[u8]) -> Result<(u64, Bundle), ProtoError> {
    let (header, used): (BundleHeader, usize) = decode_frame("bundle header", bytes)?;
    let bundle = decode_payload(&header, &bytes[used..])?;
    Ok((header.transfer, bundle))
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_module_file_is_received_in_order_and_checked() {
        use sha2::Digest;
        let file: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let sha: [u8; 32] = sha2::Sha256::digest(&file).into();
        let mut r = ModuleReceiver::new(sha, 1000).expect("size within the limit");
        assert_eq!(r.part(0, &file[..600]), Ok(None));
        let got = r.part(600, &file[600..]).expect("whole").expect("complete");
        assert_eq!(&got[..], &file[..]);

        let mut r = ModuleReceiver::new(sha, 1000).expect("new");
        let e = r.part(10, &file[..10]).expect_err("out of order");
        assert!(e.to_string().contains("offset 10, expected 0"), "{e}");
        let mut r = ModuleReceiver::new(sha, 1000).expect("new");
        assert!(r.part(0, &[0; 1001]).is_err(), "past the announced size");
        assert!(r.part(0, &[]).is_err(), "empty part");
        let mut r = ModuleReceiver::new([0; 32], 1000).expect("new");
        let e = r.part(0, &file).expect_err("wrong sha256");
        assert!(e.to_string().contains("sha256"), "{e}");
        assert!(ModuleReceiver::new(sha, MAX_MODULE_BYTES + 1).is_err());
        // A part of the largest size fits in a frame.
        let part = CoordinatorMsg::ModulePart {
            offset: u64::MAX,
            bytes: vec![0xff; MODULE_PART_BYTES],
        };
        assert!(encode_frame(&part).expect("encodes").len() <= MAX_FRAME_BYTES);
    }
    use super::*;
    use proptest::prelude::*;

    fn roundtrip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(msg: T) {
        let bytes = encode_frame(&msg).expect("encode");
        let (back, used): (T, usize) = decode_frame("test", &bytes).expect("decode");
        assert_eq!(used, bytes.len());
        assert_eq!(back, msg);
    }

    fn job() -> JobSpec {
        JobSpec {
            seed: 42,
            model: ModelSpec::Mlp {
                inputs: 64,
                hidden: vec![128, 64],
                classes: 10,
                dropout: 0.0,
            },
            domains: vec![DomainSpec {
                name: "clean".into(),
                source: "/data/train.safetensors".into(),
                subset: Some((0, 300)),
                label_noise: 0.5,
                permute_labels: true,
                feature_noise: 1.0,
                permute_features: true,
                labels: None,
                token_noise: 0.0,
                checksum: [9; 32],
            }],
            meta: Some(DataRef {
                path: "/data/meta.safetensors".into(),
                subset: Some((3, 64)),
                checksum: [4; 32],
            }),
            shards: 4,
            inner: InnerSpec {
                batch_size: 32,
                lr: 0.05,
                momentum: 0.9,
                weight_decay: 1e-4,
                optimizer: InnerOptimizer::AdamW {
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                },
                schedule: LrSchedule {
                    steps_per_round: 5,
                    total_steps: 500,
                    warmup_steps: 50,
                    decay: LrDecay::Linear,
                },
                clip_norm: Some(1.0),
                accumulate: 2,
                virtual_lr: Some(0.1),
                autocast: Autocast::Bf16,
            },
            delta_dtype: DType::F32,
            text: None,
            meta_batch: 0,
        }
    }

    #[test]
    fn every_worker_message_roundtrips() {
        roundtrip(WorkerMsg::Hello(Hello {
            protocol_version: 1,
            name: "w0".into(),
        }));
        for signal in [
            Signal::Nothing,
            Signal::Hypergradient(vec![DomainStat { d_sum: -1.5, count: 64 }]),
            Signal::Doremi(vec![DomainProbe {
                rows: vec![3, 1],
                losses: vec![0.5, 2.0],
            }]),
            Signal::LossRescaling(vec![SmallTensor {
                name: "l0.bias".into(),
                shape: vec![2],
                data: vec![0.5, -1.0],
            }]),
        ] {
            roundtrip(WorkerMsg::Result(AssignmentResult {
                train_loss: 0.25,
                samples: 640,
                compute_seconds: 1.5,
                meta_loss: Some(0.5),
                signal,
                ..AssignmentResult::new(7, 3, 99)
            }));
        }
        roundtrip(WorkerMsg::Failed {
            round: 2,
            assignment: 1,
            reason: "checksum".into(),
        });
    }

    #[test]
    fn every_coordinator_message_roundtrips() {
        roundtrip(CoordinatorMsg::Welcome(Box::new(Welcome {
            protocol_version: 1,
            worker_id: 5,
            job: job(),
        })));
        roundtrip(CoordinatorMsg::Reject { reason: "full".into() });
        let asks = [
            Ask::Nothing,
            Ask::Hypergradient(HypergradientSpec {
                directional: DirectionalMethod::FiniteDifference,
                probe: 64,
            }),
            Ask::Doremi { probe: 64 },
            Ask::LossRescaling(RescalerPlan {
                mode: RescaleMode::SelfTaught,
                omega: vec![SmallTensor {
                    name: "l0.weight".into(),
                    shape: vec![1, 2],
                    data: vec![0.1, 0.2],
                }],
                features: vec![0, 1, 2],
                normalize: true,
                directional: DirectionalMethod::Exact,
                progress: 0.25,
                passes: 4,
            }),
            Ask::TaskPolicy {
                target_rows: vec![3, 1, 4],
            },
        ];
        let models = [
            ModelSource::Full {
                version: 0,
                checksum: [1; 32],
                transfer: 1,
            },
            ModelSource::Step {
                base: 1,
                version: 2,
                checksum: [2; 32],
                transfer: 3,
            },
            ModelSource::Unchanged {
                version: 2,
                checksum: [3; 32],
            },
        ];
        for (model, ask) in models
            .iter()
            .flat_map(|m| asks.iter().map(move |a| (m.clone(), a.clone())))
        {
            roundtrip(CoordinatorMsg::Round(RoundPlan {
                round: 3,
                model,
                domain_weights: vec![1.5, 0.5],
                ask,
                assignments: vec![
                    Assignment {
                        index: 0,
                        shard: 1,
                        steps: 20,
                        seed: 77,
                        data: TrainOn::Mixture,
                    },
                    Assignment {
                        index: 1,
                        shard: 0,
                        steps: 5,
                        seed: 78,
                        data: TrainOn::Domain(2),
                    },
                    Assignment {
                        index: 2,
                        shard: 0,
                        steps: 0,
                        seed: 79,
                        data: TrainOn::Meta,
                    },
                ],
            }));
        }
        roundtrip(CoordinatorMsg::Shutdown {
            reason: "done".into(),
            finished: true,
        });
    }

    fn sample_bundle() -> Bundle {
        Bundle {
            tensors: vec![
                HostTensor {
                    name: "w".into(),
                    shape: vec![2, 3],
                    data: vec![1., -2., 3.5, 0., 1e-8, -0.],
                },
                HostTensor {
                    name: "b".into(),
                    shape: vec![2],
                    data: vec![f32::MAX, f32::MIN],
                },
                HostTensor {
                    name: "s".into(),
                    shape: vec![],
                    data: vec![7.0],
                },
            ],
        }
    }

    #[test]
    fn bundle_roundtrips_bit_exactly() {
        let b = sample_bundle();
        let bytes = encode_bundle(11, &b).expect("encode");
        let (id, back) = decode_bundle(&bytes).expect("decode");
        assert_eq!(id, 11);
        assert_eq!(back, b);
        assert_eq!(back.tensors[0].data[5].to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn bundle_byte_count_must_match_shape() {
        let bytes = encode_bundle(1, &sample_bundle()).expect("encode");
        let short = &bytes[..bytes.len() - 1];
        assert!(matches!(decode_bundle(short), Err(ProtoError::Truncated { .. })));
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(decode_bundle(&long), Err(ProtoError::Trailing { .. })));
    }

    #[test]
    fn an_empty_tensor_may_not_carry_absurd_dimensions() {
        let header = BundleHeader {
            transfer: 1,
            tensors: vec![TensorMeta {
                name: "ghost".into(),
                dtype: DType::F32,
                shape: vec![0, u64::MAX, 1 << 40],
            }],
        };
        assert!(matches!(header.payload_len(), Err(ProtoError::BadTensor { .. })));
    }

    #[test]
    fn absurd_headers_are_rejected_before_allocation() {
        let header = BundleHeader {
            transfer: 1,
            tensors: vec![TensorMeta {
                name: "huge".into(),
                dtype: DType::F32,
                shape: vec![u64::MAX, 2],
            }],
        };
        assert!(matches!(header.payload_len(), Err(ProtoError::BadTensor { .. })));
        let header = BundleHeader {
            transfer: 1,
            tensors: vec![TensorMeta {
                name: "big".into(),
                dtype: DType::F32,
                shape: vec![1 << 20, 1 << 20],
            }],
        };
        assert!(matches!(header.payload_len(), Err(ProtoError::BundleTooLarge { .. })));
    }

    /// The headers of issue 15: 20 bytes that announce 16 GiB. The decoder reserves nothing
    /// for them, and what it holds grows only with the values that arrive.
    #[test]
    fn a_lying_header_reserves_nothing_up_front() {
        for (dtype, n) in [(DType::BF16, 8_589_934_592u64), (DType::F32, 4_294_967_296)] {
            let header = BundleHeader {
                transfer: 1,
                tensors: vec![TensorMeta {
                    name: "huge".into(),
                    dtype,
                    shape: vec![n],
                }],
            };
            assert!(encode_frame(&header).expect("encode").len() <= 32);
            let mut d = PayloadDecoder::new(&header).expect("within the hard limit");
            assert_eq!(d.reserved_bytes(), 0, "{dtype:?}: nothing reserved from the header");
            let mut values = 0;
            for chunk in [7usize, 1000, 3, 4096, 65536] {
                d.push(&vec![0u8; chunk]).expect("push");
                values += chunk;
                let decoded = values / if dtype == DType::BF16 { 2 } else { 4 } * 4;
                assert!(
                    d.reserved_bytes() <= 2 * decoded + 8,
                    "{dtype:?}: {} bytes reserved for {decoded} decoded",
                    d.reserved_bytes()
                );
            }
            assert!(matches!(d.finish(), Err(ProtoError::Truncated { .. })));
        }
    }

    #[test]
    fn a_header_must_match_the_expected_layout() {
        let b = sample_bundle();
        let layout = BundleLayout::of(&b, DType::BF16);
        assert_eq!(layout.decoded_bytes(), 4 * 9);
        assert_eq!(layout.check(&BundleHeader::for_bundle_as(3, &b, DType::BF16)), Ok(()));
        let refused = |header: &BundleHeader| match layout.check(header) {
            Err(e @ ProtoError::UnexpectedLayout { .. }) => {
                assert_eq!(e.reason(), "unexpected_layout");
                e.to_string()
            }
            other => panic!("{header:?} accepted: {other:?}"),
        };
        let msg = refused(&BundleHeader::for_bundle_as(3, &b, DType::F32));
        assert!(
            msg.contains("bundle 3") && msg.contains("`w`") && msg.contains("BF16"),
            "{msg}"
        );
        let mut lying = BundleHeader::for_bundle_as(4, &b, DType::BF16);
        lying.tensors[1].shape = vec![8_589_934_592];
        let msg = refused(&lying);
        assert!(msg.contains("`b`") && msg.contains("8589934592"), "{msg}");
        let mut renamed = BundleHeader::for_bundle_as(5, &b, DType::BF16);
        renamed.tensors[2].name = "t".into();
        assert!(refused(&renamed).contains("`t`"));
        let mut short = BundleHeader::for_bundle_as(6, &b, DType::BF16);
        short.tensors.pop();
        assert!(refused(&short).contains("2 tensors, expected 3"));
        let mut long = BundleHeader::for_bundle_as(7, &b, DType::BF16);
        long.tensors.push(long.tensors[0].clone());
        assert!(refused(&long).contains("4 tensors, expected 3"));
    }

    /// A postcard sequence that announces more elements than the frame holds: serde reserves
    /// at most a bounded amount from such a length, and decoding fails when the bytes run out.
    #[test]
    fn a_lying_sequence_length_in_a_frame_is_an_error() {
        let mut body = postcard::to_stdvec(&BundleHeader {
            transfer: 1,
            tensors: Vec::new(),
        })
        .expect("encode");
        // The empty `tensors` length (one byte, 0) becomes u32::MAX as a varint.
        body.pop();
        body.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        let mut frame = (body.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&body);
        assert!(matches!(
            decode_frame::<BundleHeader>("header", &frame),
            Err(ProtoError::Decode { .. })
        ));
    }

    #[test]
    fn oversized_frame_prefix_is_rejected() {
        let prefix = ((MAX_FRAME_BYTES + 1) as u32).to_le_bytes();
        assert!(matches!(frame_len(prefix), Err(ProtoError::FrameTooLarge { .. })));
    }

    #[test]
    fn the_schedule_is_transformers_linear_warmup_then_decay_over_the_job() {
        let s = LrSchedule {
            steps_per_round: 5,
            total_steps: 100,
            warmup_steps: 10,
            decay: LrDecay::Linear,
        };
        assert_eq!(s.global_step(3, 2), 17);
        // Warmup from 0: the first step's factor is 0, as with transformers' scheduler.
        assert_eq!(s.factor(0), 0.0);
        assert_eq!(s.factor(5), 0.5);
        assert_eq!(s.factor(10), 1.0);
        assert_eq!(s.factor(55), 0.5);
        assert_eq!(s.factor(100), 0.0);
        assert_eq!(s.factor(120), 0.0);
        assert_eq!(s.lr(0.1, 11, 0), 0.1 * (45.0 / 90.0));
        let flat = LrSchedule {
            decay: LrDecay::None,
            ..s
        };
        assert_eq!(flat.factor(55), 1.0);
        assert_eq!(flat.factor(4), 0.4);
        // No schedule: the base rate itself at every step.
        let c = LrSchedule::constant(5);
        for (round, j) in [(0, 0), (7, 4), (u64::MAX, 3)] {
            assert_eq!(c.lr(0.05, round, j).to_bits(), 0.05f64.to_bits());
        }
    }

    #[test]
    fn version_mismatch_is_an_error() {
        assert!(check_version(PROTOCOL_VERSION).is_ok());
        assert_eq!(
            check_version(PROTOCOL_VERSION + 1),
            Err(ProtoError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: PROTOCOL_VERSION + 1
            })
        );
    }

    /// bf16 keeps the top 16 bits of an f32, rounding to nearest even; specials survive.
    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16_value(bf16_bits(1.0)), 1.0);
        assert_eq!(bf16_value(bf16_bits(-2.5)), -2.5);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even one, 1.
        assert_eq!(bf16_value(bf16_bits(1.0 + 2f32.powi(-8))), 1.0);
        // Just above halfway rounds up.
        assert_eq!(
            bf16_value(bf16_bits(1.0 + 2f32.powi(-8) + 2f32.powi(-20))),
            1.0 + 2f32.powi(-7)
        );
        assert_eq!(bf16_value(bf16_bits(f32::INFINITY)), f32::INFINITY);
        assert!(bf16_value(bf16_bits(f32::NAN)).is_nan());
        assert_eq!(bf16_value(bf16_bits(-0.0)).to_bits(), (-0.0f32).to_bits());
        // 8 significant bits: relative error at most half a unit in the 8th bit, 2^-8.
        for v in [2.71e3f32, 1e-20, 6.5e4, -7.77e-3] {
            let r = bf16_value(bf16_bits(v));
            assert!((r - v).abs() <= v.abs() * 2f32.powi(-8), "{v} -> {r}");
        }
    }

    proptest! {
        /// The streaming decoder gives the same bundle whatever the chunk boundaries (values
        /// split across chunks, empty chunks, empty tensors), and reports a short payload.
        #[test]
        fn payload_decodes_the_same_in_any_chunks(cuts in proptest::collection::vec(0usize..200, 0..12), bf16 in any::<bool>()) {
            let dtype = if bf16 { DType::BF16 } else { DType::F32 };
            let mut b = sample_bundle();
            if bf16 {
                for v in b.tensors.iter_mut().flat_map(|t| t.data.iter_mut()) {
                    *v = bf16_value(bf16_bits(*v));
                }
            }
            let header = BundleHeader::for_bundle_as(7, &b, dtype);
            let payload = encode_payload_as(&b, dtype);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(payload.len())).collect();
            cuts.sort_unstable();
            let mut d = PayloadDecoder::new(&header).expect("header");
            let mut at = 0;
            for c in cuts.into_iter().chain([payload.len()]) {
                d.push(&payload[at..c]).expect("push");
                at = c;
            }
            prop_assert_eq!(d.finish().expect("finish"), b.clone());
            let mut short = PayloadDecoder::new(&header).expect("header");
            short.push(&payload[..payload.len() - 1]).expect("push");
            prop_assert!(matches!(short.finish(), Err(ProtoError::Truncated { .. })), "short payload accepted");
        }
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame::<WorkerMsg>("fuzz", &bytes);
            let _ = decode_frame::<CoordinatorMsg>("fuzz", &bytes);
            let _ = decode_bundle(&bytes);
        }

        #[test]
        fn corrupted_frames_never_panic(flip in 0usize..200, value in any::<u8>()) {
            let mut bytes = encode_frame(&CoordinatorMsg::Welcome(Box::new(Welcome {
                protocol_version: 1, worker_id: 3, job: job(),
            }))).expect("encode");
            let i = flip % bytes.len();
            bytes[i] = value;
            let _ = decode_frame::<CoordinatorMsg>("fuzz", &bytes);
            let mut b = encode_bundle(5, &sample_bundle()).expect("encode");
            let j = flip % b.len();
            b[j] = value;
            let _ = decode_bundle(&b);
        }
    }
}
