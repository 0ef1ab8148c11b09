//! The inner loop on one device: hold the current model version and run assignments on it.
//! Synchronous and socket-free; the client drives it from a compute thread.

use metaloop_common::checksum::{bundle_checksum, hex};
use metaloop_common::dataset::{self, Dataset};
use metaloop_common::model::{self, Model};
use metaloop_common::proto::{Assignment, JobSpec};
use metaloop_common::rng::SplitMix64;
use metaloop_common::tensor::Bundle;
use std::time::Instant;
use tch::{Device, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] dataset::DataError),
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error("no model loaded")]
    NoModel,
    #[error("model mismatch: {0}")]
    Mismatch(String),
    #[error("shard {shard} of {shards} is empty ({samples} samples in the training set)")]
    EmptyShard { shard: u32, shards: u32, samples: usize },
    #[error("training diverged: non-finite loss at inner step {step}")]
    Diverged { step: u32 },
}

/// What one assignment produced.
#[derive(Debug)]
pub struct AssignmentOutcome {
    /// θ_after − θ_before.
    pub delta: Bundle,
    pub mean_loss: f32,
    pub samples: u64,
    pub seconds: f32,
}

/// The worker's model state and data.
pub struct Trainer {
    job: JobSpec,
    data: Dataset,
    device: Device,
    /// Host copy of the current version: the base every assignment starts from.
    params: Option<Bundle>,
    version: Option<u64>,
    model: Option<Box<dyn Model>>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Trainer {
    /// Loads the job's training data.
    ///
    /// # Errors
    /// When the data file is missing or malformed.
    pub fn new(job: JobSpec, device: Device) -> Result<Self, TrainError> {
        let metaloop_common::proto::ModelSpec::Mlp { classes, .. } = &job.model;
        let data = dataset::load(std::path::Path::new(&job.train_path), *classes)?;
        Ok(Self::with_data(job, data, device))
    }

    pub fn with_data(job: JobSpec, data: Dataset, device: Device) -> Self {
        Self {
            job,
            data,
            device,
            params: None,
            version: None,
            model: None,
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

    /// Runs one assignment: `steps` SGD-with-momentum steps on minibatches of its shard, drawn
    /// by the assignment's own seed, starting from the held version. Deterministic in
    /// (model version, assignment).
    ///
    /// # Errors
    /// `NoModel`, `EmptyShard`, `Diverged`, or a libtorch failure.
    pub fn run(&mut self, a: &Assignment) -> Result<AssignmentOutcome, TrainError> {
        let start = Instant::now();
        let (Some(model), Some(base)) = (&self.model, &self.params) else {
            return Err(TrainError::NoModel);
        };
        model::load_bundle(model.as_ref(), base)?;
        let range = self.data.shard_range(a.shard, self.job.shards);
        if range.is_empty() {
            return Err(TrainError::EmptyShard {
                shard: a.shard,
                shards: self.job.shards,
                samples: self.data.len(),
            });
        }
        let inner = &self.job.inner;
        let batch = (inner.batch_size as usize).min(range.len());
        let mut order: Vec<usize> = range.collect();
        let mut rng = SplitMix64::new(a.seed);
        rng.shuffle(&mut order);
        let mut cursor = 0;
        let mut momentum: Vec<Option<Tensor>> = model.parameters().iter().map(|_| None).collect();
        let mut loss_sum = 0.0f64;
        let f = self.data.features;
        for step in 0..a.steps {
            if cursor + batch > order.len() {
                rng.shuffle(&mut order);
                cursor = 0;
            }
            let idx = &order[cursor..cursor + batch];
            cursor += batch;
            let mut xs = Vec::with_capacity(batch * f);
            let mut ys = Vec::with_capacity(batch);
            for &i in idx {
                xs.extend_from_slice(&self.data.x[i * f..(i + 1) * f]);
                ys.push(self.data.y[i]);
            }
            let (x, y) = model::batch_tensors(&xs, &ys, f, self.device);
            for p in model.parameters() {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            let loss = model.forward(&x).cross_entropy_for_logits(&y);
            let value = loss.f_double_value(&[]).map_err(model::ModelError::from)?;
            if !value.is_finite() {
                return Err(TrainError::Diverged { step });
            }
            loss_sum += value;
            loss.backward();
            sgd_step(
                model.parameters(),
                &mut momentum,
                inner.lr,
                inner.momentum,
                inner.weight_decay,
            );
        }
        let mut delta = model::to_bundle(model.as_ref())?;
        for (d, b) in delta.tensors.iter_mut().zip(&base.tensors) {
            for (x, y) in d.data.iter_mut().zip(&b.data) {
                *x -= *y;
            }
        }
        Ok(AssignmentOutcome {
            delta,
            mean_loss: (loss_sum / f64::from(a.steps.max(1))) as f32,
            samples: u64::from(a.steps) * batch as u64,
            seconds: start.elapsed().as_secs_f32(),
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

/// PyTorch's SGD: g ← ∇ + wd·θ; b ← μ·b + g (b = g on the first step); θ ← θ − lr·b.
fn sgd_step(params: &[Tensor], momentum: &mut [Option<Tensor>], lr: f64, mu: f64, wd: f64) {
    tch::no_grad(|| {
        for (p, buf) in params.iter().zip(momentum.iter_mut()) {
            let mut g = p.grad();
            if !g.defined() {
                continue;
            }
            if wd != 0.0 {
                g += p * wd;
            }
            let b = match buf.take() {
                Some(b) if mu != 0.0 => b * mu + &g,
                _ => g.copy(),
            };
            let mut p = p.shallow_clone();
            let _ = p.f_sub_(&(&b * lr));
            *buf = Some(b);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use metaloop_common::proto::{InnerSpec, ModelSpec};

    fn job(shards: u32) -> JobSpec {
        JobSpec {
            seed: 1,
            model: ModelSpec::Mlp {
                inputs: 2,
                hidden: vec![8],
                classes: 2,
            },
            train_path: String::new(),
            shards,
            inner: InnerSpec {
                batch_size: 8,
                lr: 0.1,
                momentum: 0.9,
                weight_decay: 0.0,
            },
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
        let mut t = Trainer::with_data(job(2), blobs(64), Device::Cpu);
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
        };
        let first = t.run(&a).expect("run");
        let again = t.run(&a).expect("run");
        assert_eq!(
            first.delta, again.delta,
            "same version + same assignment must give the same delta"
        );
        let short = t.run(&Assignment { steps: 1, ..a.clone() }).expect("run");
        assert!(
            first.mean_loss < short.mean_loss,
            "{} !< {}",
            first.mean_loss,
            short.mean_loss
        );
        assert_eq!(first.samples, 30 * 8);
    }

    #[test]
    fn steps_must_chain_from_the_held_version() {
        let mut t = trainer();
        let out = t
            .run(&Assignment {
                index: 0,
                shard: 0,
                steps: 3,
                seed: 1,
            })
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
