//! What the coordinator builds before the first round: every domain and the meta set, checked
//! to fit together; the job spec workers rebuild the same data from; and the job's identity,
//! which a run directory is claimed for.

use crate::rundir::JobIdentity;
use anyhow::bail;
use metaloop_common::classifier;
use metaloop_common::data::{self, Data};
use metaloop_common::model;
use metaloop_common::torchscript;
use metaloop_proto::checksum::{hex, StateHasher};
use metaloop_proto::config::{InnerOptimizerKind, JobConfig, LrDecayKind, ModelConfig, Pooling};
use metaloop_proto::domains;
use metaloop_proto::proto::{DataRef, InnerOptimizer, InnerSpec, JobSpec, LrDecay, LrSchedule, ModelSpec};
use metaloop_proto::tensor::Bundle;
use std::collections::BTreeMap;

/// What decides this job's results ([`JobIdentity`]), for the run directory to be checked
/// against: the config sections as parsed (a default made explicit is the same job).
pub(crate) fn job_identity(config: &JobConfig, data: &Prepared) -> JobIdentity {
    let job = &data.job;
    let mut h = StateHasher::new();
    for d in &job.domains {
        h.bytes(b"domain").bytes(d.name.as_bytes()).bytes(&d.checksum);
    }
    if let Some(m) = &job.meta {
        h.bytes(b"meta").bytes(&m.checksum);
    }
    h.bytes(b"test").bytes(&data.test_checksum);
    h.bytes(&config.data.classes.to_le_bytes())
        .bytes(&job.shards.to_le_bytes());
    // Only when set, so the identities of jobs from before the setting stay as they were.
    if job.meta_batch > 0 {
        h.bytes(b"meta_batch").bytes(&job.meta_batch.to_le_bytes());
    }
    let section = |debug: String| hex(&StateHasher::new().bytes(debug.as_bytes()).finish());
    JobIdentity {
        seed: config.seed,
        rounds: config.rounds,
        model: match &job.model {
            // The file is the architecture; its bytes are not in the spec's debug text.
            ModelSpec::TorchScript { sha256, classes, .. } => {
                format!("torchscript {} classes {classes}", hex(sha256))
            }
            other => format!("{other:?}"),
        },
        data: hex(&h.finish()),
        settings: BTreeMap::from([
            ("inner".to_string(), section(format!("{:?}", config.inner))),
            ("outer".to_string(), section(format!("{:?}", config.outer))),
            ("strategy".to_string(), section(format!("{:?}", config.strategy))),
        ]),
    }
}

/// The data the coordinator itself needs, beside the spec workers rebuild theirs from.
pub(crate) struct Prepared {
    pub(crate) job: JobSpec,
    /// The model before round 0: seeded, or the pretrained encoder with a seeded head.
    pub(crate) initial: Bundle,
    pub(crate) test: Data,
    pub(crate) meta: Option<Data>,
    /// Training domains with their corrupted rows, kept only when Ω's separation of clean from
    /// corrupted samples is to be measured.
    pub(crate) train: Vec<(Data, Vec<usize>)>,
    /// What was done to each domain, for `domains.json`.
    pub(crate) records: Vec<domains::DomainRecord>,
    pub(crate) test_checksum: [u8; 32],
}

/// Builds every domain and the meta set once, checks they fit together, and returns the job
/// spec workers rebuild the same data from, with what was done to each domain.
pub(crate) fn prepare_data(config: &JobConfig, keep_train: bool) -> anyhow::Result<Prepared> {
    let d = &config.data;
    let text = data::text_spec(config);
    let test = data::load_set(&d.test, None, d.classes, text.as_ref(), "the test set")?;
    let mut specs = Vec::new();
    let mut records = Vec::new();
    let mut train = Vec::new();
    for (i, cfg) in d.domains.iter().enumerate() {
        let (built, record) = data::build_domain(cfg, i, d.classes, config.seed, text.as_ref())?;
        if built.features() != test.features() {
            bail!(
                "domain `{}` ({}) has {:?} features per row but the test data ({}) has {:?}",
                cfg.name,
                cfg.source.display(),
                built.features(),
                d.test.display(),
                test.features()
            );
        }
        if (built.len() as u32) < d.shards {
            bail!(
                "domain `{}` ({}) has {} samples, fewer than data.shards = {}",
                cfg.name,
                cfg.source.display(),
                built.len(),
                d.shards
            );
        }
        specs.push(domains::to_spec(cfg, built.checksum()));
        if keep_train {
            train.push((built, record.flipped.clone()));
        }
        records.push(record);
    }
    let mut meta_data = None;
    let meta = match &d.meta {
        Some(path) => {
            let subset = d.meta_subset.map(|s| (s.start, s.count));
            let m = data::load_set(path, subset, d.classes, text.as_ref(), "the meta set")?;
            if m.features() != test.features() {
                bail!(
                    "the meta set {} has {:?} features per row but the test data ({}) has {:?}",
                    path.display(),
                    m.features(),
                    d.test.display(),
                    test.features()
                );
            }
            let r = DataRef {
                path: path.to_string_lossy().into_owned(),
                subset: subset.map(|(start, count)| (start as u64, count as u64)),
                checksum: m.checksum(),
            };
            meta_data = Some(m);
            Some(r)
        }
        None => None,
    };
    let (model, initial) = match &config.model {
        ModelConfig::Mlp { hidden, dropout, .. } => {
            let spec = ModelSpec::Mlp {
                inputs: test.features().unwrap_or(0) as u32,
                hidden: hidden.clone(),
                classes: d.classes,
                dropout: *dropout as f32,
            };
            let initial = model::init_params(&spec, config.seed);
            (spec, initial)
        }
        ModelConfig::Bert { path, pooling, .. } => {
            let pooling = match pooling {
                Pooling::Cls => classifier::Pooling::Cls,
                Pooling::Mean => classifier::Pooling::Mean,
            };
            classifier::pretrained(path, pooling, d.classes, config.seed)?
        }
        ModelConfig::TorchScript { path, .. } => {
            let (spec, initial, module) = torchscript::spec(path, d.classes)?;
            // The module must take the job's inputs and give its classes' logits before any
            // worker is sent it.
            let rows: Vec<usize> = (0..test.len().min(4)).collect();
            module.check_forward(&test.batch(&rows, tch::Device::Cpu).0, d.classes)?;
            (spec, initial)
        }
    };
    let job = JobSpec {
        seed: config.seed,
        model,
        domains: specs,
        meta,
        shards: d.shards,
        inner: inner_spec(config),
        delta_dtype: config.outer.delta_wire_dtype(),
        text,
        meta_batch: d.meta_batch,
    };
    Ok(Prepared {
        job,
        initial,
        test_checksum: test.checksum(),
        test,
        meta: meta_data,
        train,
        records,
    })
}

/// The workers' inner optimizer as the config gives it; the schedule's step count is the job's
/// (rounds × inner.steps), so a step's learning rate depends only on its round and index.
fn inner_spec(config: &JobConfig) -> InnerSpec {
    let i = &config.inner;
    let (beta1, beta2) = i.betas();
    InnerSpec {
        batch_size: i.batch_size,
        lr: i.lr,
        momentum: i.momentum(),
        weight_decay: i.weight_decay,
        optimizer: match i.optimizer {
            InnerOptimizerKind::Sgd => InnerOptimizer::Sgd,
            InnerOptimizerKind::AdamW => InnerOptimizer::AdamW {
                beta1,
                beta2,
                eps: i.eps(),
            },
        },
        schedule: LrSchedule {
            steps_per_round: i.steps,
            total_steps: config.rounds.saturating_mul(u64::from(i.steps)),
            warmup_steps: i.warmup_steps,
            decay: match i.decay {
                LrDecayKind::None => LrDecay::None,
                LrDecayKind::Linear => LrDecay::Linear,
            },
        },
        clip_norm: i.clip_norm,
        accumulate: i.accumulate,
        virtual_lr: config.strategy.virtual_lr,
        autocast: i.autocast,
    }
}
