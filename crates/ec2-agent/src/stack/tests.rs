//! smoltcp's TCP under the link's back-pressure, against a hand-made receiver
//! that plays the client's kernel.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use forwarder::fq::FqConfig;
use forwarder::link::{write_loop, Lane, LinkStats, TxQueue};
use forwarder::wire::{Deframer, Frame};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};

use super::{flow_key, Stack};

const TOTAL: usize = 1 << 20;
const ISS: u32 = 1000;
/// Segments past the hole the client answers: the sender sees this many
/// duplicate ACKs and no more.
const ANSWERED_PAST_HOLE: u32 = 3;

fn byte_at(i: usize) -> u8 {
    (i % 251) as u8
}

/// An IPv4 TCP packet.
fn packet(src: SocketAddr, dst: SocketAddr, tcp: &TcpRepr) -> Bytes {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else { panic!("IPv4 only") };
    let caps = ChecksumCapabilities::default();
    let ip = Ipv4Repr {
        src_addr: *s.ip(),
        dst_addr: *d.ip(),
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; ip.buffer_len() + tcp.buffer_len()];
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..]), &caps);
    let (src_ip, dst_ip) = (IpAddress::Ipv4(*s.ip()), IpAddress::Ipv4(*d.ip()));
    tcp.emit(&mut TcpPacket::new_unchecked(&mut buf[ip.buffer_len()..]), &src_ip, &dst_ip, &caps);
    Bytes::from(buf)
}

/// A segment from `from` to `to`, no options.
fn repr(from: SocketAddr, to: SocketAddr, control: TcpControl, seq: u32, ack: Option<u32>) -> TcpRepr<'static> {
    TcpRepr {
        src_port: from.port(),
        dst_port: to.port(),
        control,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: u16::MAX,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    }
}

/// The client's side of one connection: acknowledges every segment at once,
/// keeps out-of-order data, checks every byte, and drops one chosen segment.
/// Past the hole it answers at most [`ANSWERED_PAST_HOLE`] segments.
struct Receiver {
    me: SocketAddr,
    peer: SocketAddr,
    /// The server's initial sequence number, once its SYN-ACK came.
    irs: Option<u32>,
    rcv_nxt: u32,
    ooo: BTreeMap<u32, Vec<u8>>,
    delivered: usize,
    /// The stream offset of the segment to lose, and whether it was lost.
    lose_at: usize,
    lost: bool,
    /// Segments that arrived past the hole.
    past_hole: u32,
}

impl Receiver {
    fn ack(&self) -> Bytes {
        packet(self.me, self.peer, &repr(self.me, self.peer, TcpControl::None, ISS + 1, Some(self.rcv_nxt)))
    }

    /// Take one packet from the agent; returns the client's answer, if any.
    fn on_packet(&mut self, p: &[u8]) -> Option<Bytes> {
        let caps = ChecksumCapabilities::default();
        let ip = Ipv4Packet::new_checked(p).expect("IPv4 from the agent");
        let ip_repr = Ipv4Repr::parse(&ip, &caps).expect("valid IPv4");
        let tcp = TcpPacket::new_checked(ip.payload()).expect("TCP from the agent");
        let (src, dst) = (IpAddress::Ipv4(ip_repr.src_addr), IpAddress::Ipv4(ip_repr.dst_addr));
        let seg = TcpRepr::parse(&tcp, &src, &dst, &caps).expect("valid TCP");
        assert_ne!(seg.control, TcpControl::Rst, "the agent reset the flow");
        let Some(irs) = self.irs else {
            assert_eq!(seg.control, TcpControl::Syn, "expected the SYN-ACK");
            self.irs = Some(seg.seq_number.0 as u32);
            self.rcv_nxt = (seg.seq_number.0 as u32).wrapping_add(1);
            return Some(self.ack());
        };
        if seg.payload.is_empty() {
            return None;
        }
        let seq = seg.seq_number.0 as u32;
        let offset = seq.wrapping_sub(irs).wrapping_sub(1) as usize;
        if !self.lost && offset >= self.lose_at {
            self.lost = true;
            return None;
        }
        for (i, b) in seg.payload.iter().enumerate() {
            assert_eq!(*b, byte_at(offset + i), "byte {} of the stream", offset + i);
        }
        let ahead = seq.wrapping_sub(self.rcv_nxt) as i32;
        if ahead > 0 {
            self.ooo.insert(seq, seg.payload.to_vec());
            self.past_hole += 1;
            if self.past_hole > ANSWERED_PAST_HOLE {
                return None;
            }
        } else if ahead + seg.payload.len() as i32 > 0 {
            // In order (or overlapping what came already): take the new part,
            // then whatever waited behind the hole.
            let fresh = (ahead + seg.payload.len() as i32) as u32;
            self.rcv_nxt = self.rcv_nxt.wrapping_add(fresh);
            self.delivered += fresh as usize;
            while let Some((&s, data)) = self.ooo.first_key_value() {
                let ahead = s.wrapping_sub(self.rcv_nxt) as i32;
                if ahead > 0 {
                    break;
                }
                let fresh = (ahead + data.len() as i32).max(0) as u32;
                self.rcv_nxt = self.rcv_nxt.wrapping_add(fresh);
                self.delivered += fresh as usize;
                self.ooo.remove(&s);
            }
        }
        Some(self.ack())
    }
}

/// Carry `TOTAL` bytes from a local server through a [`Stack`] to a
/// [`Receiver`] that loses one segment, with the client's ACKs reaching the
/// agent while its link queue is at its limit (as when a bulk download fills
/// it). smoltcp 0.14 forgets a fast retransmission the device refuses and sets
/// no timer to try again, so the agent's device never refuses (`Stack::poll`
/// holds the egress back instead).
///
/// Few duplicate ACKs (three here; smoltcp counted seven in the lab's trace of
/// a stalled download, most of the client's ACKs after the hole also moved its
/// window): with the fast retransmission lost and smoltcp's congestion window
/// below the bytes in flight, the flow used to send nothing more, ever.
#[tokio::test(flavor = "current_thread")]
async fn a_flow_with_a_lost_segment_and_three_duplicate_acks_finishes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("listen");
    let server_addr = listener.local_addr().expect("address");
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let data: Vec<u8> = (0..TOTAL).map(byte_at).collect();
        s.write_all(&data).await.expect("write");
        // Stay open: the test ends on the byte count.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    });
    let remote = TcpStream::connect(server_addr).await.expect("connect");

    let queue = TxQueue::new(FqConfig::default());
    queue.set_limit(4 * 1400);
    let mut stack = Stack::new(queue.clone(), 1400, Arc::new(Notify::new()));
    let (link_w, mut link_r) = tokio::io::duplex(4096);
    let (_control, control_rx) = mpsc::channel(1);
    let lane = Lane::new(0, 0);
    let writer = tokio::spawn(write_loop(
        queue.clone(),
        lane.clone(),
        control_rx,
        forwarder::link::Stream::new(link_w),
        1024,
        Arc::new(LinkStats::default()),
    ));

    // The client as the agent sees it: its address and the VPC destination it dials.
    let me = SocketAddr::from((Ipv4Addr::new(100, 64, 0, 1), 40000));
    let peer = SocketAddr::from((Ipv4Addr::new(10, 1, 2, 3), 5432));
    let mut rx = Receiver {
        me,
        peer,
        irs: None,
        rcv_nxt: 0,
        ooo: BTreeMap::new(),
        delivered: 0,
        lose_at: 256 << 10,
        lost: false,
        past_hole: 0,
    };
    let mut syn = repr(me, peer, TcpControl::Syn, ISS, None);
    syn.max_seg_size = Some(1360);
    // A window of 8 MiB, as a kernel's grows: the sender's congestion window
    // and the link's queue, not the receiver, limit it.
    syn.window_scale = Some(7);
    let key = flow_key(me.ip(), me.port(), peer.ip(), peer.port());
    stack.accept(key, remote, packet(me, peer, &syn), None);

    let mut deframer = Deframer::new();
    let mut acks: Vec<Bytes> = Vec::new();
    // Packets on their way to the client: a path this many packets long keeps
    // the sender's flight well above the three segments fast recovery adds.
    let mut transit = std::collections::VecDeque::new();
    const PATH: usize = 48;
    let mut buf = vec![0u8; 8192];
    // Bounds the test, not a speed target: a wedged flow never finishes.
    let deadline = Instant::now() + Duration::from_secs(20);
    while rx.delivered < TOTAL {
        assert!(
            Instant::now() < deadline,
            "the flow stalled at {} of {TOTAL} bytes (segment at {} lost: {}, {} segments past it)",
            rx.delivered,
            rx.lose_at,
            rx.lost,
            rx.past_hole
        );
        // The client's ACKs reach the agent while its link queue is full.
        for a in acks.drain(..) {
            stack.deliver(a);
        }
        stack.poll();
        // The link takes what the writer has written (a few packets)...
        let idle = match tokio::time::timeout(Duration::from_millis(5), link_r.read(&mut buf)).await {
            Ok(Ok(n)) => {
                assert!(n > 0, "the link's writer ended");
                deframer.push(&buf[..n]);
                false
            }
            _ => true,
        };
        while let Some(frame) = deframer.next_frame().expect("well-formed frames") {
            if let Frame::Packet(p) = frame {
                transit.push_back(p);
            }
        }
        while transit.len() > PATH || idle && !transit.is_empty() {
            let p = transit.pop_front().expect("a packet");
            acks.extend(rx.on_packet(&p));
        }
        // ...and the stack fills the room that made.
        tokio::task::yield_now().await;
        stack.poll();
    }
    assert!(rx.lost && rx.past_hole >= ANSWERED_PAST_HOLE, "the loss must have set off a fast retransmission");
    lane.close();
    server.abort();
    let _ = writer.await;
}

/// A client whose kernel resets the connection before the handshake ends (the
/// SYN-ACK came after the application gave up) leaves nothing behind: smoltcp
/// puts such a socket back to listening on the destination's address, where
/// it held the destination's connection open and took the next client's SYN
/// to that address.
#[tokio::test(flavor = "current_thread")]
async fn a_flow_reset_in_its_handshake_is_forgotten_and_its_connection_closed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("listen");
    let server_addr = listener.local_addr().expect("address");
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.map(|_| rest.len())
    });
    let remote = TcpStream::connect(server_addr).await.expect("connect");
    let queue = TxQueue::new(FqConfig::default());
    let mut stack = Stack::new(queue.clone(), 1400, Arc::new(Notify::new()));

    let me = SocketAddr::from((Ipv4Addr::new(100, 64, 0, 1), 40001));
    let peer = SocketAddr::from((Ipv4Addr::new(10, 1, 2, 3), 80));
    let syn = repr(me, peer, TcpControl::Syn, ISS, None);
    let key = flow_key(me.ip(), me.port(), peer.ip(), peer.port());
    stack.accept(key, remote, packet(me, peer, &syn), None);
    assert!(stack.has_flow(&key), "the flow is open after its SYN");
    assert_eq!(queue.stats().enqueued, 1, "the SYN-ACK is on its way");

    // What a kernel sends for a SYN-ACK to a connection it no longer has.
    let rst = repr(me, peer, TcpControl::Rst, ISS + 1, None);
    stack.deliver(packet(me, peer, &rst));
    stack.poll();
    assert!(!stack.has_flow(&key), "a flow reset in its handshake is kept");
    assert_eq!(stack.flow_count(), 0);
    // Bounds the test: the destination's connection is closed, not held.
    let read = tokio::time::timeout(Duration::from_secs(5), server).await;
    assert!(matches!(read, Ok(Ok(_))), "the destination's connection stayed open: {read:?}");
}
