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

use base64::Engine;
use ssm_channel::codec::{message_type, Flags, Message, PayloadType, SequenceNumber};
use ssm_channel::payloads::{
    action_type, Acknowledge, ActionStatus, EncryptionChallenge, Flag, HandshakeComplete, HandshakeRequest,
    HandshakeResponse, KmsEncryptionRequest, KmsEncryptionResponse, RequestedClientAction, SessionTypeRequest,
};
use ssm_channel::session::kms::{Cipher, End};
use ssm_channel::session::Environment;
use ssm_channel::version::{agent_port_mode, PortMode};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

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
    AwaitResponse {
        started: Instant,
    },
    /// KMS is on: the encryption challenge is out; the port mode waits.
    AwaitChallenge {
        started: Instant,
        client_version: String,
        mode: PortMode,
    },
    Complete,
    Skipped,
    Failed,
}

/// KMS encryption as the agent runs it (`agent/session/crypto/blockcipher.go`,
/// `datachannel.go`): the key from the preferences, a random challenge for the
/// encryption context, the KMS that decrypts the client's data key.
struct KmsSetup {
    key_id: String,
    random_challenge: String,
    kms: std::sync::Arc<crate::kms::Kms>,
    session_id: String,
    target: String,
    /// The 64 random bytes sent sealed in the EncryptionChallengeRequest.
    challenge: Vec<u8>,
    cipher: Option<Cipher>,
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
    kms: Option<KmsSetup>,
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
            kms: None,
        }
    }

    /// Session Manager preferences with KMS encryption: the handshake asks
    /// for it (shells too) and the data is encrypted afterwards.
    pub fn with_kms(
        mut self,
        key_id: String,
        kms: std::sync::Arc<crate::kms::Kms>,
        session_id: String,
        target: String,
    ) -> Self {
        let random: Vec<u8> = self.env.message_id().as_bytes().to_vec();
        self.kms = Some(KmsSetup {
            key_id,
            random_challenge: B64.encode(random),
            kms,
            session_id,
            target,
            challenge: Vec::new(),
            cipher: None,
        });
        self
    }

    fn random_bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 16);
        while out.len() < n {
            out.extend_from_slice(self.env.message_id().as_bytes());
        }
        out.truncate(n);
        out
    }

    fn nonce(&mut self) -> [u8; 12] {
        let mut n = [0u8; 12];
        n.copy_from_slice(&self.random_bytes(12));
        n
    }

    /// Sends the HandshakeRequest (PerformHandshake), or skips it for a
    /// session type that needs none.
    pub fn start(&mut self, now: Instant) {
        if self.handshake != Handshake::NotStarted {
            return;
        }
        self.next_tick = Some(now + RESEND_TICK);
        if skips_handshake(&self.session_type) && self.kms.is_none() {
            self.handshake = Handshake::Skipped;
            self.events.push_back(AgentEvent::HandshakeSkipped);
            return;
        }
        let mut actions = Vec::new();
        // buildHandshakeRequestPayload: KMSEncryption first when it is on.
        if let Some(k) = &self.kms {
            actions.push(RequestedClientAction {
                action_type: action_type::KMS_ENCRYPTION.into(),
                action_parameters: serde_json::to_value(KmsEncryptionRequest {
                    kms_key_id: k.key_id.clone(),
                    challenge: k.random_challenge.clone(),
                })
                .unwrap_or_default(),
            });
        }
        actions.push(RequestedClientAction {
            action_type: action_type::SESSION_TYPE.into(),
            action_parameters: serde_json::to_value(SessionTypeRequest {
                session_type: self.session_type.clone(),
                properties: self.properties.clone(),
            })
            .unwrap_or_default(),
        });
        let req = HandshakeRequest { agent_version: self.agent_version.clone(), requested_client_actions: actions };
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
        // SendStreamDataMessage encrypts Output (and StdErr, ExitCode) once KMS is set up.
        if self.kms.as_ref().is_some_and(|k| k.cipher.is_some()) {
            let nonce = self.nonce();
            let sealed = self.kms.as_ref().and_then(|k| k.cipher.as_ref()).map(|c| c.seal(nonce, data));
            self.send_stream(now, PayloadType::OUTPUT, &sealed.unwrap_or_default());
            return;
        }
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
            Handshake::AwaitResponse { started } | Handshake::AwaitChallenge { started, .. } => {
                Some(started + HANDSHAKE_TIMEOUT)
            }
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
        if let Handshake::AwaitChallenge { started, .. } = self.handshake {
            if now >= started + HANDSHAKE_TIMEOUT {
                self.handshake = Handshake::Failed;
                self.events.push_back(AgentEvent::Failed("Timed out waiting for encryption challenge.".into()));
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
            PayloadType::ENC_CHALLENGE_RESPONSE => {
                self.handle_challenge_response(now, &msg.payload);
                true
            }
            pt => {
                if !self.is_established() {
                    return true; // "Handshake still in progress, ignore stream data message"
                }
                match pt {
                    PayloadType::OUTPUT => {
                        let input = match self.kms.as_ref().and_then(|k| k.cipher.as_ref()) {
                            None => msg.payload.clone(),
                            Some(c) => match c.open(&msg.payload) {
                                Some(plain) => plain,
                                None => {
                                    self.events.push_back(AgentEvent::Failed(
                                        "Error decrypting stream data message: message authentication failed".into(),
                                    ));
                                    return true;
                                }
                            },
                        };
                        self.events.push_back(AgentEvent::Input(input));
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
        let lpf = self.properties.get("type").and_then(|v| v.as_str()) == Some("LocalPortForwarding");
        let mode = agent_port_mode(&resp.client_version, lpf);
        if self.kms.is_some() {
            if let Err(e) = self.finalize_kms(&resp) {
                self.handshake = Handshake::Failed;
                self.events.push_back(AgentEvent::Failed(e));
                return;
            }
            // sendEncryptionChallenge: 64 random bytes under our key.
            let challenge = self.random_bytes(64);
            let nonce = self.nonce();
            let sealed = self.kms.as_ref().and_then(|k| k.cipher.as_ref()).map(|c| c.seal(nonce, &challenge));
            if let Some(k) = self.kms.as_mut() {
                k.challenge = challenge;
            }
            let request = EncryptionChallenge { challenge: B64.encode(sealed.unwrap_or_default()) };
            self.handshake = Handshake::AwaitChallenge { started, client_version: resp.client_version, mode };
            self.send_stream(
                now,
                PayloadType::ENC_CHALLENGE_REQUEST,
                &serde_json::to_vec(&request).unwrap_or_default(),
            );
            return;
        }
        self.complete(now, started, resp.client_version, mode, String::new());
    }

    /// finalizeKMSEncryption: the client's data key, decrypted by KMS with
    /// the session's context (and the random challenge if acknowledged).
    fn finalize_kms(&mut self, resp: &HandshakeResponse) -> Result<(), String> {
        let Some(k) = self.kms.as_mut() else { return Ok(()) };
        let action = resp
            .processed_client_actions
            .iter()
            .find(|a| a.action_type == action_type::KMS_ENCRYPTION)
            .ok_or("the client did not answer the KMSEncryption action")?;
        let result: KmsEncryptionResponse = action
            .action_result
            .clone()
            .and_then(|v| serde_json::from_value(v).ok())
            .ok_or("Unmarshalling of KMSEncryptionResponse failed")?;
        let blob = B64.decode(&result.kms_cipher_text_key).map_err(|e| format!("Unable to retrieve data key, {e}"))?;
        let mut context = BTreeMap::from([
            ("aws:ssm:SessionId".to_owned(), k.session_id.clone()),
            ("aws:ssm:TargetId".to_owned(), k.target.clone()),
        ]);
        if result.challenge_acknowledgement {
            context.insert("aws:ssm:RandomChallenge".to_owned(), k.random_challenge.clone());
        }
        let plain =
            k.kms.decrypt(&blob, &k.key_id, &context).map_err(|e| format!("Unable to retrieve data key, {e}"))?;
        k.cipher = Some(Cipher::new(&plain, End::Agent).ok_or("Unable to retrieve data key: not 64 bytes")?);
        Ok(())
    }

    /// handleEncryptionChallengeResponse: the challenge must come back under the client's key.
    fn handle_challenge_response(&mut self, now: Instant, payload: &[u8]) {
        let Handshake::AwaitChallenge { started, client_version, mode } = self.handshake.clone() else { return };
        let answer = serde_json::from_slice::<EncryptionChallenge>(payload)
            .ok()
            .and_then(|c| B64.decode(c.challenge).ok())
            .and_then(|sealed| self.kms.as_ref()?.cipher.as_ref()?.open(&sealed));
        if answer.is_none() || answer.as_deref() != self.kms.as_ref().map(|k| k.challenge.as_slice()) {
            self.handshake = Handshake::Failed;
            self.events.push_back(AgentEvent::Failed("Encryption challenge does not match!".into()));
            return;
        }
        self.complete(now, started, client_version, mode, "This session is encrypted using AWS KMS.".into());
    }

    fn complete(&mut self, now: Instant, started: Instant, client_version: String, mode: PortMode, message: String) {
        let complete = HandshakeComplete {
            handshake_time_to_complete: now.duration_since(started).as_nanos() as i64,
            customer_message: message,
        };
        self.handshake = Handshake::Complete;
        self.send_stream(now, PayloadType::HANDSHAKE_COMPLETE, &serde_json::to_vec(&complete).unwrap_or_default());
        self.events.push_back(AgentEvent::HandshakeDone { client_version, mode });
    }
}
