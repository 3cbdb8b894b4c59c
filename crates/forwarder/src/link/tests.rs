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
