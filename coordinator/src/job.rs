//! The coordinator's run loop around the round core (`round`): a job's lifecycle (claim the
//! run directory, resume, wait for workers, drain and stop), network events and deadlines fed
//! to the core and its actions carried out (bundles encoded once per version), evaluation on a
//! dedicated compute thread (`evaluate`) while the next round trains, and the run's record and
//! checkpoints (a round's line and the checkpoint due after it are written once its evaluation
//! is in: `complete`).

use crate::checkpoint;
use crate::evaluate::Evaluator;
use crate::outer::OuterOptimizer;
use crate::prepare::{job_identity, prepare_data, Prepared};
use crate::round::{Action, Payload, RoundCore};
use crate::rundir::{RoundRecord, RunDir, Summary};
use crate::scheduler::{AssignmentTimeout, Scheduler, WorkerId};
use crate::server::deltas::{DeltaGate, SumState};
use crate::server::{self, Event, Outgoing, Traffic};
use crate::strategy::{self, PhaseChange};
use anyhow::{bail, Context};
use metaloop_common::compute::{ComputeGone, ComputeThread};
use metaloop_common::data::Data;
use metaloop_common::net::{self, TlsFiles};
use metaloop_proto::checksum::hex;
use metaloop_proto::config::{JobConfig, RescaleMode, StrategyKind, WeightMethod};
use metaloop_proto::proto::JobSpec;
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
        // The training domains, kept for DoReMi's reference losses and Ω's separation report.
        let keep_train = config.strategy.method == WeightMethod::Doremi
            || (config.strategy.kind == StrategyKind::LossRescaling && config.strategy.mode != RescaleMode::None);
        let data = prepare_data(&config, keep_train)?;
        // Before anything in the directory changes: is it this job's?
        run_dir.claim(&job_identity(&config, &data))?;
        run_dir.write_json("domains.json", &data.records)?;
        let job = data.job.clone();
        let scheduler = Scheduler::with_timeout(match self.options.assignment_timeout {
            Some(fixed) => AssignmentTimeout::Fixed(fixed),
            None => AssignmentTimeout::adaptive(),
        });
        let mut state = LoopState::new(&config, &job, data, scheduler)?;
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
                let params = state.core.params().clone();
                state.last_eval = state.eval.call(move |e| e.evaluate(&params)).await??.test;
                finishing_only = true;
            } else {
                match checkpoint::newest_valid(&checkpoints, |c| state.restore(c)) {
                    Some((path, ())) => {
                        let round = state.core.rounds_done();
                        tracing::info!(path = %path.display(), round, "resumed from checkpoint");
                        eprintln!("resuming from {} (round {round})", path.display());
                        state.last_checkpoint = Some(path);
                    }
                    None => eprintln!(
                        "no valid checkpoint in {}; starting from round 0",
                        checkpoints.display()
                    ),
                }
            }
        }
        run_dir.start_metrics(state.core.rounds_done())?;

        crate::telemetry::job_started(&state.core.strategy().name(), config.rounds, state.core.rounds_done());
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
            state.deltas.clone(),
            events_tx,
            traffic.clone(),
            tracker.clone(),
            stop.clone(),
        ));

        let mut records = Vec::with_capacity(config.rounds as usize);
        let plan = CheckpointPlan {
            dir: checkpoints.clone(),
            keep: config.checkpoint.keep,
            every: config.checkpoint.every,
            pause: self.options.checkpoint_pause,
        };
        // Where completed rounds are recorded, and the last round that has ended but is not
        // recorded yet (its evaluation still running).
        let mut out = Record {
            run_dir: &mut run_dir,
            records: &mut records,
            observe: &mut observe,
            checkpoints: &plan,
        };
        let mut pending: Option<Completing> = None;
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
            for round in state.core.rounds_done()..config.rounds {
                let reassigned_before = state.core.reassigned();
                let (record, evaluation) = state
                    .round(round, &mut events, &traffic, self.options.worker_wait, &shutdown)
                    .await?;
                // The previous round, evaluated while this one trained.
                if let Some(previous) = pending.take() {
                    state.complete(previous, &mut out).await?;
                }
                let done = state.core.rounds_done();
                let checkpoint = (plan.every > 0 && done % plan.every == 0 && done < config.rounds)
                    .then(|| state.snapshot(&traffic));
                let ended = Completing {
                    record,
                    reassigned_before,
                    evaluation,
                    checkpoint,
                };
                if ended.evaluation.is_some() && done < config.rounds {
                    pending = Some(ended);
                } else {
                    state.complete(ended, &mut out).await?;
                }
                if shutdown.is_cancelled() {
                    return Err(Stopped.into());
                }
            }
            anyhow::Ok(())
        }
        .await;
        // A round still being evaluated is recorded (and its checkpoint written) before anything
        // else, whatever ended the loop: the state saved below is after it.
        let outcome = match pending.take() {
            Some(last) => {
                let completed = state.complete(last, &mut out).await;
                outcome.and(completed)
            }
            None => outcome,
        };
        // The final state is durable before any worker hears that the job is finished: a
        // coordinator that dies after telling them finishes from it on `--resume`, without the
        // workers, which have left.
        let mut final_error = None;
        if outcome.is_ok() && !finishing_only {
            let snapshot = state.snapshot(&traffic);
            if let Err(e) = checkpoint::write_state(&self.options.run_dir, FINAL_STATE, &snapshot) {
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
        for outbox in state.peers.values() {
            let _ = outbox.send(Outgoing::Shutdown {
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
                if state.core.rounds_done() > 0 {
                    let snapshot = state.snapshot(&traffic);
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
                            state.core.rounds_done(),
                            path.display()
                        ),
                        Err(c) => eprintln!("checkpoint after round {} failed: {c:#}", state.core.rounds_done()),
                    }
                }
                return Err(e);
            }
        };
        // The state after the last completed round: a checkpoint to resume from when stopped
        // (the final state was saved above).
        if stopped {
            let snapshot = state.snapshot(&traffic);
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
                state.core.rounds_done(),
                path.display()
            );
        }

        let separation = match state.core.strategy().omega_probe() {
            Some(probe) => {
                let params = state.core.params().clone();
                let (clean, corrupted) = state
                    .eval
                    .call(move |e| e.omega_weights(&params, &probe.omega, &probe.features, probe.passes))
                    .await??;
                let written = run_dir.write_text("weights.svg", &crate::plot::histogram(&clean, &corrupted));
                state.record("weights.svg", written);
                strategy::separation(&clean, &corrupted)
            }
            None => None,
        };
        let (test_loss, test_accuracy) = state.last_eval;
        let summary = Summary {
            test_accuracy,
            test_loss,
            rounds: state.core.rounds_done(),
            wall_seconds: started.elapsed().as_secs_f64(),
            workers: state.core.tally().workers_seen,
            seed: config.seed,
            samples: state.core.tally().samples,
            reassigned: state.core.reassigned(),
            rejected: state.core.tally().rejected.clone(),
            workers_lost: state.core.tally().lost.clone(),
            connections_refused: state.refused.clone(),
            bytes_in: traffic.bytes_in.load(Ordering::Relaxed),
            bytes_out: traffic.bytes_out.load(Ordering::Relaxed),
            final_state_checksum: hex(&state.core.state_checksum()),
            strategy: state.core.strategy().name(),
            domain_weights: state.core.strategy().domain_weights(),
            source_weights: state.core.strategy().source_weights(),
            target_only_test_accuracy: None,
            meta_loss: state.last_meta_loss,
            baseline_test_accuracy: None,
            best_meta_round: state.core.tally().best_meta.map(|b| b.0),
            test_accuracy_at_best_meta: state.core.tally().best_meta.map(|b| b.3),
            rescaler: separation,
            completed: !stopped && state.core.rounds_done() == config.rounds,
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

/// A round's evaluation, queued on the evaluation thread.
type EvalFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<Result<crate::evaluate::Evaluation, metaloop_common::model::ModelError>, ComputeGone>,
            > + Send,
    >,
>;

/// A round that has ended but is not yet recorded: its evaluation runs while the next round
/// trains (a round's evaluation only reports; nothing the next round does depends on it).
struct Completing {
    record: RoundRecord,
    reassigned_before: u64,
    evaluation: Option<EvalFuture>,
    /// The checkpoint due after this round, taken when it ended.
    checkpoint: Option<checkpoint::State>,
}

/// Where completed rounds go.
struct Record<'a> {
    run_dir: &'a mut RunDir,
    records: &'a mut Vec<RoundRecord>,
    observe: &'a mut (dyn FnMut(&RoundRecord) + Send),
    checkpoints: &'a CheckpointPlan,
}

/// Periodic checkpoints: where, how many kept, every how many rounds.
struct CheckpointPlan {
    dir: PathBuf,
    keep: usize,
    every: u64,
    /// Test hook (`CoordinatorOptions::checkpoint_pause`).
    pause: Duration,
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

/// The run loop's state: the round core (every decision) and what moves bytes and time for it.
struct LoopState {
    core: RoundCore,
    /// Connected workers' outboxes; dropping one closes that connection.
    peers: HashMap<WorkerId, mpsc::UnboundedSender<Outgoing>>,
    /// The last update and the full model, each encoded once for every worker that needs it.
    last_step: Option<net::EncodedBundle>,
    full: Option<(u64, net::EncodedBundle)>,
    /// When each worker's delta is read (told where the round's sum stands).
    deltas: Arc<DeltaGate>,
    eval: ComputeThread<Evaluator>,
    last_eval: (f64, f64),
    last_meta_loss: Option<f64>,
    /// Connections that never joined, by why.
    refused: BTreeMap<String, u64>,
    /// Periodic checkpoints that could not be written (a full disk, say).
    checkpoint_failures: u64,
    /// Writes to the run's record that failed (a full disk, say).
    record_failures: u64,
    /// Tensor bytes (in, out) counted by earlier processes of this run.
    bytes_before: (u64, u64),
    /// The checkpoint this job last wrote or resumed from: what a failed save leaves intact.
    last_checkpoint: Option<PathBuf>,
    /// Evaluate after every this many rounds, and after the last of `rounds`.
    eval_every: u64,
    rounds: u64,
}

impl LoopState {
    fn new(config: &JobConfig, job: &JobSpec, data: Prepared, scheduler: Scheduler) -> anyhow::Result<Self> {
        let spec = job.model.clone();
        let Prepared {
            initial,
            test,
            meta,
            train,
            ..
        } = data;
        let meta_len = meta.as_ref().map_or(0, Data::len);
        let names = job.domains.iter().map(|d| d.name.clone()).collect();
        let core = RoundCore::new(
            initial,
            config.seed,
            OuterOptimizer::new(config.outer.clone()),
            strategy::build(config, names, meta_len),
            scheduler,
        );
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
            core,
            eval_every: config.eval_every.max(1),
            rounds: config.rounds,
            peers: HashMap::new(),
            last_step: None,
            full: None,
            deltas: DeltaGate::new(config.outer.max_receiving as usize),
            eval,
            last_eval: (f64::NAN, 0.0),
            last_meta_loss: None,
            refused: BTreeMap::new(),
            checkpoint_failures: 0,
            record_failures: 0,
            bytes_before: (0, 0),
            last_checkpoint: None,
        })
    }

    /// A write to the run's record failed: counted here and in the exported metrics.
    fn count_record_failure(&mut self) {
        self.record_failures += 1;
        crate::telemetry::record_failed();
    }

    /// Counts a failed write to the run's record (`what`), which the run survives.
    fn record(&mut self, what: &str, written: anyhow::Result<()>) {
        if let Err(e) = written {
            self.count_record_failure();
            tracing::warn!(file = what, error = %format!("{e:#}"), "could not write to the run's record");
            eprintln!("{what} could not be written: {e:#}");
        }
    }

    /// The state after the last completed round, for a checkpoint, with the run's
    /// cumulative counts.
    fn snapshot(&self, traffic: &Traffic) -> checkpoint::State {
        self.core.snapshot(checkpoint::Counters {
            bytes_in: traffic.bytes_in.load(Ordering::Relaxed),
            bytes_out: traffic.bytes_out.load(Ordering::Relaxed),
            connections_refused: self.refused.clone(),
            checkpoint_failures: self.checkpoint_failures,
            record_failures: self.record_failures,
            ..self.core.counters()
        })
    }

    /// Takes over a checkpoint's state (see [`RoundCore::restore`]) and the counts it carries.
    fn restore(&mut self, c: checkpoint::State) -> anyhow::Result<()> {
        self.core.restore(&c)?;
        let k = c.counters;
        self.bytes_before = (k.bytes_in, k.bytes_out);
        self.refused = k.connections_refused;
        self.checkpoint_failures = k.checkpoint_failures;
        self.record_failures = k.record_failures;
        self.last_step = None;
        self.full = None;
        Ok(())
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
            self.restore(c)
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
                self.restore(c)
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
            self.handle(event)?;
        }
        Ok(())
    }

    async fn round(
        &mut self,
        round: u64,
        events: &mut mpsc::UnboundedReceiver<Event>,
        traffic: &Traffic,
        wait: Duration,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<(RoundRecord, Option<EvalFuture>)> {
        let started = Instant::now();
        let (bytes_in, bytes_out) = (
            traffic.bytes_in.load(Ordering::Relaxed),
            traffic.bytes_out.load(Ordering::Relaxed),
        );
        if let Some(PhaseChange::RestartAfterReference) = self.core.phase_change(round) {
            // DoReMi: the model trained so far becomes the reference (its loss on every
            // training sample is kept), and a fresh proxy starts from the initial parameters.
            let params = self.core.params().clone();
            let losses = self.eval.call(move |e| e.per_sample_losses(&params)).await??;
            self.core.restart_after_reference(losses)?;
            self.last_step = None;
            self.full = None;
            tracing::info!(
                round,
                "DoReMi: reference model done; training the proxy with learned weights"
            );
        }
        let actions = self.core.start_round(round, Instant::now());
        self.report_sum();
        self.apply(actions);
        // Every worker holding the last version has its step now (the sends hold the encoding
        // until they are done); anyone who needs the model later this round gets it in full,
        // so the update is not kept beside the round's deltas.
        self.core.forget_step();
        self.last_step = None;
        let mut alone_since: Option<Instant> = None;
        while !self.core.round_complete() {
            let idle = if self.peers.is_empty() {
                let since = *alone_since.get_or_insert_with(Instant::now);
                tracing::warn!(round, "no workers connected; waiting up to {wait:?}");
                wait.saturating_sub(since.elapsed())
            } else {
                alone_since = None;
                Duration::MAX
            };
            let deadline = self.core.next_deadline().map(tokio::time::Instant::from_std);
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
                    let actions = self.core.tick(Instant::now());
                    self.apply(actions);
                    continue;
                }
            };
            self.handle(event)?;
        }

        // The old version's encodings are stale: let go of them (the full one shares the
        // model's memory) so the model takes the update in place.
        // (The last update's went when the round's first plans were out.)
        self.full = None;
        let outcome = self.core.finish_round()?;
        self.last_meta_loss = outcome.report.meta_loss;
        // Sent from the update's own memory.
        self.last_step = Some(net::EncodedBundle::shared(outcome.update));

        // Evaluated on the evaluation thread while the next round trains (`complete`).
        let evaluation: Option<EvalFuture> = if (round + 1) % self.eval_every == 0 || round + 1 == self.rounds {
            let params = self.core.params().clone();
            Some(Box::pin(self.eval.submit(move |e| e.evaluate(&params))?))
        } else {
            None
        };
        let seconds = started.elapsed().as_secs_f64();
        let strategy = self.core.strategy();
        let report = outcome.report;
        let record = RoundRecord {
            round,
            train_loss: outcome.train_loss,
            samples: outcome.samples,
            meta_loss: report.meta_loss,
            domain_weights: strategy.domain_weights(),
            hypergradient_norm: report.hypergradient_norm,
            excess_loss: report.excess_loss,
            domain_alignment: report.alignment,
            omega_grad_norm: report.omega_grad_norm,
            source_weights: strategy.source_weights(),
            rewards: report.rewards,
            policy_grad_norm: report.policy_grad_norm,
            meta_accuracy: None,
            test_loss: None,
            test_accuracy: None,
            seconds,
            compute_seconds: outcome.compute_seconds,
            samples_per_second: outcome.samples as f64 / seconds.max(1e-9),
            workers: self.peers.len(),
            bytes_in: traffic.bytes_in.load(Ordering::Relaxed) - bytes_in,
            bytes_out: traffic.bytes_out.load(Ordering::Relaxed) - bytes_out,
            reassigned: self.core.reassigned(),
        };
        Ok((record, evaluation))
    }

    /// Finishes a round: its evaluation (if it has one) in, the core told, its line in
    /// `metrics.jsonl`, and the checkpoint due after it written with the evaluation's best-meta
    /// tally. Rounds are completed in order.
    async fn complete(&mut self, mut done: Completing, out: &mut Record<'_>) -> anyhow::Result<()> {
        let round = done.record.round;
        if let Some(evaluation) = done.evaluation.take() {
            let evaluation = evaluation.await??;
            let (test_loss, test_accuracy) = evaluation.test;
            self.last_eval = (test_loss, test_accuracy);
            self.core.evaluated(round, test_accuracy, evaluation.meta);
            done.record.test_loss = Some(test_loss);
            done.record.test_accuracy = Some(test_accuracy);
            done.record.meta_accuracy = evaluation.meta.map(|m| m.1);
            if let Some(snapshot) = &mut done.checkpoint {
                // Taken when the round ended; only the evaluation has changed the tally since.
                snapshot.counters.best_meta = self.core.counters().best_meta;
            }
        }
        let record = done.record;
        let waiting = out.run_dir.metrics_pending() > 0;
        match out.run_dir.append_metrics(&record) {
            // A record that cannot be written must not stop a run that can still make
            // progress: the line waits for the next round's write.
            Err(e) => {
                self.count_record_failure();
                tracing::warn!(round, error = %format!("{e:#}"), "could not record a round");
                if !waiting {
                    eprintln!("round {round} could not be recorded: {e:#}; training continues, and the line is written with a later round's");
                }
            }
            Ok(()) if waiting => eprintln!("metrics.jsonl written again from round {round}"),
            Ok(()) => {}
        }
        crate::telemetry::round(&record, done.reassigned_before);
        (out.observe)(&record);
        out.records.push(record);
        if let Some(snapshot) = done.checkpoint {
            let previous = self.last_checkpoint.clone();
            let plan = out.checkpoints;
            let saved = tokio::task::block_in_place(|| {
                save_checkpoint(&plan.dir, &snapshot, plan.keep, plan.pause, previous.as_deref())
            });
            match saved {
                Ok(path) => {
                    crate::telemetry::checkpoint_written();
                    self.last_checkpoint = Some(path);
                }
                Err(e) => {
                    crate::telemetry::checkpoint_failed();
                    // A full disk must not end a run that can still make progress: the
                    // previous checkpoint is intact, and the next interval tries again.
                    self.checkpoint_failures += 1;
                    tracing::error!(round = round + 1, error = %format!("{e:#}"), "checkpoint failed");
                    eprintln!(
                        "checkpoint after round {} failed: {e:#}; training continues and tries again in {} rounds",
                        round + 1,
                        plan.every
                    );
                }
            }
        }
        Ok(())
    }

    /// One network event, through the core.
    fn handle(&mut self, event: Event) -> anyhow::Result<()> {
        let now = Instant::now();
        let actions = match event {
            Event::Joined { worker, name, outbox } => {
                tracing::info!(worker, %name, "worker admitted");
                self.peers.insert(worker, outbox);
                self.core.worker_joined(worker, now)
            }
            Event::Refused { kind, reason } => {
                tracing::debug!(kind, %reason, "connection refused");
                *self.refused.entry(kind.into()).or_default() += 1;
                crate::telemetry::refused(kind);
                Vec::new()
            }
            Event::Lost { worker, kind, reason } => {
                if self.peers.remove(&worker).is_some() {
                    tracing::warn!(worker, kind, %reason, "worker lost");
                }
                self.core.worker_lost(worker, kind, now)
            }
            Event::Result {
                worker,
                result,
                delta,
                permit,
            } => {
                let actions = self.core.result(worker, result, delta, now);
                self.report_sum();
                drop(permit);
                actions
            }
            Event::Failed {
                worker,
                round,
                assignment,
                reason,
            } => {
                tracing::warn!(worker, round, assignment, %reason, "assignment failed on the worker");
                self.core.failed(worker, round, assignment, &reason, now)?
            }
        };
        self.apply(actions);
        Ok(())
    }

    /// Tells the delta gate where the round's sum stands.
    fn report_sum(&self) {
        if let Some((round, next, buffered)) = self.core.sum_progress() {
            self.deltas.update(SumState { round, next, buffered });
        }
    }

    /// Carries out the core's actions: plans (with their bundles, each encoded once per
    /// version) to the workers' outboxes, and dropped workers' connections closed.
    fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Drop { worker, .. } => {
                    self.peers.remove(&worker); // dropping its outbox closes the connection
                }
                Action::Send { worker, plan, bundle } => {
                    let bundle = match bundle {
                        None => None,
                        Some(Payload::Step { transfer }) => match &self.last_step {
                            Some(step) => Some((transfer, step.clone())),
                            None => {
                                tracing::error!(worker, "no encoded update to send; the plan is not sent");
                                continue;
                            }
                        },
                        Some(Payload::Full { transfer }) => {
                            let version = self.core.version();
                            let full = match &self.full {
                                Some((v, b)) if *v == version => b.clone(),
                                _ => {
                                    let b = net::EncodedBundle::shared(self.core.params().clone());
                                    self.full = Some((version, b.clone()));
                                    b
                                }
                            };
                            Some((transfer, full))
                        }
                    };
                    let Some(outbox) = self.peers.get(&worker) else {
                        continue;
                    };
                    if outbox.send(Outgoing::Plan { plan, bundle }).is_err() {
                        tracing::warn!(worker, "worker's connection already closed");
                    }
                }
            }
        }
    }
}
