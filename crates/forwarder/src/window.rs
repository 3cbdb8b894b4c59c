//! The send window that keeps the queue in front of the stream, where FQ-CoDel
//! manages it, instead of inside the SSM path (SPECIFICATION.md §6.4).
//!
//! The peer acknowledges the PACKET bytes it has read (cumulative ACK frames).
//! From those acks the sender keeps two estimates, in the manner of BBR: the
//! bottleneck rate (windowed maximum of per-ack delivery-rate samples) and the
//! path's minimum RTT. It allows `rate * (1.25 * min_rtt + 1 ms)` bytes in flight
//! plus a small allowance for ack batching, so about a quarter RTT plus 1 ms of
//! data waits in the socket buffers, the SSM agent and the service. (The 1 ms is
//! for the processing time of a busy path, which grows with the load: without it
//! the window, not the path, would set the rate of a fast tunnel. The gain of
//! 1.25 lets the rate estimate climb when the path speeds up, as BBR's probing
//! gain does.) Every 10 s without a new minimum, and 1 s after the first
//! sample, the window drops to one packet for 20 ms and until that packet is
//! acknowledged, so that a stale minimum (and the window built on it) cannot
//! hold a standing queue. The first probe is early because the first samples
//! often come from a burst into the initial window; a minimum taken from them
//! keeps the queue they built (on a paced path every sample stays above it).
//!
//! A window can also be told to *drain* ([`Window::set_drain`]): it then allows
//! only `rate * min_rtt` (at least one packet), the path's own bytes, so
//! nothing waits in front of the next write. A striped link drains one member at a time and sends sparse
//! flows through it (see `link.rs`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Smallest window: a few full-size packets, so interactive traffic never
/// waits; and no more, since on a path paced to 1 MB/s (a session through the
/// stock SSM agent) every KiB in flight beyond the path's own is 1 ms of queue.
pub const MIN_WINDOW: usize = 4 * 1024;
/// Window before the first rate sample.
pub const INITIAL_WINDOW: usize = 64 * 1024;
/// Upper bound whatever the estimates say.
pub const MAX_WINDOW: usize = 32 << 20;
/// Bytes in flight per byte of estimated bandwidth-delay product.
const GAIN: f64 = 1.25;
/// Extra delay the window allows beyond `GAIN * min_rtt`.
const ALLOWANCE: Duration = Duration::from_millis(1);
/// How long a rate sample counts towards the maximum.
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// How long a minimum RTT stands before it is re-measured.
const RTT_WINDOW: Duration = Duration::from_secs(10);
/// How long the window stays at [`PROBE_WINDOW`] to re-measure the RTT (at
/// least, or one minimum RTT if longer; and until a write sent at that window
/// is acknowledged). Shorter than BBR's 200 ms, which is there for flows
/// that share a bottleneck to probe together: a window has its path to
/// itself, and a round at one packet is enough. (20 ms is several rounds on
/// a stock session.)
const PROBE_TIME: Duration = Duration::from_millis(20);
/// The window while probing: one packet, so that its RTT has no queue in it
/// even on a path paced to 1 MB/s (where 4 KiB is 4 ms of queue).
const PROBE_WINDOW: usize = MIN_DRAIN_WINDOW;
/// When the first probe comes, after the first RTT sample.
const FIRST_PROBE: Duration = Duration::from_secs(1);
/// Rate samples kept in the max filter (older ones go first when it is full).
const RATE_SAMPLES: usize = 256;
/// The bytes that may be delivered and not yet acknowledged at `rate`: the
/// peer acknowledges once [`ACK_EVERY`] bytes are unacknowledged or
/// [`ACK_DELAY`] after the first (§6.4), and the minimum RTT is taken
/// from acks that came at once. Without it a paced path's window (4 KiB at
/// 1 MB/s) waited for each bare ack (2 ms then) and carried a half of its rate.
fn ack_lag(rate: f64) -> usize {
    ((rate * ACK_DELAY.as_secs_f64()) as usize).min(ACK_EVERY)
}
/// How long a receiver's bare ACK may wait for data to carry it (§6.4)...
pub const ACK_DELAY: Duration = Duration::from_millis(1);
/// ...unless this many bytes are unacknowledged: then it goes at once.
pub const ACK_EVERY: usize = 4096;
/// The shortest time a rate sample covers (unless the minimum RTT is longer).
const SAMPLE_SPAN: Duration = Duration::from_millis(10);
/// Acks kept for [`SAMPLE_SPAN`].
const MAX_POINTS: usize = 1024;
/// Smallest window while draining: one full-size packet and its framing.
pub const MIN_DRAIN_WINDOW: usize = 1600;

/// What was sent in one write: enough to turn its ack into an RTT and a rate sample.
#[derive(Debug, Clone, Copy)]
struct Sent {
    /// Cumulative bytes before and once this write was sent.
    start: u64,
    end: u64,
    at: Instant,
    /// When the newest write acknowledged by then had been sent.
    first_at: Instant,
    /// Acked bytes and the time of the ack when this write was sent.
    delivered: u64,
    delivered_at: Instant,
}

#[derive(Debug)]
pub struct Window {
    sent: u64,
    acked: u64,
    /// When `acked` last moved (or when sending resumed from idle).
    delivered_at: Instant,
    /// When the newest acknowledged write was sent.
    acked_sent_at: Instant,
    writes: VecDeque<Sent>,
    /// Bytes per second, decreasing from front to back; each with its time.
    rates: VecDeque<(Instant, f64)>,
    /// Recent acks (time, bytes acknowledged, send time of the newest write
    /// they acknowledged): the newest one at least `SAMPLE_SPAN` old is where
    /// a rate sample may start.
    points: VecDeque<(Instant, u64, Instant)>,
    min_rtt: Option<Duration>,
    /// When the next probe starts unless a new minimum comes first.
    probe_due: Instant,
    probe_until: Option<Instant>,
    /// The probe's round: the bytes sent once its first write went at the
    /// probe's window. The probe ends no sooner than their ack.
    probe_round: Option<u64>,
    /// A probe has ended: until then new minima do not put the next one off
    /// (after a burst they come one after another as its queue drains).
    probed: bool,
    /// Minimum RTT seen during the current probe.
    probe_min: Option<Duration>,
    /// Added to the computed window: acks arrive in batches of up to this much.
    slack: usize,
    /// Allow only the path's own bytes (see [`Window::set_drain`]).
    drain: bool,
    cwnd: usize,
}

impl Window {
    /// `slack`: the most bytes the sender writes at once (its batch size).
    pub fn new(now: Instant, slack: usize) -> Self {
        Window {
            sent: 0,
            acked: 0,
            delivered_at: now,
            acked_sent_at: now,
            writes: VecDeque::new(),
            rates: VecDeque::new(),
            points: VecDeque::new(),
            min_rtt: None,
            probe_due: now + RTT_WINDOW,
            probe_until: None,
            probe_round: None,
            probed: false,
            probe_min: None,
            slack,
            drain: false,
            cwnd: INITIAL_WINDOW,
        }
    }

    pub fn in_flight(&self) -> u64 {
        self.sent - self.acked
    }

    /// Bytes that may be sent now.
    pub fn available(&self) -> usize {
        (self.cwnd as u64).saturating_sub(self.in_flight()) as usize
    }

    pub fn cwnd(&self) -> usize {
        self.cwnd
    }

    /// The most bytes the sender writes at once from now on.
    pub fn set_slack(&mut self, slack: usize) {
        self.slack = slack;
    }

    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }

    /// Estimated bottleneck rate in bytes per second (0 before the first sample).
    pub fn rate(&self) -> f64 {
        self.rates.front().map_or(0.0, |r| r.1)
    }

    pub fn probing(&self) -> bool {
        self.probe_until.is_some()
    }

    /// Drain (`true`): allow only `rate * min_rtt` in flight (at least one
    /// packet), no gain, allowance, ack lag or slack: the queue in front of the
    /// path empties, at the cost of the time the peer holds its acks, and a
    /// packet sent now waits for nothing but the path. The rate estimate keeps
    /// the samples of the undrained time (a 1 s maximum), so draining for a
    /// part of each second does not lower it.
    pub fn set_drain(&mut self, drain: bool) {
        if self.drain != drain {
            self.drain = drain;
            self.cwnd = self.compute();
        }
    }

    pub fn draining(&self) -> bool {
        self.drain
    }

    /// Record a write of `bytes` (PACKET frames, headers included).
    pub fn on_send(&mut self, bytes: usize, now: Instant) {
        if bytes == 0 {
            return;
        }
        if self.in_flight() == 0 {
            // Restarting from idle: the time idle is not delivery time.
            self.delivered_at = now;
            self.acked_sent_at = now;
        }
        let start = self.sent;
        self.sent += bytes as u64;
        if self.probe_until.is_some() && self.probe_round.is_none() && start - self.acked <= PROBE_WINDOW as u64 {
            self.probe_round = Some(self.sent);
        }
        self.writes.push_back(Sent {
            start,
            end: self.sent,
            at: now,
            first_at: self.acked_sent_at,
            delivered: self.acked,
            delivered_at: self.delivered_at,
        });
    }

    /// Take a cumulative ack. Returns false (and ignores it) if it acknowledges
    /// more than was sent: the peer is broken.
    pub fn on_ack(&mut self, acked: u64, now: Instant) -> bool {
        if acked > self.sent {
            return false;
        }
        if acked > self.acked {
            self.acked = acked;
            self.delivered_at = now;
            let mut newest = None;
            while self.writes.front().is_some_and(|w| w.end <= acked) {
                newest = self.writes.pop_front();
            }
            if let Some(w) = newest {
                self.acked_sent_at = w.at;
                self.sample(w, now);
            }
            // The first bytes of a write acknowledged before its end: their
            // RTT is a sample too. On a paced path it is the one without the
            // write's own time in the pacer (4 ms for 4 KiB at 1 MB/s), which
            // the RTT of the whole write carries and the window would keep as
            // queue.
            if let Some(&w) = self.writes.front().filter(|w| w.start < acked) {
                self.rtt_sample(now.saturating_duration_since(w.at), now);
            }
        }
        self.update(now);
        true
    }

    fn sample(&mut self, w: Sent, now: Instant) {
        let rtt = now.saturating_duration_since(w.at);
        // As in BBR: the longer of the send and the ack intervals, so that acks
        // arriving in a burst do not pass for a faster path; and, unlike BBR,
        // over at least SAMPLE_SPAN (or the minimum RTT), back to an earlier ack
        // where the newest write is more recent: a path that delivers in
        // quanta, or in bursts after an idle moment (the stock agent's 1024-byte
        // messages on a 1 ms schedule) shows several times its rate over one
        // or two quanta, and the maximum filter keeps such a sample for 1 s.
        let span = SAMPLE_SPAN.max(self.min_rtt.unwrap_or_default());
        // (ack time, bytes acknowledged, send time of the newest write acknowledged)
        let mut from = (w.delivered_at, w.delivered, w.first_at);
        while self.points.len() > 1 && self.points.get(1).is_some_and(|p| now.saturating_duration_since(p.0) >= span) {
            self.points.pop_front();
        }
        if let Some(&p) = self.points.front() {
            if p.0 < from.0 && now.saturating_duration_since(from.0) < span {
                from = p;
            }
        }
        self.points.push_back((now, self.acked, w.at));
        if self.points.len() > MAX_POINTS {
            self.points.pop_front();
        }
        let interval = now.saturating_duration_since(from.0).max(w.at.saturating_duration_since(from.2));
        // Shorter (just after an idle time): no sample. As Linux does with an
        // interval under the minimum RTT, for the same reason.
        if interval >= span {
            let rate = (self.acked - from.1) as f64 / interval.as_secs_f64();
            while self.rates.back().is_some_and(|r| r.1 <= rate) {
                self.rates.pop_back();
            }
            if self.rates.len() == RATE_SAMPLES {
                self.rates.pop_front();
            }
            self.rates.push_back((now, rate));
        }
        while self.rates.len() > 1
            && self.rates.front().is_some_and(|r| now.saturating_duration_since(r.0) > RATE_WINDOW)
        {
            self.rates.pop_front();
        }
        self.rtt_sample(rtt, now);
    }

    fn rtt_sample(&mut self, rtt: Duration, now: Instant) {
        if rtt.is_zero() {
            return;
        }
        if self.probe_until.is_some() {
            self.probe_min = Some(self.probe_min.map_or(rtt, |m| m.min(rtt)));
        }
        let first = self.min_rtt.is_none();
        let new_min = self.min_rtt.is_none_or(|m| rtt <= m);
        if first {
            // The first samples may come from a burst into an empty window
            // (INITIAL_WINDOW is 64 ms at 1 MB/s): probe soon.
            self.probe_due = now + FIRST_PROBE;
        } else if self.probed && new_min {
            self.probe_due = now + RTT_WINDOW;
        }
        if new_min {
            self.min_rtt = Some(rtt);
        }
    }

    fn update(&mut self, now: Instant) {
        match self.probe_until {
            Some(until) if now >= until && self.probe_round.is_some_and(|r| self.acked >= r) => {
                // The probe drained the path: its minimum is the path's minimum now.
                if let Some(m) = self.probe_min.take() {
                    self.min_rtt = Some(m);
                }
                self.probe_due = now + RTT_WINDOW;
                self.probe_until = None;
                self.probe_round = None;
                self.probed = true;
            }
            None if self.min_rtt.is_some() && now >= self.probe_due => {
                // (`probe_round` is None: the last probe's end cleared it.)
                self.probe_until = Some(now + PROBE_TIME.max(self.min_rtt.unwrap_or_default()));
                self.probe_min = None;
            }
            _ => {}
        }
        self.cwnd = self.compute();
    }

    fn compute(&self) -> usize {
        if self.probe_until.is_some() {
            return PROBE_WINDOW;
        }
        match (self.min_rtt, self.rates.front()) {
            (Some(rtt), Some(&(_, rate))) if self.drain => {
                ((rate * rtt.as_secs_f64()) as usize).clamp(MIN_DRAIN_WINDOW, MAX_WINDOW)
            }
            (Some(rtt), Some(&(_, rate))) => {
                let allowed = GAIN * rtt.as_secs_f64() + ALLOWANCE.as_secs_f64();
                ((rate * allowed) as usize + ack_lag(rate) + self.slack).clamp(MIN_WINDOW, MAX_WINDOW)
            }
            _ => self.cwnd,
        }
    }
}

#[cfg(test)]
mod tests;
