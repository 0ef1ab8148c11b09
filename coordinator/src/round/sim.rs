//! The round core under a simulated network and clock: dozens of workers that join, vanish,
//! stall, answer late, twice or with garbage, and a coordinator that restarts from its own
//! snapshot. Every disturbed run must end in exactly the state of an undisturbed one. No
//! sockets, no processes, no libtorch: simulated workers compute their deltas and signals as
//! deterministic functions of the model they hold and the assignment.

use super::{Action, Payload, RoundCore};
use crate::outer::OuterOptimizer;
use crate::scheduler::{AssignmentTimeout, Scheduler, WorkerId};
use crate::strategy::{self, PhaseChange};
use metaloop_common::model;
use metaloop_proto::checksum::{bundle_checksum, hex};
use metaloop_proto::config::JobConfig;
use metaloop_proto::proto::{
    Ask, AssignmentResult, DomainProbe, DomainStat, ModelSource, ModelSpec, RoundPlan, Signal, SmallTensor,
};
use metaloop_proto::rng::{derive_seed, SplitMix64};
use metaloop_proto::tensor::Bundle;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DOMAINS: usize = 3;

fn config(strategy: &str, rounds: u64, shards: u32) -> JobConfig {
    let domains: String = (0..DOMAINS)
        .map(|i| format!("[[data.domains]]\nname = \"d{i}\"\nsource = \"train.safetensors\"\n"))
        .collect();
    let text = format!(
        "seed = 7\nrounds = {rounds}\n[data]\ntest = \"test.safetensors\"\nmeta = \"meta.safetensors\"\n\
         classes = 3\nshards = {shards}\n{domains}[model]\nkind = \"mlp\"\nhidden = [5]\n\
         [inner]\nsteps = 2\n[outer]\nmethod = \"nesterov\"\nlr = 0.7\nmomentum = 0.9\n[strategy]\n{strategy}\n"
    );
    // The files must exist to pass validation; nothing reads them.
    let dir = tempfile::tempdir().expect("temporary directory");
    for f in ["train", "test", "meta"] {
        std::fs::write(dir.path().join(format!("{f}.safetensors")), b"").expect("write");
    }
    match JobConfig::parse(&text, dir.path()) {
        Ok(c) => c,
        Err(e) => panic!("sim config: {e:?}"),
    }
}

fn spec() -> ModelSpec {
    ModelSpec::Mlp {
        inputs: 4,
        hidden: vec![5],
        classes: 3,
        dropout: 0.0,
    }
}

fn core(config: &JobConfig, timeout: Duration) -> RoundCore {
    let names = (0..DOMAINS).map(|i| format!("d{i}")).collect();
    RoundCore::new(
        model::init_params(&spec(), config.seed),
        config.seed,
        OuterOptimizer::new(config.outer.clone()),
        strategy::build(config, names, 40),
        Scheduler::with_timeout(AssignmentTimeout::Fixed(timeout)),
    )
}

/// A value in [−1, 1) from a seed and a path.
fn unit(seed: u64, path: &[u64]) -> f64 {
    SplitMix64::new(derive_seed(seed, path)).unit() * 2.0 - 1.0
}

/// What an honest worker returns for an assignment: a function of the model it holds, the
/// assignment's seed and the round's ask only.
fn honest(theta: &Bundle, plan: &RoundPlan, index: usize) -> (AssignmentResult, Bundle) {
    let a = &plan.assignments[index];
    let mut delta = theta.clone();
    for (t, tensor) in delta.tensors.iter_mut().enumerate() {
        for (i, v) in tensor.data.iter_mut().enumerate() {
            *v = -0.05 * *v + 0.01 * unit(a.seed, &[t as u64, i as u64]) as f32;
        }
    }
    let norm: f64 = theta
        .tensors
        .iter()
        .flat_map(|t| &t.data)
        .map(|&v| f64::from(v) * f64::from(v))
        .sum();
    let meta_loss = (norm.sqrt() * 0.1 + 0.05 * unit(a.seed, &[99])).abs() as f32 + 0.1;
    let signal = match &plan.ask {
        Ask::Nothing | Ask::TaskPolicy { .. } => Signal::Nothing,
        Ask::Hypergradient(h) => Signal::Hypergradient(
            (0..DOMAINS)
                .map(|k| DomainStat {
                    d_sum: unit(a.seed, &[7, k as u64]) * f64::from(h.probe) + norm * 1e-3,
                    count: u64::from(h.probe),
                })
                .collect(),
        ),
        Ask::Doremi { probe } => Signal::Doremi(
            (0..DOMAINS)
                .map(|k| DomainProbe {
                    rows: (0..*probe).collect(),
                    losses: (0..*probe)
                        .map(|r| (1.0 + unit(a.seed, &[8, k as u64, u64::from(r)])) as f32)
                        .collect(),
                })
                .collect(),
        ),
        Ask::LossRescaling(p) => Signal::LossRescaling(
            p.omega
                .iter()
                .enumerate()
                .map(|(t, o)| SmallTensor {
                    data: (0..o.data.len())
                        .map(|i| 0.1 * unit(a.seed, &[9, t as u64, i as u64]) as f32)
                        .collect(),
                    ..o.clone()
                })
                .collect(),
        ),
    };
    let result = AssignmentResult {
        train_loss: meta_loss * 2.0,
        samples: 10 * u64::from(a.steps),
        compute_seconds: 0.01,
        meta_loss: Some(meta_loss),
        signal,
        ..AssignmentResult::new(plan.round, a.index, 0)
    };
    (result, delta)
}

/// How a simulated worker misbehaves, if it does.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Conduct {
    Honest,
    /// Answers every assignment twice.
    Stutters,
    /// Sends NaN deltas.
    Lies,
    /// Sends a signal of the wrong shape.
    Garbles,
    /// Takes far longer than the assignment timeout.
    Stalls,
}

#[derive(Debug)]
struct SimWorker {
    /// The model this process holds (it survives reconnects, as a real worker's does).
    held: Option<(u64, Bundle)>,
    conduct: Conduct,
    /// When it is free to start its next assignment.
    busy_until: Instant,
}

#[derive(Debug)]
enum Delivery {
    /// A plan (with the bundle it names) reaches a worker.
    Plan {
        worker: WorkerId,
        plan: Box<RoundPlan>,
        bundle: Option<Bundle>,
    },
    Result {
        worker: WorkerId,
        result: AssignmentResult,
        delta: Bundle,
    },
    Failed {
        worker: WorkerId,
        round: u64,
        assignment: u32,
    },
}

/// Deliveries ordered by time, then by when they were queued.
#[derive(Debug, Default)]
struct Queue {
    heap: BinaryHeap<std::cmp::Reverse<(Instant, u64)>>,
    items: BTreeMap<u64, Delivery>,
    seq: u64,
}

impl Queue {
    fn push(&mut self, at: Instant, d: Delivery) {
        self.seq += 1;
        self.heap.push(std::cmp::Reverse((at, self.seq)));
        self.items.insert(self.seq, d);
    }

    fn peek_time(&self) -> Option<Instant> {
        self.heap.peek().map(|r| r.0 .0)
    }

    fn pop(&mut self) -> Option<(Instant, Delivery)> {
        let std::cmp::Reverse((at, seq)) = self.heap.pop()?;
        Some((at, self.items.remove(&seq)?))
    }
}

/// What may go wrong in a run, all drawn from `seed`.
#[derive(Debug, Clone, Copy, Default)]
struct Disturbance {
    seed: u64,
    /// Per event: the chance that a random worker's connection drops.
    drop: f64,
    /// Per event: the chance that a new worker (of random conduct) joins.
    join: f64,
    /// The chance that a joining worker misbehaves.
    misconduct: f64,
    /// Restart the coordinator from its snapshot before these rounds.
    restart_every: u64,
}

/// The simulated network around one core.
struct Sim {
    core: RoundCore,
    config: JobConfig,
    workers: BTreeMap<WorkerId, SimWorker>,
    next_id: WorkerId,
    queue: Queue,
    now: Instant,
    rng: SplitMix64,
    d: Disturbance,
    /// The last update, for `Step` payloads.
    last_update: Option<Arc<Bundle>>,
    timeout: Duration,
}

impl Sim {
    fn new(config: JobConfig, workers: usize, d: Disturbance) -> Self {
        let timeout = Duration::from_secs(5);
        let mut sim = Self {
            core: core(&config, timeout),
            config,
            workers: BTreeMap::new(),
            next_id: 0,
            queue: Queue::default(),
            now: Instant::now(),
            rng: SplitMix64::new(d.seed),
            d,
            last_update: None,
            timeout,
        };
        for _ in 0..workers {
            let conduct = sim.conduct(d.misconduct / 3.0);
            sim.join(conduct, None);
        }
        sim
    }

    /// Honest, or with probability `p` one of the ways to misbehave.
    fn conduct(&mut self, p: f64) -> Conduct {
        if self.rng.unit() < p {
            [Conduct::Stutters, Conduct::Lies, Conduct::Garbles, Conduct::Stalls][(self.rng.unit() * 4.0) as usize]
        } else {
            Conduct::Honest
        }
    }

    fn latency(&mut self) -> Duration {
        Duration::from_micros(200 + (self.rng.unit() * 5000.0) as u64)
    }

    /// A connection joins: a new process, or an old one (with its model) reconnecting.
    fn join(&mut self, conduct: Conduct, held: Option<(u64, Bundle)>) {
        self.next_id += 1;
        let id = self.next_id;
        self.workers.insert(
            id,
            SimWorker {
                held,
                conduct,
                busy_until: self.now,
            },
        );
        let actions = self.core.worker_joined(id, self.now);
        self.apply(actions);
    }

    fn apply(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Drop { worker, .. } => {
                    self.workers.remove(&worker);
                }
                Action::Send { worker, plan, bundle } => {
                    let bundle = bundle.map(|p| match p {
                        Payload::Full { .. } => (**self.core.params()).clone(),
                        Payload::Step { .. } => match &self.last_update {
                            Some(u) => (**u).clone(),
                            None => panic!("a step without an update"),
                        },
                    });
                    let at = self.now + self.latency();
                    self.queue.push(at, Delivery::Plan { worker, plan, bundle });
                }
            }
        }
    }

    /// A worker receives a plan: it brings its model to the plan's version (or fails, as a
    /// real worker whose checksum does not match) and queues its results.
    fn receive(&mut self, worker: WorkerId, plan: &RoundPlan, bundle: Option<Bundle>) {
        let latency = self.latency();
        let Some(w) = self.workers.get_mut(&worker) else {
            return; // gone: the plan is lost with the connection
        };
        let (version, checksum) = match &plan.model {
            ModelSource::Full { version, checksum, .. } => {
                w.held = bundle.map(|b| (*version, b));
                (*version, *checksum)
            }
            ModelSource::Step {
                base,
                version,
                checksum,
                ..
            } => {
                match (&mut w.held, bundle) {
                    (Some((v, theta)), Some(u)) if *v == *base => {
                        theta.add_assign(&u);
                        *v = *version;
                    }
                    _ => w.held = None,
                }
                (*version, *checksum)
            }
            ModelSource::Unchanged { version, checksum } => (*version, *checksum),
        };
        let ok = matches!(&w.held, Some((v, theta)) if *v == version && bundle_checksum(theta) == checksum);
        let start = w.busy_until.max(self.now);
        let step = if w.conduct == Conduct::Stalls {
            self.timeout * 3
        } else {
            Duration::from_millis(20)
        };
        let mut at = start;
        let mut out = Vec::new();
        for (i, a) in plan.assignments.iter().enumerate() {
            at += step + latency;
            if !ok {
                w.held = None;
                out.push((
                    at,
                    Delivery::Failed {
                        worker,
                        round: plan.round,
                        assignment: a.index,
                    },
                ));
                continue;
            }
            let Some((_, theta)) = &w.held else { continue };
            let (result, mut delta) = honest(theta, plan, i);
            let mut result = result;
            match w.conduct {
                Conduct::Lies => delta.tensors[0].data[0] = f32::NAN,
                Conduct::Garbles => {
                    result.signal = match result.signal {
                        Signal::Nothing => Signal::Hypergradient(Vec::new()),
                        _ => Signal::Nothing,
                    };
                    if matches!(plan.ask, Ask::TaskPolicy { .. }) {
                        result.meta_loss = None;
                    }
                }
                _ => {}
            }
            if w.conduct == Conduct::Stutters {
                out.push((
                    at,
                    Delivery::Result {
                        worker,
                        result: result.clone(),
                        delta: delta.clone(),
                    },
                ));
            }
            out.push((at, Delivery::Result { worker, result, delta }));
        }
        w.busy_until = at;
        for (at, d) in out {
            self.queue.push(at, d);
        }
    }

    /// Random trouble between deliveries.
    fn disturb(&mut self) {
        if self.rng.unit() < self.d.drop && self.workers.len() > 1 {
            let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
            let victim = ids[(self.rng.unit() * ids.len() as f64) as usize];
            let gone = self.workers.remove(&victim);
            let actions = self.core.worker_lost(victim, "lost", self.now);
            self.apply(actions);
            // Half of the time the same process reconnects at once, its model kept.
            if self.rng.unit() < 0.5 {
                let conduct = gone.as_ref().map_or(Conduct::Honest, |g| g.conduct);
                self.join(conduct, gone.and_then(|g| g.held));
            }
        }
        if self.rng.unit() < self.d.join {
            let conduct = self.conduct(self.d.misconduct);
            self.join(conduct, None);
        }
        // Never let the job starve: an honest worker joins when none is left that can finish.
        if !self.workers.values().any(|w| w.conduct == Conduct::Honest) {
            self.join(Conduct::Honest, None);
        }
    }

    fn run_round(&mut self, round: u64) {
        if let Some(PhaseChange::RestartAfterReference) = self.core.phase_change(round) {
            let params = self.core.params().clone();
            let losses = (0..DOMAINS)
                .map(|k| {
                    (0..8)
                        .map(|r| 0.5 + 0.1 * f64::from(params.tensors[0].data[k + r]).abs())
                        .collect()
                })
                .collect();
            self.core
                .restart_after_reference(losses)
                .expect("a DoReMi core keeps the initial parameters");
            self.last_update = None;
        }
        let actions = self.core.start_round(round, self.now);
        self.apply(actions);
        let mut events = 0u64;
        while !self.core.round_complete() {
            events += 1;
            assert!(events < 1_000_000, "round {round} does not finish");
            let deadline = self.core.next_deadline();
            let next = self.queue.peek_time();
            match (deadline, next) {
                (Some(d), Some(n)) if d <= n => {
                    self.now = self.now.max(d);
                    let actions = self.core.tick(self.now);
                    self.apply(actions);
                }
                (Some(d), None) => {
                    self.now = self.now.max(d);
                    let actions = self.core.tick(self.now);
                    self.apply(actions);
                }
                (_, Some(_)) => {
                    let Some((at, delivery)) = self.queue.pop() else { break };
                    self.now = self.now.max(at);
                    match delivery {
                        Delivery::Plan { worker, plan, bundle } => self.receive(worker, &plan, bundle),
                        Delivery::Result { worker, result, delta } => {
                            let actions = self.core.result(worker, result, delta, self.now);
                            self.apply(actions);
                        }
                        Delivery::Failed {
                            worker,
                            round,
                            assignment,
                        } => match self.core.failed(worker, round, assignment, "checksum", self.now) {
                            Ok(actions) => self.apply(actions),
                            Err(e) => panic!("{e:#}"),
                        },
                    }
                    self.disturb();
                }
                (None, None) => {
                    // Nothing in flight and nobody busy: whoever holds no work waits for a
                    // newcomer (every connected worker was dropped or lost its plan).
                    self.join(Conduct::Honest, None);
                }
            }
        }
        let outcome = match self.core.finish_round() {
            Ok(o) => o,
            Err(e) => panic!("round {round}: {e:#}"),
        };
        self.last_update = Some(outcome.update);
    }

    /// Runs every round, restarting the coordinator as the disturbance asks; the final state
    /// checksum.
    fn run(self) -> String {
        self.run_counted().0
    }

    /// [`Sim::run`], with the run's tally (kept across restarts) and the restart count.
    fn run_counted(mut self) -> (String, super::Tally, u64) {
        let mut restarts = 0;
        for round in 0..self.config.rounds {
            if self.d.restart_every > 0 && round > 0 && round % self.d.restart_every == 0 {
                self.restart();
                restarts += 1;
            }
            self.run_round(round);
        }
        (hex(&self.core.state_checksum()), self.core.tally().clone(), restarts)
    }

    /// The coordinator dies between rounds and a new one resumes from its snapshot; every
    /// worker process reconnects (keeping its model) and plans in flight are lost.
    fn restart(&mut self) {
        let snapshot = self.core.snapshot(self.core.counters());
        let mut fresh = core(&self.config, self.timeout);
        if let Err(e) = fresh.restore(&snapshot) {
            panic!("restore: {e:#}");
        }
        assert_eq!(fresh.state_checksum(), self.core.state_checksum());
        self.core = fresh;
        self.last_update = None;
        self.queue = Queue::default();
        let old: Vec<SimWorker> = std::mem::take(&mut self.workers).into_values().collect();
        for w in old {
            self.join(w.conduct, w.held);
        }
    }
}

/// Every strategy, as the sim runs it.
fn strategies() -> Vec<(&'static str, JobConfig)> {
    vec![
        ("uniform", config("kind = \"domain-weights\"\nmethod = \"uniform\"", 12, 6)),
        (
            "hypergradient",
            config("kind = \"domain-weights\"\nmethod = \"hypergradient\"\nprobe = 4", 12, 6),
        ),
        (
            "doremi",
            config(
                "kind = \"domain-weights\"\nmethod = \"doremi\"\nprobe = 4\nreference_rounds = 4",
                12,
                6,
            ),
        ),
        (
            "loss-rescaling",
            config("kind = \"loss-rescaling\"\nmode = \"self-taught\"", 12, 6),
        ),
        (
            "task-policy",
            config(
                "kind = \"task-policy\"\npolicy = \"learned\"\nsources_per_round = 4\nfinetune_rounds = 2\ntarget_batch = 8",
                12,
                1,
            ),
        ),
    ]
}

#[test]
fn undisturbed_runs_repeat_and_do_not_depend_on_the_number_of_workers() {
    for (name, config) in strategies() {
        let one = Sim::new(config.clone(), 1, Disturbance::default()).run();
        let again = Sim::new(config.clone(), 1, Disturbance::default()).run();
        let many = Sim::new(config.clone(), 24, Disturbance::default()).run();
        assert_eq!(one, again, "{name}");
        assert_eq!(one, many, "{name}: 1 worker against 24");
    }
}

#[test]
fn joins_drops_stalls_duplicates_garbage_and_restarts_end_in_the_undisturbed_state() {
    for (name, config) in strategies() {
        let reference = Sim::new(config.clone(), 3, Disturbance::default()).run();
        let (mut lost, mut rejected, mut restarts) = (BTreeMap::new(), 0, 0);
        for seed in 0..6u64 {
            let d = Disturbance {
                seed: derive_seed(seed, &[0xD157]),
                drop: 0.04,
                join: 0.1,
                misconduct: 0.6,
                restart_every: if seed % 2 == 0 { 5 } else { 0 },
            };
            let sim = Sim::new(config.clone(), 3 + (seed as usize * 7) % 40, d);
            let (got, tally, restarted) = sim.run_counted();
            assert_eq!(got, reference, "{name}, disturbance seed {seed}");
            for (why, n) in tally.lost {
                *lost.entry(why).or_insert(0) += n;
            }
            rejected += tally.rejected.values().sum::<u64>();
            restarts += restarted;
        }
        // The runs were disturbed in every way they could be.
        for why in ["lost", "malformed_result", "assignment_timeout", "not_assigned"] {
            assert!(
                lost.get(why).is_some_and(|&n| n > 0),
                "{name}: no worker {why}: {lost:?}"
            );
        }
        assert!(
            rejected > 0 && restarts > 0,
            "{name}: {rejected} rejected, {restarts} restarts"
        );
    }
}

#[test]
fn misbehaving_workers_are_dropped_and_counted() {
    let (_, config) = strategies().swap_remove(1);
    let mut sim = Sim::new(config, 0, Disturbance::default());
    for conduct in [
        Conduct::Lies,
        Conduct::Garbles,
        Conduct::Stutters,
        Conduct::Stalls,
        Conduct::Honest,
    ] {
        sim.join(conduct, None);
    }
    sim.run_round(0);
    let tally = sim.core.tally();
    assert_eq!(tally.lost.get("malformed_result"), Some(&2), "{tally:?}");
    assert_eq!(tally.lost.get("assignment_timeout"), Some(&1), "{tally:?}");
    assert_eq!(tally.rejected.get("non_finite"), Some(&1), "{tally:?}");
    assert_eq!(tally.rejected.get("bad_hypergradient"), Some(&1), "{tally:?}");
    assert!(tally.lost.contains_key("not_assigned"), "the stutterer: {tally:?}");
}
