use super::*;

/// A UDP/IPv4 packet of `len` bytes for flow `port` (its source port).
pub(crate) fn pkt(port: u16, len: usize) -> Bytes {
    let mut p = vec![0u8; len.max(28)];
    p[0] = 0x45;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 0, 0, 1]);
    p[16..20].copy_from_slice(&[10, 0, 0, 2]);
    p[20..22].copy_from_slice(&port.to_be_bytes());
    p[22..24].copy_from_slice(&53u16.to_be_bytes());
    Bytes::from(p)
}

/// A queue whose hash puts the tests' flows (ports 1 and 2, 1000 and 2000)
/// in different buckets. Its hasher is random, as in use, and two flows share
/// a bucket once in 256 queues: the tests would then fail now and then for
/// the hash, not the queue.
fn queue(config: FqConfig) -> FqCodel {
    loop {
        let q = FqCodel::new(config);
        let bucket = |port| q.bucket_of(&pkt(port, 100));
        if bucket(1) != bucket(2) && bucket(1000) != bucket(2000) {
            return q;
        }
    }
}

pub(crate) fn port_of(p: &Bytes) -> u16 {
    u16::from_be_bytes([p[20], p[21]])
}

/// `queued` packets of a bulk flow, `served` of them then taken (checked to be
/// the bulk flow's), so that it has used its first quantum: an old flow.
fn old_bulk_flow(queued: usize, served: usize) -> (Instant, FqCodel) {
    let t0 = Instant::now();
    let mut q = queue(FqConfig::default());
    for _ in 0..queued {
        q.enqueue(t0, pkt(1000, 1400));
    }
    for _ in 0..served {
        assert_eq!(port_of(&q.dequeue(t0).expect("bulk")), 1000);
    }
    (t0, q)
}

#[test]
fn a_sparse_flow_overtakes_a_bulk_backlog() {
    // A few bulk packets served so the bulk flow is an old flow, then a ping arrives.
    let (t0, mut q) = old_bulk_flow(200, 3);
    q.enqueue(t0, pkt(2000, 84));
    let next: Vec<u16> = (0..2).map(|_| port_of(&q.dequeue(t0).expect("packet"))).collect();
    assert!(next.contains(&2000), "the ping waited behind the backlog: {next:?}");
}

#[test]
fn dequeue_sparse_takes_only_new_flows() {
    let (t0, mut q) = old_bulk_flow(10, 2);
    assert!(q.dequeue_sparse(t0).is_none(), "a backlogged flow is not sparse");
    q.enqueue(t0, pkt(2000, 84));
    assert_eq!(port_of(&q.dequeue_sparse(t0).expect("the ping")), 2000);
    assert!(q.dequeue_sparse(t0).is_none());
    assert_eq!(q.len(), 8, "the bulk flow's packets stay queued");
}

#[test]
fn bulk_flows_share_by_bytes() {
    let t0 = Instant::now();
    let mut q = queue(FqConfig::default());
    for _ in 0..300 {
        q.enqueue(t0, pkt(1, 1400));
        q.enqueue(t0, pkt(2, 700));
    }
    let mut bytes = [0usize; 3];
    for _ in 0..300 {
        let p = q.dequeue(t0).expect("packet");
        bytes[port_of(&p) as usize] += p.len();
    }
    let (a, b) = (bytes[1] as f64, bytes[2] as f64);
    assert!((a / b - 1.0).abs() < 0.1, "byte shares {a} vs {b}");
}

#[test]
fn no_drops_while_the_delay_stays_under_target() {
    let t0 = Instant::now();
    let mut q = queue(FqConfig::default());
    for i in 0..1000u32 {
        let now = t0 + Duration::from_millis(i as u64);
        q.enqueue(now, pkt(1, 1400));
        q.enqueue(now, pkt(1, 1400));
        // Drain everything 2 ms later at most.
        let later = now + Duration::from_millis(2);
        while q.dequeue(later).is_some() {}
    }
    assert_eq!(q.stats().dropped_codel, 0);
    assert_eq!(q.stats().dequeued, 2000);
}

#[test]
fn codel_starts_dropping_one_interval_after_the_delay_passes_target() {
    // Arrivals at 2 packets/ms, service at 1 packet/ms: the delay passes 5 ms after
    // about 5 ms; the first drop must come one interval (100 ms) later, and the drop
    // rate must then rise (CoDel's control law).
    let t0 = Instant::now();
    let mut q = queue(FqConfig { limit_bytes: usize::MAX, ..FqConfig::default() });
    let mut first_drop = None;
    let mut drops_per_second = Vec::new();
    for i in 0..3000u64 {
        let now = t0 + Duration::from_millis(i);
        q.enqueue(now, pkt(1, 1400));
        q.enqueue(now, pkt(1, 1400));
        q.dequeue(now);
        if first_drop.is_none() && q.stats().dropped_codel > 0 {
            first_drop = Some(i);
        }
        if i % 1000 == 999 {
            drops_per_second.push(q.stats().dropped_codel);
        }
    }
    let first = first_drop.expect("CoDel dropped");
    assert!((100..=130).contains(&first), "first drop at {first} ms");
    let per_sec: Vec<u64> = drops_per_second.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(per_sec[1] > per_sec[0] && per_sec[0] > drops_per_second[0] / 2, "{drops_per_second:?}");
    let s = q.stats();
    assert_eq!(s.enqueued, s.dequeued + s.dropped_codel + q.len() as u64);
}

#[test]
fn held_packets_wait_out_a_stall_without_codel_drops() {
    // A 300 ms stall of the link behind a bounded backlog (a stalled SSM path
    // with the agent's TCP stack holding back): the same arrivals are dropped
    // when queued normally, and all delivered when held.
    let run = |held: bool| {
        let t0 = Instant::now();
        let mut q = queue(FqConfig::default());
        let mut delivered = 0;
        for ms in 0..1000u64 {
            let now = t0 + Duration::from_millis(ms);
            // The producer keeps about 20 packets queued (its back-pressure limit).
            while q.len() < 20 {
                let p = pkt(1, 1400);
                if held {
                    q.enqueue_held(now, p);
                } else {
                    q.enqueue(now, p);
                }
            }
            if !(100..400).contains(&ms) {
                // One packet per ms, except during the stall.
                delivered += usize::from(q.dequeue(now).is_some());
            }
        }
        (q.stats().dropped_codel, delivered)
    };
    let (dropped, _) = run(false);
    assert!(dropped > 0, "the control case must drop, or this test proves nothing");
    let (dropped, delivered) = run(true);
    assert_eq!(dropped, 0);
    assert_eq!(delivered, 700);
}

#[test]
fn a_responsive_sender_is_held_near_target() {
    // An AIMD sender (like TCP: +0.5 packets/ms per second, halve on a drop, at most once
    // per 100 ms) into a 1 packet/ms link. CoDel keeps its queueing delay low.
    let t0 = Instant::now();
    let mut q = queue(FqConfig { limit_bytes: usize::MAX, ..FqConfig::default() });
    let (mut rate, mut credit, mut last_cut, mut seen_drops) = (0.5f64, 0.0f64, 0u64, 0u64);
    let mut delays = Vec::new();
    for i in 0..20_000u64 {
        let now = t0 + Duration::from_millis(i);
        credit += rate;
        while credit >= 1.0 {
            q.enqueue(now, pkt(1, 1400));
            credit -= 1.0;
        }
        if q.dequeue(now).is_some() && i > 10_000 {
            delays.push(q.stats().last_delay);
        }
        let drops = q.stats().dropped_codel;
        if drops > seen_drops && i >= last_cut + 100 {
            rate /= 2.0;
            last_cut = i;
        } else {
            rate += 0.0005;
        }
        seen_drops = drops;
    }
    delays.sort();
    let p50 = delays[delays.len() / 2];
    let p99 = delays[delays.len() * 99 / 100];
    assert!(q.stats().dropped_codel > 0);
    assert!(p50 < Duration::from_millis(30) && p99 < Duration::from_millis(150), "p50 {p50:?} p99 {p99:?}");
    // One AIMD flow over a short queue cannot keep the link full all the time.
    assert!(delays.len() > 8_000, "the link stayed busy: {} packets", delays.len());
}

#[test]
fn overflow_drops_from_the_fattest_flow() {
    let t0 = Instant::now();
    let mut q = queue(FqConfig { limit_bytes: 14_000, ..FqConfig::default() });
    q.enqueue(t0, pkt(2, 100));
    for _ in 0..20 {
        q.enqueue(t0, pkt(1, 1400));
    }
    assert!(q.bytes() <= 14_000);
    assert_eq!(q.stats().dropped_overflow, 11);
    let ports: Vec<u16> = std::iter::from_fn(|| q.dequeue(t0)).map(|p| port_of(&p)).collect();
    assert!(ports.contains(&2), "the small flow survived");
}

#[test]
fn ipv6_and_odd_packets_are_queued_too() {
    let t0 = Instant::now();
    let mut q = queue(FqConfig::default());
    let mut v6 = vec![0u8; 60];
    v6[0] = 0x60;
    q.enqueue(t0, Bytes::from(v6));
    q.enqueue(t0, Bytes::from_static(&[0x45]));
    assert_eq!(q.len(), 2);
    assert!(q.dequeue(t0).is_some() && q.dequeue(t0).is_some() && q.dequeue(t0).is_none());
    assert!(q.is_empty());
}

#[test]
fn dequeue_bulk_leaves_new_flows_for_another_writer() {
    let (t0, mut q) = old_bulk_flow(10, 2);
    q.enqueue(t0, pkt(2000, 84));
    assert!(q.has_sparse());
    let bulk: Vec<u16> = (0..3).map(|_| port_of(&q.dequeue_bulk(t0).expect("bulk"))).collect();
    assert_eq!(bulk, [1000, 1000, 1000], "the ping is left where it was");
    assert!(q.has_sparse());
    assert_eq!(port_of(&q.dequeue(t0).expect("the ping")), 2000);
    assert!(!q.has_sparse());
}

#[test]
fn a_bulk_flow_whose_queue_keeps_emptying_is_not_sparse_but_a_ping_is() {
    // A download that the writers keep up with: one packet at a time, every
    // millisecond, each taken at once, so its bucket empties between packets.
    // A ping every 25 ms beside it.
    let t0 = Instant::now();
    let mut q = queue(FqConfig::default());
    let mut bulk_sparse = 0;
    let mut pings_sparse = 0;
    for ms in 0..500u64 {
        let now = t0 + Duration::from_millis(ms);
        q.enqueue(now, pkt(1000, 1400));
        if ms % 25 == 0 {
            q.enqueue(now, pkt(2000, 84));
        }
        while let Some(p) = q.dequeue_sparse(now) {
            match port_of(&p) {
                1000 => bulk_sparse += 1,
                _ => pings_sparse += 1,
            }
        }
        // The rest (the bulk's packet when not taken above): its bucket empties.
        while q.dequeue(now).is_some() {}
    }
    assert_eq!(pings_sparse, 20, "every ping is a sparse flow's packet");
    // Only its first packets, until its count passes two quanta (RFC 8290's
    // rule alone: all 500).
    assert!(bulk_sparse <= 3, "the download passed for a sparse flow {bulk_sparse} times");

    // After a pause the download is a new flow again (its count decays).
    let later = t0 + Duration::from_millis(1500);
    q.enqueue(later, pkt(1000, 1400));
    assert_eq!(q.dequeue_sparse(later).map(|p| port_of(&p)), Some(1000));
}
