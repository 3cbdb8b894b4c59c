//! One end of the packet link, shared by the forwarder and the ec2-agent: a
//! [`TxQueue`] (FQ-CoDel) drained by [`write_loop`] into the stream, and
//! [`read_loop`] turning the stream back into packets. PING/PONG measure the RTT.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

use crate::fq::{FqCodel, FqConfig, QueueStats};
use crate::wire::{self, Deframer, Frame, Reason, WireError};

/// Counters of one direction.
#[derive(Debug, Default)]
pub struct Direction {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
}

impl Direction {
    pub fn add(&self, bytes: usize) {
        self.packets.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Packets and bytes so far.
    pub fn read(&self) -> (u64, u64) {
        (self.packets.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed))
    }
}

/// Live counters of one link end, readable at any time (for `status`).
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Packets written into the stream.
    pub sent: Direction,
    /// Packets read from the stream.
    pub received: Direction,
    /// Latest round-trip time of a PING, in microseconds (0 = none yet).
    pub rtt_us: AtomicU64,
}

/// Packets waiting to enter the stream.
#[derive(Debug)]
pub struct TxQueue {
    fq: Mutex<FqCodel>,
    ready: Notify,
    closed: AtomicBool,
}

impl TxQueue {
    pub fn new(config: FqConfig) -> Arc<Self> {
        Arc::new(TxQueue { fq: Mutex::new(FqCodel::new(config)), ready: Notify::new(), closed: AtomicBool::new(false) })
    }

    fn lock(&self) -> MutexGuard<'_, FqCodel> {
        self.fq.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn push(&self, packet: Bytes) {
        self.lock().enqueue(Instant::now(), packet);
        self.ready.notify_one();
    }

    pub fn stats(&self) -> QueueStats {
        self.lock().stats()
    }

    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes()
    }

    /// Wake the writer so it sends GOODBYE and stops.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_one();
    }
}

/// Write queued packets (coalesced, at most `batch` bytes per write) and control
/// frames into `writer` until the queue is closed; then a GOODBYE.
pub async fn write_loop<W: AsyncWrite + Unpin>(
    queue: Arc<TxQueue>,
    mut control: mpsc::Receiver<Frame>,
    mut writer: W,
    batch: usize,
    stats: Arc<LinkStats>,
) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(batch + wire::MAX_BODY);
    loop {
        out.clear();
        while let Ok(f) = control.try_recv() {
            wire::encode(&f, &mut out);
        }
        {
            let mut fq = queue.lock();
            let now = Instant::now();
            while out.len() < batch {
                let Some(p) = fq.dequeue(now) else { break };
                stats.sent.add(p.len());
                wire::encode_packet(&p, &mut out);
            }
        }
        if !out.is_empty() {
            writer.write_all(&out).await?;
            writer.flush().await?;
            continue;
        }
        if queue.closed.load(Ordering::Acquire) {
            out.clear();
            wire::encode(&Frame::Goodbye { reason: Reason::Normal, message: "closing".into() }, &mut out);
            let _ = writer.write_all(&out).await;
            let _ = writer.flush().await;
            return Ok(());
        }
        tokio::select! {
            () = queue.ready.notified() => {}
            f = control.recv() => match f {
                Some(f) => {
                    out.clear();
                    wire::encode(&f, &mut out);
                    writer.write_all(&out).await?;
                    writer.flush().await?;
                }
                None => {
                    // Control side gone: finish what is queued, then stop.
                    queue.close();
                }
            },
        }
    }
}

/// How a link ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkEnd {
    #[error("the peer said goodbye ({reason:?}: {message})")]
    Goodbye { reason: Reason, message: String },
    #[error("the stream ended")]
    Eof,
    #[error("the stream failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer sent garbage: {0}")]
    Wire(#[from] WireError),
    #[error("the peer sent a second HELLO")]
    UnexpectedHello,
}

/// Read frames until the stream ends: packets go to `on_packet`, PINGs are answered
/// through `control`, PONGs update the RTT.
pub async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: R,
    mut deframer: Deframer,
    mut on_packet: impl FnMut(Bytes),
    control: mpsc::Sender<Frame>,
    stats: Arc<LinkStats>,
    epoch: Instant,
) -> LinkEnd {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        loop {
            match deframer.next_frame() {
                Ok(None) => break,
                Ok(Some(Frame::Packet(p))) => {
                    stats.received.add(p.len());
                    on_packet(p);
                }
                Ok(Some(Frame::Ping(t))) => {
                    let _ = control.try_send(Frame::Pong(t));
                }
                Ok(Some(Frame::Pong(t))) => {
                    let now = epoch.elapsed().as_micros() as u64;
                    stats.rtt_us.store(now.saturating_sub(t).max(1), Ordering::Relaxed);
                }
                Ok(Some(Frame::Goodbye { reason, message })) => return LinkEnd::Goodbye { reason, message },
                Ok(Some(Frame::Hello(_))) => return LinkEnd::UnexpectedHello,
                Err(e) => return LinkEnd::Wire(e),
            }
        }
        match reader.read(&mut buf).await {
            Ok(0) => return LinkEnd::Eof,
            Ok(n) => deframer.push(&buf[..n]),
            Err(e) => return LinkEnd::Io(e),
        }
    }
}

/// Send a PING every `every`, stamped with microseconds since `epoch`.
pub async fn ping_loop(control: mpsc::Sender<Frame>, every: Duration, epoch: Instant) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if control.send(Frame::Ping(epoch.elapsed().as_micros() as u64)).await.is_err() {
            return;
        }
    }
}

/// Read frames until a HELLO (the first frame must be one). Returns it and the
/// deframer holding whatever followed it.
pub async fn read_hello<R: AsyncRead + Unpin>(reader: &mut R) -> Result<(wire::Hello, Deframer), LinkEnd> {
    let mut deframer = Deframer::new();
    let mut buf = [0u8; 4096];
    loop {
        match deframer.next_frame()? {
            Some(Frame::Hello(h)) => return Ok((h, deframer)),
            Some(Frame::Goodbye { reason, message }) => return Err(LinkEnd::Goodbye { reason, message }),
            Some(_) => return Err(LinkEnd::Wire(WireError::BadHello("the first frame must be HELLO"))),
            None => {}
        }
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Err(LinkEnd::Eof);
        }
        deframer.push(&buf[..n]);
    }
}

/// Write one frame by itself (HELLO, GOODBYE).
pub async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, frame: &Frame) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    wire::encode(frame, &mut out);
    writer.write_all(&out).await?;
    writer.flush().await
}
