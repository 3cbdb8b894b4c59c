//! The receiving side of a striped link: the packets every member connection
//! reads go through one [`Reorder`] to one sink, and a timer skips the gaps
//! that have waited too long.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::reorder::{Reorder, ReorderStats};

/// Most packets that wait for an earlier one (about 6 MB of full-size packets).
pub const MAX_HELD: usize = 4096;

/// The reorder bound for members whose round-trip times are `rtts`: the spread
/// between the slowest and the fastest plus a margin, within 10 ms..1 s. A
/// packet that took the slow member is that much later than its neighbours.
pub fn bound_for(rtts: &[Duration]) -> Duration {
    let (Some(min), Some(max)) = (rtts.iter().min(), rtts.iter().max()) else { return DEFAULT_BOUND };
    (*max - *min + *max / 4 + Duration::from_millis(10)).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// The bound before any RTT is known.
pub const DEFAULT_BOUND: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub struct Resequencer {
    reorder: Mutex<Reorder>,
    /// The earliest deadline may have moved.
    changed: Notify,
}

impl Default for Resequencer {
    fn default() -> Self {
        Resequencer { reorder: Mutex::new(Reorder::new(DEFAULT_BOUND, MAX_HELD)), changed: Notify::new() }
    }
}

impl Resequencer {
    fn lock(&self) -> MutexGuard<'_, Reorder> {
        self.reorder.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A packet read by one member: unnumbered ones go straight to `sink`,
    /// numbered ones in order. `sink` must not block (it runs under the lock,
    /// which keeps the order between members).
    pub fn deliver(&self, seq: Option<u32>, packet: Bytes, sink: &mut impl FnMut(Bytes)) {
        let Some(seq) = seq else { return sink(packet) };
        let mut r = self.lock();
        let before = r.deadline();
        r.push(seq, packet, Instant::now(), sink);
        if r.deadline() != before {
            self.changed.notify_one();
        }
    }

    /// A member ended: whatever waits goes on now.
    pub fn flush(&self, sink: &mut impl FnMut(Bytes)) {
        self.lock().flush(sink);
    }

    pub fn set_bound(&self, bound: Duration) {
        self.lock().set_bound(bound);
        self.changed.notify_one();
    }

    pub fn bound(&self) -> Duration {
        self.lock().bound()
    }

    pub fn stats(&self) -> ReorderStats {
        self.lock().stats
    }

    /// Skips gaps when they expire, forever: run it beside the members' readers.
    pub async fn expire(&self, mut sink: impl FnMut(Bytes)) {
        loop {
            let deadline = self.lock().deadline();
            match deadline {
                Some(d) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(d.into()) => self.lock().on_timeout(Instant::now(), &mut sink),
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
    fn the_bound_covers_the_spread_of_the_members_rtts() {
        let ms = Duration::from_millis;
        assert_eq!(bound_for(&[]), DEFAULT_BOUND);
        assert_eq!(bound_for(&[ms(1), ms(1)]), ms(10) + ms(1) / 4);
        // One member 30 ms slower than the others: its packets are 30 ms late.
        assert!(bound_for(&[ms(40), ms(70), ms(40)]) > ms(30));
        assert_eq!(bound_for(&[ms(10), ms(5000)]), Duration::from_secs(1));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_gap_is_skipped_by_the_timer() {
        let r = std::sync::Arc::new(Resequencer::default());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let t = tx.clone();
        let timer = tokio::spawn({
            let r = r.clone();
            async move { r.expire(move |p| t.send(p).expect("open")).await }
        });
        let mut sink = |p| tx.send(p).expect("open");
        r.deliver(Some(0), Bytes::from_static(b"0"), &mut sink);
        r.deliver(Some(2), Bytes::from_static(b"2"), &mut sink);
        r.deliver(None, Bytes::from_static(b"x"), &mut sink);
        assert_eq!(rx.recv().await.as_deref(), Some(&b"0"[..]));
        assert_eq!(rx.recv().await.as_deref(), Some(&b"x"[..]));
        // 1 never comes: 2 goes on after the bound.
        let start = tokio::time::Instant::now();
        assert_eq!(rx.recv().await.as_deref(), Some(&b"2"[..]));
        assert!(start.elapsed() >= DEFAULT_BOUND);
        assert_eq!(r.stats().skipped, 1);
        timer.abort();
    }
}
