//! The round core: every decision of the coordinator's outer loop, without I/O. It holds the
//! global model and its version, the outer optimizer, the strategy, the scheduler and the
//! round in progress (the ordered sum of its deltas), takes events (a worker joined, a result
//! arrived, a worker was lost, time passed) with the current time, and returns actions (send
//! this plan, drop that worker). The run loop (`job`) only moves bytes and time, encodes
//! bundles, evaluates, and writes the record and checkpoints; tests drive the core with a
//! simulated network and clock (`tests` below).
//!
//! Counts of rejections and lost workers also go to the exported metrics (`telemetry`, through
//! the `metrics` facade: a no-op without a recorder).

use crate::checkpoint;
use crate::outer::{Combine, OrderedSum, OuterOptimizer};
use crate::scheduler::{Dispatch, Rejection, Scheduler, WorkerId};
use crate::strategy::{OuterStrategy, PhaseChange, RoundDesign, StrategyReport};
use anyhow::bail;
use metaloop_proto::checksum::{bundle_checksum, hex, StateHasher};
use metaloop_proto::proto::{AssignmentResult, ModelSource, RoundPlan};
use metaloop_proto::tensor::Bundle;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

/// A failed assignment is retried this often in one round before the job stops.
pub const MAX_FAILURES_PER_ASSIGNMENT: u32 = 3;

/// What the run loop must do for the core.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send `plan` to `worker`, after the bundle its model source names: the full model or
    /// the last update (the core has already counted the worker as holding the new version).
    Send {
        worker: WorkerId,
        plan: Box<RoundPlan>,
        bundle: Option<Payload>,
    },
    /// Close this worker's connection: it is not trusted again (malformed or unasked-for
    /// results) or is stuck; its work has moved on.
    Drop { worker: WorkerId, reason: &'static str },
}

/// The bundle that follows a plan, on its own stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// The current model in full, as transfer `transfer`.
    Full { transfer: u64 },
    /// The last update (version − 1 → version), as transfer `transfer`.
    Step { transfer: u64 },
}

/// A round's end as the core saw it: the parts of its record that are not evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundOutcome {
    pub round: u64,
    /// Mean training loss over the assignments that took inner steps.
    pub train_loss: f64,
    pub samples: u64,
    /// The longest compute time of one worker this round (seconds).
    pub compute_seconds: f64,
    pub report: StrategyReport,
    /// The update the model took (θ ← θ + u), which workers holding the previous version get.
    pub update: Arc<Bundle>,
}

/// The round in progress.
#[derive(Debug)]
struct Round {
    number: u64,
    design: RoundDesign,
    /// Per assignment: its accepted result and the worker that returned it.
    collected: Vec<Option<(AssignmentResult, WorkerId)>>,
    sum: OrderedSum,
    failures: Vec<u32>,
}

/// The run's cumulative counts (restarts included: restored from checkpoints).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    pub samples: u64,
    pub rejected: BTreeMap<String, u64>,
    /// Workers dropped during the run, by why.
    pub lost: BTreeMap<String, u64>,
    pub workers_seen: usize,
    /// Assignments reassigned by earlier processes of this run.
    pub reassigned_before: u64,
    /// (round, meta accuracy, meta loss, test accuracy) of the best round on the meta set.
    pub best_meta: Option<(u64, f64, f64, f64)>,
}

/// Whether `strategy` will restart from the initial parameters at some round (phase changes
/// come due at a round and stay due until they are made).
fn restarts_ahead(strategy: &dyn OuterStrategy) -> bool {
    strategy.phase_change(u64::MAX) == Some(PhaseChange::RestartAfterReference)
}

/// The coordinator's outer-loop state and decisions.
#[derive(Debug)]
pub struct RoundCore {
    seed: u64,
    /// The model before round 0, kept only while the strategy will still restart from it
    /// (DoReMi's proxy); otherwise it would be a second model held for nothing.
    initial: Option<Arc<Bundle>>,
    /// The global model, shared (not copied) with evaluation and checkpoints.
    params: Arc<Bundle>,
    version: u64,
    checksum: [u8; 32],
    /// Whether the last update (version − 1 → version) can be sent as a step.
    has_step: bool,
    outer: OuterOptimizer,
    strategy: Box<dyn OuterStrategy>,
    scheduler: Scheduler,
    /// Connected workers and the model version each holds (as far as we know).
    workers: HashMap<WorkerId, Option<u64>>,
    round: Option<Round>,
    rounds_done: u64,
    next_transfer: u64,
    tally: Tally,
}

impl RoundCore {
    /// The state before round 0: the job's `initial` model (made from `seed`, or pretrained).
    pub fn new(
        initial: Bundle,
        seed: u64,
        outer: OuterOptimizer,
        strategy: Box<dyn OuterStrategy>,
        scheduler: Scheduler,
    ) -> Self {
        let params = Arc::new(initial);
        Self {
            checksum: bundle_checksum(&params),
            initial: restarts_ahead(strategy.as_ref()).then(|| params.clone()),
            params,
            seed,
            version: 0,
            has_step: false,
            outer,
            strategy,
            scheduler,
            workers: HashMap::new(),
            round: None,
            rounds_done: 0,
            next_transfer: 0,
            tally: Tally::default(),
        }
    }

    pub fn params(&self) -> &Arc<Bundle> {
        &self.params
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn rounds_done(&self) -> u64 {
        self.rounds_done
    }

    pub fn strategy(&self) -> &dyn OuterStrategy {
        self.strategy.as_ref()
    }

    pub fn tally(&self) -> &Tally {
        &self.tally
    }

    /// Assignments reassigned over the whole run, restarts included.
    pub fn reassigned(&self) -> u64 {
        self.tally.reassigned_before + self.scheduler.reassigned()
    }

    /// When the next busy worker becomes overdue.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.scheduler.next_deadline()
    }

    /// The round in progress, the assignment its ordered sum takes next and how many deltas
    /// it holds ahead of their turn.
    pub fn sum_progress(&self) -> Option<(u64, usize, usize)> {
        self.round.as_ref().map(|r| (r.number, r.sum.next(), r.sum.buffered()))
    }

    /// True when the round in progress has every result.
    pub fn round_complete(&self) -> bool {
        self.round.is_some() && self.scheduler.round_complete()
    }

    // -----------------------------------------------------------------------------------------
    // Events

    /// A worker joined: it takes any assignments nobody holds.
    pub fn worker_joined(&mut self, worker: WorkerId, now: Instant) -> Vec<Action> {
        self.workers.insert(worker, None);
        crate::telemetry::workers_connected(self.workers.len());
        self.tally.workers_seen += 1;
        let d = self.scheduler.worker_joined(worker, now);
        self.dispatch(d)
    }

    /// A worker's connection ended (`kind`: why, a bounded label).
    pub fn worker_lost(&mut self, worker: WorkerId, kind: &str, now: Instant) -> Vec<Action> {
        if self.workers.remove(&worker).is_some() {
            self.lose(kind);
        }
        let d = self.scheduler.worker_lost(worker, now);
        self.dispatch(d)
    }

    /// Time passed: workers that hold work without progress past their timeout are dropped
    /// (alive on the network, perhaps, but stuck) and their work moves on.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        for worker in self.scheduler.overdue(now) {
            tracing::warn!(
                worker,
                timeout = ?self.scheduler.timeout_for(worker),
                "dropping a worker that returned nothing within the assignment timeout"
            );
            actions.extend(self.drop_worker(worker, "assignment_timeout", now));
        }
        actions
    }

    /// A result and its delta arrived from `worker`.
    pub fn result(&mut self, worker: WorkerId, result: AssignmentResult, delta: Bundle, now: Instant) -> Vec<Action> {
        if self.round.is_none() {
            self.reject("stale_round");
            return Vec::new();
        }
        if let Err(r) = self.scheduler.check(worker, result.round, result.assignment) {
            self.reject(r.as_str());
            if r == Rejection::NotAssigned && self.workers.contains_key(&worker) {
                // A result for work this worker does not hold: never given, another's, or
                // already delivered. Not trusted again.
                tracing::warn!(
                    worker,
                    assignment = result.assignment,
                    "dropping a worker that sent a result for work it does not hold"
                );
                return self.drop_worker(worker, "not_assigned", now);
            }
            return Vec::new();
        }
        let malformed = if !delta.same_layout(&self.params) {
            Err("wrong_shape")
        } else if !delta.is_finite() || !result.train_loss.is_finite() {
            Err("non_finite")
        } else {
            self.strategy.check(&result)
        };
        if let Err(reason) = malformed {
            self.reject(reason);
            tracing::warn!(worker, reason, "dropping a worker that sent a malformed result");
            return self.drop_worker(worker, "malformed_result", now);
        }
        match self.scheduler.result(worker, result.round, result.assignment, now) {
            Ok(()) => {
                if let Some(round) = &mut self.round {
                    let i = result.assignment as usize;
                    round.sum.add(i, delta);
                    round.collected[i] = Some((result, worker));
                }
            }
            Err(r) => self.reject(r.as_str()),
        }
        Vec::new()
    }

    /// `worker` could not run an assignment (its model did not match, say): it is resynced in
    /// full and the assignment moves on.
    ///
    /// # Errors
    /// When the same assignment has failed [`MAX_FAILURES_PER_ASSIGNMENT`] times this round.
    pub fn failed(
        &mut self,
        worker: WorkerId,
        round: u64,
        assignment: u32,
        reason: &str,
        now: Instant,
    ) -> anyhow::Result<Vec<Action>> {
        if let Some(v) = self.workers.get_mut(&worker) {
            *v = None;
        }
        let Some(current) = &mut self.round else {
            return Ok(Vec::new());
        };
        if round == current.number {
            if let Some(n) = current.failures.get_mut(assignment as usize) {
                *n += 1;
                if *n >= MAX_FAILURES_PER_ASSIGNMENT {
                    bail!("assignment {assignment} of round {round} failed {n} times; last error: {reason}");
                }
            }
        }
        let d = self.scheduler.failed(worker, round, assignment, now);
        Ok(self.dispatch(d))
    }

    // -----------------------------------------------------------------------------------------
    // Rounds

    /// A change the strategy needs before round `round` is planned (the run loop measures
    /// what it needs and calls [`RoundCore::restart_after_reference`]).
    pub fn phase_change(&self, round: u64) -> Option<PhaseChange> {
        self.strategy.phase_change(round)
    }

    /// DoReMi: the model trained so far is the reference (`losses`: its loss on every training
    /// sample); a fresh proxy starts from the job's initial parameters.
    ///
    /// # Errors
    /// When the initial parameters were not kept (the strategy said it would not restart).
    pub fn restart_after_reference(&mut self, losses: Vec<Vec<f64>>) -> anyhow::Result<()> {
        let Some(initial) = self.initial.take() else {
            bail!("the strategy restarts from the initial parameters, which were not kept");
        };
        self.strategy.set_reference(losses);
        self.params = initial;
        self.outer.set_momentum(None);
        self.version += 1;
        self.checksum = bundle_checksum(&self.params);
        self.has_step = false;
        Ok(())
    }

    /// From now on a worker one version behind is sent the full model, not the last update
    /// (the run loop has let go of the update's encoding).
    pub fn forget_step(&mut self) {
        self.has_step = false;
    }

    /// Plans round `round` and dispatches it to the connected workers.
    pub fn start_round(&mut self, round: u64, now: Instant) -> Vec<Action> {
        let design = self.strategy.plan(round);
        let n = design.assignments.len();
        self.round = Some(Round {
            number: round,
            sum: OrderedSum::new(design.combine.clone(), n),
            design,
            collected: vec![None; n],
            failures: vec![0; n],
        });
        let d = self.scheduler.start_round(round, n as u32, now);
        self.dispatch(d)
    }

    /// Ends the complete round: the strategy learns from the results, the outer optimizer
    /// steps, and the model moves to the next version.
    ///
    /// # Errors
    /// When the round is not complete.
    pub fn finish_round(&mut self) -> anyhow::Result<RoundOutcome> {
        if !self.round_complete() {
            bail!("the round is not complete");
        }
        let Some(Round {
            number,
            design,
            collected,
            sum,
            ..
        }) = self.round.take()
        else {
            bail!("no round in progress");
        };
        let mut results = Vec::with_capacity(collected.len());
        let (mut loss, mut trained, mut samples) = (0.0f64, 0usize, 0u64);
        let mut compute: BTreeMap<WorkerId, f64> = BTreeMap::new();
        for (slot, a) in collected.iter().zip(&design.assignments) {
            let Some((result, worker)) = slot else {
                bail!("round complete without every result");
            };
            *compute.entry(*worker).or_default() += f64::from(result.compute_seconds);
            if a.steps > 0 {
                loss += f64::from(result.train_loss);
                trained += 1;
            }
            samples += result.samples;
            results.push(result);
        }
        let report = self.strategy.update(&results);
        let Some(combined) = sum.finish() else {
            bail!("round complete without every delta");
        };
        let update = match design.combine {
            // A fine-tuning round applies its one delta as it is.
            Combine::First => combined,
            Combine::Mean | Combine::Weighted(_) => self.outer.step(combined),
        };
        // Unique here (evaluation and the last checkpoint have let go): no copy.
        Arc::make_mut(&mut self.params).add_assign(&update);
        self.version += 1;
        self.checksum = bundle_checksum(&self.params);
        self.has_step = true;
        self.tally.samples += samples;
        self.rounds_done = number + 1;
        Ok(RoundOutcome {
            round: number,
            train_loss: loss / trained.max(1) as f64,
            samples,
            compute_seconds: compute.values().copied().fold(0.0, f64::max),
            report,
            update: Arc::new(update),
        })
    }

    /// Records the evaluation of round `round` on the meta set, keeping the best round.
    pub fn evaluated(&mut self, round: u64, test_accuracy: f64, meta: Option<(f64, f64)>) {
        if let Some((meta_loss, meta_acc)) = meta {
            let better = match self.tally.best_meta {
                None => true,
                Some((_, acc, loss, _)) => meta_acc > acc || (meta_acc == acc && meta_loss < loss),
            };
            if better {
                self.tally.best_meta = Some((round, meta_acc, meta_loss, test_accuracy));
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // State

    /// Hash of the model, the outer optimizer's state, the strategy's state and the version:
    /// equal across runs only when they ended bit for bit in the same state.
    pub fn state_checksum(&self) -> [u8; 32] {
        let mut h = StateHasher::new();
        h.bundle("model", &self.params);
        if let Some(m) = self.outer.momentum() {
            h.bundle("outer.momentum", m);
        }
        self.strategy.hash_into(&mut h);
        h.bytes(&self.version.to_le_bytes());
        h.finish()
    }

    /// The state after the last completed round, for a checkpoint (`counters`: what the run
    /// loop counts beside the core's tally).
    pub fn snapshot(&self, counters: checkpoint::Counters) -> checkpoint::State {
        checkpoint::State {
            params: self.params.clone(),
            momentum: self.outer.momentum().cloned(),
            outer: self.strategy.state(),
            version: self.version,
            rounds_done: self.rounds_done,
            seed: self.seed,
            checksum: hex(&self.state_checksum()),
            counters,
        }
    }

    /// The run's cumulative counts the core keeps, as a checkpoint holds them.
    pub fn counters(&self) -> checkpoint::Counters {
        checkpoint::Counters {
            samples: self.tally.samples,
            reassigned: self.reassigned(),
            rejected: self.tally.rejected.clone(),
            workers_lost: self.tally.lost.clone(),
            best_meta: self
                .tally
                .best_meta
                .map(
                    |(round, meta_accuracy, meta_loss, test_accuracy)| checkpoint::BestMeta {
                        round,
                        meta_accuracy,
                        meta_loss,
                        test_accuracy,
                    },
                ),
            ..checkpoint::Counters::default()
        }
    }

    /// Takes over a checkpoint's state, checking it belongs to this job and is intact; on an
    /// error nothing changes.
    ///
    /// # Errors
    /// Another seed or model layout, a strategy state that does not fit, or a state checksum
    /// that differs from the recorded one.
    pub fn restore(&mut self, c: &checkpoint::State) -> anyhow::Result<()> {
        if c.seed != self.seed {
            bail!("it is for seed {}, this job has seed {}", c.seed, self.seed);
        }
        if !c.params.same_layout(&self.params) {
            bail!("its model does not have this job's layout");
        }
        let (params, momentum, version) = (self.params.clone(), self.outer.momentum().cloned(), self.version);
        let before = self.strategy.state();
        self.params = c.params.clone();
        self.outer.set_momentum(c.momentum.clone());
        self.version = c.version;
        let restored = self.strategy.restore(&c.outer).and_then(|()| {
            let checksum = hex(&self.state_checksum());
            if checksum == c.checksum {
                Ok(())
            } else {
                bail!("state checksum {checksum} differs from the recorded {}", c.checksum)
            }
        });
        if let Err(e) = restored {
            self.params = params;
            self.outer.set_momentum(momentum);
            self.version = version;
            // The state it had restores (it was written by the same strategy).
            let _ = self.strategy.restore(&before);
            return Err(e);
        }
        self.checksum = bundle_checksum(&self.params);
        self.rounds_done = c.rounds_done;
        self.has_step = false;
        if !restarts_ahead(self.strategy.as_ref()) {
            self.initial = None;
        }
        let k = &c.counters;
        self.tally.samples = k.samples;
        self.tally.reassigned_before = k.reassigned;
        self.tally.rejected = k.rejected.clone();
        self.tally.lost = k.workers_lost.clone();
        self.tally.best_meta = k
            .best_meta
            .as_ref()
            .map(|b| (b.round, b.meta_accuracy, b.meta_loss, b.test_accuracy));
        Ok(())
    }

    // -----------------------------------------------------------------------------------------

    fn drop_worker(&mut self, worker: WorkerId, reason: &'static str, now: Instant) -> Vec<Action> {
        let mut actions = vec![Action::Drop { worker, reason }];
        if self.workers.remove(&worker).is_some() {
            self.lose(reason);
        }
        let d = self.scheduler.worker_lost(worker, now);
        actions.extend(self.dispatch(d));
        actions
    }

    /// A worker dropped or gone, by why.
    fn lose(&mut self, reason: &str) {
        *self.tally.lost.entry(reason.to_string()).or_default() += 1;
        crate::telemetry::worker_lost(reason);
        crate::telemetry::workers_connected(self.workers.len());
    }

    fn reject(&mut self, reason: &str) {
        crate::telemetry::rejected(reason);
        tracing::warn!(reason, "result rejected");
        *self.tally.rejected.entry(reason.to_string()).or_default() += 1;
    }

    /// Each dispatch as a plan with the cheapest way to bring that worker to the current
    /// version.
    fn dispatch(&mut self, dispatches: Vec<Dispatch>) -> Vec<Action> {
        let Some(round) = &self.round else {
            return Vec::new();
        };
        let mut actions = Vec::with_capacity(dispatches.len());
        for d in dispatches {
            let Some(held) = self.workers.get_mut(&d.worker) else {
                continue;
            };
            let (version, checksum) = (self.version, self.checksum);
            let (model, bundle) = match *held {
                Some(v) if v == version => (ModelSource::Unchanged { version, checksum }, None),
                Some(v) if self.has_step && v + 1 == version => {
                    self.next_transfer += 1;
                    let transfer = self.next_transfer;
                    (
                        ModelSource::Step {
                            base: v,
                            version,
                            checksum,
                            transfer,
                        },
                        Some(Payload::Step { transfer }),
                    )
                }
                _ => {
                    self.next_transfer += 1;
                    let transfer = self.next_transfer;
                    (
                        ModelSource::Full {
                            version,
                            checksum,
                            transfer,
                        },
                        Some(Payload::Full { transfer }),
                    )
                }
            };
            *held = Some(version);
            let plan = RoundPlan {
                round: round.number,
                model,
                domain_weights: round.design.domain_weights.clone(),
                ask: round.design.ask.clone(),
                assignments: d
                    .assignments
                    .iter()
                    .map(|&i| round.design.assignments[i as usize].clone())
                    .collect(),
            };
            actions.push(Action::Send {
                worker: d.worker,
                plan: Box::new(plan),
                bundle,
            });
        }
        actions
    }
}

#[cfg(test)]
mod sim;
