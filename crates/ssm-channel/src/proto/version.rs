//! The two version comparisons that decide basic vs mux port forwarding.
//!
//! The client decides from the agent's `AgentVersion` with the plugin's rule
//! (`src/version/versionutil.go`, `versionvalidator.go`); the agent decides from
//! our `ClientVersion` with its own rule (`agent/versionutil/versionutil.go`).
//! Both must agree or the two ends speak different protocols.

use std::cmp::Ordering;

/// The ClientVersion we announce: four numeric parts, above 1.2.331.0 so the
/// agent turns smux keepalive off, and equal to the plugin release whose
/// behaviour we reproduce: 1.2.764.0, which signs the data channel's open and
/// is AWS's minimum supported version.
pub const CLIENT_VERSION: &str = "1.2.764.0";

/// The plugin's rule: both strings must have the same number of dot-separated
/// numeric parts; anything else is "not comparable" (`None`).
pub fn plugin_compare(a: &str, b: &str) -> Option<Ordering> {
    let pa: Vec<u64> = a.split('.').map(str::parse).collect::<Result<_, _>>().ok()?;
    let pb: Vec<u64> = b.split('.').map(str::parse).collect::<Result<_, _>>().ok()?;
    (pa.len() == pb.len()).then(|| pa.cmp(&pb))
}

/// `a > b` by the plugin's rule; "not comparable" counts as false, as upstream.
pub fn plugin_greater(a: &str, b: &str) -> bool {
    plugin_compare(a, b) == Some(Ordering::Greater)
}

/// The agent's rule: semver when both parse as semver, otherwise part by part
/// (numeric where both parts are numbers, textual otherwise), with the shorter
/// list of parts the smaller when all shared parts are equal.
pub fn agent_compare(a: &str, b: &str) -> Ordering {
    if let (Some(sa), Some(sb)) = (SemVer::parse(a), SemVer::parse(b)) {
        return sa.cmp(&sb);
    }
    let pa: Vec<&str> = a.split('.').collect();
    let pb: Vec<&str> = b.split('.').collect();
    for (x, y) in pa.iter().zip(pb.iter()) {
        let ord = match (x.parse::<i64>(), y.parse::<i64>()) {
            (Ok(nx), Ok(ny)) => nx.cmp(&ny),
            _ => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    pa.len().cmp(&pb.len())
}

#[derive(Debug, PartialEq, Eq)]
struct SemVer<'a> {
    core: [u64; 3],
    pre: Option<&'a str>,
}

impl<'a> SemVer<'a> {
    fn parse(s: &'a str) -> Option<Self> {
        let s = s.strip_prefix('v').unwrap_or(s);
        let s = s.split('+').next()?;
        let (core, pre) = match s.split_once('-') {
            Some((c, p)) => (c, Some(p)),
            None => (s, None),
        };
        let mut it = core.split('.');
        let mut parts = [0u64; 3];
        for p in parts.iter_mut() {
            *p = it.next()?.parse().ok()?;
        }
        it.next().is_none().then_some(SemVer { core: parts, pre })
    }
}

impl Ord for SemVer<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.core.cmp(&other.core).then_with(|| match (self.pre, other.pre) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(a), Some(b)) => a.cmp(b),
        })
    }
}

impl PartialOrd for SemVer<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// How a Port session carries its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortMode {
    /// One TCP connection at a time, raw bytes.
    Basic,
    /// smux v1 over the byte stream; `keepalive` says whether NOPs are due.
    Mux { keepalive: bool },
}

/// The client's choice (`portsession.go`): mux iff the document's type is
/// LocalPortForwarding and the agent is newer than 3.0.196.0; smux keepalive
/// only for agents up to 3.1.1511.0.
pub fn client_port_mode(agent_version: &str, local_port_forwarding: bool) -> PortMode {
    if local_port_forwarding && plugin_greater(agent_version, "3.0.196.0") {
        PortMode::Mux { keepalive: !plugin_greater(agent_version, "3.1.1511.0") }
    } else {
        PortMode::Basic
    }
}

/// The agent's choice (`port.go`, `port_mux.go`): mux iff LocalPortForwarding
/// and ClientVersion >= 1.1.70; keepalive off iff ClientVersion > 1.2.331.0.
pub fn agent_port_mode(client_version: &str, local_port_forwarding: bool) -> PortMode {
    if local_port_forwarding && agent_compare(client_version, "1.1.70") != Ordering::Less {
        PortMode::Mux { keepalive: agent_compare(client_version, "1.2.331.0") != Ordering::Greater }
    } else {
        PortMode::Basic
    }
}

/// The basic-mode plugin sends the TerminateSession flag only to agents above
/// 2.3.722.0; older ones need the TerminateSession API alone.
pub fn agent_understands_terminate_flag(agent_version: &str) -> bool {
    plugin_greater(agent_version, "2.3.722.0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_rule_needs_equal_part_counts() {
        assert!(plugin_greater("3.3.987.0", "3.0.196.0"));
        assert!(!plugin_greater("3.0.196.0", "3.0.196.0"));
        assert!(!plugin_greater("3.3.987", "3.0.196.0"));
        assert!(!plugin_greater("3.x.987.0", "3.0.196.0"));
    }

    #[test]
    fn agent_rule_mixes_semver_and_parts() {
        assert_eq!(agent_compare("1.2.677.0", "1.1.70"), Ordering::Greater);
        assert_eq!(agent_compare("1.1.70", "1.1.70"), Ordering::Equal);
        assert_eq!(agent_compare("1.1.9", "1.1.70"), Ordering::Less);
        assert_eq!(agent_compare("1.2.331.0", "1.2.331.0"), Ordering::Equal);
        assert_eq!(agent_compare("1.2.331", "1.2.331.0"), Ordering::Less);
        assert_eq!(agent_compare("1.2.0-beta", "1.2.0"), Ordering::Less);
    }

    #[test]
    fn both_sides_agree_for_our_client_version() {
        for (agent, expect) in [
            ("3.3.987.0", PortMode::Mux { keepalive: false }),
            ("3.1.1000.0", PortMode::Mux { keepalive: true }),
            ("3.0.196.0", PortMode::Basic),
            ("2.3.722.0", PortMode::Basic),
        ] {
            assert_eq!(client_port_mode(agent, true), expect, "agent {agent}");
        }
        // What the agent concludes from our version, for a mux-capable agent.
        assert_eq!(agent_port_mode(CLIENT_VERSION, true), PortMode::Mux { keepalive: false });
        assert_eq!(agent_port_mode(CLIENT_VERSION, false), PortMode::Basic);
        assert_eq!(agent_port_mode("1.2.331.0", true), PortMode::Mux { keepalive: true });
        assert_eq!(agent_port_mode("1.1.69", true), PortMode::Basic);
    }

    #[test]
    fn terminate_flag_rule() {
        assert!(agent_understands_terminate_flag("3.0.196.0"));
        assert!(!agent_understands_terminate_flag("2.3.722.0"));
    }
}
