//! `ssm-proxy forward`: what `aws ssm start-session` with the port forwarding
//! documents and the session-manager-plugin do, natively.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ssm_channel::aws::{AwsOptions, SsmApi};
use ssm_channel::port::{self, BoxFuture, Conn, PortConfig};
use ssm_channel::transport::Trust;
use ssm_channel::version::PortMode;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::ssm::{finish, parse_instance_id, shutdown_signal, SsmResume};

/// How long the agent has to complete the handshake after we connect.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  Forward local port 15432 to PostgreSQL on the instance itself:
    ssm-proxy forward --instance-id i-0abc123def4567890 --remote-port 5432 --local-port 15432
  Forward to a database the instance can reach:
    ssm-proxy forward --instance-id i-0abc123def4567890 --remote-host db.internal --remote-port 5432

The session ends on Ctrl-C. Credentials come from the usual AWS chain (environment,
--profile or AWS_PROFILE, SSO, credential_process). The user needs ssm:StartSession on the
instance and the document, plus ssm:ResumeSession and ssm:TerminateSession.")]
pub struct ForwardArgs {
    /// The managed instance to go through (i-... or mi-...).
    #[arg(long, value_parser = parse_instance_id)]
    instance_id: String,
    /// Port to reach on the instance (or on --remote-host).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    remote_port: u16,
    /// Host to reach from the instance (uses AWS-StartPortForwardingSessionToRemoteHost).
    #[arg(long)]
    remote_host: Option<String>,
    /// Local port to listen on; 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    local_port: u16,
    /// Local address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    local_addr: IpAddr,
    /// AWS region (default: from the environment or profile).
    #[arg(long)]
    region: Option<String>,
    /// AWS profile to use.
    #[arg(long)]
    profile: Option<String>,
}

pub async fn run(args: ForwardArgs) -> anyhow::Result<()> {
    let local = SocketAddr::new(args.local_addr, args.local_port);
    let listener = TcpListener::bind(local).await.with_context(|| {
        format!("cannot listen on {local} (is the port in use? pick another --local-port, or 0 for any)")
    })?;
    let bound = listener.local_addr().context("reading the bound address")?;

    let trust = Trust::from_env()?;
    let tls = trust.rustls_config()?;
    let api = SsmApi::load(&AwsOptions { region: args.region.clone(), profile: args.profile.clone() }, &trust).await?;
    let target = match &args.remote_host {
        Some(h) => format!("{h}:{} via {}", args.remote_port, args.instance_id),
        None => format!("{}:{}", args.instance_id, args.remote_port),
    };
    eprintln!("Starting session with {} in {}...", args.instance_id, api.region());
    let client_id = uuid::Uuid::new_v4();
    let started =
        api.start_port_session(&args.instance_id, args.remote_port, args.remote_host.as_deref(), client_id).await?;
    let session_id = started.session_id.clone();
    info!(session = %session_id, "session started");

    let resume = Arc::new(SsmResume {
        api: api.clone(),
        session_id: session_id.clone(),
        stream_url: started.endpoint.stream_url.clone(),
        client_id,
    });
    let (conn_tx, conn_rx) = mpsc::channel::<Conn>(64);
    let (ready_tx, ready_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let shutdown: BoxFuture<'static, ()> = Box::pin(async move {
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = stop_rx => {}
        }
    });
    let mut session = tokio::spawn(port::run(
        PortConfig::default(),
        started.endpoint,
        Some(tls),
        resume,
        conn_rx,
        ready_tx,
        shutdown,
    ));

    let ready = tokio::select! {
        r = tokio::time::timeout(READY_TIMEOUT, ready_rx) => r,
        done = &mut session => {
            let outcome = finish(&api, &session_id, done).await;
            return outcome.and_then(|_| bail!("the session ended before it was ready"));
        }
    };
    let ready = match ready {
        Ok(Ok(r)) => r,
        // The session task ended before the handshake: report its own error.
        Ok(Err(_)) => {
            let outcome = finish(&api, &session_id, session.await).await;
            return outcome.and_then(|_| bail!("the session ended before it was ready"));
        }
        Err(_) => {
            let _ = stop_tx.send(());
            session.abort();
            let _ = api.terminate_session(&session_id).await;
            bail!(
                "the instance agent did not complete the session handshake within {}s; \
                 check that the SSM agent on {} is running and up to date",
                READY_TIMEOUT.as_secs(),
                args.instance_id
            );
        }
    };
    if !ready.customer_message.is_empty() {
        eprintln!("{}", ready.customer_message);
    }
    let mode = match ready.mode {
        PortMode::Mux { .. } => "multiplexed",
        PortMode::Basic => "basic: one connection at a time",
    };
    println!("Forwarding {bound} -> {target} (session {session_id}, {mode}). Press Ctrl-C to stop.");

    let accept = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    info!(%peer, "connection");
                    if conn_tx.send(Conn::from_tcp(stream)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    let done = session.await;
    accept.abort();
    drop(stop_tx);
    finish(&api, &session_id, done).await
}
