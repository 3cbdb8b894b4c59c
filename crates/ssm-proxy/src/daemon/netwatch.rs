//! One signal for "the connection to AWS may be broken now": the machine's
//! network changed (an address, a route, an interface: routing::NetWatch), or
//! it woke from sleep (a clock that counts sleep ran ahead of one that does
//! not). The tunnel's sessions then check their websocket at once instead of
//! waiting for a timeout (ssm_channel::port::PortConfig::network_changed).

use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Changes closer together than this are one event (a new Wi-Fi network
/// brings a link, addresses and routes within a few hundred milliseconds).
const SETTLE: Duration = Duration::from_millis(300);

/// Sleep shorter than this goes unnoticed (a busy machine can lag a second).
const MIN_SLEEP: Duration = Duration::from_secs(2);

/// Bump `tx` on every change, from a thread of its own (the kernel's messages
/// come through blocking sockets), until every receiver is gone. Changes on
/// interface `ignore`, the tunnel's own device, do not count. Start it once the
/// tunnel's own routes are in place, or they count as a change.
pub fn spawn(tx: watch::Sender<u64>, ignore: u32) {
    let spawned = std::thread::Builder::new().name("netwatch".into()).spawn(move || run(ignore, &tx));
    if let Err(e) = spawned {
        warn!("cannot watch for network changes ({e}); a broken link will be found by its timeouts");
    }
}

fn run(ignore: u32, tx: &watch::Sender<u64>) {
    let mut watch = match routing::NetWatch::open(ignore) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!("{e}; only sleep and timeouts will trigger reconnects");
            None
        }
    };
    let mut clock = SleepClock::new();
    while !tx.is_closed() {
        let mut changes = match watch.as_mut().map(|w| w.wait(Duration::from_secs(1))) {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                warn!("{e}; no longer watching for network changes");
                watch = None;
                Vec::new()
            }
            None => {
                std::thread::sleep(Duration::from_secs(1));
                Vec::new()
            }
        };
        if !changes.is_empty() {
            while let Some(Ok(more)) = watch.as_mut().map(|w| w.wait(SETTLE)) {
                if more.is_empty() {
                    break;
                }
                changes.extend(more);
            }
            debug!(?changes, "network changes");
            info!("network changed ({}{})", changes[0], more_than_one(changes.len()));
            tx.send_modify(|n| *n += 1);
        }
        let slept = clock.slept();
        if slept >= MIN_SLEEP {
            info!("woke from sleep ({} s asleep)", slept.as_secs());
            tx.send_modify(|n| *n += 1);
        }
    }
}

fn more_than_one(n: usize) -> String {
    match n {
        1 => String::new(),
        n => format!(" and {} more", n - 1),
    }
}

/// Tells how long the machine was asleep since the last call: the difference
/// between a clock that keeps counting through sleep and one that stops.
struct SleepClock {
    last: Option<(Duration, Duration)>,
}

impl SleepClock {
    fn new() -> SleepClock {
        SleepClock { last: now() }
    }

    fn slept(&mut self) -> Duration {
        let current = now();
        let gap = match (self.last, current) {
            (Some(before), Some(after)) => asleep_between(before, after),
            _ => Duration::ZERO,
        };
        self.last = current;
        gap
    }
}

/// (awake, total) between two readings: how much more the total clock advanced.
fn asleep_between(before: (Duration, Duration), after: (Duration, Duration)) -> Duration {
    let awake = after.0.saturating_sub(before.0);
    let total = after.1.saturating_sub(before.1);
    total.saturating_sub(awake)
}

/// (time awake, time including sleep) since boot.
fn now() -> Option<(Duration, Duration)> {
    use nix::time::{clock_gettime, ClockId};
    #[cfg(target_os = "linux")]
    let (awake, total) = (ClockId::CLOCK_MONOTONIC, ClockId::CLOCK_BOOTTIME);
    // macOS: CLOCK_MONOTONIC counts sleep, CLOCK_UPTIME_RAW does not.
    #[cfg(target_os = "macos")]
    let (awake, total) = (ClockId::from_raw(nix::libc::CLOCK_UPTIME_RAW), ClockId::CLOCK_MONOTONIC);
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    return None;
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    {
        let read = |c| clock_gettime(c).ok().map(Duration::from);
        Some((read(awake)?, read(total)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn sleep_is_the_time_only_the_total_clock_saw() {
        // Awake 1 s, total 1 s: no sleep.
        assert_eq!(asleep_between((s(100), s(150)), (s(101), s(151))), Duration::ZERO);
        // A lid closed for an hour: awake 1 s, total 3601 s.
        assert_eq!(asleep_between((s(100), s(150)), (s(101), s(3751))), s(3600));
        // Clocks read in the other order, or a clock that stepped back: never negative.
        assert_eq!(asleep_between((s(100), s(150)), (s(102), s(151))), Duration::ZERO);
        assert_eq!(asleep_between((s(100), s(150)), (s(99), s(140))), Duration::ZERO);
    }

    #[test]
    fn this_machine_has_both_clocks_and_has_not_slept_in_between() {
        let mut c = SleepClock::new();
        assert!(c.last.is_some());
        std::thread::sleep(Duration::from_millis(20));
        assert!(c.slept() < MIN_SLEEP);
    }
}
