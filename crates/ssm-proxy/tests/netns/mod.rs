//! Network-namespace harness for root tests.
//!
//! A test calls [`run_inside`] first thing: in the parent it creates a fresh namespace,
//! re-runs *this same test* inside it (`ip netns exec NS <test binary> --exact NAME`),
//! waits with a deadline and deletes the namespace, pass or fail. Inside, `run_inside`
//! returns `true` and the test body runs, touching nothing outside the namespace.
//! Without root the tests say they are skipped, unless `SSM_PROXY_ROOT_TESTS=require`
//! (set by CI), which turns that into a failure.
#![allow(dead_code)]

use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const INSIDE_ENV: &str = "SSM_PROXY_TEST_NETNS";

/// True when this process is the copy running inside the namespace.
pub fn inside() -> bool {
    std::env::var_os(INSIDE_ENV).is_some()
}

fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() && std::path::Path::new("/dev/net/tun").exists() {
        return true;
    }
    let msg = format!("{test}: needs root and /dev/net/tun (network namespaces, TUN devices)");
    if std::env::var("SSM_PROXY_ROOT_TESTS").as_deref() == Ok("require") {
        panic!("{msg}, and SSM_PROXY_ROOT_TESTS=require");
    }
    eprintln!("skipped: {msg}");
    false
}

/// A child process killed (SIGKILL) when dropped, so a failing test leaves none behind.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A namespace that is deleted when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(tag: &str) -> Netns {
        let name = format!("ssmp-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        run("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill whatever still runs in it, then delete it.
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).output();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// Run `test` (this test's own name, as `cargo test` reports it) inside a fresh
/// namespace. Returns `true` in the namespace copy, which should then run its body;
/// `false` in the parent, which has already checked the copy's result.
pub fn run_inside(test: &str, deadline: Duration) -> bool {
    if inside() {
        return true;
    }
    if !root_or_skip(test) {
        return false;
    }
    let ns = Netns::create(&test.chars().filter(|c| c.is_ascii_alphanumeric()).take(12).collect::<String>());
    let exe = std::env::current_exe().expect("test binary path");
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(INSIDE_ENV, &ns.name)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the test inside the namespace");
    // Whatever the copy left running in the namespace dies with it, before we wait for
    // the end of its output (a leftover process would hold the pipes open).
    let out = wait_with_deadline(child, deadline, move || drop(ns));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{test} failed inside its namespace ({:?}):\n{text}", out.status);
    assert!(text.contains("1 passed"), "{test} did not run inside its namespace:\n{text}");
    false
}

/// Wait for `child`, killing it after `deadline`; `on_exit` runs once it has ended,
/// before its output is collected.
pub fn wait_with_deadline(mut child: Child, deadline: Duration, on_exit: impl FnOnce()) -> Output {
    let start = Instant::now();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(o) = stdout.as_mut() {
            let _ = o.read_to_end(&mut s);
        }
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.read_to_end(&mut s);
        }
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            on_exit();
            let so = out_thread.join().unwrap_or_default();
            let se = err_thread.join().unwrap_or_default();
            panic!("timed out after {deadline:?}:\n{}{}", String::from_utf8_lossy(&so), String::from_utf8_lossy(&se));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    on_exit();
    Output { status, stdout: out_thread.join().unwrap_or_default(), stderr: err_thread.join().unwrap_or_default() }
}

/// Run a command, panic with its output if it fails; return stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every route of every table, IPv4 and IPv6, as `ip` prints them.
pub fn route_snapshot() -> String {
    format!(
        "{}--- ipv6 ---\n{}",
        run("ip", &["route", "show", "table", "all"]),
        run("ip", &["-6", "route", "show", "table", "all"])
    )
}
