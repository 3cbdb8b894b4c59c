//! Runs a Port session: websocket <-> [`Session`] <-> smux (or basic mode) <->
//! local byte streams. One task owns all protocol state (quinn's
//! `ConnectionDriver` pattern); each local connection has a reader and a writer
//! task connected to it by bounded channels.
//!
//! Backpressure, end to end: a local reader is only heard while the session
//! window has room and the mux output backlog is short; a slow local writer
//! stops us taking events from the session, which then stops acking, which
//! makes the agent resend later. Nothing is dropped to make room.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::SplitStream;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tracing::{debug, info, warn};

use crate::payloads::Flag;
use crate::session::{CloseReason, Event, HandshakeInfo, Session, SessionConfig, Stats, MAX_PAYLOAD};
use crate::smux::{Mux, MuxEvent, Role, StreamId};
use crate::transport::{self, Endpoint, TransportError, WsStream, PING_INTERVAL};
use crate::version::{client_port_mode, PortMode};

pub(crate) mod util;

use util::{await_opt, changed, next_ws, on_ws_message, reconnect_loop, reserve, sleep_until, trace_frame, WsOutcome};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A local connection to carry over the session.
pub struct Conn {
    pub io: ConnIo,
    /// For logs: the peer address, say.
    pub label: String,
}

/// How the driver exchanges a connection's bytes.
pub enum ConnIo {
    /// A byte stream (a TCP connection, any pipe): a reader and a writer task
    /// each move its bytes to and from the driver.
    Stream { reader: Box<dyn AsyncRead + Send + Unpin>, writer: Box<dyn AsyncWrite + Send + Unpin> },
    /// Chunks in memory, from a producer in the same process (the tunnel's
    /// link): the driver takes them from `from_local` itself and hands what
    /// arrives to `to_local`, with no task or pipe in between. Either side
    /// dropping its end closes the connection.
    Queue { from_local: mpsc::Receiver<Bytes>, to_local: mpsc::Sender<Vec<u8>> },
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("label", &self.label).field("io", &self.io).finish()
    }
}

impl std::fmt::Debug for ConnIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConnIo::Stream { .. } => "Stream",
            ConnIo::Queue { .. } => "Queue",
        })
    }
}

/// The local producer's ends of a [`ConnIo::Queue`] connection.
#[derive(Debug)]
pub struct QueueEnds {
    /// Bytes to send through the session.
    pub to_session: mpsc::Sender<Bytes>,
    /// Bytes that arrived through the session, in order.
    pub from_session: mpsc::Receiver<Vec<u8>>,
}

/// Chunks waiting between a [`ConnIo::Queue`] producer and the driver: the
/// same bound the reader task of a stream has (about 64 KiB of 4 KiB writes).
const QUEUE_IN: usize = 16;
/// Chunks waiting for a local writer, stream or queue.
const QUEUE_OUT: usize = 256;

impl Conn {
    pub fn from_tcp(stream: tokio::net::TcpStream) -> Conn {
        let label = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        Conn { io: ConnIo::Stream { reader: Box::new(r), writer: Box::new(w) }, label }
    }

    /// A connection whose bytes the caller exchanges through the returned
    /// queues instead of a socket.
    pub fn queue(label: impl Into<String>) -> (Conn, QueueEnds) {
        let (to_session, from_local) = mpsc::channel(QUEUE_IN);
        let (to_local, from_session) = mpsc::channel(QUEUE_OUT);
        let conn = Conn { io: ConnIo::Queue { from_local, to_local }, label: label.into() };
        (conn, QueueEnds { to_session, from_session })
    }
}

/// How to get a new token for the same StreamUrl after the websocket drops.
pub trait Resume: Send + Sync {
    /// `Ok(None)`: the service says the session no longer exists.
    fn resume(&self) -> BoxFuture<'_, Result<Option<Endpoint>, String>>;
    /// The machine's network changed: drop whatever connections `resume` keeps.
    fn network_changed(&self) {}
}

#[derive(Debug, Clone)]
pub struct PortConfig {
    pub session: SessionConfig,
    /// smux PSH frame cap; small frames let streams interleave.
    pub mux_frame: usize,
    /// Local bytes queued in smux before we stop reading local sockets.
    pub max_backlog: usize,
    /// Read size for local sockets.
    pub read_chunk: usize,
    /// How long to keep trying to reconnect before giving up.
    pub reconnect_for: Duration,
    /// Sent data unanswered this long means the websocket is dead (a new network,
    /// a laptop that slept): drop it and resume the session on a new one.
    pub stall_reconnect: Duration,
    /// How long to wait for the TerminateSession flag's ack.
    pub terminate_wait: Duration,
    /// Where to publish the session's counters while it runs (for `status`).
    pub live: Option<Arc<std::sync::Mutex<Live>>>,
    /// Bumped when the machine's network changed or it woke from sleep: the
    /// websocket is checked at once (a Ping that must be answered within
    /// [`PROBE_WAIT`]), and a reconnect waiting out its backoff tries again now.
    pub network_changed: Option<watch::Receiver<u64>>,
}

/// After a network change, the websocket must answer within this long or it
/// is replaced (a socket bound to an address the machine no longer has never will).
pub const PROBE_WAIT: Duration = Duration::from_secs(3);

/// The running session's counters, refreshed about twice a second.
#[derive(Debug, Clone, Default)]
pub struct Live {
    pub stats: Stats,
    pub reconnects: u64,
    pub connected: bool,
    /// Since when sent data has waited for any ack (see [`Session::stalled_since`]).
    pub stalled_since: Option<std::time::Instant>,
}

impl Default for PortConfig {
    fn default() -> Self {
        PortConfig {
            session: SessionConfig::default(),
            mux_frame: 4096,
            max_backlog: 64 << 10,
            read_chunk: 16 << 10,
            reconnect_for: Duration::from_secs(600),
            stall_reconnect: Duration::from_secs(15),
            terminate_wait: Duration::from_secs(2),
            live: None,
            network_changed: None,
        }
    }
}

/// Sent once the handshake completes.
#[derive(Debug, Clone)]
pub struct Ready {
    pub handshake: HandshakeInfo,
    pub mode: PortMode,
    pub customer_message: String,
}

/// How a session that ran ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// We asked to stop; `acked` says whether the agent confirmed.
    Terminated { acked: bool },
    /// The service closed the channel, with its reason.
    ChannelClosed(String),
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub end: SessionEnd,
    pub stats: Stats,
    pub reconnects: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("the service rejected the session token (websocket close {code}: {reason})")]
    TokenRejected { code: u16, reason: String },
    #[error("handshake with the instance agent failed: {0}")]
    Handshake(String),
    #[error("the agent stopped acknowledging messages; the session is dead")]
    AckTimeout,
    #[error("the session no longer exists on the service (ResumeSession returned no token)")]
    SessionGone,
    #[error("could not reconnect within {0:?}; last error: {1}")]
    ReconnectFailed(Duration, String),
    #[error("smux protocol error from the agent: {0}")]
    Mux(#[from] crate::smux::MuxError),
}

type ConnId = u32;

/// How long to keep reading a websocket we can no longer write to.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

enum Cmd {
    Data(ConnId, Bytes),
    Eof(ConnId),
}

struct LocalConn {
    writer: mpsc::Sender<Vec<u8>>,
    /// The reader task of a [`ConnIo::Stream`].
    reader: Option<JoinHandle<()>>,
    label: String,
}

impl Drop for LocalConn {
    fn drop(&mut self) {
        // No half-close in either mode: dropping the writer channel lets the
        // writer flush and close; the reader stops here.
        if let Some(r) = &self.reader {
            r.abort();
        }
    }
}

enum Mode {
    Mux(Mux),
    Basic(Basic),
}

#[derive(Default)]
struct Basic {
    active: Option<ConnId>,
    waiting: VecDeque<Conn>,
    out: BytesMut,
    disconnect_pending: bool,
}

type WsSource = SplitStream<WsStream>;

/// Everything the driver loop mutates, apart from the futures it awaits.
struct Core {
    session: Session,
    mode: Option<Mode>,
    conns: HashMap<ConnId, LocalConn>,
    /// What [`ConnIo::Queue`] connections send, read by the driver itself.
    queued: Vec<(ConnId, mpsc::Receiver<Bytes>)>,
    next_basic_id: ConnId,
    cmd_tx: mpsc::Sender<Cmd>,
    read_chunk: usize,
    mux_frame: usize,
    /// Data for a local writer whose channel was full, with a sender to wait on.
    blocked: Option<(ConnId, Vec<u8>, mpsc::Sender<Vec<u8>>)>,
    ready: Option<oneshot::Sender<Ready>>,
    handshake: Option<HandshakeInfo>,
    newest_stream: Option<StreamId>,
    end: Option<Result<SessionEnd, PortError>>,
}

/// Drives a Port session until it ends.
///
/// `conns` delivers local connections to carry; `shutdown` resolving asks for a
/// clean end (TerminateSession flag, then return). The caller calls the
/// TerminateSession API afterwards.
pub async fn run(
    config: PortConfig,
    endpoint: Endpoint,
    tls: Option<Arc<rustls::ClientConfig>>,
    resume: Arc<dyn Resume>,
    mut conns: mpsc::Receiver<Conn>,
    ready: oneshot::Sender<Ready>,
    shutdown: BoxFuture<'static, ()>,
) -> Result<Summary, PortError> {
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Cmd>(64);
    let mut core = Core {
        session: Session::new(config.session.clone(), Box::new(crate::session::SystemEnvironment)),
        mode: None,
        conns: HashMap::new(),
        queued: Vec::new(),
        next_basic_id: 1,
        cmd_tx,
        read_chunk: config.read_chunk,
        mux_frame: config.mux_frame,
        blocked: None,
        ready: Some(ready),
        handshake: None,
        newest_stream: None,
        end: None,
    };

    let ws = transport::connect(&endpoint, tls.clone()).await?;
    let (mut ws_tx, ws_rx) = ws.split();
    let mut ws_rx = Some(ws_rx);
    let mut reconnect: Option<BoxFuture<'static, Result<WsStream, PortError>>> = None;
    let mut reconnects = 0u64;
    let mut first_connection = true;
    let mut received_any = false;
    core.session.set_connected(true, Instant::now().into_std());
    let mut next_ping = Instant::now();

    let mut shutdown = shutdown;
    let mut shutting_down = false;
    let mut terminate_deadline: Option<Instant> = None;
    let mut conns_open = true;
    let mut drain_until: Option<Instant> = None;
    let mut next_publish = Instant::now();
    let mut unpublished;
    let mut network_changed = config.network_changed.clone();
    let mut probe_deadline: Option<Instant> = None;

    loop {
        let now = Instant::now();
        core.pump();
        // Publish at most twice a second, and once more after the last change
        // (`unpublished` keeps a timer until then), so an idle tunnel's status
        // does not keep the state of its last busy moment.
        if let Some(live) = config.live.as_ref().filter(|_| now >= next_publish) {
            let mut l = live.lock().unwrap_or_else(|p| p.into_inner());
            l.stats = core.session.stats();
            l.reconnects = reconnects;
            l.connected = ws_rx.is_some() && reconnect.is_none();
            l.stalled_since = core.session.stalled_since();
            next_publish = now + Duration::from_millis(500);
            unpublished = false;
        } else {
            unpublished = config.live.is_some();
        }
        if ws_rx.is_some() && drain_until.is_none() {
            let mut ok = true;
            if now >= next_ping {
                ok &= ws_tx.feed(WsMessage::Ping("keepalive".into())).await.is_ok();
                next_ping = now + PING_INTERVAL;
            }
            while let Some(frame) = core.session.poll_transmit(now.into_std()) {
                if tracing::enabled!(tracing::Level::TRACE) {
                    trace_frame("out", &frame);
                }
                if ws_tx.feed(WsMessage::Binary(frame.into())).await.is_err() {
                    ok = false;
                    break;
                }
            }
            ok &= ws_tx.flush().await.is_ok();
            if !ok {
                // Stop writing but keep reading what the service already sent
                // until the socket ends: dropping it would lose those frames,
                // and the agent resends lost frames only one per 100 ms.
                core.session.set_connected(false, now.into_std());
                drain_until = Some(now + DRAIN_LIMIT);
                warn!("websocket write failed; reading what is left, then reconnecting");
            }
        }
        let stalled = core.session.stalled_for(now.into_std());
        if ws_rx.is_some() && drain_until.is_none() && stalled.is_some_and(|d| d >= config.stall_reconnect) {
            warn!("no answer for {:?}; reconnecting the websocket", config.stall_reconnect);
            ws_rx = None;
        }
        if probe_deadline.is_some_and(|t| now >= t) {
            warn!("the websocket did not answer within {PROBE_WAIT:?} of a network change; reconnecting");
            probe_deadline = None;
            if drain_until.is_none() {
                ws_rx = None;
            }
        }
        if drain_until.is_some_and(|t| now >= t) {
            drain_until = None;
            ws_rx = None;
        }
        if ws_rx.is_none() && reconnect.is_none() && core.end.is_none() {
            drain_until = None;
            core.session.set_connected(false, now.into_std());
            reconnect = Some(reconnect_loop(resume.clone(), tls.clone(), config.reconnect_for));
        }
        if let Some(end) = core.end.take() {
            let _ = ws_tx.close().await;
            return end.map(|end| Summary { end, stats: core.session.stats(), reconnects });
        }
        if terminate_deadline.is_some_and(|t| now >= t) {
            let _ = ws_tx.close().await;
            return Ok(Summary {
                end: SessionEnd::Terminated { acked: false },
                stats: core.session.stats(),
                reconnects,
            });
        }

        let timer = [
            core.session.poll_timeout().map(Instant::from_std),
            core.mux_timeout().map(Instant::from_std),
            terminate_deadline,
            ws_rx.is_some().then_some(next_ping),
            drain_until,
            stalled.filter(|_| ws_rx.is_some()).map(|d| now + config.stall_reconnect.saturating_sub(d)),
            unpublished.then_some(next_publish),
            probe_deadline,
        ]
        .into_iter()
        .flatten()
        .min();
        let accept_local = !shutting_down && core.can_take_local(config.max_backlog);
        let blocked_tx = core.blocked.as_ref().map(|(_, _, tx)| tx.clone());

        tokio::select! {
            msg = next_ws(&mut ws_rx) => {
                // Take whatever else has already arrived before writing, so the
                // acks for a burst of messages leave in one write.
                let mut msg = msg;
                // Any message, a Pong included, shows the websocket still works.
                probe_deadline = None;
                for taken in 1.. {
                    match on_ws_message(&mut core.session, msg, first_connection, &mut received_any) {
                        WsOutcome::Handled => {}
                        WsOutcome::Lost => {
                            ws_rx = None;
                            break;
                        }
                        WsOutcome::Rejected(e) => return Err(e),
                    }
                    if taken == WS_BURST {
                        break;
                    }
                    match ws_rx.as_mut().and_then(|r| r.next().now_or_never()) {
                        Some(next) => msg = next,
                        None => break,
                    }
                }
            }
            res = await_opt(&mut reconnect) => {
                reconnect = None;
                let ws = res?;
                reconnects += 1;
                first_connection = false;
                drain_until = None;
                probe_deadline = None;
                info!(reconnects, "websocket reconnected; resending unacknowledged messages");
                let (tx, rx) = ws.split();
                ws_tx = tx;
                ws_rx = Some(rx);
                next_ping = Instant::now();
                core.session.set_connected(true, Instant::now().into_std());
            }
            alive = changed(&mut network_changed) => {
                if !alive {
                    network_changed = None;
                    continue;
                }
                resume.network_changed();
                if reconnect.is_some() {
                    info!("the network changed; trying to reconnect now");
                    reconnect = Some(reconnect_loop(resume.clone(), tls.clone(), config.reconnect_for));
                } else if ws_rx.is_some() && drain_until.is_none() && probe_deadline.is_none() {
                    info!("the network changed; checking that the websocket still answers");
                    probe_deadline = Some(Instant::now() + PROBE_WAIT);
                    if ws_tx.send(WsMessage::Ping("probe".into())).await.is_err() {
                        ws_rx = None;
                    }
                }
            }
            conn = conns.recv(), if conns_open && accept_local => {
                match conn {
                    Some(c) => core.add_conn(c),
                    None => conns_open = false,
                }
            }
            cmd = cmd_rx.recv(), if accept_local => {
                if let Some(cmd) = cmd {
                    core.handle_cmd(cmd);
                }
            }
            cmd = next_queued(&mut core.queued), if accept_local && !core.queued.is_empty() => {
                core.handle_cmd(cmd);
            }
            permit = reserve(blocked_tx) => {
                if let (Ok(permit), Some((_, data, _))) = (permit, core.blocked.take()) {
                    permit.send(data);
                } else {
                    // The writer went away; its data has nowhere to go.
                    core.blocked = None;
                }
            }
            _ = sleep_until(timer) => {
                let now = Instant::now();
                core.session.handle_timeout(now.into_std());
                if let Some(Mode::Mux(m)) = &mut core.mode {
                    m.handle_timeout(now.into_std());
                }
            }
            _ = &mut shutdown, if !shutting_down => {
                shutting_down = true;
                info!("ending the session");
                core.session.terminate();
                terminate_deadline = Some(Instant::now() + config.terminate_wait);
            }
        }
    }
}

/// The next chunk (or end) of any [`ConnIo::Queue`] connection, taking them in
/// turn so one busy producer cannot starve the others.
async fn next_queued(queued: &mut Vec<(ConnId, mpsc::Receiver<Bytes>)>) -> Cmd {
    std::future::poll_fn(|cx| {
        let n = queued.len();
        for _ in 0..n {
            let (id, rx) = &mut queued[0];
            let id = *id;
            let polled = rx.poll_recv(cx);
            queued.rotate_left(1);
            match polled {
                std::task::Poll::Ready(Some(b)) => return std::task::Poll::Ready(Cmd::Data(id, b)),
                std::task::Poll::Ready(None) => {
                    queued.retain(|(i, _)| *i != id);
                    return std::task::Poll::Ready(Cmd::Eof(id));
                }
                std::task::Poll::Pending => {}
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Most websocket messages handled in one turn of the driver loop.
const WS_BURST: usize = 64;

impl Core {
    fn mux_timeout(&self) -> Option<std::time::Instant> {
        match &self.mode {
            Some(Mode::Mux(m)) => m.poll_timeout(),
            _ => None,
        }
    }

    fn pending_output(&self) -> usize {
        match &self.mode {
            Some(Mode::Mux(m)) => m.pending_output(),
            Some(Mode::Basic(b)) => b.out.len(),
            None => 0,
        }
    }

    /// Whether to listen to local sockets now.
    fn can_take_local(&self, max_backlog: usize) -> bool {
        self.mode.is_some() && self.session.can_send() && self.pending_output() < max_backlog
    }

    /// Moves events and bytes between the session, the mux and local writers.
    fn pump(&mut self) {
        loop {
            if self.blocked.is_some() || self.end.is_some() {
                break;
            }
            if let Some(Mode::Mux(m)) = &mut self.mode {
                if let Some(ev) = m.poll_event() {
                    self.handle_mux_event(ev);
                    continue;
                }
            }
            let Some(ev) = self.session.poll_event() else { break };
            self.handle_session_event(ev);
        }
        self.flush_output();
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
                    if self.session.send_typed(crate::codec::PayloadType::FLAG, &flag).is_ok() {
                        b.disconnect_pending = false;
                        if let Some(next) = b.waiting.pop_front() {
                            self.start_basic_conn(next);
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
                        m.handle_timeout(std::time::Instant::now());
                        Mode::Mux(m)
                    }
                    PortMode::Basic => Mode::Basic(Basic::default()),
                });
                self.handshake = Some(info);
            }
            Event::Established { customer_message } => {
                if let (Some(tx), Some(info), Some(mode)) = (self.ready.take(), self.handshake.clone(), &self.mode) {
                    let mode = match mode {
                        Mode::Mux(m) => PortMode::Mux { keepalive: m.poll_timeout().is_some() },
                        Mode::Basic(_) => PortMode::Basic,
                    };
                    let _ = tx.send(Ready { handshake: info, mode, customer_message });
                }
            }
            Event::Data(d) => match &mut self.mode {
                Some(Mode::Mux(m)) => {
                    if let Err(e) = m.handle_input(&d) {
                        self.end = Some(Err(PortError::Mux(e)));
                    }
                }
                Some(Mode::Basic(b)) => {
                    if let Some(id) = b.active {
                        self.deliver(id, d);
                    } else {
                        debug!(bytes = d.len(), "data for no local connection (basic mode)");
                    }
                }
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
                    CloseReason::Terminated => Ok(SessionEnd::Terminated { acked: true }),
                    CloseReason::ChannelClosed { output } => Ok(SessionEnd::ChannelClosed(output)),
                    CloseReason::HandshakeFailed(e) => Err(PortError::Handshake(e)),
                    CloseReason::AckTimeout => Err(PortError::AckTimeout),
                });
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

    fn handle_mux_event(&mut self, ev: MuxEvent) {
        match ev {
            MuxEvent::Data(sid, d) => self.deliver(sid.0, d),
            MuxEvent::Closed(sid) => {
                if let Some(c) = self.remove_conn(sid.0) {
                    debug!(stream = sid.0, conn = %c.label, "closed by the remote side");
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

    fn deliver(&mut self, id: ConnId, data: Vec<u8>) {
        let Some(c) = self.conns.get(&id) else { return };
        match c.writer.try_send(data) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(data)) => {
                self.blocked = Some((id, data, c.writer.clone()));
            }
            // The local side is gone: end the connection as its writer task would.
            Err(mpsc::error::TrySendError::Closed(_)) => self.handle_cmd(Cmd::Eof(id)),
        }
    }

    fn add_conn(&mut self, conn: Conn) {
        match &mut self.mode {
            Some(Mode::Mux(_)) => self.start_mux_conn(conn),
            Some(Mode::Basic(b)) => {
                if b.active.is_some() || b.disconnect_pending {
                    debug!(conn = %conn.label, "basic mode carries one connection at a time; queued");
                    b.waiting.push_back(conn);
                } else {
                    self.start_basic_conn(conn);
                }
            }
            None => {}
        }
    }

    fn start_mux_conn(&mut self, conn: Conn) {
        let Some(Mode::Mux(m)) = &mut self.mode else { return };
        let sid = m.open();
        self.newest_stream = Some(sid);
        debug!(stream = sid.0, conn = %conn.label, "new connection");
        self.spawn_conn(sid.0, conn);
    }

    fn start_basic_conn(&mut self, conn: Conn) {
        let id = self.next_basic_id;
        self.next_basic_id += 1;
        if let Some(Mode::Basic(b)) = &mut self.mode {
            b.active = Some(id);
        }
        debug!(conn = %conn.label, "new connection (basic mode)");
        self.spawn_conn(id, conn);
    }

    fn spawn_conn(&mut self, id: ConnId, conn: Conn) {
        let Conn { io, label } = conn;
        let (mut reader, mut writer) = match io {
            ConnIo::Stream { reader, writer } => (reader, writer),
            ConnIo::Queue { from_local, to_local } => {
                self.queued.push((id, from_local));
                self.conns.insert(id, LocalConn { writer: to_local, reader: None, label });
                return;
            }
        };
        let (wtx, mut wrx) = mpsc::channel::<Vec<u8>>(QUEUE_OUT);
        let cmd = self.cmd_tx.clone();
        let chunk = self.read_chunk;
        let reader_task = tokio::spawn(async move {
            let mut buf = vec![0u8; chunk];
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = cmd.send(Cmd::Eof(id)).await;
                        return;
                    }
                    Ok(n) => {
                        if cmd.send(Cmd::Data(id, Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let cmd = self.cmd_tx.clone();
        tokio::spawn(async move {
            while let Some(d) = wrx.recv().await {
                if writer.write_all(&d).await.is_err() {
                    let _ = cmd.send(Cmd::Eof(id)).await;
                    return;
                }
            }
            let _ = writer.shutdown().await;
        });
        self.conns.insert(id, LocalConn { writer: wtx, reader: Some(reader_task), label });
    }

    /// Forgets a local connection (its streams or queues close with it).
    fn remove_conn(&mut self, id: ConnId) -> Option<LocalConn> {
        self.queued.retain(|(i, _)| *i != id);
        self.conns.remove(&id)
    }

    fn handle_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Data(id, d) => {
                if !self.conns.contains_key(&id) {
                    return;
                }
                match &mut self.mode {
                    Some(Mode::Mux(m)) => {
                        m.write(StreamId(id), &d);
                    }
                    Some(Mode::Basic(b)) => b.out.extend_from_slice(&d),
                    None => {}
                }
            }
            Cmd::Eof(id) => {
                let Some(c) = self.remove_conn(id) else { return };
                debug!(conn = %c.label, "local connection closed");
                match &mut self.mode {
                    Some(Mode::Mux(m)) => m.close(StreamId(id)),
                    Some(Mode::Basic(b)) if b.active == Some(id) => {
                        b.active = None;
                        b.disconnect_pending = true;
                    }
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(cmd: Cmd) -> (ConnId, Option<Bytes>) {
        match cmd {
            Cmd::Data(id, b) => (id, Some(b)),
            Cmd::Eof(id) => (id, None),
        }
    }

    #[tokio::test]
    async fn queued_connections_take_turns_and_end_when_their_producer_goes() {
        let (a, mut a_ends) = Conn::queue("a");
        let (b, b_ends) = Conn::queue("b");
        let mut queued = Vec::new();
        for (id, conn) in [(1, a), (2, b)] {
            let ConnIo::Queue { from_local, .. } = conn.io else { panic!("a queue connection") };
            queued.push((id, from_local));
        }
        for i in 0..3u8 {
            a_ends.to_session.send(Bytes::from(vec![i])).await.expect("the driver side is open");
        }
        b_ends.to_session.send(Bytes::from_static(b"b")).await.expect("the driver side is open");
        // a has three chunks waiting, b one: b still gets its turn second.
        assert_eq!(data(next_queued(&mut queued).await), (1, Some(Bytes::from_static(&[0]))));
        assert_eq!(data(next_queued(&mut queued).await), (2, Some(Bytes::from_static(b"b"))));
        assert_eq!(data(next_queued(&mut queued).await), (1, Some(Bytes::from_static(&[1]))));
        drop(b_ends);
        assert_eq!(data(next_queued(&mut queued).await), (2, None), "b's producer is gone");
        assert_eq!(queued.len(), 1);
        assert_eq!(data(next_queued(&mut queued).await), (1, Some(Bytes::from_static(&[2]))));
        // Nothing waiting: pending, not an end.
        let idle = tokio::time::timeout(Duration::from_millis(20), next_queued(&mut queued)).await;
        assert!(idle.is_err());
        a_ends.to_session.send(Bytes::from_static(b"z")).await.expect("the driver side is open");
        assert_eq!(data(next_queued(&mut queued).await), (1, Some(Bytes::from_static(b"z"))));
        a_ends.from_session.close();
    }
}
