//! What `forward` and `start` share: instance ids, resuming, signals and the end of
//! a session.

use anyhow::bail;
use ssm_channel::aws::{ApiError, SsmApi};
use ssm_channel::port::{self, BoxFuture, Resume, SessionEnd};
use ssm_channel::transport::Endpoint;
use tracing::{info, warn};

pub fn parse_instance_id(s: &str) -> Result<String, String> {
    let hex = s.strip_prefix("i-").or_else(|| s.strip_prefix("mi-"));
    match hex {
        Some(h) if (8..=17).contains(&h.len()) && h.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(s.to_owned()),
        _ => Err(format!("{s:?} is not an instance id (expected i- or mi- followed by 8 to 17 hex digits)")),
    }
}

pub struct SsmResume {
    pub api: SsmApi,
    pub session_id: String,
    pub stream_url: String,
    pub client_id: uuid::Uuid,
}

impl Resume for SsmResume {
    fn resume(&self) -> BoxFuture<'_, Result<Option<Endpoint>, String>> {
        Box::pin(async move {
            match self.api.resume_session(&self.session_id).await {
                Ok(Some(token)) => {
                    Ok(Some(Endpoint { stream_url: self.stream_url.clone(), token, client_id: self.client_id }))
                }
                Ok(None) | Err(ApiError::SessionNotFound(_)) => Ok(None),
                Err(e) => Err(e.to_string()),
            }
        })
    }
}

pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Calls TerminateSession whatever happened, then reports the outcome.
pub async fn finish(
    api: &SsmApi,
    session_id: &str,
    done: Result<Result<port::Summary, port::PortError>, tokio::task::JoinError>,
) -> anyhow::Result<()> {
    if let Err(e) = api.terminate_session(session_id).await {
        warn!("TerminateSession failed: {e}");
    }
    let summary = anyhow::Context::context(done, "the session task failed")??;
    info!(
        sent = summary.stats.bytes_sent,
        received = summary.stats.bytes_received,
        retransmissions = summary.stats.retransmissions,
        reconnects = summary.reconnects,
        "session summary"
    );
    match summary.end {
        SessionEnd::Terminated { .. } => {
            eprintln!("Session {session_id} ended.");
            Ok(())
        }
        SessionEnd::ChannelClosed(reason) if reason.is_empty() => bail!("the service closed session {session_id}"),
        SessionEnd::ChannelClosed(reason) => bail!("the service closed session {session_id}: {reason}"),
    }
}
