//! One end of the packet link, shared by the forwarder and the ec2-agent: a
//! [`TxQueue`] (FQ-CoDel) drained by [`write_loop`] into the stream, and
//! [`read_loop`] turning the stream back into packets. PING/PONG measure the RTT.
//! When both ends announce [`caps::ACK`], each acknowledges the PACKET bytes it has
//! read and each writer keeps its bytes in flight within a [`Window`].
//!
//! An end reads from an [`Inlet`] and writes into an [`Outlet`]: a byte stream
//! ([`Stream`]: the agent's TCP socket) or, on the laptop, the queues into the
//! SSM session driver of the same process ([`mpsc`] channels of chunks), so a
//! packet goes from the tunnel device into the session without another task or
//! an in-memory pipe between them.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

use crate::fq::{FqCodel, FqConfig, QueueStats};
use crate::timer::LazyTimer;
use crate::window::{Window, ACK_DELAY, ACK_EVERY};
use crate::wire::{self, caps, Deframer, Frame, Reason, WireError};

/// Where an end's writer puts its frames.
pub trait Outlet: Send {
    /// Hands over `bytes` (whole frames), waiting while the other side is full.
    fn put(&mut self, bytes: Bytes) -> impl Future<Output = std::io::Result<()>> + Send;
}

/// Where an end's reader gets the peer's bytes.
pub trait Inlet: Send {
    /// Appends the next bytes that arrive to `deframer`; `Ok(false)` when the
    /// stream has ended.
    fn fill(&mut self, deframer: &mut Deframer) -> impl Future<Output = std::io::Result<bool>> + Send;
}

/// A byte stream as an [`Inlet`] (reading half) or [`Outlet`] (writing half).
#[derive(Debug)]
pub struct Stream<T> {
    io: T,
    buf: Vec<u8>,
}

impl<T> Stream<T> {
    pub fn new(io: T) -> Self {
        Stream { io, buf: Vec::new() }
    }
}

impl<W: AsyncWrite + Unpin + Send> Outlet for Stream<W> {
    async fn put(&mut self, bytes: Bytes) -> std::io::Result<()> {
        self.io.write_all(&bytes).await?;
        self.io.flush().await
    }
}

impl<R: AsyncRead + Unpin + Send> Inlet for Stream<R> {
    async fn fill(&mut self, deframer: &mut Deframer) -> std::io::Result<bool> {
        if self.buf.is_empty() {
            self.buf = vec![0u8; READ_CHUNK];
        }
        let n = self.io.read(&mut self.buf).await?;
        deframer.push(&self.buf[..n]);
        Ok(n > 0)
    }
}

/// Most bytes a [`Stream`] reads at once.
const READ_CHUNK: usize = 64 * 1024;

/// Chunks for a consumer in the same process (the session driver), each
/// handed over as is.
impl Outlet for mpsc::Sender<Bytes> {
    async fn put(&mut self, bytes: Bytes) -> std::io::Result<()> {
        self.send(bytes).await.map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the session ended"))
    }
}

/// Chunks from a producer in the same process (the session driver); the
/// channel's end is the stream's.
impl Inlet for mpsc::Receiver<Vec<u8>> {
    async fn fill(&mut self, deframer: &mut Deframer) -> std::io::Result<bool> {
        match self.recv().await {
            Some(chunk) => {
                deframer.push(&chunk);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

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
    /// The send window in bytes (0 = the peer does not acknowledge).
    pub window: AtomicU64,
    /// Bytes sent and not yet acknowledged.
    pub in_flight: AtomicU64,
    /// The send window's delivery-rate estimate, bytes per second (0 = none).
    pub rate: AtomicU64,
    /// The send window's minimum RTT (write to ack), microseconds (0 = none).
    pub min_rtt_us: AtomicU64,
    /// Reads that returned data: unchanging while PINGs go out means the peer
    /// stopped answering.
    pub reads: AtomicU64,
}

/// One connection's share of the link: its acknowledgements, its writer's
/// wake-ups and its end. A striped link has several lanes draining one
/// [`TxQueue`]; a plain link has one (a new one for each connection).
#[derive(Debug)]
pub struct Lane {
    ready: Notify,
    closed: AtomicBool,
    /// Closed without GOODBYE (the connection is being replaced, not ended).
    quiet: AtomicBool,
    /// Both ends acknowledge.
    acks: bool,
    /// Both ends stripe: packets go as SEQ frames.
    striped: bool,
    /// PACKET bytes the peer has acknowledged (updated by the reader).
    peer_acked: AtomicU64,
    /// PACKET bytes read from the peer, to acknowledge (updated by the reader).
    received: AtomicU64,
    /// Queued bytes this lane's writer wants waiting for it (its rate times HOLD).
    hold: AtomicUsize,
    /// What a packet this writer sent now would wait behind: its bytes in
    /// flight; `u64::MAX` when its window has no room even for a sparse
    /// packet. Of several lanes, the one with the least sends the sparse flows.
    /// (Bytes, not bytes over the rate estimate: the members of a striped
    /// link are alike, and the rate estimates of paced paths differ by more
    /// than their true rates do.)
    ahead: AtomicU64,
}

impl Lane {
    /// A lane whose features are what both HELLOs' capabilities share.
    pub fn new(ours: u32, theirs: u32) -> Arc<Lane> {
        let both = ours & theirs;
        Arc::new(Lane {
            ready: Notify::new(),
            closed: AtomicBool::new(false),
            quiet: AtomicBool::new(false),
            acks: both & caps::ACK != 0,
            striped: both & caps::STRIPE != 0,
            peer_acked: AtomicU64::new(0),
            received: AtomicU64::new(0),
            hold: AtomicUsize::new(0),
            ahead: AtomicU64::new(0),
        })
    }

    pub fn acks(&self) -> bool {
        self.acks
    }

    pub fn striped(&self) -> bool {
        self.striped
    }

    /// Wake the writer so it sends GOODBYE and stops.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_one();
    }

    /// Stop the writer without GOODBYE: the peer is to treat the connection as
    /// lost (and keep its flows for us), not as ended.
    pub fn abandon(&self) {
        self.quiet.store(true, Ordering::Release);
        self.close();
    }
}

/// What the queue's lock guards.
#[derive(Debug)]
struct Inner {
    fq: FqCodel,
    /// The lanes whose writers drain the queue: each is woken by a new packet.
    lanes: Vec<Arc<Lane>>,
    /// The number of the next packet of each flow bucket a striped lane takes.
    next_seq: Vec<u32>,
    /// Turns taken by the lanes that tie for the sparse flows (see [`sends_sparse`]).
    sparse_turn: usize,
}

/// Packets waiting to enter the stream (or, striped, any of the streams).
#[derive(Debug)]
pub struct TxQueue {
    inner: Mutex<Inner>,
    /// Queued bytes above which [`TxQueue::has_room`] says no (the sum of the
    /// lanes' holds, from their writers' rate estimates).
    limit: AtomicUsize,
    /// The sum of the attached lanes' holds.
    holds: AtomicUsize,
    /// A producer found no room and waits for [`TxQueue::room`].
    blocked: AtomicBool,
    space: Notify,
    /// The start of the lanes' drain schedule ([`drain_turn`]).
    epoch: Instant,
}

impl TxQueue {
    pub fn new(config: FqConfig) -> Arc<Self> {
        Arc::new(TxQueue {
            inner: Mutex::new(Inner {
                fq: FqCodel::new(config),
                lanes: Vec::new(),
                next_seq: Vec::new(),
                sparse_turn: 0,
            }),
            limit: AtomicUsize::new(usize::MAX),
            holds: AtomicUsize::new(0),
            blocked: AtomicBool::new(false),
            space: Notify::new(),
            epoch: Instant::now(),
        })
    }

    /// For producers that can hold their packets back (the agent's TCP stack):
    /// whether the queue wants more now. Holding back instead of queueing keeps
    /// CoDel from dropping what a local sender would only have to resend; such a
    /// producer waits for [`TxQueue::room`] after a `false`.
    pub fn has_room(&self) -> bool {
        if self.queued_bytes() < self.limit.load(Ordering::Relaxed) {
            return true;
        }
        self.blocked.store(true, Ordering::Release);
        false
    }

    /// Queued bytes above which [`TxQueue::has_room`] says no (the writers set
    /// it from their rate estimates; `usize::MAX` until then, and without acks).
    pub fn set_limit(&self, bytes: usize) {
        self.limit.store(bytes, Ordering::Relaxed);
    }

    /// Completes once a writer has taken packets after [`TxQueue::has_room`]
    /// said no.
    pub async fn room(&self) {
        self.space.notified().await;
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `lane`'s writer drains this queue from now on (until [`TxQueue::detach`]).
    pub fn attach(&self, lane: &Arc<Lane>) {
        self.lock().lanes.push(lane.clone());
    }

    pub fn detach(&self, lane: &Arc<Lane>) {
        self.lock().lanes.retain(|l| !Arc::ptr_eq(l, lane));
        let old = lane.hold.swap(0, Ordering::Relaxed);
        let holds = self.holds.fetch_sub(old, Ordering::Relaxed) - old;
        if holds > 0 {
            self.set_limit(holds);
        }
    }

    /// Writers draining the queue.
    pub fn lanes(&self) -> usize {
        self.lock().lanes.len()
    }

    /// Whether it is `lane`'s turn to drain its window at `now` (of several
    /// striped lanes; see [`drain_turn`]).
    fn drains(&self, lane: &Arc<Lane>, now: Instant, overlap: Duration) -> bool {
        let g = self.lock();
        match g.lanes.iter().position(|l| Arc::ptr_eq(l, lane)) {
            Some(i) if g.lanes.len() > 1 => drain_turn(i, g.lanes.len(), now - self.epoch, overlap),
            _ => false,
        }
    }

    fn wake_lanes(inner: &Inner) {
        for l in &inner.lanes {
            l.ready.notify_one();
        }
    }

    pub fn push(&self, packet: Bytes) {
        let mut g = self.lock();
        g.fq.enqueue(Instant::now(), packet);
        Self::wake_lanes(&g);
    }

    /// [`TxQueue::push`] for a producer that holds back when [`TxQueue::has_room`]
    /// says no: CoDel does not drop its packets (see [`FqCodel::enqueue_held`]).
    pub fn push_held(&self, packet: Bytes) {
        let mut g = self.lock();
        g.fq.enqueue_held(Instant::now(), packet);
        Self::wake_lanes(&g);
    }

    pub fn stats(&self) -> QueueStats {
        self.lock().fq.stats()
    }

    pub fn queued_bytes(&self) -> usize {
        self.lock().fq.bytes()
    }

    /// Publishes `lane`'s hold and makes the limit the sum of all lanes'.
    /// (The sum is kept as lanes change their holds, so the writer's hot path
    /// takes no lock for it.)
    fn set_hold(&self, lane: &Lane, hold: usize) {
        let old = lane.hold.swap(hold, Ordering::Relaxed);
        // Add before subtracting: the sum never dips below zero.
        let total = self.holds.fetch_add(hold, Ordering::Relaxed) + hold - old;
        self.holds.fetch_sub(old, Ordering::Relaxed);
        self.set_limit(total);
    }
}

/// Detaches a writer's lane from its queue however the writer ends.
struct Attached<'a>(&'a TxQueue, &'a Arc<Lane>);

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        self.0.detach(self.1);
    }
}

/// Write queued packets (coalesced, at most `batch` bytes per write) and control
/// frames into `writer` until `lane` is closed; then a GOODBYE. With acks on,
/// an ACK goes out whenever more has been read, and packets only while the
/// window has room. Striped, every packet taken gets its flow bucket's next number.
pub async fn write_loop(
    queue: Arc<TxQueue>,
    lane: Arc<Lane>,
    mut control: mpsc::Receiver<Frame>,
    mut writer: impl Outlet,
    batch: usize,
    stats: Arc<LinkStats>,
) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(batch + wire::MAX_BODY);
    queue.attach(&lane);
    let _attached = Attached(&queue, &lane);
    let acks = lane.acks;
    let mut acking =
        Acking { window: Window::new(Instant::now(), batch), ack_sent: 0, ack_due: None, logged: Instant::now() };
    let mut ack_timer = LazyTimer::new();
    loop {
        // `out` is empty here (every write takes all of it), or holds the
        // control frame the wait below took: it goes out with the rest.
        while let Ok(f) = control.try_recv() {
            wire::encode(&f, &mut out);
        }
        let now = Instant::now();
        let room = if acks {
            if !acking.window.on_ack(lane.peer_acked.load(Ordering::Acquire), now) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the peer acknowledged more than was sent",
                ));
            }
            if lane.striped {
                let overlap = drain_overlap(acking.window.min_rtt());
                acking.window.set_drain(queue.drains(&lane, now, overlap));
            }
            let write = write_size(acking.window.rate(), batch);
            acking.window.set_slack(write);
            acking.publish_ahead(&lane);
            acking.window.available().min(write)
        } else {
            batch
        };
        // With the window full, a sparse flow's packet (a ping, a DNS query, a
        // keystroke) need not wait for the bulk's acks.
        let take = if room > 0 {
            Some((room, Take::Any))
        } else if acks && acking.window.in_flight() < (acking.window.cwnd() + SPARSE_EXTRA) as u64 {
            Some((SPARSE_EXTRA, Take::Sparse))
        } else {
            None
        };
        let packet_bytes = match take {
            Some((limit, what)) => take_packets(&queue, &lane, limit, what, now, &stats, &mut out),
            None => 0,
        };
        if packet_bytes > 0 && queue.blocked.swap(false, Ordering::AcqRel) {
            queue.space.notify_one();
        }
        if acks {
            acking.after_send(&queue, &lane, &stats, packet_bytes, now, &mut out);
        }
        if !out.is_empty() {
            if acks {
                // Until the write is taken, this lane takes no sparse packets.
                lane.ahead.store(u64::MAX, Ordering::Relaxed);
            }
            writer.put(out.split().freeze()).await?;
            continue;
        }
        if lane.closed.load(Ordering::Acquire) {
            if lane.quiet.load(Ordering::Acquire) {
                return Ok(());
            }
            out.clear();
            wire::encode(&Frame::Goodbye { reason: Reason::Normal, message: "closing".into() }, &mut out);
            let _ = writer.put(out.split().freeze()).await;
            return Ok(());
        }
        ack_timer.arm(acking.ack_due);
        tokio::select! {
            () = lane.ready.notified() => {}
            () = ack_timer.fired() => {}
            f = control.recv() => match f {
                Some(f) => wire::encode(&f, &mut out),
                None => {
                    // Control side gone: stop.
                    lane.close();
                }
            },
        }
    }
}

/// What a writer may take from the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Take {
    /// Sparse flows first, then the bulk (deficit round robin).
    Any,
    /// Only sparse flows' packets (the window is full).
    Sparse,
}

/// Frames up to `limit` bytes of packets taken from `queue` into `out` (SEQ
/// frames, numbered per flow bucket, when `lane` stripes); their bytes. Of
/// several striped lanes, only the one with the least ahead takes sparse
/// flows' packets; the others take only the bulk.
fn take_packets(
    queue: &TxQueue,
    lane: &Lane,
    limit: usize,
    what: Take,
    now: Instant,
    stats: &LinkStats,
    out: &mut BytesMut,
) -> usize {
    let mut packet_bytes = 0;
    let mut g = queue.lock();
    let sparse_here = !lane.striped || g.lanes.len() < 2 || sends_sparse(&g.lanes, g.sparse_turn, lane);
    if sparse_here && g.lanes.len() > 1 && g.fq.has_sparse() {
        g.sparse_turn = g.sparse_turn.wrapping_add(1);
    }
    let next: fn(&mut FqCodel, Instant) -> Option<Bytes> = match (what, sparse_here) {
        (Take::Any, true) => FqCodel::dequeue,
        // Only the bulk: the sparse flows wait for their lane, which has room
        // for them (else its `ahead` is `u64::MAX` and another lane is theirs)
        // and was woken with this one. Taking them here when no bulk waits
        // put a ping behind a full window now and then (1-3% of pings under a
        // download, 55-70 ms where the drained lane gave 45 at 40 ms RTT).
        (Take::Any, false) if lane.acks => FqCodel::dequeue_bulk,
        // Without acks no lane publishes what is ahead of it (all tie at 0),
        // so none is known to have room: the bulk, or whatever waits.
        (Take::Any, false) => |fq, now| fq.dequeue_bulk(now).or_else(|| fq.dequeue(now)),
        (Take::Sparse, true) => FqCodel::dequeue_sparse,
        (Take::Sparse, false) => return 0,
    };
    while packet_bytes < limit {
        let Some(p) = next(&mut g.fq, now) else { break };
        stats.sent.add(p.len());
        if lane.striped {
            let flow = g.fq.last_bucket();
            if g.next_seq.len() <= flow {
                let n = g.fq.buckets();
                g.next_seq.resize(n.max(flow + 1), 0);
            }
            let seq = g.next_seq[flow];
            g.next_seq[flow] = seq.wrapping_add(1);
            packet_bytes += wire::HEADER_LEN + wire::SEQ_LEN + p.len();
            wire::encode_seq_packet(flow as u16, seq, &p, out);
        } else {
            packet_bytes += wire::HEADER_LEN + p.len();
            wire::encode_packet(&p, out);
        }
    }
    packet_bytes
}

/// Whether `lane` is the one of `lanes` to send sparse flows' packets: the
/// one whose next packet would wait behind the least, counted in whole
/// packets ([`AHEAD_UNIT`]); lanes that tie take turns (`turn`), so that
/// when none is loaded (the laptop's side of a download, where the laptop's
/// TCP ACKs are a sparse flow while they stay light, FQ-CoDel's rule) each
/// carries some packets for the peer's link acknowledgements to ride on.
fn sends_sparse(lanes: &[Arc<Lane>], turn: usize, lane: &Lane) -> bool {
    let n = lanes.len();
    let best = (0..n).min_by_key(|&i| (lanes[i].ahead.load(Ordering::Relaxed) / AHEAD_UNIT, (i + n - turn % n) % n));
    best.is_some_and(|i| std::ptr::eq(Arc::as_ptr(&lanes[i]), lane))
}

/// Bytes in flight that count as one packet ahead.
const AHEAD_UNIT: u64 = 1500;

/// How long each of several striped lanes drains its window in turn.
const DRAIN_SLOT: Duration = Duration::from_millis(100);

/// Whether lane `index` of `count` drains at `since` the schedule's start:
/// each drains for one [`DRAIN_SLOT`] in turn, and starts `overlap` before
/// its turn, so that its queue has emptied when the lane before it stops.
/// Some lane (at most two) is always draining, and the sparse flows go
/// through it, past the bulk's queues (SPECIFICATION.md §6.5).
fn drain_turn(index: usize, count: usize, since: Duration, overlap: Duration) -> bool {
    if count < 2 {
        return false;
    }
    let slot = DRAIN_SLOT.as_micros();
    let (turn, into) = ((since.as_micros() / slot) as usize % count, since.as_micros() % slot);
    index == turn || (index == (turn + 1) % count && into + overlap.as_micros() >= slot)
}

/// How long before its turn a lane starts to drain: long enough for the
/// queue its full window built to empty, at most half a slot. That queue is
/// a quarter RTT, 1 ms and a write at the rate *maximum*; a paced session
/// delivers less (1.0 against 1.25 MB/s for a stock session at 40 ms RTT,
/// where it is 29 ms), so one RTT and 5 ms: with half an RTT, pings sent
/// just after a turn waited for the rest (two sessions at 40 ms: p90 under a
/// download 54 ms, now 47; idle 44).
fn drain_overlap(min_rtt: Option<Duration>) -> Duration {
    (min_rtt.unwrap_or_default() + Duration::from_millis(5)).min(DRAIN_SLOT / 2)
}

/// The writer's half of acknowledgements: the send window, and when to
/// acknowledge what the reader has read.
struct Acking {
    window: Window,
    ack_sent: u64,
    /// A bare ACK waits up to [`ACK_DELAY`] for data to ride on (the
    /// request/response case), unless [`ACK_EVERY`] bytes are unacknowledged.
    ack_due: Option<Instant>,
    logged: Instant,
}

impl Acking {
    /// Publishes how much a packet sent now would wait behind ([`Lane::ahead`]).
    fn publish_ahead(&self, lane: &Lane) {
        let w = &self.window;
        let ahead = if w.in_flight() >= (w.cwnd() + SPARSE_EXTRA) as u64 { u64::MAX } else { w.in_flight() };
        lane.ahead.store(ahead, Ordering::Relaxed);
    }

    /// After `packet_bytes` went into `out`: account them to the window,
    /// publish the window's figures, and add an ACK to `out` if one is due.
    fn after_send(
        &mut self,
        queue: &TxQueue,
        lane: &Lane,
        stats: &LinkStats,
        packet_bytes: usize,
        now: Instant,
        out: &mut BytesMut,
    ) {
        let window = &mut self.window;
        window.on_send(packet_bytes, now);
        // Let producers that can wait keep about HOLD of sending queued.
        let hold = (window.rate() * HOLD.as_secs_f64()) as usize;
        queue.set_hold(lane, hold.clamp(MIN_HOLD, MAX_HOLD));
        stats.window.store(window.cwnd() as u64, Ordering::Relaxed);
        stats.in_flight.store(window.in_flight(), Ordering::Relaxed);
        stats.rate.store(window.rate() as u64, Ordering::Relaxed);
        stats.min_rtt_us.store(window.min_rtt().map_or(0, |d| d.as_micros() as u64), Ordering::Relaxed);
        if now.duration_since(self.logged) >= Duration::from_secs(1) && packet_bytes > 0 {
            self.logged = now;
            tracing::debug!(
                window = window.cwnd(),
                in_flight = window.in_flight(),
                rate = window.rate() as u64,
                min_rtt_us = window.min_rtt().map_or(0, |d| d.as_micros() as u64),
                probing = window.probing(),
                "send window"
            );
        }
        let unacked = lane.received.load(Ordering::Acquire) - self.ack_sent;
        if unacked > 0 && (!out.is_empty() || unacked >= ACK_EVERY as u64 || self.ack_due.is_some_and(|d| now >= d)) {
            self.ack_sent += unacked;
            wire::encode(&Frame::Ack(self.ack_sent), out);
            self.ack_due = None;
        } else if unacked > 0 && self.ack_due.is_none() {
            self.ack_due = Some(now + ACK_DELAY);
        }
    }
}

/// Most bytes of packets per write at `rate` bytes/s (0: unknown): `batch`,
/// or 2 ms of sending where that is less (at least [`MIN_WRITE`]). On a path
/// paced to 1 MB/s (a session through the stock SSM agent) a 4 KiB write is
/// 4 ms of queue that a ping waits behind, and it inflates the RTT samples
/// the window is built on by as much.
fn write_size(rate: f64, batch: usize) -> usize {
    if rate <= 0.0 {
        return batch;
    }
    ((rate * WRITE_TIME.as_secs_f64()) as usize).clamp(MIN_WRITE, batch.max(MIN_WRITE))
}

const WRITE_TIME: Duration = Duration::from_millis(2);
const MIN_WRITE: usize = 2048;

/// How much sending time a producer that can wait ([`TxQueue::has_room`]) keeps
/// queued: less than CoDel's 5 ms target, so its packets are not dropped.
const HOLD: Duration = Duration::from_millis(3);
const MIN_HOLD: usize = 4096;
const MAX_HOLD: usize = 1 << 20;

/// Bytes beyond a full window that sparse flows may send.
const SPARSE_EXTRA: usize = 4096;

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

/// Read frames until the stream ends: packets go to `on_packet` (with their
/// flow bucket and number if striped), PINGs are answered through `control`, PONGs update the
/// RTT, ACKs open `lane`'s window, and what was read is acknowledged through
/// `lane`'s writer.
pub async fn read_loop(
    mut reader: impl Inlet,
    mut deframer: Deframer,
    mut on_packet: impl FnMut(Option<(u16, u32)>, Bytes),
    control: mpsc::Sender<Frame>,
    lane: Arc<Lane>,
    stats: Arc<LinkStats>,
    epoch: Instant,
) -> LinkEnd {
    let acks = lane.acks;
    loop {
        let mut read = 0u64;
        loop {
            match deframer.next_frame() {
                Ok(None) => break,
                Ok(Some(Frame::Packet(p))) => {
                    stats.received.add(p.len());
                    read += (wire::HEADER_LEN + p.len()) as u64;
                    on_packet(None, p);
                }
                Ok(Some(Frame::Seq { flow, seq, packet })) => {
                    stats.received.add(packet.len());
                    read += (wire::HEADER_LEN + wire::SEQ_LEN + packet.len()) as u64;
                    on_packet(Some((flow, seq)), packet);
                }
                Ok(Some(Frame::Ack(n))) => {
                    lane.peer_acked.fetch_max(n, Ordering::AcqRel);
                    lane.ready.notify_one();
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
                // Only ever an answer to a status query, which carries no packets.
                Ok(Some(Frame::Status(_))) => {}
                Err(e) => return LinkEnd::Wire(e),
            }
        }
        if acks && read > 0 {
            lane.received.fetch_add(read, Ordering::AcqRel);
            lane.ready.notify_one();
        }
        match reader.fill(&mut deframer).await {
            Ok(false) => return LinkEnd::Eof,
            Ok(true) => {
                stats.reads.fetch_add(1, Ordering::Relaxed);
            }
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
pub async fn read_hello(reader: &mut impl Inlet) -> Result<(wire::Hello, Deframer), LinkEnd> {
    let mut deframer = Deframer::new();
    loop {
        match deframer.next_frame()? {
            Some(Frame::Hello(h)) => return Ok((h, deframer)),
            Some(Frame::Goodbye { reason, message }) => return Err(LinkEnd::Goodbye { reason, message }),
            Some(_) => return Err(LinkEnd::Wire(WireError::BadHello("the first frame must be HELLO"))),
            None => {}
        }
        if !reader.fill(&mut deframer).await? {
            return Err(LinkEnd::Eof);
        }
    }
}

/// The next frame of `reader` after those already in `deframer`.
pub async fn read_frame(reader: &mut impl Inlet, deframer: &mut Deframer) -> Result<Frame, LinkEnd> {
    loop {
        if let Some(f) = deframer.next_frame()? {
            return Ok(f);
        }
        if !reader.fill(deframer).await? {
            return Err(LinkEnd::Eof);
        }
    }
}

/// Write one frame by itself (HELLO, GOODBYE).
pub async fn write_frame(writer: &mut impl Outlet, frame: &Frame) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    wire::encode(frame, &mut out);
    writer.put(out.freeze()).await
}

#[cfg(test)]
mod tests;
