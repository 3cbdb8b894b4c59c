//! Runs a Port session: websocket <-> [`Port`] (the session, smux or basic
//! mode) <-> local connections. One task owns all protocol state (quinn's
//! `ConnectionDriver` pattern); a socket connection has a reader and a writer
//! task connected to it by bounded channels, a queue connection (the tunnel's
//! link) is read and written by this task itself.
//!
//! Backpressure, end to end: a local reader is only heard while the session
//! window has room and the mux output backlog is short; a slow local writer
//! stops us taking events from the session, which then stops acking, which
//! makes the agent resend later. Nothing is dropped to make room.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::SplitSink;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tracing::{info, warn};

use crate::proto::port::{Port, PortEnd};
use crate::session::{SessionConfig, Stats, SystemEnvironment};
use crate::transport::{self, Dialer, Endpoint, WsStream, PING_INTERVAL};

use super::local::{next_queued, Cmd, Locals};
pub use super::local::{Conn, ConnIo, QueueEnds};
use super::ws::{
    await_opt, changed, next_ws, on_ws_message, reconnect_loop, reserve, sleep_until, trace_frame, WsOutcome, WsSource,
};
pub use super::{BoxFuture, PortError, Resume, SessionEnd, Summary};
pub use crate::proto::port::{ConnId, Ready};

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

/// How long to keep reading a websocket we can no longer write to.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// Most websocket messages handled in one turn of the driver loop.
const WS_BURST: usize = 64;

type WsSink = SplitSink<WsStream, WsMessage>;

/// The websocket side of the loop: the socket in use, or the redial under way.
struct Socket {
    tx: WsSink,
    rx: Option<WsSource>,
    reconnect: Option<BoxFuture<'static, Result<WsStream, PortError>>>,
    reconnects: u64,
    first_connection: bool,
    received_any: bool,
    next_ping: Instant,
    /// Writing failed: read what the service already sent until then.
    drain_until: Option<Instant>,
    /// After a network change: the socket must answer by then.
    probe_deadline: Option<Instant>,
}

impl Socket {
    fn new(ws: WsStream) -> Self {
        let (tx, rx) = ws.split();
        Socket {
            tx,
            rx: Some(rx),
            reconnect: None,
            reconnects: 0,
            first_connection: true,
            received_any: false,
            next_ping: Instant::now(),
            drain_until: None,
            probe_deadline: None,
        }
    }

    fn usable(&self) -> bool {
        self.rx.is_some() && self.drain_until.is_none()
    }

    /// Pings when due and writes every frame the machine has.
    async fn transmit(&mut self, port: &mut Port, now: Instant) {
        if !self.usable() {
            return;
        }
        let mut ok = true;
        if now >= self.next_ping {
            ok &= self.tx.feed(WsMessage::Ping("keepalive".into())).await.is_ok();
            self.next_ping = now + PING_INTERVAL;
        }
        while let Some(frame) = port.poll_transmit(now.into_std()) {
            if tracing::enabled!(tracing::Level::TRACE) {
                trace_frame("out", &frame);
            }
            if self.tx.feed(WsMessage::Binary(frame.into())).await.is_err() {
                ok = false;
                break;
            }
        }
        ok &= self.tx.flush().await.is_ok();
        if !ok {
            // Stop writing but keep reading what the service already sent
            // until the socket ends: dropping it would lose those frames,
            // and the agent resends lost frames only one per 100 ms.
            port.set_connected(false, now.into_std());
            self.drain_until = Some(now + DRAIN_LIMIT);
            warn!("websocket write failed; reading what is left, then reconnecting");
        }
    }

    /// Gives up on a socket that stopped answering, and starts redialling
    /// once there is none (unless the session has ended).
    fn check(&mut self, port: &mut Port, now: Instant, config: &PortConfig, redial: impl FnOnce() -> Redial) {
        let stalled = port.session().stalled_for(now.into_std());
        if self.usable() && stalled.is_some_and(|d| d >= config.stall_reconnect) {
            warn!("no answer for {:?}; reconnecting the websocket", config.stall_reconnect);
            self.rx = None;
        }
        if self.probe_deadline.is_some_and(|t| now >= t) {
            warn!("the websocket did not answer within {PROBE_WAIT:?} of a network change; reconnecting");
            self.probe_deadline = None;
            if self.drain_until.is_none() {
                self.rx = None;
            }
        }
        if self.drain_until.is_some_and(|t| now >= t) {
            self.drain_until = None;
            self.rx = None;
        }
        if self.rx.is_none() && self.reconnect.is_none() && port.end().is_none() {
            self.drain_until = None;
            port.set_connected(false, now.into_std());
            self.reconnect = Some(redial());
        }
    }

    /// When the socket side next needs the loop.
    fn deadline(&self, port: &Port, now: Instant, config: &PortConfig) -> Option<Instant> {
        let stalled = port.session().stalled_for(now.into_std());
        [
            self.rx.is_some().then_some(self.next_ping),
            self.drain_until,
            stalled.filter(|_| self.rx.is_some()).map(|d| now + config.stall_reconnect.saturating_sub(d)),
            self.probe_deadline,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Feeds `msg` and whatever else has already arrived (up to [`WS_BURST`])
    /// to the machine before anything is written, so the acks for a burst
    /// leave in one write.
    fn receive(&mut self, port: &mut Port, mut msg: WsItem) -> Result<(), PortError> {
        // Any message, a Pong included, shows the websocket still works.
        self.probe_deadline = None;
        for taken in 1.. {
            let feed = &mut |now, b: &[u8]| port.handle_frame(now, b);
            match on_ws_message(feed, msg, self.first_connection, &mut self.received_any) {
                WsOutcome::Handled => {}
                WsOutcome::Lost => {
                    self.rx = None;
                    break;
                }
                WsOutcome::Rejected(e) => return Err(e),
            }
            if taken == WS_BURST {
                break;
            }
            match self.rx.as_mut().and_then(|r| r.next().now_or_never()) {
                Some(next) => msg = next,
                None => break,
            }
        }
        Ok(())
    }

    fn reconnected(&mut self, port: &mut Port, ws: WsStream) {
        self.reconnect = None;
        self.reconnects += 1;
        self.first_connection = false;
        self.drain_until = None;
        self.probe_deadline = None;
        info!(reconnects = self.reconnects, "websocket reconnected; resending unacknowledged messages");
        let (tx, rx) = ws.split();
        self.tx = tx;
        self.rx = Some(rx);
        self.next_ping = Instant::now();
        port.set_connected(true, Instant::now().into_std());
    }

    /// The machine's network changed: redial now if redialling, else make
    /// the socket prove it still works.
    async fn network_changed(&mut self, redial: impl FnOnce() -> Redial) {
        if self.reconnect.is_some() {
            info!("the network changed; trying to reconnect now");
            self.reconnect = Some(redial());
        } else if self.usable() && self.probe_deadline.is_none() {
            info!("the network changed; checking that the websocket still answers");
            self.probe_deadline = Some(Instant::now() + PROBE_WAIT);
            if self.tx.send(WsMessage::Ping("probe".into())).await.is_err() {
                self.rx = None;
            }
        }
    }
}

type WsItem = Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>>;
type Redial = BoxFuture<'static, Result<WsStream, PortError>>;

/// Publishes the counters for `status` at most twice a second, and once more
/// after the last change, so an idle tunnel's status does not keep the state
/// of its last busy moment.
struct Publisher {
    live: Option<Arc<std::sync::Mutex<Live>>>,
    next: Instant,
    /// Something changed since the last publication.
    pending: bool,
}

impl Publisher {
    fn publish(&mut self, port: &Port, socket: &Socket, now: Instant) {
        let Some(live) = self.live.as_ref() else { return };
        if now < self.next {
            self.pending = true;
            return;
        }
        let mut l = live.lock().unwrap_or_else(|p| p.into_inner());
        l.stats = port.stats();
        l.reconnects = socket.reconnects;
        l.connected = socket.rx.is_some() && socket.reconnect.is_none();
        l.stalled_since = port.session().stalled_since();
        self.next = now + Duration::from_millis(500);
        self.pending = false;
    }

    fn deadline(&self) -> Option<Instant> {
        self.pending.then_some(self.next)
    }
}

fn ended(end: &PortEnd) -> Result<SessionEnd, PortError> {
    match end.clone() {
        PortEnd::Terminated => Ok(SessionEnd::Terminated { acked: true }),
        PortEnd::ChannelClosed(output) => Ok(SessionEnd::ChannelClosed(output)),
        PortEnd::HandshakeFailed(e) => Err(PortError::Handshake(e)),
        PortEnd::AckTimeout => Err(PortError::AckTimeout),
        PortEnd::Mux(e) => Err(PortError::Mux(e)),
    }
}

/// Drives a Port session until it ends.
///
/// `conns` delivers local connections to carry; `shutdown` resolving asks for a
/// clean end (TerminateSession flag, then return). The caller calls the
/// TerminateSession API afterwards.
pub async fn run(
    config: PortConfig,
    endpoint: Endpoint,
    dialer: Dialer,
    resume: Arc<dyn Resume>,
    mut conns: mpsc::Receiver<Conn>,
    ready: oneshot::Sender<Ready>,
    mut shutdown: BoxFuture<'static, ()>,
) -> Result<Summary, PortError> {
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Cmd>(64);
    let mut port = Port::new(config.session.clone(), config.mux_frame, Box::new(SystemEnvironment));
    let mut locals = Locals::new(cmd_tx, config.read_chunk, ready);
    let mut socket = Socket::new(transport::connect(&endpoint, &dialer).await?);
    port.set_connected(true, Instant::now().into_std());
    let mut publisher = Publisher { live: config.live.clone(), next: Instant::now(), pending: false };
    let redial = || reconnect_loop(resume.clone(), dialer.clone(), config.reconnect_for);
    let mut terminate_deadline: Option<Instant> = None;
    let mut conns_open = true;
    let mut network_changed = config.network_changed.clone();
    let mut kms = None;

    loop {
        let now = Instant::now();
        locals.pump(&mut port);
        publisher.publish(&port, &socket, now);
        socket.transmit(&mut port, now).await;
        socket.check(&mut port, now, &config, redial);
        let result = match port.end() {
            Some(end) => Some(ended(end)),
            None if terminate_deadline.is_some_and(|t| now >= t) => Some(Ok(SessionEnd::Terminated { acked: false })),
            None => None,
        };
        if let Some(result) = result {
            let _ = socket.tx.close().await;
            return result.map(|end| Summary { end, stats: port.stats(), reconnects: socket.reconnects });
        }

        let timer = [
            port.poll_timeout().map(Instant::from_std),
            terminate_deadline,
            socket.deadline(&port, now, &config),
            publisher.deadline(),
        ]
        .into_iter()
        .flatten()
        .min();
        if kms.is_none() {
            kms = port.take_data_key_request().map(|r| super::data_key_call(&resume, r));
        }
        let accept_local = terminate_deadline.is_none() && port.can_take_local(config.max_backlog);
        let blocked_tx = locals.blocked_sender();

        tokio::select! {
            msg = next_ws(&mut socket.rx) => socket.receive(&mut port, msg)?,
            res = await_opt(&mut socket.reconnect) => socket.reconnected(&mut port, res?),
            key = await_opt(&mut kms) => {
                kms = None;
                port.provide_data_key(key);
            }
            alive = changed(&mut network_changed) => {
                if !alive {
                    network_changed = None;
                    continue;
                }
                resume.network_changed();
                socket.network_changed(redial).await;
            }
            conn = conns.recv(), if conns_open && accept_local => match conn {
                Some(c) => locals.add(&mut port, c),
                None => conns_open = false,
            },
            Some(cmd) = cmd_rx.recv(), if accept_local => locals.handle_cmd(&mut port, cmd),
            cmd = next_queued(&mut locals.queued), if accept_local && !locals.queued.is_empty() => {
                locals.take_queued(&mut port, cmd);
            }
            permit = reserve(blocked_tx) => locals.unblock(permit),
            _ = sleep_until(timer) => port.handle_timeout(Instant::now().into_std()),
            _ = &mut shutdown, if terminate_deadline.is_none() => {
                info!("ending the session");
                port.terminate();
                terminate_deadline = Some(Instant::now() + config.terminate_wait);
            }
        }
    }
}
