//! The Port session's state machine ([`Port`]) against the emulator's
//! upstream-faithful [`AgentChannel`], on a simulated clock: local connections
//! echoed by a target behind the agent, in mux mode (several at once, through
//! an smux server as the agent's port plugin runs one) and in basic mode (one
//! after another, with the DisconnectToPort flag between them). The agent
//! sends as the stock agent does, one 1024-byte message per millisecond. A
//! local reader may take only so many bytes per millisecond: the machine then
//! holds what arrives, and nothing is lost or resent for it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use ssm_channel::payloads::Flag;
use ssm_channel::proto::port::{ConnId, Port, PortEvent};
use ssm_channel::session::{SeededEnvironment, SessionConfig};
use ssm_channel::smux::{Mux, MuxEvent, Role};
use ssm_channel::version::PortMode;
use ssm_emulator::agent::channel::{AgentChannel, AgentEvent, PAYLOAD_SIZE};

mod sim;
use sim::{Link, LinkFaults};

const CLEAN: LinkFaults = LinkFaults { drop: 0.0, duplicate: 0.0, base_delay_ms: 5, jitter_ms: 0 };

struct Scenario {
    seed: u64,
    mux: bool,
    conns: usize,
    bytes_per_conn: usize,
    /// Bytes per millisecond the local side reads (`None`: all at once).
    reader_per_ms: Option<usize>,
    faults: LinkFaults,
}

/// The agent's side: the echo target behind smux (mux mode) or behind the
/// plain connection (basic mode).
struct Target {
    mux: Option<Mux>,
    /// Basic mode: echo bytes not sent yet.
    basic_out: VecDeque<u8>,
    disconnects: usize,
}

impl Target {
    fn input(&mut self, d: &[u8]) {
        match &mut self.mux {
            Some(m) => {
                m.handle_input(d).expect("the client's smux is well-formed");
                while let Some(ev) = m.poll_event() {
                    match ev {
                        MuxEvent::Data(sid, b) => {
                            m.write(sid, &b);
                        }
                        MuxEvent::Closed(sid) => m.close(sid),
                        MuxEvent::Opened(_) => {}
                    }
                }
            }
            None => self.basic_out.extend(d),
        }
    }

    /// The next message's worth of output, if any.
    fn output(&mut self) -> Option<Vec<u8>> {
        match &mut self.mux {
            Some(m) if m.pending_output() > 0 => Some(m.take_output(PAYLOAD_SIZE).to_vec()),
            Some(_) => None,
            None if self.basic_out.is_empty() => None,
            None => {
                let n = self.basic_out.len().min(PAYLOAD_SIZE);
                Some(self.basic_out.drain(..n).collect())
            }
        }
    }
}

/// One local connection of the client.
struct Local {
    up: Vec<u8>,
    sent: usize,
    got: Vec<u8>,
    closed: bool,
}

struct Outcome {
    sim_time: Duration,
    sent: u64,
    retransmissions: u64,
    disconnects: usize,
}

fn run(sc: &Scenario) -> Outcome {
    let mut rng = StdRng::seed_from_u64(sc.seed);
    let t0 = Instant::now();
    let mut sim = Duration::ZERO;
    let mut client = Port::new(SessionConfig::default(), 4096, Box::new(SeededEnvironment::new(sc.seed ^ 1)));
    client.set_connected(true, t0);
    let mut props = BTreeMap::from([
        ("portNumber".to_owned(), serde_json::json!("5432")),
        ("localPortNumber".to_owned(), serde_json::json!("0")),
    ]);
    if sc.mux {
        props.insert("type".to_owned(), serde_json::json!("LocalPortForwarding"));
    }
    let mut agent = AgentChannel::new(Box::new(SeededEnvironment::new(sc.seed ^ 2)), "3.3.987.0", "Port", props);
    agent.start(t0);
    let mut link = Link::new(sc.seed ^ 3, sc.faults);
    let mut target = Target { mux: None, basic_out: VecDeque::new(), disconnects: 0 };

    let mut locals: HashMap<ConnId, Local> = HashMap::new();
    let mut started: Vec<ConnId> = Vec::new();
    let mut ready = false;
    let mut agent_next_send = Duration::ZERO;
    let mut held: Option<PortEvent> = None;
    let mut budget = 0usize;
    let mut budget_at = Duration::ZERO;
    let limit = Duration::from_secs(600);

    while !(ready && locals.len() == sc.conns && locals.values().all(|l| l.closed)) {
        assert!(sim < limit, "no progress after {sim:?}");
        let now = t0 + sim;
        // The local side opens its connections, and sends while the machine takes.
        if ready && locals.len() < sc.conns {
            while locals.len() < sc.conns {
                let (id, now_started) = client.open().expect("ready");
                let mut up = vec![0u8; sc.bytes_per_conn];
                rng.fill_bytes(&mut up);
                locals.insert(id, Local { up, sent: 0, got: Vec::new(), closed: false });
                if now_started {
                    started.push(id);
                }
            }
        }
        'send: while client.can_take_local(64 << 10) {
            let mut any = false;
            for id in &started {
                let l = locals.get_mut(id).expect("known");
                if l.sent < l.up.len() && client.can_take_local(64 << 10) {
                    let end = (l.sent + (16 << 10)).min(l.up.len());
                    client.local_data(*id, &l.up[l.sent..end]);
                    l.sent = end;
                    any = true;
                }
            }
            if !any {
                break 'send;
            }
        }
        // The agent: timers, its paced output, frames both ways.
        if client.poll_timeout().is_some_and(|t| t <= now) {
            client.handle_timeout(now);
        }
        if agent.poll_timeout().is_some_and(|t| t <= now) {
            agent.handle_timeout(now);
        }
        if agent.is_established() && sim >= agent_next_send {
            if let Some(chunk) = target.output() {
                agent.send_output(now, &chunk);
                agent_next_send = sim + Duration::from_millis(1);
            }
        }
        // Transmit, and deliver what is due.
        link.exchange(sim, now, &mut client, &mut agent);
        while let Some(ev) = agent.poll_event() {
            match ev {
                AgentEvent::HandshakeDone { mode, .. } => {
                    assert_eq!(matches!(mode, PortMode::Mux { .. }), sc.mux, "the agent's mode");
                    if sc.mux {
                        target.mux = Some(Mux::new(Role::Server, false));
                    }
                }
                AgentEvent::Input(d) => {
                    target.input(&d);
                    agent.input_done(now);
                }
                AgentEvent::Flag(Flag::DisconnectToPort) => target.disconnects += 1,
                AgentEvent::Failed(e) => panic!("agent failed: {e}"),
                AgentEvent::Flag(_) | AgentEvent::Size { .. } | AgentEvent::HandshakeSkipped => {}
            }
        }
        // The local reader takes what it has room for; the rest waits in the machine.
        if let Some(per_ms) = sc.reader_per_ms {
            let ms = (sim - budget_at).as_millis() as usize;
            budget = (budget + ms * per_ms).min(64 << 10);
            budget_at += Duration::from_millis(ms as u64);
        }
        while let Some(ev) = held.take().or_else(|| client.poll_event()) {
            match ev {
                PortEvent::Ready(r) => {
                    assert_eq!(matches!(r.mode, PortMode::Mux { .. }), sc.mux, "the client's mode");
                    ready = true;
                }
                PortEvent::Data(id, d) => {
                    if sc.reader_per_ms.is_some() {
                        if d.len() > budget {
                            held = Some(PortEvent::Data(id, d));
                            break;
                        }
                        budget -= d.len();
                    }
                    let l = locals.get_mut(&id).expect("data for a known connection");
                    l.got.extend_from_slice(&d);
                    assert!(l.got.len() <= l.up.len(), "more echoed than sent");
                    if l.got.len() == l.up.len() {
                        assert!(l.got == l.up, "connection {id}: echo differs");
                        l.closed = true;
                        client.local_eof(id);
                    }
                }
                PortEvent::Closed(id) => panic!("the agent closed connection {id}"),
                PortEvent::Started(id) => started.push(id),
            }
        }
        // The clock moves to the next thing that can happen.
        let next = [
            link.next_due(),
            client.poll_timeout().map(|t| t - t0),
            agent.poll_timeout().map(|t| t - t0),
            agent.is_established().then_some(agent_next_send.max(sim + Duration::from_millis(1))),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(sim + Duration::from_millis(1));
        sim = next.max(sim + Duration::from_micros(100));
    }
    let stats = client.stats();
    Outcome {
        sim_time: sim,
        sent: stats.messages_sent,
        retransmissions: stats.retransmissions,
        disconnects: target.disconnects,
    }
}

fn resend_ratio(o: &Outcome) -> f64 {
    o.retransmissions as f64 / (o.sent + o.retransmissions).max(1) as f64
}

#[test]
fn mux_mode_carries_eight_connections_at_once_byte_exact() {
    let o =
        run(&Scenario { seed: 1, mux: true, conns: 8, bytes_per_conn: 256 << 10, reader_per_ms: None, faults: CLEAN });
    // 2 MiB echoed at the stock agent's 1 MB/s: about two seconds.
    assert!(o.sim_time >= Duration::from_secs(2), "faster than the agent's pacing allows: {:?}", o.sim_time);
    assert!(resend_ratio(&o) <= 0.02, "resends {} of {}", o.retransmissions, o.sent);
}

#[test]
fn basic_mode_carries_connections_one_after_another() {
    let o =
        run(&Scenario { seed: 2, mux: false, conns: 3, bytes_per_conn: 64 << 10, reader_per_ms: None, faults: CLEAN });
    // Each connection but the last ended with the flag before the next began
    // (the last one's flag may still be on its way when the harness stops).
    assert!(o.disconnects >= 2, "DisconnectToPort flags: {}", o.disconnects);
    assert!(resend_ratio(&o) <= 0.02, "resends {} of {}", o.retransmissions, o.sent);
}

#[test]
fn a_slow_local_reader_holds_data_back_without_loss_or_resends() {
    let o = run(&Scenario {
        seed: 3,
        mux: true,
        conns: 2,
        bytes_per_conn: 512 << 10,
        reader_per_ms: Some(256),
        faults: CLEAN,
    });
    // 1 MiB read at 256 bytes per ms: at least four seconds, reader-bound.
    assert!(o.sim_time >= Duration::from_secs(4), "the reader's pace was not felt: {:?}", o.sim_time);
    assert!(resend_ratio(&o) <= 0.02, "resends {} of {}", o.retransmissions, o.sent);
}

#[test]
fn mux_mode_over_a_lossy_reordering_link() {
    let faults = LinkFaults { drop: 0.01, duplicate: 0.01, base_delay_ms: 5, jitter_ms: 10 };
    let o = run(&Scenario { seed: 4, mux: true, conns: 4, bytes_per_conn: 128 << 10, reader_per_ms: None, faults });
    assert!(o.retransmissions > 0, "a lossy link needs resends");
}
