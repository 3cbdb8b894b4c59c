//! The tokio side: the websocket, and the loops that drive the pure protocol
//! of [`crate::proto`] over it.
//!
//! - [`transport`]: the websocket to the service, TLS trust, the open message.
//! - [`proxy`]: which HTTP proxy a URL goes through, and the CONNECT tunnel.
//! - [`port`]: a Port session's loop, and the local connections it carries.
//! - [`shell`]: a shell session's loop.
//! - `ws`: what both loops share (incoming messages, resume and redial).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::session::kms::{DataKey, DataKeyRequest};
use crate::session::Stats;
use crate::transport::{Endpoint, TransportError};

mod local;
pub mod port;
pub mod proxy;
pub mod shell;
pub mod transport;
mod ws;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How to get a new token for the same StreamUrl after the websocket drops.
pub trait Resume: Send + Sync {
    /// `Ok(None)`: the service says the session no longer exists.
    fn resume(&self) -> BoxFuture<'_, Result<Option<Endpoint>, String>>;
    /// The machine's network changed: drop whatever connections `resume` keeps.
    fn network_changed(&self) {}
    /// KMS GenerateDataKey for a session whose agent asked for encryption
    /// (see [`crate::session::kms`]).
    fn data_key(&self, request: DataKeyRequest) -> BoxFuture<'_, Result<DataKey, String>> {
        let _ = request;
        Box::pin(std::future::ready(Err("this client has no KMS access".to_owned())))
    }
}

/// The KMS call for `request` as a future the driver can keep.
pub(crate) fn data_key_call(
    resume: &std::sync::Arc<dyn Resume>,
    request: DataKeyRequest,
) -> BoxFuture<'static, Result<DataKey, String>> {
    let resume = resume.clone();
    Box::pin(async move { resume.data_key(request).await })
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
