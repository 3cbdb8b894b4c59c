//! `ssm-proxy forward`: what `aws ssm start-session` with the port forwarding
//! documents and the session-manager-plugin do, natively.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::aws::{AwsOptions, SsmApi};
use anyhow::Context;
use ssm_channel::port::{Conn, PortConfig};
use ssm_channel::transport::Trust;
use ssm_channel::version::PortMode;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::ssm::{finish, open_port_session, parse_instance_id, shutdown_signal};

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
    let api = SsmApi::load(&AwsOptions { region: args.region.clone(), profile: args.profile.clone() }, &trust).await?;
    let target = match &args.remote_host {
        Some(h) => format!("{h}:{} via {}", args.remote_port, args.instance_id),
        None => format!("{}:{}", args.instance_id, args.remote_port),
    };
    eprintln!("Starting session with {} in {}...", args.instance_id, api.region());
    // A new network or a wake from sleep: check the websocket at once (forward
    // adds no device or routes of its own, so every change counts).
    let (net_tx, net_rx) = tokio::sync::watch::channel(0u64);
    crate::daemon::netwatch::spawn(net_tx, 0);
    let mut session = open_port_session(
        &api,
        &args.instance_id,
        args.remote_port,
        args.remote_host.as_deref(),
        &trust,
        PortConfig { network_changed: Some(net_rx), ..PortConfig::default() },
        64,
        Box::pin(shutdown_signal()),
    )
    .await?;
    let session_id = session.session_id.clone();
    let ready = &session.ready;
    if !ready.customer_message.is_empty() {
        eprintln!("{}", ready.customer_message);
    }
    let mode = match ready.mode {
        PortMode::Mux { .. } => "multiplexed",
        PortMode::Basic => "basic: one connection at a time",
    };
    println!("Forwarding {bound} -> {target} (session {session_id}, {mode}). Press Ctrl-C to stop.");

    let conn_tx = session.conns.clone();
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
    let done = (&mut session.task).await;
    accept.abort();
    finish(&api, &session_id, done).await?;
    eprintln!("Session {session_id} ended.");
    Ok(())
}
