//! The driver loop's small helpers: optional futures, frame tracing, and the
//! resume-and-redial loop.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tracing::{trace, warn};

use super::{BoxFuture, PortError, Resume, WsSource};
use crate::transport::{self, WsStream};

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

pub(crate) async fn next_ws(
    rx: &mut Option<WsSource>,
) -> Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>> {
    match rx {
        Some(r) => r.next().await,
        None => std::future::pending().await,
    }
}

pub(crate) async fn await_opt<T>(f: &mut Option<BoxFuture<'static, T>>) -> T {
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

pub(crate) async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// ResumeSession then redial, with jittered exponential backoff (100-200 ms,
/// doubling to 5 s) for as long as `give_up_after` allows.
pub(crate) fn reconnect_loop(
    resume: Arc<dyn Resume>,
    tls: Option<Arc<rustls::ClientConfig>>,
    give_up_after: Duration,
) -> BoxFuture<'static, Result<WsStream, PortError>> {
    Box::pin(async move {
        let started = Instant::now();
        let mut delay = Duration::from_millis(100 + rand::random_range(0..100));
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let err = match resume.resume().await {
                Ok(Some(endpoint)) => match transport::connect(&endpoint, tls.clone()).await {
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
