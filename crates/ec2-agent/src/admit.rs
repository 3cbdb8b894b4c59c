//! Who may take the agent's connection slots. Anyone on the instance can
//! connect to the agent's loopback port, but only the SSM agent, which runs as
//! root, carries sessions for ssm-proxy. So the limits bind everyone else:
//! at most [`MAX_PENDING`] connections waiting for their HELLO (each for at
//! most [`HELLO_TIMEOUT`]) and `--max-clients` sessions. A root peer is
//! never refused for slots the others hold, so a local user's slow-loris or
//! HELLO flood cannot lock the tunnel out.
//!
//! The peer's user is read from `/proc/net/tcp` (and `tcp6`): the socket whose
//! local address is the peer's address and whose remote address is ours
//! belongs to the peer. Not found (another OS, a race): treated as not root.

use std::net::{IpAddr, SocketAddr};
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
pub fn peer_uid(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let file = if peer.is_ipv4() { "/proc/net/tcp" } else { "/proc/net/tcp6" };
    let table = std::fs::read_to_string(file).ok()?;
    uid_in(&table, peer, local)
}

/// [`peer_uid`] over a `/proc/net/tcp` table's text.
fn uid_in(table: &str, peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let (want_local, want_remote) = (proc_addr(peer), proc_addr(local));
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid ...
        (f.len() > 7 && f[1].eq_ignore_ascii_case(&want_local) && f[2].eq_ignore_ascii_case(&want_remote))
            .then(|| f[7].parse().ok())
            .flatten()
    })
}

/// An address as the kernel prints it there: each 32-bit word of the address
/// in host (little-endian) byte order, in hex, then ":" and the port.
fn proc_addr(a: SocketAddr) -> String {
    let words: Vec<[u8; 4]> = match a.ip() {
        IpAddr::V4(v4) => vec![v4.octets()],
        IpAddr::V6(v6) => v6.octets().chunks(4).map(|c| [c[0], c[1], c[2], c[3]]).collect(),
    };
    let hex: String = words.iter().map(|w| format!("{:02X}{:02X}{:02X}{:02X}", w[3], w[2], w[1], w[0])).collect();
    format!("{hex}:{:04X}", a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1C85 00000000:0000 0A 00000000:00000000 00:00000000 00000000 65534        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1C85 0100007F:8F26 01 00000000:00000000 00:00000000 00000000 65534        0 2 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:8F26 0100007F:1C85 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:8F30 0100007F:1C85 01 00000000:00000000 00:00000000 00000000  1000        0 4 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn the_peers_socket_names_its_user() {
        let agent: SocketAddr = "127.0.0.1:7301".parse().expect("addr");
        assert_eq!(uid_in(TABLE, "127.0.0.1:36646".parse().expect("addr"), agent), Some(0), "the SSM agent");
        assert_eq!(uid_in(TABLE, "127.0.0.1:36656".parse().expect("addr"), agent), Some(1000), "a local user");
        assert_eq!(uid_in(TABLE, "127.0.0.1:40000".parse().expect("addr"), agent), None);
    }

    #[test]
    fn addresses_are_printed_word_by_word_in_host_order() {
        assert_eq!(proc_addr("127.0.0.1:7301".parse().expect("addr")), "0100007F:1C85");
        assert_eq!(proc_addr("[::1]:7301".parse().expect("addr")), "00000000000000000000000001000000:1C85");
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

    /// A real loopback connection: its peer is this process's user.
    #[test]
    fn a_real_connection_is_found_in_proc() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (_s, peer) = l.accept().expect("accept");
        assert_eq!(peer, c.local_addr().expect("addr"));
        // SAFETY-free: the effective uid, from /proc/self/status.
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let uid: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|u| u.parse().ok())
            .expect("uid");
        assert_eq!(peer_uid(peer, l.local_addr().expect("addr")), Some(uid));
    }
}
