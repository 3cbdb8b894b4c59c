//! Acks as late as the real agent's. amazon-ssm-agent acks an input message
//! only after its port plugin wrote it on (through smux's 4 MiB receive
//! bucket in mux mode), so behind a target that drains slowly, or an echo
//! whose replies wait for the agent's 1 KiB/ms output pacing, acks come at the
//! target's pace. `forward` must treat that as a queue: every byte arrives,
//! and resends stay at most 2% of the messages it sends (the session summary
//! counts them). Eight connections share the channel fairly.
//!
//! The real binary and the real AWS SDK against the in-process emulator in
//! its `stock` profile; everything on 127.0.0.1 port 0.

mod forwardkit;
mod summary;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use forwardkit::*;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use ssm_emulator::{Config, Profile};
use summary::Summary;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const TOTAL: usize = 16 << 20;
const LIMIT: Duration = Duration::from_secs(180);

/// What a slow reader saw on one connection: the digest of `expect` bytes
/// and when the last of them came.
type Received = ([u8; 32], Instant);

/// A target that reads at most 1 KiB per millisecond, `expect` bytes per
/// connection, then reports and closes.
async fn slow_reader(expect: usize) -> (SocketAddr, mpsc::UnboundedReceiver<Received>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind slow reader");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(1));
                let mut hash = Sha256::new();
                let mut buf = [0u8; 1024];
                let mut got = 0;
                while got < expect {
                    tick.tick().await;
                    let want = buf.len().min(expect - got);
                    match s.read(&mut buf[..want]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            hash.update(&buf[..n]);
                            got += n;
                        }
                    }
                }
                let _ = tx.send((hash.finalize().into(), Instant::now()));
            });
        }
    });
    (addr, rx)
}

fn seeded(seed: u64, size: usize) -> Vec<u8> {
    let mut data = vec![0u8; size];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

/// How the connections' finishing times spread: (latest - earliest) / latest.
fn spread(started: Instant, finished: &[Instant]) -> f64 {
    let secs: Vec<f64> = finished.iter().map(|t| t.duration_since(started).as_secs_f64()).collect();
    let (lo, hi) = secs.iter().fold((f64::MAX, 0f64), |(lo, hi), &s| (lo.min(s), hi.max(s)));
    (hi - lo) / hi
}

/// Checks the session's resends and, for several connections, their fairness.
fn check(what: &str, stderr: &str, started: Instant, finished: &[Instant]) {
    let s = Summary::parse(stderr);
    let elapsed = finished.iter().max().map(|t| t.duration_since(started)).unwrap_or_default();
    eprintln!(
        "{what}: {:.1} s ({:.3} MB/s); {} messages sent, {} distinct, {} resends ({:.2}%); finish spread {:.1}%",
        elapsed.as_secs_f64(),
        TOTAL as f64 / 1e6 / elapsed.as_secs_f64(),
        s.messages_sent,
        s.distinct,
        s.resends,
        100.0 * s.resend_ratio(),
        100.0 * spread(started, finished)
    );
    assert!(s.distinct >= (TOTAL / 1024) as u64, "{what}: fewer messages than the data needs: {s:?}");
    assert!(s.resend_ratio() <= 0.02, "{what}: resent a queue: {s:?}");
    if finished.len() > 1 {
        assert!(
            spread(started, finished) <= 0.2,
            "{what}: connections finished unfairly: {:.1}%",
            100.0 * spread(started, finished)
        );
    }
}

async fn stock_emulator() -> ssm_emulator::Emulator {
    emulator(Config { profile: Profile::Stock, ..Config::default() }.with_instance(INSTANCE, "127.0.0.1")).await
}

/// 16 MiB over `conns` connections into targets that read 1 KiB per ms each.
async fn upload_into_slow_readers(conns: usize) {
    let per_conn = TOTAL / conns;
    let (target, mut received) = slow_reader(per_conn).await;
    let emu = stock_emulator().await;
    let (guard, addr, stderr) = spawn_forward(&emu, target.port());
    let started = Instant::now();
    let mut writers = Vec::new();
    let mut want = Vec::new();
    for i in 0..conns {
        let data = seeded(i as u64, per_conn);
        want.push(<[u8; 32]>::from(Sha256::digest(&data)));
        let mut s = TcpStream::connect(addr).await.expect("connect to forward");
        writers.push(tokio::spawn(async move {
            s.write_all(&data).await.expect("write");
            s // keep it open until the target has everything
        }));
    }
    let mut finished = Vec::new();
    let mut got = Vec::new();
    let all = async {
        while got.len() < conns {
            let (digest, at) = received.recv().await.expect("slow reader");
            got.push(digest);
            finished.push(at);
        }
    };
    tokio::time::timeout(LIMIT, all).await.expect("every byte reached the slow readers in time");
    got.sort();
    want.sort();
    assert_eq!(got, want, "bytes differ");
    for w in writers {
        drop(w.await.expect("writer"));
    }
    let err = stop(guard, stderr);
    check(&format!("slow reader, {conns} connection(s)"), &err, started, &finished);
}

/// 16 MiB over `conns` connections through an echo, whose replies the stock
/// agent paces at 1 KiB per ms.
async fn echo_stock(conns: usize) {
    let echo = echo_server().await;
    let emu = stock_emulator().await;
    let (guard, addr, stderr) = spawn_forward(&emu, echo.port());
    let started = Instant::now();
    let tasks: Vec<_> = (0..conns as u64)
        .map(|i| {
            tokio::spawn(async move {
                echo_round_trip(addr, i, TOTAL / conns).await;
                Instant::now()
            })
        })
        .collect();
    let mut finished = Vec::new();
    for t in tasks {
        let done = tokio::time::timeout(LIMIT, t).await.expect("echo in time").expect("echo task");
        finished.push(done);
    }
    let err = stop(guard, stderr);
    check(&format!("echo (stock), {conns} connection(s)"), &err, started, &finished);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_into_a_slow_reader_are_not_resent() {
    upload_into_slow_readers(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_into_eight_slow_readers_are_not_resent_and_share_fairly() {
    upload_into_slow_readers(8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_echoed_by_the_stock_agent_are_not_resent() {
    echo_stock(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_echoed_over_eight_connections_are_not_resent_and_share_fairly() {
    echo_stock(8).await;
}
