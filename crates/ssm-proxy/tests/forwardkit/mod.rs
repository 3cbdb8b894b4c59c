//! What the `forward` tests share: the emulator on port 0, `ssm-proxy
//! forward` as a child process that dies with the test, an echo server and
//! the session summary the binary logs when it ends.
#![allow(dead_code)] // Each test binary uses its own part of the kit.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use ssm_emulator::config::{TEST_ACCESS_KEY, TEST_SECRET_KEY};
use ssm_emulator::{Config, Emulator};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const INSTANCE: &str = "i-0123456789abcdef0";

/// Kills the child on drop, so a failing test leaves no process behind.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Starts `ssm-proxy forward` and returns it with the address it listens on.
pub fn spawn_forward(
    emulator: &Emulator,
    remote_port: u16,
) -> (ChildGuard, SocketAddr, BufReader<std::process::ChildStderr>) {
    spawn_forward_to(&emulator.endpoint_url(), remote_port, &[])
}

/// `forward` against any endpoint URL, with extra environment.
pub fn spawn_forward_to(
    url: &str,
    remote_port: u16,
    env: &[(&str, &str)],
) -> (ChildGuard, SocketAddr, BufReader<std::process::ChildStderr>) {
    spawn_forward_args(url, remote_port, env, &[])
}

/// `forward` against any endpoint URL, with extra environment and arguments.
pub fn spawn_forward_args(
    url: &str,
    remote_port: u16,
    env: &[(&str, &str)],
    args: &[&str],
) -> (ChildGuard, SocketAddr, BufReader<std::process::ChildStderr>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ssm-proxy"))
        .args(["forward", "--instance-id", INSTANCE, "--remote-port", &remote_port.to_string(), "--local-port", "0"])
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .env("AWS_ENDPOINT_URL", url)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ssm-proxy");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut guard = ChildGuard(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("ready line");
    if !line.starts_with("Forwarding ") {
        let mut err = String::new();
        let _ = guard.0.kill();
        let mut s = stderr;
        let _ = s.read_to_string(&mut err);
        panic!("no ready line; stdout {line:?}, stderr:\n{err}");
    }
    let addr = line.split_whitespace().nth(1).and_then(|a| a.parse().ok()).expect("address in ready line");
    (guard, addr, stderr)
}

/// Sends `size` seeded random bytes and checks the echo, concurrently.
pub async fn echo_round_trip(addr: SocketAddr, seed: u64, size: usize) -> [u8; 32] {
    let mut data = vec![0u8; size];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    let want = Sha256::digest(&data);
    let s = TcpStream::connect(addr).await.expect("connect to forwarder");
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.expect("write");
        w
    });
    let mut got = Vec::with_capacity(size);
    let mut buf = vec![0u8; 64 << 10];
    while got.len() < size {
        let n = r.read(&mut buf).await.expect("read");
        assert!(n > 0, "connection closed after {} of {size} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
    }
    let _w = writer.await.expect("writer");
    assert_eq!(got.len(), size);
    let digest = Sha256::digest(&got);
    assert_eq!(digest, want, "echoed bytes differ (seed {seed})");
    digest.into()
}

pub fn stop(mut guard: ChildGuard, mut stderr: BufReader<std::process::ChildStderr>) -> String {
    let pid = guard.0.id() as i32;
    // SAFETY-free: ask the process to stop as Ctrl-C would.
    let _ = Command::new("kill").args(["-INT", &pid.to_string()]).status();
    let status = wait_timeout(&mut guard.0, Duration::from_secs(20));
    let mut err = String::new();
    let _ = stderr.read_to_string(&mut err);
    assert!(status.is_some_and(|s| s.success()), "forward did not exit cleanly ({status:?}); stderr:\n{err}");
    err
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

pub async fn emulator(config: Config) -> Emulator {
    Emulator::start(config, "127.0.0.1:0".parse().expect("addr")).await.expect("emulator")
}
