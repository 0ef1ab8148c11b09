//! One model replica on one device: hold the current model version and run assignments on it
//! (check → load → inner steps → delta → the round's signal). Synchronous and socket-free; the
//! engine drives it from a compute thread, one `Trainer` per replica when a worker has several
//! devices. The job's data and batches are in `data`, the inner steps in `inner`, each
//! strategy's signal in `signal`.

use crate::collective::{Collective, CollectiveError};
use crate::data::TrainingData;
use crate::inner;
use crate::signal;
use metaloop_common::autocast;
use metaloop_common::data::Data;
use metaloop_common::model::{self, Model};
use metaloop_proto::checksum::{bundle_checksum, hex};
use metaloop_proto::dataset;
use metaloop_proto::domains::DomainError;
use metaloop_proto::proto::{Ask, Assignment, Autocast, JobSpec, RoundPlan, Signal, TrainOn};
use metaloop_proto::tensor::Bundle;
use std::time::Instant;
use tch::Device;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] dataset::DataError),
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error(transparent)]
    Load(#[from] metaloop_common::data::LoadError),
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
    /// The answer to the round's ask.
    pub signal: Signal,
}

/// The worker's model state and data: the whole worker, or one replica of it.
pub struct Trainer {
    data: TrainingData,
    device: Device,
    /// Host copy of the current version: the base every assignment starts from.
    params: Option<Bundle>,
    /// The version held and its checksum (the coordinator's, which the bytes were checked
    /// against when they arrived in full, or reached from there by exact updates).
    version: Option<(u64, [u8; 32])>,
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

    pub fn with_data(job: JobSpec, domains: Vec<Data>, meta: Option<Data>, device: Device) -> Self {
        Self::replica(TrainingData::new(job, domains, meta), device, None)
    }

    /// One replica on `device`; `collective` joins it to the others (`None`: it is alone).
    pub(crate) fn replica(data: TrainingData, device: Device, collective: Option<Box<dyn Collective>>) -> Self {
        Self {
            data,
            device,
            params: None,
            version: None,
            model: None,
            collective,
        }
    }

    /// The model version held, if any.
    pub fn version(&self) -> Option<u64> {
        self.version.map(|(v, _)| v)
    }

    /// Replaces the model with full parameters of `version`, checked against `checksum`.
    ///
    /// # Errors
    /// `Mismatch` when the bytes do not hash to the checksum; `Model` for a wrong layout.
    pub fn set_model(&mut self, version: u64, checksum: [u8; 32], params: Bundle) -> Result<(), TrainError> {
        self.version = None;
        verify(&params, checksum, version)?;
        let mut model = model::build(&self.data.job().model, &params, self.device)?;
        if self.data.job().inner.autocast == Autocast::Bf16 {
            model = Box::new(autocast::Bf16::new(model, self.device));
        }
        self.model = Some(model);
        self.params = Some(params);
        self.version = Some((version, checksum));
        Ok(())
    }

    /// Applies the coordinator's exact update `step` to version `base`, giving `version`.
    ///
    /// The result is not hashed again: `base` was checked (in full, or by induction from a
    /// version that was), the coordinator made `version` from it by this same f32 addition
    /// of these same bytes (`Bundle::add_assign`), and TLS delivered them intact, so the
    /// bytes are the coordinator's by construction. The model keeps its tensors: every
    /// assignment loads the parameters into it first.
    ///
    /// # Errors
    /// `Mismatch` when we do not hold `base` or the layouts differ; the model is then dropped
    /// so the coordinator resends it in full.
    pub fn apply_step(&mut self, base: u64, version: u64, checksum: [u8; 32], step: &Bundle) -> Result<(), TrainError> {
        let held = self.version.take().map(|(v, _)| v);
        if held != Some(base) {
            self.params = None;
            return Err(TrainError::Mismatch(format!(
                "update is for version {base}, we hold {held:?}"
            )));
        }
        let mut params = self.params.take().ok_or(TrainError::NoModel)?;
        if !params.same_layout(step) {
            return Err(TrainError::Mismatch("update layout differs from the model".into()));
        }
        params.add_assign(step);
        self.params = Some(params);
        self.version = Some((version, checksum));
        Ok(())
    }

    /// Confirms we hold `version` with `checksum` (the one we were given for it: the bytes
    /// are not hashed again).
    ///
    /// # Errors
    /// `Mismatch` otherwise.
    pub fn check_version(&self, version: u64, checksum: [u8; 32]) -> Result<(), TrainError> {
        match self.version {
            Some((v, held)) if v == version && held == checksum => Ok(()),
            Some((v, held)) if v == version => Err(TrainError::Mismatch(format!(
                "version {version}: checksum {} differs from the coordinator's {}",
                hex(&held[..8]),
                hex(&checksum[..8])
            ))),
            held => Err(TrainError::Mismatch(format!(
                "need version {version}, hold {:?}",
                held.map(|(v, _)| v)
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
        let data = &self.data;
        let k = data.domains().len();
        if asks.weights.len() != k {
            return Err(TrainError::Weights {
                got: asks.weights.len(),
                want: k,
            });
        }
        if a.data == TrainOn::Meta && data.meta().is_none() {
            return Err(TrainError::NoMeta);
        }
        let producer = signal::producer(&asks.ask, data, self.device)?;
        let mut batches = data.batches(a, &asks.weights)?;
        model::load_bundle(model.as_ref(), base)?;
        let trained = inner::train(
            model.as_ref(),
            self.collective.as_deref(),
            &data.job().inner,
            &mut batches,
            a,
            asks.round,
            self.device,
            |m, x, y| producer.sample_weights(m, x, y),
        )?;
        if self.collective.as_ref().is_some_and(|c| c.rank() > 0) {
            return Ok(None);
        }
        let mut delta = model::to_bundle(model.as_ref())?;
        for (d, b) in delta.tensors.iter_mut().zip(&base.tensors) {
            for (x, y) in d.data.iter_mut().zip(&b.data) {
                *x -= *y;
            }
        }
        let (meta_loss, signal) = producer.answer(&signal::At {
            model: model.as_ref(),
            data,
            a,
            device: self.device,
        })?;
        Ok(Some(AssignmentOutcome {
            delta,
            mean_loss: (trained.loss_sum / f64::from(a.steps.max(1))) as f32,
            samples: trained.samples,
            seconds: start.elapsed().as_secs_f32(),
            meta_loss,
            signal,
        }))
    }
}

/// What a round asks of each assignment besides its inner steps: the plan without the model
/// and the assignments.
#[derive(Debug, Clone)]
pub struct RoundAsks {
    /// The round: where the learning-rate schedule of its assignments' inner steps starts.
    pub round: u64,
    /// The inner loss weight of every domain, in job order.
    pub weights: Vec<f64>,
    pub ask: Ask,
}

impl Default for RoundAsks {
    fn default() -> Self {
        Self {
            round: 0,
            weights: Vec::new(),
            ask: Ask::Nothing,
        }
    }
}

impl RoundAsks {
    pub fn of(plan: &RoundPlan) -> Self {
        Self {
            round: plan.round,
            weights: plan.domain_weights.clone(),
            ask: plan.ask.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use metaloop_proto::dataset::Dataset;
    use metaloop_proto::domains;
    use metaloop_proto::proto::{InnerSpec, ModelSpec};
    use metaloop_proto::rng::SplitMix64;

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
                ..InnerSpec::default()
            },
            delta_dtype: metaloop_proto::proto::DType::F32,
            text: None,
            meta_batch: 0,
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
        let mut t = Trainer::with_data(job(2), vec![Data::Dense(blobs(64))], None, Device::Cpu);
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
            labels: None,
            token_noise: 0.0,
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
        let mut two = Trainer::with_data(
            job(1),
            vec![Data::Dense(blobs(32)), Data::Dense(blobs(32))],
            None,
            Device::Cpu,
        );
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
        let mut one = Trainer::with_data(spec, vec![Data::Dense(blobs(32))], None, Device::Cpu);
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
        let mut two = Trainer::with_data(
            job(1),
            vec![Data::Dense(flipped), Data::Dense(blobs(32))],
            Some(Data::Dense(blobs(10))),
            Device::Cpu,
        );
        two.set_model(0, bundle_checksum(&p), p.clone()).expect("set");
        let mut one = Trainer::with_data(
            job(1),
            vec![Data::Dense(blobs(20)), Data::Dense(blobs(32))],
            Some(Data::Dense(blobs(10))),
            Device::Cpu,
        );
        one.set_model(0, bundle_checksum(&p), p).expect("set");
        let a = |data| Assignment {
            index: 0,
            shard: 0,
            steps: 4,
            seed: 9,
            data,
        };
        let rows = RoundAsks {
            ask: Ask::TaskPolicy {
                target_rows: vec![0, 3, 7],
            },
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
            ask: Ask::TaskPolicy { target_rows: vec![10] },
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
        // Not hashed on arrival, but the same bytes as the coordinator's by construction.
        verify(t.params.as_ref().expect("params"), sum, 1).expect("the coordinator's bytes");
        assert!(
            t.check_version(1, [0; 32]).is_err(),
            "another checksum for the version held is refused"
        );
        assert!(t.check_version(2, sum).is_err(), "a version not held is refused");
        let mut t = trainer();
        assert!(
            t.set_model(1, [0; 32], next.clone()).is_err(),
            "full parameters that do not hash to the checksum are refused"
        );
        assert_eq!(t.version(), None);
    }
}
