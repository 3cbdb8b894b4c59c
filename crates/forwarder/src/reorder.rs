//! Putting a striped link's packets back in order (SPECIFICATION.md §6.6).
//!
//! The members of a striped link are SSM sessions with their own queues and
//! delays, so packets numbered in order by the sender arrive out of order. The
//! receiver holds a packet that arrives early until the ones before it are
//! there, but never for longer than a bound: a gap older than that is skipped
//! (its packets may be lost with a member session, or just slow), and a packet
//! that arrives after its gap was skipped goes on at once. IP allows
//! reordering; what the bound saves is TCP's fast retransmits and the
//! congestion backoff that come with them.
//!
//! Sans I/O: packets and the clock in, packets out through a closure.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// A jump further than this (either way) is a new sequence, not reordering:
/// the peer restarted its numbering (a new agent session after a failover).
const RESYNC: i64 = 1 << 20;

/// What the buffer has done so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReorderStats {
    /// Packets delivered, in whatever way.
    pub delivered: u64,
    /// Packets that waited for an earlier one.
    pub held: u64,
    /// Sequence numbers given up on (their packets never came in time).
    pub skipped: u64,
    /// Packets that came after their gap had been skipped (delivered at once).
    pub late: u64,
    /// Times the sequence restarted.
    pub resyncs: u64,
}

#[derive(Debug)]
pub struct Reorder {
    /// The next number to deliver, unwrapped to 64 bits; `None` until the first packet.
    next: Option<u64>,
    held: BTreeMap<u64, Bytes>,
    /// Since when the oldest gap has been waited for.
    gap_since: Option<Instant>,
    bound: Duration,
    max_held: usize,
    pub stats: ReorderStats,
}

impl Reorder {
    /// Gaps are waited for at most `bound`; at most `max_held` packets wait.
    pub fn new(bound: Duration, max_held: usize) -> Self {
        Reorder {
            next: None,
            held: BTreeMap::new(),
            gap_since: None,
            bound,
            max_held: max_held.max(1),
            stats: ReorderStats::default(),
        }
    }

    pub fn bound(&self) -> Duration {
        self.bound
    }

    /// A new bound (the members' RTTs changed); it applies to the current gap too.
    pub fn set_bound(&mut self, bound: Duration) {
        self.bound = bound;
    }

    /// Packets waiting for an earlier one.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Packet `seq` arrived at `now`; whatever can go on now goes to `out`.
    pub fn push(&mut self, seq: u32, packet: Bytes, now: Instant, out: &mut impl FnMut(Bytes)) {
        // Numbers start far from zero so that early late packets do not underflow.
        let next = *self.next.get_or_insert(u64::from(seq) + (1 << 32));
        let offset = i64::from(seq.wrapping_sub(next as u32) as i32);
        if !(-RESYNC..=RESYNC).contains(&offset) {
            self.stats.resyncs += 1;
            self.flush(out);
            self.next = Some(u64::from(seq) + (1 << 32));
            return self.push(seq, packet, now, out);
        }
        let n = next.wrapping_add_signed(offset);
        if n < next {
            self.stats.late += 1;
            self.deliver(packet, out);
        } else if n == next {
            self.deliver(packet, out);
            self.next = Some(next + 1);
            self.release_in_order(now, out);
        } else {
            if self.held.insert(n, packet).is_none() {
                self.stats.held += 1;
            }
            self.gap_since.get_or_insert(now);
            if self.held.len() > self.max_held {
                self.skip_gap(now, out);
            }
        }
    }

    /// When the oldest gap is given up on, if any packet waits.
    pub fn deadline(&self) -> Option<Instant> {
        self.gap_since.map(|t| t + self.bound)
    }

    /// Skip the gaps that have been waited for `bound` by `now`.
    pub fn on_timeout(&mut self, now: Instant, out: &mut impl FnMut(Bytes)) {
        while self.deadline().is_some_and(|d| d <= now) {
            self.skip_gap(now, out);
        }
    }

    /// Give up on every gap at once (a member died with its packets): what
    /// waits goes on, in order.
    pub fn flush(&mut self, out: &mut impl FnMut(Bytes)) {
        let held = std::mem::take(&mut self.held);
        if let (Some(next), Some((&last, _))) = (self.next, held.last_key_value()) {
            self.stats.skipped += (last + 1 - next) - held.len() as u64;
            self.next = Some(last + 1);
        }
        for (_, p) in held {
            self.deliver(p, out);
        }
        self.gap_since = None;
    }

    fn deliver(&mut self, packet: Bytes, out: &mut impl FnMut(Bytes)) {
        self.stats.delivered += 1;
        out(packet);
    }

    /// Deliver held packets from `next` on while they are consecutive.
    fn release_in_order(&mut self, now: Instant, out: &mut impl FnMut(Bytes)) {
        let Some(mut next) = self.next else { return };
        while let Some(p) = self.held.remove(&next) {
            self.deliver(p, out);
            next += 1;
        }
        self.next = Some(next);
        // The gap that was waited for is closed; a later one starts now.
        self.gap_since = if self.held.is_empty() { None } else { Some(now) };
    }

    /// Give up on the numbers before the first held packet.
    fn skip_gap(&mut self, now: Instant, out: &mut impl FnMut(Bytes)) {
        let (Some(next), Some((&first, _))) = (self.next, self.held.first_key_value()) else {
            self.gap_since = None;
            return;
        };
        self.stats.skipped += first - next;
        self.next = Some(first);
        self.release_in_order(now, out);
    }
}

#[cfg(test)]
mod tests;
