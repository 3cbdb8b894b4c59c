//! What the sender learns from acks: the retransmission timeout and how many
//! messages the channel delivers, which sizes the window of unacknowledged
//! messages.
//!
//! The real agent acks an input message only after its plugin wrote it on
//! towards the target (`agent/session/datachannel/datachannel.go`: ack after
//! processing; the websocket is read by one goroutine that waits for each
//! write). Behind a slow target acks therefore come at the pace the target
//! drains, hundreds of milliseconds after the message left. Such an ack is a
//! queue, not a loss: it is an RTT sample like any other (no message in it
//! was resent), the timer restarts on every ack (RFC 6298 §5.3), and the
//! window shrinks to what the channel delivers, so the queue stays short.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Upstream RTO constants (`agent/session/config/config.go`, `src/config/config.go`).
pub mod rto {
    use std::time::Duration;
    pub const INITIAL_SRTT: Duration = Duration::from_millis(100);
    pub const INITIAL_RTO: Duration = Duration::from_millis(200);
    pub const CLOCK_GRANULARITY: Duration = Duration::from_millis(10);
    pub const MAX: Duration = Duration::from_secs(1);
}

/// The upstream estimator (`CalculateRetransmissionTimeout`), plus a backoff
/// that doubles the timeout on each expiry and is undone by a fresh sample.
#[derive(Debug)]
pub(super) struct Rtt {
    pub(super) srtt: f64,
    rttvar: f64,
    /// The estimate, before backoff.
    pub(super) rto: Duration,
    backoff: u32,
}

impl Rtt {
    pub(super) fn new() -> Self {
        Rtt { srtt: rto::INITIAL_SRTT.as_secs_f64(), rttvar: 0.0, rto: rto::INITIAL_RTO, backoff: 0 }
    }

    /// RTTVAR first, from the old SRTT, as upstream does.
    pub(super) fn sample(&mut self, rtt: Duration) {
        let r = rtt.as_secs_f64();
        self.rttvar = 0.75 * self.rttvar + 0.25 * (self.srtt - r).abs();
        self.srtt = 0.875 * self.srtt + 0.125 * r;
        let rto = self.srtt + (4.0 * self.rttvar).max(rto::CLOCK_GRANULARITY.as_secs_f64());
        self.rto = Duration::from_secs_f64(rto).min(rto::MAX);
        self.backoff = 0;
    }

    /// The timeout in force: the estimate doubled per expiry since the last
    /// sample, never above [`rto::MAX`].
    pub(super) fn current(&self) -> Duration {
        self.rto.saturating_mul(1 << self.backoff.min(16)).min(rto::MAX)
    }

    pub(super) fn back_off(&mut self) {
        if self.current() < rto::MAX {
            self.backoff += 1;
        }
    }
}

/// The fewest messages the window allows: enough for a channel of unknown
/// speed to show its rate within one RTT.
pub const MIN_WINDOW: usize = 32;
/// Queueing the window allows on top of twice the smallest RTT: room for the
/// rate to grow and for RTTs inflated by a busy machine rather than a queue.
pub const QUEUE_ALLOWANCE: Duration = Duration::from_millis(25);
/// How long the fastest recent delivery rate is remembered.
const RATE_MEMORY: Duration = Duration::from_secs(1);
/// How long the smallest RTT is trusted before a newer sample replaces it.
const MIN_RTT_MEMORY: Duration = Duration::from_secs(10);
/// Shortest interval a delivery-rate sample covers.
const MIN_RATE_INTERVAL: Duration = Duration::from_millis(10);

/// The window: `rate x (2 x min_rtt + QUEUE_ALLOWANCE)` messages, between
/// [`MIN_WINDOW`] and the configured cap. Limited by its own window, a sender
/// measures `window / rtt`; while the RTT stays below the allowance the
/// measured rate, and with it the window, grows; once a slow receiver makes
/// the RTT grow, the rate stops growing and the queue in front of the
/// receiver stays about `min_rtt + QUEUE_ALLOWANCE` of its drain rate.
#[derive(Debug)]
pub(super) struct Window {
    cap: usize,
    delivered: u64,
    interval_start: Option<(Instant, u64)>,
    /// Rate samples (messages per second), newest last, decreasing: the front
    /// is the fastest of the last [`RATE_MEMORY`].
    rates: VecDeque<(Instant, f64)>,
    min_rtt: Option<(Duration, Instant)>,
}

impl Window {
    pub(super) fn new(cap: usize) -> Self {
        Window { cap, delivered: 0, interval_start: None, rates: VecDeque::new(), min_rtt: None }
    }

    /// Messages the window allows in flight now.
    pub(super) fn size(&self) -> usize {
        let floor = MIN_WINDOW.min(self.cap);
        let (Some(&(_, rate)), Some((min_rtt, _))) = (self.rates.front(), self.min_rtt) else {
            return floor;
        };
        let horizon = 2.0 * min_rtt.as_secs_f64() + QUEUE_ALLOWANCE.as_secs_f64();
        ((rate * horizon).round() as usize).clamp(floor, self.cap)
    }

    pub(super) fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt.map(|(d, _)| d)
    }

    /// The fastest recent delivery rate, in messages per second.
    #[cfg(test)]
    fn rate(&self) -> f64 {
        self.rates.front().map_or(0.0, |&(_, r)| r)
    }

    pub(super) fn on_rtt_sample(&mut self, now: Instant, rtt: Duration) {
        match self.min_rtt {
            Some((min, at)) if rtt > min && now.duration_since(at) < MIN_RTT_MEMORY => {}
            _ => self.min_rtt = Some((rtt, now)),
        }
    }

    /// One message was acked at `now`.
    pub(super) fn on_delivered(&mut self, now: Instant) {
        self.delivered += 1;
        let Some((start, at_start)) = self.interval_start else {
            self.interval_start = Some((now, self.delivered));
            return;
        };
        let interval = self.min_rtt().unwrap_or(MIN_RATE_INTERVAL).max(MIN_RATE_INTERVAL);
        let elapsed = now.duration_since(start);
        if elapsed < interval {
            return;
        }
        let rate = (self.delivered - at_start) as f64 / elapsed.as_secs_f64();
        while self.rates.back().is_some_and(|&(_, r)| r <= rate) {
            self.rates.pop_back();
        }
        self.rates.push_back((now, rate));
        while self.rates.front().is_some_and(|&(t, _)| now.duration_since(t) > RATE_MEMORY) {
            self.rates.pop_front();
        }
        self.interval_start = Some((now, self.delivered));
    }

    /// Nothing was outstanding until now: an idle gap is no evidence of a
    /// slow channel, so the next rate interval starts here.
    pub(super) fn on_idle_restart(&mut self, now: Instant) {
        self.interval_start = Some((now, self.delivered));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rto_follows_upstream_estimator() {
        let mut r = Rtt::new();
        r.sample(Duration::from_millis(20));
        // RTTVAR = 0.25*|100-20| = 20; SRTT = 0.875*100 + 0.125*20 = 90; RTO = 90 + 80 = 170 ms
        assert_eq!(r.rto.as_millis(), 170);
        for _ in 0..200 {
            r.sample(Duration::from_millis(1));
        }
        assert_eq!(r.rto, Duration::from_secs_f64(r.srtt + rto::CLOCK_GRANULARITY.as_secs_f64()).min(rto::MAX));
        assert!(r.rto >= rto::CLOCK_GRANULARITY);
        r.sample(Duration::from_secs(30));
        assert_eq!(r.rto, rto::MAX);
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_a_sample_undoes_it() {
        let mut r = Rtt::new();
        assert_eq!(r.current(), Duration::from_millis(200));
        r.back_off();
        assert_eq!(r.current(), Duration::from_millis(400));
        r.back_off();
        r.back_off();
        assert_eq!(r.current(), rto::MAX);
        r.back_off();
        assert_eq!(r.current(), rto::MAX);
        r.sample(Duration::from_millis(20));
        assert_eq!(r.current().as_millis(), 170);
    }

    /// Acks at `per_ms` messages per millisecond for `ms` milliseconds.
    fn deliver(w: &mut Window, t0: Instant, ms: u64, per_ms: u64) -> Instant {
        let mut t = t0;
        for i in 1..=ms {
            t = t0 + Duration::from_millis(i);
            for _ in 0..per_ms {
                w.on_delivered(t);
            }
        }
        t
    }

    #[test]
    fn window_starts_small_and_follows_the_delivery_rate() {
        let t0 = Instant::now();
        let mut w = Window::new(512);
        assert_eq!(w.size(), MIN_WINDOW);
        w.on_rtt_sample(t0, Duration::from_millis(1));
        // 20 messages per ms: 20 000/s x (2 ms + 25 ms) = 540, capped at 512.
        let t = deliver(&mut w, t0, 50, 20);
        assert_eq!(w.size(), 512);
        // A slow receiver: one message per ms. The fast rate is remembered for a
        // second, then the window shrinks to 1000/s x 27 ms = 27, floored at 32.
        let t = deliver(&mut w, t, 500, 1);
        assert_eq!(w.size(), 512);
        deliver(&mut w, t, 1200, 1);
        assert_eq!(w.size(), MIN_WINDOW);
        assert!((w.rate() - 1000.0).abs() < 50.0, "{}", w.rate());
    }

    #[test]
    fn window_grows_with_a_long_rtt() {
        let t0 = Instant::now();
        let mut w = Window::new(4096);
        w.on_rtt_sample(t0, Duration::from_millis(40));
        // Two messages per ms over a 40 ms path: 2000/s x 105 ms = 210 (the
        // first interval counts the message that opened it: 2025/s, 213).
        deliver(&mut w, t0, 200, 2);
        assert!((210..=213).contains(&w.size()), "{}", w.size());
    }

    #[test]
    fn min_rtt_expires_after_ten_seconds() {
        let t0 = Instant::now();
        let mut w = Window::new(512);
        w.on_rtt_sample(t0, Duration::from_millis(2));
        w.on_rtt_sample(t0 + Duration::from_secs(1), Duration::from_millis(9));
        assert_eq!(w.min_rtt(), Some(Duration::from_millis(2)));
        w.on_rtt_sample(t0 + Duration::from_secs(11), Duration::from_millis(9));
        assert_eq!(w.min_rtt(), Some(Duration::from_millis(9)));
    }
}
