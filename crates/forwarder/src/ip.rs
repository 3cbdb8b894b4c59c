//! Writing the IP packets either end answers with itself, through etherparse.

use std::net::{IpAddr, SocketAddr};

use etherparse::{IpHeaders, PacketBuilder, PacketBuilderStep};

/// An IPv4 or IPv6 header from `src` to `dst` (TTL/hop limit 64); `None` when the
/// families differ.
pub fn builder(src: IpAddr, dst: IpAddr) -> Option<PacketBuilderStep<IpHeaders>> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Some(PacketBuilder::ipv4(s.octets(), d.octets(), 64)),
        (IpAddr::V6(s), IpAddr::V6(d)) => Some(PacketBuilder::ipv6(s.octets(), d.octets(), 64)),
        _ => None,
    }
}

/// A UDP datagram from `from` to `to`.
pub fn udp(from: SocketAddr, to: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    let b = builder(from.ip(), to.ip())?.udp(from.port(), to.port());
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).ok()?;
    Some(out)
}
