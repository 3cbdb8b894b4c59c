//! One client (one Port session): HELLO, then every packet it sends is checked
//! against the policy and forwarded: TCP through the smoltcp [`Stack`], UDP through
//! a connected socket per flow, ICMP echo through unprivileged ping sockets.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use forwarder::dns::pending::Pending;
use forwarder::fq::FqConfig;
use forwarder::link::{self, Lane, LinkEnd, LinkStats, Stream, TxQueue};
use forwarder::stripe::{self, Resequencer};
use forwarder::timer::LazyTimer;
use forwarder::wire::{self, caps, Deframer, Frame, Hello, Reason, Role};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};

use crate::flows::{Action, EchoKey, FlowTable, Limits, Refusal};
use crate::packet::{self, Unreachable, L4};
use crate::policy::Policy;
use crate::stack::{flow_key, FlowKey, Stack};
use crate::udp::{resolver_gone, UdpFlow, DNS_DEADLINE_MS};

#[derive(Debug)]
pub struct AgentConfig {
    pub policy: Policy,
    pub mtu: u16,
    pub udp_idle: Duration,
    pub connect_timeout: Duration,
    pub max_tcp_flows: usize,
    pub max_udp_flows: usize,
    pub resolvers: Vec<IpAddr>,
    /// How long a client's flows outlive its lost connection (zero: not at all).
    pub grace: Duration,
    /// The instance's VPC id and region, told to clients in HELLO.
    pub vpc: Option<(String, String)>,
    /// For status queries ([`caps::QUERY`]).
    pub listen: std::net::SocketAddr,
    pub started: Instant,
    pub max_clients: usize,
    /// Client connections past their HELLO (what `--max-clients` bounds).
    pub active: Arc<std::sync::atomic::AtomicUsize>,
    /// Client sessions running (a striped client's members make one).
    pub sessions: Arc<std::sync::atomic::AtomicUsize>,
}

impl AgentConfig {
    /// What a client's flow table enforces.
    fn limits(&self) -> Limits {
        Limits {
            policy: self.policy.clone(),
            resolvers: self.resolvers.clone(),
            max_tcp_flows: self.max_tcp_flows,
            max_udp_flows: self.max_udp_flows,
            idle_ms: self.udp_idle.as_millis() as u64,
        }
    }

    /// The answer to a status query (which is not a client, so not counted).
    pub fn status(&self, registry: &Registry) -> String {
        serde_json::json!({
            "software": format!("ec2-agent {}", env!("CARGO_PKG_VERSION")),
            "uptime_secs": self.started.elapsed().as_secs(),
            "listen": self.listen.to_string(),
            "sessions": self.sessions.load(Ordering::Relaxed),
            "resumable_sessions": lock(registry).len(),
            "max_clients": self.max_clients,
            "grace_secs": self.grace.as_secs(),
            "vpc": self.vpc.as_ref().map(|(v, _)| v.clone()),
            "region": self.vpc.as_ref().map(|(_, r)| r.clone()),
            "resolvers": self.resolvers.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "allow": self.policy.allow().iter().map(ToString::to_string).collect::<Vec<_>>(),
            "deny": self.policy.deny().iter().map(ToString::to_string).collect::<Vec<_>>(),
        })
        .to_string()
    }
}

/// Set once: the first refused ping socket is explained in the log, later ones not.
static PING_DENIED_LOGGED: AtomicBool = AtomicBool::new(false);

struct Session {
    config: Arc<AgentConfig>,
    queue: Arc<TxQueue>,
    stack: Stack,
    /// Which packet goes where; the sockets below are its flows'.
    flows: FlowTable,
    udp: HashMap<FlowKey, UdpFlow>,
    /// One ping socket per `ping` of the client.
    echo: HashMap<EchoKey, UdpFlow>,
    events: mpsc::Sender<(FlowKey, std::io::Result<TcpStream>, Bytes)>,
    epoch: Instant,
    /// The client's split-DNS domains: DNS over TCP for other names is refused.
    dns_domains: Vec<forwarder::dns::Domain>,
}

/// What this agent announces in its HELLO.
pub const AGENT_CAPS: u32 = caps::PING | caps::IPV6 | caps::ACK | caps::STRIPE;

/// Most connections one striping client may have at once; a further one
/// replaces the oldest (which its client has most likely given up on).
const MAX_MEMBERS: usize = 16;

fn ms_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

/// A client's running session, found by the client id from its HELLO: a client
/// that comes back within the grace period (a new SSM session after the old one
/// died) gets its flows back.
pub type Registry = Arc<Mutex<HashMap<[u8; 16], mpsc::Sender<Attach>>>>;

/// A client connection whose HELLO was answered, ready to carry a session.
pub struct Attach {
    reader: Stream<OwnedReadHalf>,
    writer: Stream<OwnedWriteHalf>,
    deframer: Deframer,
    hello: Hello,
    peer: String,
}

impl std::fmt::Debug for Attach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attach").field("peer", &self.peer).field("hello", &self.hello).finish_non_exhaustive()
    }
}

/// Serve one client connection: answer its HELLO, then run its session, or hand
/// the connection to the session it left behind.
///
/// `waiting` holds the connection's place among those yet to say HELLO;
/// `root`: the peer is root (the SSM agent), whom the client limit does not bind.
pub async fn serve(
    stream: TcpStream,
    config: Arc<AgentConfig>,
    peer: String,
    registry: Registry,
    waiting: crate::admit::Slot,
    root: bool,
) -> Result<(), LinkEnd> {
    let _ = stream.set_nodelay(true);
    let (reader, writer) = stream.into_split();
    let (mut reader, mut writer) = (Stream::new(reader), Stream::new(writer));
    let read = tokio::time::timeout(crate::admit::HELLO_TIMEOUT, link::read_hello(&mut reader)).await;
    drop(waiting);
    let Ok(read) = read else {
        warn!("no HELLO within {:?}: closed", crate::admit::HELLO_TIMEOUT);
        return Ok(());
    };
    let (hello, deframer) = read?;
    if hello.role != Role::Client || hello.version != wire::VERSION {
        let bye = Frame::Goodbye {
            reason: Reason::UnsupportedVersion,
            message: format!("this agent speaks version {} to clients", wire::VERSION),
        };
        let _ = link::write_frame(&mut writer, &bye).await;
        return Err(LinkEnd::Wire(wire::WireError::BadHello("unsupported version or role")));
    }
    // An all-zero id names no one in particular: such clients never share state.
    let resumable = hello.client_id != [0; 16] && !config.grace.is_zero();
    let known = resumable && lock(&registry).contains_key(&hello.client_id);
    let reply = Hello {
        version: wire::VERSION,
        role: Role::Agent,
        caps: if known { AGENT_CAPS } else { AGENT_CAPS | caps::FRESH },
        mtu: config.mtu,
        client_id: hello.client_id,
        software: format!("ec2-agent {}", env!("CARGO_PKG_VERSION")),
        resolvers: config.resolvers.clone(),
        dns: Vec::new(),
        vpc: config.vpc.clone(),
        dns_domains: Vec::new(),
    };
    link::write_frame(&mut writer, &Frame::Hello(reply)).await?;
    if hello.caps & caps::QUERY != 0 {
        info!(client = %peer, "status query");
        link::write_frame(&mut writer, &Frame::Status(config.status(&registry))).await?;
        return Ok(());
    }
    let _client = if root {
        crate::admit::Slot::exempt(&config.active)
    } else {
        match crate::admit::Slot::take(&config.active, config.max_clients) {
            Some(s) => s,
            None => {
                warn!(client = %peer, "refusing a client: --max-clients {} reached", config.max_clients);
                let bye = Frame::Goodbye { reason: Reason::TooManyClients, message: "too many clients".into() };
                let _ = link::write_frame(&mut writer, &bye).await;
                return Ok(());
            }
        }
    };
    let id = hello.client_id;
    let mut attach = Attach { reader, writer, deframer, hello, peer };

    if resumable {
        let parked = lock(&registry).get(&id).cloned();
        if let Some(tx) = parked {
            match tx.send(attach).await {
                Ok(()) => return Ok(()),
                // That session ended just now: start a new one.
                Err(mpsc::error::SendError(back)) => attach = back,
            }
        }
    }
    let (tx, rx) = mpsc::channel(2);
    if resumable {
        lock(&registry).insert(id, tx.clone());
    }
    let running = crate::admit::Slot::exempt(&config.sessions);
    run_session(attach, rx, config).await;
    drop(running);
    // Unless a newer session of the same client took the entry meanwhile.
    let mut r = lock(&registry);
    if r.get(&id).is_some_and(|t| t.same_channel(&tx)) {
        r.remove(&id);
    }
    Ok(())
}

/// The valid domains of a client's HELLO (an old client sends none: no filter).
fn domains_of(hello: &Hello) -> Vec<forwarder::dns::Domain> {
    hello.dns_domains.iter().filter_map(|d| forwarder::dns::Domain::parse(d).ok()).collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The tasks carrying one connection (member) of a session.
struct LinkTasks {
    id: u64,
    peer: String,
    lane: Arc<Lane>,
    stats: Arc<LinkStats>,
    reading: tokio::task::JoinHandle<()>,
    writing: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl LinkTasks {
    fn abort(&self) {
        self.reading.abort();
        self.writing.abort();
    }
}

/// What a session's connections share.
struct Links {
    queue: Arc<TxQueue>,
    pkt_tx: mpsc::Sender<Bytes>,
    dropped_in: Arc<AtomicU64>,
    reseq: Arc<Resequencer>,
    /// Each connection's reader says here how it ended.
    ends: mpsc::Sender<(u64, LinkEnd)>,
    epoch: Instant,
    next_id: u64,
    live: Vec<LinkTasks>,
    /// Packets of connections gone, for the totals.
    done_in: u64,
    done_out: u64,
    /// All connections lost: when the flows go unless the client comes back.
    parked_until: Option<Instant>,
    resumes: u64,
    grace: Duration,
}

impl Links {
    /// The packets the client sent: into the session's loop, in order.
    fn sink(&self) -> impl FnMut(Bytes) + Send + 'static {
        let (pkt_tx, d) = (self.pkt_tx.clone(), self.dropped_in.clone());
        move |p| {
            if pkt_tx.try_send(p).is_err() {
                d.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Start carrying `a` as one more connection of the session.
    fn start(&mut self, a: Attach) {
        let lane = Lane::new(AGENT_CAPS, a.hello.caps);
        let stats = Arc::new(LinkStats::default());
        let (ctl_tx, ctl_rx) = mpsc::channel::<Frame>(64);
        let writing =
            tokio::spawn(link::write_loop(self.queue.clone(), lane.clone(), ctl_rx, a.writer, 4096, stats.clone()));
        let (reseq, mut sink) = (self.reseq.clone(), self.sink());
        let id = self.next_id;
        self.next_id += 1;
        let reader = link::read_loop(
            a.reader,
            a.deframer,
            move |seq, p| reseq.deliver(seq, p, &mut sink),
            ctl_tx,
            lane.clone(),
            stats.clone(),
            self.epoch,
        );
        let ends = self.ends.clone();
        let reading = tokio::spawn(async move {
            let end = reader.await;
            let _ = ends.send((id, end)).await;
        });
        self.live.push(LinkTasks { id, peer: a.peer, lane, stats, reading, writing });
        if self.live.len() > MAX_MEMBERS {
            let oldest = self.live.remove(0);
            warn!(client = %oldest.peer, "more than {MAX_MEMBERS} connections of one client: dropping the oldest");
            self.retire(oldest);
        }
    }

    /// Stop a connection's tasks and count its packets.
    fn retire(&mut self, l: LinkTasks) {
        l.lane.abandon();
        l.abort();
        self.done_in += l.stats.received.read().0;
        self.done_out += l.stats.sent.read().0;
        let mut sink = self.sink();
        self.reseq.flush(&mut sink);
    }

    /// A new connection of the client: one more member if it stripes, else
    /// the one that takes over from all others.
    fn join(&mut self, a: Attach, s: &mut Session) {
        let joins = a.hello.caps & caps::STRIPE != 0;
        if joins && self.parked_until.is_none() {
            info!(client = %a.peer, connections = self.live.len() + 1, "client added a connection");
        } else {
            // The client is back (or replaced a connection we still thought alive).
            if !joins {
                self.retire_all();
            }
            self.resumes += 1;
            info!(client = %a.peer, resumes = self.resumes, tcp_flows = s.stack.flow_count(), udp_flows = s.flows.udp_flows(), "client resumed its session");
        }
        self.parked_until = None;
        s.flows.set_dns(a.hello.dns.clone());
        s.dns_domains = domains_of(&a.hello);
        self.start(a);
    }

    /// Connection `id`'s reader ended with `end`: `Some` if the session ends
    /// with it (a GOODBYE, or the last one lost without a grace period).
    fn ended(&mut self, id: u64, end: LinkEnd) -> Option<LinkEnd> {
        if !self.live.iter().any(|l| l.id == id) {
            return None; // retired already
        }
        let last = self.live.len() == 1;
        // The session ends: the closing at its end answers this connection too.
        if matches!(end, LinkEnd::Goodbye { .. }) || (last && self.grace.is_zero()) {
            return Some(end);
        }
        let old = self.take(id)?;
        let peer = old.peer.clone();
        self.retire(old);
        if self.live.is_empty() {
            info!(client = %peer, grace = ?self.grace, "connection lost ({end}); keeping the flows for the client to come back");
            self.parked_until = Some(Instant::now() + self.grace);
        } else {
            info!(client = %peer, connections = self.live.len(), "one of the client's connections ended ({end}); the others carry on");
        }
        None
    }

    /// The session ends: a GOODBYE on every connection still up.
    async fn close_all(&mut self) {
        for l in std::mem::take(&mut self.live) {
            l.lane.close();
            l.reading.abort();
            let _ = tokio::time::timeout(Duration::from_secs(2), l.writing).await;
        }
    }

    /// Every connection goes (a client that does not stripe took over).
    fn retire_all(&mut self) {
        for l in std::mem::take(&mut self.live) {
            self.retire(l);
        }
    }

    fn take(&mut self, id: u64) -> Option<LinkTasks> {
        let i = self.live.iter().position(|l| l.id == id)?;
        Some(self.live.remove(i))
    }

    /// The reorder bound from the connections' RTTs.
    fn update_bound(&self) {
        let rtts = self.live.iter().map(|l| l.stats.min_rtt_us.load(Ordering::Relaxed));
        if let Some(bound) = stripe::bound_for_micros(rtts) {
            self.reseq.set_bound(bound);
        }
    }

    fn packets(&self) -> (u64, u64) {
        let live = self.live.iter().map(|l| (l.stats.received.read().0, l.stats.sent.read().0));
        live.fold((self.done_in, self.done_out), |(i, o), (a, b)| (i + a, o + b))
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// One client's flows, across the connections that carry them: a client that
/// stripes has several at once; when all are lost (not ended with GOODBYE),
/// the flows wait `config.grace` for the same client to come back through
/// [`serve`].
async fn run_session(first: Attach, mut attach: mpsc::Receiver<Attach>, config: Arc<AgentConfig>) {
    let mtu = wire::negotiate_mtu(config.mtu, first.hello.mtu);
    let striped = first.hello.caps & caps::STRIPE != 0;
    info!(client = %first.peer, software = %first.hello.software, mtu, striped, "client connected");
    let queue = TxQueue::new(FqConfig::default());
    let (pkt_tx, mut pkt_rx) = mpsc::channel::<Bytes>(4096);
    let epoch = Instant::now();
    let wake = Arc::new(Notify::new());
    let (ev_tx, mut ev_rx) = mpsc::channel(256);
    let (ends_tx, mut ends_rx) = mpsc::channel(MAX_MEMBERS);
    let grace = config.grace;
    let mut s = Session {
        stack: Stack::new(queue.clone(), mtu as usize, wake.clone()),
        flows: FlowTable::new(config.limits(), first.hello.dns.clone()),
        config,
        queue: queue.clone(),
        udp: HashMap::new(),
        echo: HashMap::new(),
        events: ev_tx,
        epoch,
        dns_domains: domains_of(&first.hello),
    };
    let first_peer = first.peer.clone();
    let mut links = Links {
        queue: queue.clone(),
        pkt_tx,
        dropped_in: Arc::new(AtomicU64::new(0)),
        reseq: Arc::new(Resequencer::default()),
        ends: ends_tx,
        epoch,
        next_id: 0,
        live: Vec::new(),
        done_in: 0,
        done_out: 0,
        parked_until: None,
        resumes: 0,
        grace,
    };
    let expiry = tokio::spawn({
        let (reseq, sink) = (links.reseq.clone(), links.sink());
        async move { reseq.expire(sink).await }
    });
    links.start(first);
    let mut sweep = tokio::time::interval(Duration::from_secs(5));
    // The stack's next timer; without one, a look at it once a second.
    let mut stack_timer = LazyTimer::new();
    let mut delay = None;
    let end = loop {
        stack_timer.arm(Some(Instant::now() + delay.unwrap_or(Duration::from_secs(1))));
        tokio::select! {
            p = pkt_rx.recv() => {
                if let Some(p) = p {
                    s.handle_packet(p);
                    // Take whatever else is already there before polling the stack.
                    while let Ok(p) = pkt_rx.try_recv() {
                        s.handle_packet(p);
                    }
                }
            }
            Some(a) = attach.recv() => links.join(a, &mut s),
            Some((id, end)) = ends_rx.recv() => {
                if let Some(end) = links.ended(id, end) {
                    break end;
                }
            }
            () = sleep_until(links.parked_until) => {
                break LinkEnd::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("the client did not come back within {grace:?}")));
            }
            Some((key, result, syn)) = ev_rx.recv() => s.connected(key, result, syn),
            () = wake.notified() => {}
            () = queue.room() => {}
            () = stack_timer.fired() => {}
            _ = sweep.tick() => {
                s.expire_udp();
                links.update_bound();
            }
        }
        delay = s.stack.poll();
    };
    expiry.abort();
    links.close_all().await;
    let q = queue.stats();
    let (packets_in, packets_out) = links.packets();
    let r = links.reseq.stats();
    info!(
        client = %first_peer,
        dropped_codel = q.dropped_codel,
        dropped_overflow = q.dropped_overflow,
        tcp_flows = s.stack.opened,
        packets_in,
        packets_out,
        denied = s.flows.denied,
        dns_flows = s.flows.dns_queries,
        resumes = links.resumes,
        dropped_in = links.dropped_in.load(Ordering::Relaxed),
        reordered = r.held,
        reorder_skipped = r.skipped,
        "client disconnected: {end}"
    );
}

impl Session {
    fn reply(&self, packet: Option<Vec<u8>>) {
        if let Some(p) = packet {
            self.queue.push(Bytes::from(p));
        }
    }

    fn refuse(&self, raw: &[u8], p: &packet::Parsed<'_>, how: Refusal) {
        self.reply(how.reply(raw, p));
    }

    /// Does what the flow table says `raw` asks for.
    fn handle_packet(&mut self, raw: Bytes) {
        let Some(p) = packet::parse(&raw) else {
            debug!(len = raw.len(), "not an IP packet; dropped");
            return;
        };
        let tcp_known = match p.l4 {
            L4::Tcp { sport, dport, .. } => self.stack.has_flow(&flow_key(p.src, sport, p.dst, dport)),
            _ => false,
        };
        match self.flows.classify(&p, tcp_known, self.stack.flow_count(), || ms_since(self.epoch)) {
            Action::ToStack => self.stack.deliver(raw.clone()),
            Action::Ignore => {}
            Action::Dial { key, target } => self.dial(key, target, raw.clone()),
            Action::Refuse(how) => self.refuse(&raw, &p, how),
            Action::Udp { key, open } => {
                if let L4::Udp { payload, .. } = p.l4 {
                    self.send_udp(&raw, &p, key, open, payload);
                }
            }
            Action::Echo { key, open } => {
                if let L4::EchoRequest { seq, payload, .. } = p.l4 {
                    self.send_echo(key, open, seq, payload);
                }
            }
            Action::Drop => debug!(dst = %p.dst, "protocol not forwarded; dropped"),
        }
    }

    /// Dials `target` for the flow `key`; its SYN waits until the answer
    /// comes back through `events` (see [`Session::connected`]).
    fn dial(&mut self, key: FlowKey, target: SocketAddr, syn: Bytes) {
        let events = self.events.clone();
        let timeout = self.config.connect_timeout;
        tokio::spawn(async move {
            let r = match tokio::time::timeout(timeout, TcpStream::connect(target)).await {
                Ok(r) => r,
                Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")),
            };
            let _ = events.send((key, r, syn)).await;
        });
    }

    /// A datagram out through its flow's socket, opened to `open` first for a new flow.
    fn send_udp(&mut self, raw: &[u8], p: &packet::Parsed<'_>, key: FlowKey, open: Option<SocketAddr>, payload: &[u8]) {
        if let Some(target) = open {
            let last = self.flows.udp_opened(key, ms_since(self.epoch));
            match self.open_udp(key, target, last) {
                Ok(flow) => {
                    self.udp.insert(key, flow);
                }
                Err(e) => {
                    warn!(dst = %key.1, "cannot open a UDP socket: {e}");
                    self.flows.udp_closed(&key);
                    self.reply(packet::unreachable(raw, p, Unreachable::Host));
                    return;
                }
            }
        }
        if let Some(flow) = self.udp.get(&key) {
            if let Some(dns) = &flow.dns {
                lock(dns).sent(payload, ms_since(self.epoch));
            }
            if flow.to_remote.try_send(Bytes::copy_from_slice(payload)).is_err() {
                debug!(dst = %key.1, "UDP flow backlogged; datagram dropped");
            }
        }
    }

    /// An echo request out through the ping socket of its identifier.
    fn send_echo(&mut self, key: EchoKey, open: bool, seq: u16, payload: &[u8]) {
        let dst = key.1;
        if open {
            let last = self.flows.echo_opened(key, ms_since(self.epoch));
            match self.open_echo(key, last) {
                Ok(flow) => {
                    self.echo.insert(key, flow);
                }
                Err(e) => {
                    self.flows.echo_closed(&key);
                    if e.kind() != std::io::ErrorKind::PermissionDenied {
                        warn!(%dst, "cannot open a ping socket: {e}");
                    } else if !PING_DENIED_LOGGED.swap(true, Ordering::Relaxed) {
                        warn!(
                            "ping through the tunnel is unavailable: this user may not open ping sockets \
                             ({e}); allow its group with sysctl net.ipv4.ping_group_range"
                        );
                    }
                    return;
                }
            }
        }
        let Some(flow) = self.echo.get(&key) else { return };
        // Type, code, checksum, identifier (the kernel sets both), sequence, data.
        let request = if dst.is_ipv4() { 8u8 } else { 128 };
        let mut msg = Vec::with_capacity(8 + payload.len());
        msg.extend_from_slice(&[request, 0, 0, 0, 0, 0]);
        msg.extend_from_slice(&seq.to_be_bytes());
        msg.extend_from_slice(payload);
        match flow.to_remote.try_send(Bytes::from(msg)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => debug!(%dst, "ping backlogged; echo request dropped"),
            // Its socket failed: the next request opens another.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.echo.remove(&key);
                self.flows.echo_closed(&key);
            }
        }
    }

    fn connected(&mut self, key: FlowKey, result: std::io::Result<TcpStream>, syn: Bytes) {
        self.flows.dialled(&key);
        match result {
            Ok(stream) => {
                let to_resolver = self.flows.is_tunnel_resolver(key.1);
                let filter = (to_resolver && !self.dns_domains.is_empty()).then(|| self.dns_domains.clone());
                self.stack.accept(key, stream, syn, filter)
            }
            Err(e) => {
                debug!(dst = %key.1, "connect failed: {e}");
                let Some(p) = packet::parse(&syn) else { return };
                if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    self.reply(packet::tcp_reset(&p));
                } else {
                    self.reply(packet::unreachable(&syn, &p, Unreachable::Host));
                }
            }
        }
    }

    /// A UDP flow for `key`, whose datagrams go to `target` (normally `key.1`).
    /// A flow to the tunnel resolver remembers its queries: when the
    /// instance's resolver is unreachable they are answered SERVFAIL (see
    /// [`Pending`]), not left to time out in silence.
    fn open_udp(&self, key: FlowKey, target: SocketAddr, last: Arc<AtomicU64>) -> std::io::Result<UdpFlow> {
        let bind: SocketAddr = if target.is_ipv4() { "0.0.0.0:0".parse() } else { "[::]:0".parse() }
            .map_err(|_| std::io::Error::other("bind address"))?;
        let std_sock = std::net::UdpSocket::bind(bind)?;
        std_sock.connect(target)?;
        std_sock.set_nonblocking(true)?;
        let socket = UdpSocket::from_std(std_sock)?;
        let (queue, epoch) = (self.queue.clone(), self.epoch);
        let dns = self.flows.is_tunnel_resolver(key.1).then(|| Arc::new(Mutex::new(Pending::default())));
        let pending = dns.clone();
        let mut flow = UdpFlow::start(socket, 256, last, "UDP datagram", move |r, last| match r {
            Ok(d) => {
                last.store(ms_since(epoch), Ordering::Relaxed);
                if let Some(p) = &pending {
                    lock(p).answered(d);
                }
                if let Some(pkt) = packet::udp(key.1, key.0, d) {
                    queue.push(Bytes::from(pkt));
                }
                true
            }
            Err(e) if pending.is_some() && resolver_gone(&e) => {
                let fails = pending.as_ref().map(|p| lock(p).fail_all()).unwrap_or_default();
                warn!(resolver = %target, "the instance's resolver is unreachable ({e}): {} queries answered SERVFAIL", fails.len());
                for reply in fails {
                    if let Some(pkt) = packet::udp(key.1, key.0, &reply) {
                        queue.push(Bytes::from(pkt));
                    }
                }
                true
            }
            // The destination answered with ICMP port unreachable: pass it
            // on, quoting a datagram of this flow, so the client fails fast.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                let quote = packet::udp(key.0, key.1, &[]);
                let parsed = quote.as_deref().and_then(packet::parse);
                if let (Some(q), Some(p)) = (quote.as_deref(), parsed) {
                    if let Some(err) = packet::unreachable(q, &p, Unreachable::Port) {
                        queue.push(Bytes::from(err));
                    }
                }
                true
            }
            Err(_) => false,
        });
        flow.dns = dns;
        Ok(flow)
    }

    /// The ping socket for one `ping` of the client: the kernel gives it its
    /// own identifier and hands it only the replies to it; each reply goes back
    /// with the client's identifier and the reply's sequence number.
    fn open_echo(&self, (src, dst, id): EchoKey, last: Arc<AtomicU64>) -> std::io::Result<UdpFlow> {
        use socket2::{Domain, Protocol, Socket, Type};
        let (domain, proto, reply) = match dst {
            IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 0u8),
            IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 129u8),
        };
        let sock = Socket::new(domain, Type::DGRAM, Some(proto))?;
        sock.set_nonblocking(true)?;
        sock.connect(&SocketAddr::new(dst, 0).into())?;
        let socket = UdpSocket::from_std(std::net::UdpSocket::from(sock))?;
        let queue = self.queue.clone();
        Ok(UdpFlow::start(socket, 64, last, "echo request", move |r, _| match r {
            Ok(d) if d.len() >= 8 && d[0] == reply => {
                let seq = u16::from_be_bytes([d[6], d[7]]);
                if let Some(pkt) = packet::echo_reply(dst, src, id, seq, &d[8..]) {
                    queue.push(Bytes::from(pkt));
                }
                true
            }
            Ok(_) => true,
            // An ICMP error for an earlier request: the next one may fare better.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::HostUnreachable
                        | std::io::ErrorKind::NetworkUnreachable
                        | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                debug!(%dst, "ping: {e}");
                true
            }
            Err(e) => {
                debug!(%dst, "ping socket failed: {e}");
                false
            }
        }))
    }

    fn expire_udp(&mut self) {
        let now = ms_since(self.epoch);
        // Queries the instance's resolver left unanswered: SERVFAIL now.
        for (key, flow) in &self.udp {
            let Some(dns) = &flow.dns else { continue };
            for reply in lock(dns).expire(now, DNS_DEADLINE_MS) {
                self.reply(packet::udp(key.1, key.0, &reply));
            }
        }
        let (udp, echo) = self.flows.expire(now);
        for k in &udp {
            self.udp.remove(k);
        }
        for k in &echo {
            self.echo.remove(k);
        }
    }
}
