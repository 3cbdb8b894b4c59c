//! Named tunnels in TOML files: `/etc/ssm-proxy/config.toml`, then the user's
//! `~/.config/ssm-proxy/config.toml` (the invoking user's, under sudo), or only
//! `$SSM_PROXY_CONFIG` when set.
//!
//! ```toml
//! [tunnel.prod]
//! instance_id = "i-0abc123def4567890"
//! # or instance_ids = ["i-...", "i-..."], and/or instance_tags = { Role = "ssm-proxy" }
//! region = "eu-west-1"            # optional
//! profile = "prod"                # optional
//! cidrs = ["10.0.0.0/16"]
//! dns_domains = ["corp.internal"] # optional
//! dns_auto = true                 # optional
//! agent_port = 7301               # optional
//! rotate_after = "55m"            # optional
//! sessions = 4                    # optional: member sessions to stripe over (1-16)
//! reason = "on-call: INC-1234"    # optional: StartSession's Reason
//! proxy = "http://proxy.corp:3128" # optional: instead of HTTPS_PROXY/HTTP_PROXY
//! ssmmessages_endpoint = "https://vpce-0abc.ssmmessages.eu-west-1.vpce.amazonaws.com" # optional
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::bail;
use forwarder::dns::Domain;
use ipnet::IpNet;
use serde::Deserialize;

use crate::ssm::parse_instance_id;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tunnel: BTreeMap<String, Raw>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    instance_id: Option<String>,
    #[serde(default)]
    instance_ids: Vec<String>,
    #[serde(default)]
    instance_tags: BTreeMap<String, String>,
    rotate_after: Option<String>,
    region: Option<String>,
    profile: Option<String>,
    cidrs: Vec<IpNet>,
    #[serde(default)]
    dns_domains: Vec<String>,
    #[serde(default)]
    dns_auto: bool,
    agent_port: Option<u16>,
    sessions: Option<u16>,
    reason: Option<String>,
    proxy: Option<String>,
    ssmmessages_endpoint: Option<String>,
}

/// One validated `[tunnel.NAME]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnel {
    pub name: String,
    /// `instance_id`, then `instance_ids`, each once.
    pub instance_ids: Vec<String>,
    pub instance_tags: Vec<(String, String)>,
    pub rotate_after: Option<std::time::Duration>,
    pub region: Option<String>,
    pub profile: Option<String>,
    pub cidrs: Vec<IpNet>,
    pub dns_domains: Vec<Domain>,
    pub dns_auto: bool,
    pub agent_port: Option<u16>,
    /// Member sessions to stripe the tunnel over.
    pub sessions: Option<u16>,
    /// StartSession's Reason.
    pub reason: Option<String>,
    /// The HTTP proxy for the API and the websocket.
    pub proxy: Option<String>,
    /// Where the data channel goes instead of StartSession's host.
    pub ssmmessages_endpoint: Option<String>,
    /// The file and line it was defined at, for messages.
    pub source: String,
    /// The file it was defined in.
    pub file: PathBuf,
}

/// The files read, in order.
pub fn default_paths() -> Vec<PathBuf> {
    if let Some(p) = std::env::var_os("SSM_PROXY_CONFIG") {
        return vec![PathBuf::from(p)];
    }
    let mut paths = vec![PathBuf::from("/etc/ssm-proxy/config.toml")];
    if let Some(h) = invoking_home() {
        paths.push(h.join(".config/ssm-proxy/config.toml"));
    }
    paths
}

/// The home directory of the user behind `sudo`, else `$HOME`.
pub fn invoking_home() -> Option<PathBuf> {
    std::env::var("SUDO_USER")
        .ok()
        .and_then(|u| nix::unistd::User::from_name(&u).ok().flatten())
        .map(|u| u.dir)
        .or_else(|| std::env::var_os("HOME").map(PathBuf::from))
}

/// Read and validate every file of `paths` that exists. Errors name the file and
/// the line; a tunnel name defined twice (in two files) is an error.
pub fn load(paths: &[PathBuf]) -> anyhow::Result<Vec<Tunnel>> {
    let mut all: Vec<Tunnel> = Vec::new();
    for path in paths {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => bail!("cannot read {}: {e}", path.display()),
        };
        for t in parse(path, &text)? {
            if let Some(first) = all.iter().find(|a| a.name == t.name) {
                bail!("tunnel {:?} is defined twice: at {} and at {}", t.name, first.source, t.source);
            }
            all.push(t);
        }
    }
    Ok(all)
}

/// The tunnel called `name`, or an error listing the ones there are.
pub fn find(paths: &[PathBuf], name: &str) -> anyhow::Result<Tunnel> {
    let all = load(paths)?;
    if let Some(t) = all.iter().find(|t| t.name == name) {
        return Ok(t.clone());
    }
    let files = paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    if all.is_empty() {
        bail!("no tunnel named {name:?}: no tunnels are defined in {files}");
    }
    let names = all.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ");
    bail!("no tunnel named {name:?} in {files} (defined: {names})")
}

fn parse(path: &Path, text: &str) -> anyhow::Result<Vec<Tunnel>> {
    let file: File = toml::from_str(text).map_err(|e| {
        let at = e.span().map(|s| format!(" line {}", line_of(text, s.start))).unwrap_or_default();
        anyhow::anyhow!("{}{at}: {}", path.display(), e.message())
    })?;
    let mut out = Vec::new();
    for (name, raw) in file.tunnel {
        let line = text
            .lines()
            .position(|l| {
                let l = l.trim();
                l == format!("[tunnel.{name}]") || l == format!("[tunnel.\"{name}\"]")
            })
            .map_or(1, |i| i + 1);
        let source = format!("{} line {line}", path.display());
        let fail = |what: String| anyhow::anyhow!("{source} ([tunnel.{name}]): {what}");
        if !routing::valid_name(&name) {
            return Err(fail("the name must be 1-64 letters, digits, '.', '_' or '-', not starting with '.'".into()));
        }
        let mut instance_ids: Vec<String> = Vec::new();
        for id in raw.instance_id.iter().chain(raw.instance_ids.iter()) {
            let id = parse_instance_id(id).map_err(|e| fail(format!("instance_id(s): {e}")))?;
            if !instance_ids.contains(&id) {
                instance_ids.push(id);
            }
        }
        let mut instance_tags = Vec::new();
        for (k, v) in &raw.instance_tags {
            let tag = crate::start::parse_tag(&format!("{k}={v}")).map_err(|e| fail(format!("instance_tags: {e}")))?;
            instance_tags.push(tag);
        }
        if instance_ids.is_empty() && instance_tags.is_empty() {
            return Err(fail("say which instance: instance_id, instance_ids or instance_tags".into()));
        }
        let rotate_after = match &raw.rotate_after {
            Some(r) => Some(crate::start::parse_period(r).map_err(|e| fail(format!("rotate_after: {e}")))?),
            None => None,
        };
        if raw.cidrs.is_empty() {
            return Err(fail("cidrs: at least one range is needed".into()));
        }
        let mut dns_domains = Vec::new();
        for d in &raw.dns_domains {
            dns_domains.push(Domain::parse(d).map_err(|e| fail(format!("dns_domains: {e}")))?);
        }
        if raw.agent_port == Some(0) {
            return Err(fail("agent_port: 0 is not a port".into()));
        }
        if raw.sessions.is_some_and(|n| !(1..=MAX_SESSIONS).contains(&n)) {
            return Err(fail(format!("sessions: between 1 and {MAX_SESSIONS}")));
        }
        let reason = match &raw.reason {
            Some(r) => Some(crate::aws::parse_reason(r).map_err(|e| fail(format!("reason: {e}")))?),
            None => None,
        };
        if let Some(p) = &raw.proxy {
            ssm_channel::proxy::Proxies::with_env(Some(p), |_| None).map_err(|e| fail(format!("proxy: {e}")))?;
        }
        if let Some(e) = &raw.ssmmessages_endpoint {
            crate::aws::rewrite_stream_url("wss://h/v1", e).map_err(|e| fail(format!("ssmmessages_endpoint: {e}")))?;
        }
        out.push(Tunnel {
            name,
            instance_ids,
            instance_tags,
            rotate_after,
            region: raw.region,
            profile: raw.profile,
            cidrs: raw.cidrs,
            dns_domains,
            dns_auto: raw.dns_auto,
            agent_port: raw.agent_port,
            sessions: raw.sessions,
            reason,
            proxy: raw.proxy,
            ssmmessages_endpoint: raw.ssmmessages_endpoint,
            source,
            file: path.to_path_buf(),
        });
    }
    Ok(out)
}

/// Most member sessions one tunnel stripes over.
pub const MAX_SESSIONS: u16 = 16;

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests;
