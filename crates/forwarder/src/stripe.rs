//! The receiving side of a striped link: the packets every member connection
//! reads go through a [`Reorder`] per flow bucket to one sink (so a flow waits
//! only for its own packets: a ping never waits behind a download's gap), and
//! a timer skips the gaps that have waited too long.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::reorder::{Reorder, ReorderStats};

/// Most packets of one flow bucket that wait for an earlier one (about 6 MB
/// of full-size packets).
pub const MAX_HELD: usize = 4096;

/// The reorder bound for members whose round-trip times are `rtts`: twice the
/// slowest plus 10 ms, within 20 ms..1 s. Members are reliable streams, so a
/// gap is almost always a packet still on its way on a slower member, not a
/// lost one (a member that ends is flushed at once); skipping it too soon costs
/// the flow a spurious fast retransmission and half its congestion window,
/// while waiting costs only the packets behind it some latency.
pub fn bound_for(rtts: &[Duration]) -> Duration {
    let Some(max) = rtts.iter().max() else { return DEFAULT_BOUND };
    (*max * 2 + Duration::from_millis(10)).clamp(Duration::from_millis(20), Duration::from_secs(1))
}

/// [`bound_for`] RTTs in microseconds, 0 meaning not measured yet; `None`
/// while none is.
pub fn bound_for_micros(rtts_us: impl IntoIterator<Item = u64>) -> Option<Duration> {
    let rtts: Vec<Duration> = rtts_us.into_iter().filter(|&us| us > 0).map(Duration::from_micros).collect();
    (!rtts.is_empty()).then(|| bound_for(&rtts))
}

/// The bound before any RTT is known.
pub const DEFAULT_BOUND: Duration = Duration::from_millis(100);

#[derive(Debug)]
struct Flows {
    flows: HashMap<u16, Reorder>,
    bound: Duration,
}

impl Flows {
    fn deadline(&self) -> Option<Instant> {
        self.flows.values().filter_map(Reorder::deadline).min()
    }
}

#[derive(Debug)]
pub struct Resequencer {
    inner: Mutex<Flows>,
    /// The earliest deadline may have moved.
    changed: Notify,
}

impl Default for Resequencer {
    fn default() -> Self {
        Resequencer { inner: Mutex::new(Flows { flows: HashMap::new(), bound: DEFAULT_BOUND }), changed: Notify::new() }
    }
}

impl Resequencer {
    fn lock(&self) -> MutexGuard<'_, Flows> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A packet read by one member: unnumbered ones go straight to `sink`,
    /// numbered ones in their flow's order. `sink` must not block (it runs
    /// under the lock, which keeps the order between members).
    pub fn deliver(&self, seq: Option<(u16, u32)>, packet: Bytes, sink: &mut impl FnMut(Bytes)) {
        let Some((flow, seq)) = seq else { return sink(packet) };
        let mut g = self.lock();
        let bound = g.bound;
        let r = g.flows.entry(flow).or_insert_with(|| Reorder::new(bound, MAX_HELD));
        let before = r.deadline();
        r.push(seq, packet, Instant::now(), sink);
        if r.deadline() != before {
            self.changed.notify_one();
        }
    }

    /// A member ended: whatever waits goes on now.
    pub fn flush(&self, sink: &mut impl FnMut(Bytes)) {
        for r in self.lock().flows.values_mut() {
            r.flush(sink);
        }
    }

    pub fn set_bound(&self, bound: Duration) {
        let mut g = self.lock();
        g.bound = bound;
        for r in g.flows.values_mut() {
            r.set_bound(bound);
        }
        drop(g);
        self.changed.notify_one();
    }

    pub fn bound(&self) -> Duration {
        self.lock().bound
    }

    /// The counters of all flows together.
    pub fn stats(&self) -> ReorderStats {
        self.lock().flows.values().fold(ReorderStats::default(), |t, r| {
            let s = r.stats;
            ReorderStats {
                delivered: t.delivered + s.delivered,
                held: t.held + s.held,
                skipped: t.skipped + s.skipped,
                late: t.late + s.late,
                resyncs: t.resyncs + s.resyncs,
            }
        })
    }

    /// Skips gaps when they expire, forever: run it beside the members' readers.
    pub async fn expire(&self, mut sink: impl FnMut(Bytes)) {
        loop {
            let deadline = self.lock().deadline();
            match deadline {
                Some(d) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(d.into()) => {
                            let now = Instant::now();
                            for r in self.lock().flows.values_mut() {
                                r.on_timeout(now, &mut sink);
                            }
                        }
                        () = self.changed.notified() => {}
                    }
                }
                None => self.changed.notified().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_covers_the_slowest_members_rtt_twice() {
        let ms = Duration::from_millis;
        assert_eq!(bound_for(&[]), DEFAULT_BOUND);
        assert_eq!(bound_for(&[ms(1), ms(1)]), ms(20));
        // One member 30 ms slower than the others: its packets are 30 ms late.
        assert_eq!(bound_for(&[ms(40), ms(70), ms(40)]), ms(150));
        assert_eq!(bound_for(&[ms(10), ms(5000)]), Duration::from_secs(1));
        assert_eq!(bound_for_micros([0, 0]), None);
        assert_eq!(bound_for_micros([0, 40_000, 70_000]), Some(ms(150)));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_gap_is_skipped_by_the_timer_and_holds_up_only_its_flow() {
        let r = std::sync::Arc::new(Resequencer::default());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let t = tx.clone();
        let timer = tokio::spawn({
            let r = r.clone();
            async move { r.expire(move |p| t.send(p).expect("open")).await }
        });
        let mut sink = |p| tx.send(p).expect("open");
        r.deliver(Some((1, 0)), Bytes::from_static(b"0"), &mut sink);
        r.deliver(Some((1, 2)), Bytes::from_static(b"2"), &mut sink);
        // Another flow does not wait for flow 1's gap; nor does an unnumbered packet.
        r.deliver(Some((9, 5)), Bytes::from_static(b"y"), &mut sink);
        r.deliver(None, Bytes::from_static(b"x"), &mut sink);
        assert_eq!(rx.recv().await.as_deref(), Some(&b"0"[..]));
        assert_eq!(rx.recv().await.as_deref(), Some(&b"y"[..]));
        assert_eq!(rx.recv().await.as_deref(), Some(&b"x"[..]));
        // 1 never comes: 2 goes on after the bound.
        let start = tokio::time::Instant::now();
        assert_eq!(rx.recv().await.as_deref(), Some(&b"2"[..]));
        assert!(start.elapsed() >= DEFAULT_BOUND);
        assert_eq!(r.stats().skipped, 1);
        timer.abort();
    }
}
