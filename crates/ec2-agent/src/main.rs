//! `ec2-agent`: the instance end of ssm-proxy. It listens on loopback for the Port
//! sessions the SSM agent opens on behalf of `ssm-proxy start`, ends the tunnel's
//! TCP, UDP and ICMP flows in userspace and opens ordinary sockets to their
//! destinations. No root, no ip_forward, no firewall changes.

use ec2_agent::{admit, imds, session};

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ipnet::IpNet;
use tracing::{error, info, warn};

use ec2_agent::policy::Policy;
use ec2_agent::session::AgentConfig;

/// Default loopback port: what `ssm-proxy start --agent-port` assumes unless told.

#[derive(Debug, Parser)]
#[command(
    name = "ec2-agent",
    version,
    about = "The instance end of ssm-proxy: forwards the tunnel's traffic into the VPC",
    after_help = "Examples:\n  ec2-agent                                  # 127.0.0.1:7301, private ranges allowed\n  \
ec2-agent --allow 203.0.113.0/24           # also a public range the VPC uses\n  \
ec2-agent --only --allow 10.20.0.0/16      # nothing but this range\n  \
ec2-agent --deny 10.20.5.0/24 --log-format json\n\n\
Always denied, whatever --allow says: 169.254.0.0/16 (instance metadata, DNS, NTP,\n\
ECS credentials), fd00:ec2::/32, fe80::/10, loopback, multicast, broadcast."
)]
struct Args {
    /// Address to listen on: keep it on loopback, the SSM agent connects from there.
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], forwarder::wire::DEFAULT_AGENT_PORT)))]
    listen: SocketAddr,
    /// Also allow this destination range (repeatable). Default: 10/8, 172.16/12,
    /// 192.168/16, 100.64/10, fc00::/7.
    #[arg(long, value_name = "CIDR")]
    allow: Vec<IpNet>,
    /// Allow only the --allow ranges, not the default private ones.
    #[arg(long)]
    only: bool,
    /// Deny this destination range too (repeatable); the deny-list always wins.
    #[arg(long, value_name = "CIDR")]
    deny: Vec<IpNet>,
    /// Largest packet accepted from clients.
    #[arg(long, default_value_t = 1500)]
    mtu: u16,
    /// Forget a UDP flow after this many seconds without traffic.
    #[arg(long, default_value_t = 60)]
    udp_idle: u64,
    /// Give up connecting to a TCP destination after this many seconds.
    #[arg(long, default_value_t = 10)]
    connect_timeout: u64,
    /// Concurrent clients (Port sessions).
    #[arg(long, default_value_t = 16)]
    max_clients: usize,
    /// TCP connections per client.
    #[arg(long, default_value_t = 4096)]
    max_tcp_flows: usize,
    /// UDP flows (each an open socket) per client.
    #[arg(long, default_value_t = 1024)]
    max_udp_flows: usize,
    /// Keep a client's connections this many seconds after its session is lost,
    /// for the same client to pick up through a new session (0: do not).
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    grace: u64,
    /// The instance's VPC and region as "VPC_ID REGION", told to clients for
    /// --dns-auto (default: asked of the instance metadata service at start).
    #[arg(long, value_name = "\"VPC_ID REGION\"", value_parser = parse_vpc)]
    vpc: Option<(String, String)>,
    /// Do not ask the instance metadata service for the VPC (outside EC2).
    #[arg(long, conflicts_with = "vpc")]
    no_imds: bool,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn parse_vpc(s: &str) -> Result<(String, String), String> {
    match s.split_once(' ') {
        Some((v, r)) if v.starts_with("vpc-") && !r.trim().is_empty() => Ok((v.to_owned(), r.trim().to_owned())),
        _ => Err(format!("{s:?} is not \"VPC_ID REGION\" (say \"vpc-0abc123 eu-west-1\")")),
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The instance's resolvers, from /etc/resolv.conf (offered to clients in HELLO).
fn resolvers() -> Vec<IpAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse().ok())
        .collect()
}

async fn run(args: Args) -> anyhow::Result<()> {
    if !args.listen.ip().is_loopback() {
        warn!(listen = %args.listen, "listening beyond loopback: anyone who can reach this port can use the tunnel");
    }
    let vpc = match (args.vpc, args.no_imds) {
        (Some(v), _) => Some(v),
        (None, true) => None,
        (None, false) => match imds::vpc(imds::DEFAULT_ADDR).await {
            Ok(v) => Some(v),
            Err(e) => {
                info!("no VPC id from the instance metadata service ({e}); clients' --dns-auto will not find Route 53 private zones");
                None
            }
        },
    };
    if let Some((id, region)) = &vpc {
        info!(vpc = %id, %region, "instance VPC");
    }
    let active = Arc::new(AtomicUsize::new(0));
    let pending = Arc::new(AtomicUsize::new(0));
    let config = Arc::new(AgentConfig {
        vpc,
        listen: args.listen,
        started: std::time::Instant::now(),
        max_clients: args.max_clients,
        active: active.clone(),
        sessions: Arc::new(AtomicUsize::new(0)),
        policy: Policy::new(&args.allow, &args.deny, args.only),
        mtu: args.mtu.max(forwarder::wire::MIN_MTU),
        udp_idle: Duration::from_secs(args.udp_idle.max(1)),
        connect_timeout: Duration::from_secs(args.connect_timeout.max(1)),
        max_tcp_flows: args.max_tcp_flows.max(1),
        max_udp_flows: args.max_udp_flows.max(1),
        resolvers: resolvers(),
        grace: Duration::from_secs(args.grace),
    });
    let registry = session::Registry::default();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (is another ec2-agent running?)", args.listen))?;
    info!(
        listen = %args.listen,
        allow = ?config.policy.allow().iter().map(ToString::to_string).collect::<Vec<_>>(),
        deny = ?config.policy.deny().iter().map(ToString::to_string).collect::<Vec<_>>(),
        "ec2-agent {} ready",
        env!("CARGO_PKG_VERSION")
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        };
        // Root is the SSM agent; the limits bind everyone else (see `admit`).
        let root = stream.local_addr().ok().and_then(|local| admit::peer_uid(peer, local)) == Some(0);
        let waiting = if root {
            admit::Slot::exempt(&pending)
        } else {
            match admit::Slot::take(&pending, admit::MAX_PENDING) {
                Some(s) => s,
                None => {
                    warn!(%peer, "refusing a connection: {} others have not sent their HELLO yet", admit::MAX_PENDING);
                    continue;
                }
            }
        };
        let (config, registry) = (config.clone(), registry.clone());
        // Everything one connection's session logs names its peer.
        let span = tracing::info_span!("connection", %peer);
        let serve = async move {
            match session::serve(stream, config, peer.to_string(), registry, waiting, root).await {
                Ok(()) => {}
                // Connected and left without a word: a port probe, not a client.
                Err(forwarder::link::LinkEnd::Eof) => tracing::debug!("connection closed before HELLO"),
                Err(e) => warn!("client session failed: {e}"),
            }
        };
        tokio::spawn(tracing::Instrument::instrument(serve, span));
    }
    info!("shutting down");
    Ok(())
}

/// Every TCP, UDP and ping flow holds a socket, and services start with a
/// soft limit of 1,024 open files (systemd's default): raise it to the hard
/// limit, and say so when even that is below what the flow limits allow.
fn raise_open_files(args: &Args) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    let want = hard.min(1 << 20);
    let mut have = soft;
    if soft < want {
        match setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
            Ok(()) => {
                info!("open files: {soft} -> {want}");
                have = want;
            }
            Err(e) => warn!("open files stay at {soft} (cannot raise them to {want}: {e})"),
        }
    }
    let need = (args.max_tcp_flows + args.max_udp_flows) as u64;
    if have < need + 64 {
        warn!("open files are limited to {have}: fewer than one client's --max-tcp-flows and --max-udp-flows ({need}); flows beyond get ICMP host unreachable");
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    raise_open_files(&args);
    // One thread: every packet crosses several tasks (device or socket, queue,
    // stream), and on a multi-threaded runtime each crossing could wake another
    // core. Measured in the lab (bench_tunnel.py, clean link): 290-305 -> 430-446
    // Mbit/s down and 352 -> 530 up with one thread for the daemon, the agent and
    // the emulator; one core carries far more than an SSM session can.
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
