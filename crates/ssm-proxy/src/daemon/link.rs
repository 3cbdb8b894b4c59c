//! The laptop side: packets the OS routes into the tunnel device go through an
//! FQ-CoDel queue into the stream to the ec2-agent (striped: the streams of all
//! member sessions, each taking what its window allows); packets from the agent
//! are put back in order and written into the device.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tunnel::Device;

use forwarder::dns::{SplitDns, Verdict};
use forwarder::fq::FqConfig;
use forwarder::link::{self, Inlet, Lane, LinkEnd, LinkStats, Outlet, TxQueue};
use forwarder::stripe::{self, Resequencer};
use forwarder::tcpwatch::FlowWatch;
use forwarder::wire::{self, caps, Deframer, Frame, Hello, Reason, Role};

#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub fq: FqConfig,
    /// Most bytes of frames written to the stream at once (several packets per SSM
    /// message, without hiding a deep queue below the FQ-CoDel one).
    pub batch: usize,
    pub ping_every: Duration,
    pub hello_timeout: Duration,
    pub client_id: [u8; 16],
    pub software: String,
    /// Capabilities announced in the HELLO ([`caps`]).
    pub caps: u32,
    /// Split DNS: the tunnel resolver's addresses (announced in the HELLO) and the
    /// domains allowed through it.
    pub dns: Option<Arc<SplitDns>>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            fq: FqConfig::default(),
            batch: 4096,
            ping_every: Duration::from_secs(5),
            hello_timeout: Duration::from_secs(20),
            client_id: [0; 16],
            software: format!("ssm-proxy {}", env!("CARGO_PKG_VERSION")),
            caps: caps::PING | caps::IPV6 | caps::ACK,
            dns: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the ec2-agent did not answer within {0:?} (is it running on the instance, on the port given?)")]
    Timeout(Duration),
    #[error("the ec2-agent refused the connection: {0:?}: {1}")]
    Refused(Reason, String),
    #[error("the other end is not an ec2-agent, or speaks another version: {0}")]
    Protocol(String),
}

/// Everything a running tunnel exposes, across its links and their members.
#[derive(Debug)]
pub struct ClientHandle {
    /// Packets from the device, drained by every member's writer.
    pub queue: Arc<TxQueue>,
    /// The counters of each member session (slot), kept across its links.
    pub members: Vec<Arc<LinkStats>>,
    /// Puts striped packets from the agent back in order.
    pub reseq: Arc<Resequencer>,
    /// Packets from the agent dropped because the device could not take them.
    pub device_drops: AtomicU64,
    /// The TCP connections the laptop has open through the tunnel, to reset
    /// when the agent that carried them is gone.
    watch: Mutex<FlowWatch>,
    /// A link has been up before (so an agent without our flows lost them).
    linked: AtomicBool,
    /// Connections reset because the agent no longer had them.
    pub flows_reset: AtomicU64,
    to_device: mpsc::Sender<Bytes>,
    from_links: Mutex<Option<mpsc::Receiver<Bytes>>>,
}

impl ClientHandle {
    /// A handle for a tunnel of `sessions` members (at least one).
    pub fn new(config: &ClientConfig, sessions: usize) -> Arc<Self> {
        let (to_device, from_links) = mpsc::channel(1024);
        Arc::new(ClientHandle {
            queue: TxQueue::new(config.fq),
            members: (0..sessions.max(1)).map(|_| Arc::new(LinkStats::default())).collect(),
            reseq: Arc::new(Resequencer::default()),
            device_drops: AtomicU64::new(0),
            watch: Mutex::new(FlowWatch::default()),
            linked: AtomicBool::new(false),
            flows_reset: AtomicU64::new(0),
            to_device,
            from_links: Mutex::new(Some(from_links)),
        })
    }

    /// Where the members' readers put the agent's packets: a bounded hand-off
    /// to the device writer, so a slow device cannot stall acks.
    fn sink(self: &Arc<Self>) -> impl FnMut(Bytes) + Send + 'static {
        let h = self.clone();
        move |p| {
            if h.to_device.try_send(p).is_err() {
                h.device_drops.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A link's agent answered `agent_caps`: if it holds none of this
    /// client's flows ([`caps::FRESH`]) after an earlier link was up, every
    /// TCP connection the laptop had through the tunnel is dead at the far
    /// end; reset each on the laptop so its application fails now rather
    /// than wait (a download would wait for good). Returns how many.
    pub async fn on_agent_hello(&self, agent_caps: u32) -> usize {
        let before = self.linked.swap(true, Ordering::AcqRel);
        if !before || agent_caps & caps::FRESH == 0 {
            return 0;
        }
        let resets = self.watch.lock().map(|mut w| w.resets()).unwrap_or_default();
        let n = resets.len();
        for r in resets {
            if self.to_device.send(Bytes::from(r)).await.is_err() {
                break;
            }
        }
        if n > 0 {
            self.flows_reset.fetch_add(n as u64, Ordering::Relaxed);
            tracing::warn!("the ec2-agent holds none of this tunnel's connections (it restarted, the tunnel was away past its grace period, or this is another instance): {n} TCP connections reset");
        }
        n
    }

    /// Packets and bytes sent and received by all members.
    pub fn totals(&self) -> ((u64, u64), (u64, u64)) {
        let add = |a: (u64, u64), b: (u64, u64)| (a.0 + b.0, a.1 + b.1);
        self.members.iter().fold(((0, 0), (0, 0)), |(s, r), m| (add(s, m.sent.read()), add(r, m.received.read())))
    }
}

/// The device's side of the tunnel, for its whole life (while members come and
/// go): packets the OS routes in go to the queue (DNS for other domains is
/// answered right here), the agent's packets go out through the device, the
/// reorder timer skips gaps, and the reorder bound follows the members' RTTs.
/// Dropping the result stops it all.
pub fn serve_device<D: Device>(device: Arc<D>, config: &ClientConfig, handle: &Arc<ClientHandle>) -> DeviceTasks {
    let dev = device.clone();
    let queue = handle.queue.clone();
    let dns = config.dns.clone();
    let h = handle.clone();
    let tun_reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            match dev.recv(&mut buf).await {
                Ok(0) => continue,
                Ok(n) => match dns.as_ref().map(|d| d.inspect(&buf[..n])) {
                    Some(Verdict::Answer(reply)) => {
                        if !reply.is_empty() {
                            if let Err(e) = dev.send(&reply).await {
                                tracing::debug!("the device refused a DNS answer: {e}");
                            }
                        }
                    }
                    _ => {
                        if let Ok(mut w) = h.watch.lock() {
                            w.observe(&buf[..n]);
                        }
                        queue.push(Bytes::copy_from_slice(&buf[..n]));
                    }
                },
                Err(e) => {
                    tracing::error!("reading the tunnel device failed: {e}");
                    return;
                }
            }
        }
    });
    let mut from_links = handle.from_links.lock().ok().and_then(|mut r| r.take());
    let tun_writer = tokio::spawn(async move {
        let Some(rx) = from_links.as_mut() else { return };
        while let Some(p) = rx.recv().await {
            if let Err(e) = device.send(&p).await {
                tracing::debug!("the device refused a packet: {e}");
            }
        }
    });
    let (reseq, sink) = (handle.reseq.clone(), handle.sink());
    let expiry = tokio::spawn(async move { reseq.expire(sink).await });
    let h = handle.clone();
    let bound = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            if let Some(bound) = stripe::bound_for_micros(h.members.iter().map(|m| m.rtt_us.load(Ordering::Relaxed))) {
                h.reseq.set_bound(bound);
            }
        }
    });
    DeviceTasks {
        _tasks: AbortOnDrop(vec![
            tun_reader.abort_handle(),
            tun_writer.abort_handle(),
            expiry.abort_handle(),
            bound.abort_handle(),
        ]),
    }
}

/// The tasks [`serve_device`] started; dropped, they stop.
pub struct DeviceTasks {
    _tasks: AbortOnDrop,
}

/// Exchange HELLOs over a fresh stream.
pub async fn handshake(
    reader: &mut impl Inlet,
    writer: &mut impl Outlet,
    config: &ClientConfig,
    mtu: u16,
) -> Result<(Hello, Deframer), HandshakeError> {
    let hello = Hello {
        version: wire::VERSION,
        role: Role::Client,
        caps: config.caps,
        mtu,
        client_id: config.client_id,
        software: config.software.clone(),
        resolvers: Vec::new(),
        dns: config.dns.as_ref().map(|d| d.addresses().to_vec()).unwrap_or_default(),
        vpc: None,
        dns_domains: config
            .dns
            .as_ref()
            .map(|d| d.domains().iter().map(|d| d.as_str().to_owned()).collect())
            .unwrap_or_default(),
    };
    let exchange = async {
        link::write_frame(writer, &Frame::Hello(hello)).await.map_err(|e| HandshakeError::Protocol(e.to_string()))?;
        match link::read_hello(reader).await {
            Ok((h, d)) if h.role == Role::Agent && h.version == wire::VERSION => Ok((h, d)),
            Ok((h, _)) => Err(HandshakeError::Protocol(format!("agent HELLO version {} role {:?}", h.version, h.role))),
            Err(LinkEnd::Goodbye { reason, message }) => Err(HandshakeError::Refused(reason, message)),
            Err(e) => Err(HandshakeError::Protocol(e.to_string())),
        }
    };
    tokio::time::timeout(config.hello_timeout, exchange)
        .await
        .map_err(|_| HandshakeError::Timeout(config.hello_timeout))?
}

/// Why [`run`] is asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The tunnel ends: the agent is told (GOODBYE) and drops our flows.
    Goodbye,
    /// The link is being replaced: no GOODBYE, so the agent keeps our flows for
    /// the next link (its grace period).
    Abandon,
}

/// Carry packets between the tunnel (its queue and [`serve_device`]) and the
/// stream of member `member` until the stream ends or `shutdown` completes (with
/// a GOODBYE or not, as it says). `agent` is the HELLO [`handshake`] returned.
/// Returns how the link ended (`None`: shutdown).
pub async fn run<R, W>(
    reader: R,
    writer: W,
    (agent, deframer): (Hello, Deframer),
    config: &ClientConfig,
    handle: Arc<ClientHandle>,
    member: usize,
    shutdown: impl Future<Output = Stop>,
) -> Option<LinkEnd>
where
    R: Inlet,
    W: Outlet + 'static,
{
    handle.on_agent_hello(agent.caps).await;
    let epoch = Instant::now();
    let stats = handle.members[member.min(handle.members.len() - 1)].clone();
    let lane = Lane::new(config.caps, agent.caps);
    let (ctl_tx, ctl_rx) = mpsc::channel::<Frame>(64);
    let writer_task =
        tokio::spawn(link::write_loop(handle.queue.clone(), lane.clone(), ctl_rx, writer, config.batch, stats.clone()));
    let pinger = tokio::spawn(link::ping_loop(ctl_tx.clone(), config.ping_every, epoch));
    // Dropped before its end (its caller gave up on the link), run leaves no task behind.
    let _tasks = AbortOnDrop(vec![writer_task.abort_handle(), pinger.abort_handle()]);
    let (reseq, mut sink) = (handle.reseq.clone(), handle.sink());
    let on_packet = move |seq, p| reseq.deliver(seq, p, &mut sink);
    let reading = link::read_loop(reader, deframer, on_packet, ctl_tx, lane.clone(), stats, epoch);

    let (ended, stop) = tokio::select! {
        end = reading => (Some(end), Stop::Goodbye),
        stop = shutdown => (None, stop),
    };
    pinger.abort();
    match stop {
        Stop::Goodbye => lane.close(),
        Stop::Abandon => lane.abandon(),
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), writer_task).await;
    // What this member's gap held back is not waited for.
    handle.reseq.flush(&mut handle.sink());
    ended
}

struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}
