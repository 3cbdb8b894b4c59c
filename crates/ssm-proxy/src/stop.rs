//! `stop`: asks a running tunnel to end, through its control socket.

use crate::daemon::control;

#[derive(Debug, clap::Args)]
pub struct StopArgs {
    /// The tunnel to stop (needed when several run).
    #[arg(long)]
    pub name: Option<String>,
}

pub async fn run(args: StopArgs) -> anyhow::Result<()> {
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
