//! A Port session without I/O: the [`Session`] below, smux or basic mode
//! above it, and the local connections it carries, known by id.
//!
//! The caller owns the sockets (or queues) of the local connections. It tells
//! the machine what they send ([`Port::local_data`], [`Port::local_eof`]) while
//! [`Port::can_take_local`] says yes, and hands on what [`Port::poll_event`]
//! returns for them. A caller that cannot hand an event's bytes on (a slow
//! local reader) stops polling events until it can: the session then holds
//! what arrives, stops acknowledging it once its receive buffer is full, and
//! the agent waits. Nothing is dropped to make room.
//!
//! Basic mode (agents before mux support) carries one connection at a time:
//! a second one waits until the first has ended and the agent has been told
//! (the DisconnectToPort flag), then [`PortEvent::Started`] gives it the session.

use std::collections::{BTreeSet, VecDeque};
use std::time::Instant;

use bytes::BytesMut;
use tracing::{debug, info, warn};

use crate::codec::PayloadType;
use crate::payloads::Flag;
use crate::session::{
    CloseReason, Environment, Event, FrameError, HandshakeInfo, Session, SessionConfig, Stats, MAX_PAYLOAD,
};
use crate::smux::{Mux, MuxError, MuxEvent, Role, StreamId};
use crate::version::{client_port_mode, PortMode};

/// A local connection: its smux stream id in mux mode, a counter in basic mode.
pub type ConnId = u32;

/// What the handshake settled, once the session can carry connections.
#[derive(Debug, Clone)]
pub struct Ready {
    pub handshake: HandshakeInfo,
    pub mode: PortMode,
    pub customer_message: String,
}

/// What the caller must do for its local connections.
#[derive(Debug)]
pub enum PortEvent {
    /// The session carries connections from now on.
    Ready(Ready),
    /// Bytes for a local connection, in order.
    Data(ConnId, Vec<u8>),
    /// The remote side closed the connection: close the local side.
    Closed(ConnId),
    /// Basic mode: a connection that waited now has the session; start
    /// reading it.
    Started(ConnId),
}

/// How the session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortEnd {
    /// We asked to stop and the agent acknowledged.
    Terminated,
    /// The service closed the channel, with its reason.
    ChannelClosed(String),
    HandshakeFailed(String),
    /// The agent stopped acknowledging.
    AckTimeout,
    /// The agent's smux stream was malformed.
    Mux(MuxError),
}

enum Mode {
    Mux(Mux),
    Basic(Basic),
}

#[derive(Default)]
struct Basic {
    active: Option<ConnId>,
    waiting: VecDeque<ConnId>,
    out: BytesMut,
    disconnect_pending: bool,
}

/// A Port session's state: see the module documentation.
pub struct Port {
    session: Session,
    mode: Option<Mode>,
    /// Local connections the remote side has not closed.
    open: BTreeSet<ConnId>,
    next_basic_id: ConnId,
    mux_frame: usize,
    handshake: Option<HandshakeInfo>,
    newest_stream: Option<StreamId>,
    events: VecDeque<PortEvent>,
    end: Option<PortEnd>,
}

impl std::fmt::Debug for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Port")
            .field("session", &self.session)
            .field("open", &self.open)
            .field("end", &self.end)
            .finish_non_exhaustive()
    }
}

impl Port {
    /// `mux_frame` caps smux PSH frames, so streams interleave.
    pub fn new(config: SessionConfig, mux_frame: usize, env: Box<dyn Environment>) -> Self {
        Port {
            session: Session::new(config, env),
            mode: None,
            open: BTreeSet::new(),
            next_basic_id: 1,
            mux_frame,
            handshake: None,
            newest_stream: None,
            events: VecDeque::new(),
            end: None,
        }
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// See [`Session::take_data_key_request`].
    pub fn take_data_key_request(&mut self) -> Option<crate::session::kms::DataKeyRequest> {
        self.session.take_data_key_request()
    }

    /// See [`Session::provide_data_key`].
    pub fn provide_data_key(&mut self, key: Result<crate::session::kms::DataKey, String>) {
        self.session.provide_data_key(key);
    }

    pub fn stats(&self) -> Stats {
        self.session.stats()
    }

    /// The websocket is up (`true`) or gone (`false`); see [`Session::set_connected`].
    pub fn set_connected(&mut self, connected: bool, now: Instant) {
        self.session.set_connected(connected, now);
    }

    /// Ask the agent to end the session (TerminateSession flag).
    pub fn terminate(&mut self) {
        self.session.terminate();
    }

    /// Feeds one websocket message.
    pub fn handle_frame(&mut self, now: Instant, bytes: &[u8]) -> Result<(), FrameError> {
        self.session.handle_frame(now, bytes)
    }

    /// Next frame for the websocket. Moves pending local bytes into the
    /// session first, as far as its window allows.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        self.flush_output();
        self.session.poll_transmit(now)
    }

    /// When [`Port::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mux = match &self.mode {
            Some(Mode::Mux(m)) => m.poll_timeout(),
            _ => None,
        };
        match (self.session.poll_timeout(), mux) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.session.handle_timeout(now);
        if let Some(Mode::Mux(m)) = &mut self.mode {
            m.handle_timeout(now);
        }
    }

    /// Local bytes waiting to enter the session.
    pub fn pending_output(&self) -> usize {
        match &self.mode {
            Some(Mode::Mux(m)) => m.pending_output(),
            Some(Mode::Basic(b)) => b.out.len(),
            None => 0,
        }
    }

    /// Whether to take more from local connections now: the handshake is
    /// done, the session's window has room and fewer than `max_backlog` local
    /// bytes wait for it.
    pub fn can_take_local(&self, max_backlog: usize) -> bool {
        self.mode.is_some() && self.session.can_send() && self.pending_output() < max_backlog
    }

    /// A new local connection. `None` before the handshake. Otherwise its id
    /// and whether it has the session now (`false`: basic mode, behind
    /// another connection; [`PortEvent::Started`] comes later).
    pub fn open(&mut self) -> Option<(ConnId, bool)> {
        match self.mode.as_mut()? {
            Mode::Mux(m) => {
                let sid = m.open();
                self.newest_stream = Some(sid);
                self.open.insert(sid.0);
                Some((sid.0, true))
            }
            Mode::Basic(b) => {
                let id = self.next_basic_id;
                self.next_basic_id += 1;
                self.open.insert(id);
                if b.active.is_some() || b.disconnect_pending {
                    b.waiting.push_back(id);
                    Some((id, false))
                } else {
                    b.active = Some(id);
                    Some((id, true))
                }
            }
        }
    }

    /// Bytes a local connection sent.
    pub fn local_data(&mut self, id: ConnId, data: &[u8]) {
        if !self.open.contains(&id) {
            return;
        }
        match &mut self.mode {
            Some(Mode::Mux(m)) => {
                m.write(StreamId(id), data);
            }
            Some(Mode::Basic(b)) if b.active == Some(id) => b.out.extend_from_slice(data),
            _ => {}
        }
    }

    /// A local connection ended (or can no longer take what arrives for it).
    pub fn local_eof(&mut self, id: ConnId) {
        if !self.open.remove(&id) {
            return;
        }
        match &mut self.mode {
            Some(Mode::Mux(m)) => m.close(StreamId(id)),
            Some(Mode::Basic(b)) if b.active == Some(id) => {
                b.active = None;
                b.disconnect_pending = true;
            }
            Some(Mode::Basic(b)) => b.waiting.retain(|w| *w != id),
            None => {}
        }
    }

    /// Next thing the caller must do for its local connections. Taking a
    /// [`PortEvent::Data`] frees session receive buffer, so call again until
    /// `None` (or until the caller cannot hand more on).
    pub fn poll_event(&mut self) -> Option<PortEvent> {
        loop {
            if let Some(ev) = self.events.pop_front() {
                return Some(ev);
            }
            if self.end.is_some() {
                return None;
            }
            if let Some(Mode::Mux(m)) = &mut self.mode {
                if let Some(ev) = m.poll_event() {
                    self.handle_mux_event(ev);
                    continue;
                }
            }
            let ev = self.session.poll_event()?;
            self.handle_session_event(ev);
        }
    }

    /// How the session ended, once it has.
    pub fn end(&self) -> Option<&PortEnd> {
        self.end.as_ref()
    }

    fn flush_output(&mut self) {
        let Some(mode) = &mut self.mode else { return };
        match mode {
            Mode::Mux(m) => {
                while self.session.can_send() && m.pending_output() > 0 {
                    let chunk = m.take_output(MAX_PAYLOAD);
                    if self.session.send(&chunk).is_err() {
                        break;
                    }
                }
            }
            Mode::Basic(b) => {
                while self.session.can_send() && !b.out.is_empty() {
                    let n = b.out.len().min(MAX_PAYLOAD);
                    let chunk = b.out.split_to(n);
                    if self.session.send(&chunk).is_err() {
                        break;
                    }
                }
                if b.out.is_empty() && b.disconnect_pending && self.session.can_send() {
                    let flag = Flag::DisconnectToPort.to_bytes();
                    if self.session.send_typed(PayloadType::FLAG, &flag).is_ok() {
                        b.disconnect_pending = false;
                        if let Some(next) = b.waiting.pop_front() {
                            b.active = Some(next);
                            self.events.push_back(PortEvent::Started(next));
                        }
                    }
                }
            }
        }
    }

    fn handle_session_event(&mut self, ev: Event) {
        match ev {
            Event::Handshake(info) => {
                let lpf = info.properties.get("type").map(String::as_str) == Some("LocalPortForwarding");
                let mode = client_port_mode(&info.agent_version, lpf);
                info!(agent_version = %info.agent_version, ?mode, "handshake");
                self.mode = Some(match mode {
                    PortMode::Mux { keepalive } => {
                        let mut m = Mux::new(Role::Client, keepalive).with_max_frame(self.mux_frame);
                        m.handle_timeout(Instant::now());
                        Mode::Mux(m)
                    }
                    PortMode::Basic => Mode::Basic(Basic::default()),
                });
                self.handshake = Some(info);
            }
            Event::Established { customer_message } => {
                if let (Some(info), Some(mode)) = (self.handshake.clone(), &self.mode) {
                    let mode = match mode {
                        Mode::Mux(m) => PortMode::Mux { keepalive: m.poll_timeout().is_some() },
                        Mode::Basic(_) => PortMode::Basic,
                    };
                    self.events.push_back(PortEvent::Ready(Ready { handshake: info, mode, customer_message }));
                }
            }
            Event::Data(d) => match &mut self.mode {
                Some(Mode::Mux(m)) => {
                    if let Err(e) = m.handle_input(&d) {
                        self.end = Some(PortEnd::Mux(e));
                    }
                }
                Some(Mode::Basic(b)) => match b.active {
                    Some(id) => self.events.push_back(PortEvent::Data(id, d)),
                    None => debug!(bytes = d.len(), "data for no local connection (basic mode)"),
                },
                None => {}
            },
            Event::Flag(Flag::ConnectToPortError) => {
                let target = self.target_description();
                let stream = self.newest_stream.map(|s| format!(" (stream {s})")).unwrap_or_default();
                warn!("the instance could not connect to {target}{stream}: nothing listens there, or it is unreachable from the instance");
            }
            Event::Flag(f) => debug!(?f, "flag from agent"),
            Event::Closed(reason) => {
                self.end = Some(match reason {
                    CloseReason::Terminated => PortEnd::Terminated,
                    CloseReason::ChannelClosed { output } => PortEnd::ChannelClosed(output),
                    CloseReason::HandshakeFailed(e) => PortEnd::HandshakeFailed(e),
                    CloseReason::AckTimeout => PortEnd::AckTimeout,
                });
            }
        }
    }

    fn handle_mux_event(&mut self, ev: MuxEvent) {
        match ev {
            MuxEvent::Data(sid, d) if self.open.contains(&sid.0) => self.events.push_back(PortEvent::Data(sid.0, d)),
            MuxEvent::Data(..) => {}
            MuxEvent::Closed(sid) => {
                if self.open.remove(&sid.0) {
                    self.events.push_back(PortEvent::Closed(sid.0));
                }
            }
            MuxEvent::Opened(sid) => {
                // The agent never opens streams; refuse politely.
                if let Some(Mode::Mux(m)) = &mut self.mode {
                    m.close(sid);
                }
            }
        }
    }

    fn target_description(&self) -> String {
        let Some(info) = &self.handshake else { return "the target".into() };
        let port = info.properties.get("portNumber").cloned().unwrap_or_default();
        match info.properties.get("host") {
            Some(h) => format!("{h}:{port}"),
            None => format!("port {port} on the instance"),
        }
    }
}
