//! The client end of a Session Manager data channel as a state machine with no
//! I/O and no clock of its own (sans-IO).
//!
//! Inputs: [`Session::handle_frame`], [`Session::handle_timeout`],
//! [`Session::send`], [`Session::terminate`], [`Session::set_connected`].
//! Outputs: [`Session::poll_transmit`], [`Session::poll_event`],
//! [`Session::poll_timeout`]. Wall-clock time (CreatedDate) and message ids
//! come from an injected [`Environment`].
//!
//! Reliability follows upstream (`src/datachannel/streaming.go` in the plugin,
//! `agent/session/datachannel/datachannel.go` in the agent): per-direction
//! sequence numbers from 0, one ack per message matched by sequence number,
//! ack after processing, out-of-order messages acked and buffered, duplicates
//! re-acked, retransmission of the oldest unacknowledged message after the
//! upstream RTO estimate (10 ms floor, 1 s cap). Differences, all compatible
//! with both peers:
//! - a window of unacknowledged messages sized from what the channel
//!   delivers ([`estimate`]), instead of silently dropping the oldest;
//! - the timer restarts on every ack and backs off on each expiry, so acks
//!   that come late because the agent's target drains slowly (the agent acks
//!   only after writing) are a queue, never a reason to resend;
//! - Karn's rule for RTT samples;
//! - a message that three later-sent messages overtook (their acks came
//!   first: the agent acks messages ahead of a gap at once) is resent without
//!   waiting for the timer, so several losses do not cost an RTO each.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::codec::{message_type, DecodeError, Flags, Message, PayloadType, SequenceNumber};
use crate::payloads::{Acknowledge, ChannelClosed, Flag};
use crate::version::CLIENT_VERSION;

mod env;
mod estimate;
pub use env::{Environment, SeededEnvironment, SystemEnvironment};
pub use estimate::{rto, MIN_WINDOW, QUEUE_ALLOWANCE};
use estimate::{Rtt, Window};

/// How many recent acks are repeated after a reconnect.
const RECENT_ACKS: usize = 2048;

/// Largest payload upstream puts in one stream message (`StreamDataPayloadSize`).
pub const MAX_PAYLOAD: usize = 1024;

/// Acks of this many later-sent messages mark an unacked one as lost...
const OVERTAKEN_RESEND: u8 = 3;
/// ...if they were sent at least a reorder window after it. The window starts
/// at a quarter of the smallest RTT (at least this much) and grows by as much
/// each time such a resend proves needless, up to the smoothed RTT (RACK,
/// RFC 8985 §6.2, with the early ack standing in for DSACK).
const MIN_REORDER_WINDOW: Duration = Duration::from_millis(1);

#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Announced in the HandshakeResponse; selects the agent's port mode.
    pub client_version: String,
    /// Most unacknowledged stream messages in flight: the cap of the window,
    /// which otherwise follows the channel's delivery rate.
    pub max_in_flight: usize,
    /// Out-of-order messages held (upstream plugin: 10 000).
    pub reorder_capacity: usize,
    /// Bytes of received data held for the application before we stop acking.
    pub receive_buffer_bytes: usize,
    /// With data outstanding and the link up, this long without any ack ends the session.
    pub ack_timeout: Duration,
    /// Session types the handshake accepts: [`PORT_SESSION`] for tunnels,
    /// [`SHELL_SESSIONS`] for a shell.
    pub session_types: &'static [&'static str],
    /// The agent may start without a handshake, with Output at sequence
    /// number 0: a shell session without KMS (amazon-ssm-agent
    /// `plugins/sessionplugin/sessionplugin.go` handshakes only when the plugin
    /// requires it or KMS is on; the plugin copes in `sessionhandler.go`
    /// `ProcessFirstMessage`).
    pub start_on_output: bool,
}

/// The session type of Port sessions.
pub const PORT_SESSION: &[&str] = &["Port"];
/// The session types of shell sessions: the default shell document
/// (SSM-SessionManagerRunShell) and AWS-StartInteractiveCommand.
pub const SHELL_SESSIONS: &[&str] = &["Standard_Stream", "InteractiveCommands"];

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            client_version: CLIENT_VERSION.to_owned(),
            max_in_flight: 512,
            // Generous on purpose: whatever we refuse, the stock agent resends
            // at one message per 100 ms tick (head-only resend).
            reorder_capacity: 32_768,
            receive_buffer_bytes: 16 << 20,
            ack_timeout: Duration::from_secs(300),
            session_types: PORT_SESSION,
            start_on_output: false,
        }
    }
}

/// Handshake phases, then streaming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    AwaitHandshakeRequest,
    AwaitHandshakeComplete,
    Established,
    /// TerminateSession flag sent; waiting for its ack.
    Terminating,
    Closed(CloseReason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The service sent `channel_closed`; `output` is its reason text.
    ChannelClosed { output: String },
    /// We sent TerminateSession and the agent acknowledged it.
    Terminated,
    /// The agent asked for something we cannot do (KMS, a non-Port session).
    HandshakeFailed(String),
    /// No ack for `ack_timeout` while data was outstanding.
    AckTimeout,
}

/// Handshake details the application needs to pick basic or mux mode.
#[derive(Debug, Clone, PartialEq)]
pub struct HandshakeInfo {
    pub agent_version: String,
    pub session_type: String,
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The agent's HandshakeRequest arrived; our response is already queued.
    Handshake(HandshakeInfo),
    /// HandshakeComplete arrived, or the first output of a session that
    /// needs no handshake (then without a [`Event::Handshake`] before it):
    /// data may flow.
    Established {
        customer_message: String,
    },
    /// Output bytes from the agent, in order.
    Data(Vec<u8>),
    /// A Flag message from the agent (ConnectToPortError in mux mode).
    Flag(Flag),
    Closed(CloseReason),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("the handshake has not completed yet")]
    NotEstablished,
    #[error("{0} unacknowledged messages in flight: wait for acks")]
    WindowFull(usize),
    #[error("payload of {0} bytes is empty or larger than {MAX_PAYLOAD}")]
    BadSize(usize),
    #[error("the session is closed")]
    Closed,
}

/// Why an incoming frame was not accepted. None of these close the session:
/// upstream logs and drops such frames without an ack.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("malformed frame: {0}")]
    Decode(#[from] DecodeError),
    #[error("malformed {what} payload: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("unexpected message type {0:?}")]
    UnexpectedType(String),
}

/// Counters for `status` and benchmarks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Distinct stream messages sent (first transmissions).
    pub messages_sent: u64,
    pub bytes_sent: u64,
    /// Transmissions after the first, for any reason (timer, overtaken, reconnect).
    pub retransmissions: u64,
    pub messages_received: u64,
    pub bytes_received: u64,
    pub duplicates_received: u64,
    pub out_of_order_received: u64,
    pub dropped_not_ready: u64,
    pub acks_received: u64,
    pub srtt: Duration,
    /// The retransmission timeout in force (with backoff).
    pub rto: Duration,
    /// The smallest recent RTT sample (zero before the first).
    pub min_rtt: Duration,
    /// Messages the window allows in flight now.
    pub window: usize,
}

impl Stats {
    /// Every stream message put on the wire, resends included.
    pub fn transmissions(&self) -> u64 {
        self.messages_sent + self.retransmissions
    }

    /// Resends as a share of all transmissions (0 when nothing was sent).
    pub fn resend_ratio(&self) -> f64 {
        self.retransmissions as f64 / self.transmissions().max(1) as f64
    }
}

#[derive(Debug)]
struct InFlight {
    seq: SequenceNumber,
    frame: Vec<u8>,
    /// `None` until transmitted (or after a reconnect made it due again).
    last_sent: Option<Instant>,
    transmissions: u32,
    /// Waiting in a send queue.
    queued: bool,
    /// Acks of messages sent after this one's last transmission.
    overtaken: u8,
    /// Its last transmission was for being overtaken.
    fast_resent: bool,
}

pub struct Session {
    config: SessionConfig,
    env: Box<dyn Environment>,
    state: State,
    connected: bool,
    paused: bool,

    // Sending.
    next_seq: SequenceNumber,
    in_flight: VecDeque<InFlight>,
    send_queue: VecDeque<SequenceNumber>,
    /// Messages to send again, served before new ones.
    resend_queue: VecDeque<SequenceNumber>,
    control: VecDeque<Vec<u8>>,
    terminate_seq: Option<SequenceNumber>,
    rtt: Rtt,
    window: Window,
    /// When an ack last removed a message: the retransmission timer counts from here.
    last_ack_at: Option<Instant>,
    /// Quarters of the smallest RTT that a message must have been sent before
    /// an acked one to count as overtaken (grows on needless resends).
    reorder_quarters: u32,
    last_progress: Option<Instant>,

    // Receiving.
    expected: SequenceNumber,
    reorder: BTreeMap<SequenceNumber, Message>,
    events: VecDeque<Event>,
    buffered_bytes: usize,
    /// What we acked lately, re-acked after a reconnect: acks are never
    /// retransmitted, and the agent resends an unacked message only when it
    /// reaches the head of its queue, one per 100 ms.
    recent_acks: VecDeque<(SequenceNumber, Uuid)>,

    // KMS encryption (see `kms`).
    /// The HandshakeRequest waiting for its data key.
    pending_handshake: Option<crate::payloads::HandshakeRequest>,
    /// The data key request not yet taken by the driver.
    data_key_request: Option<kms::DataKeyRequest>,
    cipher: Option<kms::Cipher>,

    stats: Stats,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("state", &self.state)
            .field("connected", &self.connected)
            .field("next_seq", &self.next_seq)
            .field("expected", &self.expected)
            .field("in_flight", &self.in_flight.len())
            .finish_non_exhaustive()
    }
}

impl Session {
    pub fn new(config: SessionConfig, env: Box<dyn Environment>) -> Self {
        let window = Window::new(config.max_in_flight);
        Session {
            config,
            env,
            state: State::AwaitHandshakeRequest,
            connected: false,
            paused: false,
            next_seq: SequenceNumber(0),
            in_flight: VecDeque::new(),
            send_queue: VecDeque::new(),
            resend_queue: VecDeque::new(),
            control: VecDeque::new(),
            terminate_seq: None,
            rtt: Rtt::new(),
            window,
            last_ack_at: None,
            reorder_quarters: 1,
            last_progress: None,
            expected: SequenceNumber(0),
            reorder: BTreeMap::new(),
            events: VecDeque::new(),
            buffered_bytes: 0,
            recent_acks: VecDeque::new(),
            pending_handshake: None,
            data_key_request: None,
            cipher: None,
            stats: Stats::default(),
        }
    }

    /// The agent asked for KMS encryption: generate a data key for this
    /// request (KMS GenerateDataKey, 64 bytes, the request's context) and hand
    /// it to [`Session::provide_data_key`]. Taken once.
    pub fn take_data_key_request(&mut self) -> Option<kms::DataKeyRequest> {
        self.data_key_request.take()
    }

    /// Whether the session's data is KMS-encrypted.
    pub fn encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed(_))
    }

    pub fn stats(&self) -> Stats {
        Stats {
            srtt: Duration::from_secs_f64(self.rtt.srtt),
            rto: self.rtt.current(),
            min_rtt: self.window.min_rtt().unwrap_or_default(),
            window: self.window.size(),
            ..self.stats.clone()
        }
    }

    /// How long messages have been outstanding without any ack (`None`: nothing
    /// outstanding). A link that went quiet shows here long before a timeout.
    pub fn stalled_for(&self, now: Instant) -> Option<Duration> {
        self.stalled_since().map(|t| now.saturating_duration_since(t))
    }

    /// Since when sent messages have waited without any ack (`None`: nothing
    /// sent is outstanding). A message handed over but not yet transmitted does
    /// not count: its clock starts at its first transmission.
    pub fn stalled_since(&self) -> Option<Instant> {
        self.in_flight.front().filter(|m| m.transmissions > 0).and(self.last_progress)
    }

    /// Unacknowledged stream messages.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether [`Session::send`] would accept a message now.
    pub fn can_send(&self) -> bool {
        self.state == State::Established && self.in_flight.len() < self.window.size()
    }

    /// The websocket went down (`false`) or came up again (`true`). Sequence
    /// state is kept; on reconnect everything unacknowledged is due at once.
    pub fn set_connected(&mut self, connected: bool, now: Instant) {
        self.connected = connected;
        if connected {
            self.last_progress = Some(now);
            self.control.clear();
            let recent: Vec<_> = self.recent_acks.drain(..).collect();
            for (seq, id) in recent {
                self.queue_ack_for(message_type::OUTPUT_STREAM_DATA, seq, id);
            }
            self.send_queue.clear();
            self.resend_queue.clear();
            for m in self.in_flight.iter_mut() {
                m.last_sent = None;
                m.queued = true;
                self.send_queue.push_back(m.seq);
            }
        } else {
            // Acks queued for a dead socket are useless: the peer resends and we re-ack.
            self.control.clear();
        }
    }

    /// Queues one Output message (at most [`MAX_PAYLOAD`] bytes).
    pub fn send(&mut self, data: &[u8]) -> Result<SequenceNumber, SendError> {
        self.send_typed(PayloadType::OUTPUT, data)
    }

    /// Queues one stream message of any payload type (Flag, Output, ...).
    pub fn send_typed(&mut self, payload_type: PayloadType, data: &[u8]) -> Result<SequenceNumber, SendError> {
        match self.state {
            State::Established => {}
            State::Closed(_) | State::Terminating => return Err(SendError::Closed),
            _ => return Err(SendError::NotEstablished),
        }
        if data.is_empty() || data.len() > MAX_PAYLOAD {
            return Err(SendError::BadSize(data.len()));
        }
        if self.in_flight.len() >= self.window.size() {
            return Err(SendError::WindowFull(self.in_flight.len()));
        }
        if self.cipher.is_some() && payload_type == PayloadType::OUTPUT {
            let nonce = self.nonce();
            let sealed = self.cipher.as_ref().map(|c| c.seal(nonce, data)).unwrap_or_default();
            return Ok(self.enqueue_stream(payload_type, &sealed));
        }
        Ok(self.enqueue_stream(payload_type, data))
    }

    /// A fresh random 96-bit nonce, from the environment's randomness.
    fn nonce(&mut self) -> [u8; 12] {
        let mut n = [0u8; 12];
        n.copy_from_slice(&self.env.message_id().as_bytes()[..12]);
        n
    }

    /// Sends the TerminateSession flag (outside the window). The session
    /// closes with [`CloseReason::Terminated`] once the agent acks it.
    pub fn terminate(&mut self) {
        match self.state {
            State::Closed(_) | State::Terminating => {}
            State::Established => {
                let seq = self.enqueue_stream(PayloadType::FLAG, &Flag::TerminateSession.to_bytes());
                self.terminate_seq = Some(seq);
                self.state = State::Terminating;
            }
            // Nothing was set up on the agent yet: there is nothing to flag.
            _ => self.close(CloseReason::Terminated),
        }
    }

    fn enqueue_stream(&mut self, payload_type: PayloadType, data: &[u8]) -> SequenceNumber {
        let seq = self.next_seq;
        self.next_seq = seq.next();
        let msg = Message {
            message_type: message_type::INPUT_STREAM_DATA.into(),
            schema_version: 1,
            created_date: self.env.wall_clock_ms(),
            sequence_number: seq,
            flags: Flags::NONE,
            message_id: self.env.message_id(),
            payload_type: Some(payload_type),
            payload: data.to_vec(),
        };
        // Non-empty payload and a fixed valid type: encoding cannot fail.
        let frame = msg.to_bytes().unwrap_or_default();
        self.in_flight.push_back(InFlight {
            seq,
            frame,
            last_sent: None,
            transmissions: 0,
            queued: true,
            overtaken: 0,
            fast_resent: false,
        });
        self.send_queue.push_back(seq);
        seq
    }

    fn close(&mut self, reason: CloseReason) {
        if !self.is_closed() {
            self.state = State::Closed(reason.clone());
            self.events.push_back(Event::Closed(reason));
        }
    }

    /// Next frame to put on the websocket (binary), if any.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        if !self.connected {
            return None;
        }
        // Acks flow even while paused (ssm-protocol.md §5.6).
        if let Some(f) = self.control.pop_front() {
            return Some(f);
        }
        if self.paused {
            return None;
        }
        while let Some(seq) = self.resend_queue.pop_front().or_else(|| self.send_queue.pop_front()) {
            let Some(idx) = self.find_in_flight(seq) else { continue };
            // The first transmission of the oldest outstanding message: nothing was
            // waiting for an ack before it, so the no-progress clock starts now
            // (not at the last ack, which may be an idle hour ago).
            if idx == 0 && self.in_flight[idx].transmissions == 0 {
                self.last_progress = Some(now);
                self.window.on_idle_restart(now);
            }
            let m = &mut self.in_flight[idx];
            m.queued = false;
            m.overtaken = 0;
            if m.transmissions > 0 {
                self.stats.retransmissions += 1;
            } else {
                self.stats.messages_sent += 1;
                self.stats.bytes_sent += m.frame.len() as u64;
            }
            m.transmissions += 1;
            m.last_sent = Some(now);
            if self.last_progress.is_none() {
                self.last_progress = Some(now);
            }
            return Some(m.frame.clone());
        }
        None
    }

    fn find_in_flight(&self, seq: SequenceNumber) -> Option<usize> {
        self.in_flight.binary_search_by_key(&seq, |m| m.seq).ok()
    }

    /// When the oldest unacknowledged message is due again: one RTO (with
    /// backoff) after it was last sent or after the last ack, whichever is
    /// later. Acks that keep coming, however late, keep it from firing.
    fn retransmit_at(&self) -> Option<Instant> {
        let head = self.in_flight.front().filter(|m| !m.queued)?;
        let sent = head.last_sent?;
        let since = self.last_ack_at.map_or(sent, |a| a.max(sent));
        Some(since + self.rtt.current())
    }

    /// When [`Session::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.connected || self.paused || self.is_closed() {
            return None;
        }
        let retransmit = self.retransmit_at();
        let give_up = self.stalled_since().map(|t| t + self.config.ack_timeout);
        match (retransmit, give_up) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.connected || self.paused || self.is_closed() {
            return;
        }
        if let Some(t) = self.stalled_since() {
            if now.duration_since(t) >= self.config.ack_timeout {
                self.close(CloseReason::AckTimeout);
                return;
            }
        }
        if self.retransmit_at().is_some_and(|t| now >= t) {
            if let Some(head) = self.in_flight.front_mut() {
                head.queued = true;
                head.fast_resent = false;
                self.resend_queue.push_back(head.seq);
                self.rtt.back_off();
            }
        }
    }

    /// Next event for the application. Taking a Data event frees receive
    /// buffer space, which may release buffered in-order messages.
    pub fn poll_event(&mut self) -> Option<Event> {
        let ev = self.events.pop_front()?;
        if let Event::Data(d) = &ev {
            self.buffered_bytes -= d.len();
            self.drain_reorder();
        }
        Some(ev)
    }

    /// Feeds one websocket message (binary or text: upstream parses both alike).
    pub fn handle_frame(&mut self, now: Instant, bytes: &[u8]) -> Result<(), FrameError> {
        let msg = Message::parse(bytes)?;
        match msg.message_type.as_str() {
            message_type::OUTPUT_STREAM_DATA => {
                self.paused = false;
                self.handle_stream(msg);
                Ok(())
            }
            message_type::ACKNOWLEDGE => {
                self.paused = false;
                let ack: Acknowledge = serde_json::from_slice(&msg.payload)
                    .map_err(|source| FrameError::Json { what: "acknowledge", source })?;
                self.handle_ack(now, SequenceNumber(ack.sequence_number));
                Ok(())
            }
            message_type::CHANNEL_CLOSED => {
                let closed: ChannelClosed = serde_json::from_slice(&msg.payload).unwrap_or_default();
                self.close(CloseReason::ChannelClosed { output: closed.output });
                Ok(())
            }
            message_type::PAUSE_PUBLICATION => {
                self.paused = true;
                Ok(())
            }
            message_type::START_PUBLICATION => {
                self.paused = false;
                Ok(())
            }
            other => Err(FrameError::UnexpectedType(other.to_owned())),
        }
    }

    fn handle_ack(&mut self, now: Instant, seq: SequenceNumber) {
        self.stats.acks_received += 1;
        let Some(idx) = self.find_in_flight(seq) else { return };
        self.resend_overtaken(idx);
        let Some(m) = self.in_flight.remove(idx) else { return };
        self.last_progress = Some(now);
        self.last_ack_at = Some(now);
        self.window.on_delivered(now);
        // An ack sooner after a fast resend than any round trip takes answers
        // an earlier copy: that message was late, not lost. Wait longer.
        let min_rtt = self.window.min_rtt().unwrap_or_default();
        if m.fast_resent && m.last_sent.is_some_and(|t| now.duration_since(t) < min_rtt) {
            self.reorder_quarters = (self.reorder_quarters + 1).min(4 * 64);
        }
        // Karn: a retransmitted message gives an ambiguous sample.
        if m.transmissions == 1 {
            if let Some(sent) = m.last_sent {
                let rtt = now.duration_since(sent);
                self.rtt.sample(rtt);
                self.window.on_rtt_sample(now, rtt);
            }
        }
        if self.terminate_seq == Some(seq) {
            self.close(CloseReason::Terminated);
        }
    }

    /// How much earlier than an acked message another must have been sent to
    /// count as overtaken by it (see [`MIN_REORDER_WINDOW`]).
    fn reorder_window(&self) -> Duration {
        let quarter = self.window.min_rtt().unwrap_or_default() / 4;
        let srtt = Duration::from_secs_f64(self.rtt.srtt);
        (quarter * self.reorder_quarters).min(srtt).max(MIN_REORDER_WINDOW)
    }

    /// The message at `idx` is acked: every older unacked message sent at
    /// least a reorder window before it was overtaken once more. The agent
    /// acks in order unless a message is missing (then it acks the later ones
    /// at once), so a message overtaken [`OVERTAKEN_RESEND`] times is lost,
    /// however slowly the agent drains.
    fn resend_overtaken(&mut self, idx: usize) {
        let Some(acked_sent) = self.in_flight[idx].last_sent else { return };
        let window = self.reorder_window();
        for m in self.in_flight.range_mut(..idx) {
            if m.queued || m.last_sent.is_none_or(|t| t + window > acked_sent) {
                continue;
            }
            m.overtaken += 1;
            if m.overtaken >= OVERTAKEN_RESEND {
                m.queued = true;
                m.fast_resent = true;
                self.resend_queue.push_back(m.seq);
            }
        }
    }

    fn queue_ack(&mut self, msg: &Message) {
        self.queue_ack_for(&msg.message_type, msg.sequence_number, msg.message_id);
    }

    fn queue_ack_for(&mut self, message_type: &str, seq: SequenceNumber, id: Uuid) {
        if self.recent_acks.len() == RECENT_ACKS {
            self.recent_acks.pop_front();
        }
        self.recent_acks.push_back((seq, id));
        let frame = Acknowledge::of(message_type, seq, id).to_frame(self.env.wall_clock_ms(), self.env.message_id());
        self.control.push_back(frame);
    }

    fn handle_stream(&mut self, msg: Message) {
        let seq = msg.sequence_number;
        if seq < self.expected {
            // Upstream's agent re-acks duplicates; the plugin does not. Re-acking
            // stops a peer from resending a message whose ack was lost.
            self.stats.duplicates_received += 1;
            self.queue_ack(&msg);
            return;
        }
        if seq > self.expected {
            if self.reorder.contains_key(&seq) {
                self.stats.duplicates_received += 1;
                self.queue_ack(&msg);
            } else if self.reorder.len() < self.config.reorder_capacity {
                self.stats.out_of_order_received += 1;
                self.queue_ack(&msg);
                self.reorder.insert(seq, msg);
            }
            return;
        }
        if self.process(msg, true) {
            self.drain_reorder();
        }
    }

    /// Handles the message with `seq == expected`. Returns false when the
    /// application is not ready (no ack: the agent will resend).
    fn process(&mut self, msg: Message, ack: bool) -> bool {
        let pt = msg.payload_type.unwrap_or(PayloadType::NONE);
        match pt {
            PayloadType::HANDSHAKE_REQUEST | PayloadType::HANDSHAKE_COMPLETE | PayloadType::ENC_CHALLENGE_REQUEST => {
                // Handshake messages are acked first, then handled (as upstream).
                if ack {
                    self.queue_ack(&msg);
                }
                self.accept(&msg);
                match pt {
                    PayloadType::HANDSHAKE_REQUEST => self.on_handshake_request(&msg.payload),
                    PayloadType::HANDSHAKE_COMPLETE => self.on_handshake_complete(&msg.payload),
                    _ => self.on_encryption_challenge(&msg.payload),
                }
                true
            }
            _ => {
                if self.state == State::AwaitHandshakeRequest
                    && self.config.start_on_output
                    && pt == PayloadType::OUTPUT
                {
                    // A shell that needs no handshake: its output is the start.
                    self.state = State::Established;
                    self.events.push_back(Event::Established { customer_message: String::new() });
                }
                let ready = matches!(self.state, State::Established | State::Terminating);
                let mut msg = msg;
                if let (true, Some(cipher)) =
                    (matches!(pt, PayloadType::OUTPUT | PayloadType::STDERR | PayloadType::EXIT_CODE), &self.cipher)
                {
                    match cipher.open(&msg.payload) {
                        Some(plain) => msg.payload = plain,
                        None => {
                            self.close(CloseReason::HandshakeFailed(
                                "a message from the agent failed KMS decryption (wrong key, or altered)".into(),
                            ));
                            return true;
                        }
                    }
                }
                let data_len = if pt == PayloadType::FLAG { 0 } else { msg.payload.len() };
                if !ready || self.buffered_bytes + data_len > self.config.receive_buffer_bytes {
                    self.stats.dropped_not_ready += 1;
                    return false;
                }
                if ack {
                    self.queue_ack(&msg);
                }
                self.accept(&msg);
                if pt == PayloadType::FLAG {
                    if let Some(flag) = Flag::parse(&msg.payload) {
                        self.events.push_back(Event::Flag(flag));
                    }
                } else if !msg.payload.is_empty() {
                    // Output, and also Error/StdErr, which a Port agent does not send:
                    // the plugin writes every payload to the local socket alike.
                    self.buffered_bytes += msg.payload.len();
                    self.events.push_back(Event::Data(msg.payload));
                }
                true
            }
        }
    }

    fn accept(&mut self, msg: &Message) {
        self.expected = self.expected.next();
        self.stats.messages_received += 1;
        self.stats.bytes_received += msg.payload.len() as u64;
    }

    fn drain_reorder(&mut self) {
        while let Some(msg) = self.reorder.remove(&self.expected) {
            // When the application is not ready, the message waits here.
            let pt = msg.payload_type.unwrap_or(PayloadType::NONE);
            let is_handshake = matches!(
                pt,
                PayloadType::HANDSHAKE_REQUEST | PayloadType::HANDSHAKE_COMPLETE | PayloadType::ENC_CHALLENGE_REQUEST
            );
            if !is_handshake {
                let ready = matches!(self.state, State::Established | State::Terminating);
                if !ready || self.buffered_bytes + msg.payload.len() > self.config.receive_buffer_bytes {
                    self.reorder.insert(msg.sequence_number, msg);
                    return;
                }
            }
            // Buffered messages were acked when they arrived.
            self.process(msg, false);
        }
    }
}

mod handshake;
pub mod kms;

#[cfg(test)]
mod tests;
