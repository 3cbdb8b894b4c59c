//! `ssm-proxy`: reach private AWS VPC addresses from your laptop over SSM
//! Session Manager, with no AWS CLI and no session-manager-plugin.

mod cleanup;
mod forward;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Remove routes left behind by a tunnel that was killed or crashed.
    Cleanup(cleanup::CleanupArgs),
}

fn init_logging(verbose: u8) {
    let default = match verbose {
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
    init_logging(cli.verbose);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Forward(args) => rt.block_on(forward::run(args)),
        Command::Cleanup(args) => cleanup::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
