//! FQ-CoDel (RFC 8290) for packets waiting to enter the SSM stream.
//!
//! Packets are hashed by flow (addresses, protocol, ports) into buckets served by
//! deficit round robin, new (sparse) flows first, so a ping or a keystroke overtakes
//! a bulk transfer instead of waiting behind it. Unlike RFC 8290, a flow whose
//! queue emptied counts as new again only if it has been sparse of late (under
//! two quanta in about [`SPARSE_MEMORY`]): a bulk flow that the writers keep
//! up with empties its queue between two packets many times a second, and
//! each time would pass for a new flow for one quantum. Each bucket runs CoDel (RFC 8289):
//! when packets have waited longer than `target` for a whole `interval`, it drops
//! from the head at a rising rate, which tells the bulk flow's TCP to slow down. The
//! byte limit is a last resort: it drops from the fattest bucket.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hash, Hasher};
use std::time::{Duration, Instant};

use bytes::Bytes;

#[derive(Clone, Copy, Debug)]
pub struct FqConfig {
    pub buckets: usize,
    /// Bytes a bucket may send per round.
    pub quantum: usize,
    /// CoDel's acceptable standing queue delay.
    pub target: Duration,
    /// CoDel's window: about a worst-case round-trip time.
    pub interval: Duration,
    /// Total bytes queued before overflow drops start.
    pub limit_bytes: usize,
}

impl Default for FqConfig {
    fn default() -> Self {
        FqConfig {
            buckets: 256,
            quantum: 1514,
            target: Duration::from_millis(5),
            interval: Duration::from_millis(100),
            limit_bytes: 2 << 20,
        }
    }
}

/// Counters of one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub enqueued: u64,
    pub dequeued: u64,
    pub dropped_codel: u64,
    pub dropped_overflow: u64,
    /// Queueing delay of the last packet dequeued.
    pub last_delay: Duration,
    /// Largest queueing delay seen.
    pub max_delay: Duration,
}

/// How long a flow's bytes count against its being sparse: the time constant
/// of a decaying byte count per bucket.
pub const SPARSE_MEMORY: Duration = Duration::from_millis(100);

/// A decaying count of the bytes a bucket took in.
#[derive(Debug, Default)]
struct Recent {
    bytes: f64,
    at: Option<Instant>,
}

impl Recent {
    /// The count at `now` before `len` more bytes, which it then adds.
    fn add(&mut self, now: Instant, len: usize) -> f64 {
        let dt = self.at.map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        self.bytes *= (-dt.as_secs_f64() / SPARSE_MEMORY.as_secs_f64()).exp();
        let before = self.bytes;
        self.bytes += len as f64;
        self.at = Some(now);
        before
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum List {
    New,
    Old,
}

/// Which lists a dequeue serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lists {
    Both,
    New,
    Old,
}

#[derive(Debug, Default)]
struct Codel {
    first_above: Option<Instant>,
    drop_next: Option<Instant>,
    count: u32,
    last_count: u32,
    dropping: bool,
}

#[derive(Debug, Default)]
struct Bucket {
    /// Arrival time, packet, and whether CoDel may drop it.
    packets: VecDeque<(Instant, Bytes, bool)>,
    bytes: usize,
    deficit: i64,
    list: Option<List>,
    codel: Codel,
    recent: Recent,
}

#[derive(Debug)]
pub struct FqCodel {
    config: FqConfig,
    buckets: Vec<Bucket>,
    new_flows: VecDeque<usize>,
    old_flows: VecDeque<usize>,
    bytes: usize,
    packets: usize,
    hasher: std::collections::hash_map::RandomState,
    stats: QueueStats,
    /// The bucket of the packet [`FqCodel::dequeue`] returned last.
    last: usize,
}

/// The flow a packet belongs to: IP version, addresses, protocol and, for TCP/UDP
/// (and anything else with ports up front), the ports.
fn flow_key(packet: &[u8], h: &mut impl Hasher) {
    match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => {
            let ihl = ((packet[0] & 0x0f) as usize) * 4;
            packet[9].hash(h);
            packet[12..20].hash(h);
            if let Some(ports) = packet.get(ihl..ihl + 4) {
                ports.hash(h);
            }
        }
        Some(6) if packet.len() >= 40 => {
            packet[6].hash(h);
            packet[8..40].hash(h);
            if let Some(ports) = packet.get(40..44) {
                ports.hash(h);
            }
        }
        _ => packet.get(..packet.len().min(20)).hash(h),
    }
}

impl FqCodel {
    pub fn new(config: FqConfig) -> Self {
        let buckets = (0..config.buckets.max(1)).map(|_| Bucket::default()).collect();
        FqCodel {
            config,
            buckets,
            new_flows: VecDeque::new(),
            old_flows: VecDeque::new(),
            bytes: 0,
            packets: 0,
            hasher: Default::default(),
            stats: QueueStats::default(),
            last: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.packets
    }

    pub fn is_empty(&self) -> bool {
        self.packets == 0
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// How many flow buckets there are.
    pub fn buckets(&self) -> usize {
        self.buckets.len()
    }

    /// The flow bucket of the packet dequeued last (a striped link numbers
    /// each bucket's packets on their own, so flows wait only for themselves).
    pub fn last_bucket(&self) -> usize {
        self.last
    }

    fn bucket_of(&self, packet: &[u8]) -> usize {
        let mut h = self.hasher.build_hasher();
        flow_key(packet, &mut h);
        (h.finish() % self.buckets.len() as u64) as usize
    }

    /// Queue a packet that arrived at `now`.
    pub fn enqueue(&mut self, now: Instant, packet: Bytes) {
        self.push(now, packet, true);
    }

    /// Queue a packet that CoDel must not drop: it comes from a sender that
    /// already holds back while the queue is full (the agent's own TCP stack),
    /// so its standing queue is bounded without drops, and a drop would only
    /// cost that sender a retransmission. Overflow drops still apply.
    pub fn enqueue_held(&mut self, now: Instant, packet: Bytes) {
        self.push(now, packet, false);
    }

    fn push(&mut self, now: Instant, packet: Bytes, droppable: bool) {
        let idx = self.bucket_of(&packet);
        let len = packet.len();
        let b = &mut self.buckets[idx];
        b.packets.push_back((now, packet, droppable));
        b.bytes += len;
        let recent = b.recent.add(now, len);
        if b.list.is_none() {
            b.deficit = self.config.quantum as i64;
            let sparse = recent < (2 * self.config.quantum) as f64;
            self.join(if sparse { List::New } else { List::Old }, idx);
        }
        self.bytes += len;
        self.packets += 1;
        self.stats.enqueued += 1;
        while self.bytes > self.config.limit_bytes {
            self.drop_from_fattest();
        }
    }

    fn drop_from_fattest(&mut self) {
        let Some((idx, _)) = self.buckets.iter().enumerate().max_by_key(|(_, b)| b.bytes) else { return };
        let b = &mut self.buckets[idx];
        if let Some((_, p, _)) = b.packets.pop_front() {
            b.bytes -= p.len();
            self.bytes -= p.len();
            self.packets -= 1;
            self.stats.dropped_overflow += 1;
        }
    }

    /// The next packet to send at `now`, after CoDel's drops.
    pub fn dequeue(&mut self, now: Instant) -> Option<Bytes> {
        self.next(now, Lists::Both)
    }

    /// The next packet of a new (sparse) flow, if one waits: a ping, a DNS
    /// query, a keystroke. `None` when only old (backlogged) flows have packets.
    pub fn dequeue_sparse(&mut self, now: Instant) -> Option<Bytes> {
        self.next(now, Lists::New)
    }

    /// The next packet of an old (backlogged) flow, leaving the new flows'
    /// packets for another writer (the striped member that sends them sooner).
    pub fn dequeue_bulk(&mut self, now: Instant) -> Option<Bytes> {
        self.next(now, Lists::Old)
    }

    /// Whether a new (sparse) flow has packets waiting.
    pub fn has_sparse(&self) -> bool {
        self.new_flows.iter().any(|&i| !self.buckets[i].packets.is_empty())
    }

    /// Deficit round robin over the new flows, then the old ones (of `lists`).
    fn next(&mut self, now: Instant, lists: Lists) -> Option<Bytes> {
        loop {
            // A new flow that has used its quantum is an old one, whoever asks.
            if let Some(&i) = self.new_flows.front().filter(|&&i| self.buckets[i].deficit <= 0) {
                self.spent(List::New, i);
                continue;
            }
            let (list, idx) = match (self.new_flows.front(), self.old_flows.front(), lists) {
                (Some(&i), _, Lists::Both | Lists::New) => (List::New, i),
                (None, Some(&i), Lists::Both) | (_, Some(&i), Lists::Old) => (List::Old, i),
                _ => return None,
            };
            if self.buckets[idx].deficit <= 0 {
                self.spent(list, idx);
                continue;
            }
            match self.codel_dequeue(idx, now) {
                Some(p) => {
                    self.buckets[idx].deficit -= p.len() as i64;
                    self.stats.dequeued += 1;
                    self.last = idx;
                    return Some(p);
                }
                None => {
                    self.pop_list(list);
                    if list == List::New {
                        // RFC 8290 §4.2: an emptied new flow goes to the old list once,
                        // so it cannot starve old flows by coming back as "new".
                        self.join(List::Old, idx);
                    } else {
                        self.buckets[idx].list = None;
                    }
                }
            }
        }
    }

    /// Bucket `idx`, at the front of `list`, has used its quantum: it gets
    /// another and goes to the back of the old list.
    fn spent(&mut self, list: List, idx: usize) {
        self.buckets[idx].deficit += self.config.quantum as i64;
        self.pop_list(list);
        self.join(List::Old, idx);
    }

    /// Bucket `idx` goes to the back of `list`.
    fn join(&mut self, list: List, idx: usize) {
        self.buckets[idx].list = Some(list);
        match list {
            List::New => self.new_flows.push_back(idx),
            List::Old => self.old_flows.push_back(idx),
        }
    }

    fn pop_list(&mut self, list: List) {
        match list {
            List::New => self.new_flows.pop_front(),
            List::Old => self.old_flows.pop_front(),
        };
    }

    fn take(&mut self, idx: usize, now: Instant) -> Option<(Bytes, bool)> {
        let (target, interval, mtu) = (self.config.target, self.config.interval, self.config.quantum);
        let b = &mut self.buckets[idx];
        let (ts, p, droppable) = b.packets.pop_front()?;
        b.bytes -= p.len();
        self.bytes -= p.len();
        self.packets -= 1;
        let delay = now.saturating_duration_since(ts);
        self.stats.last_delay = delay;
        self.stats.max_delay = self.stats.max_delay.max(delay);
        let c = &mut b.codel;
        let ok_to_drop = if delay < target || b.bytes <= mtu || !droppable {
            c.first_above = None;
            false
        } else {
            match c.first_above {
                None => {
                    c.first_above = Some(now + interval);
                    false
                }
                Some(t) => now >= t,
            }
        };
        Some((p, ok_to_drop))
    }

    fn control_law(&self, t: Instant, count: u32) -> Instant {
        t + self.config.interval.div_f64((count.max(1) as f64).sqrt())
    }

    fn codel_dequeue(&mut self, idx: usize, now: Instant) -> Option<Bytes> {
        let Some((mut p, ok_to_drop)) = self.take(idx, now) else {
            self.buckets[idx].codel.dropping = false;
            return None;
        };
        let interval = self.config.interval;
        if self.buckets[idx].codel.dropping {
            if !ok_to_drop {
                self.buckets[idx].codel.dropping = false;
                return Some(p);
            }
            while self.buckets[idx].codel.drop_next.is_some_and(|d| now >= d) {
                self.stats.dropped_codel += 1;
                self.buckets[idx].codel.count += 1;
                let Some((next, ok)) = self.take(idx, now) else {
                    self.buckets[idx].codel.dropping = false;
                    return None;
                };
                p = next;
                if !ok {
                    self.buckets[idx].codel.dropping = false;
                    return Some(p);
                }
                let (dn, count) = (self.buckets[idx].codel.drop_next, self.buckets[idx].codel.count);
                self.buckets[idx].codel.drop_next = dn.map(|d| self.control_law(d, count));
            }
            return Some(p);
        }
        if ok_to_drop {
            self.stats.dropped_codel += 1;
            let c = &self.buckets[idx].codel;
            let delta = c.count.saturating_sub(c.last_count);
            let recent = c.drop_next.is_some_and(|d| now.saturating_duration_since(d) < interval * 16);
            let count = if delta > 1 && recent { delta } else { 1 };
            let drop_next = self.control_law(now, count);
            let c = &mut self.buckets[idx].codel;
            c.dropping = true;
            c.count = count;
            c.last_count = count;
            c.drop_next = Some(drop_next);
            // RFC 8289: the packet after the dropped one goes out; the next dequeue
            // decides whether dropping continues.
            let (next, _) = self.take(idx, now)?;
            p = next;
        }
        Some(p)
    }
}

#[cfg(test)]
pub(crate) mod tests;
