//! Who may start a handshake: a pure decision over the connections between their first packet
//! and their hello. No sockets, no clocks; the accept loop feeds it arrivals and departures and
//! carries out what it returns (accept, evict the oldest, ask for a retry, refuse).
//!
//! The rules, so that no peer can hold admission shut:
//! * Beyond half the slots, a client whose address QUIC has not validated is asked to retry
//!   (a stateless round trip): spoofed or half-open floods then cost no slot at all.
//! * One source address may hold at most a quarter of the slots; more from it are refused.
//! * When every slot is taken, the oldest pending handshake is evicted for the newcomer rather
//!   than the newcomer refused: a peer that stalls is always the oldest sooner or later, while a
//!   worker that completes its handshake and hello promptly leaves before it gets there.
//!   (Each pending handshake also has a deadline of a few seconds, kept by its task.)

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

/// Names one pending handshake; later arrivals have larger tickets.
pub(crate) type Ticket = u64;

/// What to do with a new connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Start its handshake under `ticket`; first cancel `evict`, the oldest pending one.
    Accept { ticket: Ticket, evict: Option<Ticket> },
    /// Answer with a QUIC retry: the client must prove it receives at its address.
    Retry,
    /// Refuse it; a bounded label says why.
    Refuse(&'static str),
}

/// The pending handshakes and the limits on them.
#[derive(Debug)]
pub(crate) struct Admission {
    slots: usize,
    per_source: usize,
    retry_above: usize,
    /// Pending handshakes by ticket, so the first is the oldest.
    pending: BTreeMap<Ticket, IpAddr>,
    by_source: HashMap<IpAddr, usize>,
    next: Ticket,
}

impl Admission {
    /// At most `slots` handshakes at once (at least 1), a quarter of them per source address,
    /// and retries asked of unvalidated addresses beyond half of them.
    pub(crate) fn new(slots: usize) -> Self {
        let slots = slots.max(1);
        Self {
            slots,
            per_source: (slots / 4).max(1),
            retry_above: (slots / 2).max(1),
            pending: BTreeMap::new(),
            by_source: HashMap::new(),
            next: 0,
        }
    }

    /// A connection attempt from `source`; `validated` when QUIC has already validated its
    /// address (it came back with a retry token).
    pub(crate) fn incoming(&mut self, source: IpAddr, validated: bool) -> Decision {
        let source = source.to_canonical();
        if !validated && self.pending.len() >= self.retry_above {
            return Decision::Retry;
        }
        if self.by_source.get(&source).copied().unwrap_or(0) >= self.per_source {
            return Decision::Refuse("too_many_from_source");
        }
        let evict = if self.pending.len() >= self.slots {
            let oldest = self.pending.keys().next().copied();
            if let Some(t) = oldest {
                self.finished(t);
            }
            oldest
        } else {
            None
        };
        self.next += 1;
        let ticket = self.next;
        self.pending.insert(ticket, source);
        *self.by_source.entry(source).or_default() += 1;
        Decision::Accept { ticket, evict }
    }

    /// The handshake `ticket` is over (joined, refused, timed out or evicted); its slot is free.
    /// Idempotent.
    pub(crate) fn finished(&mut self, ticket: Ticket) {
        if let Some(source) = self.pending.remove(&ticket) {
            if let Some(n) = self.by_source.get_mut(&source) {
                *n -= 1;
                if *n == 0 {
                    self.by_source.remove(&source);
                }
            }
        }
    }

    /// Handshakes in progress.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn accept(d: Decision) -> (Ticket, Option<Ticket>) {
        match d {
            Decision::Accept { ticket, evict } => (ticket, evict),
            other => panic!("expected an accept, got {other:?}"),
        }
    }

    #[test]
    fn a_full_house_evicts_the_oldest_not_the_newcomer() {
        let mut a = Admission::new(8);
        // Stalled peers from eight addresses, all validated (they answered a retry).
        let stalled: Vec<Ticket> = (0..8).map(|i| accept(a.incoming(ip(i), true)).0).collect();
        assert_eq!(a.pending(), 8);
        // A prompt worker still gets in: the oldest stalled one makes room.
        let (honest, evicted) = accept(a.incoming(ip(100), true));
        assert_eq!(evicted, Some(stalled[0]));
        assert_eq!(a.pending(), 8);
        // It finishes its hello before seven more arrivals; each evicts the next oldest staller.
        for i in 1..8 {
            assert_eq!(accept(a.incoming(ip(20 + i), true)).1, Some(stalled[usize::from(i)]));
        }
        a.finished(honest);
        assert_eq!(a.pending(), 7);
        a.finished(honest);
        assert_eq!(a.pending(), 7, "finishing twice frees one slot");
    }

    #[test]
    fn unvalidated_addresses_retry_beyond_half_the_slots() {
        let mut a = Admission::new(8);
        for i in 0..4 {
            accept(a.incoming(ip(i), false));
        }
        assert_eq!(
            a.incoming(ip(9), false),
            Decision::Retry,
            "half-open floods cost nothing"
        );
        accept(a.incoming(ip(9), true));
        assert_eq!(a.pending(), 5);
    }

    #[test]
    fn one_source_holds_at_most_a_quarter_of_the_slots() {
        let mut a = Admission::new(16);
        let mine: Vec<Ticket> = (0..4).map(|_| accept(a.incoming(ip(1), true)).0).collect();
        assert_eq!(a.incoming(ip(1), true), Decision::Refuse("too_many_from_source"));
        // The same address as IPv4-mapped IPv6 is the same source.
        let mapped = IpAddr::from(std::net::Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        assert_eq!(a.incoming(mapped, true), Decision::Refuse("too_many_from_source"));
        accept(a.incoming(ip(2), true));
        a.finished(mine[0]);
        accept(a.incoming(ip(1), true));
    }

    #[test]
    fn an_evicted_source_gets_its_share_back() {
        let mut a = Admission::new(4);
        let first = accept(a.incoming(ip(1), true)).0;
        for i in 2..5 {
            accept(a.incoming(ip(i), true));
        }
        assert_eq!(a.incoming(ip(1), true), Decision::Refuse("too_many_from_source"));
        let (_, evicted) = accept(a.incoming(ip(5), true));
        assert_eq!(evicted, Some(first));
        accept(a.incoming(ip(1), true));
    }

    #[test]
    fn a_single_slot_still_admits() {
        let mut a = Admission::new(0);
        let (t, e) = accept(a.incoming(ip(1), false));
        assert_eq!(e, None);
        assert_eq!(a.incoming(ip(2), false), Decision::Retry);
        assert_eq!(accept(a.incoming(ip(2), true)).1, Some(t));
    }
}
