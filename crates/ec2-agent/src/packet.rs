//! Reading the client's IP packets and writing the ones the agent answers with
//! itself (UDP replies, ICMP echo replies and errors, TCP resets), through etherparse.

use std::net::IpAddr;

use forwarder::ip::builder;

use etherparse::{icmpv4, icmpv6, Icmpv4Type, Icmpv6Type, IpNumber, NetSlice, SlicedPacket, TransportSlice};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4<'a> {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        syn: bool,
        ack: bool,
        /// The acknowledgment number (meaningful when `ack`).
        ack_number: u32,
        rst: bool,
        payload_len: usize,
    },
    Udp {
        sport: u16,
        dport: u16,
        payload: &'a [u8],
    },
    EchoRequest {
        id: u16,
        seq: u16,
        payload: &'a [u8],
    },
    /// Anything else (ICMP other than echo requests, other protocols).
    Other(u8),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4<'a>,
}

/// `None` for what is not a well-formed IPv4/IPv6 packet.
pub fn parse(packet: &[u8]) -> Option<Parsed<'_>> {
    let s = SlicedPacket::from_ip(packet).ok()?;
    let (src, dst, proto): (IpAddr, IpAddr, IpNumber) = match &s.net {
        Some(NetSlice::Ipv4(ip)) => {
            (ip.header().source_addr().into(), ip.header().destination_addr().into(), ip.payload().ip_number)
        }
        Some(NetSlice::Ipv6(ip)) => {
            (ip.header().source_addr().into(), ip.header().destination_addr().into(), ip.payload().ip_number)
        }
        _ => return None,
    };
    let l4 = match s.transport {
        Some(TransportSlice::Tcp(t)) => L4::Tcp {
            sport: t.source_port(),
            dport: t.destination_port(),
            seq: t.sequence_number(),
            syn: t.syn(),
            ack: t.ack(),
            ack_number: t.acknowledgment_number(),
            rst: t.rst(),
            payload_len: t.payload().len(),
        },
        Some(TransportSlice::Udp(u)) => {
            L4::Udp { sport: u.source_port(), dport: u.destination_port(), payload: u.payload() }
        }
        Some(TransportSlice::Icmpv4(i)) => match i.icmp_type() {
            Icmpv4Type::EchoRequest(e) => L4::EchoRequest { id: e.id, seq: e.seq, payload: i.payload() },
            _ => L4::Other(proto.0),
        },
        Some(TransportSlice::Icmpv6(i)) => match i.icmp_type() {
            Icmpv6Type::EchoRequest(e) => L4::EchoRequest { id: e.id, seq: e.seq, payload: i.payload() },
            _ => L4::Other(proto.0),
        },
        _ => L4::Other(proto.0),
    };
    Some(Parsed { src, dst, l4 })
}

pub use forwarder::ip::udp;

/// The echo reply `from` sends back to `to`.
pub fn echo_reply(from: IpAddr, to: IpAddr, id: u16, seq: u16, payload: &[u8]) -> Option<Vec<u8>> {
    let b = builder(from, to)?;
    let mut out = Vec::new();
    match from {
        IpAddr::V4(_) => b.icmpv4_echo_reply(id, seq).write(&mut out, payload).ok()?,
        IpAddr::V6(_) => b.icmpv6_echo_reply(id, seq).write(&mut out, payload).ok()?,
    }
    Some(out)
}

/// Answer a TCP segment with a reset (connection refused, denied by policy,
/// or a connection this agent does not know, say after a restart), as RFC 793
/// says: a segment with an ACK gets `<SEQ=SEG.ACK><CTL=RST>`, which the peer
/// accepts (a reset with another sequence number is ignored, RFC 5961, and the
/// connection would hang); one without gets `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`.
pub fn tcp_reset(p: &Parsed<'_>) -> Option<Vec<u8>> {
    let L4::Tcp { sport, dport, seq, syn, ack, ack_number, payload_len, .. } = p.l4 else { return None };
    let b = if ack {
        builder(p.dst, p.src)?.tcp(dport, sport, ack_number, 0).rst()
    } else {
        let ack = seq.wrapping_add(payload_len as u32).wrapping_add(u32::from(syn));
        builder(p.dst, p.src)?.tcp(dport, sport, 0, 0).rst().ack(ack)
    };
    let mut out = Vec::new();
    b.write(&mut out, &[]).ok()?;
    Some(out)
}

/// Why a destination cannot be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unreachable {
    /// Refused by the agent's policy ("administratively prohibited").
    Prohibited,
    Host,
    Port,
}

/// The ICMP/ICMPv6 destination-unreachable error for `original`, sent by its
/// destination, quoting as much of the original as the RFCs ask for.
pub fn unreachable(original: &[u8], p: &Parsed<'_>, why: Unreachable) -> Option<Vec<u8>> {
    let b = builder(p.dst, p.src)?;
    let mut out = Vec::new();
    match p.src {
        IpAddr::V4(_) => {
            let code = match why {
                Unreachable::Prohibited => icmpv4::DestUnreachableHeader::FilterProhibited,
                Unreachable::Host => icmpv4::DestUnreachableHeader::Host,
                Unreachable::Port => icmpv4::DestUnreachableHeader::Port,
            };
            let quote = &original[..original.len().min(548)];
            b.icmpv4(Icmpv4Type::DestinationUnreachable(code)).write(&mut out, quote).ok()?;
        }
        IpAddr::V6(_) => {
            let code = match why {
                Unreachable::Prohibited => icmpv6::DestUnreachableCode::Prohibited,
                Unreachable::Host => icmpv6::DestUnreachableCode::Address,
                Unreachable::Port => icmpv6::DestUnreachableCode::Port,
            };
            let quote = &original[..original.len().min(1232)];
            b.icmpv6(Icmpv6Type::DestinationUnreachable(code)).write(&mut out, quote).ok()?;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;
    use std::net::SocketAddr;

    fn syn() -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4([100, 127, 0, 1], [10, 0, 1, 5], 64)
            .tcp(40000, 5432, 1000, 64240)
            .syn()
            .write(&mut out, &[])
            .expect("build");
        out
    }

    #[test]
    fn tcp_syn_is_read_and_reset_correctly() {
        let pkt = syn();
        let p = parse(&pkt).expect("parse");
        assert_eq!(p.dst, "10.0.1.5".parse::<IpAddr>().expect("addr"));
        assert!(matches!(p.l4, L4::Tcp { sport: 40000, dport: 5432, seq: 1000, syn: true, ack: false, .. }));
        let rst = tcp_reset(&p).expect("rst");
        let r = parse(&rst).expect("parse rst");
        assert_eq!((r.src, r.dst), (p.dst, p.src));
        let s = SlicedPacket::from_ip(&rst).expect("slice");
        let Some(TransportSlice::Tcp(t)) = s.transport else { panic!("not tcp") };
        assert!(t.rst() && t.ack());
        assert_eq!((t.source_port(), t.destination_port(), t.acknowledgment_number()), (5432, 40000, 1001));
    }

    /// A segment of a connection the agent does not know (it restarted): the
    /// reset carries the segment's ACK number as its sequence number and no
    /// ACK, so the peer's kernel takes it and the application sees a reset.
    #[test]
    fn a_reset_for_an_established_segment_uses_its_ack_number() {
        let mut pkt = Vec::new();
        PacketBuilder::ipv4([100, 127, 0, 1], [10, 0, 1, 5], 64)
            .tcp(40000, 5432, 1000, 64240)
            .ack(777_777)
            .psh()
            .write(&mut pkt, b"select 1;")
            .expect("build");
        let p = parse(&pkt).expect("parse");
        let rst = tcp_reset(&p).expect("rst");
        let s = SlicedPacket::from_ip(&rst).expect("slice");
        let Some(TransportSlice::Tcp(t)) = s.transport else { panic!("not tcp") };
        assert!(t.rst() && !t.ack());
        assert_eq!((t.source_port(), t.destination_port(), t.sequence_number()), (5432, 40000, 777_777));
    }

    #[test]
    fn udp_and_echo_round_trip() {
        let from: SocketAddr = "10.0.2.2:53".parse().expect("addr");
        let to: SocketAddr = "100.127.0.1:5555".parse().expect("addr");
        let pkt = udp(from, to, b"answer").expect("udp");
        assert_eq!(parse(&pkt).expect("parse").l4, L4::Udp { sport: 53, dport: 5555, payload: b"answer" });
        let six = echo_reply("fd77::5".parse().expect("a"), "fd12::1".parse().expect("a"), 7, 9, b"abc").expect("v6");
        assert!(parse(&six).is_some());
        assert!(udp(from, "[fd12::1]:5".parse().expect("addr"), b"x").is_none(), "mixed families");
    }

    #[test]
    fn unreachable_quotes_the_original() {
        let pkt = syn();
        let p = parse(&pkt).expect("parse");
        let err = unreachable(&pkt, &p, Unreachable::Prohibited).expect("icmp");
        let s = SlicedPacket::from_ip(&err).expect("slice");
        let Some(TransportSlice::Icmpv4(i)) = s.transport else { panic!("not icmp") };
        assert_eq!(i.icmp_type(), Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::FilterProhibited));
        assert_eq!(i.payload(), &pkt[..]);
    }

    #[test]
    fn garbage_is_not_a_packet() {
        assert!(parse(&[]).is_none());
        assert!(parse(&[0x45, 0, 0]).is_none());
        assert!(parse(&[0x10; 40]).is_none());
    }
}
