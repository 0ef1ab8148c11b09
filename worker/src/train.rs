//! The inner loop on one device: hold the current model version and run assignments on it.
//! Synchronous and socket-free; the engine drives it from a compute thread, one `Trainer` per
//! replica when a worker has several devices.

use crate::collective::{self, Collective, CollectiveError};
use crate::primitives;
use crate::rescaler::{self, Batch, Validation, VirtualStep};
use metaloop_common::features;
use metaloop_common::model::Mlp;
use metaloop_common::model::{self, Model};
use metaloop_proto::checksum::{bundle_checksum, hex};
use metaloop_proto::dataset::{self, Dataset};
use metaloop_proto::domains::{self, DomainError};
use metaloop_proto::features::Feature;
use metaloop_proto::proto::DomainProbe;
use metaloop_proto::proto::{
    Assignment, DirectionalMethod, DomainStat, HypergradientSpec, JobSpec, ModelSpec, RescaleMode, RescalerPlan,
    RoundPlan, SmallTensor, TrainOn,
};
use metaloop_proto::rng::{derive_seed, SplitMix64};
use metaloop_proto::tensor::Bundle;
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] dataset::DataError),
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("{what} differs from the coordinator's (checksum {ours} here, {theirs} there): is {path} the same file on this machine?")]
    DataMismatch {
        what: String,
        path: String,
        ours: String,
        theirs: String,
    },
    #[error("the plan has {got} domain weights for {want} domains")]
    Weights { got: usize, want: usize },
    #[error("the plan asks for a hypergradient but the job has no meta set")]
    NoMeta,
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error("no model loaded")]
    NoModel,
    #[error("model mismatch: {0}")]
    Mismatch(String),
    #[error("shard {shard} of {shards} of domain `{domain}` is empty ({samples} samples)")]
    EmptyShard {
        domain: String,
        shard: u32,
        shards: u32,
        samples: usize,
    },
    #[error("training diverged: non-finite loss at inner step {step}")]
    Diverged { step: u32 },
    #[error("summing gradients across the replicas: {0}")]
    Collective(#[from] CollectiveError),
}

/// What one assignment produced.
#[derive(Debug)]
pub struct AssignmentOutcome {
    /// θ_after − θ_before.
    pub delta: Bundle,
    pub mean_loss: f32,
    pub samples: u64,
    pub seconds: f32,
    pub meta_loss: Option<f32>,
    /// Per-domain hypergradient contributions (empty unless asked for).
    pub domains: Vec<DomainStat>,
    /// Ω's meta-gradient (empty unless the plan carried a rescaler).
    pub omega_grad: Vec<SmallTensor>,
    /// Per-domain probe losses (empty unless asked for).
    pub probes: Vec<DomainProbe>,
}

/// The rescaler network of a round, built from its plan.
struct Omega {
    model: Box<dyn Model>,
    mode: RescaleMode,
    features: Vec<Feature>,
    normalize: bool,
    directional: DirectionalMethod,
    progress: f64,
    /// Stochastic forward passes for the spread features.
    passes: u32,
}

impl Omega {
    fn from_plan(plan: &RescalerPlan, device: Device) -> Result<Self, TrainError> {
        let features = plan
            .features
            .iter()
            .map(|&c| Feature::from_code(c).ok_or_else(|| TrainError::Mismatch(format!("unknown feature code {c}"))))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            model: Box::new(Mlp::from_bundle(&SmallTensor::to_bundle(&plan.omega), device)?),
            mode: plan.mode,
            features,
            normalize: plan.normalize,
            directional: plan.directional,
            progress: f64::from(plan.progress),
            passes: plan.passes,
        })
    }

    /// Features of `(x, y)` under the model as it is now (leaves it in eval mode).
    fn features(&self, model: &dyn Model, x: &Tensor, y: &Tensor) -> Tensor {
        features::of_model(model, x, y, &self.features, self.progress, self.passes)
    }

    /// Inner-loop weights for a batch: Ω's output on the batch's features, normalised if
    /// asked; constants for the model's gradient. Leaves the model in train mode.
    fn weights(&self, model: &dyn Model, x: &Tensor, y: &Tensor) -> Tensor {
        let f = self.features(model, x, y);
        model.set_train(true);
        tch::no_grad(|| {
            let raw = rescaler::omega_weights(self.model.as_ref(), &f);
            if let Ok(values) = Vec::<f64>::try_from(raw.to_kind(tch::Kind::Double)) {
                let h = metrics::histogram!(metaloop_common::metrics::RESCALER_SAMPLE_WEIGHT);
                for v in values {
                    h.record(v);
                }
            }
            rescaler::batch_weights(&raw, self.normalize)
        })
        .detach()
    }
}

/// A job's training data, loaded once per worker and shared by its replicas.
#[derive(Clone)]
pub(crate) struct TrainingData {
    job: JobSpec,
    domains: Arc<[Dataset]>,
    meta: Option<Arc<Dataset>>,
}

impl TrainingData {
    /// Builds the job's domains and loads its meta set, checking both against the
    /// coordinator's checksums.
    ///
    /// # Errors
    /// A missing or malformed file, or data that differs from the coordinator's.
    pub(crate) fn load(job: JobSpec) -> Result<Self, TrainError> {
        let ModelSpec::Mlp { classes, .. } = job.model;
        let mut built = Vec::with_capacity(job.domains.len());
        for (i, spec) in job.domains.iter().enumerate() {
            let d = domains::build(&domains::from_spec(spec), i, classes, job.seed)?;
            same_data(&format!("domain `{}`", spec.name), &spec.source, &d.data, spec.checksum)?;
            built.push(d.data);
        }
        let meta = match &job.meta {
            Some(r) => {
                let ds = dataset::load(std::path::Path::new(&r.path), classes)?;
                same_data("the meta set", &r.path, &ds, r.checksum)?;
                Some(ds)
            }
            None => None,
        };
        Ok(Self::new(job, built, meta))
    }

    pub(crate) fn new(job: JobSpec, domains: Vec<Dataset>, meta: Option<Dataset>) -> Self {
        Self {
            job,
            domains: domains.into(),
            meta: meta.map(Arc::new),
        }
    }

    pub(crate) fn job(&self) -> &JobSpec {
        &self.job
    }
}

/// The worker's model state and data: the whole worker, or one replica of it.
pub struct Trainer {
    job: JobSpec,
    /// One dataset per training domain, in job order.
    domains: Arc<[Dataset]>,
    meta: Option<Arc<Dataset>>,
    device: Device,
    /// Host copy of the current version: the base every assignment starts from.
    params: Option<Bundle>,
    version: Option<u64>,
    model: Option<Box<dyn Model>>,
    /// With several replicas, this one's member of their collective; `None` when alone.
    collective: Option<Box<dyn Collective>>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Trainer {
    /// Builds the job's domains and loads its meta set, checking both against the
    /// coordinator's checksums.
    ///
    /// # Errors
    /// A missing or malformed file, or data that differs from the coordinator's.
    pub fn new(job: JobSpec, device: Device) -> Result<Self, TrainError> {
        Ok(Self::replica(TrainingData::load(job)?, device, None))
    }

    pub fn with_data(job: JobSpec, domains: Vec<Dataset>, meta: Option<Dataset>, device: Device) -> Self {
        Self::replica(TrainingData::new(job, domains, meta), device, None)
    }

    /// One replica on `device`; `collective` joins it to the others (`None`: it is alone).
    pub(crate) fn replica(data: TrainingData, device: Device, collective: Option<Box<dyn Collective>>) -> Self {
        Self {
            job: data.job,
            domains: data.domains,
            meta: data.meta,
            device,
            params: None,
            version: None,
            model: None,
            collective,
        }
    }

    /// The model version held, if any.
    pub fn version(&self) -> Option<u64> {
        self.version
    }

    /// Replaces the model with full parameters of `version`, checked against `checksum`.
    ///
    /// # Errors
    /// `Mismatch` when the bytes do not hash to the checksum; `Model` for a wrong layout.
    pub fn set_model(&mut self, version: u64, checksum: [u8; 32], params: Bundle) -> Result<(), TrainError> {
        self.version = None;
        verify(&params, checksum, version)?;
        let model = model::build(&self.job.model, &params, self.device)?;
        self.model = Some(model);
        self.params = Some(params);
        self.version = Some(version);
        Ok(())
    }

    /// Applies the coordinator's exact update `step` to version `base`, giving `version`.
    ///
    /// # Errors
    /// `Mismatch` when we do not hold `base`, the layouts differ or the result's checksum
    /// differs; the model is then dropped so the coordinator resends it in full.
    pub fn apply_step(&mut self, base: u64, version: u64, checksum: [u8; 32], step: &Bundle) -> Result<(), TrainError> {
        let held = self.version.take();
        if held != Some(base) {
            return Err(TrainError::Mismatch(format!(
                "update is for version {base}, we hold {held:?}"
            )));
        }
        let mut params = self.params.take().ok_or(TrainError::NoModel)?;
        if !params.same_layout(step) {
            return Err(TrainError::Mismatch("update layout differs from the model".into()));
        }
        params.add_assign(step);
        self.set_model(version, checksum, params)
    }

    /// Confirms we hold `version` with `checksum`.
    ///
    /// # Errors
    /// `Mismatch` otherwise.
    pub fn check_version(&self, version: u64, checksum: [u8; 32]) -> Result<(), TrainError> {
        match &self.params {
            Some(p) if self.version == Some(version) => verify(p, checksum, version),
            _ => Err(TrainError::Mismatch(format!(
                "need version {version}, hold {:?}",
                self.version
            ))),
        }
    }

    /// Runs one assignment from the held version: `steps` SGD-with-momentum steps on what
    /// `a.data` names. For the mixture, batches take `batch_size / K` samples from the
    /// assignment's shard of every domain, with loss (1/K) Σ_k w_k · mean_k ℓ; for one domain
    /// or the meta set, `batch_size` samples of it with their mean loss. Then, when asked,
    /// measures the meta loss (on the target rows, when given) and each domain's
    /// d_k = ⟨∇ℓ_k(θ), ∇L_meta(θ)⟩ on a probe of its shard. Deterministic in (model version,
    /// assignment, asks).
    ///
    /// # Errors
    /// `NoModel`, `EmptyShard`, `Diverged`, `Weights`, `NoMeta`, `Mismatch` for a domain or
    /// target row that does not exist, or a libtorch failure.
    pub fn run(&mut self, a: &Assignment, asks: &RoundAsks) -> Result<AssignmentOutcome, TrainError> {
        self.run_replica(a, asks)?
            .ok_or_else(|| TrainError::Mismatch("only the first replica returns a result".into()))
    }

    /// [`Trainer::run`] as one replica of several. Every replica draws the same batches (they
    /// are functions of the assignment), runs each inner step on its share of the rows
    /// (`collective::share`) and takes the same SGD step with the gradients summed over the
    /// replicas, so the replicas stay bit-identical. Ω's per-sample weights are computed on
    /// the whole batch by every replica (a no-grad pass; normalising them needs the whole
    /// batch). The meta signals (the meta loss, the domains' d_k, DoReMi's probe losses, Ω's
    /// meta-gradient) and the delta are computed by the first replica (rank 0) alone, on its
    /// copy of the trained model, exactly as a lone trainer does; the others return `None`.
    ///
    /// Against one replica on the whole batch, only the order of floating-point additions
    /// differs (each replica's partial sums, then their sum).
    ///
    /// # Errors
    /// As [`Trainer::run`], and `Collective` when the replicas cannot sum their gradients.
    pub(crate) fn run_replica(
        &mut self,
        a: &Assignment,
        asks: &RoundAsks,
    ) -> Result<Option<AssignmentOutcome>, TrainError> {
        let start = Instant::now();
        let (Some(model), Some(base)) = (&self.model, &self.params) else {
            return Err(TrainError::NoModel);
        };
        let k = self.domains.len();
        if asks.weights.len() != k {
            return Err(TrainError::Weights {
                got: asks.weights.len(),
                want: k,
            });
        }
        let needs_meta = asks.hypergradient.is_some()
            || asks.target_rows.is_some()
            || a.data == TrainOn::Meta
            || asks.rescaler.as_ref().is_some_and(|r| r.mode == RescaleMode::CleanMeta);
        if needs_meta && self.meta.is_none() {
            return Err(TrainError::NoMeta);
        }
        let omega = asks
            .rescaler
            .as_ref()
            .map(|plan| Omega::from_plan(plan, self.device))
            .transpose()?;
        let mut batches = self.batches(a, &asks.weights)?;
        model::load_bundle(model.as_ref(), base)?;
        // Dropout draws from libtorch's generator: seeded by the assignment, like all else.
        tch::manual_seed(derive_seed(a.seed, &[5 << 32]) as i64);
        model.set_train(true);
        let inner = &self.job.inner;
        let mut momentum: Vec<Option<Tensor>> = model.parameters().iter().map(|_| None).collect();
        let mut loss_sum = 0.0f64;
        let mut samples = 0u64;
        for step in 0..a.steps {
            let (xs, ys, ws) = batches.next();
            samples += ys.len() as u64;
            let (x, y) = model::batch_tensors(&xs, &ys, batches.features(), self.device);
            let mut w = Tensor::from_slice(&ws).to_device(self.device);
            if let Some(o) = &omega {
                w *= o.weights(model.as_ref(), &x, &y);
            }
            let (value, grads) = match &self.collective {
                None => {
                    let logits = model.forward(&x);
                    let loss = (primitives::cross_entropy(&logits, &y) * w).sum(tch::Kind::Float);
                    let value = loss.f_double_value(&[]).map_err(model::ModelError::from)?;
                    // Fresh gradients, as torch's zero_grad(set_to_none) then backward: no
                    // pass to zero them and none to accumulate into them.
                    let grads = if value.is_finite() {
                        primitives::gradient(model.as_ref(), &loss)
                    } else {
                        Vec::new()
                    };
                    (value, grads)
                }
                Some(c) => shared_step(model.as_ref(), c.as_ref(), &x, &y, &w)?,
            };
            if !value.is_finite() {
                return Err(TrainError::Diverged { step });
            }
            loss_sum += value;
            sgd_step(
                model.parameters(),
                &grads,
                &mut momentum,
                inner.lr,
                inner.momentum,
                inner.weight_decay,
            );
        }
        model.set_train(false);
        if self.collective.as_ref().is_some_and(|c| c.rank() > 0) {
            return Ok(None);
        }
        let mut delta = model::to_bundle(model.as_ref())?;
        for (d, b) in delta.tensors.iter_mut().zip(&base.tensors) {
            for (x, y) in d.data.iter_mut().zip(&b.data) {
                *x -= *y;
            }
        }
        let (meta_loss, domain_stats) =
            self.meta_signals(model.as_ref(), a, asks.hypergradient, asks.target_rows.as_deref())?;
        let probes = match asks.probe_losses {
            Some(n) => self.probe_losses(model.as_ref(), a, n)?,
            None => Vec::new(),
        };
        let omega_grad = match &omega {
            Some(o) => self.omega_gradient(model.as_ref(), o, a)?,
            None => Vec::new(),
        };
        Ok(Some(AssignmentOutcome {
            delta,
            mean_loss: (loss_sum / f64::from(a.steps.max(1))) as f32,
            samples,
            seconds: start.elapsed().as_secs_f32(),
            meta_loss,
            domains: domain_stats,
            omega_grad,
            probes,
        }))
    }

    /// The batch stream of an assignment, from the data it names.
    fn batches<'a>(&'a self, a: &Assignment, weights: &'a [f64]) -> Result<Batches<'a>, TrainError> {
        let batch = self.job.inner.batch_size as usize;
        let single = |data: &'a Dataset, tag: u64| Batches::Single {
            data,
            sampler: Sampler::new((0..data.len()).collect(), derive_seed(a.seed, &[tag])),
            batch,
        };
        match a.data {
            TrainOn::Mixture => {
                let k = self.domains.len();
                let mut samplers = Vec::with_capacity(k);
                for (i, d) in self.domains.iter().enumerate() {
                    let range = d.shard_range(a.shard, self.job.shards);
                    if range.is_empty() {
                        return Err(TrainError::EmptyShard {
                            domain: self.job.domains[i].name.clone(),
                            shard: a.shard,
                            shards: self.job.shards,
                            samples: d.len(),
                        });
                    }
                    samplers.push(Sampler::new(range.collect(), derive_seed(a.seed, &[i as u64])));
                }
                Ok(Batches::Mixture {
                    domains: &self.domains,
                    samplers,
                    weights,
                    per_domain: (batch / k).max(1),
                })
            }
            TrainOn::Domain(i) => {
                let d = self.domains.get(i as usize).ok_or_else(|| {
                    TrainError::Mismatch(format!(
                        "assignment names domain {i}; the job has {}",
                        self.domains.len()
                    ))
                })?;
                Ok(single(d, u64::from(i)))
            }
            TrainOn::Meta => Ok(single(self.meta.as_ref().ok_or(TrainError::NoMeta)?, 6 << 32)),
        }
    }

    /// A batch drawn like an inner-loop batch (its share from every domain's shard), from the
    /// assignment's stream `tag`.
    fn draw(&self, a: &Assignment, tag: u64) -> (Tensor, Tensor) {
        let k = self.domains.len();
        let per_domain = (self.job.inner.batch_size as usize / k).max(1);
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for (i, d) in self.domains.iter().enumerate() {
            let rows: Vec<usize> = d.shard_range(a.shard, self.job.shards).collect();
            let mut sampler = Sampler::new(rows, derive_seed(a.seed, &[tag, i as u64]));
            gather(d, &sampler.next(per_domain), &mut xs, &mut ys);
        }
        model::batch_tensors(&xs, &ys, self.domains[0].features, self.device)
    }

    /// Ω's meta-gradient through one virtual step at the current θ, on a fresh training batch.
    fn omega_gradient(&self, model: &dyn Model, omega: &Omega, a: &Assignment) -> Result<Vec<SmallTensor>, TrainError> {
        let (x, y) = self.draw(a, 3 << 32);
        let f = omega.features(model, &x, &y);
        let meta;
        let (vx, vy, vf);
        let val = match omega.mode {
            RescaleMode::CleanMeta => {
                let m = self.meta.as_ref().ok_or(TrainError::NoMeta)?;
                meta = model::batch_tensors(&m.x, &m.y, m.features, self.device);
                Validation::Clean { x: &meta.0, y: &meta.1 }
            }
            RescaleMode::SelfTaught => {
                (vx, vy) = self.draw(a, 4 << 32);
                vf = omega.features(model, &vx, &vy);
                Validation::SelfTaught {
                    x: &vx,
                    y: &vy,
                    features: &vf,
                }
            }
        };
        let batch = Batch {
            x: &x,
            y: &y,
            features: &f,
        };
        let step = VirtualStep {
            alpha: self.job.inner.lr,
            normalize: omega.normalize,
            directional: omega.directional,
        };
        let (grads, _) = rescaler::meta_gradient(model, omega.model.as_ref(), &batch, &val, step);
        grads
            .iter()
            .zip(omega.model.names())
            .map(|(g, name)| {
                let data = Vec::<f32>::try_from(g.to_kind(tch::Kind::Float).contiguous().view(-1))
                    .map_err(model::ModelError::from)?;
                Ok(SmallTensor {
                    name: name.clone(),
                    shape: g.size().iter().map(|&d| d as u32).collect(),
                    data,
                })
            })
            .collect()
    }

    /// Rows of domain `i`'s shard that probe the model after an assignment (seeded by it).
    fn probe_rows(&self, a: &Assignment, i: usize, probe: u32) -> Vec<usize> {
        let mut rows: Vec<usize> = self.domains[i].shard_range(a.shard, self.job.shards).collect();
        SplitMix64::new(derive_seed(a.seed, &[1 << 32, i as u64])).shuffle(&mut rows);
        rows.truncate(probe.max(1) as usize);
        rows
    }

    /// Every domain's per-sample losses on its probe at the current θ (for DoReMi).
    fn probe_losses(&self, model: &dyn Model, a: &Assignment, probe: u32) -> Result<Vec<DomainProbe>, TrainError> {
        let mut out = Vec::with_capacity(self.domains.len());
        for (i, d) in self.domains.iter().enumerate() {
            let rows = self.probe_rows(a, i, probe);
            let (mut xs, mut ys) = (Vec::new(), Vec::new());
            gather(d, &rows, &mut xs, &mut ys);
            let (x, y) = model::batch_tensors(&xs, &ys, d.features, self.device);
            let l = tch::no_grad(|| primitives::per_sample_loss(model, &x, &y)).to_kind(tch::Kind::Float);
            let losses = Vec::<f32>::try_from(&l).map_err(model::ModelError::from)?;
            out.push(DomainProbe {
                rows: rows.iter().map(|&r| r as u32).collect(),
                losses,
            });
        }
        Ok(out)
    }

    /// The meta loss at the current θ and, when asked, every domain's Σ c_i on its probe.
    fn meta_signals(
        &self,
        model: &dyn Model,
        a: &Assignment,
        hyper: Option<HypergradientSpec>,
        target_rows: Option<&[u32]>,
    ) -> Result<(Option<f32>, Vec<DomainStat>), TrainError> {
        let Some(meta) = &self.meta else {
            return Ok((None, Vec::new()));
        };
        let (mx, my) = match target_rows {
            Some(rows) => {
                let rows: Vec<usize> = rows.iter().map(|&r| r as usize).collect();
                if let Some(bad) = rows.iter().find(|&&r| r >= meta.len()) {
                    return Err(TrainError::Mismatch(format!(
                        "target row {bad} is outside the meta set's {} rows",
                        meta.len()
                    )));
                }
                let (mut xs, mut ys) = (Vec::new(), Vec::new());
                gather(meta, &rows, &mut xs, &mut ys);
                model::batch_tensors(&xs, &ys, meta.features, self.device)
            }
            None => model::batch_tensors(&meta.x, &meta.y, meta.features, self.device),
        };
        zero_grads(model.parameters());
        let meta_loss = primitives::per_sample_loss(model, &mx, &my).mean(tch::Kind::Float);
        let value = meta_loss.f_double_value(&[]).map_err(model::ModelError::from)? as f32;
        let Some(h) = hyper else {
            return Ok((Some(value), Vec::new()));
        };
        let v = primitives::gradient(model, &meta_loss);
        let mut stats = Vec::with_capacity(self.domains.len());
        for (i, d) in self.domains.iter().enumerate() {
            let rows = self.probe_rows(a, i, h.probe);
            let (mut xs, mut ys) = (Vec::new(), Vec::new());
            gather(d, &rows, &mut xs, &mut ys);
            let (x, y) = model::batch_tensors(&xs, &ys, d.features, self.device);
            let c = match h.directional {
                DirectionalMethod::Exact => primitives::directional_exact(model, &x, &y, &v),
                DirectionalMethod::FiniteDifference => {
                    primitives::directional_fd(model, &x, &y, &v, primitives::FD_RADIUS)
                }
            };
            let d_sum = c
                .to_kind(tch::Kind::Double)
                .sum(tch::Kind::Double)
                .f_double_value(&[])
                .map_err(model::ModelError::from)?;
            stats.push(DomainStat {
                d_sum,
                count: rows.len() as u64,
            });
        }
        Ok((Some(value), stats))
    }
}

/// What a round asks of each assignment besides its inner steps: the plan without the model
/// and the assignments.
#[derive(Debug, Clone, Default)]
pub struct RoundAsks {
    /// The inner loss weight of every domain, in job order.
    pub weights: Vec<f64>,
    pub hypergradient: Option<HypergradientSpec>,
    pub rescaler: Option<RescalerPlan>,
    pub probe_losses: Option<u32>,
    pub target_rows: Option<Vec<u32>>,
}

impl RoundAsks {
    pub fn of(plan: &RoundPlan) -> Self {
        Self {
            weights: plan.domain_weights.clone(),
            hypergradient: plan.hypergradient,
            rescaler: plan.rescaler.clone(),
            probe_losses: plan.probe_losses,
            target_rows: plan.target_rows.clone(),
        }
    }

    /// Inner steps with these domain weights and nothing else.
    pub fn weights(weights: &[f64]) -> Self {
        Self {
            weights: weights.to_vec(),
            ..Self::default()
        }
    }
}

/// An assignment's training batches: rows with their loss weights.
enum Batches<'a> {
    /// A share of every domain's shard; domain k's rows weigh w_k / (K·n_k).
    Mixture {
        domains: &'a [Dataset],
        samplers: Vec<Sampler>,
        weights: &'a [f64],
        per_domain: usize,
    },
    /// `batch` rows of one dataset, each weighing 1/n.
    Single {
        data: &'a Dataset,
        sampler: Sampler,
        batch: usize,
    },
}

impl Batches<'_> {
    fn next(&mut self) -> (Vec<f32>, Vec<i64>, Vec<f32>) {
        let (mut xs, mut ys, mut ws) = (Vec::new(), Vec::new(), Vec::new());
        match self {
            Batches::Mixture {
                domains,
                samplers,
                weights,
                per_domain,
            } => {
                let k = domains.len();
                for ((d, sampler), w) in domains.iter().zip(samplers.iter_mut()).zip(weights.iter()) {
                    let rows = sampler.next(*per_domain);
                    gather(d, &rows, &mut xs, &mut ys);
                    ws.extend(std::iter::repeat_n((w / (k * rows.len()) as f64) as f32, rows.len()));
                }
            }
            Batches::Single { data, sampler, batch } => {
                let rows = sampler.next(*batch);
                gather(data, &rows, &mut xs, &mut ys);
                ws.extend(std::iter::repeat_n(1.0 / rows.len() as f32, rows.len()));
            }
        }
        (xs, ys, ws)
    }

    fn features(&self) -> usize {
        match self {
            Batches::Mixture { domains, .. } => domains[0].features,
            Batches::Single { data, .. } => data.features,
        }
    }
}

/// Draws rows from one domain's shard without replacement, reshuffling at each epoch.
struct Sampler {
    order: Vec<usize>,
    cursor: usize,
    rng: SplitMix64,
}

impl Sampler {
    fn new(mut order: Vec<usize>, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        rng.shuffle(&mut order);
        Self { order, cursor: 0, rng }
    }

    fn next(&mut self, n: usize) -> Vec<usize> {
        let n = n.min(self.order.len());
        if self.cursor + n > self.order.len() {
            self.rng.shuffle(&mut self.order);
            self.cursor = 0;
        }
        let rows = self.order[self.cursor..self.cursor + n].to_vec();
        self.cursor += n;
        rows
    }
}

fn gather(d: &Dataset, rows: &[usize], xs: &mut Vec<f32>, ys: &mut Vec<i64>) {
    let f = d.features;
    for &i in rows {
        xs.extend_from_slice(&d.x[i * f..(i + 1) * f]);
        ys.push(d.y[i]);
    }
}

fn zero_grads(params: &[Tensor]) {
    for p in params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

fn same_data(what: &str, path: &str, ds: &Dataset, theirs: [u8; 32]) -> Result<(), TrainError> {
    let ours = domains::dataset_checksum(ds);
    if ours == theirs {
        Ok(())
    } else {
        Err(TrainError::DataMismatch {
            what: what.into(),
            path: path.into(),
            ours: hex(&ours[..8]),
            theirs: hex(&theirs[..8]),
        })
    }
}

fn verify(params: &Bundle, checksum: [u8; 32], version: u64) -> Result<(), TrainError> {
    let got = bundle_checksum(params);
    if got == checksum {
        Ok(())
    } else {
        Err(TrainError::Mismatch(format!(
            "version {version}: checksum {} differs from the coordinator's {}",
            hex(&got[..8]),
            hex(&checksum[..8])
        )))
    }
}

/// One inner step's loss and gradients when the batch is shared among replicas. This
/// replica's rows' part of the weighted loss Σ_i w_i ℓ_i is backpropagated; then its gradients
/// and its loss, flattened into one buffer (the loss last), are summed over the replicas in
/// one all-reduce, so every replica gets the whole batch's gradient and loss and takes the
/// same decision on divergence. Returns the total loss and the summed gradients (views of the
/// buffer, shaped like the parameters).
fn shared_step(
    model: &dyn Model,
    collective: &dyn Collective,
    x: &Tensor,
    y: &Tensor,
    w: &Tensor,
) -> Result<(f64, Vec<Tensor>), TrainError> {
    zero_grads(model.parameters());
    let rows = collective::share(y.size()[0] as usize, collective.rank(), collective.size());
    let (start, len) = (rows.start as i64, rows.len() as i64);
    let logits = model.forward(&x.narrow(0, start, len));
    let loss =
        (primitives::cross_entropy(&logits, &y.narrow(0, start, len)) * w.narrow(0, start, len)).sum(tch::Kind::Float);
    loss.backward();
    let params = model.parameters();
    let mut parts: Vec<Tensor> = params
        .iter()
        .map(|p| {
            let g = p.grad();
            // A replica with no rows (a batch smaller than the replica count) adds nothing.
            let g = if g.defined() { g } else { p.zeros_like() };
            g.reshape([-1])
        })
        .collect();
    parts.push(loss.detach().reshape([1]));
    let mut flat = Tensor::f_cat(&parts, 0).map_err(model::ModelError::from)?;
    collective.all_reduce_sum(&mut flat)?;
    let total = flat.numel() as i64;
    let value = flat.f_double_value(&[total - 1]).map_err(model::ModelError::from)?;
    let mut offset = 0;
    let grads = params
        .iter()
        .map(|p| {
            let n = p.numel() as i64;
            let g = flat.narrow(0, offset, n).view_as(p);
            offset += n;
            g
        })
        .collect();
    Ok((value, grads))
}

/// PyTorch's SGD: g ← ∇ + wd·θ; b ← μ·b + g (b = g on the first step); θ ← θ − lr·b. `grads`
/// are the parameters' gradients, in their order (undefined ones are skipped).
fn sgd_step(params: &[Tensor], grads: &[Tensor], momentum: &mut [Option<Tensor>], lr: f64, mu: f64, wd: f64) {
    tch::no_grad(|| {
        for ((p, g), buf) in params.iter().zip(grads).zip(momentum.iter_mut()) {
            if !g.defined() {
                continue;
            }
            // In place, as torch.optim.SGD: no temporary the size of the model.
            let mut g = g.shallow_clone();
            if wd != 0.0 {
                primitives::axpy(&mut g, wd, p);
            }
            let b = match buf.take() {
                Some(mut b) if mu != 0.0 => {
                    let _ = b.f_mul_scalar_(mu).and_then(|_| b.f_add_(&g));
                    b
                }
                _ => g.copy(),
            };
            let mut p = p.shallow_clone();
            primitives::axpy(&mut p, -lr, &b);
            *buf = Some(b);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use metaloop_proto::proto::{InnerSpec, ModelSpec};

    fn job(shards: u32) -> JobSpec {
        JobSpec {
            seed: 1,
            model: ModelSpec::Mlp {
                inputs: 2,
                hidden: vec![8],
                classes: 2,
                dropout: 0.0,
            },
            domains: Vec::new(),
            meta: None,
            shards,
            inner: InnerSpec {
                batch_size: 8,
                lr: 0.1,
                momentum: 0.9,
                weight_decay: 0.0,
            },
            delta_dtype: metaloop_proto::proto::DType::F32,
        }
    }

    /// Two linearly separable blobs.
    fn blobs(n: usize) -> Dataset {
        let mut rng = SplitMix64::new(9);
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..n {
            let c = (i % 2) as i64;
            let centre = if c == 0 { -1.0 } else { 1.0 };
            for _ in 0..2 {
                x.push(centre + (rng.below(1000) as f32 / 1000.0 - 0.5) * 0.5);
            }
            y.push(c);
        }
        Dataset { x, y, features: 2 }
    }

    fn trainer() -> Trainer {
        let mut t = Trainer::with_data(job(2), vec![blobs(64)], None, Device::Cpu);
        let p = model::init_params(&job(2).model, 3);
        t.set_model(0, bundle_checksum(&p), p).expect("set");
        t
    }

    #[test]
    fn assignments_reduce_the_loss_and_replay_identically() {
        let mut t = trainer();
        let a = Assignment {
            index: 0,
            shard: 1,
            steps: 30,
            seed: 5,
            data: TrainOn::Mixture,
        };
        let first = t.run(&a, &RoundAsks::weights(&[1.0])).expect("run");
        let again = t.run(&a, &RoundAsks::weights(&[1.0])).expect("run");
        assert_eq!(
            first.delta, again.delta,
            "same version + same assignment must give the same delta"
        );
        let short = t
            .run(&Assignment { steps: 1, ..a.clone() }, &RoundAsks::weights(&[1.0]))
            .expect("run");
        assert!(
            first.mean_loss < short.mean_loss,
            "{} !< {}",
            first.mean_loss,
            short.mean_loss
        );
        assert_eq!(first.samples, 30 * 8);
    }

    #[test]
    fn data_that_differs_from_the_coordinator_s_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("d.safetensors");
        std::fs::write(&path, dataset::to_safetensors(&blobs(16)).expect("ser")).expect("write");
        let mut spec = job(1);
        spec.domains = vec![metaloop_proto::proto::DomainSpec {
            name: "d".into(),
            source: path.to_string_lossy().into_owned(),
            subset: None,
            label_noise: 0.0,
            permute_labels: false,
            feature_noise: 0.0,
            permute_features: false,
            checksum: domains::dataset_checksum(&blobs(16)),
        }];
        Trainer::new(spec.clone(), Device::Cpu).expect("same data is accepted");
        spec.domains[0].checksum[0] ^= 1;
        let err = Trainer::new(spec, Device::Cpu).expect_err("different data").to_string();
        assert!(
            err.contains("domain `d` differs from the coordinator's") && err.contains("d.safetensors"),
            "{err}"
        );
    }

    #[test]
    fn domain_weights_scale_each_domain_s_loss() {
        // Two copies of the same data, one with a weight of zero: the result must equal
        // training on the other copy alone at the batch share it gets.
        let mut two = Trainer::with_data(job(1), vec![blobs(32), blobs(32)], None, Device::Cpu);
        let p = model::init_params(&job(1).model, 3);
        two.set_model(0, bundle_checksum(&p), p.clone()).expect("set");
        let a = Assignment {
            index: 0,
            shard: 0,
            steps: 3,
            seed: 2,
            data: TrainOn::Mixture,
        };
        let zero = two.run(&a, &RoundAsks::weights(&[2.0, 0.0])).expect("run");
        let even = two.run(&a, &RoundAsks::weights(&[1.0, 1.0])).expect("run");
        assert_ne!(zero.delta, even.delta);
        let mut spec = job(1);
        spec.inner.batch_size = 4;
        let mut one = Trainer::with_data(spec, vec![blobs(32)], None, Device::Cpu);
        one.set_model(0, bundle_checksum(&p), p).expect("set");
        let alone = one.run(&a, &RoundAsks::weights(&[1.0])).expect("run");
        for (x, y) in zero.delta.tensors.iter().zip(&alone.delta.tensors) {
            for (u, v) in x.data.iter().zip(&y.data) {
                assert!((u - v).abs() < 1e-6, "{u} vs {v}");
            }
        }
    }

    #[test]
    fn a_source_assignment_trains_on_its_domain_alone_and_measures_the_target_rows() {
        let p = model::init_params(&job(1).model, 3);
        let flipped = Dataset {
            y: blobs(32).y.iter().map(|y| 1 - y).collect(),
            ..blobs(32)
        };
        let mut two = Trainer::with_data(job(1), vec![flipped, blobs(32)], Some(blobs(10)), Device::Cpu);
        two.set_model(0, bundle_checksum(&p), p.clone()).expect("set");
        let mut one = Trainer::with_data(job(1), vec![blobs(20), blobs(32)], Some(blobs(10)), Device::Cpu);
        one.set_model(0, bundle_checksum(&p), p).expect("set");
        let a = |data| Assignment {
            index: 0,
            shard: 0,
            steps: 4,
            seed: 9,
            data,
        };
        let rows = RoundAsks {
            target_rows: Some(vec![0, 3, 7]),
            ..RoundAsks::weights(&[1.0, 1.0])
        };
        let from_two = two.run(&a(TrainOn::Domain(1)), &rows).expect("run");
        let alone = one.run(&a(TrainOn::Domain(1)), &rows).expect("run");
        assert_eq!(from_two.delta, alone.delta, "the other domain is not touched");
        assert_eq!(from_two.samples, 4 * 8, "batch_size rows of the one domain per step");
        let all_rows = one
            .run(&a(TrainOn::Domain(1)), &RoundAsks::weights(&[1.0, 1.0]))
            .expect("run");
        assert_ne!(
            all_rows.meta_loss, alone.meta_loss,
            "the loss is on the target rows only"
        );
        // Zero steps on the target: θ unchanged, the target loss of θ itself.
        let eval = one
            .run(
                &Assignment {
                    steps: 0,
                    ..a(TrainOn::Meta)
                },
                &rows,
            )
            .expect("run");
        assert!(eval.delta.tensors.iter().all(|t| t.data.iter().all(|&v| v == 0.0)));
        assert!(eval.meta_loss.expect("target loss") > alone.meta_loss.expect("target loss"));
        let bad = RoundAsks {
            target_rows: Some(vec![10]),
            ..RoundAsks::weights(&[1.0, 1.0])
        };
        assert!(one.run(&a(TrainOn::Meta), &bad).is_err(), "row 10 of 10");
        assert!(one
            .run(&a(TrainOn::Domain(2)), &RoundAsks::weights(&[1.0, 1.0]))
            .is_err());
    }

    #[test]
    fn steps_must_chain_from_the_held_version() {
        let mut t = trainer();
        let out = t
            .run(
                &Assignment {
                    index: 0,
                    shard: 0,
                    steps: 3,
                    seed: 1,
                    data: TrainOn::Mixture,
                },
                &RoundAsks::weights(&[1.0]),
            )
            .expect("run");
        let mut next = model::init_params(&job(2).model, 3);
        next.add_assign(&out.delta);
        let sum = bundle_checksum(&next);
        assert!(
            t.apply_step(7, 8, sum, &out.delta).is_err(),
            "wrong base must be refused"
        );
        assert_eq!(t.version(), None, "a refused step drops the model so it is resent");
        let mut t = trainer();
        t.apply_step(0, 1, sum, &out.delta).expect("apply");
        t.check_version(1, sum).expect("held");
        assert!(
            t.apply_step(1, 2, [0; 32], &out.delta).is_err(),
            "checksum mismatch is refused"
        );
    }
}
