//! The laptop end's view of its TCP connections, to reset them when the
//! ec2-agent that carried them is gone. After the agent restarts (or the
//! tunnel fails over to another instance, or the client was away past the
//! agent's grace period) a connection whose far end died with the agent hangs
//! for as long as its application stays silent: a download waits for data
//! that will never come. The agent says so in its HELLO ([`crate::wire::caps::FRESH`]);
//! the client then answers each connection it has seen with a reset, as if
//! from the far end, so the application fails at once.
//!
//! Without I/O: packets from the device are observed, resets are returned.

use std::collections::HashMap;
use std::net::IpAddr;

use etherparse::{NetSlice, SlicedPacket, TransportSlice};

/// Connections remembered at most; beyond, new ones are not (they then hang
/// as before this existed, until their own timeouts).
pub const MAX_FLOWS: usize = 65_536;

/// A connection as the laptop sends it: (src, sport, dst, dport).
type Key = (IpAddr, u16, IpAddr, u16);

/// TCP connections seen leaving the laptop, each with the acknowledgment
/// number of its latest segment: what the laptop expects next from the far
/// end, so a reset with that sequence number is accepted at once (RFC 5961).
#[derive(Debug, Default)]
pub struct FlowWatch {
    flows: HashMap<Key, u32>,
}

impl FlowWatch {
    /// A packet the laptop sent into the tunnel.
    pub fn observe(&mut self, packet: &[u8]) {
        let Ok(p) = SlicedPacket::from_ip(packet) else { return };
        let (src, dst) = match &p.net {
            Some(NetSlice::Ipv4(v4)) => {
                (IpAddr::V4(v4.header().source_addr()), IpAddr::V4(v4.header().destination_addr()))
            }
            Some(NetSlice::Ipv6(v6)) => {
                (IpAddr::V6(v6.header().source_addr()), IpAddr::V6(v6.header().destination_addr()))
            }
            _ => return,
        };
        let Some(TransportSlice::Tcp(tcp)) = &p.transport else { return };
        let key = (src, tcp.source_port(), dst, tcp.destination_port());
        if tcp.rst() || tcp.fin() {
            // Closed, or closing: the application is told by the far end's
            // answer or by its own close; nothing to reset.
            self.flows.remove(&key);
        } else if tcp.ack() && (self.flows.len() < MAX_FLOWS || self.flows.contains_key(&key)) {
            self.flows.insert(key, tcp.acknowledgment_number());
        }
    }

    /// How many connections are remembered.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// A reset for every remembered connection, from its far end to the
    /// laptop, and forget them all.
    pub fn resets(&mut self) -> Vec<Vec<u8>> {
        self.flows.drain().filter_map(|((src, sport, dst, dport), ack)| reset(dst, dport, src, sport, ack)).collect()
    }
}

/// A TCP reset from `from:fport` to `to:tport` with sequence number `seq`.
fn reset(from: IpAddr, fport: u16, to: IpAddr, tport: u16, seq: u32) -> Option<Vec<u8>> {
    let b = crate::ip::builder(from, to)?.tcp(fport, tport, seq, 0).rst();
    let mut out = Vec::with_capacity(b.size(0));
    b.write(&mut out, &[]).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    fn segment(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, ack: u32, flags: &str) -> Vec<u8> {
        let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1000, 65535);
        if flags.contains('A') {
            b = b.ack(ack);
        }
        if flags.contains('S') {
            b = b.syn();
        }
        if flags.contains('F') {
            b = b.fin();
        }
        if flags.contains('R') {
            b = b.rst();
        }
        let mut out = Vec::new();
        b.write(&mut out, b"data").expect("segment");
        out
    }

    #[test]
    fn a_reset_comes_from_the_far_end_with_what_the_laptop_expects_next() {
        let mut w = FlowWatch::default();
        let laptop = [100, 127, 0, 1];
        let server = [10, 10, 0, 2];
        w.observe(&segment(laptop, 40000, server, 8080, 0, "S"));
        assert!(w.is_empty(), "a SYN alone is not a connection yet");
        w.observe(&segment(laptop, 40000, server, 8080, 5000, "A"));
        w.observe(&segment(laptop, 40000, server, 8080, 7000, "A"));
        let resets = w.resets();
        assert_eq!(resets.len(), 1);
        assert!(w.is_empty());
        let p = SlicedPacket::from_ip(&resets[0]).expect("parses");
        let Some(NetSlice::Ipv4(ip)) = p.net else { panic!("IPv4") };
        assert_eq!((ip.header().source(), ip.header().destination()), (server, laptop));
        let Some(TransportSlice::Tcp(tcp)) = p.transport else { panic!("TCP") };
        assert!(tcp.rst() && !tcp.syn() && !tcp.fin());
        assert_eq!((tcp.source_port(), tcp.destination_port()), (8080, 40000));
        assert_eq!(tcp.sequence_number(), 7000, "the laptop's latest ACK: exactly what it expects next");
        let pseudo = tcp.to_header().calc_checksum_ipv4(&ip.header().to_header(), &[]).expect("checksum");
        assert_eq!(tcp.checksum(), pseudo, "a valid checksum, or the kernel drops it");
    }

    #[test]
    fn closed_connections_and_other_traffic_are_not_reset() {
        let mut w = FlowWatch::default();
        let (a, b) = ([100, 127, 0, 1], [10, 10, 0, 2]);
        w.observe(&segment(a, 1, b, 80, 9, "A"));
        w.observe(&segment(a, 1, b, 80, 9, "AF"));
        w.observe(&segment(a, 2, b, 80, 9, "A"));
        w.observe(&segment(a, 2, b, 80, 9, "AR"));
        let mut udp = Vec::new();
        PacketBuilder::ipv4(a, b, 64).udp(53, 53).write(&mut udp, b"q").expect("udp");
        w.observe(&udp);
        w.observe(b"not a packet");
        assert!(w.resets().is_empty());
    }

    #[test]
    fn ipv6_connections_are_reset_too_and_memory_is_bounded() {
        let mut w = FlowWatch::default();
        let (a, b): ([u8; 16], [u8; 16]) = (
            [0xfd, 0xbb, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0xfd, 0x10, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        );
        let mut seg = Vec::new();
        PacketBuilder::ipv6(a, b, 64).tcp(40000, 443, 1, 65535).ack(77).write(&mut seg, &[]).expect("v6");
        w.observe(&seg);
        let resets = w.resets();
        assert_eq!(resets.len(), 1);
        let p = SlicedPacket::from_ip(&resets[0]).expect("parses");
        let Some(TransportSlice::Tcp(tcp)) = p.transport else { panic!("TCP") };
        assert!(tcp.rst() && tcp.sequence_number() == 77 && tcp.destination_port() == 40000);

        for port in 0..=u16::MAX {
            w.observe(&segment([100, 127, 0, 1], port, [10, 10, 0, 2], 80, 1, "A"));
        }
        w.observe(&segment([100, 127, 0, 2], 1, [10, 10, 0, 2], 80, 1, "A"));
        assert_eq!(w.len(), MAX_FLOWS);
    }
}
