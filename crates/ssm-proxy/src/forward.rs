//! `ssm-proxy forward`: what `aws ssm start-session` with the port forwarding
//! documents and the session-manager-plugin do, natively.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use crate::aws::{AwsOptions, SsmApi};
use anyhow::Context;
use ssm_channel::port::{Conn, ConnIo, PortConfig};
use ssm_channel::transport::Trust;
use ssm_channel::version::PortMode;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::ssm::{finish, open_port_session, parse_instance_id, shutdown_signal, PortSession};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  Forward local port 15432 to PostgreSQL on the instance itself:
    ssm-proxy forward --instance-id i-0abc123def4567890 --remote-port 5432 --local-port 15432
  Forward to a database the instance can reach:
    ssm-proxy forward --instance-id i-0abc123def4567890 --remote-host db.internal --remote-port 5432
  Spread connections over four sessions (the stock SSM agent carries about 1 MB/s per session):
    ssm-proxy forward --instance-id i-0abc123def4567890 --remote-port 8080 --sessions 4

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
    /// The instance itself (localhost, 127.0.0.1, ::1) uses the local-port
    /// document instead: SSM agents from 3.3.4851.0 refuse loopback to the
    /// remote-host document.
    #[arg(long, value_parser = parse_remote_host)]
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
    /// SSM sessions to open; each new connection goes to the one carrying the
    /// fewest. The stock SSM agent sends about 1 MB/s per session, so N
    /// sessions carry N busy connections at that speed each (one connection
    /// still gets one session's speed). Each is an ordinary session: CloudTrail
    /// shows N.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    sessions: u16,
    /// Why you open this session: StartSession's Reason, shown in CloudTrail
    /// and the Session Manager console (1-256 characters; default "ssm-proxy").
    #[arg(long, value_name = "TEXT", value_parser = crate::aws::parse_reason)]
    reason: Option<String>,
    /// HTTP proxy for the AWS API and the data channel, as http://[user:password@]host:port
    /// [default: HTTPS_PROXY/HTTP_PROXY/ALL_PROXY, bypassed for NO_PROXY hosts, as curl
    /// reads them; sudo drops these variables unless kept: `sudo --preserve-env=HTTPS_PROXY,NO_PROXY`]
    #[arg(long, value_name = "URL")]
    proxy: Option<String>,
    /// Send the data channel to this endpoint instead of the host StartSession
    /// names (a PrivateLink interface endpoint for ssmmessages), as https://HOST[:PORT]
    /// [default: AWS_ENDPOINT_URL_SSMMESSAGES]. The API endpoint is AWS_ENDPOINT_URL_SSM.
    #[arg(long, value_name = "URL")]
    ssmmessages_endpoint: Option<String>,
}

/// `--remote-host`: a host name or address; the instance's own loopback names
/// become `""`, which [`run`] turns into the local-port document.
fn parse_remote_host(s: &str) -> Result<String, String> {
    let h = s.trim();
    if h.is_empty() {
        return Err("a host name or address".into());
    }
    Ok(if is_loopback_name(h) { String::new() } else { h.to_owned() })
}

/// Names the instance itself by: localhost, an address in 127.0.0.0/8, ::1.
fn is_loopback_name(h: &str) -> bool {
    let bare = h.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare.eq_ignore_ascii_case("localhost.")
        || bare.parse::<IpAddr>().is_ok_and(|a| a.is_loopback())
}

pub async fn run(mut args: ForwardArgs) -> anyhow::Result<()> {
    if args.remote_host.as_deref() == Some("") {
        // The instance itself: the local-port document reaches its loopback on
        // every agent; the remote-host one no longer does on the newest.
        args.remote_host = None;
    }
    let local = SocketAddr::new(args.local_addr, args.local_port);
    let listener = TcpListener::bind(local).await.with_context(|| {
        format!("cannot listen on {local} (is the port in use? pick another --local-port, or 0 for any)")
    })?;
    let bound = listener.local_addr().context("reading the bound address")?;

    let trust = crate::aws::trust(args.proxy.as_deref())?;
    let api = SsmApi::load(
        &AwsOptions {
            region: args.region.clone(),
            profile: args.profile.clone(),
            reason: args.reason.clone(),
            ssmmessages_endpoint: args.ssmmessages_endpoint.clone(),
        },
        &trust,
    )
    .await?;
    let target = match &args.remote_host {
        Some(h) => format!("{h}:{} via {}", args.remote_port, args.instance_id),
        None => format!("{}:{}", args.instance_id, args.remote_port),
    };
    eprintln!("Starting session with {} in {}...", args.instance_id, api.region());
    let (stop_tx, _) = watch::channel(false);
    let mut sessions = open_sessions(&api, &trust, &args, &stop_tx).await?;
    let ready = &sessions[0].ready;
    if !ready.customer_message.is_empty() {
        eprintln!("{}", ready.customer_message);
    }
    let mode = match ready.mode {
        PortMode::Mux { .. } => "multiplexed",
        PortMode::Basic => "basic: one connection at a time",
    };
    let ids: Vec<String> = sessions.iter().map(|s| s.session_id.clone()).collect();
    let which = match ids.as_slice() {
        [one] => format!("session {one}"),
        many => format!("{} sessions: {}", many.len(), many.join(", ")),
    };
    println!("Forwarding {bound} -> {target} ({which}, {mode}). Press Ctrl-C to stop.");

    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let members: Vec<Member> = sessions
        .iter()
        .map(|s| Member { conns: s.conns.clone(), active: Arc::default(), id: s.session_id.clone() })
        .collect();
    let accept = tokio::spawn(accept_loop(listener, members));
    let done = futures_util::future::join_all(sessions.iter_mut().map(|s| &mut s.task)).await;
    accept.abort();
    let mut result = Ok(());
    for (id, done) in ids.iter().zip(done) {
        match finish(&api, id, done).await {
            Ok(()) => eprintln!("Session {id} ended."),
            Err(e) => {
                warn!("{e:#}");
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
    }
    result
}

/// Opens `--sessions` Port sessions at once. Fewer than asked (the service
/// or an IAM policy refusing more) is a warning; none is the first error.
async fn open_sessions(
    api: &SsmApi,
    trust: &Trust,
    args: &ForwardArgs,
    stop: &watch::Sender<bool>,
) -> anyhow::Result<Vec<PortSession>> {
    // A new network or a wake from sleep: check the websockets at once (forward
    // adds no device or routes of its own, so every change counts).
    let (net_tx, net_rx) = watch::channel(0u64);
    crate::daemon::netwatch::spawn(net_tx, 0);
    let opens = (0..args.sessions).map(|_| {
        let mut stopped = stop.subscribe();
        open_port_session(
            api,
            &args.instance_id,
            args.remote_port,
            args.remote_host.as_deref(),
            trust,
            PortConfig { network_changed: Some(net_rx.clone()), ..PortConfig::default() },
            64,
            Box::pin(async move {
                let _ = stopped.wait_for(|s| *s).await;
            }),
        )
    });
    let mut sessions = Vec::new();
    let mut first_error = None;
    for opened in futures_util::future::join_all(opens).await {
        match opened {
            Ok(s) => sessions.push(s),
            Err(e) => {
                warn!("a session could not be opened: {e:#}");
                first_error.get_or_insert(e);
            }
        }
    }
    match (sessions.len(), first_error) {
        (0, Some(e)) => Err(e),
        (n, _) if n < usize::from(args.sessions) => {
            warn!("{n} of {} sessions opened; connections are spread over those", args.sessions);
            Ok(sessions)
        }
        _ => Ok(sessions),
    }
}

/// One session of the pool: where to send connections, and how many it carries.
struct Member {
    conns: mpsc::Sender<Conn>,
    active: Arc<AtomicUsize>,
    id: String,
}

/// Hands each accepted connection to the session carrying the fewest (the
/// first of them on a tie); a session that has ended is skipped.
async fn accept_loop(listener: TcpListener, mut members: Vec<Member>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        members.retain(|m| !m.conns.is_closed());
        let Some(m) = members.iter().min_by_key(|m| m.active.load(Ordering::Relaxed)) else { return };
        info!(%peer, session = %m.id, "connection");
        if m.conns.send(counted(stream, &m.active)).await.is_err() {
            warn!(%peer, session = %m.id, "the session ended; connection dropped");
        }
    }
}

/// A connection that counts itself in `active` until the session lets go of it.
fn counted(stream: TcpStream, active: &Arc<AtomicUsize>) -> Conn {
    let label = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    active.fetch_add(1, Ordering::Relaxed);
    let reader = Counted { inner: r, active: active.clone() };
    Conn { io: ConnIo::Stream { reader: Box::new(reader), writer: Box::new(w) }, label }
}

/// A connection's reading half; dropped when the session is done with the
/// connection, which then no longer counts.
struct Counted<R> {
    inner: R,
    active: Arc<AtomicUsize>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counted<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<R> Drop for Counted<R> {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::parse_remote_host;

    #[test]
    fn the_instances_own_names_become_the_local_port_document() {
        for own in ["localhost", "LOCALHOST.", "127.0.0.1", "127.1.2.3", "::1", "[::1]"] {
            assert_eq!(parse_remote_host(own).as_deref(), Ok(""), "{own}");
        }
        for other in ["db.internal", "10.0.0.5", "fd00::5", "localhost.example.com"] {
            assert_eq!(parse_remote_host(other).as_deref(), Ok(other), "{other}");
        }
        assert!(parse_remote_host(" ").is_err());
    }
}
