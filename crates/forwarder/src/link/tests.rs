use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::*;
use crate::fq::tests::{pkt, port_of};
use crate::wire::{caps, Deframer, Frame};

/// The source ports of the packets the writer sends within `wait`.
async fn ports_sent(link: &mut tokio::io::DuplexStream, deframer: &mut Deframer, wait: Duration) -> Vec<u16> {
    let mut ports = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(Ok(n)) = tokio::time::timeout(wait, link.read(&mut buf)).await {
        assert!(n > 0, "the writer ended");
        deframer.push(&buf[..n]);
        while let Some(f) = deframer.next_frame().expect("well-formed frames") {
            if let Frame::Packet(p) = f {
                ports.push(port_of(&p));
            }
        }
    }
    ports
}

/// With the window full of a bulk flow's bytes, a ping-sized packet of
/// another flow still goes out at once; the bulk flow waits for acks.
#[tokio::test(flavor = "current_thread")]
async fn a_sparse_packet_passes_a_full_window() {
    let queue = TxQueue::new(FqConfig::default());
    queue.negotiate(caps::ACK, caps::ACK);
    let (writer, mut link) = tokio::io::duplex(1 << 20);
    let (_control, control_rx) = mpsc::channel(1);
    let task =
        tokio::spawn(write_loop(queue.clone(), control_rx, Stream::new(writer), 1024, Arc::new(LinkStats::default())));
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
    queue.peer_acked.store(sent as u64, Ordering::Release);
    queue.ready.notify_one();
    let more = ports_sent(&mut link, &mut deframer, Duration::from_millis(200)).await;
    queue.close();
    let _ = task.await;
    assert!(!more.is_empty() && more.iter().all(|&p| p == 1000), "{more:?}");
}
