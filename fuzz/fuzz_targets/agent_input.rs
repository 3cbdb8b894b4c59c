//! The ec2-agent's whole input path, as any local process on the instance can
//! reach it: bytes read from a client connection in arbitrary pieces, through
//! the HELLO and its checks, the link's frame loop (PACKET, SEQ through the
//! resequencer, ACK, PING, GOODBYE), packet parsing, the flow table (policy,
//! limits, expiry), the replies the agent builds and the userspace TCP stack.
//!
//! The first byte picks how the rest is read: as raw bytes; after a valid
//! HELLO (its MTU, capabilities and resolvers taken from the data, giant MTU
//! claims included); or after a HELLO with the rest cut into PACKET and SEQ
//! frames, so malformed IPv4/IPv6, fragments and bad lengths reach the
//! parser at once. Never a panic; every reply the agent builds parses as a
//! packet and fits the negotiated MTU; the flow table keeps its limits; what
//! waits for the client stays within the queue's bound.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use ec2_agent::flows::{Action, FlowTable, Limits, Refusal};
use ec2_agent::packet::{self, Unreachable, L4};
use ec2_agent::policy::Policy;
use ec2_agent::stack::{flow_key, Stack};
use forwarder::fq::FqConfig;
use forwarder::link::{read_hello, read_loop, Lane, LinkStats, TxQueue};
use forwarder::stripe::Resequencer;
use forwarder::wire::{self, caps, Hello, Role};
use libfuzzer_sys::fuzz_target;
use tokio::sync::{mpsc, Notify};

const MAX_UDP_FLOWS: usize = 16;
const MAX_TCP_FLOWS: usize = 16;
/// The agent's own MTU (its `--mtu` default).
const AGENT_MTU: u16 = 1500;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"))
}

/// A HELLO a client could send, its numbers from `seed`.
fn hello(seed: &[u8]) -> Vec<u8> {
    let b = |i: usize| seed.get(i).copied().unwrap_or(0);
    let h = Hello {
        version: wire::VERSION,
        role: Role::Client,
        caps: u32::from(b(0)) & (caps::PING | caps::IPV6 | caps::ACK | caps::STRIPE),
        mtu: u16::from_be_bytes([b(1), b(2)]),
        client_id: [b(3); 16],
        software: "fuzz".into(),
        resolvers: Vec::new(),
        dns: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, b(4)))],
        vpc: None,
        dns_domains: if b(5) & 1 == 1 { vec!["corp.internal".into()] } else { Vec::new() },
    };
    let mut out = BytesMut::new();
    wire::encode(&wire::Frame::Hello(h), &mut out);
    out.to_vec()
}

/// `data` cut into PACKET and SEQ frames: each record's first byte gives its
/// kind and (with the next) its length.
fn frames(mut data: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    let mut seq = 0u32;
    while let [kind, len, rest @ ..] = data {
        let len = (usize::from(*len) * 8).min(rest.len());
        let (packet, tail) = rest.split_at(len);
        if kind & 1 == 0 {
            wire::encode_packet(packet, &mut out);
        } else {
            // Numbers that go back, skip ahead and repeat.
            seq = seq.wrapping_add(u32::from(kind >> 5)).wrapping_sub(1);
            wire::encode_seq_packet(u16::from(kind >> 1 & 3), seq, packet, &mut out);
        }
        data = tail;
    }
    out.to_vec()
}

/// A reply the agent builds must be a packet the client can parse, within the MTU.
fn check_reply(reply: Option<Vec<u8>>, mtu: u16) {
    if let Some(r) = reply {
        assert!(packet::parse(&r).is_some(), "the agent built an unparsable reply: {r:02x?}");
        assert!(r.len() <= usize::from(mtu), "a {}-byte reply over a {mtu}-byte MTU", r.len());
    }
}

/// What the session does with each packet, without sockets: a dial is taken
/// to fail (the client gets its ICMP), a UDP or ping flow is opened in the
/// table only; an echo is answered as the ping socket's reply would be.
fn serve(packets: Vec<Bytes>, mtu: u16, dns: Vec<IpAddr>) {
    let queue = TxQueue::new(FqConfig::default());
    let mut stack = Stack::new(queue.clone(), usize::from(mtu), Arc::new(Notify::new()));
    let limits = Limits {
        policy: Policy::new(&[], &[], false),
        resolvers: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))],
        max_tcp_flows: MAX_TCP_FLOWS,
        max_udp_flows: MAX_UDP_FLOWS,
        idle_ms: 30_000,
    };
    let mut flows = FlowTable::new(limits, dns);
    let mut now_ms = 0u64;
    for raw in packets {
        now_ms += 1_000;
        let Some(p) = packet::parse(&raw) else { continue };
        let tcp_known = match p.l4 {
            L4::Tcp { sport, dport, .. } => stack.has_flow(&flow_key(p.src, sport, p.dst, dport)),
            _ => false,
        };
        match flows.classify(&p, tcp_known, stack.flow_count(), || now_ms) {
            Action::ToStack => stack.deliver(raw.clone()),
            Action::Dial { key, .. } => {
                flows.dialled(&key);
                check_reply(Refusal::Unreachable(Unreachable::Host).reply(&raw, &p), mtu);
            }
            Action::Refuse(how) => check_reply(how.reply(&raw, &p), mtu),
            Action::Udp { key, open: Some(_) } => drop(flows.udp_opened(key, now_ms)),
            Action::Echo { key, open } => {
                if open {
                    drop(flows.echo_opened(key, now_ms));
                }
                if let L4::EchoRequest { id, seq, payload } = p.l4 {
                    check_reply(packet::echo_reply(p.dst, p.src, id, seq, payload), mtu);
                }
            }
            Action::Udp { open: None, .. } | Action::Ignore | Action::Drop => {}
        }
        let _ = stack.poll();
        let _ = flows.expire(now_ms);
        assert!(flows.udp_flows() <= MAX_UDP_FLOWS, "{} UDP flows", flows.udp_flows());
    }
    assert!(queue.queued_bytes() <= FqConfig::default().limit_bytes, "{} bytes queued", queue.queued_bytes());
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let stream = match mode % 3 {
        0 => rest.to_vec(),
        1 => [hello(rest), rest.get(6..).unwrap_or_default().to_vec()].concat(),
        _ => [hello(rest), frames(rest.get(6..).unwrap_or_default())].concat(),
    };
    // Read in pieces of 1 to 64 bytes.
    let piece = usize::from(mode >> 2) + 1;
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(stream.len() / piece + 1);
    for c in stream.chunks(piece) {
        let _ = tx.try_send(c.to_vec());
    }
    drop(tx);
    runtime().block_on(async move {
        // As `session::serve`: a HELLO first, from a client of this version.
        let Ok((h, deframer)) = read_hello(&mut rx).await else { return };
        if h.role != Role::Client || h.version != wire::VERSION {
            return;
        }
        let mtu = wire::negotiate_mtu(AGENT_MTU, h.mtu);
        assert!((wire::MIN_MTU..=AGENT_MTU).contains(&mtu), "MTU {mtu} from a claim of {}", h.mtu);
        let lane = Lane::new(ec2_agent::session::AGENT_CAPS, h.caps);
        let (control, _pongs) = mpsc::channel(64);
        let reseq = Resequencer::default();
        let mut packets = Vec::new();
        let mut sink = |p: Bytes| packets.push(p);
        let _end = read_loop(
            rx,
            deframer,
            |seq, p| reseq.deliver(seq, p, &mut sink),
            control,
            lane,
            Arc::new(LinkStats::default()),
            Instant::now(),
        )
        .await;
        reseq.flush(&mut |p| packets.push(p));
        serve(packets, mtu, h.dns.clone());
    });
});
