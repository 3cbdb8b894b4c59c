//! `ssm-proxy start`: the tunnel daemon. Pre-flight checks, the SSM Port session to
//! the ec2-agent, the TUN/utun device, routes, then packets until stopped; teardown in
//! reverse order on every exit path.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use forwarder::client::{self, ClientConfig, ClientHandle};
use forwarder::dns::{Domain, SplitDns};
use forwarder::wire;
use ipnet::IpNet;
use routing::{Journal, Route, RouteGuard};
use ssm_channel::aws::{AwsOptions, SsmApi};
use ssm_channel::port::{Conn, Live, PortConfig};
use ssm_channel::session::SessionConfig;
use ssm_channel::transport::Trust;
use tokio::sync::Notify;
use tracing::{info, warn};
use tunnel::{Device, TunConfig, TunDevice};

use crate::config;
use crate::control::{self, Counter, Status};
use crate::dns;
use crate::ssm::{finish, open_port_session, parse_instance_id, shutdown_signal};

/// The ec2-agent's default loopback port on the instance.
pub const DEFAULT_AGENT_PORT: u16 = 7301;

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  sudo ssm-proxy start --instance-id i-0abc123def4567890 --cidr 10.0.0.0/16
  sudo ssm-proxy start --instance-id i-0abc123def4567890 --cidr 10.1.0.0/16 --cidr 10.2.0.0/16 \\
       --name staging --profile staging --region eu-west-1

  sudo ssm-proxy start --instance-id i-0abc123def4567890 --cidr 10.0.0.0/16 \\
       --dns-domain corp.internal --dns-auto
  sudo ssm-proxy start prod          # [tunnel.prod] from /etc/ssm-proxy/config.toml or
                                     # ~/.config/ssm-proxy/config.toml (see `ssm-proxy list`)

Then reach private addresses directly: psql -h 10.0.1.5, curl http://10.0.2.100:8080, ssh ...
With --dns-domain/--dns-auto, names in those domains resolve through the instance's resolver:
psql -h db.corp.internal, ssh ip-10-0-1-5.eu-west-1.compute.internal.
`ssm-proxy status` shows the tunnel, `sudo ssm-proxy stop` (or Ctrl-C) ends it. The instance
needs the ec2-agent listening on --agent-port (see README: Installing the ec2-agent).")]
pub struct StartArgs {
    /// A tunnel defined in the config file (see `ssm-proxy list`); options given
    /// here override its settings.
    #[arg(value_name = "NAME")]
    tunnel: Option<String>,
    /// The managed instance running the ec2-agent (i-... or mi-...).
    #[arg(long, value_parser = parse_instance_id)]
    instance_id: Option<String>,
    /// A destination range to route through the tunnel (repeatable).
    #[arg(long = "cidr", value_name = "CIDR")]
    cidrs: Vec<IpNet>,
    /// AWS region (default: from the environment or profile).
    #[arg(long)]
    region: Option<String>,
    /// AWS profile to use.
    #[arg(long)]
    profile: Option<String>,
    /// The ec2-agent's port on the instance's loopback [default: 7301].
    #[arg(long)]
    agent_port: Option<u16>,
    /// Name of this tunnel; several tunnels with different names and CIDRs can run
    /// at once [default: NAME, else "default"].
    #[arg(long)]
    name: Option<String>,
    /// Add the routes even when they conflict with existing routes or networks.
    #[arg(long)]
    force: bool,
    /// MTU of the tunnel interface (1280 or more).
    #[arg(long, default_value_t = tunnel::DEFAULT_MTU, value_parser = clap::value_parser!(u16).range(1280..))]
    mtu: u16,
    /// Interface name (Linux only; macOS always picks utunN itself).
    #[arg(long)]
    interface: Option<String>,
    /// Run in the background: return once the tunnel is up (logs go to
    /// <run dir>/<name>.log).
    #[arg(long)]
    detach: bool,
    /// Resolve names in this domain (and below) through the instance's resolver
    /// (repeatable). Other names never go through the tunnel.
    #[arg(long = "dns-domain", value_name = "DOMAIN", value_parser = parse_domain)]
    dns_domains: Vec<Domain>,
    /// Also resolve the region's EC2 internal names (<region>.compute.internal, or
    /// ec2.internal in us-east-1) and eks.amazonaws.com through the tunnel.
    #[arg(long)]
    dns_auto: bool,
}

fn parse_domain(s: &str) -> Result<Domain, String> {
    Domain::parse(s).map_err(|e| e.to_string())
}

const DETACHED_ENV: &str = "SSM_PROXY_DETACHED";

/// Unanswered data for this long makes `status` say the link is stalled.
const STALL: Duration = Duration::from_secs(3);

impl StartArgs {
    pub fn detach(&self) -> bool {
        self.detach
    }

    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("default")
    }

    fn instance_id(&self) -> &str {
        self.instance_id.as_deref().unwrap_or_default()
    }

    fn agent_port(&self) -> u16 {
        self.agent_port.unwrap_or(DEFAULT_AGENT_PORT)
    }
}

/// Fill in the named tunnel from the config files (flags given win) and check
/// that an instance and at least one CIDR are known.
pub fn resolve(mut args: StartArgs) -> anyhow::Result<StartArgs> {
    if let Some(name) = args.tunnel.clone() {
        let t = config::find(&config::default_paths(), &name)?;
        args.instance_id = args.instance_id.or(Some(t.instance_id));
        if args.cidrs.is_empty() {
            args.cidrs = t.cidrs;
        }
        args.region = args.region.or(t.region);
        args.profile = args.profile.or(t.profile);
        args.agent_port = args.agent_port.or(t.agent_port);
        if args.dns_domains.is_empty() {
            args.dns_domains = t.dns_domains;
        }
        args.dns_auto |= t.dns_auto;
        args.name = args.name.or(Some(name));
    }
    if args.instance_id.is_none() {
        bail!("say which instance: --instance-id i-..., or the NAME of a tunnel in the config file (`ssm-proxy list`)");
    }
    if args.cidrs.is_empty() {
        bail!("say what to route: at least one --cidr (or cidrs = [...] in the config file)");
    }
    Ok(args)
}

/// `--detach`: run the same command again in a new session with its output going to
/// a log file, wait for its ready line, print it, and return. The tunnel process
/// outlives us.
pub fn detach(args: &StartArgs) -> anyhow::Result<()> {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    if !nix::unistd::geteuid().is_root() {
        bail!("start creates a network device and routes: run it with sudo");
    }
    let dir = routing::default_run_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let log_path = dir.join(format!("{}.log", args.name()));
    let log = std::fs::File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    let exe = std::env::current_exe().context("cannot find our own executable")?;
    let argv: Vec<String> = std::env::args().skip(1).filter(|a| a != "--detach").collect();
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&argv)
        .env(DETACHED_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log);
    // SAFETY: setsid() only, between fork and exec: async-signal-safe.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(std::io::Error::from));
    }
    let mut child = cmd.spawn().context("cannot start the tunnel process")?;
    let stdout = child.stdout.take().context("no pipe to the tunnel process")?;
    for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
        if line.contains(" up: ") {
            println!("{line}");
            println!("Running in the background (pid {}); logs in {}.", child.id(), log_path.display());
            return Ok(());
        }
    }
    let status = child.wait().context("waiting for the tunnel process")?;
    let log_text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let tail: Vec<&str> = log_text.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
    bail!("the tunnel did not come up ({status}):\n{}", tail.join("\n"))
}

/// In the detached process, once the ready line is out: nobody reads our stdout any
/// more, so point it at /dev/null rather than fail on a closed pipe.
fn release_stdout() {
    if std::env::var_os(DETACHED_ENV).is_none() {
        return;
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto our own stdout descriptor.
        unsafe { nix::libc::dup2(null.as_raw_fd(), 1) };
    }
}

/// Resolve the endpoints the tunnel itself uses, so routes can never capture them:
/// the SSM API (or its override), STS for credentials, and the session's stream host.
/// All lookups run at once, within 3 seconds.
async fn endpoint_addresses(region: &str, stream_url: &str) -> Vec<IpAddr> {
    let overrides = endpoint_overrides();
    let mut hosts = if std::env::var_os("AWS_ENDPOINT_URL").is_some() {
        overrides
    } else {
        let mut h = vec![format!("sts.{region}.amazonaws.com")];
        if overrides.is_empty() {
            h.push(format!("ssm.{region}.amazonaws.com"));
        }
        h.extend(overrides);
        h
    };
    hosts.extend(host_of(stream_url));
    hosts.sort();
    hosts.dedup();
    let lookups = hosts.into_iter().map(|h| async move {
        if let Ok(ip) = h.parse::<IpAddr>() {
            return vec![ip];
        }
        match tokio::time::timeout(Duration::from_secs(3), tokio::net::lookup_host((h.as_str(), 443))).await {
            Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
            _ => {
                warn!(host = %h, "could not resolve an AWS endpoint; if a routed CIDR covers it, the tunnel may capture it");
                Vec::new()
            }
        }
    });
    let mut out: Vec<IpAddr> = futures_util::future::join_all(lookups).await.into_iter().flatten().collect();
    out.sort();
    out.dedup();
    out
}

/// The hosts of `AWS_ENDPOINT_URL_SSM` and `AWS_ENDPOINT_URL`, where set.
fn endpoint_overrides() -> Vec<String> {
    ["AWS_ENDPOINT_URL_SSM", "AWS_ENDPOINT_URL"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .filter_map(|u| host_of(&u))
        .collect()
}

fn host_of(url: &str) -> Option<String> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split(['/', '?']).next()?;
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => authority.rsplit_once(':').map(|(h, _)| h).unwrap_or(authority),
    };
    (!host.is_empty()).then(|| host.to_string())
}

/// The user behind `sudo`, who may stop the tunnel too.
fn owner_uid() -> u32 {
    std::env::var("SUDO_UID").ok().and_then(|u| u.parse().ok()).unwrap_or_else(|| nix::unistd::getuid().as_raw())
}

pub async fn run(args: StartArgs) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("start creates a network device and routes: run it with sudo");
    }
    let mut cidrs: Vec<IpNet> = Vec::new();
    for c in &args.cidrs {
        let t = c.trunc();
        if t != *c {
            warn!("{c} has host bits set; routing {t}");
        }
        if !cidrs.contains(&t) {
            cidrs.push(t);
        }
    }
    let run_dir: PathBuf = routing::default_run_dir();
    let (journal, leftover) = Journal::open(&run_dir, args.name()).map_err(|e| match e {
        routing::JournalError::InUse { .. } => anyhow::anyhow!(
            "a tunnel named {:?} is already running (see `ssm-proxy status`); stop it or pick another --name",
            args.name()
        ),
        other => anyhow::anyhow!(other),
    })?;
    let mut table = routing::system_table().context("cannot open the routing table")?;
    if leftover.is_some() {
        drop(journal);
        let report = routing::cleanup_stale(&run_dir, table.as_mut(), Some(args.name()))?;
        for r in &report.removed {
            warn!("removed route {} left by a previous run that did not exit cleanly", r.route);
        }
        return Box::pin(run(args)).await;
    }
    // We hold the name's lock: DNS settings journaled under it are a dead run's.
    for name in dns::cleanup_stale(&run_dir, &[], Some(args.name())) {
        warn!("removed the DNS settings left by a previous run of {name:?}");
    }

    // Conflicts first: nothing has been touched yet.
    let entries = table.list()?;
    let ifaces = routing::interfaces().context("cannot list network interfaces")?;
    let conflicts = routing::find_conflicts(&cidrs, &entries, &ifaces, None);
    for c in conflicts.iter().filter(|c| !c.blocks()) {
        warn!("{c}");
    }
    let blocking: Vec<String> = conflicts.iter().filter(|c| c.blocks()).map(|c| format!("  - {c}")).collect();
    if !blocking.is_empty() && !args.force {
        bail!("the routes would conflict with this machine's network:\n{}\nChoose other --cidr ranges, or pass --force to add them anyway", blocking.join("\n"));
    }

    // The tunnel's addresses (the peer address is also its DNS resolver).
    let tables_now = entries;
    let mut in_use: Vec<IpNet> = ifaces.iter().flat_map(|i| i.networks.iter().copied()).collect();
    in_use.extend(cidrs.iter().copied());
    in_use.extend(tables_now.iter().map(|e| e.route.dest).filter(|d| d.prefix_len() >= 16));
    let ipv4 =
        tunnel::allocate_v4(tunnel::DEFAULT_V4_RANGE, &in_use).context("no free tunnel address in 100.127.0.0/16")?;

    // The SSM session to the ec2-agent.
    let trust = Trust::from_env()?;
    let api = SsmApi::load(&AwsOptions { region: args.region.clone(), profile: args.profile.clone() }, &trust).await?;
    let domains = dns::plan(&args.dns_domains, args.dns_auto, api.region(), &endpoint_overrides())?;
    eprintln!("Starting a session with {} in {}...", args.instance_id(), api.region());
    let live = Arc::new(Mutex::new(Live::default()));
    let config = PortConfig {
        // The forwarder's own send window keeps queues short (SPECIFICATION §6.4),
        // so the channel's in-flight limit only has to cover long, fast paths.
        session: SessionConfig::default(),
        max_backlog: 16 << 10,
        read_chunk: 16 << 10,
        live: Some(live.clone()),
        // The tunnel stays up (routes and all) for as long as the user wants it:
        // keep trying to resume through any outage, a day at most.
        reconnect_for: Duration::from_secs(86_400),
        ..PortConfig::default()
    };
    // Signals are the forwarder's to handle: it tears down routes first.
    let mut session = open_port_session(
        &api,
        args.instance_id(),
        args.agent_port(),
        None,
        &trust,
        config,
        4,
        Box::pin(std::future::pending()),
    )
    .await?;
    let session_id = session.session_id.clone();
    let client_uuid = session.client_id;

    // One stream through the session to the ec2-agent.
    let (local, remote) = tokio::io::duplex(64 << 10);
    let (remote_r, remote_w) = tokio::io::split(remote);
    let _ = session
        .conns
        .send(Conn { reader: Box::new(remote_r), writer: Box::new(remote_w), label: "ec2-agent".into() })
        .await;
    let (mut reader, mut writer) = tokio::io::split(local);
    let split_dns =
        (!domains.is_empty()).then(|| Arc::new(SplitDns::new(vec![IpAddr::V4(ipv4.peer)], domains.clone())));
    let mut client_config =
        ClientConfig { client_id: *client_uuid.as_bytes(), dns: split_dns.clone(), ..ClientConfig::default() };
    let hello = client::handshake(&mut reader, &mut writer, &client_config, args.mtu).await;
    let agent = match hello {
        Ok(h) => h,
        Err(e) => {
            let _ = session.close(&api).await;
            bail!("{e} (instance {}, port {})", args.instance_id(), args.agent_port());
        }
    };
    info!(agent = %agent.0.software, acks = agent.0.caps & wire::caps::ACK != 0, "ec2-agent answered");
    let split_dns = match split_dns {
        Some(_) if agent.0.resolvers.is_empty() => {
            warn!("the ec2-agent found no resolver in the instance's /etc/resolv.conf; DNS is not set up");
            client_config.dns = None;
            None
        }
        other => other,
    };

    // Device and routes.
    let mut id = [0u8; 5];
    id.copy_from_slice(&client_uuid.as_bytes()[..5]);
    let device = Arc::new(TunDevice::create(&TunConfig {
        name: args.interface.clone(),
        ipv4,
        ipv6: Some(tunnel::ula(id)),
        mtu: args.mtu,
    })?);
    let endpoints = endpoint_addresses(api.region(), &session.stream_url).await;
    let pins = routing::endpoint_pins(&endpoints, &cidrs, &tables_now, Some(device.index()))?;
    let mut journal = journal;
    journal.set_interface(device.name())?;
    let mut guard = RouteGuard::new(table, Some(journal));
    for pin in &pins {
        let ifname =
            tables_now.iter().find(|e| e.route.ifindex == pin.ifindex).map(|e| e.ifname.clone()).unwrap_or_default();
        guard.add(pin.clone(), &ifname).with_context(|| format!("pinning the AWS endpoint {}", pin.dest))?;
        info!(route = %pin, "kept an AWS endpoint off the tunnel");
    }
    for cidr in &cidrs {
        guard
            .add(Route::via_interface(*cidr, device.index()), device.name())
            .with_context(|| format!("adding the route for {cidr}"))?;
    }
    let dns_setup = match &split_dns {
        Some(d) => Some(dns::configure(
            dns::detect(std::path::Path::new("/")),
            &run_dir,
            args.name(),
            device.name(),
            IpAddr::V4(ipv4.peer),
            d.domains(),
        )?),
        None => None,
    };

    // Control socket.
    let sock_path = control::socket_path(&run_dir, args.name());
    let _ = std::fs::remove_file(&sock_path);
    let listener =
        tokio::net::UnixListener::bind(&sock_path).with_context(|| format!("cannot create {}", sock_path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o666))?;
    }
    let handle = ClientHandle::new(&client_config);
    let stop_now = Arc::new(Notify::new());
    let started_at = Instant::now();
    let status = {
        let (handle, live) = (handle.clone(), live.clone());
        let base = Status {
            name: args.name().to_string(),
            pid: std::process::id(),
            instance_id: args.instance_id().to_string(),
            region: api.region().to_string(),
            session_id: session_id.clone(),
            cidrs: cidrs.iter().map(ToString::to_string).collect(),
            interface: device.name().to_string(),
            addresses: device.addresses().iter().map(|a| a.addr().to_string()).collect(),
            agent: agent.0.software.clone(),
            ..Status::default()
        };
        move || {
            let l = live.lock().map(|l| l.clone()).unwrap_or_default();
            let q = handle.queue.stats();
            let rtt = handle.stats.rtt_us.load(Ordering::Relaxed);
            Status {
                state: match l.stalled_since.map(|t| t.elapsed()) {
                    _ if !l.connected => "reconnecting".into(),
                    Some(d) if d >= STALL => format!("stalled (no answer for {} s)", d.as_secs()),
                    _ => "connected".into(),
                },
                uptime_secs: started_at.elapsed().as_secs(),
                sent: Counter::from(&handle.stats.sent),
                received: Counter::from(&handle.stats.received),
                rtt_ms: (rtt > 0).then(|| rtt as f64 / 1000.0),
                channel_srtt_ms: l.stats.srtt.as_secs_f64() * 1000.0,
                retransmissions: l.stats.retransmissions,
                reconnects: l.reconnects,
                dropped_codel: q.dropped_codel,
                dropped_overflow: q.dropped_overflow,
                dropped_device: handle.device_drops.load(Ordering::Relaxed),
                queue_delay_ms: q.last_delay.as_secs_f64() * 1000.0,
                queue_delay_max_ms: q.max_delay.as_secs_f64() * 1000.0,
                dns_domains: split_dns.iter().flat_map(|d| d.domains().iter().map(ToString::to_string)).collect(),
                dns_server: split_dns.as_ref().map(|_| ipv4.peer.to_string()),
                dns_forwarded: split_dns.as_ref().map_or(0, |d| d.forwarded.load(Ordering::Relaxed)),
                dns_refused: split_dns.as_ref().map_or(0, |d| d.refused.load(Ordering::Relaxed)),
                window_bytes: handle.stats.window.load(Ordering::Relaxed),
                in_flight_bytes: handle.stats.in_flight.load(Ordering::Relaxed),
                ..base.clone()
            }
        }
    };
    let notify = stop_now.clone();
    let control_task = tokio::spawn(control::serve(listener, owner_uid(), status, move || notify.notify_one()));

    println!(
        "ssm-proxy: tunnel {:?} up: {} via {} -> {} (session {session_id}). Ctrl-C or `sudo ssm-proxy stop --name {}` ends it.",
        args.name(),
        cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
        device.name(),
        args.instance_id(),
        args.name()
    );
    release_stdout();

    let shutdown = async move {
        tokio::select! {
            () = shutdown_signal() => info!("signal received; stopping"),
            () = stop_now.notified() => info!("stop requested; stopping"),
        }
    };
    let link_end = tokio::select! {
        end = client::run(device.clone(), reader, writer, agent, &client_config, handle.clone(), shutdown) => end,
        done = &mut session.task => {
            // The session ended on its own; tear down and report it.
            control_task.abort();
            let _ = std::fs::remove_file(&sock_path);
            drop(dns_setup);
            drop(guard);
            drop(device);
            return finish(&api, &session_id, done).await.and_then(|()| bail!("the SSM session ended"));
        }
    };
    if let Some(end) = link_end {
        warn!("the link to the ec2-agent ended: {end}");
    }
    // Teardown, in order: control socket, DNS, routes, device, session.
    control_task.abort();
    let _ = std::fs::remove_file(&sock_path);
    drop(dns_setup);
    let errors = guard.remove_all();
    drop(guard);
    drop(device);
    let result = session.close(&api).await;
    if !errors.is_empty() {
        bail!("{} route(s) could not be removed; run `sudo ssm-proxy cleanup`", errors.len());
    }
    eprintln!("Tunnel {:?} stopped.", args.name());
    result
}
