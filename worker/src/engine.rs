//! The worker's compute engine (docs/algorithms.md §2): one [`Trainer`] replica per device, each on its
//! own compute thread. Model updates go to every replica; an assignment runs on all of them at
//! once, each on its share of every batch with the gradients summed through a
//! [`Collective`](crate::collective::Collective), and the first replica's outcome is the
//! worker's. With one device there is one trainer, alone, exactly as without this engine.

use crate::collective;
use crate::data::TrainingData;
use crate::devices;
use crate::train::{AssignmentOutcome, RoundAsks, TrainError, Trainer};
use metaloop_common::compute::{ComputeGone, ComputeThread};
use metaloop_common::model;
use metaloop_proto::proto::{Assignment, JobSpec};
use metaloop_proto::tensor::Bundle;
use std::sync::Arc;
use tch::Device;

type Replica = ComputeThread<Result<Trainer, TrainError>>;

/// One trainer per device, each on its own thread.
pub struct Engine {
    replicas: Vec<Replica>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("replicas", &self.replicas.len())
            .finish()
    }
}

/// Why an engine did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("loading the job's training data: {0}")]
    Data(TrainError),
    #[error("starting the replica on {device}: {reason}")]
    Replica { device: String, reason: String },
    #[error("starting a compute thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error(transparent)]
    Gone(#[from] ComputeGone),
}

impl StartError {
    /// Starting again cannot help (the data or the devices are at fault).
    pub fn is_permanent(&self) -> bool {
        matches!(self, StartError::Data(_) | StartError::Replica { .. })
    }
}

/// The devices a job's replicas use: all of `devices`, except that a model with dropout
/// trains on the first alone. Dropout draws from libtorch's generators, which every replica's
/// thread would share (`tch::manual_seed` seeds them all), so the masks, and the result,
/// would depend on thread timing; and split batches draw other masks than one whole batch.
pub fn replicas_for<'a>(job: &JobSpec, devices: &'a [Device]) -> &'a [Device] {
    if model::has_dropout(&job.model) {
        &devices[..devices.len().min(1)]
    } else {
        devices
    }
}

impl Engine {
    /// Loads the job's data (checked against the coordinator's checksums) and starts one
    /// replica per device (see [`replicas_for`]), each with `threads` libtorch threads.
    ///
    /// # Errors
    /// [`StartError`]: data that cannot be loaded or differs from the coordinator's, a replica
    /// whose device or collective cannot start, or a thread the OS refuses.
    pub async fn start(job: JobSpec, devices: &[Device], threads: usize) -> Result<Self, StartError> {
        let data = tokio::task::spawn_blocking(move || TrainingData::load(job))
            .await
            .map_err(|_| ComputeGone)?
            .map_err(StartError::Data)?;
        Self::from_data(data, devices, threads).await
    }

    pub(crate) async fn from_data(data: TrainingData, devices: &[Device], threads: usize) -> Result<Self, StartError> {
        let devices = replicas_for(data.job(), devices);
        if devices.len() < 2 {
            tracing::info!(device = %devices::name(devices.first().copied().unwrap_or(Device::Cpu)), "one model replica");
        } else {
            let names: Vec<String> = devices.iter().copied().map(devices::name).collect();
            tracing::info!(devices = %names.join(","), "one model replica per device; gradients summed after every inner step");
        }
        let threads = threads.max(1) as i32;
        let connect: Vec<Option<collective::Connect>> = match devices.len() {
            0 | 1 => vec![None],
            _ => collective::group(devices)
                .map_err(|e| StartError::Replica {
                    device: devices.iter().copied().map(devices::name).collect::<Vec<_>>().join(","),
                    reason: e.to_string(),
                })?
                .into_iter()
                .map(Some)
                .collect(),
        };
        let mut replicas = Vec::with_capacity(connect.len());
        for (rank, connect) in connect.into_iter().enumerate() {
            let device = devices.get(rank).copied().unwrap_or(Device::Cpu);
            let data = data.clone();
            let name = match rank {
                0 => "metaloop-compute".to_string(),
                r => format!("metaloop-compute-{r}"),
            };
            replicas.push(ComputeThread::spawn(&name, move || {
                tch::set_num_threads(threads);
                let collective = connect.map(|c| c()).transpose()?;
                Ok(Trainer::replica(data, device, collective))
            })?);
        }
        let engine = Engine { replicas };
        let started = engine.on_all(|t| t.as_ref().err().map(ToString::to_string)).await?;
        if let Some((rank, reason)) = started.into_iter().enumerate().find_map(|(r, e)| Some((r, e?))) {
            return Err(StartError::Replica {
                device: devices::name(devices.get(rank).copied().unwrap_or(Device::Cpu)),
                reason,
            });
        }
        Ok(engine)
    }

    /// [`Trainer::set_model`] on every replica.
    ///
    /// # Errors
    /// The first replica's error, in rank order; [`ComputeGone`] when a replica's thread died.
    pub async fn set_model(
        &self,
        version: u64,
        checksum: [u8; 32],
        params: Bundle,
    ) -> Result<Result<(), TrainError>, ComputeGone> {
        let params = Arc::new(params);
        let results = self
            .on_all(move |t| trainer(t)?.set_model(version, checksum, Bundle::clone(&params)))
            .await?;
        Ok(first_error(results).map(|_| ()))
    }

    /// [`Trainer::apply_step`] on every replica.
    ///
    /// # Errors
    /// As [`Engine::set_model`].
    pub async fn apply_step(
        &self,
        base: u64,
        version: u64,
        checksum: [u8; 32],
        step: Bundle,
    ) -> Result<Result<(), TrainError>, ComputeGone> {
        let step = Arc::new(step);
        let results = self
            .on_all(move |t| trainer(t)?.apply_step(base, version, checksum, &step))
            .await?;
        Ok(first_error(results).map(|_| ()))
    }

    /// [`Trainer::check_version`] on every replica.
    ///
    /// # Errors
    /// As [`Engine::set_model`].
    pub async fn check_version(&self, version: u64, checksum: [u8; 32]) -> Result<Result<(), TrainError>, ComputeGone> {
        let results = self
            .on_all(move |t| trainer(t)?.check_version(version, checksum))
            .await?;
        Ok(first_error(results).map(|_| ()))
    }

    /// Runs an assignment on every replica at once; the first replica's outcome.
    ///
    /// # Errors
    /// As [`Engine::set_model`].
    pub async fn run(
        &self,
        a: Assignment,
        asks: Arc<RoundAsks>,
    ) -> Result<Result<AssignmentOutcome, TrainError>, ComputeGone> {
        let a = Arc::new(a);
        let results = self.on_all(move |t| trainer(t)?.run_replica(&a, &asks)).await?;
        Ok(first_error(results).and_then(|mut outcomes| {
            outcomes
                .swap_remove(0)
                .ok_or_else(|| TrainError::Mismatch("the first replica returned no result".into()))
        }))
    }

    /// Gives every replica `f` before awaiting any, since replicas in an all-reduce wait for
    /// each other; their results in rank order.
    async fn on_all<R, F>(&self, f: F) -> Result<Vec<R>, ComputeGone>
    where
        R: Send + 'static,
        F: Fn(&mut Result<Trainer, TrainError>) -> R + Clone + Send + 'static,
    {
        let pending = self
            .replicas
            .iter()
            .map(|r| r.submit(f.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::with_capacity(pending.len());
        for p in pending {
            out.push(p.await?);
        }
        Ok(out)
    }
}

/// Every replica's value, or the first error in rank order.
fn first_error<T>(results: Vec<Result<T, TrainError>>) -> Result<Vec<T>, TrainError> {
    results.into_iter().collect()
}

fn trainer(t: &mut Result<Trainer, TrainError>) -> Result<&mut Trainer, TrainError> {
    t.as_mut()
        .map_err(|e| TrainError::Mismatch(format!("trainer unavailable: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use metaloop_common::data::Data;
    use metaloop_common::model;
    use metaloop_proto::checksum::bundle_checksum;
    use metaloop_proto::dataset::Dataset;
    use metaloop_proto::features::Feature;
    use metaloop_proto::proto::{
        Ask, DirectionalMethod, HypergradientSpec, InnerOptimizer, InnerSpec, LrDecay, LrSchedule, ModelSpec,
        RescaleMode, RescalerPlan, Signal, SmallTensor, TrainOn,
    };
    use metaloop_proto::rng::SplitMix64;

    /// The tolerance of replicas against one replica on the whole batch: only the order of
    /// float32 additions differs, so |a − b| ≤ TOL · (1 + |a|) for every value returned.
    const TOL: f64 = 1e-5;

    fn job(batch: u32, dropout: f32) -> JobSpec {
        JobSpec {
            seed: 1,
            model: ModelSpec::Mlp {
                inputs: 3,
                hidden: vec![16],
                classes: 3,
                dropout,
            },
            domains: Vec::new(),
            meta: None,
            shards: 2,
            inner: InnerSpec {
                batch_size: batch,
                lr: 0.2,
                momentum: 0.9,
                weight_decay: 1e-3,
                ..InnerSpec::default()
            },
            delta_dtype: metaloop_proto::proto::DType::F32,
            text: None,
            meta_batch: 0,
        }
    }

    /// Three classes around three centres in 3-D; every `flip`-th label is wrong (0: none).
    fn data(n: usize, seed: u64, flip: usize) -> Data {
        let mut rng = SplitMix64::new(seed);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for i in 0..n {
            let c = i % 3;
            for d in 0..3 {
                let centre = if d == c { 1.5 } else { -0.5 };
                x.push(centre + (rng.below(2001) as f32 / 1000.0 - 1.0));
            }
            let wrong = flip > 0 && i % flip == 0;
            y.push(if wrong { ((c + 1) % 3) as i64 } else { c as i64 });
        }
        Data::Dense(Dataset { x, y, features: 3 })
    }

    fn training_data(batch: u32) -> TrainingData {
        TrainingData::new(
            job(batch, 0.0),
            vec![data(60, 1, 0), data(60, 2, 3)],
            Some(data(24, 3, 0)),
        )
    }

    fn params() -> Bundle {
        model::init_params(&job(1, 0.0).model, 5)
    }

    async fn engine(devices: &[Device], batch: u32) -> Engine {
        let e = Engine::from_data(training_data(batch), devices, 1)
            .await
            .expect("start");
        let p = params();
        e.set_model(0, bundle_checksum(&p), p)
            .await
            .expect("alive")
            .expect("set");
        e
    }

    fn omega(mode: RescaleMode, directional: DirectionalMethod) -> RescalerPlan {
        let features = [Feature::Loss, Feature::LabelProb, Feature::Entropy, Feature::Progress];
        let spec = ModelSpec::Mlp {
            inputs: features.len() as u32,
            hidden: vec![6],
            classes: 1,
            dropout: 0.0,
        };
        RescalerPlan {
            mode,
            omega: SmallTensor::from_bundle(model::init_params(&spec, 8)),
            features: features.iter().map(|f| f.code()).collect(),
            normalize: true,
            directional,
            progress: 0.3,
            passes: 1,
        }
    }

    /// Assignments that exercise every signal, with what the round asks.
    fn cases() -> Vec<(&'static str, Assignment, RoundAsks)> {
        let a = |data, steps| Assignment {
            index: 0,
            shard: 1,
            steps,
            seed: 11,
            data,
        };
        let weights = [0.7, 1.3];
        let hyper = |directional| RoundAsks {
            ask: Ask::Hypergradient(HypergradientSpec { directional, probe: 8 }),
            ..RoundAsks::weights(&weights)
        };
        vec![
            (
                "hypergradient, exact",
                a(TrainOn::Mixture, 6),
                hyper(DirectionalMethod::Exact),
            ),
            (
                "hypergradient, finite difference",
                a(TrainOn::Mixture, 6),
                hyper(DirectionalMethod::FiniteDifference),
            ),
            (
                "DoReMi probes",
                a(TrainOn::Mixture, 4),
                RoundAsks {
                    ask: Ask::Doremi { probe: 7 },
                    ..RoundAsks::weights(&weights)
                },
            ),
            (
                "Ω, self-taught",
                a(TrainOn::Mixture, 4),
                RoundAsks {
                    ask: Ask::LossRescaling(omega(RescaleMode::SelfTaught, DirectionalMethod::Exact)),
                    ..RoundAsks::weights(&weights)
                },
            ),
            (
                "Ω, clean meta set, finite difference",
                a(TrainOn::Mixture, 4),
                RoundAsks {
                    ask: Ask::LossRescaling(omega(RescaleMode::CleanMeta, DirectionalMethod::FiniteDifference)),
                    ..RoundAsks::weights(&weights)
                },
            ),
            (
                "source task and target rows",
                a(TrainOn::Domain(1), 5),
                RoundAsks {
                    ask: Ask::TaskPolicy {
                        target_rows: vec![0, 5, 9, 17],
                    },
                    ..RoundAsks::weights(&weights)
                },
            ),
            ("the meta set", a(TrainOn::Meta, 3), RoundAsks::weights(&weights)),
        ]
    }

    /// Every value two outcomes return, side by side.
    fn values(o: &AssignmentOutcome) -> Vec<(String, f64)> {
        let mut v = vec![
            ("mean loss".into(), f64::from(o.mean_loss)),
            ("samples".into(), o.samples as f64),
        ];
        if let Some(m) = o.meta_loss {
            v.push(("meta loss".into(), f64::from(m)));
        }
        for t in &o.delta.tensors {
            v.extend(t.data.iter().map(|&x| (format!("delta {}", t.name), f64::from(x))));
        }
        match &o.signal {
            Signal::Nothing => {}
            Signal::Hypergradient(domains) => {
                for (k, d) in domains.iter().enumerate() {
                    v.push((format!("d_{k}"), d.d_sum));
                    v.push((format!("probe count {k}"), d.count as f64));
                }
            }
            Signal::Doremi(probes) => {
                for (k, p) in probes.iter().enumerate() {
                    v.extend(p.rows.iter().map(|&r| (format!("probe row {k}"), f64::from(r))));
                    v.extend(p.losses.iter().map(|&l| (format!("probe loss {k}"), f64::from(l))));
                }
            }
            Signal::LossRescaling(grad) => {
                for t in grad {
                    v.extend(t.data.iter().map(|&x| (format!("Ω gradient {}", t.name), f64::from(x))));
                }
            }
        }
        v
    }

    /// The largest |a − b| / (1 + |a|) over every value; panics past `tol`.
    fn compare_within(case: &str, one: &AssignmentOutcome, many: &AssignmentOutcome, tol: f64) -> f64 {
        let (a, b) = (values(one), values(many));
        assert_eq!(a.len(), b.len(), "{case}: different signals");
        let mut worst = 0.0f64;
        for ((name, x), (other, y)) in a.iter().zip(&b) {
            assert_eq!(name, other, "{case}");
            let gap = (x - y).abs() / (1.0 + x.abs());
            assert!(gap <= tol, "{case}: {name}: {x} against {y}");
            worst = worst.max(gap);
        }
        worst
    }

    fn compare(case: &str, one: &AssignmentOutcome, many: &AssignmentOutcome) -> f64 {
        compare_within(case, one, many, TOL)
    }

    #[tokio::test]
    async fn replicas_train_like_one_replica_on_the_whole_batch() {
        // Batches of 14 rows (7 per domain) split 7/7 and 5/5/4.
        let one = engine(&[Device::Cpu], 14).await;
        for n in [2, 3] {
            let many = engine(&vec![Device::Cpu; n], 14).await;
            assert_eq!(many.replicas.len(), n);
            for (case, a, asks) in cases() {
                let asks = Arc::new(asks);
                let x = one.run(a.clone(), asks.clone()).await.expect("alive").expect(case);
                let y = many.run(a, asks).await.expect("alive").expect(case);
                let worst = compare(case, &x, &y);
                eprintln!("{n} replicas, {case}: largest relative difference {worst:.2e}");
            }
        }
    }

    #[tokio::test]
    async fn a_replica_without_rows_adds_nothing() {
        // Two rows of one domain per step over three replicas: the third has none.
        let one = engine(&[Device::Cpu], 2).await;
        let three = engine(&[Device::Cpu; 3], 2).await;
        let a = Assignment {
            index: 0,
            shard: 0,
            steps: 4,
            seed: 3,
            data: TrainOn::Domain(0),
        };
        let asks = Arc::new(RoundAsks::weights(&[1.0, 1.0]));
        let x = one.run(a.clone(), asks.clone()).await.expect("alive").expect("run");
        let y = three.run(a, asks).await.expect("alive").expect("run");
        compare("two rows on three replicas", &x, &y);
    }

    /// AdamW at a warmup-then-linear-decay schedule with clipping, on batches of 14 rows in
    /// `micro` micro-batches.
    fn adamw(micro: u32) -> InnerSpec {
        InnerSpec {
            batch_size: 14,
            lr: 0.01,
            weight_decay: 0.01,
            optimizer: InnerOptimizer::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            schedule: LrSchedule {
                steps_per_round: 4,
                total_steps: 40,
                warmup_steps: 6,
                decay: LrDecay::Linear,
            },
            clip_norm: Some(0.5),
            accumulate: micro,
            ..job(14, 0.0).inner
        }
    }

    fn trainer_for(inner: InnerSpec) -> Trainer {
        let mut job = job(inner.batch_size, 0.0);
        job.inner = inner;
        let data = TrainingData::new(job, vec![data(60, 1, 0), data(60, 2, 3)], Some(data(24, 3, 0)));
        let mut t = Trainer::replica(data, Device::Cpu, None);
        let p = params();
        t.set_model(0, bundle_checksum(&p), p).expect("set");
        t
    }

    async fn engine_for(devices: &[Device], inner: InnerSpec) -> Engine {
        let mut job = job(inner.batch_size, 0.0);
        job.inner = inner;
        let data = TrainingData::new(job, vec![data(60, 1, 0), data(60, 2, 3)], Some(data(24, 3, 0)));
        let e = Engine::from_data(data, devices, 1).await.expect("start");
        let p = params();
        e.set_model(0, bundle_checksum(&p), p)
            .await
            .expect("alive")
            .expect("set");
        e
    }

    #[tokio::test]
    async fn adamw_with_accumulation_and_replicas_trains_like_one_whole_batch() {
        let mut lone = trainer_for(adamw(1));
        for (replicas, micro) in [(1, 3), (1, 14), (2, 1), (2, 3), (3, 2)] {
            let e = engine_for(&vec![Device::Cpu; replicas], adamw(micro)).await;
            for (case, a, asks) in cases() {
                let asks = RoundAsks { round: 1, ..asks };
                let x = lone.run(&a, &asks).expect(case);
                let y = e.run(a, Arc::new(asks)).await.expect("alive").expect(case);
                let worst = compare(case, &x, &y);
                eprintln!(
                    "{replicas} replicas × {micro} micro-batches, {case}: largest relative difference {worst:.2e}"
                );
            }
        }
    }

    #[test]
    fn the_learning_rate_follows_the_job_s_schedule_by_round() {
        let a = Assignment {
            index: 0,
            shard: 1,
            steps: 4,
            seed: 11,
            data: TrainOn::Mixture,
        };
        let at = |t: &mut Trainer, round| {
            let asks = RoundAsks {
                round,
                ..RoundAsks::weights(&[1.0, 1.0])
            };
            t.run(&a, &asks).expect("run").delta
        };
        let mut t = trainer_for(adamw(1));
        // Rounds 0 and 1 are in the warmup (global steps 0..4 and 4..8 of 6), round 2 past it.
        let (r0, r1, r2) = (at(&mut t, 0), at(&mut t, 1), at(&mut t, 2));
        assert_eq!(r1, at(&mut t, 1), "a round's assignment replays bit for bit");
        assert_ne!(r0, r1);
        assert_ne!(r1, r2);
        // After the job's last step the learning rate is 0: no update at all, weight decay
        // included (θ·(1 − 0·wd) = θ).
        let end = at(&mut t, 10);
        assert!(end.tensors.iter().all(|t| t.data.iter().all(|&d| d == 0.0)));
        // Without a schedule the round does not matter.
        let mut flat = trainer_for(InnerSpec {
            schedule: LrSchedule::constant(4),
            ..adamw(1)
        });
        assert_eq!(at(&mut flat, 0), at(&mut flat, 7));
    }

    #[tokio::test]
    async fn one_replica_is_exactly_a_lone_trainer() {
        let e = engine(&[Device::Cpu], 14).await;
        let data = training_data(14);
        let mut lone = Trainer::replica(data, Device::Cpu, None);
        let p = params();
        lone.set_model(0, bundle_checksum(&p), p).expect("set");
        for (case, a, asks) in cases() {
            let x = lone.run(&a, &asks).expect(case);
            let y = e.run(a, Arc::new(asks)).await.expect("alive").expect(case);
            assert_eq!(values(&x), values(&y), "{case}");
        }
    }

    #[tokio::test]
    async fn every_replica_follows_the_model_versions() {
        let e = engine(&[Device::Cpu; 2], 14).await;
        let p = params();
        let (a, asks) = (cases()[0].1.clone(), Arc::new(cases()[0].2.clone()));
        let out = e.run(a, asks).await.expect("alive").expect("run");
        let mut next = p.clone();
        next.add_assign(&out.delta);
        let sum = bundle_checksum(&next);
        e.apply_step(0, 1, sum, out.delta.clone())
            .await
            .expect("alive")
            .expect("step");
        e.check_version(1, sum)
            .await
            .expect("alive")
            .expect("every replica holds version 1");
        let err = e.check_version(0, bundle_checksum(&p)).await.expect("alive");
        assert!(err.is_err(), "version 0 is gone everywhere");
        let err = e.apply_step(7, 8, sum, out.delta).await.expect("alive");
        assert!(err.is_err(), "a step from a version no replica holds");
    }

    /// On a GPU machine (`scripts/gpu-check` runs them; CI has no GPU): built with the `nccl`
    /// feature only, and run only when ignored tests are asked for. Lines starting `gpu:` are
    /// the figures the check reports.
    #[cfg(feature = "nccl")]
    mod gpu {
        use super::*;
        use tch::Tensor;

        fn gpus() -> Vec<Device> {
            (0..usize::try_from(tch::Cuda::device_count()).unwrap_or(0))
                .map(Device::Cuda)
                .collect()
        }

        #[test]
        #[ignore = "needs a GPU"]
        fn gpu_nccl_sums_with_one_rank_per_gpu() {
            let devices = gpus();
            assert!(!devices.is_empty(), "libtorch sees no GPU");
            let n = devices.len();
            let connect = collective::group(&devices).expect("an NCCL group");
            let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
                let handles: Vec<_> = connect
                    .into_iter()
                    .zip(&devices)
                    .enumerate()
                    .map(|(rank, (c, &device))| {
                        s.spawn(move || {
                            let member = c().expect("joining the communicator");
                            assert_eq!((member.rank(), member.size()), (rank, n));
                            let mut t = Tensor::from_slice(&[rank as f32 + 1.0, 0.5, -1.0]).to_device(device);
                            member.all_reduce_sum(&mut t).expect("all-reduce");
                            Vec::<f32>::try_from(&t).expect("to the host")
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
            });
            let k = n as f32;
            for s in sums {
                assert_eq!(s, vec![k * (k + 1.0) / 2.0, 0.5 * k, -k]);
            }
            println!("gpu: NCCL all-reduce with {n} rank(s), one per GPU: sums right");
        }

        #[tokio::test]
        #[ignore = "needs a GPU"]
        async fn gpu_replicas_train_like_one_gpu_and_one_gpu_like_the_cpu() {
            let devices = gpus();
            assert!(!devices.is_empty(), "libtorch sees no GPU");
            let cpu = engine(&[Device::Cpu], 14).await;
            let one = engine(&devices[..1], 14).await;
            let many = match devices.len() {
                1 => None,
                _ => Some(engine(&devices, 14).await),
            };
            for (case, a, asks) in cases() {
                let asks = Arc::new(asks);
                let x = cpu.run(a.clone(), asks.clone()).await.expect("alive").expect(case);
                let y = one.run(a.clone(), asks.clone()).await.expect("alive").expect(case);
                // Other kernels, other summation orders: agreement, not equality.
                let worst = compare_within(case, &x, &y, 1e-3);
                println!("gpu: {case}: cuda:0 against the CPU, largest relative difference {worst:.2e}");
                if let Some(many) = &many {
                    let z = many.run(a, asks).await.expect("alive").expect(case);
                    let worst = compare(case, &y, &z);
                    println!(
                        "gpu: {case}: {} replicas against cuda:0 alone, largest relative difference {worst:.2e}",
                        devices.len()
                    );
                }
            }
            if many.is_none() {
                println!("gpu: one GPU: no replicas to compare (NCCL runs one rank per GPU)");
            }
        }
    }

    #[test]
    fn a_model_with_dropout_trains_on_the_first_device_alone() {
        let devices = [Device::Cpu; 3];
        assert_eq!(replicas_for(&job(8, 0.0), &devices).len(), 3);
        assert_eq!(replicas_for(&job(8, 0.2), &devices), &[Device::Cpu]);
        assert_eq!(replicas_for(&job(8, 0.2), &[]), &[] as &[Device]);
    }
}
