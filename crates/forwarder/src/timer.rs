//! A timer that is cheap to re-arm on every turn of an event loop.
//!
//! Arming a tokio timer earlier than the runtime's next planned wake-up makes
//! tokio wake its own I/O driver (a write to an eventfd, and one more
//! `epoll_wait` that returns at once), even on a single-threaded runtime that is
//! running at that moment. A loop that makes a fresh `sleep` for a short
//! deadline on every turn (an ack delay, a protocol stack's next timer) paid that
//! once or more per request/response. [`LazyTimer`] keeps one timer and moves
//! it only when the new deadline is earlier than the armed one; a later
//! deadline keeps the earlier timer, which then fires early once, and the loop
//! arms the real deadline (pushing a timer later costs tokio nothing).

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use tokio::time::Sleep;

/// One reusable deadline for an event loop. The loop calls [`LazyTimer::arm`]
/// with its next deadline each turn and selects on [`LazyTimer::fired`]; a
/// wake-up may come before the deadline, never after it.
#[derive(Debug)]
pub struct LazyTimer {
    sleep: Pin<Box<Sleep>>,
    armed: Option<Instant>,
}

impl Default for LazyTimer {
    fn default() -> Self {
        Self::new()
    }
}

impl LazyTimer {
    pub fn new() -> Self {
        Self { sleep: Box::pin(tokio::time::sleep_until(tokio::time::Instant::now())), armed: None }
    }

    /// Wake no later than `deadline`. `None` leaves an armed timer armed: it
    /// fires once for nothing, which is cheaper than moving it.
    pub fn arm(&mut self, deadline: Option<Instant>) {
        let Some(d) = deadline else { return };
        if self.armed.is_some_and(|a| a <= d) {
            return;
        }
        self.sleep.as_mut().reset(d.into());
        self.armed = Some(d);
    }

    /// The deadline the timer is set for, if armed.
    pub fn armed(&self) -> Option<Instant> {
        self.armed
    }

    /// Completes when the armed deadline passes; never while disarmed.
    pub async fn fired(&mut self) {
        if self.armed.is_none() {
            return std::future::pending().await;
        }
        std::future::poll_fn(|cx| self.sleep.as_mut().poll(cx)).await;
        self.armed = None;
    }
}

#[cfg(test)]
mod tests;
