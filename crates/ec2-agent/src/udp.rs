//! A UDP or ping flow's socket task at the agent: datagrams to the
//! destination from a queue, everything received handed to the session.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use forwarder::dns::pending::Pending;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::debug;

/// One flow: see [`UdpFlow::start`].
#[derive(Debug)]
pub struct UdpFlow {
    /// Datagrams for the destination, sent by the flow's task.
    pub to_remote: mpsc::Sender<Bytes>,
    task: tokio::task::JoinHandle<()>,
    /// A flow to the instance's resolver: the queries it waits on.
    pub dns: Option<Arc<Mutex<Pending>>>,
}

impl UdpFlow {
    /// The flow's task on a connected `socket`: sends what `to_remote` carries
    /// (`what` names it in the log) and hands each receive to `on_recv` with
    /// the flow's `last`; the flow ends when `on_recv` returns false.
    /// `last` is the flow's last-activity clock in the [`FlowTable`].
    pub fn start(
        socket: UdpSocket,
        capacity: usize,
        last: Arc<AtomicU64>,
        what: &'static str,
        mut on_recv: impl FnMut(std::io::Result<&[u8]>, &AtomicU64) -> bool + Send + 'static,
    ) -> UdpFlow {
        let (to_remote, mut outgoing) = mpsc::channel::<Bytes>(capacity);
        let l = last;
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                tokio::select! {
                    out = outgoing.recv() => match out {
                        Some(d) => {
                            if let Err(e) = socket.send(&d).await {
                                debug!(peer = ?socket.peer_addr().ok(), "{what} not sent: {e}");
                            }
                        }
                        None => return,
                    },
                    r = socket.recv(&mut buf) => {
                        if !on_recv(r.map(|n| &buf[..n]), &l) {
                            return;
                        }
                    }
                }
            }
        });
        UdpFlow { to_remote, task, dns: None }
    }
}

impl Drop for UdpFlow {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A query the instance's resolver has not answered after this long (ms) is
/// answered SERVFAIL by the agent (checked every 5 s, so within 4-9 s).
pub const DNS_DEADLINE_MS: u64 = 4_000;

/// Socket errors that mean the resolver cannot be reached: its port is
/// closed (ICMP port unreachable) or its host or network unreachable.
pub fn resolver_gone(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionRefused | HostUnreachable | NetworkUnreachable)
}
