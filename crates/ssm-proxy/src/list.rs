//! `list`: the tunnels the config files define, and which of them run.

use crate::config;
use crate::daemon::control;

pub fn run() -> anyhow::Result<()> {
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
