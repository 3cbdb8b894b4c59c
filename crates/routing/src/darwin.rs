//! The macOS `PF_ROUTE` message format, as pure functions so it is tested on every
//! platform: building `RTM_ADD`/`RTM_DELETE` messages, reading a `NET_RT_DUMP` sysctl
//! buffer, and netmask maths. The layout is XNU's `struct rt_msghdr` (92 bytes) followed
//! by the sockaddrs named in `rtm_addrs`, each padded to 4 bytes. On macOS builds the
//! constants and sizes below are checked against the `libc` crate at compile time.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::Route;

pub const RTM_VERSION: u8 = 5;
pub const RTM_ADD: u8 = 0x1;
pub const RTM_DELETE: u8 = 0x2;
pub const RTM_CHANGE: u8 = 0x3;
pub const RTM_NEWADDR: u8 = 0xc;
pub const RTM_DELADDR: u8 = 0xd;
pub const RTM_IFINFO: u8 = 0xe;

pub const RTF_UP: i32 = 0x1;
pub const RTF_GATEWAY: i32 = 0x2;
pub const RTF_HOST: i32 = 0x4;
pub const RTF_LLINFO: i32 = 0x400;
pub const RTF_STATIC: i32 = 0x800;
pub const RTF_WASCLONED: i32 = 0x20000;
pub const RTF_BROADCAST: i32 = 0x40_0000;
pub const RTF_MULTICAST: i32 = 0x80_0000;
pub const RTF_IFSCOPE: i32 = 0x100_0000;

pub const RTA_DST: i32 = 0x1;
pub const RTA_GATEWAY: i32 = 0x2;
pub const RTA_NETMASK: i32 = 0x4;
/// Number of sockaddr slots (`RTAX_MAX`): DST, GATEWAY, NETMASK, GENMASK, IFP, IFA, AUTHOR, BRD.
pub const RTAX_MAX: usize = 8;

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 30;
pub const AF_LINK: u8 = 18;

/// `sizeof(struct rt_msghdr)`: 36 bytes of fields plus 56 of `struct rt_metrics`.
pub const RT_MSGHDR_LEN: usize = 92;
pub const SOCKADDR_IN_LEN: usize = 16;
pub const SOCKADDR_IN6_LEN: usize = 28;
pub const SOCKADDR_DL_LEN: usize = 20;

#[cfg(target_os = "macos")]
const _: () = {
    assert!(RT_MSGHDR_LEN == std::mem::size_of::<libc::rt_msghdr>());
    assert!(SOCKADDR_IN_LEN == std::mem::size_of::<libc::sockaddr_in>());
    assert!(SOCKADDR_IN6_LEN == std::mem::size_of::<libc::sockaddr_in6>());
    assert!(SOCKADDR_DL_LEN == std::mem::size_of::<libc::sockaddr_dl>());
    assert!(RTM_VERSION as i32 == libc::RTM_VERSION);
    assert!(RTM_ADD as i32 == libc::RTM_ADD && RTM_DELETE as i32 == libc::RTM_DELETE);
    assert!(RTF_UP == libc::RTF_UP && RTF_GATEWAY == libc::RTF_GATEWAY && RTF_HOST == libc::RTF_HOST);
    assert!(RTF_STATIC == libc::RTF_STATIC && RTF_WASCLONED == libc::RTF_WASCLONED);
    assert!(RTF_BROADCAST == libc::RTF_BROADCAST && RTF_MULTICAST == libc::RTF_MULTICAST);
    assert!(RTF_IFSCOPE == libc::RTF_IFSCOPE && RTF_LLINFO == libc::RTF_LLINFO);
    assert!(RTM_CHANGE as i32 == libc::RTM_CHANGE && RTM_IFINFO as i32 == libc::RTM_IFINFO);
    assert!(RTM_NEWADDR as i32 == libc::RTM_NEWADDR && RTM_DELADDR as i32 == libc::RTM_DELADDR);
    assert!(std::mem::offset_of!(libc::rt_msghdr, rtm_index) == 4);
    assert!(std::mem::offset_of!(libc::rt_msghdr, rtm_flags) == 8);
    assert!(std::mem::offset_of!(libc::ifa_msghdr, ifam_index) == 12);
    assert!(std::mem::offset_of!(libc::if_msghdr, ifm_index) == 12);
    assert!(RTA_DST == libc::RTA_DST && RTA_GATEWAY == libc::RTA_GATEWAY && RTA_NETMASK == libc::RTA_NETMASK);
    assert!(RTAX_MAX as i32 == libc::RTAX_MAX);
    assert!(AF_INET as i32 == libc::AF_INET && AF_INET6 as i32 == libc::AF_INET6 && AF_LINK as i32 == libc::AF_LINK);
};

/// XNU's `ROUNDUP`: sockaddrs in routing messages start on 4-byte boundaries, and a
/// zero-length one still takes 4 bytes.
pub fn roundup(len: usize) -> usize {
    if len == 0 {
        4
    } else {
        (len + 3) & !3
    }
}

/// Netmask bytes for a prefix length (`len` = 4 or 16).
pub fn prefix_to_mask(prefix: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let bits = (prefix as usize).saturating_sub(i * 8).min(8);
            if bits == 0 {
                0
            } else {
                0xffu8 << (8 - bits)
            }
        })
        .collect()
}

/// Prefix length of a (possibly truncated) mask; `None` if the ones are not contiguous.
pub fn mask_to_prefix(mask: &[u8]) -> Option<u8> {
    let mut prefix = 0u8;
    let mut ended = false;
    for &b in mask {
        if ended {
            if b != 0 {
                return None;
            }
            continue;
        }
        let ones = b.leading_ones() as u8;
        if ones < 8 && b << ones != 0 {
            return None;
        }
        prefix += ones;
        ended = ones < 8;
    }
    Some(prefix)
}

fn push_sockaddr_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut sa = [0u8; SOCKADDR_IN_LEN];
            sa[0] = SOCKADDR_IN_LEN as u8;
            sa[1] = AF_INET;
            sa[4..8].copy_from_slice(&v4.octets());
            out.extend_from_slice(&sa);
        }
        IpAddr::V6(v6) => {
            let mut sa = [0u8; SOCKADDR_IN6_LEN];
            sa[0] = SOCKADDR_IN6_LEN as u8;
            sa[1] = AF_INET6;
            sa[8..24].copy_from_slice(&v6.octets());
            out.extend_from_slice(&sa);
        }
    }
}

fn push_sockaddr_mask(out: &mut Vec<u8>, net: &IpNet) {
    match net {
        IpNet::V4(n) => push_sockaddr_ip(out, IpAddr::V4(n.netmask())),
        IpNet::V6(n) => push_sockaddr_ip(out, IpAddr::V6(n.netmask())),
    }
}

fn push_sockaddr_link(out: &mut Vec<u8>, ifindex: u32) {
    let mut sa = [0u8; SOCKADDR_DL_LEN];
    sa[0] = SOCKADDR_DL_LEN as u8;
    sa[1] = AF_LINK;
    sa[2..4].copy_from_slice(&(ifindex as u16).to_ne_bytes());
    out.extend_from_slice(&sa);
}

fn is_host(net: &IpNet) -> bool {
    net.prefix_len() == net.max_prefix_len()
}

/// The `RTM_ADD`/`RTM_DELETE` message for `route`, as `route(8)` builds it:
/// an interface route carries the interface as a link-level gateway (`-interface
/// utunN`), a gateway route its address with `RTF_GATEWAY`, a host route no netmask.
pub fn route_message(kind: u8, seq: i32, route: &Route) -> Vec<u8> {
    let dest = route.dest.trunc();
    let mut flags = RTF_UP | RTF_STATIC;
    let mut addrs = RTA_DST | RTA_GATEWAY;
    if route.gateway.is_some() {
        flags |= RTF_GATEWAY;
    }
    if is_host(&dest) {
        flags |= RTF_HOST;
    } else {
        addrs |= RTA_NETMASK;
    }
    let mut out = vec![0u8; RT_MSGHDR_LEN];
    out[2] = RTM_VERSION;
    out[3] = kind;
    out[8..12].copy_from_slice(&flags.to_ne_bytes());
    out[12..16].copy_from_slice(&addrs.to_ne_bytes());
    out[20..24].copy_from_slice(&seq.to_ne_bytes());
    push_sockaddr_ip(&mut out, dest.addr());
    match route.gateway {
        Some(gw) => push_sockaddr_ip(&mut out, gw),
        None => push_sockaddr_link(&mut out, route.ifindex),
    }
    if !is_host(&dest) {
        push_sockaddr_mask(&mut out, &dest);
    }
    let len = out.len() as u16;
    out[0..2].copy_from_slice(&len.to_ne_bytes());
    out
}

/// A sockaddr as found in a routing message.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Sockaddr<'a> {
    Ip(IpAddr),
    Link(u32),
    /// Anything else, or a netmask, whose family byte is unreliable: its raw bytes.
    Raw(&'a [u8]),
}

fn parse_sockaddr(sa: &[u8]) -> Sockaddr<'_> {
    if sa.len() < 2 {
        return Sockaddr::Raw(sa);
    }
    match sa[1] {
        AF_INET if sa.len() >= 8 => Sockaddr::Ip(IpAddr::V4(Ipv4Addr::new(sa[4], sa[5], sa[6], sa[7]))),
        AF_INET6 if sa.len() >= 24 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&sa[8..24]);
            // KAME embeds the scope id in bytes 2-3 of link-local addresses.
            if o[0] == 0xfe && o[1] & 0xc0 == 0x80 {
                o[2] = 0;
                o[3] = 0;
            }
            Sockaddr::Ip(IpAddr::V6(Ipv6Addr::from(o)))
        }
        AF_LINK if sa.len() >= 4 => Sockaddr::Link(u16::from_ne_bytes([sa[2], sa[3]]) as u32),
        _ => Sockaddr::Raw(sa),
    }
}

/// Mask bytes of a netmask sockaddr for an address family (the kernel trims trailing
/// zero bytes and may leave the family byte 0).
fn mask_bytes(sa: &[u8], v6: bool) -> Vec<u8> {
    let (start, len) = if v6 { (8, 16) } else { (4, 4) };
    let mut m = vec![0u8; len];
    for (i, b) in sa.iter().skip(start).take(len).enumerate() {
        m[i] = *b;
    }
    m
}

/// One route of a `NET_RT_DUMP` buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpedRoute {
    pub route: Route,
    pub flags: i32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("routing message at offset {offset}: {reason}")]
pub struct DumpError {
    pub offset: usize,
    pub reason: &'static str,
}

/// Read the unicast routes of a `sysctl(NET_RT_DUMP)` buffer. Cloned entries (ARP/ND),
/// broadcast, multicast and down routes are left out; they are never ours to touch.
pub fn parse_dump(buf: &[u8]) -> Result<Vec<DumpedRoute>, DumpError> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < buf.len() {
        let start = off;
        let err = |reason| DumpError { offset: start, reason };
        if buf.len() - off < 4 {
            return Err(err("truncated header"));
        }
        let msglen = u16::from_ne_bytes([buf[off], buf[off + 1]]) as usize;
        if msglen < RT_MSGHDR_LEN || off + msglen > buf.len() {
            return Err(err("bad message length"));
        }
        let msg = &buf[off..off + msglen];
        off += msglen;
        if msg[2] != RTM_VERSION {
            return Err(err("unknown rtm_version"));
        }
        let index = u16::from_ne_bytes([msg[4], msg[5]]) as u32;
        let flags = i32::from_ne_bytes([msg[8], msg[9], msg[10], msg[11]]);
        let addrs = i32::from_ne_bytes([msg[12], msg[13], msg[14], msg[15]]);
        let mut slots: [Option<&[u8]>; RTAX_MAX] = [None; RTAX_MAX];
        let mut p = RT_MSGHDR_LEN;
        for (i, slot) in slots.iter_mut().enumerate() {
            if addrs & (1 << i) == 0 {
                continue;
            }
            if p >= msg.len() {
                return Err(DumpError { offset: start + p, reason: "sockaddr past the message" });
            }
            let sa_len = msg[p] as usize;
            let end = (p + sa_len).min(msg.len());
            *slot = Some(&msg[p..end]);
            p += roundup(sa_len);
        }
        if flags & (RTF_WASCLONED | RTF_BROADCAST | RTF_MULTICAST) != 0 || flags & RTF_UP == 0 {
            continue;
        }
        let Some(Sockaddr::Ip(dest)) = slots[0].map(parse_sockaddr) else {
            continue;
        };
        let max = if dest.is_ipv4() { 32 } else { 128 };
        let prefix = if flags & RTF_HOST != 0 {
            max
        } else if let Some(sa) = slots[2] {
            match mask_to_prefix(&mask_bytes(sa, dest.is_ipv6())) {
                Some(p) => p,
                None => continue,
            }
        } else {
            max
        };
        let Ok(dest) = IpNet::new(dest, prefix) else {
            continue;
        };
        let (gateway, link) = match slots[1].map(parse_sockaddr) {
            Some(Sockaddr::Ip(gw)) if flags & RTF_GATEWAY != 0 => (Some(gw), 0),
            Some(Sockaddr::Link(i)) => (None, i),
            _ => (None, 0),
        };
        let ifindex = if index != 0 { index } else { link };
        out.push(DumpedRoute { route: Route { dest: dest.trunc(), gateway, ifindex }, flags });
    }
    Ok(out)
}

/// What one routing-socket broadcast says changed, when it can matter to open
/// connections: an address added or removed (`ifa_msghdr`, index at byte 12),
/// an interface's flags (`if_msghdr`, index at 12), a route added, removed or
/// changed (`rt_msghdr`, index at 4, flags at 8) other than the host routes the
/// kernel clones for ARP/ND and the like. Anything else (RTM_GET answers,
/// RTM_MISS, multicast membership, short or foreign-version messages): `None`.
pub fn classify_change(msg: &[u8]) -> Option<crate::NetChange> {
    use crate::{ChangeKind, NetChange};
    if msg.len() < 16 || msg[2] != RTM_VERSION {
        return None;
    }
    let u16_at = |o: usize| u16::from_ne_bytes([msg[o], msg[o + 1]]) as u32;
    match msg[3] {
        RTM_NEWADDR | RTM_DELADDR => Some(NetChange { kind: ChangeKind::Address, ifindex: u16_at(12) }),
        RTM_IFINFO => Some(NetChange { kind: ChangeKind::Link, ifindex: u16_at(12) }),
        RTM_ADD | RTM_DELETE | RTM_CHANGE => {
            let flags = i32::from_ne_bytes([msg[8], msg[9], msg[10], msg[11]]);
            let noise = RTF_WASCLONED | RTF_LLINFO | RTF_HOST | RTF_BROADCAST | RTF_MULTICAST;
            (flags & noise == 0).then(|| NetChange { kind: ChangeKind::Route, ifindex: u16_at(4) })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
