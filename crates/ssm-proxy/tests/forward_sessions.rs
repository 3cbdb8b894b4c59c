//! `ssm-proxy forward --sessions N` end to end against the emulator's stock
//! pacing: connections spread over sessions, and a fault aimed at one
//! session. Its own binary, so its load does not run beside the timing-
//! sensitive tests of `forward.rs`.

mod forwardkit;
mod summary;

use std::time::Duration;

use forwardkit::*;
use ssm_emulator::{Config, Faults, Profile};

/// `--sessions 4` under the stock agent's pacing: eight connections spread
/// over four sessions, two each, every byte echoed intact; each session's
/// summary shows it carried its share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_sessions_carry_eight_connections_two_each() {
    let echo = echo_server().await;
    let config = Config { profile: Profile::Stock, ..Config::default() }.with_instance(INSTANCE, "127.0.0.1");
    let emulator = emulator(config).await;
    let (guard, addr, stderr) = spawn_forward_args(&emulator.endpoint_url(), echo.port(), &[], &["--sessions", "4"]);
    // All eight connect before any ends, so least-loaded gives each session two.
    let per_conn = 256 << 10;
    let tasks: Vec<_> = (0..8u64).map(|i| tokio::spawn(echo_round_trip(addr, 100 + i, per_conn))).collect();
    let all = async {
        for t in tasks {
            t.await.expect("connection task");
        }
    };
    tokio::time::timeout(Duration::from_secs(120), all).await.expect("2 MiB echoed within two minutes");
    let err = stop(guard, stderr);
    let summaries = summary::Summary::all(&err);
    assert_eq!(summaries.len(), 4, "one summary per session:\n{err}");
    // Two connections of 256 KiB each: at least 512 messages of at most 1 KiB.
    for s in &summaries {
        assert!(s.distinct >= 500, "a session carried less than its two connections: {summaries:?}");
    }
    assert_eq!(err.matches("ended.").count(), 4, "every session ended cleanly:\n{err}");
}

/// Faults for one session only (`Faults::only_session`): of two sessions,
/// only the second has its websocket closed every second; both carry their
/// connections intact, and only the second reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_hurts_only_the_session_it_is_aimed_at() {
    let echo = echo_server().await;
    let faults = Faults { close_every: Some(Duration::from_secs(1)), only_session: Some(2), ..Faults::default() };
    let config = Config { profile: Profile::Stock, faults, ..Config::default() }.with_instance(INSTANCE, "127.0.0.1");
    let emulator = emulator(config).await;
    let (guard, addr, stderr) = spawn_forward_args(&emulator.endpoint_url(), echo.port(), &[], &["--sessions", "2"]);
    // Two connections of 2 MiB, one per session: about 2 s each at the stock pace.
    let tasks: Vec<_> = (0..2u64).map(|i| tokio::spawn(echo_round_trip(addr, 200 + i, 2 << 20))).collect();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t).await.expect("echoed in time").expect("connection task");
    }
    let sessions = emulator.shared.sessions_in_order();
    let sockets: Vec<u64> = sessions.iter().map(|s| s.websockets.load(std::sync::atomic::Ordering::Relaxed)).collect();
    let err = stop(guard, stderr);
    assert_eq!(sockets.len(), 2, "{err}");
    assert_eq!(sockets[0], 1, "the first session was left alone: {sockets:?}");
    assert!(sockets[1] >= 2, "the second session's websocket was recycled: {sockets:?}");
}
