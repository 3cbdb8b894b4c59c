//! Hostile input at the ec2-agent's port. Anyone on the instance can connect
//! to 127.0.0.1:7301; here a local user (nobody) sends garbage, holds a
//! slow-loris of more connections than the agent lets wait for a HELLO, and
//! floods it with connects, while the tunnel starts and carries a download.
//! The agent stays up, refuses each with a log line, and the tunnel (whose
//! connections come from root, the SSM agent) is not locked out. Root only.

mod labkit;
mod netns;

use labkit::*;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The local user's tools: `garbage N` (64 KiB of random bytes on each of N
/// connections, one after the other), `loris N SECONDS` (N connections that
/// never say HELLO), `flood N` (N connects and closes).
const ATTACKER: &str = r#"
import os, socket, sys, time
AGENT = ("127.0.0.1", 7301)
mode, n = sys.argv[1], int(sys.argv[2])
if mode == "garbage":
    closed = 0
    for i in range(n):
        s = socket.create_connection(AGENT, timeout=15)
        try:
            s.sendall(os.urandom(64 * 1024))
            while s.recv(65536):
                pass
            closed += 1
        except OSError:
            closed += 1
        s.close()
    print(f"garbage: {closed}/{n} connections closed by the agent", flush=True)
elif mode == "loris":
    # Connections that never say HELLO; closed ones read as EOF or a reset.
    seconds = int(sys.argv[3])
    socks = []
    for i in range(n):
        try:
            socks.append(socket.create_connection(AGENT, timeout=5))
        except OSError:
            pass
    opened, start, closed_at = len(socks), time.time(), []
    for s in socks:
        s.setblocking(False)
    while socks and time.time() - start < seconds:
        for s in list(socks):
            try:
                if s.recv(1) == b"":
                    raise ConnectionResetError()
            except BlockingIOError:
                continue
            except OSError:
                pass
            closed_at.append(round(time.time() - start))
            socks.remove(s)
        time.sleep(0.5)
    print(f"loris: {opened}/{n} opened, {len(closed_at)} closed by the agent, at {sorted(set(closed_at))} s, {len(socks)} still open", flush=True)
elif mode == "flood":
    for i in range(n):
        try:
            socket.create_connection(AGENT, timeout=5).close()
        except OSError:
            pass
    print(f"flood: {n} connects", flush=True)
"#;

fn attacker(lab: &Lab, args: &[&str]) -> Command {
    let script = lab.dir().join("attacker.py");
    std::fs::write(&script, ATTACKER).expect("script");
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &lab.ns("instance"), "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg("/usr/bin/python3")
        .arg(&script)
        .args(args)
        .stdin(Stdio::null());
    c
}

fn agent_alive(lab: &Lab) -> bool {
    let pid = std::fs::read_to_string(lab.dir().join("agent.pid")).unwrap_or_default();
    !pid.trim().is_empty() && std::path::Path::new(&format!("/proc/{}", pid.trim())).exists()
}

#[test]
fn a_local_users_garbage_slow_loris_and_flood_do_not_lock_the_tunnel_out() {
    if !require_root("a_local_users_garbage_slow_loris_and_flood_do_not_lock_the_tunnel_out") {
        return;
    }
    let lab = Lab::up(&prefix("h"), 4, &[]);

    let out = attacker(&lab, &["garbage", "20"]).output().expect("garbage");
    let garbage = text(&out);
    eprintln!("{garbage}");
    assert!(garbage.contains("garbage: 20/20 connections closed"), "{garbage}");

    // 100 slow connections, more than the 64 the agent lets wait, for 25 s.
    // It ends on its own after 25 s, pass or fail.
    let loris = attacker(&lab, &["loris", "100", "25"]).stdout(Stdio::piped()).spawn().expect("loris");
    std::thread::sleep(Duration::from_secs(2));
    let flood = attacker(&lab, &["flood", "2000"]).output().expect("flood");
    eprintln!("{}", text(&flood));

    // Meanwhile the tunnel comes up and carries a download, sha256-checked.
    let mut daemon = lab.start(&["--sessions", "2"]);
    let bps = lab.fetch_blob(60);
    eprintln!("4 MiB through the tunnel during the slow-loris at {:.2} MB/s", bps / 1e6);
    lab.stop(&mut daemon, "lab");

    let loris = netns::wait_with_deadline(loris, Duration::from_secs(60), || {});
    let loris = text(&loris);
    eprintln!("{loris}");
    assert!(loris.contains("100/100 opened"), "{loris}");
    assert!(loris.contains(" 0 still open"), "the agent closed every slow connection: {loris}");

    assert!(agent_alive(&lab), "the agent died:\n{}", lab.log("agent.log"));
    let log = lab.log("agent.log");
    assert!(log.contains("the peer sent garbage"), "{log}");
    assert!(log.contains("others have not sent their HELLO yet"), "the slow-loris beyond 64 was refused: {log}");
    assert!(log.contains("no HELLO within 10s"), "{log}");
}
