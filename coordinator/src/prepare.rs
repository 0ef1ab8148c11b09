//! What the coordinator builds before the first round: every domain and the meta set, checked
//! to fit together; the job spec workers rebuild the same data from; and the job's identity,
//! which a run directory is claimed for.

use crate::rundir::JobIdentity;
use anyhow::bail;
use metaloop_proto::checksum::{hex, StateHasher};
use metaloop_proto::config::{DeltaDType, InnerOptimizerKind, JobConfig, LrDecayKind, ModelConfig};
use metaloop_proto::dataset::{self, Dataset};
use metaloop_proto::domains;
use metaloop_proto::proto::{DType, DataRef, InnerOptimizer, InnerSpec, JobSpec, LrDecay, LrSchedule, ModelSpec};
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
    let section = |debug: String| hex(&StateHasher::new().bytes(debug.as_bytes()).finish());
    JobIdentity {
        seed: config.seed,
        rounds: config.rounds,
        model: format!("{:?}", job.model),
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
    pub(crate) test: Dataset,
    pub(crate) meta: Option<Dataset>,
    /// Training domains with their corrupted rows, kept only when Ω's separation of clean from
    /// corrupted samples is to be measured.
    pub(crate) train: Vec<(Dataset, Vec<usize>)>,
    /// What was done to each domain, for `domains.json`.
    pub(crate) records: Vec<domains::DomainRecord>,
    pub(crate) test_checksum: [u8; 32],
}

/// Builds every domain and the meta set once, checks they fit together, and returns the job
/// spec workers rebuild the same data from, with what was done to each domain.
pub(crate) fn prepare_data(config: &JobConfig, keep_train: bool) -> anyhow::Result<Prepared> {
    let d = &config.data;
    let test = dataset::load(&d.test, d.classes)?;
    let mut specs = Vec::new();
    let mut records = Vec::new();
    let mut train = Vec::new();
    let mut meta_data = None;
    for (i, cfg) in d.domains.iter().enumerate() {
        let built = domains::build(cfg, i, d.classes, config.seed)?;
        if built.data.features != test.features {
            bail!(
                "domain `{}` ({}) has {} features per row but the test data ({}) has {}",
                cfg.name,
                cfg.source.display(),
                built.data.features,
                d.test.display(),
                test.features
            );
        }
        if (built.data.len() as u32) < d.shards {
            bail!(
                "domain `{}` ({}) has {} samples, fewer than data.shards = {}",
                cfg.name,
                cfg.source.display(),
                built.data.len(),
                d.shards
            );
        }
        specs.push(domains::to_spec(cfg, domains::dataset_checksum(&built.data)));
        if keep_train {
            train.push((built.data, built.record.flipped.clone()));
        }
        records.push(built.record);
    }
    let meta = match &d.meta {
        Some(path) => {
            let m = dataset::load(path, d.classes)?;
            if m.features != test.features {
                bail!(
                    "the meta set {} has {} features per row but the test data ({}) has {}",
                    path.display(),
                    m.features,
                    d.test.display(),
                    test.features
                );
            }
            let r = DataRef {
                path: path.to_string_lossy().into_owned(),
                checksum: domains::dataset_checksum(&m),
            };
            meta_data = Some(m);
            Some(r)
        }
        None => None,
    };
    let ModelConfig::Mlp { hidden, dropout } = &config.model;
    let job = JobSpec {
        seed: config.seed,
        model: ModelSpec::Mlp {
            inputs: test.features as u32,
            hidden: hidden.clone(),
            classes: d.classes,
            dropout: *dropout as f32,
        },
        domains: specs,
        meta,
        shards: d.shards,
        inner: inner_spec(config),
        delta_dtype: match config.outer.delta_dtype {
            DeltaDType::F32 => DType::F32,
            DeltaDType::Bf16 => DType::BF16,
        },
    };
    Ok(Prepared {
        job,
        test_checksum: domains::dataset_checksum(&test),
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
    }
}
