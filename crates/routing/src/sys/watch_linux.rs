//! Linux: rtnetlink multicast groups for links, addresses and routes.

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::route::RouteAttribute;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::watch::{ChangeKind, NetChange};

// <linux/rtnetlink.h>: the legacy group bitmask accepted by bind(2).
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;
/// `RT_TABLE_LOCAL`: the kernel's table of local and broadcast addresses.
const RT_TABLE_LOCAL: u32 = 255;

pub(crate) struct Watcher {
    socket: Socket,
}

impl Watcher {
    pub(crate) fn open() -> io::Result<Watcher> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        let groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE;
        socket.bind(&SocketAddr::new(0, groups))?;
        socket.set_non_blocking(true)?;
        Ok(Watcher { socket })
    }

    pub(crate) fn wait(&mut self, timeout: Duration) -> io::Result<Vec<NetChange>> {
        if !super::readable(self.socket.as_fd(), timeout)? {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        loop {
            let bytes = match self.socket.recv_from_full() {
                Ok((b, _)) => b,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(out),
                // The kernel dropped messages for us (ENOBUFS): something changed.
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => {
                    out.push(NetChange { kind: ChangeKind::Link, ifindex: 0 });
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut off = 0;
            while off < bytes.len() {
                let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[off..]) else { break };
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                off += len;
                if let NetlinkPayload::InnerMessage(m) = msg.payload {
                    out.extend(classify(&m));
                }
            }
        }
    }
}

fn classify(m: &RouteNetlinkMessage) -> Option<NetChange> {
    use RouteNetlinkMessage as M;
    match m {
        M::NewLink(l) | M::DelLink(l) => Some(NetChange { kind: ChangeKind::Link, ifindex: l.header.index }),
        M::NewAddress(a) | M::DelAddress(a) => Some(NetChange { kind: ChangeKind::Address, ifindex: a.header.index }),
        M::NewRoute(r) | M::DelRoute(r) => {
            let table = r
                .attributes
                .iter()
                .find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None })
                .unwrap_or(r.header.table as u32);
            // The local table follows the addresses, reported already.
            if table == RT_TABLE_LOCAL {
                return None;
            }
            let oif = r.attributes.iter().find_map(|a| if let RouteAttribute::Oif(i) = a { Some(*i) } else { None });
            Some(NetChange { kind: ChangeKind::Route, ifindex: oif.unwrap_or(0) })
        }
        _ => None,
    }
}
