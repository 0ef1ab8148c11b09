//! A job's data on a worker: its domains and meta set, loaded once and shared by the replicas,
//! and the batches an assignment draws from them (all functions of the assignment's seed).

use crate::train::TrainError;
use metaloop_common::data::{self, Data, Rows};
use metaloop_common::model::Inputs;
use metaloop_proto::checksum::hex;
use metaloop_proto::domains;
use metaloop_proto::proto::{Assignment, JobSpec, TrainOn};
use metaloop_proto::rng::{derive_seed, SplitMix64};
use std::sync::Arc;
use tch::{Device, Tensor};

/// A job's training data, loaded once per worker and shared by its replicas.
#[derive(Clone)]
pub(crate) struct TrainingData {
    job: JobSpec,
    /// One data set per training domain, in job order.
    domains: Arc<[Data]>,
    meta: Option<Arc<Data>>,
}

impl TrainingData {
    /// Builds the job's domains and loads its meta set, checking both against the
    /// coordinator's checksums.
    ///
    /// # Errors
    /// A missing or malformed file, or data that differs from the coordinator's.
    pub(crate) fn load(job: JobSpec) -> Result<Self, TrainError> {
        let classes = job.model.classes();
        let text = job.text.as_ref();
        let mut built = Vec::with_capacity(job.domains.len());
        for (i, spec) in job.domains.iter().enumerate() {
            let (d, _) = data::build_domain(&domains::from_spec(spec), i, classes, job.seed, text)?;
            same_data(&format!("domain `{}`", spec.name), &spec.source, &d, spec.checksum)?;
            built.push(d);
        }
        let meta = match &job.meta {
            Some(r) => {
                let subset = r.subset.map(|(start, count)| (start as usize, count as usize));
                let d = data::load_set(std::path::Path::new(&r.path), subset, classes, text, "the meta set")?;
                same_data("the meta set", &r.path, &d, r.checksum)?;
                Some(d)
            }
            None => None,
        };
        Ok(Self::new(job, built, meta))
    }

    pub(crate) fn new(job: JobSpec, domains: Vec<Data>, meta: Option<Data>) -> Self {
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
    pub(crate) fn domains(&self) -> &[Data] {
        &self.domains
    }

    /// The meta set, when the job has one.
    pub(crate) fn meta(&self) -> Option<&Data> {
        self.meta.as_deref()
    }

    /// The assignment's meta batch, when the job has a meta set: `meta_batch` rows drawn
    /// without replacement (seeded by the assignment, so every use within it sees the same
    /// rows), or the whole set when `meta_batch` is 0 or covers it.
    pub(crate) fn meta_batch(&self, a: &Assignment, device: Device) -> Option<(Inputs, Tensor)> {
        let meta = self.meta.as_deref()?;
        let k = self.job.meta_batch as usize;
        let mut rows: Vec<usize> = (0..meta.len()).collect();
        if k > 0 && k < rows.len() {
            SplitMix64::new(derive_seed(a.seed, &[7 << 32])).shuffle(&mut rows);
            rows.truncate(k);
        }
        Some(meta.batch(&rows, device))
    }

    /// The batch stream of an assignment, from the data it names.
    pub(crate) fn batches<'a>(&'a self, a: &Assignment, weights: &'a [f64]) -> Result<Batches<'a>, TrainError> {
        let batch = self.job.inner.batch_size as usize;
        let single = |data: &'a Data, tag: u64| Batches::Single {
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
        let mut batch = Rows::default();
        for (i, d) in self.domains.iter().enumerate() {
            let rows: Vec<usize> = d.shard_range(a.shard, self.job.shards).collect();
            let mut sampler = Sampler::new(rows, derive_seed(a.seed, &[tag, i as u64]));
            batch.push(d, &sampler.next(per_domain));
        }
        batch.tensors(device)
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
        let rows = self.probe_rows(a, i, probe);
        let (x, y) = self.domains[i].batch(&rows, device);
        (rows, x, y)
    }
}

/// An assignment's training batches: rows with their loss weights.
pub(crate) enum Batches<'a> {
    /// A share of every domain's shard; domain k's rows weigh w_k / (K·n_k).
    Mixture {
        domains: &'a [Data],
        samplers: Vec<Sampler>,
        weights: &'a [f64],
        per_domain: usize,
    },
    /// `batch` rows of one dataset, each weighing 1/n.
    Single {
        data: &'a Data,
        sampler: Sampler,
        batch: usize,
    },
}

impl Batches<'_> {
    /// The next batch: its rows and each row's loss weight.
    pub(crate) fn next(&mut self) -> (Rows, Vec<f32>) {
        let (mut batch, mut ws) = (Rows::default(), Vec::new());
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
                    batch.push(d, &rows);
                    ws.extend(std::iter::repeat_n((w / (k * rows.len()) as f64) as f32, rows.len()));
                }
            }
            Batches::Single {
                data,
                sampler,
                batch: n,
            } => {
                let rows = sampler.next(*n);
                batch.push(data, &rows);
                ws.extend(std::iter::repeat_n(1.0 / rows.len() as f32, rows.len()));
            }
        }
        (batch, ws)
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

fn same_data(what: &str, path: &str, d: &Data, theirs: [u8; 32]) -> Result<(), TrainError> {
    let ours = d.checksum();
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
