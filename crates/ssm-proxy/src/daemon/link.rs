//! The laptop side: packets the OS routes into the tunnel device go through an
//! FQ-CoDel queue into the stream to the ec2-agent; packets from the agent are
//! written back into the device.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tunnel::Device;

use forwarder::dns::{SplitDns, Verdict};
use forwarder::fq::FqConfig;
use forwarder::link::{self, Inlet, LinkEnd, LinkStats, Outlet, TxQueue};
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

/// Everything a running forwarder exposes.
#[derive(Debug)]
pub struct ClientHandle {
    pub stats: Arc<LinkStats>,
    pub queue: Arc<TxQueue>,
    /// Packets from the agent dropped because the device could not take them.
    pub device_drops: AtomicU64,
}

impl ClientHandle {
    pub fn new(config: &ClientConfig) -> Arc<Self> {
        Arc::new(ClientHandle {
            stats: Arc::new(LinkStats::default()),
            queue: TxQueue::new(config.fq),
            device_drops: AtomicU64::new(0),
        })
    }
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

/// Carry packets between `device` and the stream until either ends or `shutdown`
/// completes (with a GOODBYE or not, as it says). `agent` is the HELLO
/// [`handshake`] returned. The handle's queue outlives the call: run it again on
/// a new link to carry on. Returns how the link ended (`None`: shutdown).
#[allow(clippy::too_many_arguments)]
pub async fn run<D, R, W>(
    device: Arc<D>,
    reader: R,
    writer: W,
    (agent, deframer): (Hello, Deframer),
    config: &ClientConfig,
    handle: Arc<ClientHandle>,
    shutdown: impl Future<Output = Stop>,
) -> Option<LinkEnd>
where
    D: Device,
    R: Inlet,
    W: Outlet + 'static,
{
    let epoch = Instant::now();
    // The queue outlives links: a new link after a reconnect starts afresh.
    handle.queue.reopen(config.caps, agent.caps);
    let (ctl_tx, ctl_rx) = mpsc::channel::<Frame>(64);
    let writer_task =
        tokio::spawn(link::write_loop(handle.queue.clone(), ctl_rx, writer, config.batch, handle.stats.clone()));
    let pinger = tokio::spawn(link::ping_loop(ctl_tx.clone(), config.ping_every, epoch));

    // Device -> queue (DNS for other domains is answered right here).
    let dev = device.clone();
    let queue = handle.queue.clone();
    let dns = config.dns.clone();
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
                    _ => queue.push(Bytes::copy_from_slice(&buf[..n])),
                },
                Err(e) => {
                    tracing::error!("reading the tunnel device failed: {e}");
                    return;
                }
            }
        }
    });

    // Stream -> device, through a bounded hand-off so a slow device cannot stall acks.
    let (dev_tx, mut dev_rx) = mpsc::channel::<Bytes>(1024);
    let dev = device.clone();
    let tun_writer = tokio::spawn(async move {
        while let Some(p) = dev_rx.recv().await {
            if let Err(e) = dev.send(&p).await {
                tracing::debug!("the device refused a packet: {e}");
            }
        }
    });
    // Dropped before its end (its caller gave up on the link), run leaves no task behind.
    let _tasks = AbortOnDrop(vec![
        writer_task.abort_handle(),
        pinger.abort_handle(),
        tun_reader.abort_handle(),
        tun_writer.abort_handle(),
    ]);
    let h = handle.clone();
    let on_packet = move |p: Bytes| {
        if dev_tx.try_send(p).is_err() {
            h.device_drops.fetch_add(1, Ordering::Relaxed);
        }
    };
    let reading =
        link::read_loop(reader, deframer, on_packet, ctl_tx, handle.queue.clone(), handle.stats.clone(), epoch);

    let (ended, stop) = tokio::select! {
        end = reading => (Some(end), Stop::Goodbye),
        stop = shutdown => (None, stop),
    };
    pinger.abort();
    tun_reader.abort();
    match stop {
        Stop::Goodbye => handle.queue.close(),
        Stop::Abandon => handle.queue.abandon(),
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), writer_task).await;
    tun_writer.abort();
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
