//! What `forward` and `start` share: instance ids, opening a Port session,
//! resuming, signals and the end of a session.

use std::sync::Arc;
use std::time::Duration;

use crate::aws::{ApiError, SsmApi};
use anyhow::bail;
use ssm_channel::port::{self, BoxFuture, Conn, PortConfig, PortError, Ready, Resume, SessionEnd, Summary};
use ssm_channel::transport::{Endpoint, Trust};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{info, warn, Instrument};

/// How long the agent has to complete the handshake after we connect.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A Port session whose handshake with the instance agent completed.
pub struct PortSession {
    pub session_id: String,
    pub stream_url: String,
    pub ready: Ready,
    /// Local connections to carry through the session.
    pub conns: mpsc::Sender<Conn>,
    /// The driver task; its result goes to [`finish`].
    pub task: JoinHandle<Result<Summary, PortError>>,
    stop: Option<oneshot::Sender<()>>,
}

impl PortSession {
    /// Stop the session (TerminateSession flag), wait for the driver, call the
    /// TerminateSession API and report how it ended.
    pub async fn close(mut self, api: &SsmApi) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let done = (&mut self.task).await;
        finish(api, &self.session_id, done).await
    }
}

/// StartSession for `port` on `instance` (or `host` through it), then the driver
/// with `config`, until the agent's handshake completes. The session also ends when
/// `also_stop` completes. On failure everything started is torn down again.
#[allow(clippy::too_many_arguments)]
pub async fn open_port_session(
    api: &SsmApi,
    instance: &str,
    port: u16,
    host: Option<&str>,
    trust: &Trust,
    config: PortConfig,
    max_pending_conns: usize,
    also_stop: BoxFuture<'static, ()>,
) -> anyhow::Result<PortSession> {
    let dialer = trust.dialer()?;
    let client_id = uuid::Uuid::new_v4();
    let started = api.start_port_session(instance, port, host, client_id).await?;
    let session_id = started.session_id.clone();
    let stream_url = started.endpoint.stream_url.clone();
    info!(session = %session_id, "session started");
    let resume = Arc::new(SsmResume {
        api: api.clone(),
        session_id: session_id.clone(),
        stream_url: stream_url.clone(),
        client_id,
        target: instance.to_owned(),
    });
    let (conn_tx, conn_rx) = mpsc::channel::<Conn>(max_pending_conns);
    let (ready_tx, ready_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let shutdown: BoxFuture<'static, ()> = Box::pin(async move {
        tokio::select! {
            _ = also_stop => {}
            _ = stop_rx => {}
        }
    });
    // Everything the driver logs (reconnects, the handshake, resends) names its session.
    let span = tracing::info_span!("session", id = %session_id, instance);
    let driver = port::run(config, started.endpoint, dialer, resume, conn_rx, ready_tx, shutdown);
    let mut task = tokio::spawn(driver.instrument(span));
    let ready = tokio::select! {
        r = tokio::time::timeout(READY_TIMEOUT, ready_rx) => r,
        done = &mut task => {
            let outcome = finish(api, &session_id, done).await;
            return outcome.and_then(|_| bail!("the session ended before it was ready"));
        }
    };
    let ready = match ready {
        Ok(Ok(r)) => r,
        // The session task ended before the handshake: report its own error.
        Ok(Err(_)) => {
            let outcome = finish(api, &session_id, task.await).await;
            return outcome.and_then(|_| bail!("the session ended before it was ready"));
        }
        Err(_) => {
            let _ = stop_tx.send(());
            task.abort();
            let _ = api.terminate_session(&session_id).await;
            bail!(
                "the instance agent did not complete the session handshake within {}s; \
                 check that the SSM agent on {instance} is running and up to date",
                READY_TIMEOUT.as_secs(),
            );
        }
    };
    Ok(PortSession { session_id, stream_url, ready, conns: conn_tx, task, stop: Some(stop_tx) })
}

/// A new connection through the session to the ec2-agent's port, exchanged
/// as chunks with the session driver: what the agent sends arrives on the
/// receiver, what we send goes into the sender.
pub async fn agent_stream(conns: &mpsc::Sender<Conn>) -> anyhow::Result<AgentStream> {
    let (conn, ends) = Conn::queue("ec2-agent");
    conns
        .send(conn)
        .await
        .map_err(|_| anyhow::anyhow!("the session ended before the connection to the ec2-agent was made"))?;
    Ok((ends.from_session, ends.to_session))
}

/// The link's [`forwarder::link::Inlet`] and [`forwarder::link::Outlet`] to the ec2-agent.
pub type AgentStream = (mpsc::Receiver<Vec<u8>>, mpsc::Sender<bytes::Bytes>);

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
    /// The instance, for the KMS encryption context.
    pub target: String,
}

impl Resume for SsmResume {
    fn data_key(
        &self,
        request: ssm_channel::session::kms::DataKeyRequest,
    ) -> BoxFuture<'_, Result<ssm_channel::session::kms::DataKey, String>> {
        Box::pin(async move {
            let context = request.context(&self.session_id, &self.target);
            info!(key = %request.key_id, "the agent asks for KMS encryption: GenerateDataKey");
            self.api.generate_data_key(&request.key_id, context).await.map_err(|e| e.to_string())
        })
    }

    fn resume(&self) -> BoxFuture<'_, Result<Option<Endpoint>, String>> {
        Box::pin(async move {
            match self.api.resume_session(&self.session_id).await {
                Ok(Some(token)) => {
                    // Signed afresh for each dial, as the plugin does on every resume.
                    let headers = self.api.data_channel_headers(&self.stream_url).await.map_err(|e| e.to_string())?;
                    let stream_url = self.stream_url.clone();
                    Ok(Some(Endpoint { stream_url, token, client_id: self.client_id, headers }))
                }
                Ok(None) | Err(ApiError::SessionNotFound(_)) => Ok(None),
                Err(e) => Err(e.to_string()),
            }
        })
    }

    fn network_changed(&self) {
        self.api.reset_connections();
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
        messages_sent = summary.stats.transmissions(),
        distinct = summary.stats.messages_sent,
        resends = summary.stats.retransmissions,
        resend_ratio = %format!("{:.4}", summary.stats.resend_ratio()),
        out_of_order = summary.stats.out_of_order_received,
        duplicates = summary.stats.duplicates_received,
        reconnects = summary.reconnects,
        "session summary"
    );
    match summary.end {
        SessionEnd::Terminated { .. } => {
            info!(session = %session_id, "session ended");
            Ok(())
        }
        SessionEnd::ChannelClosed(reason) if reason.is_empty() => bail!("the service closed session {session_id}"),
        SessionEnd::ChannelClosed(reason) => bail!("the service closed session {session_id}: {reason}"),
    }
}
