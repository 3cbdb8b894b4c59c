//! Deterministic pair harness: our client [`Session`] against the emulator's
//! upstream-faithful [`AgentChannel`], on a simulated clock, over a seeded link
//! that drops, duplicates and reorders frames, with a target behind the agent
//! that takes input as fast as it likes or only at a set rate (the agent then
//! acks late, as the real one does). Moves up to 16 MiB each way and checks
//! every byte.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use ssm_channel::session::{Event, SeededEnvironment, Session, SessionConfig, MAX_PAYLOAD};
use ssm_channel::version::PortMode;
use ssm_emulator::agent::channel::{AgentChannel, AgentEvent, PAYLOAD_SIZE};

mod sim;
use sim::{Link, LinkFaults};

/// The target behind the agent's port plugin: what the plugin's write hands
/// on waits in a buffer of `buffer` bytes that drains at `bytes_per_ms`; a
/// write that does not fit returns (and so is acked) only once it does.
#[derive(Debug, Clone, Copy)]
struct SlowTarget {
    buffer: usize,
    bytes_per_ms: usize,
}

#[derive(Debug, Default)]
struct TargetState {
    held: usize,
    write_pending: bool,
    drained_at: Duration,
}

impl TargetState {
    /// Drains what the target took since the last call; true when a pending
    /// write now returns.
    fn drain(&mut self, target: &SlowTarget, sim: Duration) -> bool {
        let ms = (sim - self.drained_at).as_millis() as usize;
        if ms > 0 {
            self.held = self.held.saturating_sub(ms * target.bytes_per_ms);
            self.drained_at += Duration::from_millis(ms as u64);
        }
        if self.write_pending && self.held <= target.buffer {
            self.write_pending = false;
            return true;
        }
        false
    }
}

struct Outcome {
    sim_time: Duration,
    client_sent: u64,
    client_retransmissions: u64,
    agent_resends: u64,
    dropped: u64,
    duplicated: u64,
}

impl Outcome {
    /// Resends as a share of every stream message the client put on the wire.
    fn client_resend_ratio(&self) -> f64 {
        self.client_retransmissions as f64 / (self.client_sent + self.client_retransmissions).max(1) as f64
    }
}

fn run_pair(seed: u64, bytes_each_way: usize, faults: LinkFaults) -> Outcome {
    run_pair_into(seed, bytes_each_way, bytes_each_way, faults, None)
}

fn run_pair_into(seed: u64, upload: usize, download: usize, faults: LinkFaults, target: Option<SlowTarget>) -> Outcome {
    let mut data_rng = StdRng::seed_from_u64(seed);
    let mut up = vec![0u8; upload];
    let mut down = vec![0u8; download];
    data_rng.fill_bytes(&mut up);
    data_rng.fill_bytes(&mut down);

    let t0 = Instant::now();
    let mut sim = Duration::ZERO;
    let mut client = Session::new(SessionConfig::default(), Box::new(SeededEnvironment::new(seed ^ 1)));
    client.set_connected(true, t0);
    let props = BTreeMap::from([
        ("type".to_owned(), serde_json::json!("LocalPortForwarding")),
        ("portNumber".to_owned(), serde_json::json!("22")),
        ("localPortNumber".to_owned(), serde_json::json!("0")),
    ]);
    let mut agent = AgentChannel::new(Box::new(SeededEnvironment::new(seed ^ 2)), "3.3.987.0", "Port", props);
    let mut link = Link::new(seed ^ 3, faults);
    agent.start(t0);

    let (mut up_sent, mut down_sent) = (0usize, 0usize);
    let (mut up_got, mut down_got) = (Vec::new(), Vec::new());
    let mut agent_ready = false;
    let mut target_state = TargetState::default();
    // The stock agent reads one 1024-byte chunk per millisecond.
    let mut agent_next_read = Duration::ZERO;
    let limit = Duration::from_secs(3600);

    while up_got.len() < up.len() || down_got.len() < down.len() {
        assert!(sim < limit, "no progress: up {}/{} down {}/{}", up_got.len(), up.len(), down_got.len(), down.len());
        let now = t0 + sim;
        // Applications produce.
        while client.can_send() && up_sent < up.len() {
            let end = (up_sent + MAX_PAYLOAD).min(up.len());
            client.send(&up[up_sent..end]).expect("window has room");
            up_sent = end;
        }
        if agent_ready && down_sent < down.len() && sim >= agent_next_read {
            let end = (down_sent + PAYLOAD_SIZE).min(down.len());
            agent.send_output(now, &down[down_sent..end]);
            down_sent = end;
            agent_next_read = sim + Duration::from_millis(1);
        }
        if let Some(t) = &target {
            if target_state.drain(t, sim) {
                agent.input_done(now);
            }
        }
        // Timers.
        if client.poll_timeout().is_some_and(|t| t <= now) {
            client.handle_timeout(now);
        }
        if agent.poll_timeout().is_some_and(|t| t <= now) {
            agent.handle_timeout(now);
        }
        // Transmit, and deliver what is due.
        link.exchange(sim, now, &mut client, &mut agent);
        // Applications consume.
        while let Some(ev) = client.poll_event() {
            match ev {
                Event::Data(d) => down_got.extend_from_slice(&d),
                Event::Closed(r) => panic!("client closed: {r:?}"),
                _ => {}
            }
        }
        while let Some(ev) = agent.poll_event() {
            match ev {
                AgentEvent::HandshakeDone { mode, .. } => {
                    assert_eq!(mode, PortMode::Mux { keepalive: false });
                    agent_ready = true;
                }
                AgentEvent::Input(d) => {
                    up_got.extend_from_slice(&d);
                    match &target {
                        Some(t) => {
                            target_state.held += d.len();
                            target_state.write_pending = true;
                            if target_state.drain(t, sim) {
                                agent.input_done(now);
                            }
                        }
                        None => agent.input_done(now),
                    }
                }
                AgentEvent::Failed(e) => panic!("agent failed: {e}"),
                AgentEvent::HandshakeSkipped => panic!("a Port session skipped its handshake"),
                AgentEvent::Flag(_) | AgentEvent::Size { .. } => {}
            }
        }
        // Advance the clock to the next thing that can happen.
        if client.can_send() && up_sent < up.len() {
            continue;
        }
        let mut next = [
            link.next_due(),
            client.poll_timeout().map(|t| t - t0),
            agent.poll_timeout().map(|t| t - t0),
            (agent_ready && down_sent < down.len()).then_some(agent_next_read),
            target_state.write_pending.then(|| target_state.drained_at + Duration::from_millis(1)),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(sim + Duration::from_millis(1));
        if next <= sim {
            next = sim;
            if link.next_due().is_some_and(|t| t <= sim) {
                continue;
            }
            next = sim + Duration::from_micros(100);
        }
        sim = next;
    }
    assert!(up_got == up, "client -> agent bytes differ");
    assert!(down_got == down, "agent -> client bytes differ");
    Outcome {
        sim_time: sim,
        client_sent: client.stats().messages_sent,
        client_retransmissions: client.stats().retransmissions,
        agent_resends: agent.resends,
        dropped: link.dropped,
        duplicated: link.duplicated,
    }
}

#[test]
fn sixteen_mib_each_way_over_a_lossy_reordering_duplicating_link() {
    let faults = LinkFaults { drop: 0.01, duplicate: 0.01, base_delay_ms: 5, jitter_ms: 10 };
    let o = run_pair(0x5eed, 16 << 20, faults);
    // The faults really happened and were repaired.
    assert!(o.dropped > 100, "only {} frames dropped", o.dropped);
    assert!(o.duplicated > 100, "only {} frames duplicated", o.duplicated);
    assert!(o.client_retransmissions > 0 && o.agent_resends > 0);
    eprintln!(
        "16 MiB each way in {:?} simulated; dropped {} duplicated {}; client retransmissions {}, agent resends {}",
        o.sim_time, o.dropped, o.duplicated, o.client_retransmissions, o.agent_resends
    );
}

#[test]
fn several_seeds_on_a_harsher_link() {
    let faults = LinkFaults { drop: 0.05, duplicate: 0.05, base_delay_ms: 1, jitter_ms: 30 };
    for seed in 1..=4 {
        run_pair(seed, 256 << 10, faults);
    }
}

#[test]
fn clean_link_needs_no_retransmission() {
    let faults = LinkFaults { drop: 0.0, duplicate: 0.0, base_delay_ms: 5, jitter_ms: 0 };
    let o = run_pair(9, 1 << 20, faults);
    assert_eq!(o.client_retransmissions, 0);
    assert_eq!(o.agent_resends, 0);
}

/// A target that takes 1 KiB per millisecond behind a 64 KiB buffer: the
/// agent acks each message only when its write returns, hundreds of
/// milliseconds after it was sent once the client's window has filled the
/// buffer. A late ack is a queue, not a loss: the client resends (almost)
/// nothing, on a clean link and on one that loses 0.5% of frames.
#[test]
fn a_slow_target_makes_acks_late_and_the_client_does_not_resend_a_queue() {
    let target = SlowTarget { buffer: 64 << 10, bytes_per_ms: 1024 };
    let clean = LinkFaults { drop: 0.0, duplicate: 0.0, base_delay_ms: 5, jitter_ms: 0 };
    let lossy = LinkFaults { drop: 0.005, ..clean };
    for (name, faults) in [("clean", clean), ("lossy", lossy)] {
        let o = run_pair_into(0x51, 4 << 20, 64 << 10, faults, Some(target));
        eprintln!(
            "{name}: 4 MiB into a 1 KiB/ms target in {:?} simulated; client sent {} messages, {} resends ({:.2}%); {} frames dropped",
            o.sim_time,
            o.client_sent,
            o.client_retransmissions,
            100.0 * o.client_resend_ratio(),
            o.dropped
        );
        // The target's rate is the bound: 4096 ms for 4 MiB.
        assert!(o.sim_time >= Duration::from_millis(4096 - 64), "{:?}", o.sim_time);
        assert!(
            o.client_resend_ratio() <= 0.02,
            "{name}: {} resends for {} messages",
            o.client_retransmissions,
            o.client_sent
        );
    }
}
