//! The forwarder <-> ec2-agent wire protocol, carried as a byte stream inside a Port
//! session (SPECIFICATION.md §6 has the byte layout).
//!
//! Every frame is `type: u8`, `length: u16 BE`, `body: [u8; length]`. The client
//! sends HELLO first; the agent answers with its own HELLO or a GOODBYE. Then either
//! side sends PACKET, PING/PONG and finally GOODBYE in any order. Several frames travel
//! in one SSM message: the writer coalesces, the [`Deframer`] copes with any split.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The ec2-agent's default port on the instance's loopback.
pub const DEFAULT_AGENT_PORT: u16 = 7301;

/// The smallest MTU either end accepts: IPv6's minimum (RFC 8200).
pub const MIN_MTU: u16 = 1280;

/// The MTU of a link: the smaller of the two HELLOs', never below [`MIN_MTU`].
pub fn negotiate_mtu(ours: u16, theirs: u16) -> u16 {
    ours.min(theirs).max(MIN_MTU)
}

pub const MAGIC: [u8; 4] = *b"SSMP";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 3;
/// Largest frame body (and so the largest IP packet carried).
pub const MAX_BODY: usize = u16::MAX as usize;

pub const T_HELLO: u8 = 0x01;
pub const T_PACKET: u8 = 0x02;
pub const T_PING: u8 = 0x03;
pub const T_PONG: u8 = 0x04;
pub const T_GOODBYE: u8 = 0x05;
pub const T_ACK: u8 = 0x06;
pub const T_STATUS: u8 = 0x07;
pub const T_SEQ: u8 = 0x08;

/// Bytes a SEQ frame adds to its packet beyond the header: the flow and the
/// sequence number.
pub const SEQ_LEN: usize = 6;

/// Who sent a HELLO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client = 1,
    Agent = 2,
}

/// Capability bits in HELLO.
pub mod caps {
    /// The sender answers PING with PONG.
    pub const PING: u32 = 1 << 0;
    /// IPv6 packets are forwarded.
    pub const IPV6: u32 = 1 << 1;
    /// The sender acknowledges PACKET bytes with ACK frames and limits its own
    /// bytes in flight by the peer's ACKs (used only when both sides set it).
    pub const ACK: u32 = 1 << 2;
    /// Client only: this connection asks for the agent's status (one STATUS
    /// frame after the HELLOs) and carries no packets.
    pub const QUERY: u32 = 1 << 3;
    /// Striping: the client carries one tunnel over several connections (SSM
    /// sessions) with the same client id. A connection whose HELLO carries it
    /// joins the client's running session as one more member instead of taking
    /// its flows over, and when both HELLOs carry it, packets travel as SEQ
    /// frames (numbered per flow bucket across all members) so that the
    /// receiver can put each flow back in order.
    pub const STRIPE: u32 = 1 << 4;
    /// Agent only: the agent holds no flows of this client id (it started a
    /// new session for it: the agent restarted, the client was away past the
    /// grace period, or this is another instance). Whatever the client had
    /// open through its previous session is gone; a client that had one
    /// resets those connections itself ([`crate::tcpwatch`]).
    pub const FRESH: u32 = 1 << 5;
}

/// Optional HELLO fields, as `type: u8, length: u8, value`.
pub mod tlv {
    /// Software name and version, UTF-8.
    pub const SOFTWARE: u8 = 1;
    /// A DNS resolver the agent forwards to (4 or 16 address bytes); repeatable.
    pub const RESOLVER: u8 = 2;
    /// An address inside the tunnel where the client sends DNS queries that the
    /// agent should pass to its resolver (4 or 16 bytes); repeatable, client only.
    pub const DNS_ADDRESS: u8 = 3;
    /// The instance's VPC and region, UTF-8 `vpc-0abc... eu-west-1`; agent only
    /// (the client looks up the VPC's Route 53 private zones with it).
    pub const VPC: u8 = 4;
    /// A domain whose names the client resolves through the tunnel (UTF-8);
    /// repeatable, client only: the agent refuses DNS over TCP for other names.
    pub const DNS_DOMAIN: u8 = 5;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u8,
    pub role: Role,
    pub caps: u32,
    /// Largest IP packet the sender accepts.
    pub mtu: u16,
    /// Identifies a client across reconnects (the agent keys flows by it).
    pub client_id: [u8; 16],
    pub software: String,
    pub resolvers: Vec<std::net::IpAddr>,
    /// Where the client sends tunnel DNS queries ([`tlv::DNS_ADDRESS`]).
    pub dns: Vec<std::net::IpAddr>,
    /// The instance's VPC id and region ([`tlv::VPC`]), when the agent knows them.
    pub vpc: Option<(String, String)>,
    /// The client's split-DNS domains ([`tlv::DNS_DOMAIN`]).
    pub dns_domains: Vec<String>,
}

/// Why a side says GOODBYE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Normal = 0,
    UnsupportedVersion = 1,
    BadFrame = 2,
    Shutdown = 3,
    TooManyClients = 4,
}

impl Reason {
    fn from_u8(v: u8) -> Option<Reason> {
        Some(match v {
            0 => Reason::Normal,
            1 => Reason::UnsupportedVersion,
            2 => Reason::BadFrame,
            3 => Reason::Shutdown,
            4 => Reason::TooManyClients,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Packet(Bytes),
    /// A packet of a striped link with its place in its flow's sequence.
    Seq {
        /// The sender's flow bucket: packets are numbered per bucket.
        flow: u16,
        seq: u32,
        packet: Bytes,
    },
    Ping(u64),
    Pong(u64),
    /// Cumulative bytes of PACKET frames (headers included) read so far.
    Ack(u64),
    Goodbye {
        reason: Reason,
        message: String,
    },
    /// The agent's status, a JSON object (UTF-8), answer to [`caps::QUERY`].
    Status(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    #[error("frame type {kind:#04x} with a {len}-byte body (expected {expected})")]
    BadLength { kind: u8, len: usize, expected: &'static str },
    #[error("the peer does not speak this protocol (magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("bad HELLO: {0}")]
    BadHello(&'static str),
    #[error("unknown GOODBYE reason {0}")]
    BadReason(u8),
    #[error("empty PACKET frame")]
    EmptyPacket,
}

const HELLO_FIXED: usize = 4 + 1 + 1 + 2 + 4 + 2 + 16;

fn put_header(out: &mut BytesMut, kind: u8, len: usize) {
    debug_assert!(len <= MAX_BODY);
    out.put_u8(kind);
    out.put_u16(len as u16);
}

/// Append the encoding of `frame` to `out`. Packets larger than [`MAX_BODY`] and
/// HELLO strings longer than 255 bytes are the caller's bug; they are truncated
/// rather than corrupting the stream.
pub fn encode(frame: &Frame, out: &mut BytesMut) {
    match frame {
        Frame::Packet(p) => encode_packet(p, out),
        Frame::Seq { flow, seq, packet } => encode_seq_packet(*flow, *seq, packet, out),
        Frame::Ping(t) => {
            put_header(out, T_PING, 8);
            out.put_u64(*t);
        }
        Frame::Pong(t) => {
            put_header(out, T_PONG, 8);
            out.put_u64(*t);
        }
        Frame::Ack(n) => {
            put_header(out, T_ACK, 8);
            out.put_u64(*n);
        }
        Frame::Status(json) => {
            let j = &json.as_bytes()[..json.len().min(MAX_BODY)];
            put_header(out, T_STATUS, j.len());
            out.put_slice(j);
        }
        Frame::Goodbye { reason, message } => {
            let msg = &message.as_bytes()[..message.len().min(MAX_BODY - 1)];
            put_header(out, T_GOODBYE, 1 + msg.len());
            out.put_u8(*reason as u8);
            out.put_slice(msg);
        }
        Frame::Hello(h) => {
            let mut body = BytesMut::with_capacity(64);
            body.put_slice(&MAGIC);
            body.put_u8(h.version);
            body.put_u8(h.role as u8);
            body.put_u16(0);
            body.put_u32(h.caps);
            body.put_u16(h.mtu);
            body.put_slice(&h.client_id);
            if !h.software.is_empty() {
                let s = &h.software.as_bytes()[..h.software.len().min(255)];
                body.put_u8(tlv::SOFTWARE);
                body.put_u8(s.len() as u8);
                body.put_slice(s);
            }
            for d in &h.dns_domains {
                let d = &d.as_bytes()[..d.len().min(255)];
                body.put_u8(tlv::DNS_DOMAIN);
                body.put_u8(d.len() as u8);
                body.put_slice(d);
            }
            if let Some((vpc, region)) = &h.vpc {
                let v = format!("{vpc} {region}");
                let v = &v.as_bytes()[..v.len().min(255)];
                body.put_u8(tlv::VPC);
                body.put_u8(v.len() as u8);
                body.put_slice(v);
            }
            let addrs =
                h.resolvers.iter().map(|a| (tlv::RESOLVER, a)).chain(h.dns.iter().map(|a| (tlv::DNS_ADDRESS, a)));
            for (t, r) in addrs {
                body.put_u8(t);
                match r {
                    std::net::IpAddr::V4(a) => {
                        body.put_u8(4);
                        body.put_slice(&a.octets());
                    }
                    std::net::IpAddr::V6(a) => {
                        body.put_u8(16);
                        body.put_slice(&a.octets());
                    }
                }
            }
            put_header(out, T_HELLO, body.len());
            out.put_slice(&body);
        }
    }
}

/// Append one PACKET frame (the hot path: no intermediate allocation).
pub fn encode_packet(packet: &[u8], out: &mut BytesMut) {
    let p = &packet[..packet.len().min(MAX_BODY)];
    out.reserve(HEADER_LEN + p.len());
    put_header(out, T_PACKET, p.len());
    out.put_slice(p);
}

/// Append one SEQ frame: `packet` as number `seq` of flow bucket `flow` of a
/// striped link.
pub fn encode_seq_packet(flow: u16, seq: u32, packet: &[u8], out: &mut BytesMut) {
    let p = &packet[..packet.len().min(MAX_BODY - SEQ_LEN)];
    out.reserve(HEADER_LEN + SEQ_LEN + p.len());
    put_header(out, T_SEQ, SEQ_LEN + p.len());
    out.put_u16(flow);
    out.put_u32(seq);
    out.put_slice(p);
}

fn decode_hello(mut b: &[u8]) -> Result<Hello, WireError> {
    if b.len() < HELLO_FIXED {
        return Err(WireError::BadLength { kind: T_HELLO, len: b.len(), expected: "at least 30" });
    }
    let magic = [b[0], b[1], b[2], b[3]];
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    b.advance(4);
    let version = b.get_u8();
    let role = match b.get_u8() {
        1 => Role::Client,
        2 => Role::Agent,
        _ => return Err(WireError::BadHello("unknown role")),
    };
    let _reserved = b.get_u16();
    let caps = b.get_u32();
    let mtu = b.get_u16();
    let mut client_id = [0u8; 16];
    b.copy_to_slice(&mut client_id);
    let mut hello = Hello {
        version,
        role,
        caps,
        mtu,
        client_id,
        software: String::new(),
        resolvers: Vec::new(),
        dns: Vec::new(),
        vpc: None,
        dns_domains: Vec::new(),
    };
    while !b.is_empty() {
        if b.len() < 2 {
            return Err(WireError::BadHello("truncated option"));
        }
        let (t, l) = (b[0], b[1] as usize);
        b.advance(2);
        if b.len() < l {
            return Err(WireError::BadHello("truncated option"));
        }
        let v = &b[..l];
        match t {
            tlv::SOFTWARE => hello.software = String::from_utf8_lossy(v).into_owned(),
            tlv::DNS_DOMAIN => hello.dns_domains.push(String::from_utf8_lossy(v).into_owned()),
            tlv::VPC => {
                let text = String::from_utf8_lossy(v);
                match text.split_once(' ') {
                    Some((vpc, region)) if !vpc.is_empty() && !region.is_empty() => {
                        hello.vpc = Some((vpc.to_owned(), region.to_owned()));
                    }
                    _ => return Err(WireError::BadHello("VPC option is not \"VPC REGION\"")),
                }
            }
            tlv::RESOLVER | tlv::DNS_ADDRESS => {
                let addr: std::net::IpAddr = match l {
                    4 => std::net::Ipv4Addr::new(v[0], v[1], v[2], v[3]).into(),
                    16 => {
                        let mut o = [0u8; 16];
                        o.copy_from_slice(v);
                        std::net::Ipv6Addr::from(o).into()
                    }
                    _ => return Err(WireError::BadHello("address option of odd length")),
                };
                if t == tlv::RESOLVER {
                    hello.resolvers.push(addr);
                } else {
                    hello.dns.push(addr);
                }
            }
            // Unknown options are skipped: later versions may add some.
            _ => {}
        }
        b.advance(l);
    }
    Ok(hello)
}

/// Incremental decoder: feed it whatever the stream delivered, take frames out.
#[derive(Debug, Default)]
pub struct Deframer {
    buf: BytesMut,
}

impl Deframer {
    pub fn new() -> Self {
        Deframer { buf: BytesMut::with_capacity(16 * 1024) }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, `None` if more bytes are needed. An error means the
    /// stream is not ours or is corrupt; it cannot be resynchronised.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let kind = self.buf[0];
        let len = u16::from_be_bytes([self.buf[1], self.buf[2]]) as usize;
        // Check what can be checked before the body arrives.
        match kind {
            T_HELLO | T_PACKET | T_GOODBYE | T_STATUS => {}
            T_SEQ if len > SEQ_LEN => {}
            T_SEQ => return Err(WireError::BadLength { kind, len, expected: "at least 7" }),
            T_PING | T_PONG | T_ACK if len == 8 => {}
            T_PING | T_PONG | T_ACK => return Err(WireError::BadLength { kind, len, expected: "8" }),
            other => return Err(WireError::UnknownType(other)),
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        self.buf.advance(HEADER_LEN);
        let body = self.buf.split_to(len).freeze();
        Ok(Some(match kind {
            T_PACKET if body.is_empty() => return Err(WireError::EmptyPacket),
            T_PACKET => Frame::Packet(body),
            T_SEQ => {
                let mut body = body;
                let flow = body.get_u16();
                let seq = body.get_u32();
                Frame::Seq { flow, seq, packet: body }
            }
            T_PING => Frame::Ping(u64::from_be_bytes(body[..8].try_into().unwrap_or([0; 8]))),
            T_PONG => Frame::Pong(u64::from_be_bytes(body[..8].try_into().unwrap_or([0; 8]))),
            T_ACK => Frame::Ack(u64::from_be_bytes(body[..8].try_into().unwrap_or([0; 8]))),
            T_HELLO => Frame::Hello(decode_hello(&body)?),
            T_STATUS => Frame::Status(String::from_utf8_lossy(&body).into_owned()),
            _ => {
                let Some((&r, msg)) = body.split_first() else {
                    return Err(WireError::BadLength { kind, len, expected: "at least 1" });
                };
                let reason = Reason::from_u8(r).ok_or(WireError::BadReason(r))?;
                Frame::Goodbye { reason, message: String::from_utf8_lossy(msg).into_owned() }
            }
        }))
    }
}

#[cfg(test)]
mod tests;
