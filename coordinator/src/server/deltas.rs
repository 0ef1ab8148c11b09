//! Which workers' deltas the coordinator reads now. A round's deltas are summed in assignment
//! order (`outer::OrderedSum`), so the delta the sum needs next is always read; another is read
//! ahead of its turn only while fewer than `max_receiving − 1` deltas are buffered in the sum
//! or being read ahead. The others wait unread, their senders held back by QUIC flow control,
//! so the coordinator holds at most `max_receiving` decoded deltas besides the running sum,
//! however many workers there are. Results do not depend on it: only when a delta is read.

use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::Notify;

/// Where the round's ordered sum stands, as the run loop reports it after every change.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SumState {
    pub round: u64,
    /// The assignment whose delta the sum takes next.
    pub next: usize,
    /// Deltas read ahead of their turn and held by the sum.
    pub buffered: usize,
}

#[derive(Debug, Default)]
struct State {
    sum: SumState,
    /// Deltas being read ahead of their turn (each holds a [`Permit`]).
    reading_ahead: usize,
}

impl State {
    /// `None` when the delta of assignment `index` of `round` must wait; else whether it is
    /// read ahead of its turn. The next delta is always read, and so is one the sum will not
    /// keep (an assignment already summed, or another round's): it is rejected on arrival.
    fn admit(&self, round: u64, index: usize, max_ahead: usize) -> Option<bool> {
        if round != self.sum.round || index <= self.sum.next {
            return Some(false);
        }
        (self.sum.buffered + self.reading_ahead < max_ahead).then_some(true)
    }
}

/// The gate every delta passes before its payload is read.
#[derive(Debug)]
pub struct DeltaGate {
    max_ahead: usize,
    state: Mutex<State>,
    notify: Notify,
}

/// Leave to read one delta; one read ahead of its turn counts until the permit is dropped
/// (after the run loop has given the delta to the sum and reported the sum's state).
#[derive(Debug)]
pub struct Permit {
    gate: Arc<DeltaGate>,
    ahead: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.ahead {
            self.gate.lock().reading_ahead -= 1;
            self.gate.notify.notify_waiters();
        }
    }
}

impl DeltaGate {
    /// A gate that lets at most `max_receiving` deltas be held or read at once (at least 1:
    /// the next one).
    pub fn new(max_receiving: usize) -> Arc<Self> {
        Arc::new(Self {
            max_ahead: max_receiving.saturating_sub(1),
            state: Mutex::default(),
            notify: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until the delta of assignment `index` of `round` may be read.
    pub async fn admit(self: &Arc<Self>, round: u64, index: usize) -> Permit {
        loop {
            let notified = self.notify.notified();
            {
                let mut s = self.lock();
                if let Some(ahead) = s.admit(round, index, self.max_ahead) {
                    if ahead {
                        s.reading_ahead += 1;
                    }
                    return Permit {
                        gate: self.clone(),
                        ahead,
                    };
                }
            }
            notified.await;
        }
    }

    /// The sum's state changed (a round started, a delta was summed or buffered).
    pub fn update(&self, sum: SumState) {
        let mut s = self.lock();
        if s.sum != sum {
            s.sum = sum;
            drop(s);
            self.notify.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn state(round: u64, next: usize, buffered: usize, reading_ahead: usize) -> State {
        State {
            sum: SumState { round, next, buffered },
            reading_ahead,
        }
    }

    #[test]
    fn the_next_delta_is_always_read_and_others_only_within_the_budget() {
        // One ahead allowed.
        assert_eq!(state(3, 2, 0, 0).admit(3, 2, 1), Some(false), "the next one");
        assert_eq!(
            state(3, 2, 5, 5).admit(3, 2, 1),
            Some(false),
            "the next one, whatever is held"
        );
        assert_eq!(state(3, 2, 0, 0).admit(3, 4, 1), Some(true), "one ahead");
        assert_eq!(state(3, 2, 1, 0).admit(3, 4, 1), None, "one buffered already");
        assert_eq!(state(3, 2, 0, 1).admit(3, 4, 1), None, "one being read ahead already");
        assert_eq!(state(3, 2, 0, 0).admit(3, 4, 0), None, "none ahead allowed");
        assert_eq!(
            state(3, 2, 1, 1).admit(3, 1, 0),
            Some(false),
            "already summed: rejected on arrival"
        );
        assert_eq!(state(3, 2, 1, 1).admit(2, 9, 0), Some(false), "another round's");
    }

    /// A delta ahead of its turn waits until the sum moves on, then reads.
    #[tokio::test]
    async fn a_delta_ahead_waits_for_the_sum_to_move() {
        let gate = DeltaGate::new(2);
        gate.update(SumState {
            round: 0,
            next: 0,
            buffered: 0,
        });
        let first_ahead = gate.admit(0, 1).await;
        let waiting = tokio::spawn({
            let gate = gate.clone();
            async move { gate.admit(0, 2).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "the budget is taken by the delta being read ahead"
        );
        // Delta 1 arrives and is buffered (its permit goes): still one held ahead.
        gate.update(SumState {
            round: 0,
            next: 0,
            buffered: 1,
        });
        drop(first_ahead);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "delta 1 is buffered: the budget is still taken");
        // Delta 0 arrives: 0 and 1 are summed.
        gate.update(SumState {
            round: 0,
            next: 2,
            buffered: 0,
        });
        let permit = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("admitted once the sum moved")
            .expect("task");
        assert!(!permit.ahead, "delta 2 is the next one now");
    }
}
