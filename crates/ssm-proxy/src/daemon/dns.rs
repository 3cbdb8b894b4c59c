//! Split DNS on this machine: the tunnel's resolver answers the configured
//! domains, everything else keeps using the usual servers.
//!
//! - macOS: one `/etc/resolver/<domain>` file per domain, marked as ours, listed in
//!   a journal (`<run dir>/<name>.dns.json`) *before* it is written, removed on
//!   every exit path and by `cleanup` after a crash. A file we did not write is
//!   never touched. The DNS cache is flushed after each change.
//! - Linux with systemd-resolved: the tunnel link's DNS server and routing
//!   domains (`resolvectl`); resolved forgets them when the link goes away, so a
//!   crash leaves nothing behind.
//! - Anything else: the exact line the user can add, and why.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use forwarder::dns::Domain;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

/// The first line of every resolver file we write; the tunnel name follows.
const MARKER: &str = "# written by ssm-proxy for tunnel ";

/// The domains of `--dns-domain` and `--dns-auto`, checked against the AWS
/// endpoints the tunnel itself needs (those must never resolve through it).
pub fn plan(explicit: &[Domain], auto: bool, region: &str, own_hosts: &[String]) -> anyhow::Result<Vec<Domain>> {
    let needed = own_names(region, own_hosts);
    let mut out: Vec<Domain> = Vec::new();
    for d in explicit {
        if let Some(h) = needed.iter().find(|h| d.contains(h)) {
            bail!("--dns-domain {d} would send {h}, which the tunnel itself needs, through the tunnel; name a narrower domain");
        }
        if !out.contains(d) {
            out.push(d.clone());
        }
    }
    if auto {
        let internal =
            if region == "us-east-1" { "ec2.internal".to_string() } else { format!("{region}.compute.internal") };
        for d in [internal.as_str(), "eks.amazonaws.com"] {
            let d = Domain::parse(d).with_context(|| format!("region {region:?} gives no valid domain"))?;
            if !out.contains(&d) && !needed.iter().any(|h| d.contains(h)) {
                out.push(d);
            }
        }
    }
    Ok(out)
}

/// The names the tunnel itself resolves and reaches (never through it).
fn own_names(region: &str, own_hosts: &[String]) -> Vec<String> {
    let mut needed: Vec<String> = ["ssm", "ssmmessages", "sts", "oidc", "portal.sso", "ec2messages", "route53"]
        .iter()
        .map(|s| format!("{s}.{region}.amazonaws.com"))
        .collect();
    needed.extend(["sts.amazonaws.com".to_string(), "route53.amazonaws.com".to_string()]);
    needed.extend(own_hosts.iter().cloned());
    needed
}

/// Add the Route 53 private zones of the instance's VPC (`--dns-auto`) to
/// `domains`; returns the ones added. A zone that would capture a name the
/// tunnel itself needs (a private `amazonaws.com`, say) or that is not a valid
/// domain is left out with a warning.
pub fn add_zones(domains: &mut Vec<Domain>, zones: &[String], region: &str, own_hosts: &[String]) -> Vec<Domain> {
    let needed = own_names(region, own_hosts);
    let mut added = Vec::new();
    for z in zones {
        let d = match Domain::parse(z) {
            Ok(d) => d,
            Err(e) => {
                warn!("private zone {z:?} left out: {e}");
                continue;
            }
        };
        if let Some(h) = needed.iter().find(|h| d.contains(h)) {
            warn!("private zone {d} left out: it would send {h}, which the tunnel itself needs, through the tunnel");
            continue;
        }
        if !domains.contains(&d) {
            domains.push(d.clone());
            added.push(d);
        }
    }
    added
}

/// How this machine routes DNS by domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// macOS: per-domain files in this directory.
    ResolverDir(PathBuf),
    /// Linux: systemd-resolved, through `resolvectl`.
    Resolved,
    /// Neither is available.
    Unsupported,
}

/// Looks under `root` (`/` outside tests).
pub fn detect(root: &Path) -> Backend {
    if cfg!(target_os = "macos") {
        return Backend::ResolverDir(root.join("etc/resolver"));
    }
    let resolved = root.join("run/systemd/resolve");
    if resolved.join("io.systemd.Resolve").exists() || resolved.join("resolv.conf").exists() {
        Backend::Resolved
    } else {
        Backend::Unsupported
    }
}

/// The `resolvectl` calls that give `iface` the server and routing-only domains,
/// and keep other names off it.
pub fn resolvectl_commands(iface: &str, server: IpAddr, domains: &[Domain]) -> Vec<Vec<String>> {
    let mut domain = vec!["domain".to_string(), iface.to_string()];
    domain.extend(domains.iter().map(|d| format!("~{d}")));
    vec![
        vec!["dns".into(), iface.into(), server.to_string()],
        domain,
        vec!["default-route".into(), iface.into(), "false".into()],
    ]
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Journal {
    version: u32,
    name: String,
    files: Vec<PathBuf>,
}

fn journal_path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(format!("{name}.dns.json"))
}

fn write_journal(path: &Path, j: &Journal) -> anyhow::Result<()> {
    routing::write_json_atomic(path, j).map_err(|(p, e)| anyhow::anyhow!("cannot write {}: {e}", p.display()))
}

fn ours(path: &Path, name: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.lines().next() == Some(&format!("{MARKER}{name:?}")))
}

/// What `configure` changed; undone by [`DnsSetup::undo`] or on drop.
#[derive(Debug)]
pub struct DnsSetup {
    backend: Backend,
    name: String,
    iface: String,
    journal: PathBuf,
    files: Vec<PathBuf>,
    done: bool,
}

/// Point `domains` at `server` (the tunnel resolver on `iface`).
pub fn configure(
    backend: Backend,
    run_dir: &Path,
    name: &str,
    iface: &str,
    server: IpAddr,
    domains: &[Domain],
) -> anyhow::Result<DnsSetup> {
    let mut setup = DnsSetup {
        backend: backend.clone(),
        name: name.to_string(),
        iface: iface.to_string(),
        journal: journal_path(run_dir, name),
        files: Vec::new(),
        done: false,
    };
    let list = domains.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    match backend {
        Backend::ResolverDir(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            for d in domains {
                let path = dir.join(d.as_str());
                if path.exists() && !ours(&path, name) {
                    warn!(
                        "left {} alone: ssm-proxy did not write it, so {d} keeps its current resolver",
                        path.display()
                    );
                    continue;
                }
                setup.files.push(path.clone());
                write_journal(&setup.journal, &Journal { version: 1, name: name.into(), files: setup.files.clone() })?;
                let text = format!("{MARKER}{name:?}\n# removed when the tunnel stops\nnameserver {server}\n");
                std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
            }
            flush_cache();
            info!(domains = %list, %server, "DNS: resolver files written");
        }
        Backend::Resolved => {
            for args in resolvectl_commands(iface, server, domains) {
                run("resolvectl", &args).context("configuring systemd-resolved")?;
            }
            info!(domains = %list, %server, iface, "DNS: systemd-resolved routes these domains to the tunnel");
        }
        Backend::Unsupported => {
            warn!(
                "systemd-resolved is not running, so {list} cannot be sent to the tunnel's resolver by domain. \
                 Add this line at the top of /etc/resolv.conf (the tunnel refuses other names, so they go on to \
                 your other servers): `nameserver {server}`; with dnsmasq, add `server=/{}/{server}` per domain",
                domains.first().map(|d| d.as_str()).unwrap_or("corp.example")
            );
        }
    }
    Ok(setup)
}

impl DnsSetup {
    /// Undo everything; what cannot be undone stays journaled for `cleanup`.
    pub fn undo(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        match &self.backend {
            Backend::ResolverDir(_) => {
                let left = remove_files(&self.files, &self.name);
                if left.is_empty() {
                    let _ = std::fs::remove_file(&self.journal);
                } else {
                    let j = Journal { version: 1, name: self.name.clone(), files: left };
                    if let Err(e) = write_journal(&self.journal, &j) {
                        warn!("{e:#}");
                    }
                }
                flush_cache();
            }
            Backend::Resolved => {
                // Gone with the link anyway; revert in case the link outlives us.
                if let Err(e) = run("resolvectl", &["revert".to_string(), self.iface.clone()]) {
                    debug!("resolvectl revert: {e:#}");
                }
            }
            Backend::Unsupported => {}
        }
    }
}

impl Drop for DnsSetup {
    fn drop(&mut self) {
        self.undo();
    }
}

/// Remove our files among `files`; returns those that could not be removed.
fn remove_files(files: &[PathBuf], name: &str) -> Vec<PathBuf> {
    let mut left = Vec::new();
    for f in files {
        if !f.exists() {
            continue;
        }
        if !ours(f, name) {
            warn!("left {} alone: it was changed after ssm-proxy wrote it", f.display());
            continue;
        }
        if let Err(e) = std::fs::remove_file(f) {
            warn!("cannot remove {}: {e}", f.display());
            left.push(f.clone());
        }
    }
    left
}

/// Remove what the DNS journals of tunnels not in `running` list (`only`: just
/// that tunnel). Returns the names cleaned up.
pub fn cleanup_stale(run_dir: &Path, running: &[String], only: Option<&str>) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(run_dir) else { return Vec::new() };
    let mut cleaned = Vec::new();
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(name) = file.strip_suffix(".dns.json") else { continue };
        if running.iter().any(|r| r == name) || only.is_some_and(|o| o != name) {
            continue;
        }
        let Ok(j) = std::fs::read(e.path())
            .map_err(anyhow::Error::from)
            .and_then(|b| Ok(serde_json::from_slice::<Journal>(&b)?))
        else {
            warn!("cannot read {}; left in place", e.path().display());
            continue;
        };
        if remove_files(&j.files, &j.name).is_empty() {
            let _ = std::fs::remove_file(e.path());
            cleaned.push(name.to_string());
        }
    }
    if !cleaned.is_empty() {
        flush_cache();
    }
    cleaned
}

fn flush_cache() {
    if cfg!(target_os = "macos") {
        let _ = run("dscacheutil", &["-flushcache".to_string()]);
        let _ = run("killall", &["-HUP".to_string(), "mDNSResponder".to_string()]);
    }
}

fn run(program: &str, args: &[String]) -> anyhow::Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
