//! The driver loops' small helpers: optional futures, frame tracing, incoming
//! websocket messages, and the resume-and-redial loop.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tracing::{debug, info, trace, warn};

use super::{BoxFuture, PortError, Resume};
use crate::session::FrameError;
use crate::transport::{self, Dialer, WsStream};

/// The reading half of a websocket.
pub(super) type WsSource = futures_util::stream::SplitStream<WsStream>;

pub(super) fn trace_frame(dir: &str, frame: &[u8]) {
    match crate::codec::Message::parse(frame) {
        Ok(m) if m.message_type == crate::codec::message_type::ACKNOWLEDGE => {
            let seq = serde_json::from_slice::<crate::payloads::Acknowledge>(&m.payload).map(|a| a.sequence_number);
            trace!(dir, ack = ?seq.ok(), "frame");
        }
        Ok(m) => {
            trace!(dir, r#type = %m.message_type, seq = m.sequence_number.0, pt = ?m.payload_type.map(|p| p.0), len = m.payload.len(), "frame")
        }
        Err(e) => trace!(dir, "undecodable frame: {e}"),
    }
}

pub(super) async fn next_ws(
    rx: &mut Option<WsSource>,
) -> Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>> {
    match rx {
        Some(r) => r.next().await,
        None => std::future::pending().await,
    }
}

pub(super) async fn await_opt<T>(f: &mut Option<BoxFuture<'static, T>>) -> T {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

pub(super) async fn reserve(tx: Option<mpsc::Sender<Vec<u8>>>) -> Result<mpsc::OwnedPermit<Vec<u8>>, ()> {
    match tx {
        Some(tx) => tx.reserve_owned().await.map_err(|_| ()),
        None => std::future::pending().await,
    }
}

pub(super) async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// ResumeSession then redial, with jittered exponential backoff (100-200 ms,
/// doubling to 5 s) for as long as `give_up_after` allows.
pub(super) fn reconnect_loop(
    resume: Arc<dyn Resume>,
    dialer: Dialer,
    give_up_after: Duration,
) -> BoxFuture<'static, Result<WsStream, PortError>> {
    Box::pin(async move {
        let started = Instant::now();
        let mut delay = Duration::from_millis(100 + rand::random_range(0..100));
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let err = match resume.resume().await {
                Ok(Some(endpoint)) => match transport::connect(&endpoint, &dialer).await {
                    Ok(ws) => return Ok(ws),
                    Err(e) => e.to_string(),
                },
                Ok(None) => return Err(PortError::SessionGone),
                Err(e) => e,
            };
            if started.elapsed() >= give_up_after {
                return Err(PortError::ReconnectFailed(give_up_after, err));
            }
            warn!(attempt, "reconnect failed: {err}; retrying in {delay:?}");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5)) + Duration::from_millis(rand::random_range(0..100));
        }
    })
}

/// `false` once the sender is gone; never completes without a receiver.
pub(super) async fn changed(rx: &mut Option<watch::Receiver<u64>>) -> bool {
    match rx {
        Some(r) => r.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Where an incoming frame goes: a session's or a Port machine's `handle_frame`.
pub(super) type FeedFrame<'a> = dyn FnMut(std::time::Instant, &[u8]) -> Result<(), FrameError> + 'a;

/// What one websocket message did to the session.
pub(super) enum WsOutcome {
    Handled,
    /// The websocket is gone: reconnect.
    Lost,
    Rejected(PortError),
}

/// Feeds one websocket message to `feed` (a session, or a Port machine). A
/// close 1003 before any frame on the first connection is a rejected token;
/// any other close, error or end means reconnect.
pub(super) fn on_ws_message(
    feed: &mut FeedFrame<'_>,
    msg: Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>>,
    first_connection: bool,
    received_any: &mut bool,
) -> WsOutcome {
    let now = Instant::now();
    match msg {
        Some(Ok(WsMessage::Binary(b))) => {
            *received_any = true;
            if tracing::enabled!(tracing::Level::TRACE) {
                trace_frame("in", &b);
            }
            if let Err(e) = feed(now.into_std(), &b) {
                debug!("dropped frame: {e}");
            }
        }
        Some(Ok(WsMessage::Text(t))) => {
            *received_any = true;
            if let Err(e) = feed(now.into_std(), t.as_bytes()) {
                debug!("dropped text frame: {e}");
            }
        }
        Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => {}
        Some(Ok(WsMessage::Close(frame))) => {
            let (code, reason) =
                frame.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1005, String::new()));
            if first_connection && !*received_any && code == u16::from(CloseCode::Unsupported) {
                return WsOutcome::Rejected(PortError::TokenRejected { code, reason });
            }
            info!(code, %reason, "service closed the websocket; reconnecting");
            return WsOutcome::Lost;
        }
        Some(Err(e)) => {
            info!("websocket error: {e}; reconnecting");
            return WsOutcome::Lost;
        }
        None => {
            info!("websocket ended; reconnecting");
            return WsOutcome::Lost;
        }
    }
    WsOutcome::Handled
}
