//! Which destinations the agent forwards to. The deny-list always wins: by default
//! it holds the instance metadata service and every other link-local service, the
//! instance's own loopback, and addresses that are never a unicast destination.

use std::net::IpAddr;

use ipnet::IpNet;

/// Private and shared ranges: what a VPC is built from.
pub const DEFAULT_ALLOW: &[&str] = &["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"];

/// Always refused unless removed by editing the code: metadata (169.254.169.254,
/// fd00:ec2::254), Route 53 Resolver at .253, Time Sync at .123, the ECS/EKS
/// credential endpoints (169.254.170.2, 169.254.170.23, fd00:ec2::23), all other
/// link-local, loopback, "this network", multicast and broadcast.
pub const DEFAULT_DENY: &[&str] = &[
    "169.254.0.0/16",
    "fd00:ec2::/32",
    "fe80::/10",
    "127.0.0.0/8",
    "::1/128",
    "0.0.0.0/8",
    "::/128",
    "224.0.0.0/4",
    "ff00::/8",
    "255.255.255.255/32",
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Matched this deny-list entry.
    Denied(IpNet),
    /// In no allowed range.
    NotAllowed,
}

#[derive(Clone, Debug)]
pub struct Policy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

fn parse_all(list: &[&str]) -> Vec<IpNet> {
    list.iter().filter_map(|s| s.parse().ok()).collect()
}

impl Policy {
    /// The defaults plus `allow` and `deny`; with `replace_allow`, `allow` replaces the
    /// default allow-list instead of extending it.
    pub fn new(allow: &[IpNet], deny: &[IpNet], replace_allow: bool) -> Self {
        let mut a = if replace_allow { Vec::new() } else { parse_all(DEFAULT_ALLOW) };
        a.extend_from_slice(allow);
        let mut d = parse_all(DEFAULT_DENY);
        d.extend_from_slice(deny);
        Policy { allow: a, deny: d }
    }

    pub fn check(&self, dst: IpAddr) -> Verdict {
        let dst = match dst {
            // An IPv4-mapped IPv6 address is its IPv4 address for the policy.
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(dst),
            v4 => v4,
        };
        if let Some(d) = self.deny.iter().find(|n| n.contains(&dst)) {
            return Verdict::Denied(*d);
        }
        if self.allow.iter().any(|n| n.contains(&dst)) {
            Verdict::Allow
        } else {
            Verdict::NotAllowed
        }
    }

    pub fn allow(&self) -> &[IpNet] {
        &self.allow
    }

    pub fn deny(&self) -> &[IpNet] {
        &self.deny
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy::new(&[], &[], false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn metadata_and_link_local_services_are_denied() {
        let p = Policy::default();
        for a in [
            "169.254.169.254",
            "169.254.169.253",
            "169.254.169.123",
            "169.254.170.2",
            "169.254.170.23",
            "fd00:ec2::254",
            "fd00:ec2::23",
            "fe80::1",
            "127.0.0.1",
            "::1",
            "::ffff:169.254.169.254",
            "224.0.0.251",
            "255.255.255.255",
        ] {
            assert!(matches!(p.check(ip(a)), Verdict::Denied(_)), "{a}");
        }
    }

    #[test]
    fn private_ranges_are_allowed_and_the_internet_is_not() {
        let p = Policy::default();
        for a in ["10.0.1.5", "172.31.255.1", "192.168.1.1", "100.64.0.1", "fd12::1"] {
            assert_eq!(p.check(ip(a)), Verdict::Allow, "{a}");
        }
        assert_eq!(p.check(ip("8.8.8.8")), Verdict::NotAllowed);
        assert_eq!(p.check(ip("2001:db8::1")), Verdict::NotAllowed);
    }

    #[test]
    fn deny_wins_over_an_explicit_allow() {
        let p = Policy::new(&["169.254.0.0/16".parse().expect("net")], &["10.9.0.0/16".parse().expect("net")], false);
        assert!(matches!(p.check(ip("169.254.169.254")), Verdict::Denied(_)));
        assert!(matches!(p.check(ip("10.9.1.1")), Verdict::Denied(_)));
        assert_eq!(p.check(ip("10.8.1.1")), Verdict::Allow);
        let only = Policy::new(&["10.1.0.0/16".parse().expect("net")], &[], true);
        assert_eq!(only.check(ip("10.2.0.1")), Verdict::NotAllowed);
        assert_eq!(only.check(ip("10.1.0.1")), Verdict::Allow);
    }
}
