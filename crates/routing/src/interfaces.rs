//! Network interfaces and the networks they are directly connected to.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use nix::ifaddrs::getifaddrs;
use nix::net::if_::{if_nametoindex, InterfaceFlags};
use nix::sys::socket::SockaddrStorage;

/// One interface with its addresses (as networks: address plus prefix length).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub networks: Vec<IpNet>,
    pub up: bool,
}

fn ip_of(sa: &SockaddrStorage) -> Option<IpAddr> {
    if let Some(v4) = sa.as_sockaddr_in() {
        return Some(IpAddr::V4(v4.ip()));
    }
    sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
}

/// Turn an address and its netmask into a network; `None` for a non-contiguous mask.
pub(crate) fn network_of(addr: IpAddr, mask: Option<IpAddr>) -> Option<IpNet> {
    match (addr, mask) {
        (IpAddr::V4(a), Some(IpAddr::V4(m))) => {
            Ipv4Net::new(a, ipnet::ipv4_mask_to_prefix(m).ok()?).ok().map(IpNet::V4)
        }
        (IpAddr::V6(a), Some(IpAddr::V6(m))) => {
            Ipv6Net::new(a, ipnet::ipv6_mask_to_prefix(m).ok()?).ok().map(IpNet::V6)
        }
        (a, None) => Some(IpNet::from(a)),
        _ => None,
    }
}

/// All interfaces that have at least one IP address, sorted by index.
pub fn interfaces() -> std::io::Result<Vec<Interface>> {
    let mut by_name: BTreeMap<String, Interface> = BTreeMap::new();
    for ifa in getifaddrs()? {
        let Some(addr) = ifa.address.as_ref().and_then(ip_of) else {
            continue;
        };
        let mask = ifa.netmask.as_ref().and_then(ip_of);
        let Some(net) = network_of(addr, mask) else {
            continue;
        };
        let entry = by_name.entry(ifa.interface_name.clone()).or_insert_with(|| Interface {
            index: if_nametoindex(ifa.interface_name.as_str()).unwrap_or(0),
            name: ifa.interface_name.clone(),
            networks: Vec::new(),
            up: ifa.flags.contains(InterfaceFlags::IFF_UP),
        });
        if !entry.networks.contains(&net) {
            entry.networks.push(net);
        }
    }
    let mut out: Vec<Interface> = by_name.into_values().filter(|i| i.index != 0).collect();
    out.sort_by_key(|i| i.index);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_from_masks() {
        let a: IpAddr = "192.168.1.23".parse().expect("addr");
        let m: IpAddr = "255.255.255.0".parse().expect("mask");
        assert_eq!(network_of(a, Some(m)), Some("192.168.1.23/24".parse().expect("net")));
        let bad: IpAddr = "255.0.255.0".parse().expect("mask");
        assert_eq!(network_of(a, Some(bad)), None);
        let a6: IpAddr = "fd00::1".parse().expect("addr");
        let m6: IpAddr = "ffff:ffff:ffff:ffff::".parse().expect("mask");
        assert_eq!(network_of(a6, Some(m6)), Some("fd00::1/64".parse().expect("net")));
        assert_eq!(network_of(a6, None), Some("fd00::1/128".parse().expect("net")));
        assert_eq!(network_of(a, Some(m6)), None);
    }

    #[test]
    fn loopback_is_listed() {
        let all = interfaces().expect("getifaddrs");
        let lo = all.iter().find(|i| i.networks.iter().any(|n| n.addr().is_loopback())).expect("a loopback interface");
        assert!(lo.index > 0 && lo.up);
    }
}
