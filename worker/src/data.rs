//! A job's data on a worker: its domains and meta set, loaded once and shared by the replicas,
//! and the batches an assignment draws from them (all functions of the assignment's seed).

use crate::train::TrainError;
use metaloop_common::model::{self, Inputs};
use metaloop_proto::checksum::hex;
use metaloop_proto::dataset::{self, Dataset};
use metaloop_proto::domains;
use metaloop_proto::proto::{Assignment, JobSpec, ModelSpec, TrainOn};
use metaloop_proto::rng::{derive_seed, SplitMix64};
use std::sync::Arc;
use tch::{Device, Tensor};

/// A job's training data, loaded once per worker and shared by its replicas.
#[derive(Clone)]
pub(crate) struct TrainingData {
    job: JobSpec,
    /// One dataset per training domain, in job order.
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

    /// The training domains, in job order.
    pub(crate) fn domains(&self) -> &[Dataset] {
        &self.domains
    }

    /// The meta set, when the job has one.
    pub(crate) fn meta(&self) -> Option<&Dataset> {
        self.meta.as_deref()
    }

    /// The batch stream of an assignment, from the data it names.
    pub(crate) fn batches<'a>(&'a self, a: &Assignment, weights: &'a [f64]) -> Result<Batches<'a>, TrainError> {
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
    pub(crate) fn draw(&self, a: &Assignment, tag: u64, device: Device) -> (Inputs, Tensor) {
        let k = self.domains.len();
        let per_domain = (self.job.inner.batch_size as usize / k).max(1);
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for (i, d) in self.domains.iter().enumerate() {
            let rows: Vec<usize> = d.shard_range(a.shard, self.job.shards).collect();
            let mut sampler = Sampler::new(rows, derive_seed(a.seed, &[tag, i as u64]));
            gather(d, &sampler.next(per_domain), &mut xs, &mut ys);
        }
        model::batch_tensors(&xs, &ys, self.domains[0].features, device)
    }

    /// Rows of domain `i`'s shard that probe the model after an assignment (seeded by it).
    pub(crate) fn probe_rows(&self, a: &Assignment, i: usize, probe: u32) -> Vec<usize> {
        let mut rows: Vec<usize> = self.domains[i].shard_range(a.shard, self.job.shards).collect();
        SplitMix64::new(derive_seed(a.seed, &[1 << 32, i as u64])).shuffle(&mut rows);
        rows.truncate(probe.max(1) as usize);
        rows
    }

    /// Domain `i`'s probe after an assignment: its rows and their tensors on `device`.
    pub(crate) fn probe(&self, a: &Assignment, i: usize, probe: u32, device: Device) -> (Vec<usize>, Inputs, Tensor) {
        let d = &self.domains[i];
        let rows = self.probe_rows(a, i, probe);
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        gather(d, &rows, &mut xs, &mut ys);
        let (x, y) = model::batch_tensors(&xs, &ys, d.features, device);
        (rows, x, y)
    }
}

/// An assignment's training batches: rows with their loss weights.
pub(crate) enum Batches<'a> {
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
    /// The next batch: features (row-major), labels and each row's loss weight.
    pub(crate) fn next(&mut self) -> (Vec<f32>, Vec<i64>, Vec<f32>) {
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

    /// Features per row.
    pub(crate) fn features(&self) -> usize {
        match self {
            Batches::Mixture { domains, .. } => domains[0].features,
            Batches::Single { data, .. } => data.features,
        }
    }
}

/// Draws rows from one domain's shard without replacement, reshuffling at each epoch.
pub(crate) struct Sampler {
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

/// Appends rows `rows` of `d` to `xs` (features) and `ys` (labels).
pub(crate) fn gather(d: &Dataset, rows: &[usize], xs: &mut Vec<f32>, ys: &mut Vec<i64>) {
    let f = d.features;
    for &i in rows {
        xs.extend_from_slice(&d.x[i * f..(i + 1) * f]);
        ys.push(d.y[i]);
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
