//! Split DNS on the laptop end: queries to the tunnel's resolver address go
//! through the tunnel only for the configured domains. Any other name sent there
//! (a stray resolver configuration, a search-domain expansion) is answered
//! REFUSED on the laptop, so it never reaches the VPC's resolver.
//!
//! Only UDP is inspected; DNS over TCP to the tunnel resolver passes as is (the
//! operating systems route by domain before choosing it, and use TCP only to
//! retry a truncated UDP answer).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use simple_dns::{Packet, PacketFlag, RCODE};

use crate::ip;

/// A domain name as the user gave it, validated and normalised (lowercase, no
/// trailing dot).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Domain(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DomainError {
    #[error("{0:?} is not a domain name (letters, digits and hyphens in dot-separated labels of 1-63 characters)")]
    Invalid(String),
    #[error("{0:?} is a whole top-level domain; name a domain under it")]
    TopLevel(String),
}

impl Domain {
    pub fn parse(s: &str) -> Result<Domain, DomainError> {
        let name = s.trim().trim_end_matches('.').to_ascii_lowercase();
        let ok_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(ok_label) {
            return Err(DomainError::Invalid(s.to_string()));
        }
        if !name.contains('.') {
            return Err(DomainError::TopLevel(s.to_string()));
        }
        Ok(Domain(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `name` (any case, trailing dot or not) is this domain or below it.
    pub fn contains(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.');
        name.len() >= self.0.len()
            && name[name.len() - self.0.len()..].eq_ignore_ascii_case(&self.0)
            && (name.len() == self.0.len() || name.as_bytes()[name.len() - self.0.len() - 1] == b'.')
    }
}

impl std::fmt::Display for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What to do with a packet read from the tunnel device.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not a DNS query to the tunnel resolver, or one for a configured domain.
    Forward,
    /// A query for another name: write this answer back to the device.
    Answer(Vec<u8>),
}

/// The tunnel resolver's addresses and the domains it serves.
#[derive(Debug)]
pub struct SplitDns {
    addresses: Vec<IpAddr>,
    domains: Vec<Domain>,
    /// Queries sent through the tunnel.
    pub forwarded: AtomicU64,
    /// Queries answered REFUSED on the laptop.
    pub refused: AtomicU64,
}

impl SplitDns {
    pub fn new(addresses: Vec<IpAddr>, domains: Vec<Domain>) -> Self {
        SplitDns { addresses, domains, forwarded: AtomicU64::new(0), refused: AtomicU64::new(0) }
    }

    pub fn addresses(&self) -> &[IpAddr] {
        &self.addresses
    }

    pub fn domains(&self) -> &[Domain] {
        &self.domains
    }

    pub fn inspect(&self, packet: &[u8]) -> Verdict {
        // Cheap checks first: this runs for every packet.
        let Some(&first) = packet.first() else { return Verdict::Forward };
        let udp = match first >> 4 {
            4 => packet.len() > 20 && packet[9] == 17,
            6 => packet.len() > 40 && packet[6] == 17,
            _ => false,
        };
        if !udp {
            return Verdict::Forward;
        }
        let Ok(s) = SlicedPacket::from_ip(packet) else { return Verdict::Forward };
        let (src, dst): (IpAddr, IpAddr) = match &s.net {
            Some(NetSlice::Ipv4(ip)) => (ip.header().source_addr().into(), ip.header().destination_addr().into()),
            Some(NetSlice::Ipv6(ip)) => (ip.header().source_addr().into(), ip.header().destination_addr().into()),
            _ => return Verdict::Forward,
        };
        let Some(TransportSlice::Udp(u)) = s.transport else { return Verdict::Forward };
        if u.destination_port() != 53 || !self.addresses.contains(&dst) {
            return Verdict::Forward;
        }
        let query = u.payload();
        if self.wanted(query) {
            self.forwarded.fetch_add(1, Ordering::Relaxed);
            return Verdict::Forward;
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        match refusal(query)
            .and_then(|reply| ip::udp(SocketAddr::new(dst, 53), SocketAddr::new(src, u.source_port()), &reply))
        {
            Some(p) => Verdict::Answer(p),
            // Not even a DNS header: nothing to answer, and nothing to forward.
            None => Verdict::Answer(Vec::new()),
        }
    }

    fn wanted(&self, query: &[u8]) -> bool {
        in_domains(&self.domains, query)
    }
}

/// Whether `query` parses and every one of its questions is in one of `domains`.
pub fn in_domains(domains: &[Domain], query: &[u8]) -> bool {
    let Ok(p) = Packet::parse(query) else { return false };
    !p.questions.is_empty()
        && p.questions.iter().all(|q| {
            let name = q.qname.to_string();
            domains.iter().any(|d| d.contains(&name))
        })
}

/// A REFUSED answer to `query` (its id and questions echoed).
pub fn refusal(query: &[u8]) -> Option<Vec<u8>> {
    error_reply(query, RCODE::Refused, PacketFlag::RESPONSE)
}

/// An answer to `query` with no records: its id and questions echoed, `rcode`
/// and `flags` set; `None` if the query does not parse.
pub(crate) fn error_reply(query: &[u8], rcode: RCODE, flags: PacketFlag) -> Option<Vec<u8>> {
    let q = Packet::parse(query).ok()?;
    let mut reply = q.into_reply();
    *reply.rcode_mut() = rcode;
    reply.set_flags(flags);
    reply.answers.clear();
    reply.name_servers.clear();
    reply.additional_records.clear();
    reply.build_bytes_vec().ok()
}

pub mod pending;
pub mod tcp;

#[cfg(test)]
mod tests;
