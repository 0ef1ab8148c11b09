//! The coordinator's run loop: plan each round, dispatch it through the scheduler, collect
//! results in assignment order, take the outer step, evaluate, record. Network events arrive
//! from `server`; compute (evaluation) runs on a dedicated thread.

use crate::checkpoint;
use crate::outer::{Combine, OrderedSum, OuterOptimizer};
use crate::policy::{self, PolicyRound, TaskPolicy};
use crate::rescaler::LossRescaler;
use crate::rundir::{JobIdentity, RoundRecord, RunDir, Summary};
use crate::scheduler::{AssignmentTimeout, Dispatch, Rejection, Scheduler, WorkerId};
use crate::server::{self, Event, Outgoing, Traffic};
use crate::strategy::DomainWeights;
use anyhow::{bail, Context};
use metaloop_common::compute::ComputeThread;
use metaloop_common::features;
use metaloop_common::model::{self, Model};
use metaloop_common::net::{self, TlsFiles};
use metaloop_proto::checksum::{bundle_checksum, hex, StateHasher};
use metaloop_proto::config::{DeltaDType, JobConfig, ModelConfig, PolicyMethod, StrategyKind, WeightMethod};
use metaloop_proto::dataset::{self, Dataset};
use metaloop_proto::domains;
use metaloop_proto::features::Feature;
use metaloop_proto::proto::{
    Assignment, AssignmentResult, DType, DataRef, HypergradientSpec, InnerSpec, JobSpec, ModelSource, ModelSpec,
    RescalerPlan, RoundPlan, TrainOn,
};
use metaloop_proto::rng::derive_seed;
use metaloop_proto::tensor::Bundle;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How the coordinator is run (as opposed to what the job is).
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    pub listen: SocketAddr,
    pub tls: TlsFiles,
    pub run_dir: PathBuf,
    /// Round 0 starts once this many workers have joined.
    pub min_workers: usize,
    /// How long to wait with no worker connected before giving up.
    pub worker_wait: Duration,
    /// Continue from the newest valid checkpoint in `run_dir/checkpoints` (if there is one).
    pub resume: bool,
    /// A worker holding assignments that returns no result for this long is dropped (it may
    /// be alive on the network but stuck); its assignments go to others. `None`: derived from
    /// the observed assignment times (`scheduler::AssignmentTimeout::Adaptive`).
    pub assignment_timeout: Option<Duration>,
    /// Test hook: a pause between writing a checkpoint and renaming it into place (zero).
    pub checkpoint_pause: Duration,
    /// Connections admitted at once between their first packet and their hello.
    pub max_handshakes: usize,
    /// Workers connected at the same time.
    pub max_workers: usize,
    /// Set once the job is loaded and the coordinator serves it (`/readyz`).
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// The revocation list refused certificates are on, and the signal to read it again.
    pub revocation: crate::identity::Revocation,
}

/// The coordinator was asked to stop (SIGINT/SIGTERM): not a failure.
#[derive(Debug, thiserror::Error)]
#[error("stopped on request")]
pub struct Stopped;

/// `--resume` found the job complete in its run directory: there is nothing to do, and that
/// is not a failure (the CLI exits 0).
#[derive(Debug, thiserror::Error)]
#[error(
    "the job in {} is complete: all {rounds} rounds done, final state in {} (final_state_checksum {checksum}); nothing to resume",
    dir.display(),
    final_state.display()
)]
pub struct Complete {
    pub dir: PathBuf,
    pub rounds: u64,
    pub final_state: PathBuf,
    pub checksum: String,
}

/// A failed assignment is retried this often in one round before the job stops.
const MAX_FAILURES_PER_ASSIGNMENT: u32 = 3;
/// The state after the last round, in the run directory (the checkpoint format).
const FINAL_STATE: &str = "final.safetensors";

/// A coordinator with its port bound, so callers can learn the address before running.
#[derive(Debug)]
pub struct Coordinator {
    tls: Arc<crate::identity::Tls>,
    options: CoordinatorOptions,
}

impl Coordinator {
    /// Binds the QUIC endpoint.
    ///
    /// # Errors
    /// Certificate files, the revocation list or the socket.
    pub fn bind(options: CoordinatorOptions) -> anyhow::Result<Self> {
        let tls = crate::identity::Tls::bind(options.listen, options.tls.clone(), options.revocation.crl.clone())?;
        Ok(Self {
            tls: Arc::new(tls),
            options,
        })
    }

    /// The address workers should dial.
    ///
    /// # Errors
    /// When the socket has no local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tls.endpoint().local_addr()
    }

    /// Runs the whole job; `observe` sees every finished round (progress display).
    ///
    /// # Errors
    /// Bad data, a run directory that belongs to another job, no workers within the wait, an
    /// assignment failing repeatedly, or I/O on the run directory; [`Complete`] when resuming a
    /// job that is already complete.
    pub async fn run(
        self,
        config: JobConfig,
        mut observe: impl FnMut(&RoundRecord) + Send,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Summary> {
        let started = Instant::now();
        let mut run_dir = RunDir::create(&self.options.run_dir)?;
        let rescaler = LossRescaler::new(&config.strategy, config.seed);
        let keep_train = rescaler.is_some() || config.strategy.method == WeightMethod::Doremi;
        let data = prepare_data(&config, keep_train)?;
        // Before anything in the directory changes: is it this job's?
        run_dir.claim(&job_identity(&config, &data))?;
        run_dir.write_json("domains.json", &data.records)?;
        let job = data.job.clone();
        let policy = (config.strategy.kind == StrategyKind::TaskPolicy)
            .then(|| TaskPolicy::new(&config, job.domains.iter().map(|d| d.name.clone()).collect()));
        let mut state = LoopState::new(&config, &job, data, rescaler, policy)?;
        state.scheduler = Scheduler::with_timeout(match self.options.assignment_timeout {
            Some(fixed) => AssignmentTimeout::Fixed(fixed),
            None => AssignmentTimeout::adaptive(),
        });
        let checkpoints = self.options.run_dir.join("checkpoints");
        // Set when a resume finds the final state saved: no rounds, no workers.
        let mut finishing_only = false;
        if self.options.resume {
            if let Some(complete) = state.completed_result(&run_dir, &self.options.run_dir, &config) {
                return Err(complete.into());
            }
            if let Some(path) = state.saved_final_state(&self.options.run_dir, &config) {
                // Killed after saving the final state, before the record was complete: finish
                // the record from it, without workers.
                eprintln!(
                    "the final state of all {} rounds is saved in {}; finishing the run's record",
                    config.rounds,
                    path.display()
                );
                let params = state.params.clone();
                state.last_eval = state.eval.call(move |e| e.evaluate(&params)).await??.test;
                finishing_only = true;
            } else {
                match checkpoint::newest_valid(&checkpoints, |c| state.restore(c, config.seed)) {
                    Some((path, ())) => {
                        tracing::info!(path = %path.display(), round = state.rounds_done, "resumed from checkpoint");
                        eprintln!("resuming from {} (round {})", path.display(), state.rounds_done);
                        state.last_checkpoint = Some(path);
                    }
                    None => eprintln!(
                        "no valid checkpoint in {}; starting from round 0",
                        checkpoints.display()
                    ),
                }
            }
        }
        run_dir.start_metrics(state.rounds_done)?;

        crate::telemetry::job_started(&strategy_name(&config), config.rounds, state.rounds_done);
        self.options.ready.store(true, Ordering::Relaxed);
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let traffic = Arc::new(Traffic::default());
        // Cumulative over the whole run, restarts included.
        traffic.bytes_in.store(state.bytes_before.0, Ordering::Relaxed);
        traffic.bytes_out.store(state.bytes_before.1, Ordering::Relaxed);
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        tracker.spawn(crate::identity::reload_on_signal(
            self.tls.clone(),
            self.options.revocation.reload.clone(),
            stop.clone(),
        ));
        tracker.spawn(server::accept_loop(
            self.tls.clone(),
            job,
            server::Limits {
                handshakes: self.options.max_handshakes.max(1),
                workers: self.options.max_workers.max(1),
            },
            events_tx,
            traffic.clone(),
            tracker.clone(),
            stop.clone(),
        ));

        let mut records = Vec::with_capacity(config.rounds as usize);
        let outcome = async {
            if finishing_only {
                return anyhow::Ok(());
            }
            state
                .wait_for_workers(
                    &mut events,
                    self.options.min_workers,
                    self.options.worker_wait,
                    &shutdown,
                )
                .await?;
            for round in state.rounds_done..config.rounds {
                let reassigned_before = state.reassigned();
                let record = state
                    .round(
                        round,
                        &config,
                        &mut events,
                        &traffic,
                        self.options.worker_wait,
                        &shutdown,
                    )
                    .await?;
                let waiting = run_dir.metrics_pending() > 0;
                match run_dir.append_metrics(&record) {
                    // A record that cannot be written must not stop a run that can still make
                    // progress: the line waits for the next round's write.
                    Err(e) => {
                        state.count_record_failure();
                        tracing::warn!(round, error = %format!("{e:#}"), "could not record a round");
                        if !waiting {
                            eprintln!("round {round} could not be recorded: {e:#}; training continues, and the line is written with a later round's");
                        }
                    }
                    Ok(()) if waiting => eprintln!("metrics.jsonl written again from round {round}"),
                    Ok(()) => {}
                }
                crate::telemetry::round(&record, reassigned_before);
                observe(&record);
                records.push(record);
                let every = config.checkpoint.every;
                if every > 0 && state.rounds_done % every == 0 && state.rounds_done < config.rounds {
                    let snapshot = state.snapshot(config.seed, &traffic);
                    let pause = self.options.checkpoint_pause;
                    let previous = state.last_checkpoint.clone();
                    let saved = tokio::task::block_in_place(|| {
                        save_checkpoint(&checkpoints, &snapshot, config.checkpoint.keep, pause, previous.as_deref())
                    });
                    if let Ok(path) = &saved {
                        crate::telemetry::checkpoint_written();
                        state.last_checkpoint = Some(path.clone());
                    }
                    if let Err(e) = saved {
                        crate::telemetry::checkpoint_failed();
                        // A full disk must not end a run that can still make progress: the
                        // previous checkpoint is intact, and the next interval tries again.
                        state.checkpoint_failures += 1;
                        tracing::error!(round = state.rounds_done, error = %format!("{e:#}"), "checkpoint failed");
                        eprintln!(
                            "checkpoint after round {} failed: {e:#}; training continues and tries again in {every} rounds",
                            state.rounds_done
                        );
                    }
                }
                if shutdown.is_cancelled() {
                    return Err(Stopped.into());
                }
            }
            anyhow::Ok(())
        }
        .await;
        // The final state is durable before any worker hears that the job is finished: a
        // coordinator that dies after telling them finishes from it on `--resume`, without the
        // workers, which have left.
        let mut final_error = None;
        if outcome.is_ok() && !finishing_only {
            let snapshot = state.snapshot(config.seed, &traffic);
            if let Err(e) =
                checkpoint::write_atomic(&self.options.run_dir, FINAL_STATE, &checkpoint::encode(&snapshot)?)
            {
                final_error = Some(match &state.last_checkpoint {
                    Some(p) => e.context(format!(
                        "the final state could not be saved; the newest checkpoint {} is intact (continue from it with --resume)",
                        p.display()
                    )),
                    None => e.context("the final state could not be saved"),
                });
            }
        }
        let reason = if outcome.is_ok() {
            "job finished"
        } else {
            "coordinator stopping"
        };
        // No new sessions: a worker told that we are stopping tries to reconnect, and must find
        // the next coordinator, not this one on its way out.
        self.tls.close();
        for peer in state.peers.values() {
            let _ = peer.outbox.send(Outgoing::Shutdown {
                reason: reason.into(),
                finished: outcome.is_ok(),
            });
        }
        // Give workers a moment to read the shutdown before the endpoint goes away.
        let _ = tokio::time::timeout(Duration::from_secs(12), async {
            while !state.peers.is_empty() {
                match events.recv().await {
                    Some(Event::Lost { worker, .. }) => {
                        state.peers.remove(&worker);
                    }
                    Some(_) => {}
                    None => break,
                }
            }
        })
        .await;
        stop.cancel();
        tracker.close();
        self.tls.endpoint().close(0u32.into(), b"job finished");
        tracker.wait().await;
        if let Err(e) = run_dir.flush_metrics() {
            state.count_record_failure();
            eprintln!(
                "{} bytes of metrics.jsonl lines could not be written: {e:#}",
                run_dir.metrics_pending()
            );
        }
        state.record(
            "plot.svg",
            run_dir.write_text("plot.svg", &crate::plot::render(&records)),
        );
        let stopped = match outcome {
            Ok(()) => false,
            Err(e) if e.is::<Stopped>() => true,
            Err(e) => {
                // Lose nothing: the state after the last completed round is consistent, so
                // keep it for --resume before reporting the failure.
                if state.rounds_done > 0 {
                    let snapshot = state.snapshot(config.seed, &traffic);
                    let previous = state.last_checkpoint.as_deref();
                    match save_checkpoint(
                        &checkpoints,
                        &snapshot,
                        config.checkpoint.keep,
                        Duration::ZERO,
                        previous,
                    ) {
                        Ok(path) => eprintln!(
                            "checkpoint after round {}: {} (continue with --resume)",
                            state.rounds_done,
                            path.display()
                        ),
                        Err(c) => eprintln!("checkpoint after round {} failed: {c:#}", state.rounds_done),
                    }
                }
                return Err(e);
            }
        };
        // The state after the last completed round: a checkpoint to resume from when stopped
        // (the final state was saved above).
        if stopped {
            let snapshot = state.snapshot(config.seed, &traffic);
            let previous = state.last_checkpoint.as_deref();
            let path = save_checkpoint(
                &checkpoints,
                &snapshot,
                config.checkpoint.keep,
                Duration::ZERO,
                previous,
            )?;
            eprintln!(
                "stopped after round {}; checkpoint {} (continue with --resume)",
                state.rounds_done,
                path.display()
            );
        }

        let separation = match &state.rescaler {
            Some(r) => {
                let (params, omega, features, passes) =
                    (state.params.clone(), r.omega(), r.features().to_vec(), r.passes());
                let (clean, corrupted) = state
                    .eval
                    .call(move |e| e.omega_weights(&params, &omega, &features, passes))
                    .await??;
                let written = run_dir.write_text("weights.svg", &crate::plot::histogram(&clean, &corrupted));
                state.record("weights.svg", written);
                crate::rescaler::separation(&clean, &corrupted)
            }
            None => None,
        };
        let (test_loss, test_accuracy) = state.last_eval;
        let summary = Summary {
            test_accuracy,
            test_loss,
            rounds: state.rounds_done,
            wall_seconds: started.elapsed().as_secs_f64(),
            workers: state.workers_seen,
            seed: config.seed,
            samples: state.samples,
            reassigned: state.reassigned(),
            rejected: state.rejected.clone(),
            workers_lost: state.lost.clone(),
            connections_refused: state.refused.clone(),
            bytes_in: traffic.bytes_in.load(Ordering::Relaxed),
            bytes_out: traffic.bytes_out.load(Ordering::Relaxed),
            final_state_checksum: hex(&state.state_checksum()),
            strategy: strategy_name(&config),
            domain_weights: state.domain_weights(),
            source_weights: state.source_weights(),
            target_only_test_accuracy: None,
            meta_loss: state.last_meta_loss,
            baseline_test_accuracy: None,
            best_meta_round: state.best_meta.map(|b| b.0),
            test_accuracy_at_best_meta: state.best_meta.map(|b| b.3),
            rescaler: separation,
            completed: !stopped && state.rounds_done == config.rounds,
            checkpoint_failures: state.checkpoint_failures,
            record_failures: state.record_failures,
        };
        run_dir
            .write_summary(&summary)
            .map_err(|e| match (&final_error, stopped) {
                (None, false) => e.context(format!(
                    "summary.json could not be written; the final state is saved in {}",
                    self.options.run_dir.join(FINAL_STATE).display()
                )),
                _ => e.context("summary.json could not be written"),
            })?;
        match final_error {
            Some(e) => Err(e),
            None => Ok(summary),
        }
    }
}

/// The strategy as the summary and the metrics name it.
fn strategy_name(config: &JobConfig) -> String {
    match config.strategy.kind {
        StrategyKind::DomainWeights => config.strategy.method.as_str().to_string(),
        StrategyKind::LossRescaling => format!("loss-rescaling/{}", config.strategy.mode.as_str()),
        StrategyKind::TaskPolicy => format!("task-policy/{}", config.strategy.policy.as_str()),
    }
}

/// Saves a checkpoint; when that fails, the error says which earlier checkpoint is still intact
/// (writes are atomic, so a failed one never touches it).
fn save_checkpoint(
    dir: &Path,
    state: &checkpoint::State,
    keep: usize,
    pause: Duration,
    previous: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    checkpoint::save(dir, state, keep, pause).map_err(|e| match previous {
        Some(p) => e.context(format!("the previous checkpoint {} is kept", p.display())),
        None => e.context("there is no earlier checkpoint"),
    })
}

/// What decides this job's results ([`JobIdentity`]), for the run directory to be checked
/// against: the config sections as parsed (a default made explicit is the same job).
fn job_identity(config: &JobConfig, data: &Prepared) -> JobIdentity {
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
struct Prepared {
    job: JobSpec,
    test: Dataset,
    meta: Option<Dataset>,
    /// Training domains with their corrupted rows, kept only when Ω's separation of clean from
    /// corrupted samples is to be measured.
    train: Vec<(Dataset, Vec<usize>)>,
    /// What was done to each domain, for `domains.json`.
    records: Vec<domains::DomainRecord>,
    test_checksum: [u8; 32],
}

/// Builds every domain and the meta set once, checks they fit together, and returns the job
/// spec workers rebuild the same data from, with what was done to each domain.
fn prepare_data(config: &JobConfig, keep_train: bool) -> anyhow::Result<Prepared> {
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
        inner: InnerSpec {
            batch_size: config.inner.batch_size,
            lr: config.inner.lr,
            momentum: config.inner.momentum,
            weight_decay: config.inner.weight_decay,
        },
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

struct Peer {
    outbox: mpsc::UnboundedSender<Outgoing>,
    /// The model version this worker holds (as far as we know).
    version: Option<u64>,
}

struct Evaluator {
    spec: ModelSpec,
    test: Dataset,
    meta: Option<Dataset>,
    train: Vec<(Dataset, Vec<usize>)>,
}

/// The global model's quality after a round.
struct Evaluation {
    test: (f64, f64),
    /// Loss and accuracy on the meta set, when the job has one.
    meta: Option<(f64, f64)>,
}

impl Evaluator {
    fn evaluate(&self, params: &Bundle) -> Result<Evaluation, model::ModelError> {
        let m = model::build(&self.spec, params, tch::Device::Cpu)?;
        let test = model::evaluate(m.as_ref(), &self.test, tch::Device::Cpu)?;
        let meta = self
            .meta
            .as_ref()
            .map(|d| model::evaluate(m.as_ref(), d, tch::Device::Cpu))
            .transpose()?;
        Ok(Evaluation { test, meta })
    }

    /// The model's loss on every sample of every training domain (DoReMi's reference losses).
    fn per_sample_losses(&self, params: &Bundle) -> Result<Vec<Vec<f64>>, model::ModelError> {
        let m = model::build(&self.spec, params, tch::Device::Cpu)?;
        self.train
            .iter()
            .map(|(d, _)| {
                let (x, y) = model::batch_tensors(&d.x, &d.y, d.features, tch::Device::Cpu);
                let logits = tch::no_grad(|| m.forward(&x));
                let logp = logits.log_softmax(-1, tch::Kind::Double);
                let l = -logp.gather(1, &y.unsqueeze(1), false).squeeze_dim(1);
                Ok(Vec::<f64>::try_from(&l)?)
            })
            .collect()
    }

    /// Ω's raw weight for every training sample, split into (clean, corrupted).
    fn omega_weights(
        &self,
        params: &Bundle,
        omega: &Bundle,
        features: &[Feature],
        passes: u32,
    ) -> Result<(Vec<f64>, Vec<f64>), model::ModelError> {
        tch::manual_seed(0);
        let m = model::build(&self.spec, params, tch::Device::Cpu)?;
        let o = model::Mlp::from_bundle(omega, tch::Device::Cpu)?;
        let (mut clean, mut corrupted) = (Vec::new(), Vec::new());
        for (d, flipped) in &self.train {
            let (x, y) = model::batch_tensors(&d.x, &d.y, d.features, tch::Device::Cpu);
            let w = tch::no_grad(|| {
                let f = features::of_model(m.as_ref(), &x, &y, features, 1.0, passes);
                o.forward(&f).sigmoid().squeeze_dim(1).to_kind(tch::Kind::Double)
            });
            let w = Vec::<f64>::try_from(&w)?;
            let bad: std::collections::HashSet<usize> = flipped.iter().copied().collect();
            for (i, v) in w.into_iter().enumerate() {
                if bad.contains(&i) {
                    corrupted.push(v)
                } else {
                    clean.push(v)
                }
            }
        }
        Ok((clean, corrupted))
    }
}

struct LoopState {
    /// The global model, shared (not copied) with the evaluation thread and checkpoints.
    params: Arc<Bundle>,
    version: u64,
    checksum: [u8; 32],
    /// The update that turned version − 1 into version, shipped to workers that hold version − 1.
    /// The last update and the full model, each encoded once for every worker that needs it.
    last_step: Option<net::EncodedBundle>,
    full: Option<(u64, net::EncodedBundle)>,
    outer: OuterOptimizer,
    strategy: DomainWeights,
    /// What this round's plans carry for the strategy (fixed for the whole round).
    round_weights: (Vec<f64>, Option<HypergradientSpec>),
    rescaler: Option<LossRescaler>,
    round_rescaler: Option<RescalerPlan>,
    policy: Option<TaskPolicy>,
    /// This round's sources, target batch and the policy's forward step (task-policy).
    round_policy: Option<PolicyRound>,
    /// Rows in the meta set (the task policy's target).
    meta_len: usize,
    /// Rows per domain whose losses the workers return this round (DoReMi's proxy phase).
    round_probe: Option<u32>,
    model_spec: ModelSpec,
    /// (round, meta accuracy, meta loss, test accuracy) of the best round on the meta set.
    best_meta: Option<(u64, f64, f64, f64)>,
    scheduler: Scheduler,
    peers: HashMap<WorkerId, Peer>,
    next_transfer: u64,
    eval: ComputeThread<Evaluator>,
    last_eval: (f64, f64),
    last_meta_loss: Option<f64>,
    rounds_done: u64,
    workers_seen: usize,
    samples: u64,
    rejected: BTreeMap<String, u64>,
    /// Workers dropped during the run, by why.
    lost: BTreeMap<String, u64>,
    /// Connections that never joined, by why.
    refused: BTreeMap<String, u64>,
    /// Periodic checkpoints that could not be written (a full disk, say).
    checkpoint_failures: u64,
    /// Writes to the run's record that failed (a full disk, say).
    record_failures: u64,
    /// Counts carried over from the checkpoint this process resumed from: assignments
    /// reassigned, and tensor bytes (in, out).
    reassigned_before: u64,
    bytes_before: (u64, u64),
    /// The checkpoint this job last wrote or resumed from: what a failed save leaves intact.
    last_checkpoint: Option<PathBuf>,
}

/// Results of the round in progress, by assignment index.
/// Per assignment: its result and the worker that returned it (the deltas go straight into
/// the round's [`OrderedSum`]).
type Collected = Vec<Option<(AssignmentResult, u64)>>;

impl LoopState {
    fn new(
        config: &JobConfig,
        job: &JobSpec,
        data: Prepared,
        rescaler: Option<LossRescaler>,
        policy: Option<TaskPolicy>,
    ) -> anyhow::Result<Self> {
        let params = Arc::new(model::init_params(&job.model, config.seed));
        let spec = job.model.clone();
        let Prepared { test, meta, train, .. } = data;
        let meta_len = meta.as_ref().map_or(0, Dataset::len);
        let eval = ComputeThread::spawn("metaloop-eval", move || {
            // One intra-op thread: OpenMP's threads spin for a while after every parallel
            // region, and on a small machine that spinning took the cores the network tasks
            // needed (round overhead 100 ms → see BENCHMARKS.md, coordinator scaling).
            tch::set_num_threads(1);
            Evaluator {
                spec,
                test,
                meta,
                train,
            }
        })?;
        Ok(Self {
            checksum: bundle_checksum(&params),
            params,
            version: 0,
            last_step: None,
            full: None,
            outer: OuterOptimizer::new(config.outer.clone()),
            strategy: DomainWeights::new(&config.strategy, job.domains.iter().map(|d| d.name.clone()).collect()),
            round_weights: (Vec::new(), None),
            rescaler,
            round_rescaler: None,
            policy,
            round_policy: None,
            meta_len,
            round_probe: None,
            model_spec: job.model.clone(),
            best_meta: None,
            scheduler: Scheduler::new(),
            peers: HashMap::new(),
            next_transfer: 0,
            eval,
            last_eval: (f64::NAN, 0.0),
            last_meta_loss: None,
            rounds_done: 0,
            workers_seen: 0,
            samples: 0,
            rejected: BTreeMap::new(),
            lost: BTreeMap::new(),
            refused: BTreeMap::new(),
            checkpoint_failures: 0,
            record_failures: 0,
            reassigned_before: 0,
            bytes_before: (0, 0),
            last_checkpoint: None,
        })
    }

    /// Assignments reassigned over the whole run, restarts included.
    fn reassigned(&self) -> u64 {
        self.reassigned_before + self.scheduler.reassigned()
    }

    /// Counts a failed write to the run's record (`what`), which the run survives.
    /// A write to the run's record failed: counted here and in the exported metrics.
    fn count_record_failure(&mut self) {
        self.record_failures += 1;
        crate::telemetry::record_failed();
    }

    fn record(&mut self, what: &str, written: anyhow::Result<()>) {
        if let Err(e) = written {
            self.count_record_failure();
            tracing::warn!(file = what, error = %format!("{e:#}"), "could not write to the run's record");
            eprintln!("{what} could not be written: {e:#}");
        }
    }

    /// The run's cumulative counts, for a checkpoint.
    fn counters(&self, traffic: &Traffic) -> checkpoint::Counters {
        checkpoint::Counters {
            samples: self.samples,
            reassigned: self.reassigned(),
            bytes_in: traffic.bytes_in.load(Ordering::Relaxed),
            bytes_out: traffic.bytes_out.load(Ordering::Relaxed),
            rejected: self.rejected.clone(),
            workers_lost: self.lost.clone(),
            connections_refused: self.refused.clone(),
            checkpoint_failures: self.checkpoint_failures,
            record_failures: self.record_failures,
            best_meta: self.best_meta.map(
                |(round, meta_accuracy, meta_loss, test_accuracy)| checkpoint::BestMeta {
                    round,
                    meta_accuracy,
                    meta_loss,
                    test_accuracy,
                },
            ),
        }
    }

    /// Takes over the counts a checkpoint carries (those of every earlier process of the run).
    fn restore_counters(&mut self, c: checkpoint::Counters) {
        self.samples = c.samples;
        self.reassigned_before = c.reassigned;
        self.bytes_before = (c.bytes_in, c.bytes_out);
        self.rejected = c.rejected;
        self.lost = c.workers_lost;
        self.refused = c.connections_refused;
        self.checkpoint_failures = c.checkpoint_failures;
        self.record_failures = c.record_failures;
        self.best_meta = c
            .best_meta
            .map(|b| (b.round, b.meta_accuracy, b.meta_loss, b.test_accuracy));
    }

    /// `final.safetensors`, when it holds this job's state after all of its rounds (restored
    /// into `self`): the job ended, but its record may not have been completed.
    fn saved_final_state(&mut self, dir: &Path, config: &JobConfig) -> Option<PathBuf> {
        let path = dir.join(FINAL_STATE);
        let bytes = std::fs::read(&path).ok()?;
        let outcome = checkpoint::decode(&bytes).and_then(|c| {
            if c.rounds_done != config.rounds {
                bail!("it holds round {} of {}", c.rounds_done, config.rounds);
            }
            self.restore(c, config.seed)
        });
        match outcome {
            Ok(()) => Some(path),
            Err(e) => {
                eprintln!(
                    "{} is not this job's final state ({e:#}); resuming from the checkpoints",
                    path.display()
                );
                None
            }
        }
    }

    /// The job's completed result, when the run directory holds it: `summary.json` says the
    /// job completed all of this config's rounds, and `final.safetensors` is this job's intact
    /// state with the same checksum. Anything less: `None`, and the job resumes from its
    /// checkpoints.
    fn completed_result(&mut self, run_dir: &RunDir, dir: &Path, config: &JobConfig) -> Option<Complete> {
        let (rounds, checksum) = run_dir.completed()?;
        let final_state = dir.join(FINAL_STATE);
        let usable = std::fs::read(&final_state)
            .context("cannot read it")
            .and_then(|b| checkpoint::decode(&b))
            .and_then(|c| {
                if rounds != config.rounds || c.rounds_done != rounds {
                    bail!("it holds round {} of {}", c.rounds_done, config.rounds);
                }
                if c.checksum != checksum {
                    bail!("its checksum differs from summary.json's");
                }
                self.restore(c, config.seed)
            });
        match usable {
            Ok(()) => Some(Complete {
                dir: dir.to_owned(),
                rounds,
                final_state,
                checksum,
            }),
            Err(e) => {
                eprintln!(
                    "summary.json says the job completed, but {} is not its final state ({e:#}); resuming from the checkpoints",
                    final_state.display()
                );
                None
            }
        }
    }

    /// Hash of the model, the outer optimizer's state and the version: equal across runs only
    /// when they ended bit for bit in the same state.
    fn state_checksum(&self) -> [u8; 32] {
        let mut h = StateHasher::new();
        h.bundle("model", &self.params);
        if let Some(m) = self.outer.momentum() {
            h.bundle("outer.momentum", m);
        }
        self.strategy.hash_into(&mut h);
        if let Some(r) = &self.rescaler {
            r.hash_into(&mut h);
        }
        if let Some(p) = &self.policy {
            p.hash_into(&mut h);
        }
        h.bytes(&self.version.to_le_bytes());
        h.finish()
    }

    /// DoReMi: the model trained so far becomes the reference (its loss on every training
    /// sample is kept), and a fresh proxy model starts from the job's initial parameters.
    async fn start_proxy_phase(&mut self, round: u64, seed: u64) -> anyhow::Result<()> {
        let params = self.params.clone();
        let losses = self.eval.call(move |e| e.per_sample_losses(&params)).await??;
        self.strategy.set_reference(losses);
        self.params = Arc::new(model::init_params(&self.model_spec, seed));
        self.outer.set_momentum(None);
        self.version += 1;
        self.checksum = bundle_checksum(&self.params);
        self.last_step = None;
        self.full = None;
        tracing::info!(
            round,
            "DoReMi: reference model done; training the proxy with learned weights"
        );
        Ok(())
    }

    /// The state after the last completed round, for a checkpoint.
    fn snapshot(&self, seed: u64, traffic: &Traffic) -> checkpoint::State {
        checkpoint::State {
            params: self.params.clone(),
            momentum: self.outer.momentum().cloned(),
            outer: self
                .strategy
                .state()
                .into_iter()
                .chain(self.rescaler.iter().flat_map(LossRescaler::state))
                .chain(self.policy.iter().flat_map(TaskPolicy::state))
                .collect(),
            version: self.version,
            rounds_done: self.rounds_done,
            seed,
            checksum: hex(&self.state_checksum()),
            counters: self.counters(traffic),
        }
    }

    /// Takes over a checkpoint's state, checking it belongs to this job and is intact.
    fn restore(&mut self, c: checkpoint::State, seed: u64) -> anyhow::Result<()> {
        if c.seed != seed {
            bail!("it is for seed {}, this job has seed {seed}", c.seed);
        }
        if !c.params.same_layout(&self.params) {
            bail!("its model does not have this job's layout");
        }
        let (params, momentum, strategy, rescaler, policy) = (
            self.params.clone(),
            self.outer.momentum().cloned(),
            self.strategy.clone(),
            self.rescaler.clone(),
            self.policy.clone(),
        );
        self.params = c.params;
        self.outer.set_momentum(c.momentum);
        self.version = c.version;
        let restored = self
            .strategy
            .restore(&c.outer)
            .and_then(|()| match &mut self.rescaler {
                Some(r) => r.restore(&c.outer),
                None => Ok(()),
            })
            .and_then(|()| match &mut self.policy {
                Some(p) => p.restore(&c.outer),
                None => Ok(()),
            });
        let checksum = hex(&self.state_checksum());
        if let Err(e) = restored.and_then(|()| {
            if checksum == c.checksum {
                Ok(())
            } else {
                bail!("state checksum {checksum} differs from the recorded {}", c.checksum)
            }
        }) {
            self.params = params;
            self.outer.set_momentum(momentum);
            self.strategy = strategy;
            self.rescaler = rescaler;
            self.policy = policy;
            self.version = 0;
            return Err(e);
        }
        self.checksum = bundle_checksum(&self.params);
        self.rounds_done = c.rounds_done;
        self.restore_counters(c.counters);
        self.last_step = None;
        self.full = None;
        Ok(())
    }

    async fn wait_for_workers(
        &mut self,
        events: &mut mpsc::UnboundedReceiver<Event>,
        min: usize,
        wait: Duration,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + wait;
        while self.peers.len() < min.max(1) {
            tracing::info!(connected = self.peers.len(), needed = min, "waiting for workers");
            let event = tokio::select! {
                e = events.recv() => e.context("network task stopped")?,
                () = tokio::time::sleep_until(deadline) => bail!("only {} of {min} workers joined within {wait:?}", self.peers.len()),
                () = shutdown.cancelled() => return Err(Stopped.into()),
            };
            self.handle(event, None)?;
        }
        Ok(())
    }

    async fn round(
        &mut self,
        round: u64,
        config: &JobConfig,
        events: &mut mpsc::UnboundedReceiver<Event>,
        traffic: &Traffic,
        wait: Duration,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<RoundRecord> {
        let started = Instant::now();
        let (bytes_in, bytes_out) = (
            traffic.bytes_in.load(Ordering::Relaxed),
            traffic.bytes_out.load(Ordering::Relaxed),
        );
        self.round_policy = self.policy.as_ref().map(|p| p.plan(round, self.meta_len));
        let assignments: Vec<Assignment> = match &self.round_policy {
            Some(p) => p.assignments.clone(),
            None => (0..config.data.shards)
                .map(|i| Assignment {
                    index: i,
                    shard: i,
                    steps: config.inner.steps,
                    seed: derive_seed(config.seed, &[round, u64::from(i)]),
                    data: TrainOn::Mixture,
                })
                .collect(),
        };
        if self.strategy.needs_reference() && round >= config.reference_rounds() {
            self.start_proxy_phase(round, config.seed).await?;
        }
        self.round_weights = self.strategy.plan();
        self.round_probe = self.strategy.probe_request();
        self.round_rescaler = self
            .rescaler
            .as_ref()
            .map(|r| r.plan(round as f64 / config.rounds as f64));
        let mut collected: Collected = vec![None; assignments.len()];
        let combine = match &self.round_policy {
            Some(p) if p.finetune() => Combine::First,
            Some(p) => Combine::Weighted(policy::reptile_weights(&p.weights, &p.sources)),
            None => Combine::Mean,
        };
        let mut sum = OrderedSum::new(combine.clone(), assignments.len());
        let mut failures = vec![0u32; assignments.len()];
        let dispatches = self
            .scheduler
            .start_round(round, assignments.len() as u32, Instant::now());
        self.dispatch(round, &assignments, dispatches);
        let mut alone_since: Option<Instant> = None;
        while !self.scheduler.round_complete() {
            let idle = if self.peers.is_empty() {
                let since = *alone_since.get_or_insert_with(Instant::now);
                tracing::warn!(round, "no workers connected; waiting up to {wait:?}");
                wait.saturating_sub(since.elapsed())
            } else {
                alone_since = None;
                Duration::MAX
            };
            let deadline = self.scheduler.next_deadline().map(tokio::time::Instant::from_std);
            let overdue = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                e = events.recv() => e.context("network task stopped")?,
                () = tokio::time::sleep(idle) => bail!("no workers connected for {wait:?} during round {round}"),
                () = shutdown.cancelled() => return Err(Stopped.into()),
                () = overdue => {
                    // Stuck but still connected: drop it like a lost worker (its connection
                    // closes when its outbox is dropped), and its work moves on.
                    let stuck = self.scheduler.overdue(Instant::now());
                    for worker in stuck {
                        let ctx = RoundCtx { round, assignments: &assignments, collected: &mut collected, sum: &mut sum, failures: &mut failures };
                        let timeout = self.scheduler.timeout_for(worker);
                        tracing::warn!(worker, ?timeout, "dropping a worker that returned nothing within the assignment timeout");
                        self.peers.remove(&worker); // dropping its outbox closes the connection
                        self.lose("assignment_timeout");
                        let d = self.scheduler.worker_lost(worker, Instant::now());
                        self.dispatch(ctx.round, ctx.assignments, d);
                    }
                    continue;
                }
            };
            let ctx = RoundCtx {
                round,
                assignments: &assignments,
                collected: &mut collected,
                sum: &mut sum,
                failures: &mut failures,
            };
            self.handle(event, Some(ctx))?;
        }

        let mut results = Vec::with_capacity(collected.len());
        let (mut loss, mut trained, mut samples) = (0.0f64, 0usize, 0u64);
        let mut compute: BTreeMap<u64, f64> = BTreeMap::new();
        for (slot, a) in collected.iter().zip(&assignments) {
            let (result, worker) = slot.as_ref().context("round complete without every result")?;
            *compute.entry(*worker).or_default() += f64::from(result.compute_seconds);
            if a.steps > 0 {
                loss += f64::from(result.train_loss);
                trained += 1;
            }
            samples += result.samples;
            results.push(result);
        }
        let meta: Vec<f64> = results.iter().filter_map(|r| r.meta_loss.map(f64::from)).collect();
        let mut meta_loss = (!meta.is_empty()).then(|| meta.iter().sum::<f64>() / meta.len() as f64);
        self.strategy.update(&results);
        if let Some(r) = &mut self.rescaler {
            r.update(&results);
        }
        let mut policy_outcome = None;
        if let (Some(p), Some(plan)) = (&mut self.policy, &self.round_policy) {
            // The meta loss of a task-policy round is the target loss of θ before it (or
            // after the fine-tuning step): the last assignment's.
            meta_loss = meta.last().copied();
            if !plan.finetune() {
                policy_outcome = Some(p.update(plan, &meta));
            }
        }
        let combined = sum.finish().context("round complete without every delta")?;
        let update = match combine {
            // A fine-tuning round applies its one delta as it is.
            Combine::First => combined,
            Combine::Mean | Combine::Weighted(_) => self.outer.step(combined),
        };
        self.last_meta_loss = meta_loss;
        // Unique here (the evaluation and the last checkpoint have let go): no copy.
        Arc::make_mut(&mut self.params).add_assign(&update);
        self.version += 1;
        self.checksum = bundle_checksum(&self.params);
        // The old version's encodings are stale: free them before encoding the new step.
        self.full = None;
        self.last_step = None;
        self.last_step = Some(net::EncodedBundle::new(&update));
        drop(update);
        self.samples += samples;
        self.rounds_done = round + 1;

        let params = self.params.clone();
        let evaluation = self.eval.call(move |e| e.evaluate(&params)).await??;
        let (test_loss, test_accuracy) = evaluation.test;
        self.last_eval = (test_loss, test_accuracy);
        if let Some((meta_loss, meta_acc)) = evaluation.meta {
            let better = match self.best_meta {
                None => true,
                Some((_, acc, loss, _)) => meta_acc > acc || (meta_acc == acc && meta_loss < loss),
            };
            if better {
                self.best_meta = Some((round, meta_acc, meta_loss, test_accuracy));
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let names = self.strategy.names();
        Ok(RoundRecord {
            round,
            train_loss: loss / trained.max(1) as f64,
            samples,
            meta_loss,
            domain_weights: self.domain_weights(),
            hypergradient_norm: self.strategy.last_grad_norm(),
            excess_loss: self
                .strategy
                .probe_request()
                .and(self.strategy.excess())
                .map(|e| self.strategy.names().iter().cloned().zip(e.iter().copied()).collect()),
            omega_grad_norm: self.rescaler.as_ref().and_then(LossRescaler::last_grad_norm),
            source_weights: self.source_weights(),
            rewards: policy_outcome.as_ref().map(|o| {
                names
                    .iter()
                    .zip(&o.rewards)
                    .filter_map(|(n, r)| r.map(|r| (n.clone(), r)))
                    .collect()
            }),
            policy_grad_norm: policy_outcome.and_then(|o| o.grad_norm),
            meta_accuracy: evaluation.meta.map(|m| m.1),
            test_loss,
            test_accuracy,
            seconds,
            compute_seconds: compute.values().copied().fold(0.0, f64::max),
            samples_per_second: samples as f64 / seconds.max(1e-9),
            workers: self.peers.len(),
            bytes_in: traffic.bytes_in.load(Ordering::Relaxed) - bytes_in,
            bytes_out: traffic.bytes_out.load(Ordering::Relaxed) - bytes_out,
            reassigned: self.reassigned(),
        })
    }

    fn handle(&mut self, event: Event, ctx: Option<RoundCtx<'_>>) -> anyhow::Result<()> {
        match event {
            Event::Joined { worker, name, outbox } => {
                tracing::info!(worker, %name, "worker admitted");
                self.peers.insert(worker, Peer { outbox, version: None });
                crate::telemetry::workers_connected(self.peers.len());
                self.workers_seen += 1;
                let d = self.scheduler.worker_joined(worker, Instant::now());
                if let Some(ctx) = ctx {
                    self.dispatch(ctx.round, ctx.assignments, d);
                }
            }
            Event::Refused { kind, reason } => {
                tracing::debug!(kind, %reason, "connection refused");
                *self.refused.entry(kind.into()).or_default() += 1;
                crate::telemetry::refused(kind);
            }
            Event::Lost { worker, kind, reason } => {
                if self.peers.remove(&worker).is_some() {
                    tracing::warn!(worker, kind, %reason, "worker lost");
                    self.lose(kind);
                }
                let d = self.scheduler.worker_lost(worker, Instant::now());
                if let Some(ctx) = ctx {
                    self.dispatch(ctx.round, ctx.assignments, d);
                }
            }
            Event::Result { worker, result, delta } => {
                let Some(ctx) = ctx else {
                    self.reject("stale_round");
                    return Ok(());
                };
                if let Err(r) = self.scheduler.check(worker, result.round, result.assignment) {
                    self.reject(r.as_str());
                    if r == Rejection::NotAssigned && self.peers.remove(&worker).is_some() {
                        // A result for work this worker does not hold: it was never given,
                        // belongs to another, or was already delivered. Not trusted again.
                        tracing::warn!(
                            worker,
                            assignment = result.assignment,
                            "dropping a worker that sent a result for work it does not hold"
                        );
                        self.lose("not_assigned");
                        let d = self.scheduler.worker_lost(worker, Instant::now());
                        self.dispatch(ctx.round, ctx.assignments, d);
                    }
                    return Ok(());
                }
                let malformed = if !delta.same_layout(&self.params) {
                    Some("wrong_shape")
                } else if !delta.is_finite() || !result.train_loss.is_finite() {
                    Some("non_finite")
                } else if self
                    .rescaler
                    .as_ref()
                    .is_some_and(|r| !r.valid_gradient(&result.omega_grad))
                {
                    Some("bad_rescaler_gradient")
                } else if self.round_policy.is_some() && !result.meta_loss.is_some_and(f32::is_finite) {
                    Some("bad_target_loss")
                } else if self.round_probe.is_some()
                    && (result.probes.len() != self.strategy.names().len()
                        || result
                            .probes
                            .iter()
                            .any(|p| p.rows.len() != p.losses.len() || p.losses.iter().any(|l| !l.is_finite())))
                {
                    Some("bad_probe")
                } else {
                    None
                };
                if let Some(reason) = malformed {
                    // A worker that sends garbage is not trusted again: drop it, and its
                    // assignments go to the others.
                    self.reject(reason);
                    tracing::warn!(worker, reason, "dropping a worker that sent a malformed result");
                    self.peers.remove(&worker); // dropping its outbox closes the connection
                    self.lose("malformed_result");
                    let d = self.scheduler.worker_lost(worker, Instant::now());
                    self.dispatch(ctx.round, ctx.assignments, d);
                    return Ok(());
                }
                match self
                    .scheduler
                    .result(worker, result.round, result.assignment, Instant::now())
                {
                    Ok(()) => {
                        let i = result.assignment as usize;
                        ctx.sum.add(i, delta);
                        ctx.collected[i] = Some((result, worker));
                    }
                    Err(r) => self.reject(r.as_str()),
                }
            }
            Event::Failed {
                worker,
                round,
                assignment,
                reason,
            } => {
                tracing::warn!(worker, round, assignment, %reason, "assignment failed on the worker");
                if let Some(p) = self.peers.get_mut(&worker) {
                    p.version = None;
                }
                let Some(ctx) = ctx else { return Ok(()) };
                if round == ctx.round {
                    if let Some(n) = ctx.failures.get_mut(assignment as usize) {
                        *n += 1;
                        if *n >= MAX_FAILURES_PER_ASSIGNMENT {
                            bail!("assignment {assignment} of round {round} failed {n} times; last error: {reason}");
                        }
                    }
                }
                let d = self.scheduler.failed(worker, round, assignment, Instant::now());
                self.dispatch(ctx.round, ctx.assignments, d);
            }
        }
        Ok(())
    }

    fn domain_weights(&self) -> BTreeMap<String, f64> {
        if self.policy.is_some() {
            return BTreeMap::new();
        }
        self.strategy
            .names()
            .iter()
            .cloned()
            .zip(self.strategy.weights())
            .collect()
    }

    /// The task policy's weights over the sources (probabilities), when the job has one.
    fn source_weights(&self) -> Option<BTreeMap<String, f64>> {
        self.policy
            .as_ref()
            .filter(|p| p.method() != PolicyMethod::TargetOnly)
            .map(|p| p.names().iter().cloned().zip(p.weights().iter().copied()).collect())
    }

    /// A worker dropped or gone, by why.
    fn lose(&mut self, reason: &str) {
        *self.lost.entry(reason.to_string()).or_default() += 1;
        crate::telemetry::worker_lost(reason);
        crate::telemetry::workers_connected(self.peers.len());
    }

    fn reject(&mut self, reason: &str) {
        crate::telemetry::rejected(reason);
        tracing::warn!(reason, "result rejected");
        *self.rejected.entry(reason.to_string()).or_default() += 1;
    }

    /// Sends each dispatch with the cheapest way to bring that worker to the current version.
    fn dispatch(&mut self, round: u64, assignments: &[Assignment], dispatches: Vec<Dispatch>) {
        for d in dispatches {
            let Some(peer) = self.peers.get_mut(&d.worker) else {
                continue;
            };
            let (version, checksum) = (self.version, self.checksum);
            let (model, bundle) = match (peer.version, &self.last_step) {
                (Some(v), _) if v == version => (ModelSource::Unchanged { version, checksum }, None),
                (Some(v), Some(step)) if v + 1 == version => {
                    self.next_transfer += 1;
                    let t = self.next_transfer;
                    (
                        ModelSource::Step {
                            base: v,
                            version,
                            checksum,
                            transfer: t,
                        },
                        Some((t, step.clone())),
                    )
                }
                _ => {
                    self.next_transfer += 1;
                    let t = self.next_transfer;
                    let full = match &self.full {
                        Some((v, b)) if *v == version => b.clone(),
                        _ => {
                            let b = net::EncodedBundle::new(&self.params);
                            self.full = Some((version, b.clone()));
                            b
                        }
                    };
                    (
                        ModelSource::Full {
                            version,
                            checksum,
                            transfer: t,
                        },
                        Some((t, full)),
                    )
                }
            };
            peer.version = Some(version);
            let plan = RoundPlan {
                round,
                model,
                domain_weights: self.round_weights.0.clone(),
                hypergradient: self.round_weights.1,
                rescaler: self.round_rescaler.clone(),
                probe_losses: self.round_probe,
                target_rows: self.round_policy.as_ref().map(|p| p.target_rows.clone()),
                assignments: d.assignments.iter().map(|&i| assignments[i as usize].clone()).collect(),
            };
            if peer
                .outbox
                .send(Outgoing::Plan {
                    plan: Box::new(plan),
                    bundle,
                })
                .is_err()
            {
                tracing::warn!(worker = d.worker, "worker's connection already closed");
            }
        }
    }
}

struct RoundCtx<'a> {
    round: u64,
    assignments: &'a [Assignment],
    collected: &'a mut Collected,
    sum: &'a mut OrderedSum,
    failures: &'a mut Vec<u32>,
}
