use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::*;
use crate::fq::tests::{pkt, port_of};
use crate::wire::{caps, Deframer, Frame};

/// The frames a writer sends within `wait`.
async fn frames_sent(link: &mut tokio::io::DuplexStream, deframer: &mut Deframer, wait: Duration) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(Ok(n)) = tokio::time::timeout(wait, link.read(&mut buf)).await {
        assert!(n > 0, "the writer ended");
        deframer.push(&buf[..n]);
        while let Some(f) = deframer.next_frame().expect("well-formed frames") {
            frames.push(f);
        }
    }
    frames
}

/// The source ports of the packets the writer sends within `wait`.
async fn ports_sent(link: &mut tokio::io::DuplexStream, deframer: &mut Deframer, wait: Duration) -> Vec<u16> {
    let frames = frames_sent(link, deframer, wait).await;
    frames.iter().filter_map(|f| if let Frame::Packet(p) = f { Some(port_of(p)) } else { None }).collect()
}

/// With the window full of a bulk flow's bytes, a ping-sized packet of
/// another flow still goes out at once; the bulk flow waits for acks.
#[tokio::test(flavor = "current_thread")]
async fn a_sparse_packet_passes_a_full_window() {
    let queue = TxQueue::new(FqConfig::default());
    let lane = Lane::new(caps::ACK, caps::ACK);
    let (writer, mut link) = tokio::io::duplex(1 << 20);
    let (_control, control_rx) = mpsc::channel(1);
    let task = tokio::spawn(write_loop(
        queue.clone(),
        lane.clone(),
        control_rx,
        Stream::new(writer),
        1024,
        Arc::new(LinkStats::default()),
    ));
    for _ in 0..100 {
        queue.push(pkt(1000, 1400));
    }
    let mut deframer = Deframer::new();
    let bulk = ports_sent(&mut link, &mut deframer, Duration::from_millis(200)).await;
    assert!(!bulk.is_empty() && bulk.len() < 100, "the window must stop the bulk flow: {} sent", bulk.len());
    assert!(bulk.iter().all(|&p| p == 1000));

    queue.push(pkt(2000, 84));
    queue.push(pkt(1000, 1400));
    let next = ports_sent(&mut link, &mut deframer, Duration::from_millis(200)).await;
    assert_eq!(next, vec![2000], "only the sparse packet passes the full window");

    // An ack for everything sent opens the window again for the bulk flow.
    let sent = bulk.len() * (wire::HEADER_LEN + 1400) + wire::HEADER_LEN + 84;
    lane.peer_acked.store(sent as u64, Ordering::Release);
    lane.ready.notify_one();
    let more = ports_sent(&mut link, &mut deframer, Duration::from_millis(200)).await;
    lane.close();
    let _ = task.await;
    assert!(!more.is_empty() && more.iter().all(|&p| p == 1000), "{more:?}");
}

/// While a control frame waits to be written (the stream is not read), the
/// lane says it is full: sparse packets, which no other lane takes from it,
/// must not wait behind a member that has stopped.
#[tokio::test(flavor = "current_thread")]
async fn a_lane_writing_a_control_frame_takes_no_sparse_packets() {
    let both = caps::ACK | caps::STRIPE;
    let queue = TxQueue::new(FqConfig::default());
    let lane = Lane::new(both, both);
    let (writer, _link) = tokio::io::duplex(64);
    let (control, control_rx) = mpsc::channel(1);
    let stats = Arc::new(LinkStats::default());
    let task = tokio::spawn(write_loop(queue.clone(), lane.clone(), control_rx, Stream::new(writer), 1024, stats));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(lane.ahead.load(Ordering::Relaxed), 0, "idle, nothing in flight");
    let message = "x".repeat(200);
    control.send(Frame::Goodbye { reason: Reason::Normal, message }).await.expect("writer running");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(lane.ahead.load(Ordering::Relaxed), u64::MAX, "a lane stuck in a write is full");
    task.abort();
}

/// The numbers of the SEQ frames a writer sends within `wait` (all of one flow).
async fn seqs_sent(link: &mut tokio::io::DuplexStream, deframer: &mut Deframer, wait: Duration) -> Vec<u32> {
    let mut seqs = Vec::new();
    for f in frames_sent(link, deframer, wait).await {
        match f {
            Frame::Seq { seq, .. } => seqs.push(seq),
            Frame::Packet(_) => panic!("a striped lane sent a plain PACKET"),
            _ => {}
        }
    }
    seqs
}

/// Two striped lanes drain one queue: every packet goes out once, numbered
/// in the order taken (one flow here, so one sequence); a lane whose window is full leaves the rest to the
/// other, and a plain lane (an old peer) sends no numbers.
#[tokio::test(flavor = "current_thread")]
async fn striped_lanes_share_one_numbered_queue() {
    let both = caps::ACK | caps::STRIPE;
    let queue = TxQueue::new(FqConfig::default());
    let mut ends = Vec::new();
    for _ in 0..2 {
        let lane = Lane::new(both, both);
        assert!(lane.striped());
        let (writer, link) = tokio::io::duplex(1 << 20);
        let (control, control_rx) = mpsc::channel(1);
        let stats = Arc::new(LinkStats::default());
        tokio::spawn(write_loop(queue.clone(), lane.clone(), control_rx, Stream::new(writer), 1024, stats));
        ends.push((lane, link, Deframer::new(), control));
    }
    tokio::task::yield_now().await;
    assert_eq!(queue.lanes(), 2);
    for _ in 0..200 {
        queue.push(pkt(1000, 1400));
    }
    let mut all = Vec::new();
    for (_, link, deframer, _) in &mut ends {
        let got = seqs_sent(link, deframer, Duration::from_millis(200)).await;
        assert!(!got.is_empty(), "each lane takes its window's worth");
        assert!(got.windows(2).all(|w| w[0] < w[1]), "a lane's numbers rise: {got:?}");
        all.extend(got);
    }
    // Both windows are full; everything taken so far is numbered 0..n once.
    all.sort_unstable();
    assert_eq!(all, (0..all.len() as u32).collect::<Vec<_>>());
    assert!(all.len() < 200, "the windows hold the rest back");

    // The first lane ends: the other carries on alone.
    let (lane0, ..) = &ends[0];
    lane0.close();
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(queue.lanes(), 1);
    assert!(!Lane::new(caps::ACK, both).striped(), "striping needs both sides");
}

#[test]
fn one_lane_at_a_time_drains_and_the_next_starts_early() {
    let ms = Duration::from_millis;
    let overlap = ms(10);
    for count in [2usize, 3, 4, 8] {
        for t in (0..2000).step_by(3) {
            let draining: Vec<usize> = (0..count).filter(|&i| drain_turn(i, count, ms(t), overlap)).collect();
            let into = t % 100;
            let turn = (t / 100) as usize % count;
            if into >= 90 {
                assert_eq!(
                    draining,
                    {
                        let mut v = vec![turn, (turn + 1) % count];
                        v.sort_unstable();
                        v
                    },
                    "t={t} count={count}"
                );
            } else {
                assert_eq!(draining, [turn], "t={t} count={count}");
            }
        }
    }
    assert!(!drain_turn(0, 1, ms(50), overlap), "a lone lane never drains");
    assert_eq!(drain_overlap(None), ms(5));
    assert_eq!(drain_overlap(Some(ms(1))), ms(6));
    assert_eq!(drain_overlap(Some(ms(40))), ms(45));
    assert_eq!(drain_overlap(Some(ms(400))), DRAIN_SLOT / 2);
}

#[test]
fn the_lane_with_the_least_ahead_sends_the_sparse_flows() {
    let both = caps::ACK | caps::STRIPE;
    let lanes: Vec<Arc<Lane>> = (0..3).map(|_| Lane::new(both, both)).collect();
    let chosen = |turn: usize| -> Vec<bool> { lanes.iter().map(|l| sends_sparse(&lanes, turn, l)).collect() };
    for (l, ahead) in lanes.iter().zip([7_000, 2_000, u64::MAX]) {
        l.ahead.store(ahead, Ordering::Relaxed);
    }
    assert_eq!(chosen(0), [false, true, false]);
    assert_eq!(chosen(1), [false, true, false], "turns only break ties");
    // Within a packet of each other, the lanes tie and take turns.
    lanes[0].ahead.store(2_500, Ordering::Relaxed);
    lanes[2].ahead.store(1_000, Ordering::Relaxed);
    assert_eq!(chosen(0), [false, false, true], "1,000 bytes is less than a packet");
    lanes[2].ahead.store(2_900, Ordering::Relaxed);
    assert_eq!(chosen(0), [true, false, false]);
    assert_eq!(chosen(1), [false, true, false]);
    assert_eq!(chosen(2), [false, false, true]);
    assert_eq!(chosen(3), [true, false, false]);
}

/// Of two striped lanes, the one with less ahead takes a ping; the other
/// takes the bulk around it, and leaves the ping even when no bulk waits.
#[test]
fn a_ping_takes_the_lane_with_less_ahead_of_it() {
    let both = caps::ACK | caps::STRIPE;
    let queue = TxQueue::new(FqConfig::default());
    let lanes: Vec<Arc<Lane>> = (0..2).map(|_| Lane::new(both, both)).collect();
    for l in &lanes {
        queue.attach(l);
    }
    let stats = LinkStats::default();
    let now = Instant::now();
    let take = |lane: &Lane, limit: usize, what: Take| {
        let mut out = BytesMut::new();
        take_packets(&queue, lane, limit, what, now, &stats, &mut out);
        let mut deframer = Deframer::new();
        deframer.push(&out);
        let mut ports = Vec::new();
        while let Some(Frame::Seq { packet, .. }) = deframer.next_frame().expect("frames") {
            ports.push(port_of(&packet));
        }
        ports
    };
    // A bulk flow with a backlog (past its first quantum), then a ping.
    for _ in 0..10 {
        queue.push(pkt(1000, 1400));
    }
    assert_eq!(take(&lanes[0], 1, Take::Any), [1000]);
    assert_eq!(take(&lanes[1], 1, Take::Any), [1000]);
    queue.push(pkt(2000, 84));
    lanes[0].ahead.store(8_000, Ordering::Relaxed);
    lanes[1].ahead.store(2_000, Ordering::Relaxed);
    assert_eq!(take(&lanes[0], 4000, Take::Any), [1000, 1000, 1000], "the other lane leaves the ping");
    assert_eq!(take(&lanes[0], 4000, Take::Sparse), Vec::<u16>::new());
    assert_eq!(take(&lanes[1], 1, Take::Sparse), [2000], "the lane with less ahead sends it");
    // No bulk left: the ping still waits for its lane, not behind the other's window.
    while !take(&lanes[1], 100_000, Take::Any).is_empty() {}
    queue.push(pkt(2001, 84));
    assert_eq!(take(&lanes[0], 4000, Take::Any), Vec::<u16>::new(), "the lane with more ahead leaves the ping");
    assert_eq!(take(&lanes[1], 4000, Take::Any), [2001]);
    // When the lane with less ahead has no room even for a sparse packet, the other is theirs.
    queue.push(pkt(2002, 84));
    lanes[1].ahead.store(u64::MAX, Ordering::Relaxed);
    assert_eq!(take(&lanes[0], 4000, Take::Any), [2002]);
    // Lanes without acks publish nothing: any of them takes what waits.
    let plain: Vec<Arc<Lane>> = (0..2).map(|_| Lane::new(caps::STRIPE, caps::STRIPE)).collect();
    let queue = TxQueue::new(FqConfig::default());
    for l in &plain {
        queue.attach(l);
    }
    queue.push(pkt(2003, 84));
    let mut out = BytesMut::new();
    let other = plain.iter().find(|l| !sends_sparse(&plain, 0, l)).expect("one lane is not the sparse flows'");
    assert!(take_packets(&queue, other, 4000, Take::Any, now, &stats, &mut out) > 0);
}
