//! Runs a shell session (the default shell document, `Standard_Stream`, or
//! AWS-StartInteractiveCommand, `InteractiveCommands`): websocket <->
//! [`Session`] <-> the caller's byte channels.
//!
//! The instance agent runs the shell in a pseudo terminal
//! (`agent/session/shell/shell_unix.go`): what we send is typed at it
//! (payload type Output), what the terminal prints comes back, in reads of
//! at most 1024 bytes. Like the session-manager-plugin we tell it a terminal
//! size first (payload type Size, `{"cols":..,"rows":..}`). A default shell
//! session has no handshake (amazon-ssm-agent's Standard_Stream and
//! InteractiveCommands plugins skip it unless KMS is on): it starts with the
//! prompt at sequence number 0, and so do we. The session ends
//! when the shell exits (the service closes the channel) or when the caller
//! drops its input sender (we send TerminateSession).

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tracing::{debug, info};

use super::ws::{await_opt, next_ws, on_ws_message, reconnect_loop, sleep_until, WsOutcome};
use crate::codec::PayloadType;
use crate::port::{BoxFuture, PortError, Resume, SessionEnd, Summary};
use crate::session::{CloseReason, Event, HandshakeInfo, Session, SessionConfig, MAX_PAYLOAD, SHELL_SESSIONS};
use crate::transport::{self, Dialer, Endpoint, WsStream, PING_INTERVAL};

/// The terminal size announced to the agent's pseudo terminal.
const COLUMNS: u16 = 200;
const ROWS: u16 = 50;
/// How long a TerminateSession flag may wait for its ack.
const TERMINATE_WAIT: Duration = Duration::from_secs(2);

/// What the caller holds while the driver runs.
#[derive(Debug)]
pub struct ShellIo {
    /// Bytes to type at the shell; dropping it ends the session.
    pub input: mpsc::Sender<Vec<u8>>,
    /// What the terminal prints, in order; ends with the session.
    pub output: mpsc::UnboundedReceiver<Vec<u8>>,
}

/// The driver's ends of [`ShellIo`].
#[derive(Debug)]
pub struct ShellPipes {
    input: mpsc::Receiver<Vec<u8>>,
    output: mpsc::UnboundedSender<Vec<u8>>,
}

/// A connected pair: give [`ShellIo`] to the caller, [`ShellPipes`] to [`run`].
pub fn pipes() -> (ShellIo, ShellPipes) {
    let (in_tx, in_rx) = mpsc::channel(16);
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    (ShellIo { input: in_tx, output: out_rx }, ShellPipes { input: in_rx, output: out_tx })
}

/// A [`SessionConfig`] for shell sessions.
pub fn session_config() -> SessionConfig {
    SessionConfig { session_types: SHELL_SESSIONS, start_on_output: true, ..SessionConfig::default() }
}

/// Hands the session's events on: output to the caller, the handshake to
/// `ready` once data may flow (after sending the terminal size). Returns how
/// the session ended, if it has.
fn take_events(
    session: &mut Session,
    output: &mpsc::UnboundedSender<Vec<u8>>,
    ready: &mut Option<oneshot::Sender<Option<HandshakeInfo>>>,
    handshake: &mut Option<HandshakeInfo>,
) -> Option<Result<SessionEnd, PortError>> {
    while let Some(ev) = session.poll_event() {
        match ev {
            Event::Handshake(info) => *handshake = Some(info),
            Event::Established { customer_message } => {
                if !customer_message.is_empty() {
                    info!("{customer_message}");
                }
                let size = format!("{{\"cols\":{COLUMNS},\"rows\":{ROWS}}}");
                let _ = session.send_typed(PayloadType::SIZE, size.as_bytes());
                if let Some(tx) = ready.take() {
                    let _ = tx.send(handshake.clone());
                }
            }
            Event::Data(d) => {
                let _ = output.send(d);
            }
            Event::Flag(f) => debug!(?f, "flag from the agent"),
            Event::Closed(reason) => {
                return Some(match reason {
                    CloseReason::ChannelClosed { output } => Ok(SessionEnd::ChannelClosed(output)),
                    CloseReason::Terminated => Ok(SessionEnd::Terminated { acked: true }),
                    CloseReason::HandshakeFailed(e) => Err(PortError::Handshake(e)),
                    CloseReason::AckTimeout => Err(PortError::AckTimeout),
                });
            }
        }
    }
    None
}

/// Pings when due and writes every frame the session has; `false` when the
/// websocket failed.
async fn transmit(ws_tx: &mut WsSink, session: &mut Session, now: Instant, next_ping: &mut Instant) -> bool {
    let mut ok = true;
    if now >= *next_ping {
        ok &= ws_tx.feed(WsMessage::Ping("keepalive".into())).await.is_ok();
        *next_ping = now + PING_INTERVAL;
    }
    while let Some(frame) = session.poll_transmit(now.into_std()) {
        if ws_tx.feed(WsMessage::Binary(frame.into())).await.is_err() {
            ok = false;
            break;
        }
    }
    ok && ws_tx.flush().await.is_ok()
}

type WsSink = futures_util::stream::SplitSink<WsStream, WsMessage>;

/// Drives a shell session until the shell exits or the caller hangs up.
/// `ready` gets the handshake once data may flow (`None`: the agent started
/// the shell without one). A dropped websocket is resumed for up to
/// `reconnect_for`.
pub async fn run(
    config: SessionConfig,
    endpoint: Endpoint,
    dialer: Dialer,
    resume: Arc<dyn Resume>,
    reconnect_for: Duration,
    pipes: ShellPipes,
    ready: oneshot::Sender<Option<HandshakeInfo>>,
) -> Result<Summary, PortError> {
    let ShellPipes { mut input, output } = pipes;
    let mut session = Session::new(config, Box::new(crate::session::SystemEnvironment));
    let ws = transport::connect(&endpoint, &dialer).await?;
    let (mut ws_tx, ws_rx) = ws.split();
    let mut ws_rx = Some(ws_rx);
    let mut reconnect: Option<BoxFuture<'static, Result<WsStream, PortError>>> = None;
    let mut reconnects = 0u64;
    let mut received_any = false;
    session.set_connected(true, std::time::Instant::now());
    let mut next_ping = Instant::now() + PING_INTERVAL;
    let mut ready = Some(ready);
    let mut handshake: Option<HandshakeInfo> = None;
    let mut pending = BytesMut::new();
    let mut input_open = true;
    let mut terminate_deadline: Option<Instant> = None;
    let mut kms = None;

    loop {
        let now = Instant::now();
        // Typed input, a message at a time, as the window allows.
        while !pending.is_empty() && session.can_send() {
            let n = pending.len().min(MAX_PAYLOAD);
            let chunk = pending.split_to(n);
            if session.send(&chunk).is_err() {
                break;
            }
        }
        if !input_open && pending.is_empty() && terminate_deadline.is_none() {
            session.terminate();
            terminate_deadline = Some(now + TERMINATE_WAIT);
        }
        if let Some(end) = take_events(&mut session, &output, &mut ready, &mut handshake) {
            let _ = ws_tx.close().await;
            return end.map(|end| Summary { end, stats: session.stats(), reconnects });
        }
        if terminate_deadline.is_some_and(|t| now >= t) {
            let _ = ws_tx.close().await;
            return Ok(Summary { end: SessionEnd::Terminated { acked: false }, stats: session.stats(), reconnects });
        }
        if ws_rx.is_some() && !transmit(&mut ws_tx, &mut session, now, &mut next_ping).await {
            ws_rx = None;
        }
        if ws_rx.is_none() && reconnect.is_none() {
            session.set_connected(false, now.into_std());
            reconnect = Some(reconnect_loop(resume.clone(), dialer.clone(), reconnect_for));
        }
        let timer = [session.poll_timeout().map(Instant::from_std), Some(next_ping), terminate_deadline]
            .into_iter()
            .flatten()
            .min();
        if kms.is_none() {
            kms = session.take_data_key_request().map(|r| super::data_key_call(&resume, r));
        }
        let take_input = input_open && pending.is_empty() && session.can_send();
        tokio::select! {
            key = await_opt(&mut kms) => {
                kms = None;
                session.provide_data_key(key);
            }
            msg = next_ws(&mut ws_rx) => match on_ws_message(&mut |now, b| session.handle_frame(now, b), msg, reconnects == 0, &mut received_any) {
                WsOutcome::Handled => {}
                WsOutcome::Lost => ws_rx = None,
                WsOutcome::Rejected(e) => return Err(e),
            },
            res = await_opt(&mut reconnect) => {
                reconnect = None;
                let (tx, rx) = res?.split();
                reconnects += 1;
                ws_tx = tx;
                ws_rx = Some(rx);
                session.set_connected(true, Instant::now().into_std());
            }
            data = input.recv(), if take_input => match data {
                Some(d) => pending.extend_from_slice(&d),
                None => input_open = false,
            },
            _ = sleep_until(timer) => session.handle_timeout(Instant::now().into_std()),
        }
    }
}
