//! Linux: the main routing table over an rtnetlink socket (synchronous: a handful of
//! requests at start and stop, and the guard must work from `Drop`).

use std::io;

use ipnet::IpNet;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use super::ifname;
use crate::{Route, RouteEntry, RouteError, RouteTable};

const MAIN_TABLE: u32 = RouteHeader::RT_TABLE_MAIN as u32;

pub(crate) struct NetlinkTable {
    socket: Socket,
    seq: u32,
}

fn os(op: &'static str) -> impl FnOnce(io::Error) -> RouteError {
    move |source| RouteError::Os { op, source }
}

fn to_ip(a: &RouteAddress) -> Option<std::net::IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some((*v4).into()),
        RouteAddress::Inet6(v6) => Some((*v6).into()),
        _ => None,
    }
}

impl NetlinkTable {
    pub(crate) fn open() -> Result<Self, RouteError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(os("open a netlink socket"))?;
        socket.bind_auto().map_err(os("bind the netlink socket"))?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(os("connect the netlink socket"))?;
        Ok(NetlinkTable { socket, seq: 0 })
    }

    /// Send one request and collect the answers until the ack, the error or `Done`.
    fn request(&mut self, flags: u16, msg: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let mut out = Vec::new();
        loop {
            let (bytes, _) = self.socket.recv_from_full()?;
            let mut off = 0;
            while off < bytes.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[off..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "zero-length netlink message"));
                }
                off += len;
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) if e.code.is_none() => return Ok(out),
                    NetlinkPayload::Error(e) => return Err(e.to_io()),
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
        }
    }

    fn message(route: &Route) -> RouteMessage {
        let dest = route.dest.trunc();
        let mut msg = RouteMessage::default();
        msg.header.address_family = match dest {
            IpNet::V4(_) => AddressFamily::Inet,
            IpNet::V6(_) => AddressFamily::Inet6,
        };
        msg.header.destination_prefix_length = dest.prefix_len();
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Static;
        msg.header.kind = RouteType::Unicast;
        msg.header.scope = if route.gateway.is_some() { RouteScope::Universe } else { RouteScope::Link };
        if dest.prefix_len() > 0 {
            msg.attributes.push(RouteAttribute::Destination(dest.addr().into()));
        }
        if let Some(gw) = route.gateway {
            msg.attributes.push(RouteAttribute::Gateway(gw.into()));
        }
        msg.attributes.push(RouteAttribute::Oif(route.ifindex));
        msg
    }
}

impl RouteTable for NetlinkTable {
    fn list(&mut self) -> Result<Vec<RouteEntry>, RouteError> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut req = RouteMessage::default();
            req.header.address_family = family;
            let answers = self.request(NLM_F_DUMP, RouteNetlinkMessage::GetRoute(req)).map_err(os("list routes"))?;
            for m in answers {
                let RouteNetlinkMessage::NewRoute(r) = m else { continue };
                let table = r
                    .attributes
                    .iter()
                    .find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None })
                    .unwrap_or(r.header.table as u32);
                if table != MAIN_TABLE || r.header.kind != RouteType::Unicast {
                    continue;
                }
                let mut dest = None;
                let mut gateway = None;
                let mut oif = 0;
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Destination(d) => dest = to_ip(d),
                        RouteAttribute::Gateway(g) => gateway = to_ip(g),
                        RouteAttribute::Oif(i) => oif = *i,
                        _ => {}
                    }
                }
                let dest = dest.unwrap_or(match family {
                    AddressFamily::Inet6 => std::net::Ipv6Addr::UNSPECIFIED.into(),
                    _ => std::net::Ipv4Addr::UNSPECIFIED.into(),
                });
                // Multipath routes carry no single Oif; they are never ours and we skip them.
                if oif == 0 {
                    continue;
                }
                let Ok(dest) = IpNet::new(dest, r.header.destination_prefix_length) else { continue };
                out.push(RouteEntry {
                    route: Route { dest: dest.trunc(), gateway, ifindex: oif },
                    ifname: ifname(oif),
                    scoped: false,
                });
            }
        }
        Ok(out)
    }

    fn add(&mut self, route: &Route) -> Result<(), RouteError> {
        let msg = RouteNetlinkMessage::NewRoute(Self::message(route));
        self.request(NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, msg)
            .map(drop)
            .map_err(|e| RouteError::from_os("add route", route, e))
    }

    fn delete(&mut self, route: &Route) -> Result<(), RouteError> {
        let msg = RouteNetlinkMessage::DelRoute(Self::message(route));
        self.request(NLM_F_ACK, msg).map(drop).map_err(|e| RouteError::from_os("delete route", route, e))
    }
}
