//! `ssm-proxy cleanup`: remove what a tunnel that did not exit cleanly left behind.

use anyhow::{bail, Context};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  sudo ssm-proxy cleanup\n  sudo ssm-proxy cleanup --name prod\n\n\
Only routes recorded in the journals of tunnels that are no longer running are\n\
removed, and only while the table still shows them as they were added. `start`\n\
does the same for its own name before it adds anything.")]
pub struct CleanupArgs {
    /// Only clean up after the tunnel with this name.
    #[arg(long)]
    name: Option<String>,
}

pub fn run(args: CleanupArgs) -> anyhow::Result<()> {
    let dir = routing::default_run_dir();
    if !nix::unistd::geteuid().is_root() {
        bail!("cleanup changes routes: run it with sudo");
    }
    let mut table = routing::system_table().context("cannot open the routing table")?;
    let report = routing::cleanup_stale(&dir, table.as_mut(), args.name.as_deref())
        .with_context(|| format!("cleaning up after stale tunnels in {}", dir.display()))?;
    for r in &report.removed {
        println!("removed route {} (dev {})", r.route, r.ifname);
    }
    for r in &report.already_gone {
        println!("already gone: {} (dev {})", r.route, r.ifname);
    }
    for name in &report.running {
        println!("left alone: tunnel {name:?} is running (stop it with `sudo ssm-proxy stop --name {name}`)");
    }
    for name in &report.journals {
        let _ = std::fs::remove_file(crate::daemon::control::socket_path(&dir, name));
        println!("cleaned up after tunnel {name:?}");
    }
    let dns_cleaned = crate::daemon::dns::cleanup_stale(&dir, &report.running, args.name.as_deref());
    for name in &dns_cleaned {
        println!("removed the DNS settings of tunnel {name:?}");
    }
    // Control sockets whose tunnel left no journal (it had nothing to undo) are stale
    // once nobody holds the tunnel's lock.
    for name in crate::daemon::control::tunnel_names(&dir) {
        if !report.running.contains(&name) && !dir.join(format!("{name}.journal")).exists() {
            let _ = std::fs::remove_file(crate::daemon::control::socket_path(&dir, &name));
        }
    }
    if report.journals.is_empty() && dns_cleaned.is_empty() && report.running.is_empty() && report.failed.is_empty() {
        println!("nothing to clean up in {}", dir.display());
    }
    for (r, e) in &report.failed {
        eprintln!("error: could not remove {} (dev {}): {e}", r.route, r.ifname);
    }
    for u in &report.unreadable {
        eprintln!("error: {u}");
    }
    if !report.failed.is_empty() || !report.unreadable.is_empty() {
        bail!("some leftovers could not be removed (see above); their journals are kept for another try");
    }
    Ok(())
}
