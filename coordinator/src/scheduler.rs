//! Round bookkeeping as a plain state machine: which worker holds which assignment, which
//! results count. No sockets, no clocks; the server feeds it events and carries out the
//! dispatches it returns.
//!
//! Invariants: an assignment is held by at most one worker at a time; a result is accepted only
//! from the worker holding that assignment in the current round, and only once. Time enters
//! only as arguments: a worker that holds work and has shown no progress (no result) for longer
//! than the assignment timeout is reported by [`Scheduler::overdue`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

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

#[derive(Debug, Default)]
pub struct Scheduler {
    round: Option<u64>,
    workers: BTreeMap<WorkerId, BTreeSet<u32>>,
    unassigned: BTreeSet<u32>,
    done: BTreeSet<u32>,
    total: u32,
    reassigned: u64,
    /// Since when each busy worker has made no progress.
    busy_since: BTreeMap<WorkerId, Instant>,
}

impl Scheduler {
    pub fn new() -> Self {
        Self::default()
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
        if let Some(held) = self.workers.remove(&worker) {
            self.reassigned += held.len() as u64;
            self.unassigned.extend(held);
        }
        self.distribute(now)
    }

    /// Workers that hold assignments and have returned nothing for `timeout`: alive on the
    /// network (keep-alives still flow) but stuck. The caller drops them like lost workers.
    pub fn overdue(&self, now: Instant, timeout: Duration) -> Vec<WorkerId> {
        self.busy_since
            .iter()
            .filter(|(_, &since)| now.saturating_duration_since(since) >= timeout)
            .map(|(w, _)| *w)
            .collect()
    }

    /// When the next worker becomes overdue, if any is busy.
    pub fn next_deadline(&self, timeout: Duration) -> Option<Instant> {
        self.busy_since
            .values()
            .min()
            .and_then(|&since| since.checked_add(timeout))
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
        let mut s = Scheduler::new();
        assert!(s.worker_joined(1, t0()).is_empty(), "no round yet");
        s.worker_joined(2, t0());
        assert_eq!(s.start_round(0, 5, t0()), vec![d(1, &[0, 1, 2]), d(2, &[3, 4])]);
    }

    #[test]
    fn results_count_once_and_only_from_the_holder() {
        let mut s = Scheduler::new();
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
        let mut s = Scheduler::new();
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
        let mut s = Scheduler::new();
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
        let mut s = Scheduler::new();
        let start = Instant::now();
        let limit = Duration::from_secs(60);
        s.worker_joined(1, start);
        s.worker_joined(2, start);
        s.start_round(0, 4, start);
        assert!(s.overdue(start + Duration::from_secs(59), limit).is_empty());
        // Worker 1 makes progress at 30 s, which restarts its clock; worker 2 stays silent.
        assert_eq!(s.result(1, 0, 0, start + Duration::from_secs(30)), Ok(()));
        assert_eq!(s.overdue(start + Duration::from_secs(60), limit), vec![2]);
        assert_eq!(s.next_deadline(limit), Some(start + limit));
        assert_eq!(s.worker_lost(2, start + Duration::from_secs(60)), vec![d(1, &[2, 3])]);
        assert!(
            s.overdue(start + Duration::from_secs(80), limit).is_empty(),
            "worker 1's clock restarted at 30 s"
        );
        assert_eq!(s.overdue(start + Duration::from_secs(90), limit), vec![1]);
        for a in 1..4 {
            assert_eq!(s.result(1, 0, a, start + Duration::from_secs(91)), Ok(()));
        }
        assert!(
            s.overdue(start + Duration::from_secs(1000), limit).is_empty(),
            "an idle worker is never overdue"
        );
        assert_eq!(s.next_deadline(limit), None);
    }
}
