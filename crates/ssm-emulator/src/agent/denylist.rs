//! The agent's deny list for remote-host port forwarding
//! (`AWS-StartPortForwardingSessionToRemoteHost`), by agent version.
//!
//! Agents before 3.3.4851.0 refuse the instance metadata service's address as
//! given. 3.3.4851.0
//! (2026-07, per its release notes) adds loopback and the ECS and EKS
//! credential endpoints, and canonicalises the address before checking it, so
//! that `127.1`, `0x7f000001` or `::ffff:127.0.0.1` are loopback too. A name is
//! checked by what it resolves to. The refusal ends the session with the
//! agent's own text, "Forwarding to IP address HOST is forbidden.", HOST as the
//! user gave it. The sources of that release are not public; the list and the
//! text are from its release notes and from users' reports of the message.
//! The local-port document (no host) is never checked: it is how the
//! instance's own loopback stays reachable.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, ToSocketAddrs};

use ssm_channel::version::agent_compare;

/// The first agent with the wider list.
pub const WIDER_LIST_SINCE: &str = "3.3.4851.0";

const IMDS_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const IMDS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
const ECS_CREDENTIALS: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 2);
const EKS_POD_IDENTITY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 23);
const EKS_POD_IDENTITY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23);

/// The agent's refusal for a remote-host session to `host`, if it refuses.
pub fn refusal(agent_version: &str, host: &str) -> Option<String> {
    let wider = agent_compare(agent_version, WIDER_LIST_SINCE).is_ge();
    let addresses = addresses(host, wider);
    addresses.iter().any(|a| denied(*a, wider)).then(|| format!("Forwarding to IP address {host} is forbidden."))
}

/// What `host` stands for: for the canonicalising agent an address in any
/// form, or what a name resolves to; for older agents a plain address only.
fn addresses(host: &str, canonicalise: bool) -> Vec<IpAddr> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return vec![ip];
    }
    if !canonicalise {
        return Vec::new();
    }
    if let Some(v4) = inet_aton(bare) {
        return vec![IpAddr::V4(v4)];
    }
    (bare, 0).to_socket_addrs().map(|it| it.map(|a| a.ip()).collect()).unwrap_or_default()
}

fn denied(ip: IpAddr, wider: bool) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) if wider => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        _ => ip,
    };
    match ip {
        IpAddr::V4(v4) => {
            v4 == IMDS_V4 || (wider && (v4.is_loopback() || v4 == ECS_CREDENTIALS || v4 == EKS_POD_IDENTITY_V4))
        }
        IpAddr::V6(v6) => v6 == IMDS_V6 || (wider && (v6.is_loopback() || v6 == EKS_POD_IDENTITY_V6)),
    }
}

/// The classic inet_aton forms: 1 to 4 parts, each decimal, octal (leading 0)
/// or hex (0x); the last part fills the remaining bytes.
fn inet_aton(s: &str) -> Option<Ipv4Addr> {
    let parts: Vec<u64> = s.split('.').map(part).collect::<Option<_>>()?;
    let (last, init) = parts.split_last()?;
    if init.len() > 3 || init.iter().any(|&p| p > 0xff) || *last >= 1u64 << (8 * (4 - init.len())) {
        return None;
    }
    let value = init.iter().enumerate().fold(*last, |acc, (i, &p)| acc | (p << (8 * (3 - i))));
    Some(Ipv4Addr::from(u32::try_from(value).ok()?))
}

fn part(p: &str) -> Option<u64> {
    if let Some(hex) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else if p.len() > 1 && p.starts_with('0') {
        u64::from_str_radix(&p[1..], 8).ok()
    } else if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
        p.parse().ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEW: &str = "3.3.4851.0";
    const OLD: &str = "3.3.987.0";

    #[test]
    fn the_newest_agent_refuses_loopback_in_every_spelling_and_the_credential_endpoints() {
        for host in [
            "127.0.0.1",
            "127.1",
            "0x7f000001",
            "2130706433",
            "0177.0.0.1",
            "::1",
            "[::1]",
            "::ffff:127.0.0.1",
            "localhost",
            "169.254.169.254",
            "169.254.170.2",
            "169.254.170.23",
            "fd00:ec2::254",
            "fd00:ec2::23",
        ] {
            assert_eq!(refusal(NEW, host), Some(format!("Forwarding to IP address {host} is forbidden.")), "{host}");
        }
        for host in ["10.0.0.5", "169.254.170.3", "128.0.0.1", "[2001:db8::1]"] {
            assert_eq!(refusal(NEW, host), None, "{host}");
        }
    }

    #[test]
    fn older_agents_refuse_only_the_metadata_service() {
        assert!(refusal(OLD, "169.254.169.254").is_some());
        assert!(refusal(OLD, "fd00:ec2::254").is_some());
        for host in ["127.0.0.1", "localhost", "169.254.170.2", "0xa9fea9fe"] {
            assert_eq!(refusal(OLD, host), None, "{host}");
        }
        assert!(refusal(NEW, "0xa9fea9fe").is_some(), "the newest agent canonicalises");
    }

    #[test]
    fn inet_aton_reads_the_classic_forms_and_nothing_else() {
        assert_eq!(inet_aton("10.1"), Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(inet_aton("10.1.258"), Some(Ipv4Addr::new(10, 1, 1, 2)));
        assert_eq!(inet_aton("0x0a.0.0.010"), Some(Ipv4Addr::new(10, 0, 0, 8)));
        for bad in ["", "1.2.3.4.5", "256.0.0.1", "1.2.3.256", "08.0.0.1", "a.b.c.d", "4294967296", "1..2"] {
            assert_eq!(inet_aton(bad), None, "{bad}");
        }
    }
}
