//! Interface addresses: an IPv4 point-to-point pair from a configurable range (default
//! inside the shared address space 100.64.0.0/10) that overlaps nothing in use, and a
//! random IPv6 unique local address (RFC 4193).

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Default range for tunnel addresses: the top /16 of 100.64.0.0/10, away from the
/// low end that carrier-grade NAT and other overlay networks hand out first.
pub const DEFAULT_V4_RANGE: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(100, 127, 0, 0), 16) {
    Ok(n) => n,
    Err(_) => panic!("constant range"),
};

/// The interface's own IPv4 address and its point-to-point peer (macOS utun needs one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct V4Pair {
    pub local: Ipv4Addr,
    pub peer: Ipv4Addr,
}

impl V4Pair {
    /// The /30 both addresses live in.
    pub fn block(&self) -> Ipv4Net {
        Ipv4Net::new(self.local, 30).map(|n| n.trunc()).unwrap_or_else(|_| Ipv4Net::from(self.local))
    }
}

/// The first /30 of `range` that overlaps none of `in_use` (interface networks, routed
/// CIDRs, existing routes): `.1` is ours, `.2` the peer.
pub fn allocate_v4(range: Ipv4Net, in_use: &[IpNet]) -> Option<V4Pair> {
    let range = range.trunc();
    if range.prefix_len() > 30 {
        return None;
    }
    let clashes = |block: &Ipv4Net| {
        in_use.iter().any(|n| match n {
            IpNet::V4(n) => n.contains(&block.network()) || block.contains(&n.network()),
            IpNet::V6(_) => false,
        })
    };
    range.subnets(30).ok()?.find(|b| !clashes(b)).map(|b| {
        let base = u32::from(b.network());
        V4Pair { local: Ipv4Addr::from(base + 1), peer: Ipv4Addr::from(base + 2) }
    })
}

/// `fdXX:XXXX:XXXX::1/64` from 40 random bits (the RFC 4193 global ID).
pub fn ula(global_id: [u8; 5]) -> Ipv6Net {
    let mut o = [0u8; 16];
    o[0] = 0xfd;
    o[1..6].copy_from_slice(&global_id);
    o[15] = 1;
    Ipv6Net::new(Ipv6Addr::from(o), 64).unwrap_or_else(|_| Ipv6Net::from(Ipv6Addr::from(o)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("test CIDR")).collect()
    }

    #[test]
    fn first_free_block_is_taken() {
        let p = allocate_v4(DEFAULT_V4_RANGE, &[]).expect("free");
        assert_eq!((p.local, p.peer), (Ipv4Addr::new(100, 127, 0, 1), Ipv4Addr::new(100, 127, 0, 2)));
        assert_eq!(p.block().to_string(), "100.127.0.0/30");
    }

    #[test]
    fn blocks_in_use_are_skipped() {
        // Another tunnel on .0/30, a host address in .4/30, a wider route over .8-.15.
        let in_use = nets(&["100.127.0.1/32", "100.127.0.6/32", "100.127.0.8/29", "fd00::/8"]);
        let p = allocate_v4(DEFAULT_V4_RANGE, &in_use).expect("free");
        assert_eq!(p.local, Ipv4Addr::new(100, 127, 0, 17));
    }

    #[test]
    fn a_range_covered_by_a_routed_cidr_is_exhausted() {
        assert_eq!(allocate_v4(DEFAULT_V4_RANGE, &nets(&["100.64.0.0/10"])), None);
        assert_eq!(allocate_v4("10.0.0.0/31".parse().expect("range"), &[]), None);
        let tiny = allocate_v4("10.9.0.4/30".parse().expect("range"), &[]).expect("one block");
        assert_eq!(tiny.local, Ipv4Addr::new(10, 9, 0, 5));
    }

    #[test]
    fn ula_layout() {
        let n = ula([0x12, 0x34, 0x56, 0x78, 0x9a]);
        assert_eq!(n.to_string(), "fd12:3456:789a::1/64");
        assert!(n.addr().segments()[0] & 0xfe00 == 0xfc00);
    }
}
