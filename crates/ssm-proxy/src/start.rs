//! `ssm-proxy start`: the tunnel daemon. Pre-flight checks, the SSM Port session to
//! the ec2-agent, the TUN/utun device, routes, then packets until stopped; teardown in
//! reverse order on every exit path.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::aws::{AwsOptions, SsmApi};
use crate::daemon::link::{ClientConfig, ClientHandle};
use anyhow::{bail, Context};
use forwarder::dns::{Domain, SplitDns};
use forwarder::wire;
use ipnet::IpNet;
use routing::{Journal, Route, RouteGuard};
use ssm_channel::transport::Trust;
use tokio::sync::Notify;
use tracing::{info, warn};
use tunnel::{Device, TunConfig};

use crate::daemon::platform::{Platform, System, TunnelDevice};

use crate::config;
use crate::daemon::control::{self, Status};
use crate::daemon::dns;
use crate::daemon::uplink::{connect_first, supervise, Candidates, LinkState, Target};
use crate::ssm::{parse_instance_id, shutdown_signal};

pub use forwarder::wire::DEFAULT_AGENT_PORT;

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  sudo ssm-proxy start --instance-id i-0abc123def4567890 --cidr 10.0.0.0/16
  sudo ssm-proxy start --instance-id i-0abc123def4567890 --cidr 10.1.0.0/16 --cidr 10.2.0.0/16 \\
       --name staging --profile staging --region eu-west-1

  sudo ssm-proxy start --instance-id i-0abc123def4567890 --cidr 10.0.0.0/16 \\
       --dns-domain corp.internal --dns-auto
  sudo ssm-proxy start --instance-tag Role=ssm-proxy --cidr 10.0.0.0/16 --rotate-after 55m
                                     # any online instance with the tag; fails over between
                                     # them; a new session every 55 minutes, made before break
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
    /// The managed instance running the ec2-agent (i-... or mi-...). Repeat it
    /// to name fallbacks: the first that answers carries the tunnel, and when it
    /// stops answering the tunnel moves to the next.
    #[arg(long = "instance-id", value_name = "ID", value_parser = parse_instance_id)]
    instance_ids: Vec<String>,
    /// Use the managed instances with this tag whose SSM agent is online
    /// (repeatable: all tags must match), after any --instance-id. They are
    /// looked up again whenever a new session is needed, so a replaced
    /// instance (an Auto Scaling group's, say) is found.
    #[arg(long = "instance-tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    instance_tags: Vec<(String, String)>,
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
    #[arg(long, default_value_t = tunnel::DEFAULT_MTU, value_parser = clap::value_parser!(u16).range(i64::from(wire::MIN_MTU)..))]
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
    /// Replace the SSM session this often, opening the new one before the old
    /// one goes (make before break), e.g. 55m when the account's maximum
    /// session duration is 60 minutes. Without it, a session the service ends
    /// is replaced after it ended (a second or so of stall).
    #[arg(long, value_name = "DURATION", value_parser = parse_period)]
    rotate_after: Option<Duration>,
    /// Also resolve the region's EC2 internal names (<region>.compute.internal, or
    /// ec2.internal in us-east-1), eks.amazonaws.com and the Route 53 private
    /// hosted zones of the instance's VPC through the tunnel.
    #[arg(long)]
    dns_auto: bool,
    /// SSM sessions to stripe the tunnel over [default: 4]. The stock SSM agent
    /// sends about 1 MB/s per session; the packets of even one connection are
    /// spread over all N and put back in order, so N sessions carry about N MB/s,
    /// and a ping need not wait behind a download. 1 keeps one session. Each is
    /// an ordinary session (CloudTrail shows N); an ec2-agent that cannot stripe
    /// gets one.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=i64::from(config::MAX_SESSIONS)))]
    sessions: Option<u16>,
    /// Why you open the tunnel: StartSession's Reason on every session it
    /// opens (members, replacements and rotations too), shown in CloudTrail and
    /// the Session Manager console; a policy can require one (README, IAM).
    /// 1-256 characters [default: "ssm-proxy"].
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

pub fn parse_tag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE (say --instance-tag Role=ssm-proxy)")),
    }
}

/// "55m", "1h 30m", "90s"; at least a second.
pub fn parse_period(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (say 55m, 1h30m or 90s)"))?;
    if d < Duration::from_secs(1) {
        return Err("at least 1s".into());
    }
    Ok(d)
}

fn parse_domain(s: &str) -> Result<Domain, String> {
    Domain::parse(s).map_err(|e| e.to_string())
}

const DETACHED_ENV: &str = "SSM_PROXY_DETACHED";

/// Unanswered data for this long makes `status` say the link is stalled.
/// Member sessions a tunnel stripes over unless told.
const DEFAULT_SESSIONS: u16 = 4;

const STALL: Duration = Duration::from_secs(3);

impl StartArgs {
    pub fn detach(&self) -> bool {
        self.detach
    }

    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("default")
    }

    /// Member sessions to stripe over.
    fn sessions(&self) -> usize {
        usize::from(self.sessions.unwrap_or(DEFAULT_SESSIONS))
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
        if args.instance_ids.is_empty() && args.instance_tags.is_empty() {
            args.instance_ids = t.instance_ids;
            args.instance_tags = t.instance_tags;
        }
        args.rotate_after = args.rotate_after.or(t.rotate_after);
        args.sessions = args.sessions.or(t.sessions);
        args.reason = args.reason.or(t.reason);
        args.proxy = args.proxy.or(t.proxy);
        args.ssmmessages_endpoint = args.ssmmessages_endpoint.or(t.ssmmessages_endpoint);
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
    // Each candidate once, in the order given (dedup alone misses A B A).
    let mut seen = Vec::new();
    args.instance_ids.retain(|i| {
        !seen.contains(i) && {
            seen.push(i.clone());
            true
        }
    });
    if args.instance_ids.is_empty() && args.instance_tags.is_empty() {
        bail!(
            "say which instance: --instance-id i-..., --instance-tag KEY=VALUE, \
             or the NAME of a tunnel in the config file (`ssm-proxy list`)"
        );
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

/// `--dns-auto`: the split DNS with the Route 53 private zones of the
/// instance's VPC added (as the ec2-agent reported it), or `None` when there
/// is nothing to add. Failures only warn: the other domains still work.
async fn private_zones(api: &SsmApi, vpc: Option<&(String, String)>, dns: &SplitDns) -> Option<SplitDns> {
    let Some((vpc, vpc_region)) = vpc else {
        info!("the ec2-agent did not report its VPC (no instance metadata?); Route 53 private zones are not added");
        return None;
    };
    let zones = match api.private_zones(vpc, vpc_region).await {
        Ok(z) => z,
        Err(e) => {
            warn!("{e}; Route 53 private zones of {vpc} are not resolved through the tunnel");
            return None;
        }
    };
    let mut domains = dns.domains().to_vec();
    let added = dns::add_zones(&mut domains, &zones, api.region(), &endpoint_overrides());
    if added.is_empty() {
        return None;
    }
    let names: Vec<String> = added.iter().map(ToString::to_string).collect();
    info!(%vpc, zones = %names.join(", "), "Route 53 private zones resolve through the tunnel");
    Some(SplitDns::new(dns.addresses().to_vec(), domains))
}

/// The user behind `sudo`, who may stop the tunnel too.
fn owner_uid() -> u32 {
    std::env::var("SUDO_UID").ok().and_then(|u| u.parse().ok()).unwrap_or_else(|| nix::unistd::getuid().as_raw())
}

pub async fn run(args: StartArgs) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("start creates a network device and routes: run it with sudo");
    }
    let mut link = SsmLink::default();
    run_on(&System, &args, &mut link).await
}

/// The tunnel's SSM side, as the daemon's phases see it: `connect` until the
/// ec2-agent has answered, `serve` until asked to stop, `finish` to close
/// the session. [`SsmLink`] is the real one; tests stand in their own.
pub(crate) trait Link<D: TunnelDevice> {
    async fn connect(&mut self, args: &StartArgs, plan: &Plan) -> anyhow::Result<Answered>;
    async fn serve(&mut self, args: &StartArgs, plan: &Plan, installed: &Installed<D>) -> anyhow::Result<()>;
    async fn finish(&mut self) -> anyhow::Result<()>;
}

/// The daemon, in named phases: preflight (checks; nothing changed but a
/// dead run's leftovers), connect (an SSM session and the ec2-agent's
/// answer), install (device, routes, DNS), serve, then teardown on every
/// path that installed anything (DNS, routes and device, then the session).
pub(crate) async fn run_on<P: Platform>(
    platform: &P,
    args: &StartArgs,
    link: &mut impl Link<P::Device>,
) -> anyhow::Result<()> {
    let mut plan = preflight(platform, args)?;
    let answered = match link.connect(args, &plan).await {
        Ok(a) => a,
        Err(e) => {
            let _ = link.finish().await;
            return Err(e);
        }
    };
    let installed = match install(platform, args, &mut plan, &answered) {
        Ok(i) => i,
        Err(e) => {
            let _ = link.finish().await;
            return Err(e);
        }
    };
    let served = link.serve(args, &plan, &installed).await;
    let errors = installed.teardown();
    let closed = link.finish().await;
    served?;
    if errors > 0 {
        bail!("{errors} route(s) could not be removed; run `sudo ssm-proxy cleanup`");
    }
    eprintln!("Tunnel {:?} stopped.", args.name());
    closed
}

/// What preflight found: the routes to add, the tunnel's addresses, and the
/// name's journal (held: no other run of this name can start).
pub(crate) struct Plan {
    pub cidrs: Vec<IpNet>,
    journal: Option<Journal>,
    pub routes_now: Vec<routing::RouteEntry>,
    pub ipv4: tunnel::V4Pair,
    pub client_uuid: uuid::Uuid,
    pub run_dir: PathBuf,
}

/// The ec2-agent answered: what install needs from the connect phase.
pub(crate) struct Answered {
    /// Addresses the tunnel itself talks to, kept off its routes.
    pub endpoints: Vec<IpAddr>,
    /// Split DNS as the agent's answer settled it.
    pub split_dns: Option<Arc<SplitDns>>,
}

/// What install put in place; [`Installed::teardown`] takes it away.
pub(crate) struct Installed<D> {
    pub device: Arc<D>,
    guard: RouteGuard,
    dns_setup: Option<dns::DnsSetup>,
}

impl<D> Installed<D> {
    /// DNS, routes, device, in that order; returns how many routes could not
    /// be removed (journaled for `cleanup`).
    fn teardown(self) -> usize {
        let Installed { device, mut guard, dns_setup } = self;
        drop(dns_setup);
        let errors = guard.remove_all();
        for (route, e) in &errors {
            warn!("could not remove route {route}: {e}");
        }
        drop(guard);
        drop(device);
        errors.len()
    }
}

/// Checks before anything changes: the name is free (a dead run's routes and
/// DNS settings are cleaned first), the CIDRs conflict with nothing here
/// (or `--force`), and there is a free tunnel address.
fn preflight(platform: &impl Platform, args: &StartArgs) -> anyhow::Result<Plan> {
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
    let run_dir = platform.run_dir();
    let mut table = platform.route_table()?;
    let journal = loop {
        let (journal, leftover) = Journal::open(&run_dir, args.name()).map_err(|e| match e {
            routing::JournalError::InUse { .. } => anyhow::anyhow!(
                "a tunnel named {:?} is already running (see `ssm-proxy status`); stop it or pick another --name",
                args.name()
            ),
            other => anyhow::anyhow!(other),
        })?;
        if leftover.is_none() {
            break journal;
        }
        drop(journal);
        let report = routing::cleanup_stale(&run_dir, table.as_mut(), Some(args.name()))?;
        for r in &report.removed {
            warn!("removed route {} left by a previous run that did not exit cleanly", r.route);
        }
    };
    // We hold the name's lock: DNS settings journaled under it are a dead run's.
    for name in dns::cleanup_stale(&run_dir, &[], Some(args.name())) {
        warn!("removed the DNS settings left by a previous run of {name:?}");
    }
    let routes_now = table.list()?;
    let ifaces = platform.interfaces()?;
    let conflicts = routing::find_conflicts(&cidrs, &routes_now, &ifaces, None);
    for c in conflicts.iter().filter(|c| !c.blocks()) {
        warn!("{c}");
    }
    let blocking: Vec<String> = conflicts.iter().filter(|c| c.blocks()).map(|c| format!("  - {c}")).collect();
    if !blocking.is_empty() && !args.force {
        bail!("the routes would conflict with this machine's network:\n{}\nChoose other --cidr ranges, or pass --force to add them anyway", blocking.join("\n"));
    }
    // The tunnel's addresses (the peer address is also its DNS resolver).
    let mut in_use: Vec<IpNet> = ifaces.iter().flat_map(|i| i.networks.iter().copied()).collect();
    in_use.extend(cidrs.iter().copied());
    in_use.extend(routes_now.iter().map(|e| e.route.dest).filter(|d| d.prefix_len() >= 16));
    let ipv4 =
        tunnel::allocate_v4(tunnel::DEFAULT_V4_RANGE, &in_use).context("no free tunnel address in 100.127.0.0/16")?;
    Ok(Plan { cidrs, journal: Some(journal), routes_now, ipv4, client_uuid: uuid::Uuid::new_v4(), run_dir })
}

/// The device, the routes (AWS endpoints pinned off the tunnel first, then
/// the CIDRs) and split DNS. On failure everything added so far is removed
/// again before the error returns.
fn install<P: Platform>(
    platform: &P,
    args: &StartArgs,
    plan: &mut Plan,
    answered: &Answered,
) -> anyhow::Result<Installed<P::Device>> {
    let mut id = [0u8; 5];
    id.copy_from_slice(&plan.client_uuid.as_bytes()[..5]);
    let device = platform.create_device(&TunConfig {
        name: args.interface.clone(),
        ipv4: plan.ipv4,
        ipv6: Some(tunnel::ula(id)),
        mtu: args.mtu,
    })?;
    let pins = routing::endpoint_pins(&answered.endpoints, &plan.cidrs, &plan.routes_now, Some(device.index()))?;
    let mut journal = plan.journal.take().context("installed twice")?;
    journal.set_interface(device.name())?;
    let mut guard = RouteGuard::new(platform.route_table()?, Some(journal));
    for pin in &pins {
        let ifname = plan
            .routes_now
            .iter()
            .find(|e| e.route.ifindex == pin.ifindex)
            .map(|e| e.ifname.clone())
            .unwrap_or_default();
        guard.add(pin.clone(), &ifname).with_context(|| format!("pinning the AWS endpoint {}", pin.dest))?;
        info!(route = %pin, "kept an AWS endpoint off the tunnel");
    }
    for cidr in &plan.cidrs {
        guard
            .add(Route::via_interface(*cidr, device.index()), device.name())
            .with_context(|| format!("adding the route for {cidr}"))?;
    }
    let dns_setup = match &answered.split_dns {
        Some(d) => Some(dns::configure(
            platform.dns_backend(),
            &plan.run_dir,
            args.name(),
            device.name(),
            IpAddr::V4(plan.ipv4.peer),
            d.domains(),
        )?),
        None => None,
    };
    Ok(Installed { device, guard, dns_setup })
}

/// The real link: SSM sessions to the ec2-agent.
#[derive(Default)]
struct SsmLink {
    api: Option<SsmApi>,
    trust: Option<Trust>,
    candidates: Option<Candidates>,
    instances: Vec<String>,
    up: Option<crate::daemon::uplink::Uplink>,
    client: Option<ClientConfig>,
    /// The session to close at the end.
    last: Option<crate::ssm::PortSession>,
    network: Option<(tokio::sync::watch::Sender<u64>, tokio::sync::watch::Receiver<u64>)>,
}

impl<D: TunnelDevice> Link<D> for SsmLink {
    async fn connect(&mut self, args: &StartArgs, plan: &Plan) -> anyhow::Result<Answered> {
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
        let domains = dns::plan(&args.dns_domains, args.dns_auto, api.region(), &endpoint_overrides())?;
        let candidates = Candidates { ids: args.instance_ids.clone(), tags: args.instance_tags.clone() };
        let instances = candidates.resolve(&api).await?;
        if !candidates.tags.is_empty() {
            eprintln!("Instances tagged {}: {}", candidates.tags_text(), instances.join(", "));
        }
        eprintln!("Starting a session with {} in {}...", instances.join(" or "), api.region());
        // Network changes are watched once our own routes are in place.
        let (net_tx, net_rx) = tokio::sync::watch::channel(0u64);
        let split_dns =
            (!domains.is_empty()).then(|| Arc::new(SplitDns::new(vec![IpAddr::V4(plan.ipv4.peer)], domains.clone())));
        // One client id for the tunnel's life: the agent knows us by it after a new session.
        let mut client =
            ClientConfig { client_id: *plan.client_uuid.as_bytes(), dns: split_dns.clone(), ..ClientConfig::default() };
        if args.sessions() > 1 {
            // The agent joins our sessions into one link instead of letting each take over.
            client.caps |= wire::caps::STRIPE;
        }
        let target = target(&api, &trust, args, &client, net_rx.clone());
        let up = connect_first(&target, &instances).await?;
        let agent = up.agent.0.clone();
        info!(instance = %up.instance, agent = %agent.software, acks = agent.caps & wire::caps::ACK != 0, "ec2-agent answered");
        let split_dns = match split_dns {
            Some(_) if agent.resolvers.is_empty() => {
                warn!("the ec2-agent found no resolver in the instance's /etc/resolv.conf; DNS is not set up");
                None
            }
            Some(d) if args.dns_auto => private_zones(&api, agent.vpc.as_ref(), &d).await.map(Arc::new).or(Some(d)),
            other => other,
        };
        client.dns = split_dns.clone();
        let endpoints = endpoint_addresses(api.region(), &up.session.stream_url).await;
        (self.api, self.trust, self.candidates, self.instances) = (Some(api), Some(trust), Some(candidates), instances);
        (self.up, self.client, self.network) = (Some(up), Some(client), Some((net_tx, net_rx)));
        Ok(Answered { endpoints, split_dns })
    }

    async fn serve(&mut self, args: &StartArgs, plan: &Plan, installed: &Installed<D>) -> anyhow::Result<()> {
        let (Some(api), Some(trust), Some(up), Some(client), Some((net_tx, net_rx))) =
            (&self.api, &self.trust, self.up.take(), &self.client, self.network.take())
        else {
            bail!("serve before connect");
        };
        let candidates = self.candidates.clone().unwrap_or_default();
        let target = target(api, trust, args, client, net_rx);
        let session_id = up.session.session_id.clone();
        let link_state = Arc::new(Mutex::new(LinkState {
            instance_id: up.instance.clone(),
            session_id: session_id.clone(),
            agent: up.agent.0.software.clone(),
            live: up.live.clone(),
            candidates: self.instances.clone(),
            ..LinkState::default()
        }));
        let handle = ClientHandle::new(client, args.sessions());
        let device = installed.device.clone();
        let sock_path = control::socket_path(&plan.run_dir, args.name());
        let stop_now = Arc::new(Notify::new());
        let status = status_fn(args, plan, api.region(), &*device, &handle, &link_state, client.dns.clone());
        let control_task = serve_control(&sock_path, status, stop_now.clone())?;
        crate::daemon::netwatch::spawn(net_tx, device.index());
        println!(
            "ssm-proxy: tunnel {:?} up: {} via {} -> {} (session {session_id}). Ctrl-C or `sudo ssm-proxy stop --name {}` ends it.",
            args.name(),
            plan.cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            device.name(),
            up.instance,
            args.name()
        );
        release_stdout();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown_signal() => info!("signal received; stopping"),
                () = stop_now.notified() => info!("stop requested; stopping"),
            }
            let _ = stop_tx.send(true);
        });
        self.last = supervise(&target, &candidates, up, device, handle, link_state, stop_rx).await;
        // The control socket goes first: `status` must not report a tunnel that is going.
        control_task.abort();
        let _ = std::fs::remove_file(&sock_path);
        Ok(())
    }

    async fn finish(&mut self) -> anyhow::Result<()> {
        let session = self.last.take().or_else(|| self.up.take().map(|u| u.session));
        match (session, &self.api) {
            (Some(session), Some(api)) => session.close(api).await,
            _ => Ok(()),
        }
    }
}

fn target<'a>(
    api: &'a SsmApi,
    trust: &'a Trust,
    args: &StartArgs,
    client: &ClientConfig,
    network_changed: tokio::sync::watch::Receiver<u64>,
) -> Target<'a> {
    Target {
        api,
        trust,
        port: args.agent_port(),
        mtu: args.mtu,
        client: client.clone(),
        rotate_after: args.rotate_after,
        network_changed,
        sessions: args.sessions(),
    }
}

/// The control socket, readable by any user (it checks who asks), serving
/// `status` and `stop`.
fn serve_control(
    sock_path: &std::path::Path,
    status: impl Fn() -> Status + Send + Sync + 'static,
    stop_now: Arc<Notify>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let _ = std::fs::remove_file(sock_path);
    let listener =
        tokio::net::UnixListener::bind(sock_path).with_context(|| format!("cannot create {}", sock_path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(sock_path, std::fs::Permissions::from_mode(0o666))?;
    }
    Ok(tokio::spawn(control::serve(listener, owner_uid(), status, move || stop_now.notify_one())))
}

mod report;
use report::status_fn;

#[cfg(test)]
mod tests;
