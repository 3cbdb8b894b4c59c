//! Throughput of `ssm-proxy forward` through the emulator on loopback, for the
//! `fast` (no pacing) and `stock` (real agent pacing) profiles, one and eight
//! connections, and eight connections over 2, 4 and 8 sessions (`--sessions`)
//! under `stock`; each row a `forward` process of its own. Prints MB/s and,
//! from the session summary `forward` logs as it stops, the messages it sent
//! and how many of them were resends; asserts nothing about speed. Run with
//! `cargo bench -p ssm-proxy --bench forward`.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../tests/summary/mod.rs"]
mod summary;

use ssm_emulator::config::{TEST_ACCESS_KEY, TEST_SECRET_KEY};
use ssm_emulator::{Config, Emulator, Profile};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const INSTANCE: &str = "i-0123456789abcdef0";

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn forward(emulator: &Emulator, port: u16, sessions: usize) -> (Kill, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ssm-proxy"))
        .args(["forward", "--instance-id", INSTANCE, "--remote-port", &port.to_string()])
        .args(["--sessions", &sessions.to_string()])
        .env("AWS_ENDPOINT_URL", emulator.endpoint_url())
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "error,ssm_proxy=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ssm-proxy");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("ready line");
    let addr = line.split_whitespace().nth(1).and_then(|a| a.parse().ok()).expect("ready line names the address");
    (Kill(child), addr)
}

/// Stops `forward` as Ctrl-C would and returns (messages sent, resends) from
/// its sessions' summaries.
fn stop(mut child: Kill) -> (u64, u64) {
    let _ = Command::new("kill").args(["-INT", &child.0.id().to_string()]).status();
    let mut err = String::new();
    if let Some(mut e) = child.0.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let all = summary::Summary::all(&err);
    (all.iter().map(|s| s.messages_sent).sum(), all.iter().map(|s| s.resends).sum())
}

/// Echoes `per_conn` bytes on each of `conns` connections; returns MB/s each way.
async fn echo(addr: SocketAddr, conns: usize, per_conn: usize) -> f64 {
    let start = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            tokio::spawn(async move {
                let s = TcpStream::connect(addr).await.expect("connect");
                s.set_nodelay(true).expect("nodelay");
                let (mut r, mut w) = s.into_split();
                let writer = tokio::spawn(async move {
                    let buf = vec![0x42u8; 64 << 10];
                    let mut left = per_conn;
                    while left > 0 {
                        let n = left.min(buf.len());
                        w.write_all(&buf[..n]).await.expect("write");
                        left -= n;
                    }
                    w
                });
                let mut got = 0;
                let mut buf = vec![0u8; 64 << 10];
                while got < per_conn {
                    let n = r.read(&mut buf).await.expect("read");
                    assert!(n > 0, "closed early");
                    got += n;
                }
                let _ = writer.await;
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    (conns * per_conn) as f64 / start.elapsed().as_secs_f64() / 1e6
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run briefly then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let echo_addr = echo_server().await;
        let rows = [
            (Profile::Fast, 64usize << 20, 1usize, 1usize),
            (Profile::Fast, 64 << 20, 8, 1),
            (Profile::Stock, 8 << 20, 1, 1),
            (Profile::Stock, 8 << 20, 8, 1),
            (Profile::Stock, 8 << 20, 8, 2),
            (Profile::Stock, 8 << 20, 8, 4),
            (Profile::Stock, 8 << 20, 8, 8),
        ];
        for (profile, total, conns, sessions) in rows {
            let total = if quick { total / 64 } else { total };
            let config = Config { profile, ..Config::default() }.with_instance(INSTANCE, "127.0.0.1");
            let emulator = Emulator::start(config, "127.0.0.1:0".parse().expect("addr")).await.expect("emulator");
            let (child, addr) = forward(&emulator, echo_addr.port(), sessions);
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mbps = echo(addr, conns, total / conns).await;
            let (sent, resends) = tokio::task::spawn_blocking(move || stop(child)).await.expect("stop");
            println!(
                "forward {:<5} {} connection{}, {} session{}: {:>7.2} MB/s each way ({} MiB echoed); {} messages sent, {} resends ({:.2}%)",
                format!("{profile:?}").to_lowercase(),
                conns,
                if conns == 1 { " " } else { "s" },
                sessions,
                if sessions == 1 { " " } else { "s" },
                mbps,
                total >> 20,
                sent,
                resends,
                100.0 * resends as f64 / sent.max(1) as f64
            );
        }
    });
}
