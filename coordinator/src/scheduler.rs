//! Round bookkeeping as a plain state machine: which worker holds which assignment, which
//! results count. No sockets, no clocks; the server feeds it events and carries out the
//! dispatches it returns.
//!
//! Invariants: an assignment is held by at most one worker at a time; a result is accepted only
//! from the worker holding that assignment in the current round, and only once. Time enters
//! only as arguments: a worker that holds work and has shown no progress (no result) for longer
//! than the assignment timeout is reported by [`Scheduler::overdue`]. The timeout is fixed, or
//! derived from how long results have taken ([`AssignmentTimeout`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

/// How long a worker that holds work may go without returning a result before it is dropped.
#[derive(Debug, Clone, PartialEq)]
pub enum AssignmentTimeout {
    /// Always this long (`--assignment-timeout S`).
    Fixed(Duration),
    /// [`Self::MULTIPLE`] times the slowest of the last [`Self::WINDOW`] results (time from
    /// dispatch, or from the worker's previous result, to the result), at least
    /// [`Self::FLOOR`]; [`Self::UNOBSERVED`] before any result was seen. A worker's first
    /// result after it joined gets at least [`Self::FIRST_RESULT`] (it loads the job's data
    /// and the full model first). One stalled peer then holds a job of quick rounds for
    /// about `FLOOR`, not ten minutes.
    Adaptive { recent: VecDeque<Duration> },
}

impl AssignmentTimeout {
    /// Headroom over the slowest recent result: a worker on a busier machine, a larger batch
    /// of assignments, a model resent in full.
    pub const MULTIPLE: u32 = 4;
    /// Results remembered: enough to span a few rounds, few enough to forget a slow phase.
    pub const WINDOW: usize = 64;
    /// Rounds this fast are not worth dropping a worker over sooner: scheduling hiccups, a
    /// checkpoint, a garbage collection on the worker's machine.
    pub const FLOOR: Duration = Duration::from_secs(30);
    /// Before anything was observed nothing is known about the job: the old fixed default.
    pub const UNOBSERVED: Duration = Duration::from_secs(600);
    /// A worker's first result also covers loading the job's data and the full model.
    pub const FIRST_RESULT: Duration = Duration::from_secs(120);

    /// The adaptive timeout, with nothing observed yet.
    pub fn adaptive() -> Self {
        AssignmentTimeout::Adaptive {
            recent: VecDeque::new(),
        }
    }

    /// A result came `took` after the worker's previous progress.
    pub fn observe(&mut self, took: Duration) {
        if let AssignmentTimeout::Adaptive { recent } = self {
            if recent.len() == Self::WINDOW {
                recent.pop_front();
            }
            recent.push_back(took);
        }
    }

    /// The timeout now, for a worker that has (`returned`) or has not yet returned a result.
    pub fn current(&self, returned: bool) -> Duration {
        match self {
            AssignmentTimeout::Fixed(d) => *d,
            AssignmentTimeout::Adaptive { recent } => {
                let Some(slowest) = recent.iter().max() else {
                    return Self::UNOBSERVED;
                };
                let t = slowest.saturating_mul(Self::MULTIPLE).max(Self::FLOOR);
                if returned {
                    t
                } else {
                    t.max(Self::FIRST_RESULT)
                }
            }
        }
    }
}

pub type WorkerId = u64;

/// Send these assignment indices to this worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch {
    pub worker: WorkerId,
    pub assignments: Vec<u32>,
}

/// Why a result was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// For a round that is over (or not started).
    StaleRound,
    /// The sender does not hold that assignment: never given, given to another, or already done.
    NotAssigned,
}

impl Rejection {
    /// Label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::StaleRound => "stale_round",
            Rejection::NotAssigned => "not_assigned",
        }
    }
}

#[derive(Debug)]
pub struct Scheduler {
    round: Option<u64>,
    workers: BTreeMap<WorkerId, BTreeSet<u32>>,
    unassigned: BTreeSet<u32>,
    done: BTreeSet<u32>,
    total: u32,
    reassigned: u64,
    /// Since when each busy worker has made no progress.
    busy_since: BTreeMap<WorkerId, Instant>,
    timeout: AssignmentTimeout,
    /// Workers that have returned at least one result.
    returned: BTreeSet<WorkerId>,
}

impl Default for Scheduler {
    fn default() -> Self {
        Self::with_timeout(AssignmentTimeout::adaptive())
    }
}

impl Scheduler {
    /// A scheduler that drops stuck workers after `timeout` (fixed or adaptive).
    pub fn with_timeout(timeout: AssignmentTimeout) -> Self {
        Self {
            round: None,
            workers: BTreeMap::new(),
            unassigned: BTreeSet::new(),
            done: BTreeSet::new(),
            total: 0,
            reassigned: 0,
            busy_since: BTreeMap::new(),
            timeout,
            returned: BTreeSet::new(),
        }
    }

    /// How long `worker` may hold work without returning a result, as of now.
    pub fn timeout_for(&self, worker: WorkerId) -> Duration {
        self.timeout.current(self.returned.contains(&worker))
    }

    /// Assignments handed to a new worker because their holder was lost or failed them.
    pub fn reassigned(&self) -> u64 {
        self.reassigned
    }

    /// True when every assignment of the current round has an accepted result.
    pub fn round_complete(&self) -> bool {
        self.round.is_some() && self.done.len() as u32 == self.total
    }

    /// Starts `round` with assignments `0..count`, spread evenly over the live workers in
    /// contiguous blocks. With no workers the assignments wait for the first join.
    pub fn start_round(&mut self, round: u64, count: u32, now: Instant) -> Vec<Dispatch> {
        self.round = Some(round);
        self.busy_since.clear();
        self.total = count;
        self.done.clear();
        for held in self.workers.values_mut() {
            held.clear();
        }
        self.unassigned = (0..count).collect();
        self.distribute(now)
    }

    /// A worker connected. It takes any assignments nobody holds.
    pub fn worker_joined(&mut self, worker: WorkerId, now: Instant) -> Vec<Dispatch> {
        self.workers.entry(worker).or_default();
        self.distribute(now)
    }

    /// A worker is gone; its unfinished assignments move to the others.
    pub fn worker_lost(&mut self, worker: WorkerId, now: Instant) -> Vec<Dispatch> {
        self.busy_since.remove(&worker);
        self.returned.remove(&worker);
        if let Some(held) = self.workers.remove(&worker) {
            self.reassigned += held.len() as u64;
            self.unassigned.extend(held);
        }
        self.distribute(now)
    }

    /// Workers that hold assignments and have returned nothing for their timeout: alive on the
    /// network (keep-alives still flow) but stuck. The caller drops them like lost workers.
    pub fn overdue(&self, now: Instant) -> Vec<WorkerId> {
        let timeout = self.timeouts();
        self.busy_since
            .iter()
            .filter(|(&w, &since)| now.saturating_duration_since(since) >= timeout(w))
            .map(|(w, _)| *w)
            .collect()
    }

    /// When the next worker becomes overdue, if any is busy (and the time is representable).
    /// Asked after every event: the two timeouts are worked out once, not once per busy worker.
    pub fn next_deadline(&self) -> Option<Instant> {
        let timeout = self.timeouts();
        self.busy_since
            .iter()
            .filter_map(|(&w, &since)| since.checked_add(timeout(w)))
            .min()
    }

    /// [`Self::timeout_for`] as a function of the worker, with the window's maximum taken once.
    fn timeouts(&self) -> impl Fn(WorkerId) -> Duration + '_ {
        let (first, later) = (self.timeout.current(false), self.timeout.current(true));
        move |w| if self.returned.contains(&w) { later } else { first }
    }

    /// Whether a result would be accepted, without recording it.
    ///
    /// # Errors
    /// The [`Rejection`] reason.
    pub fn check(&self, worker: WorkerId, round: u64, assignment: u32) -> Result<(), Rejection> {
        if self.round != Some(round) {
            return Err(Rejection::StaleRound);
        }
        match self.workers.get(&worker) {
            Some(held) if held.contains(&assignment) => Ok(()),
            _ => Err(Rejection::NotAssigned),
        }
    }

    /// A result arrived. `Ok` means apply it (exactly once per assignment).
    ///
    /// # Errors
    /// The [`Rejection`] reason.
    pub fn result(&mut self, worker: WorkerId, round: u64, assignment: u32, now: Instant) -> Result<(), Rejection> {
        self.check(worker, round, assignment)?;
        if let Some(&since) = self.busy_since.get(&worker) {
            self.timeout.observe(now.saturating_duration_since(since));
        }
        self.returned.insert(worker);
        if let Some(held) = self.workers.get_mut(&worker) {
            held.remove(&assignment);
            if held.is_empty() {
                self.busy_since.remove(&worker);
            } else {
                self.busy_since.insert(worker, now);
            }
        }
        self.done.insert(assignment);
        Ok(())
    }

    /// The worker could not run an assignment; it goes back into the pool and to the least
    /// loaded worker (possibly the same one, which the server then resyncs in full).
    pub fn failed(&mut self, worker: WorkerId, round: u64, assignment: u32, now: Instant) -> Vec<Dispatch> {
        if self.round != Some(round) {
            return Vec::new();
        }
        if let Some(held) = self.workers.get_mut(&worker) {
            if held.remove(&assignment) {
                self.reassigned += 1;
                self.unassigned.insert(assignment);
            }
            if held.is_empty() {
                self.busy_since.remove(&worker);
            }
        }
        self.distribute(now)
    }

    /// Hands every unassigned assignment out, least-loaded worker first, in contiguous blocks.
    fn distribute(&mut self, now: Instant) -> Vec<Dispatch> {
        if self.round.is_none() || self.workers.is_empty() || self.unassigned.is_empty() {
            return Vec::new();
        }
        let mut out: BTreeMap<WorkerId, Vec<u32>> = BTreeMap::new();
        let pending: Vec<u32> = std::mem::take(&mut self.unassigned).into_iter().collect();
        let mut load: Vec<(usize, WorkerId)> = self.workers.iter().map(|(w, h)| (h.len(), *w)).collect();
        load.sort_unstable();
        let n = load.len();
        let mut start = 0;
        for (i, (_, worker)) in load.iter().enumerate() {
            let share = pending.len() / n + usize::from(i < pending.len() % n);
            let block = &pending[start..start + share];
            start += share;
            if !block.is_empty() {
                self.workers.entry(*worker).or_default().extend(block);
                self.busy_since.entry(*worker).or_insert(now);
                out.entry(*worker).or_default().extend(block);
            }
        }
        out.into_iter()
            .map(|(worker, assignments)| Dispatch { worker, assignments })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }

    fn d(worker: WorkerId, a: &[u32]) -> Dispatch {
        Dispatch {
            worker,
            assignments: a.to_vec(),
        }
    }

    #[test]
    fn assignments_are_spread_in_blocks() {
        let mut s = Scheduler::default();
        assert!(s.worker_joined(1, t0()).is_empty(), "no round yet");
        s.worker_joined(2, t0());
        assert_eq!(s.start_round(0, 5, t0()), vec![d(1, &[0, 1, 2]), d(2, &[3, 4])]);
    }

    #[test]
    fn results_count_once_and_only_from_the_holder() {
        let mut s = Scheduler::default();
        s.worker_joined(1, t0());
        s.worker_joined(2, t0());
        s.start_round(3, 2, t0());
        assert_eq!(s.result(2, 3, 0, t0()), Err(Rejection::NotAssigned), "held by worker 1");
        assert_eq!(s.result(1, 2, 0, t0()), Err(Rejection::StaleRound));
        assert_eq!(s.result(1, 3, 0, t0()), Ok(()));
        assert_eq!(s.result(1, 3, 0, t0()), Err(Rejection::NotAssigned), "duplicate");
        assert_eq!(s.result(9, 3, 1, t0()), Err(Rejection::NotAssigned), "unknown worker");
        assert!(!s.round_complete());
        assert_eq!(s.result(2, 3, 1, t0()), Ok(()));
        assert!(s.round_complete());
        assert_eq!(s.result(2, 3, 7, t0()), Err(Rejection::NotAssigned), "never given");
    }

    #[test]
    fn a_lost_worker_s_assignments_move_and_its_late_results_are_refused() {
        let mut s = Scheduler::default();
        s.worker_joined(1, t0());
        s.worker_joined(2, t0());
        s.start_round(0, 4, t0());
        assert_eq!(s.result(1, 0, 0, t0()), Ok(()));
        assert_eq!(
            s.worker_lost(1, t0()),
            vec![d(2, &[1])],
            "only the unfinished one moves"
        );
        assert_eq!(s.result(1, 0, 1, t0()), Err(Rejection::NotAssigned));
        for a in 1..4 {
            assert_eq!(s.result(2, 0, a, t0()), Ok(()));
        }
        assert!(s.round_complete());
        assert_eq!(s.reassigned(), 1);
    }

    #[test]
    fn work_waits_for_a_worker_and_failures_are_redispatched() {
        let mut s = Scheduler::default();
        assert!(s.start_round(0, 2, t0()).is_empty());
        assert_eq!(s.worker_joined(4, t0()), vec![d(4, &[0, 1])]);
        assert_eq!(
            s.failed(4, 0, 1, t0()),
            vec![d(4, &[1])],
            "the only worker gets it back"
        );
        assert!(s.failed(4, 9, 0, t0()).is_empty(), "stale failure ignored");
        assert_eq!(s.result(4, 0, 0, t0()), Ok(()));
        assert_eq!(s.result(4, 0, 1, t0()), Ok(()));
        assert!(s.round_complete());
        assert_eq!(s.start_round(1, 1, t0()), vec![d(4, &[0])]);
        assert!(!s.round_complete());
    }

    #[test]
    fn a_busy_worker_without_progress_becomes_overdue() {
        let limit = Duration::from_secs(60);
        let mut s = Scheduler::with_timeout(AssignmentTimeout::Fixed(limit));
        let start = Instant::now();
        s.worker_joined(1, start);
        s.worker_joined(2, start);
        s.start_round(0, 4, start);
        assert!(s.overdue(start + Duration::from_secs(59)).is_empty());
        // Worker 1 makes progress at 30 s, which restarts its clock; worker 2 stays silent.
        assert_eq!(s.result(1, 0, 0, start + Duration::from_secs(30)), Ok(()));
        assert_eq!(s.overdue(start + Duration::from_secs(60)), vec![2]);
        assert_eq!(s.next_deadline(), Some(start + limit));
        assert_eq!(s.worker_lost(2, start + Duration::from_secs(60)), vec![d(1, &[2, 3])]);
        assert!(
            s.overdue(start + Duration::from_secs(80)).is_empty(),
            "worker 1's clock restarted at 30 s"
        );
        assert_eq!(s.overdue(start + Duration::from_secs(90)), vec![1]);
        for a in 1..4 {
            assert_eq!(s.result(1, 0, a, start + Duration::from_secs(91)), Ok(()));
        }
        assert!(
            s.overdue(start + Duration::from_secs(1000)).is_empty(),
            "an idle worker is never overdue"
        );
        assert_eq!(s.next_deadline(), None);
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn the_adaptive_timeout_follows_the_slowest_recent_result() {
        let mut t = AssignmentTimeout::adaptive();
        assert_eq!(
            t.current(true),
            AssignmentTimeout::UNOBSERVED,
            "generous before anything is seen"
        );
        t.observe(Duration::from_millis(40));
        assert_eq!(t.current(true), AssignmentTimeout::FLOOR, "quick rounds: the floor");
        assert_eq!(
            t.current(false),
            AssignmentTimeout::FIRST_RESULT,
            "a new worker loads its data first"
        );
        t.observe(secs(20));
        assert_eq!(t.current(true), secs(80), "four times the slowest");
        assert_eq!(t.current(false), secs(120));
        for _ in 0..AssignmentTimeout::WINDOW {
            t.observe(secs(1));
        }
        assert_eq!(
            t.current(true),
            AssignmentTimeout::FLOOR,
            "the slow one has left the window"
        );
        let mut fixed = AssignmentTimeout::Fixed(secs(7));
        fixed.observe(secs(100));
        assert_eq!((fixed.current(true), fixed.current(false)), (secs(7), secs(7)));
    }

    /// A peer that takes work and stalls holds a job of quick rounds for the floor, not for
    /// the ten minutes of the old fixed default.
    #[test]
    fn a_stalled_peer_is_overdue_after_the_adaptive_timeout() {
        let mut s = Scheduler::default();
        let start = Instant::now();
        s.worker_joined(1, start);
        s.start_round(0, 1, start);
        assert_eq!(s.next_deadline(), Some(start + AssignmentTimeout::UNOBSERVED));
        let at = start + Duration::from_millis(50);
        assert_eq!(s.result(1, 0, 0, at), Ok(()));
        // Round 1: an honest worker and a staller that just joined and never answers.
        s.worker_joined(2, at);
        assert_eq!(s.start_round(1, 2, at), vec![d(1, &[0]), d(2, &[1])]);
        assert_eq!(s.result(1, 1, 0, at + Duration::from_millis(50)), Ok(()));
        assert!(s.overdue(at + secs(119)).is_empty());
        assert_eq!(s.next_deadline(), Some(at + AssignmentTimeout::FIRST_RESULT));
        assert_eq!(
            s.overdue(at + secs(120)),
            vec![2],
            "a new worker gets its first-result allowance"
        );
        assert_eq!(s.worker_lost(2, at + secs(120)), vec![d(1, &[1])]);
        // A worker that has returned results gets the floor.
        let later = at + secs(121);
        assert_eq!(s.next_deadline(), Some(at + secs(120) + AssignmentTimeout::FLOOR));
        assert!(s.overdue(later).is_empty());
        assert_eq!(s.overdue(at + secs(150)), vec![1]);
    }
}
