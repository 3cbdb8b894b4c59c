//! `status`: what the running tunnels report through their control sockets
//! (any user may ask).

use crate::daemon::control;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Only this tunnel.
    #[arg(long)]
    pub name: Option<String>,
    /// Machine-readable output: a JSON array of tunnels.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
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
