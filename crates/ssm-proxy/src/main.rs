//! `ssm-proxy`: reach private AWS VPC addresses from your laptop over SSM
//! Session Manager, with no AWS CLI and no session-manager-plugin.

mod agent;
mod aws;
mod cleanup;
mod config;
mod daemon;
mod forward;
mod list;
mod man;
mod service;
mod ssm;
mod start;
mod status;
mod stop;

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
    Status(status::StatusArgs),
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
    Stop(stop::StopArgs),
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
        Command::List => list::run(),
        Command::Service(args) => service::main(args),
        Command::Status(args) => rt.block_on(status::run(args)),
        Command::Stop(args) => rt.block_on(stop::run(args)),
        Command::Version => {
            println!("ssm-proxy {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "ssm-proxy", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir } => man::run(Cli::command(), dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
