//! `ssm-proxy`: reach private AWS VPC addresses from your laptop over SSM
//! Session Manager, with no AWS CLI and no session-manager-plugin.

mod agent;
mod cleanup;
mod config;
mod control;
mod dns;
mod forward;
mod netwatch;
mod service;
mod ssm;
mod start;
mod uplink;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "ssm-proxy", version, about, long_about = None)]
struct Cli {
    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Forward a local TCP port to a port on the instance or on a host it can reach.
    Forward(forward::ForwardArgs),
    /// Start a tunnel: route CIDRs through an instance running the ec2-agent (root).
    Start(start::StartArgs),
    /// Show the running tunnels (any user).
    Status(StatusArgs),
    /// List the tunnels defined in the config files, and which of them run.
    #[command(after_help = "Files: /etc/ssm-proxy/config.toml, then ~/.config/ssm-proxy/config.toml
(the invoking user's under sudo); $SSM_PROXY_CONFIG replaces both. Example:

  [tunnel.prod]
  instance_id = \"i-0abc123def4567890\"
  region = \"eu-west-1\"              # optional, like profile
  cidrs = [\"10.0.0.0/16\"]
  dns_domains = [\"corp.internal\"]   # optional; also dns_auto = true, agent_port = 7301
  # instead of instance_id: instance_ids = [...] and/or instance_tags = { Role = \"ssm-proxy\" }
  # rotate_after = \"55m\"            # optional: replace the session before the account's limit

Then: sudo ssm-proxy start prod")]
    List,
    /// Stop a running tunnel (root, or the user who started it).
    Stop(StopArgs),
    /// Remove routes left behind by a tunnel that was killed or crashed.
    Cleanup(cleanup::CleanupArgs),
    /// Ask an instance's ec2-agent how it is (through SSM, like a tunnel).
    Agent(agent::AgentArgs),
    /// Run a tunnel of the config file at boot, restarted when it exits
    /// (systemd on Linux, launchd on macOS).
    Service(service::ServiceArgs),
    /// Print the version.
    Version,
    /// Print shell completions to standard output.
    #[command(after_help = "Examples:
  ssm-proxy completions bash | sudo tee /etc/bash_completion.d/ssm-proxy
  ssm-proxy completions zsh > \"${fpath[1]}/_ssm-proxy\"
  ssm-proxy completions fish > ~/.config/fish/completions/ssm-proxy.fish")]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or write one page per command into a directory.
    #[command(after_help = "Examples:
  ssm-proxy man | man -l -
  sudo ssm-proxy man --dir /usr/local/share/man/man1")]
    Man {
        /// Write ssm-proxy.1 and ssm-proxy-<command>.1 into this directory.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    /// Only this tunnel.
    #[arg(long)]
    name: Option<String>,
    /// Machine-readable output: a JSON array of tunnels.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct StopArgs {
    /// The tunnel to stop (needed when several run).
    #[arg(long)]
    name: Option<String>,
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let dir = routing::default_run_dir();
    let names = match args.name {
        Some(n) => vec![n],
        None => control::tunnel_names(&dir),
    };
    let mut all = Vec::new();
    let mut problems = Vec::new();
    for n in &names {
        match control::status_of(&dir, n).await {
            Ok(s) => all.push(s),
            Err(e) => problems.push(format!("{n}: not answering ({e:#}); if it crashed, run `sudo ssm-proxy cleanup`")),
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else if all.is_empty() && problems.is_empty() {
        println!("no tunnels running");
    } else {
        for s in &all {
            println!("{}", control::render(s));
        }
    }
    for p in &problems {
        eprintln!("{p}");
    }
    Ok(())
}

fn list() -> anyhow::Result<()> {
    let paths = config::default_paths();
    let tunnels = config::load(&paths)?;
    if tunnels.is_empty() {
        let files = paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        println!("no tunnels defined (looked in {files}; `ssm-proxy list --help` shows the format)");
        return Ok(());
    }
    let running = control::tunnel_names(&routing::default_run_dir());
    let rows: Vec<[String; 5]> = tunnels
        .iter()
        .map(|t| {
            [
                t.name.clone(),
                if running.contains(&t.name) { "running".into() } else { "stopped".into() },
                t.instance_ids
                    .iter()
                    .cloned()
                    .chain(t.instance_tags.iter().map(|(k, v)| format!("tag {k}={v}")))
                    .collect::<Vec<_>>()
                    .join(","),
                t.cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                t.source.clone(),
            ]
        })
        .collect();
    let head = ["NAME", "STATE", "INSTANCE", "CIDRS", "DEFINED AT"].map(String::from);
    let widths: Vec<usize> =
        (0..5).map(|i| rows.iter().chain(std::iter::once(&head)).map(|r| r[i].len()).max().unwrap_or(0)).collect();
    for r in std::iter::once(&head).chain(rows.iter()) {
        let line: Vec<String> = (0..5).map(|i| format!("{:<w$}", r[i], w = widths[i])).collect();
        println!("{}", line.join("  ").trim_end());
    }
    Ok(())
}

async fn stop(args: StopArgs) -> anyhow::Result<()> {
    let dir = routing::default_run_dir();
    let name = match args.name {
        Some(n) => n,
        None => {
            let names = control::tunnel_names(&dir);
            match names.as_slice() {
                [] => anyhow::bail!("no tunnels running"),
                [one] => one.clone(),
                many => anyhow::bail!("several tunnels run ({}); say which with --name", many.join(", ")),
            }
        }
    };
    control::stop(&dir, &name, std::time::Duration::from_secs(20)).await?;
    println!("tunnel {name:?} stopped");
    Ok(())
}

/// `man`: the top-level page on standard output, or every page (ssm-proxy.1,
/// ssm-proxy-start.1, ...) written into `dir`.
fn man(dir: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    use anyhow::Context;
    match dir {
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut out)?;
            std::io::Write::write_all(&mut std::io::stdout(), &out)?;
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("cannot write the man pages into {}", dir.display()))?;
            println!("man pages written to {}", dir.display());
        }
    }
    Ok(())
}

fn init_logging(verbose: u8, quiet: bool) {
    let default = match verbose {
        // `agent` commands print their own progress; their sessions' logs are for -v.
        0 if quiet => "warn,aws_config=error",
        // The SDK warns about every provider it tries (IMDS...); our errors say what matters.
        0 => "warn,aws_config=error,ssm_proxy=info,ssm_channel=info",
        1 => "info,ssm_proxy=debug,ssm_channel=debug",
        _ => "debug,ssm_proxy=trace,ssm_channel=trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, matches!(cli.command, Command::Agent(_)));
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
    let result = match cli.command {
        Command::Forward(args) => rt.block_on(forward::run(args)),
        Command::Agent(args) => rt.block_on(agent::run(args)),
        Command::Cleanup(args) => cleanup::run(args),
        Command::Start(args) => match start::resolve(args) {
            Ok(args) if args.detach() => start::detach(&args),
            Ok(args) => rt.block_on(start::run(args)),
            Err(e) => Err(e),
        },
        Command::List => list(),
        Command::Service(args) => service::main(args),
        Command::Status(args) => rt.block_on(status(args)),
        Command::Stop(args) => rt.block_on(stop(args)),
        Command::Version => {
            println!("ssm-proxy {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "ssm-proxy", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir } => man(dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
