//! `ssm-proxy agent status`: how an instance's ec2-agent is doing, asked
//! through a Port session to its port like a tunnel would (no shell, no SSH):
//! a HELLO with the QUERY capability, answered by one STATUS frame.
//! `agent install` / `uninstall` ([`install`]) put it there through a shell
//! session ([`remote`]).

mod install;
mod remote;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::aws::{AwsOptions, SsmApi};
use crate::daemon::link::{handshake, ClientConfig};
use anyhow::{bail, Context};
use forwarder::link;
use forwarder::wire::{caps, Frame};
use ssm_channel::port::{Conn, PortConfig};
use ssm_channel::transport::Trust;

use crate::ssm::{agent_stream, open_port_session, parse_instance_id};
use crate::start::DEFAULT_AGENT_PORT;

/// An agent that does not answer the query within this long is too old to know it.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    #[command(subcommand)]
    command: AgentCommand,
}

#[derive(Debug, clap::Subcommand)]
enum AgentCommand {
    /// Ask an instance's ec2-agent for its version, uptime, sessions and policy.
    #[command(after_help = "Examples:
  ssm-proxy agent status --instance-id i-0abc123def4567890
  ssm-proxy agent status --instance-id i-0abc123def4567890 --agent-port 7302 --json

Needs the same permissions as `start` (ssm:StartSession with AWS-StartPortForwardingSession),
no root.")]
    Status(StatusArgs),
    /// Put the ec2-agent on an instance through SSM (no internet, S3 or SSH needed there).
    #[command(after_help = "Examples:
  ssm-proxy agent install --instance-id i-0abc123def4567890
  ssm-proxy agent install --instance-id i-0abc123def4567890 --upgrade
  ssm-proxy agent install --instance-id i-0abc123def4567890 --agent-binary ./ec2-agent-linux-aarch64

Finds the instance's OS and architecture through a shell session, sends the matching static
ec2-agent (from --agent-binary, or ec2-agent-linux-ARCH next to this ssm-proxy), installs it as
PREFIX/bin/ec2-agent with a systemd unit (ec2-agent.service: an unprivileged dynamic user,
listening on 127.0.0.1:PORT), starts it and checks that it answers. Running it again changes
nothing; another build already there is replaced only with --upgrade.

Needs ssm:StartSession on the document SSM-SessionManagerRunShell (a shell as ssm-user, who
needs passwordless sudo, as Session Manager sets it up) besides the tunnel's permissions.")]
    Install(InstallArgs),
    /// Stop the ec2-agent on an instance and remove what `agent install` put there.
    #[command(after_help = "Example:
  ssm-proxy agent uninstall --instance-id i-0abc123def4567890")]
    Uninstall(InstallArgs),
}

#[derive(Debug, clap::Args)]
struct InstallArgs {
    /// The managed instance (i-... or mi-...).
    #[arg(long, value_parser = parse_instance_id)]
    instance_id: String,
    /// The port the ec2-agent listens on, on the instance's loopback.
    #[arg(long, default_value_t = DEFAULT_AGENT_PORT)]
    agent_port: u16,
    /// The ec2-agent executable to send (static Linux x86_64 or aarch64, matching the instance).
    #[arg(long, value_name = "PATH")]
    agent_binary: Option<PathBuf>,
    /// Replace an ec2-agent of another build already on the instance.
    #[arg(long)]
    upgrade: bool,
    /// Without systemd: run the agent as a background process as `nobody`
    /// (pid and log in PREFIX/var/ec2-agent/); not restarted after a crash or reboot.
    #[arg(long)]
    no_systemd: bool,
    /// Installation prefix on the instance: the binary goes to PREFIX/bin.
    #[arg(long, default_value = "/usr/local", value_name = "DIR")]
    prefix: String,
    /// AWS region (default: from the environment or profile).
    #[arg(long)]
    region: Option<String>,
    /// AWS profile to use.
    #[arg(long)]
    profile: Option<String>,
    /// HTTP proxy for the AWS API and the data channel, as http://[user:password@]host:port
    /// [default: HTTPS_PROXY/HTTP_PROXY/ALL_PROXY, bypassed for NO_PROXY hosts, as curl
    /// reads them; sudo drops these variables unless kept: `sudo --preserve-env=HTTPS_PROXY,NO_PROXY`]
    #[arg(long, value_name = "URL")]
    proxy: Option<String>,
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    /// The managed instance running the ec2-agent (i-... or mi-...).
    #[arg(long, value_parser = parse_instance_id)]
    instance_id: String,
    /// The ec2-agent's port on the instance's loopback.
    #[arg(long, default_value_t = DEFAULT_AGENT_PORT)]
    agent_port: u16,
    /// AWS region (default: from the environment or profile).
    #[arg(long)]
    region: Option<String>,
    /// AWS profile to use.
    #[arg(long)]
    profile: Option<String>,
    /// HTTP proxy for the AWS API and the data channel, as http://[user:password@]host:port
    /// [default: HTTPS_PROXY/HTTP_PROXY/ALL_PROXY, bypassed for NO_PROXY hosts, as curl
    /// reads them; sudo drops these variables unless kept: `sudo --preserve-env=HTTPS_PROXY,NO_PROXY`]
    #[arg(long, value_name = "URL")]
    proxy: Option<String>,
    /// Print the agent's answer as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let args = match args.command {
        AgentCommand::Status(a) => a,
        AgentCommand::Install(a) => return install(a).await,
        AgentCommand::Uninstall(a) => return uninstall(a).await,
    };
    let trust = crate::aws::trust(args.proxy.as_deref())?;
    let api = load_api(&args.region, &args.profile, &trust).await?;
    let v = query(&api, &trust, &args.instance_id, args.agent_port).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", render(&args.instance_id, &v));
    }
    Ok(())
}

/// The API client of the `agent` commands, whose sessions say why they exist.
async fn load_api(region: &Option<String>, profile: &Option<String>, trust: &Trust) -> anyhow::Result<SsmApi> {
    let opts = AwsOptions {
        region: region.clone(),
        profile: profile.clone(),
        reason: Some("ssm-proxy agent".into()),
        ssmmessages_endpoint: None,
    };
    Ok(SsmApi::load(&opts, trust).await?)
}

/// The agent's STATUS, through a Port session of its own.
async fn query(api: &SsmApi, trust: &Trust, instance: &str, port: u16) -> anyhow::Result<serde_json::Value> {
    let session =
        open_port_session(api, instance, port, None, trust, PortConfig::default(), 1, Box::pin(std::future::pending()))
            .await?;
    let answer = ask(&session.conns).await;
    let closed = session.close(api).await;
    let json = answer.with_context(|| format!("no status from the ec2-agent on {instance} port {port}"))?;
    closed?;
    serde_json::from_str(&json).context("the agent's status is not JSON")
}

async fn open_shell(args: &InstallArgs) -> anyhow::Result<(SsmApi, Trust, remote::RemoteShell, install::Layout)> {
    let trust = crate::aws::trust(args.proxy.as_deref())?;
    let api = load_api(&args.region, &args.profile, &trust).await?;
    if !args.prefix.starts_with('/') {
        bail!("--prefix {:?} must be an absolute path", args.prefix);
    }
    eprintln!("Opening a shell session on {} ...", args.instance_id);
    let sh = remote::RemoteShell::open(&api, &args.instance_id, &trust).await?;
    let layout = install::Layout { prefix: args.prefix.trim_end_matches('/').to_owned(), port: args.agent_port };
    Ok((api, trust, sh, layout))
}

async fn install(args: InstallArgs) -> anyhow::Result<()> {
    let (api, trust, mut sh, layout) = open_shell(&args).await?;
    // Ctrl-C still ends the shell session (and its temporary files) properly.
    let result = tokio::select! {
        r = install_through(&mut sh, &args, &layout) => r,
        _ = crate::ssm::shutdown_signal() => Err(anyhow::anyhow!("interrupted; nothing was started")),
    };
    let closed = sh.close(&api).await;
    let plan = result?;
    if let Err(e) = closed {
        tracing::warn!("closing the shell session: {e:#}");
    }
    // The agent needs a moment to listen after a (re)start.
    let deadline = Instant::now() + Duration::from_secs(if plan == install::Plan::Nothing { 1 } else { 20 });
    let v = loop {
        match query(&api, &trust, &args.instance_id, args.agent_port).await {
            Ok(v) => break v,
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!(
                    "the ec2-agent was installed on {} but does not answer on port {}",
                    args.instance_id, args.agent_port
                )))
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    };
    println!(
        "{} answers on {} port {} (up {} s).",
        v["software"].as_str().unwrap_or("the ec2-agent"),
        args.instance_id,
        args.agent_port,
        v["uptime_secs"].as_u64().unwrap_or(0)
    );
    Ok(())
}

async fn install_through(
    sh: &mut remote::RemoteShell,
    args: &InstallArgs,
    layout: &install::Layout,
) -> anyhow::Result<install::Plan> {
    let instance = &args.instance_id;
    let probe = install::probe(sh, layout).await?;
    install::check_instance(&probe, args.no_systemd, instance)?;
    let s = probe.root_prefix(instance)?;
    let (path, binary) = install::local_binary(args.agent_binary.as_deref(), &probe.arch)?;
    let sha = install::sha256_hex(&binary);
    let plan = install::plan(&probe, &sha, args.upgrade, args.no_systemd, instance)?;
    let service = if args.no_systemd { "a background process" } else { "ec2-agent.service" };
    match plan {
        install::Plan::Nothing => {
            eprintln!("{instance} already runs this ec2-agent ({}); nothing to do.", short(&sha));
            return Ok(plan);
        }
        install::Plan::Start => eprintln!("This ec2-agent is installed on {instance} but not running; starting it."),
        install::Plan::Install { replace } => eprintln!(
            "{} {} ({}, {:.1} MiB) on {instance} ({} {}) as {}, {service}.",
            if replace { "Replacing the ec2-agent with" } else { "Installing" },
            path.display(),
            short(&sha),
            binary.len() as f64 / (1 << 20) as f64,
            probe.os,
            probe.arch,
            layout.bin(),
        ),
    }
    let tmp = match plan {
        install::Plan::Install { .. } => {
            let gzip = probe.has("gzip");
            let started = Instant::now();
            let mut meter = Progress::new("sending the ec2-agent");
            let tmp = sh.upload(&binary, gzip, |sent, total| meter.show(sent, total)).await?;
            meter.done(started.elapsed());
            Some(tmp)
        }
        _ => None,
    };
    let unit_tmp = match args.no_systemd {
        true => None,
        false => Some(sh.upload(install::systemd_unit(layout).as_bytes(), false, |_, _| {}).await?),
    };
    let script = install::install_script(layout, s, tmp.as_deref(), unit_tmp.as_deref());
    let out = sh.run_ok("installing the ec2-agent", &script).await?;
    tracing::debug!("install output: {out}");
    Ok(plan)
}

async fn uninstall(args: InstallArgs) -> anyhow::Result<()> {
    let (api, _trust, mut sh, layout) = open_shell(&args).await?;
    let result = tokio::select! {
        r = async {
            let probe = install::probe(&mut sh, &layout).await?;
            let s = probe.root_prefix(&args.instance_id)?;
            sh.run_ok("removing the ec2-agent", &install::uninstall_script(&layout, s)).await
        } => r,
        _ = crate::ssm::shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
    };
    let closed = sh.close(&api).await;
    let out = result?;
    if let Err(e) = closed {
        tracing::warn!("closing the shell session: {e:#}");
    }
    let done: Vec<(&str, &str)> = out.lines().filter_map(|l| l.split_once('=')).collect();
    if done.is_empty() {
        println!(
            "No ec2-agent from `agent install` on {} (prefix {}); nothing removed.",
            args.instance_id, args.prefix
        );
    }
    for (what, which) in done {
        println!("{what} {which}");
    }
    Ok(())
}

fn short(sha: &str) -> String {
    format!("sha256 {}", &sha[..12.min(sha.len())])
}

/// Progress of a transfer on stderr: one updating line on a terminal, a line
/// per quarter otherwise.
struct Progress {
    what: &'static str,
    tty: bool,
    shown: usize,
    last: Option<Instant>,
}

impl Progress {
    fn new(what: &'static str) -> Progress {
        Progress { what, tty: std::io::stderr().is_terminal(), shown: 0, last: None }
    }

    fn show(&mut self, sent: usize, total: usize) {
        let pct = sent * 100 / total.max(1);
        let due = if self.tty {
            self.last.is_none_or(|t| t.elapsed() >= Duration::from_millis(250)) || sent == total
        } else {
            pct / 25 > self.shown / 25
        };
        if due {
            let mb = |n: usize| n as f64 / 1e6;
            let line = format!("{}: {:.1} of {:.1} MB ({pct}%)", self.what, mb(sent), mb(total));
            if self.tty {
                eprint!("\r{line}");
            } else {
                eprintln!("{line}");
            }
            self.shown = pct;
            self.last = Some(Instant::now());
        }
    }

    fn done(&self, took: Duration) {
        if self.tty {
            eprintln!();
        }
        eprintln!("{}: done in {:.1} s", self.what, took.as_secs_f64());
    }
}

/// HELLO with QUERY through a new connection of the session; the STATUS answer.
async fn ask(conns: &tokio::sync::mpsc::Sender<Conn>) -> anyhow::Result<String> {
    let (mut reader, mut writer) = agent_stream(conns).await?;
    let config = ClientConfig { caps: caps::QUERY, hello_timeout: ANSWER_TIMEOUT, ..ClientConfig::default() };
    let (_agent, mut deframer) = handshake(&mut reader, &mut writer, &config, forwarder::wire::MIN_MTU).await?;
    match tokio::time::timeout(ANSWER_TIMEOUT, link::read_frame(&mut reader, &mut deframer)).await {
        Ok(Ok(Frame::Status(json))) => Ok(json),
        Ok(Ok(Frame::Goodbye { message, .. })) => bail!("the agent said goodbye: {message}"),
        Ok(Ok(other)) => bail!("the agent answered {other:?} instead of its status"),
        Ok(Err(e)) => bail!("{e}"),
        Err(_) => bail!(
            "the agent did not answer the status query within {} s; it may predate `agent status` (upgrade it)",
            ANSWER_TIMEOUT.as_secs()
        ),
    }
}

fn render(instance: &str, v: &serde_json::Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("-").to_string();
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    let list = |k: &str| {
        let items: Vec<&str> =
            v[k].as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect()).unwrap_or_default();
        if items.is_empty() {
            "-".to_string()
        } else {
            items.join(", ")
        }
    };
    let up = n("uptime_secs");
    format!(
        "{} on {instance} (listening on {}), up {}h{:02}m{:02}s\n  \
         sessions   {} now (at most {}), {} resumable within {} s\n  \
         vpc        {} in {}\n  \
         resolvers  {}\n  \
         allow      {}\n  \
         deny       {}",
        s("software"),
        s("listen"),
        up / 3600,
        up / 60 % 60,
        up % 60,
        n("sessions"),
        n("max_clients"),
        n("resumable_sessions"),
        n("grace_secs"),
        s("vpc"),
        s("region"),
        list("resolvers"),
        list("allow"),
        list("deny"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_rendered_for_people() {
        let v = serde_json::json!({
            "software": "ec2-agent 0.1.0", "uptime_secs": 3725, "listen": "127.0.0.1:7301",
            "sessions": 1, "resumable_sessions": 1, "max_clients": 16, "grace_secs": 120,
            "vpc": "vpc-0abc", "region": "eu-west-1", "resolvers": ["10.0.0.2"],
            "allow": ["10.0.0.0/8"], "deny": ["169.254.0.0/16"],
        });
        let text = render("i-0123456789abcdef0", &v);
        assert!(
            text.starts_with("ec2-agent 0.1.0 on i-0123456789abcdef0 (listening on 127.0.0.1:7301), up 1h02m05s"),
            "{text}"
        );
        assert!(text.contains("sessions   1 now (at most 16), 1 resumable within 120 s"), "{text}");
        assert!(text.contains("vpc        vpc-0abc in eu-west-1"), "{text}");
        assert!(text.contains("deny       169.254.0.0/16"), "{text}");
        // An agent outside EC2 has no VPC.
        let bare = render("mi-0123456789abcdef0", &serde_json::json!({"software": "ec2-agent 0.1.0"}));
        assert!(bare.contains("vpc        - in -") && bare.contains("resolvers  -"), "{bare}");
    }
}
