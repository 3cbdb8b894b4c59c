//! Who may take the agent's connection slots. Anyone on the instance can
//! connect to the agent's loopback port, but only the SSM agent, which runs as
//! root, carries sessions for ssm-proxy. So the limits bind everyone else:
//! at most [`MAX_PENDING`] connections waiting for their HELLO (each for at
//! most [`HELLO_TIMEOUT`]) and `--max-clients` sessions. A root peer is
//! never refused for slots the others hold, so a local user's slow-loris or
//! HELLO flood cannot lock the tunnel out.
//!
//! The peer's user is the owner of the socket whose local address is the
//! peer's and whose remote address is ours, asked of the kernel (see
//! [`peer_uid`]). Not found (another OS, a race): treated as not root.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long a new connection has to send its HELLO.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections from users other than root waiting for their HELLO, at most.
pub const MAX_PENDING: usize = 64;

/// A slot in a counter, given back when dropped.
#[derive(Debug)]
pub struct Slot(Option<Arc<AtomicUsize>>);

impl Slot {
    /// A slot under `max`, or `None` when all are taken.
    pub fn take(counter: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        if counter.fetch_add(1, Ordering::Relaxed) >= max {
            counter.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Slot(Some(counter.clone())))
    }

    /// A slot outside the limit (for root), still counted while it lives.
    pub fn exempt(counter: &Arc<AtomicUsize>) -> Slot {
        counter.fetch_add(1, Ordering::Relaxed);
        Slot(Some(counter.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The uid owning the peer's end of the loopback connection `peer` -> `local`.
///
/// One exact lookup through the kernel's socket diagnostics (netlink
/// `SOCK_DIAG_BY_FAMILY`, what `ss` uses), a hash lookup that costs
/// microseconds. Reading `/proc/net/tcp` instead walks every socket, some
/// 15 ms with 3,000 in TIME_WAIT: during a connect flood that blocked the
/// agent's one thread for seconds and delayed every HELLO timeout.
#[cfg(target_os = "linux")]
pub fn peer_uid(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::io::Read;
    const AF_NETLINK: i32 = 16;
    const NETLINK_SOCK_DIAG: i32 = 4;
    let sock = Socket::new(Domain::from(AF_NETLINK), Type::DGRAM, Some(Protocol::from(NETLINK_SOCK_DIAG))).ok()?;
    sock.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
    // Unaddressed, a netlink message goes to the kernel.
    sock.send(&diag_request(peer, local)).ok()?;
    let mut reply = [0u8; 512];
    let n = (&sock).read(&mut reply).ok()?;
    diag_uid(&reply[..n])
}

/// Not Linux: no way to ask; every peer is bound by the limits.
#[cfg(not(target_os = "linux"))]
pub fn peer_uid(_peer: SocketAddr, _local: SocketAddr) -> Option<u32> {
    None
}

#[cfg(target_os = "linux")]
/// `SOCK_DIAG_BY_FAMILY`: the netlink message type of an inet_diag request.
const SOCK_DIAG_BY_FAMILY: u16 = 20;

#[cfg(target_os = "linux")]
/// A netlink `inet_diag_req_v2` for the one TCP socket whose local end is
/// `peer` and remote end `local` (in any state). Layout (linux/inet_diag.h):
/// nlmsghdr (len, type, flags, seq, pid), then family, protocol, ext, pad,
/// states, and the socket id: sport, dport (big-endian), src, dst (16 bytes
/// each, an IPv4 address in the first 4), interface, cookie (none: all ones).
fn diag_request(peer: SocketAddr, local: SocketAddr) -> Vec<u8> {
    const NLM_F_REQUEST: u16 = 1;
    const IPPROTO_TCP: u8 = 6;
    let family: u8 = if peer.is_ipv4() { 2 } else { 10 };
    let mut m = Vec::with_capacity(72);
    m.extend_from_slice(&72u32.to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&[0; 8]); // seq, pid
    m.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    m.extend_from_slice(&peer.port().to_be_bytes());
    m.extend_from_slice(&local.port().to_be_bytes());
    for a in [peer.ip(), local.ip()] {
        let mut addr = [0u8; 16];
        match a {
            std::net::IpAddr::V4(v4) => addr[..4].copy_from_slice(&v4.octets()),
            std::net::IpAddr::V6(v6) => addr = v6.octets(),
        }
        m.extend_from_slice(&addr);
    }
    m.extend_from_slice(&0u32.to_ne_bytes()); // any interface
    m.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    m
}

#[cfg(target_os = "linux")]
/// The uid in the kernel's answer: an `inet_diag_msg` after the 16-byte
/// nlmsghdr (family, state, timer, retrans, the 48-byte id, expires, rqueue,
/// wqueue, uid), or `None` for an error (no such socket) or a short reply.
fn diag_uid(reply: &[u8]) -> Option<u32> {
    const UID_AT: usize = 16 + 4 + 48 + 12;
    let kind = u16::from_ne_bytes(reply.get(4..6)?.try_into().ok()?);
    if kind != SOCK_DIAG_BY_FAMILY {
        return None; // NLMSG_ERROR: no such socket
    }
    Some(u32::from_ne_bytes(reply.get(UID_AT..UID_AT + 4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn an_error_or_a_short_reply_names_no_one() {
        const NLMSG_ERROR: u16 = 2; // the kernel's answer when no socket matches
        let mut error = vec![0u8; 36];
        error[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert_eq!(diag_uid(&error), None);
        let mut short = vec![0u8; 40];
        short[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        assert_eq!(diag_uid(&short), None);
        assert_eq!(diag_uid(&[]), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_request_names_the_peers_socket() {
        let m = diag_request("127.0.0.1:36646".parse().expect("addr"), "127.0.0.1:7301".parse().expect("addr"));
        assert_eq!(m.len(), 72);
        assert_eq!(&m[16..18], &[2, 6], "AF_INET, TCP");
        assert_eq!(&m[24..28], &[0x8f, 0x26, 0x1c, 0x85], "ports, big-endian");
        assert_eq!(&m[28..32], &[127, 0, 0, 1], "src: the peer");
        assert_eq!(&m[44..48], &[127, 0, 0, 1], "dst: us");
    }

    #[test]
    fn slots_are_bounded_and_given_back() {
        let c = Arc::new(AtomicUsize::new(0));
        let a = Slot::take(&c, 2).expect("first");
        let b = Slot::take(&c, 2).expect("second");
        assert!(Slot::take(&c, 2).is_none());
        let root = Slot::exempt(&c);
        assert_eq!(c.load(Ordering::Relaxed), 3);
        drop((a, b, root));
        assert_eq!(c.load(Ordering::Relaxed), 0);
        assert!(Slot::take(&c, 2).is_some());
    }

    /// A real loopback connection, v4 and v6: its peer is this process's
    /// user; a connection that does not exist has none.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_real_connection_is_found_by_the_kernel() {
        // The effective uid, from /proc/self/status.
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let uid: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|u| u.parse().ok())
            .expect("uid");
        for at in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(l) = std::net::TcpListener::bind(at) else { continue }; // no IPv6 here
            let c = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
            let (_s, peer) = l.accept().expect("accept");
            assert_eq!(peer, c.local_addr().expect("addr"));
            let local = l.local_addr().expect("addr");
            assert_eq!(peer_uid(peer, local), Some(uid), "{at}");
            let nobody = SocketAddr::new(peer.ip(), peer.port().wrapping_add(1));
            assert_eq!(peer_uid(nobody, local), None, "{at}: no such connection");
        }
    }
}
