//! The TCP side: a smoltcp interface that accepts any destination address ("any IP")
//! ends the client's TCP connections, and bridges each to an ordinary socket opened
//! to the real destination. A SYN is only handed to smoltcp once that socket is
//! connected, so a refused or unreachable destination looks to the client exactly
//! as it would on a real network (reset or ICMP error).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use forwarder::dns::tcp::{Piece, TcpFilter};
use forwarder::dns::Domain;
use forwarder::link::TxQueue;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpListenEndpoint, Ipv4Address, Ipv6Address};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tracing::info;

/// A TCP flow as the client sees it: its own address and the destination.
pub type FlowKey = (SocketAddr, SocketAddr);

/// What a connection's smoltcp socket holds from the client (its receive window).
const RX_BUFFER: usize = 256 * 1024;
/// What it holds towards the client: sent and unacknowledged plus waiting. It
/// bounds one flow's download to TX_BUFFER per RTT (1 MiB per 75 ms: 14 MB/s,
/// past eight striped sessions through the stock agent at 40 ms). The memory
/// is only committed as a busy flow cycles through it (calloc'd pages).
const TX_BUFFER: usize = 1024 * 1024;
const CHUNK: usize = 16 * 1024;

/// Packets in from the client, packets out through the link's queue.
struct LinkDevice {
    rx: VecDeque<Bytes>,
    tx: Arc<TxQueue>,
    mtu: usize,
}

struct RxTok(Bytes);
struct TxTok<'a>(&'a TxQueue);

impl phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_held(Bytes::from(buf));
        r
    }
}

impl phy::Device for LinkDevice {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _t: smoltcp::time::Instant) -> Option<(RxTok, TxTok<'_>)> {
        let p = self.rx.pop_front()?;
        Some((RxTok(p), TxTok(&self.tx)))
    }

    fn transmit(&mut self, _t: smoltcp::time::Instant) -> Option<TxTok<'_>> {
        // Never "exhausted": smoltcp 0.14 forgets a fast retransmission that the
        // device refuses (and leaves no timer to try again), which wedged a
        // flow for good once its congestion window was below the bytes in
        // flight. The back-pressure is in `Stack::poll`, which runs the egress
        // only while the link's queue has room.
        Some(TxTok(&self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}

struct Flow {
    handle: SocketHandle,
    /// Data read from the destination, waiting for room in the smoltcp socket.
    from_remote: mpsc::Receiver<Bytes>,
    pending: Option<Bytes>,
    /// Data for the destination; dropped (closing its write side) once the client
    /// has sent FIN and everything before it is written.
    to_remote: Option<mpsc::Sender<Bytes>>,
    remote_eof: bool,
    fin_sent: bool,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for Flow {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The smoltcp side of one client.
pub struct Stack {
    iface: Interface,
    sockets: SocketSet<'static>,
    device: LinkDevice,
    flows: HashMap<FlowKey, Flow>,
    wake: Arc<Notify>,
    epoch: std::time::Instant,
    /// Flows opened and finished, for the log.
    pub opened: u64,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack").field("flows", &self.flows.len()).field("opened", &self.opened).finish_non_exhaustive()
    }
}

fn now(epoch: std::time::Instant) -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(epoch.elapsed().as_micros() as i64)
}

/// The stack's own addresses: never seen by anyone, they only anchor "any IP".
const OWN_V4: Ipv4Address = Ipv4Address::new(100, 127, 255, 254);
const OWN_V6: Ipv6Address = Ipv6Address::new(0xfd00, 0x55, 0x4d50, 0, 0, 0, 0, 1);

impl Stack {
    pub fn new(tx: Arc<TxQueue>, mtu: usize, wake: Arc<Notify>) -> Self {
        let epoch = std::time::Instant::now();
        let mut device = LinkDevice { rx: VecDeque::new(), tx, mtu };
        let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut device, now(epoch));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(OWN_V4), 32));
            let _ = a.push(IpCidr::new(IpAddress::Ipv6(OWN_V6), 128));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(OWN_V4);
        let _ = iface.routes_mut().add_default_ipv6_route(OWN_V6);
        iface.set_any_ip(true);
        Stack { iface, sockets: SocketSet::new(Vec::new()), device, flows: HashMap::new(), wake, epoch, opened: 0 }
    }

    pub fn has_flow(&self, key: &FlowKey) -> bool {
        self.flows.contains_key(key)
    }

    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// A segment of a flow smoltcp already owns.
    pub fn deliver(&mut self, packet: Bytes) {
        self.device.rx.push_back(packet);
    }

    /// The destination answered: let smoltcp accept the client's SYN and bridge the
    /// two connections.
    /// Take over the client's connection `key` (its SYN in `syn`), bridged to
    /// `remote`. With `dns_filter`, the client's stream is DNS over TCP to its
    /// tunnel resolver: only queries in those domains reach `remote`, others
    /// are answered REFUSED from here.
    pub fn accept(&mut self, key: FlowKey, remote: TcpStream, syn: Bytes, dns_filter: Option<Vec<Domain>>) {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; RX_BUFFER]),
            tcp::SocketBuffer::new(vec![0u8; TX_BUFFER]),
        );
        socket.set_congestion_control(tcp::CongestionControl::Cubic);
        socket.set_nagle_enabled(false);
        let dst = key.1;
        let endpoint = IpListenEndpoint { addr: Some(IpAddress::from(dst.ip())), port: dst.port() };
        if socket.listen(endpoint).is_err() {
            return;
        }
        let handle = self.sockets.add(socket);
        let _ = remote.set_nodelay(true);
        let (mut rd, mut wr) = remote.into_split();
        let (in_tx, in_rx) = mpsc::channel::<Bytes>(8);
        let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(8);
        // Answers of the DNS filter go back like the remote's data, but must not
        // keep the flow open once the remote has closed.
        let answers = in_tx.downgrade();
        let wake = self.wake.clone();
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if in_tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                            break;
                        }
                        wake.notify_one();
                    }
                }
            }
            drop(in_tx);
            wake.notify_one();
        });
        let wake = self.wake.clone();
        let writer = tokio::spawn(async move {
            let mut filter = dns_filter.map(TcpFilter::new);
            while let Some(b) = out_rx.recv().await {
                let Some(f) = filter.as_mut() else {
                    if wr.write_all(&b).await.is_err() {
                        break;
                    }
                    wake.notify_one();
                    continue;
                };
                for piece in f.push(&b) {
                    match piece {
                        Piece::Forward(q) => {
                            if wr.write_all(&q).await.is_err() {
                                break;
                            }
                        }
                        Piece::Answer(a) => {
                            if let Some(tx) = answers.upgrade() {
                                let _ = tx.send(Bytes::from(a)).await;
                            }
                        }
                    }
                }
                wake.notify_one();
            }
            if let Some(f) = &filter {
                if f.refused > 0 {
                    info!(refused = f.refused, "DNS over TCP: queries outside the client's domains answered REFUSED");
                }
            }
            let _ = wr.shutdown().await;
        });
        self.flows.insert(
            key,
            Flow {
                handle,
                from_remote: in_rx,
                pending: None,
                to_remote: Some(out_tx),
                remote_eof: false,
                fin_sent: false,
                tasks: [reader, writer],
            },
        );
        self.opened += 1;
        // Hand the SYN over now, so this listening socket takes it before another
        // flow's listener to the same destination exists.
        self.device.rx.push_back(syn);
        self.poll();
    }

    /// Run smoltcp and move data until nothing changes; returns when to poll
    /// again (`None`: on the next packet, or once the link's queue has room).
    ///
    /// Back-pressure instead of CoDel drops: each egress pass emits at most one
    /// segment per socket, and passes run only while the link's queue wants
    /// more; otherwise the data waits in the socket buffers until
    /// [`TxQueue::room`].
    pub fn poll(&mut self) -> Option<Duration> {
        use smoltcp::iface::{PollIngressSingleResult, PollResult};
        let mut room = true;
        for _ in 0..64 {
            let t = now(self.epoch);
            let mut changed = false;
            self.iface.poll_maintenance(t);
            while self.iface.poll_ingress_single(t, &mut self.device, &mut self.sockets)
                != PollIngressSingleResult::None
            {
                changed = true;
            }
            changed |= self.service();
            room = self.device.tx.has_room();
            while room && self.iface.poll_egress(t, &mut self.device, &mut self.sockets) != PollResult::None {
                changed = true;
                room = self.device.tx.has_room();
            }
            if !changed && self.device.rx.is_empty() {
                break;
            }
        }
        if !room {
            // Whatever smoltcp wants to send (retransmissions included) waits
            // for the room; polling on its timers meanwhile would spin.
            return None;
        }
        self.iface.poll_delay(now(self.epoch), &self.sockets).map(|d| Duration::from_micros(d.total_micros()))
    }

    fn service(&mut self) -> bool {
        let mut progress = false;
        let mut finished = Vec::new();
        for (key, flow) in self.flows.iter_mut() {
            let sock = self.sockets.get_mut::<tcp::Socket>(flow.handle);
            // Client -> destination.
            while sock.can_recv() {
                let Some(tx) = flow.to_remote.as_ref() else { break };
                match tx.try_reserve() {
                    Ok(permit) => {
                        let chunk = sock.recv(|buf| {
                            let n = buf.len().min(CHUNK);
                            (n, Bytes::copy_from_slice(&buf[..n]))
                        });
                        match chunk {
                            Ok(b) if !b.is_empty() => {
                                permit.send(b);
                                progress = true;
                            }
                            _ => break,
                        }
                    }
                    Err(mpsc::error::TrySendError::Full(())) => break,
                    Err(mpsc::error::TrySendError::Closed(())) => {
                        // The destination went away while the client still sends.
                        sock.abort();
                        break;
                    }
                }
            }
            let client_done = matches!(
                sock.state(),
                tcp::State::CloseWait
                    | tcp::State::LastAck
                    | tcp::State::Closing
                    | tcp::State::TimeWait
                    | tcp::State::Closed
            );
            if client_done && !sock.can_recv() && flow.to_remote.is_some() {
                flow.to_remote = None;
                progress = true;
            }
            // Destination -> client.
            loop {
                if flow.pending.is_none() {
                    match flow.from_remote.try_recv() {
                        Ok(b) => flow.pending = Some(b),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            flow.remote_eof = true;
                            break;
                        }
                    }
                }
                let Some(b) = flow.pending.as_mut() else { break };
                if !sock.can_send() {
                    break;
                }
                match sock.send_slice(b) {
                    Ok(n) if n > 0 => {
                        progress = true;
                        if n == b.len() {
                            flow.pending = None;
                        } else {
                            let _ = b.split_to(n);
                        }
                    }
                    _ => break,
                }
            }
            if flow.remote_eof && flow.pending.is_none() && !flow.fin_sent && sock.may_send() {
                sock.close();
                flow.fin_sent = true;
                progress = true;
            }
            // Listen is never a flow's state once its SYN is in: smoltcp puts a
            // socket back there when the client resets it before the handshake
            // ends (its kernel answers a SYN-ACK that came after it gave up).
            // Kept, that socket would listen on the destination's address for
            // anyone: it would take the next client's SYN to it and join that
            // client to this flow's connection, which the destination may have
            // closed by then.
            if matches!(sock.state(), tcp::State::Closed | tcp::State::TimeWait | tcp::State::Listen) {
                finished.push(*key);
            }
        }
        for key in finished {
            if let Some(flow) = self.flows.remove(&key) {
                self.sockets.remove(flow.handle);
                progress = true;
            }
        }
        progress
    }
}

/// Where a TCP SYN goes.
pub fn flow_key(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> FlowKey {
    (SocketAddr::new(src, sport), SocketAddr::new(dst, dport))
}

#[cfg(test)]
mod tests;
