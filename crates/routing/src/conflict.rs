//! Pure checks on a snapshot of the routing table: what the requested CIDRs collide
//! with, longest-prefix lookup, and the host routes that keep the AWS endpoints off
//! the tunnel.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::{Interface, Route, RouteEntry};

/// Something a requested CIDR collides with. [`Conflict::blocks`] tells whether `start`
/// refuses it without `--force`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Conflict {
    /// The CIDR is a default route (prefix length 0): it would take all traffic.
    DefaultRoute { cidr: IpNet },
    /// The CIDR overlaps a network some interface is directly connected to.
    Connected { cidr: IpNet, network: IpNet, ifname: String },
    /// Another interface already routes this exact destination or a part of it (a more
    /// specific route, typically a corporate VPN or a container bridge).
    Routed { cidr: IpNet, existing: String, ifname: String },
    /// The CIDR contains the next hop of an existing route (for example the default
    /// gateway): that route would then point into the tunnel.
    CapturesGateway { cidr: IpNet, gateway: IpAddr, route: String },
    /// A wider route of another interface covers the CIDR: ours takes precedence for this
    /// part of it. Reported, never refused.
    Narrows { cidr: IpNet, existing: String, ifname: String },
}

impl Conflict {
    pub fn cidr(&self) -> IpNet {
        match self {
            Conflict::DefaultRoute { cidr }
            | Conflict::Connected { cidr, .. }
            | Conflict::Routed { cidr, .. }
            | Conflict::CapturesGateway { cidr, .. }
            | Conflict::Narrows { cidr, .. } => *cidr,
        }
    }

    /// Whether this conflict stops `start` unless the user passes `--force`.
    pub fn blocks(&self) -> bool {
        !matches!(self, Conflict::Narrows { .. })
    }
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conflict::DefaultRoute { cidr } => {
                write!(
                    f,
                    "{cidr} is a default route: it would send all traffic, including the tunnel's own, into the tunnel"
                )
            }
            Conflict::Connected { cidr, network, ifname } => {
                write!(f, "{cidr} overlaps {network}, the network {ifname} is directly connected to")
            }
            Conflict::Routed { cidr, existing, ifname } => {
                write!(f, "{cidr} overlaps the existing route {existing}: {ifname} already carries that traffic")
            }
            Conflict::CapturesGateway { cidr, gateway, route } => {
                write!(f, "{cidr} contains {gateway}, the gateway of {route}: that route would break")
            }
            Conflict::Narrows { cidr, existing, ifname } => {
                write!(f, "{cidr} is inside {existing}: the tunnel takes this part over from {ifname}")
            }
        }
    }
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn is_multicast(net: &IpNet) -> bool {
    net.network().is_multicast()
}

/// Everything `cidrs` would collide with, given the current table and interfaces.
/// `own_ifindex` (the tunnel, if it exists already) is ignored, as are routes of
/// loopback-only interfaces' host entries, multicast and interface-scoped routes.
pub fn find_conflicts(
    cidrs: &[IpNet],
    table: &[RouteEntry],
    interfaces: &[Interface],
    own_ifindex: Option<u32>,
) -> Vec<Conflict> {
    let mut out = Vec::new();
    let connected: Vec<(IpNet, &Interface)> = interfaces
        .iter()
        .filter(|i| Some(i.index) != own_ifindex)
        .flat_map(|i| i.networks.iter().map(move |n| (n.trunc(), i)))
        .collect();
    let is_connected_route = |e: &RouteEntry| {
        e.route.gateway.is_none()
            && connected.iter().any(|(net, i)| i.index == e.route.ifindex && net.contains(&e.route.dest.network()))
    };
    for cidr in cidrs.iter().map(IpNet::trunc) {
        if cidr.prefix_len() == 0 {
            out.push(Conflict::DefaultRoute { cidr });
        }
        for (net, iface) in &connected {
            if overlaps(&cidr, net) {
                out.push(Conflict::Connected { cidr, network: *net, ifname: iface.name.clone() });
            }
        }
        for e in table {
            if e.scoped || Some(e.route.ifindex) == own_ifindex || is_multicast(&e.route.dest) {
                continue;
            }
            let dest = e.route.dest;
            if dest.prefix_len() > 0 && overlaps(&cidr, &dest) && !is_connected_route(e) {
                if cidr.contains(&dest) {
                    out.push(Conflict::Routed { cidr, existing: e.describe(), ifname: e.ifname.clone() });
                } else {
                    out.push(Conflict::Narrows { cidr, existing: e.describe(), ifname: e.ifname.clone() });
                }
            }
            if let Some(gw) = e.route.gateway {
                if cidr.contains(&gw) && !connected.iter().any(|(net, _)| net.contains(&gw)) {
                    out.push(Conflict::CapturesGateway { cidr, gateway: gw, route: e.describe() });
                }
            }
        }
    }
    out
}

/// Longest-prefix match for `addr`, ignoring interface-scoped routes and `exclude_ifindex`.
pub fn lookup(table: &[RouteEntry], addr: IpAddr, exclude_ifindex: Option<u32>) -> Option<&RouteEntry> {
    table
        .iter()
        .filter(|e| !e.scoped && Some(e.route.ifindex) != exclude_ifindex && e.route.dest.contains(&addr))
        .max_by_key(|e| e.route.dest.prefix_len())
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PinError {
    #[error("{endpoint} lies inside the routed {cidr}, and there is no route to it outside the tunnel to keep it on")]
    NoRoute { endpoint: IpAddr, cidr: IpNet },
}

/// Host routes that keep each endpoint address on the path it takes today when one of
/// `cidrs` would otherwise capture it. Endpoints a more specific existing route already
/// steers, or that no CIDR captures, need nothing.
pub fn endpoint_pins(
    endpoints: &[IpAddr],
    cidrs: &[IpNet],
    table: &[RouteEntry],
    own_ifindex: Option<u32>,
) -> Result<Vec<Route>, PinError> {
    let mut pins: Vec<Route> = Vec::new();
    for &ep in endpoints {
        let Some(cidr) = cidrs.iter().filter(|c| c.contains(&ep)).max_by_key(|c| c.prefix_len()) else {
            continue;
        };
        let current = lookup(table, ep, own_ifindex);
        match current {
            Some(e) if e.route.dest.prefix_len() > cidr.prefix_len() => continue,
            Some(e) => {
                let pin = Route { dest: IpNet::from(ep), gateway: e.route.gateway, ifindex: e.route.ifindex };
                if !pins.contains(&pin) {
                    pins.push(pin);
                }
            }
            None => return Err(PinError::NoRoute { endpoint: ep, cidr: *cidr }),
        }
    }
    Ok(pins)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test CIDR")
    }

    fn entry(dest: &str, gw: Option<&str>, ifindex: u32, ifname: &str) -> RouteEntry {
        RouteEntry {
            route: Route { dest: net(dest), gateway: gw.map(|g| g.parse().expect("test address")), ifindex },
            ifname: ifname.into(),
            scoped: false,
        }
    }

    fn iface(name: &str, index: u32, nets: &[&str]) -> Interface {
        Interface { name: name.into(), index, networks: nets.iter().map(|n| net(n)).collect(), up: true }
    }

    /// A laptop on Wi-Fi 192.168.1.0/24 with a corporate VPN routing 10.20.0.0/16.
    fn laptop() -> (Vec<RouteEntry>, Vec<Interface>) {
        let table = vec![
            entry("0.0.0.0/0", Some("192.168.1.1"), 2, "en0"),
            entry("192.168.1.0/24", None, 2, "en0"),
            entry("10.20.0.0/16", None, 7, "utun3"),
            entry("127.0.0.0/8", None, 1, "lo0"),
            entry("224.0.0.0/4", None, 2, "en0"),
        ];
        let ifaces = vec![
            iface("lo0", 1, &["127.0.0.1/8", "::1/128"]),
            iface("en0", 2, &["192.168.1.23/24", "fe80::1/64"]),
            iface("utun3", 7, &["10.20.0.5/32"]),
        ];
        (table, ifaces)
    }

    #[test]
    fn clean_cidr_has_no_conflicts() {
        let (table, ifaces) = laptop();
        assert_eq!(find_conflicts(&[net("172.16.0.0/12")], &table, &ifaces, None), vec![]);
    }

    #[test]
    fn vpn_route_inside_the_cidr_blocks() {
        let (table, ifaces) = laptop();
        let found = find_conflicts(&[net("10.0.0.0/8")], &table, &ifaces, None);
        // The VPN's /16 and its own address network (10.20.0.5/32 on utun3).
        assert!(found.iter().all(Conflict::blocks), "{found:?}");
        assert!(found.contains(&Conflict::Routed {
            cidr: net("10.0.0.0/8"),
            existing: "10.20.0.0/16 dev utun3".into(),
            ifname: "utun3".into()
        }));
        assert!(found.contains(&Conflict::Connected {
            cidr: net("10.0.0.0/8"),
            network: net("10.20.0.5/32"),
            ifname: "utun3".into()
        }));
    }

    #[test]
    fn narrower_cidr_inside_vpn_route_is_reported_not_blocking() {
        let (table, mut ifaces) = laptop();
        ifaces.retain(|i| i.name != "utun3");
        let found = find_conflicts(&[net("10.20.5.0/24")], &table, &ifaces, None);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(!found[0].blocks());
        assert!(found[0].to_string().contains("takes this part over from utun3"), "{}", found[0]);
    }

    #[test]
    fn connected_network_blocks_once() {
        let (table, ifaces) = laptop();
        let found = find_conflicts(&[net("192.168.0.0/16")], &table, &ifaces, None);
        assert_eq!(
            found,
            vec![Conflict::Connected {
                cidr: net("192.168.0.0/16"),
                network: net("192.168.1.0/24"),
                ifname: "en0".into()
            }],
            "the kernel's connected route must not be reported a second time"
        );
    }

    #[test]
    fn default_route_and_half_defaults() {
        let (table, ifaces) = laptop();
        let found = find_conflicts(&[net("0.0.0.0/0")], &table, &ifaces, None);
        assert!(found.contains(&Conflict::DefaultRoute { cidr: net("0.0.0.0/0") }));
        // 0.0.0.0/1 does not contain the gateway 192.168.1.1 but does hold the VPN; the
        // gateway half (128.0.0.0/1) captures the Wi-Fi network itself.
        let found = find_conflicts(&[net("128.0.0.0/1")], &table, &ifaces, None);
        assert!(found.iter().any(|c| matches!(c, Conflict::Connected { ifname, .. } if ifname == "en0")));
    }

    #[test]
    fn captured_gateway_off_link_is_reported() {
        // A route whose gateway is reachable only through another route (not a connected
        // network): capturing that gateway breaks the route.
        let table = vec![entry("0.0.0.0/0", Some("10.9.9.9"), 3, "tun9"), entry("10.9.0.0/16", None, 3, "tun9")];
        let ifaces = vec![iface("tun9", 3, &["100.70.0.1/32"])];
        let found = find_conflicts(&[net("10.9.9.0/24")], &table, &ifaces, None);
        assert!(found
            .iter()
            .any(|c| matches!(c, Conflict::CapturesGateway { gateway, .. } if gateway.to_string() == "10.9.9.9")));
    }

    #[test]
    fn own_interface_and_scoped_routes_are_ignored() {
        let (mut table, mut ifaces) = laptop();
        table.push(entry("10.0.0.0/8", None, 9, "utun9"));
        ifaces.push(iface("utun9", 9, &["100.127.0.1/32"]));
        let mut scoped = entry("10.30.0.0/16", Some("192.168.1.1"), 2, "en0");
        scoped.scoped = true;
        table.push(scoped);
        table.retain(|e| e.ifname != "utun3");
        ifaces.retain(|i| i.name != "utun3");
        assert_eq!(find_conflicts(&[net("10.0.0.0/8")], &table, &ifaces, Some(9)), vec![]);
    }

    #[test]
    fn ipv6_conflicts() {
        let (table, ifaces) = laptop();
        let found = find_conflicts(&[net("fe80::/10")], &table, &ifaces, None);
        assert!(found.iter().any(|c| matches!(c, Conflict::Connected { ifname, .. } if ifname == "en0")));
        assert_eq!(find_conflicts(&[net("fd00:10::/32")], &table, &ifaces, None), vec![]);
    }

    #[test]
    fn lookup_is_longest_prefix() {
        let (table, _) = laptop();
        let hit = lookup(&table, "10.20.1.1".parse().expect("addr"), None).expect("route");
        assert_eq!(hit.ifname, "utun3");
        let hit = lookup(&table, "10.20.1.1".parse().expect("addr"), Some(7)).expect("route");
        assert_eq!(hit.route.dest, net("0.0.0.0/0"));
        assert!(lookup(&table, "2001:db8::1".parse().expect("addr"), None).is_none());
    }

    #[test]
    fn pins_keep_captured_endpoints_on_their_path() {
        let (table, _) = laptop();
        let eps: Vec<IpAddr> =
            ["52.94.1.10", "10.20.3.4", "10.1.2.3", "52.94.1.10"].iter().map(|s| s.parse().expect("addr")).collect();
        let pins = endpoint_pins(&eps, &[net("10.0.0.0/8"), net("52.0.0.0/8")], &table, None).expect("pins");
        // 10.20.3.4 is steered by the VPN's /16 already; the duplicate is pinned once.
        assert_eq!(
            pins,
            vec![
                Route { dest: net("52.94.1.10/32"), gateway: Some("192.168.1.1".parse().expect("gw")), ifindex: 2 },
                Route { dest: net("10.1.2.3/32"), gateway: Some("192.168.1.1".parse().expect("gw")), ifindex: 2 },
            ]
        );
        assert_eq!(endpoint_pins(&eps, &[net("172.16.0.0/12")], &table, None), Ok(vec![]));
    }

    #[test]
    fn pin_without_any_route_is_an_error() {
        let table = vec![entry("192.168.1.0/24", None, 2, "en0")];
        let ep: IpAddr = "10.1.1.1".parse().expect("addr");
        assert_eq!(
            endpoint_pins(&[ep], &[net("10.0.0.0/8")], &table, None),
            Err(PinError::NoRoute { endpoint: ep, cidr: net("10.0.0.0/8") })
        );
    }
}
