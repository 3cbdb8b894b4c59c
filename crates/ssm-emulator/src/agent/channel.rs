//! The instance agent's end of a data channel, modelled on
//! `agent/session/datachannel/datachannel.go` (amazon-ssm-agent 3.3.987.0 to
//! 3.3.1142.0), deliberately including its quirks, because our client must
//! cope with them:
//!
//! - one goroutine reads the websocket and handles each frame to the end
//!   before it reads the next (`communicator/websocketchannel.go`): the
//!   plugin's write of an input message blocks it, acks included. Here an
//!   [`AgentEvent::Input`] is that write: the channel holds every later frame
//!   until the runtime calls [`AgentChannel::input_done`], and only then acks
//!   the message. The runtime decides when the write returns, with the
//!   buffering upstream has in front of the target (`agent::mod`);
//! - stream messages are acked *after* processing;
//! - messages ahead of the expected sequence number are acked at once and
//!   buffered (up to 100 000); duplicates are re-acked;
//! - Port sessions start with a handshake; shell sessions (Standard_Stream,
//!   InteractiveCommands) skip it unless KMS encryption is on
//!   (`plugins/sessionplugin/sessionplugin.go`: `RequireHandshake() ||
//!   encryptionEnabled`; `standardstream.go` and `singlecommand.go` return
//!   false), so their shell output starts at sequence number 0;
//! - non-handshake data arriving before HandshakeComplete is acked and thrown away;
//! - outgoing messages are never throttled by acks: they go into a FIFO of up
//!   to 100 000 (further ones are not retained) and a scheduler that wakes every
//!   100 ms resends only the *head*, once it is older than the RTO, updating
//!   its send time; RTT samples are taken from the last send time;
//! - `pause_publication` stops sending and resending (messages are still
//!   queued); `start_publication`, any stream data or any ack resumes.
//!
//! No I/O and no clock: the runtime in `agent::mod` drives it.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use ssm_channel::codec::{message_type, Flags, Message, PayloadType, SequenceNumber};
use ssm_channel::payloads::{
    action_type, Acknowledge, ActionStatus, Flag, HandshakeComplete, HandshakeRequest, HandshakeResponse,
    RequestedClientAction, SessionTypeRequest,
};
use ssm_channel::session::Environment;
use ssm_channel::version::{agent_port_mode, PortMode};

/// `ResendSleepInterval`.
pub const RESEND_TICK: Duration = Duration::from_millis(100);
/// `handshakeTimeout`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// `OutgoingMessageBufferCapacity`, `IncomingMessageBufferCapacity`.
pub const BUFFER_CAPACITY: usize = 100_000;
/// `StreamDataPayloadSize`.
pub const PAYLOAD_SIZE: usize = 1024;

#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// The client answered the handshake; the port plugin starts in `mode`.
    HandshakeDone { client_version: String, mode: PortMode },
    /// The session type needs no handshake (a shell without KMS): the plugin
    /// starts at once (`SkipHandshake`).
    HandshakeSkipped,
    /// Output bytes from the client, in order: the plugin's write. Answer
    /// each with exactly one [`AgentChannel::input_done`], when it returns.
    Input(Vec<u8>),
    /// A terminal size (payload type Size) for a shell session.
    Size { cols: u16, rows: u16 },
    /// A Flag from the client (DisconnectToPort, TerminateSession).
    Flag(Flag),
    /// The session failed (handshake refused or timed out).
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Handshake {
    NotStarted,
    AwaitResponse { started: Instant },
    Complete,
    Skipped,
    Failed,
}

/// Session types whose plugin asks for no handshake (without KMS).
pub fn skips_handshake(session_type: &str) -> bool {
    matches!(session_type, "Standard_Stream" | "InteractiveCommands")
}

#[derive(Debug)]
struct Outgoing {
    seq: SequenceNumber,
    frame: Vec<u8>,
    last_sent: Instant,
}

pub struct AgentChannel {
    env: Box<dyn Environment>,
    agent_version: String,
    session_type: String,
    properties: BTreeMap<String, serde_json::Value>,
    handshake: Handshake,
    paused: bool,
    next_seq: SequenceNumber,
    expected: SequenceNumber,
    outgoing: VecDeque<Outgoing>,
    incoming: BTreeMap<SequenceNumber, Message>,
    srtt: f64,
    rttvar: f64,
    rto: Duration,
    next_tick: Option<Instant>,
    tx: VecDeque<Vec<u8>>,
    events: VecDeque<AgentEvent>,
    /// The plugin's write of an input message has not returned: the read
    /// loop waits. `Some(Some(msg))`: ack `msg` when it returns; `Some(None)`:
    /// a message from the out-of-order buffer, acked when it arrived.
    writing: Option<Option<Message>>,
    /// Frames that arrived while the read loop waited, in order.
    held: VecDeque<Vec<u8>>,
    pub resends: u64,
}

impl std::fmt::Debug for AgentChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentChannel")
            .field("handshake", &self.handshake)
            .field("next_seq", &self.next_seq)
            .field("expected", &self.expected)
            .field("outgoing", &self.outgoing.len())
            .finish_non_exhaustive()
    }
}

impl AgentChannel {
    pub fn new(
        env: Box<dyn Environment>,
        agent_version: impl Into<String>,
        session_type: impl Into<String>,
        properties: BTreeMap<String, serde_json::Value>,
    ) -> Self {
        AgentChannel {
            env,
            agent_version: agent_version.into(),
            session_type: session_type.into(),
            properties,
            handshake: Handshake::NotStarted,
            paused: false,
            next_seq: SequenceNumber(0),
            expected: SequenceNumber(0),
            outgoing: VecDeque::new(),
            incoming: BTreeMap::new(),
            srtt: 0.1,
            rttvar: 0.0,
            rto: Duration::from_millis(200),
            next_tick: None,
            tx: VecDeque::new(),
            events: VecDeque::new(),
            writing: None,
            held: VecDeque::new(),
            resends: 0,
        }
    }

    /// Sends the HandshakeRequest (PerformHandshake), or skips it for a
    /// session type that needs none.
    pub fn start(&mut self, now: Instant) {
        if self.handshake != Handshake::NotStarted {
            return;
        }
        self.next_tick = Some(now + RESEND_TICK);
        if skips_handshake(&self.session_type) {
            self.handshake = Handshake::Skipped;
            self.events.push_back(AgentEvent::HandshakeSkipped);
            return;
        }
        let req = HandshakeRequest {
            agent_version: self.agent_version.clone(),
            requested_client_actions: vec![RequestedClientAction {
                action_type: action_type::SESSION_TYPE.into(),
                action_parameters: serde_json::to_value(SessionTypeRequest {
                    session_type: self.session_type.clone(),
                    properties: self.properties.clone(),
                })
                .unwrap_or_default(),
            }],
        };
        let payload = serde_json::to_vec(&req).unwrap_or_default();
        self.handshake = Handshake::AwaitResponse { started: now };
        self.send_stream(now, PayloadType::HANDSHAKE_REQUEST, &payload);
    }

    pub fn is_established(&self) -> bool {
        matches!(self.handshake, Handshake::Complete | Handshake::Skipped)
    }

    /// Unacknowledged output messages.
    pub fn unacked(&self) -> usize {
        self.outgoing.len()
    }

    /// SendStreamDataMessage: never blocks, never waits for acks.
    pub fn send_output(&mut self, now: Instant, data: &[u8]) {
        self.send_stream(now, PayloadType::OUTPUT, data);
    }

    pub fn send_flag(&mut self, now: Instant, flag: Flag) {
        self.send_stream(now, PayloadType::FLAG, &flag.to_bytes());
    }

    fn send_stream(&mut self, now: Instant, pt: PayloadType, data: &[u8]) {
        if data.is_empty() {
            return; // "Ignoring empty stream data payload"
        }
        let seq = self.next_seq;
        let msg = Message {
            message_type: message_type::OUTPUT_STREAM_DATA.into(),
            schema_version: 1,
            created_date: self.env.wall_clock_ms(),
            sequence_number: seq,
            flags: if seq.0 == 0 { Flags::SYN } else { Flags::NONE },
            message_id: self.env.message_id(),
            payload_type: Some(pt),
            payload: data.to_vec(),
        };
        let Ok(frame) = msg.to_bytes() else { return };
        if !self.paused {
            self.tx.push_back(frame.clone());
        }
        if self.outgoing.len() < BUFFER_CAPACITY {
            self.outgoing.push_back(Outgoing { seq, frame, last_sent: now });
        }
        self.next_seq = seq.next();
    }

    /// The plugin's write of the last [`AgentEvent::Input`] returned: ack it,
    /// move on, and read the frames that waited.
    pub fn input_done(&mut self, now: Instant) {
        let Some(ack) = self.writing.take() else { return };
        if let Some(msg) = ack {
            self.ack(&msg);
        }
        self.expected = self.expected.next();
        self.drain_incoming(now);
        while self.writing.is_none() {
            let Some(frame) = self.held.pop_front() else { break };
            self.read_frame(now, &frame);
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.tx.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let handshake = match self.handshake {
            Handshake::AwaitResponse { started } => Some(started + HANDSHAKE_TIMEOUT),
            _ => None,
        };
        match (self.next_tick, handshake) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The resend scheduler's tick and the handshake timeout.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Handshake::AwaitResponse { started } = self.handshake {
            if now >= started + HANDSHAKE_TIMEOUT {
                self.handshake = Handshake::Failed;
                self.events.push_back(AgentEvent::Failed(
                    "Handshake timed out. Please ensure that you have the latest version of the session manager plugin."
                        .into(),
                ));
            }
        }
        let Some(tick) = self.next_tick else { return };
        if now < tick {
            return;
        }
        self.next_tick = Some(now + RESEND_TICK);
        if self.paused {
            return;
        }
        if let Some(head) = self.outgoing.front_mut() {
            if now.duration_since(head.last_sent) > self.rto {
                self.tx.push_back(head.frame.clone());
                head.last_sent = now;
                self.resends += 1;
            }
        }
    }

    /// Feeds one frame from the client (via MGS). Invalid frames are dropped,
    /// as the agent does after logging them. While an input write has not
    /// returned, the frame waits its turn.
    pub fn handle_frame(&mut self, now: Instant, bytes: &[u8]) {
        if self.writing.is_some() {
            self.held.push_back(bytes.to_vec());
            return;
        }
        self.read_frame(now, bytes);
    }

    fn read_frame(&mut self, now: Instant, bytes: &[u8]) {
        let Ok(msg) = Message::parse(bytes) else { return };
        match msg.message_type.as_str() {
            message_type::INPUT_STREAM_DATA => {
                self.paused = false;
                self.handle_stream(now, msg);
            }
            message_type::ACKNOWLEDGE => {
                self.paused = false;
                if let Ok(ack) = serde_json::from_slice::<Acknowledge>(&msg.payload) {
                    self.handle_ack(now, SequenceNumber(ack.sequence_number));
                }
            }
            message_type::PAUSE_PUBLICATION => self.paused = true,
            message_type::START_PUBLICATION => self.paused = false,
            _ => {}
        }
    }

    fn handle_ack(&mut self, now: Instant, seq: SequenceNumber) {
        if let Some(idx) = self.outgoing.iter().position(|m| m.seq == seq) {
            let m = self.outgoing.remove(idx).expect("index from position");
            // calculateRetransmissionTimeout, sampled from the last send time.
            let r = now.duration_since(m.last_sent).as_secs_f64();
            self.rttvar = 0.75 * self.rttvar + 0.25 * (self.srtt - r).abs();
            self.srtt = 0.875 * self.srtt + 0.125 * r;
            let rto = self.srtt + (4.0 * self.rttvar).max(0.010);
            self.rto = Duration::from_secs_f64(rto).min(Duration::from_secs(1));
        }
    }

    fn ack(&mut self, msg: &Message) {
        let ack = Acknowledge::of(&msg.message_type, msg.sequence_number, msg.message_id);
        self.tx.push_back(ack.to_frame(self.env.wall_clock_ms(), self.env.message_id()));
    }

    fn handle_stream(&mut self, now: Instant, msg: Message) {
        use std::cmp::Ordering::*;
        match msg.sequence_number.cmp(&self.expected) {
            Equal => {
                if self.process(now, &msg) {
                    self.ack(&msg);
                    self.expected = self.expected.next();
                    self.drain_incoming(now);
                } else {
                    // The write blocks: the ack and everything after it wait.
                    self.writing = Some(Some(msg));
                }
            }
            Greater => {
                if self.incoming.len() < BUFFER_CAPACITY {
                    self.ack(&msg);
                    self.incoming.insert(msg.sequence_number, msg);
                }
            }
            Less => self.ack(&msg),
        }
    }

    /// processIncomingMessageBufferItems: buffered messages were acked when
    /// they arrived; a write that blocks stops the loop until it returns.
    fn drain_incoming(&mut self, now: Instant) {
        while let Some(next) = self.incoming.remove(&self.expected) {
            if !self.process(now, &next) {
                self.writing = Some(None);
                return;
            }
            self.expected = self.expected.next();
        }
    }

    /// processStreamDataMessage. Returns false when it handed input to the
    /// plugin, whose write returns at [`AgentChannel::input_done`].
    fn process(&mut self, now: Instant, msg: &Message) -> bool {
        match msg.payload_type.unwrap_or(PayloadType::NONE) {
            PayloadType::HANDSHAKE_RESPONSE => {
                self.handle_handshake_response(now, &msg.payload);
                true
            }
            pt => {
                if !self.is_established() {
                    return true; // "Handshake still in progress, ignore stream data message"
                }
                match pt {
                    PayloadType::OUTPUT => {
                        self.events.push_back(AgentEvent::Input(msg.payload.clone()));
                        return false;
                    }
                    PayloadType::FLAG => {
                        if let Some(f) = Flag::parse(&msg.payload) {
                            self.events.push_back(AgentEvent::Flag(f));
                        }
                    }
                    // The shell plugin's SetSize; a malformed one is logged and dropped there.
                    PayloadType::SIZE => {
                        #[derive(serde::Deserialize)]
                        struct SizeData {
                            cols: u32,
                            rows: u32,
                        }
                        if let Ok(s) = serde_json::from_slice::<SizeData>(&msg.payload) {
                            let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
                            self.events.push_back(AgentEvent::Size { cols: clamp(s.cols), rows: clamp(s.rows) });
                        }
                    }
                    _ => {}
                }
                true
            }
        }
    }

    fn handle_handshake_response(&mut self, now: Instant, payload: &[u8]) {
        if !matches!(self.handshake, Handshake::AwaitResponse { .. }) {
            return;
        }
        let resp: HandshakeResponse = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => {
                self.handshake = Handshake::Failed;
                self.events
                    .push_back(AgentEvent::Failed(format!("Unmarshalling of HandshakeResponse message failed, {e}")));
                return;
            }
        };
        if let Some(a) = resp.processed_client_actions.iter().find(|a| a.action_status != ActionStatus::SUCCESS) {
            self.handshake = Handshake::Failed;
            self.events.push_back(AgentEvent::Failed(format!(
                "{} failed on client with status {} error: {}",
                a.action_type, a.action_status.0, a.error
            )));
            return;
        }
        let started = match self.handshake {
            Handshake::AwaitResponse { started } => started,
            _ => now,
        };
        let complete = HandshakeComplete {
            handshake_time_to_complete: now.duration_since(started).as_nanos() as i64,
            customer_message: String::new(),
        };
        self.handshake = Handshake::Complete;
        self.send_stream(now, PayloadType::HANDSHAKE_COMPLETE, &serde_json::to_vec(&complete).unwrap_or_default());
        let lpf = self.properties.get("type").and_then(|v| v.as_str()) == Some("LocalPortForwarding");
        let mode = agent_port_mode(&resp.client_version, lpf);
        self.events.push_back(AgentEvent::HandshakeDone { client_version: resp.client_version, mode });
    }
}
