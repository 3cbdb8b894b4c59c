//! Hostile input at the ec2-agent's port. Anyone on the instance can connect
//! to 127.0.0.1:7301; here a local user (nobody) sends garbage, holds a
//! slow-loris of more connections than the agent lets wait for a HELLO,
//! holds every client slot with valid HELLOs, and floods it with connects,
//! while the tunnel starts and carries a download.
//! The agent stays up, refuses each with a log line, and the tunnel (whose
//! connections come from root, the SSM agent) is not locked out. The same
//! user then turns on the laptop daemon's control socket. Root only.

mod labkit;
mod netns;

use labkit::*;
use std::io::{BufRead, BufReader};
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
elif mode == "hello":
    # n clients that each say a valid HELLO (forwarder wire format: type 1,
    # u16 length; "SSMP", version 1, role client, caps 0, MTU 1500, an id)
    # and hold their session for the given seconds.
    import struct
    seconds = int(sys.argv[3])
    socks, accepted, refused, other = [], 0, 0, []
    for i in range(n):
        body = b"SSMP" + struct.pack("!BBHIH", 1, 1, 0, 0, 1500) + os.urandom(16)
        s = socket.create_connection(AGENT, timeout=10)
        s.sendall(struct.pack("!BH", 1, len(body)) + body)
        def frame():
            # One frame: (type, body), or None when nothing comes in time.
            try:
                head = s.recv(3, socket.MSG_WAITALL)
                kind, length = struct.unpack("!BH", head)
                return kind, s.recv(length, socket.MSG_WAITALL) if length else b""
            except (OSError, struct.error):
                return None
        # The agent's HELLO, then a GOODBYE at once if it refuses the client.
        first = frame()
        s.settimeout(0.3)
        second = frame() if first and first[0] == 1 else None
        if second and second[0] == 5 and second[1][:1] == b"\x04":
            refused += 1
            s.close()
        elif first and first[0] == 1:
            # Silence or the session's first frames (a PING): a client.
            accepted += 1
            socks.append(s)
        else:
            other.append((first[0] if first else None, second[0] if second else None))
    print(f"hello: {n} clients, {accepted} accepted, {refused} refused with TooManyClients; other answers {other}", flush=True)
    time.sleep(seconds)
elif mode == "ctl-garbage":
    # The daemon's control socket: n bad requests, each must get an error.
    bad = [b"{{{\n", b'{"cmd":"reboot"}\n', b"\x00\xff" * 8 + b"\n", b"x" * 65536]
    refused = 0
    for req in bad[:n]:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(sys.argv[3])
        try:
            s.sendall(req)
        except OSError:
            pass
        reply = b""
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except OSError:
            pass
        refused += b'"error"' in reply
        s.close()
    print(f"ctl-garbage: {refused}/{n} refused with an error", flush=True)
elif mode == "ctl-flood":
    # n silent connections to the control socket, held for a few seconds.
    socks, refused = [], 0
    for i in range(n):
        s = socket.socket(socket.AF_UNIX)
        s.connect(sys.argv[3])
        socks.append(s)
    time.sleep(1)
    for s in socks:
        s.setblocking(False)
        try:
            refused += s.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            refused += 1
    print(f"ctl-flood: {n} opened, {refused} refused at once, {n - refused} held", flush=True)
    time.sleep(int(sys.argv[4]))
"#;

/// A local user (nobody) on the instance, running the attacker script.
fn attacker(lab: &Lab, args: &[&str]) -> Command {
    attacker_in(lab, "instance", args)
}

/// The attacker script as nobody in namespace `ns`.
fn attacker_in(lab: &Lab, ns: &str, args: &[&str]) -> Command {
    let script = lab.dir().join("attacker.py");
    std::fs::write(&script, ATTACKER).expect("script");
    let mut c = nobody_in(lab, ns, "/usr/bin/python3");
    c.arg(&script).args(args);
    c
}

/// `program` as nobody in namespace `ns`, with the lab's environment.
fn nobody_in(lab: &Lab, ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &lab.ns(ns), "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(program)
        .envs(lab.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
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

    // 40 clients with valid HELLOs hold every client slot (16) for the rest
    // of the test; the tunnel, from root, must still get in. Their summary
    // line comes once all 40 have their answer.
    let mut hellos = attacker(&lab, &["hello", "40", "30"]).stdout(Stdio::piped()).spawn().expect("hello flood");
    let mut summary = String::new();
    let _ = BufReader::new(hellos.stdout.take().expect("stdout")).read_line(&mut summary);
    let _hellos = netns::KillOnDrop(hellos);
    eprintln!("{summary}");
    assert!(summary.contains("40 clients, 16 accepted, 24 refused with TooManyClients;"), "{summary}");

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
    assert!(log.contains("refusing a client"), "the clients beyond --max-clients were refused: {log}");
}

/// The daemon's control socket is open to every local user (status is for
/// anyone): garbage, an over-long request and a flood of silent connections
/// from one are refused with a log line, the owner's status still answers
/// during the flood, the user cannot stop the tunnel, and it carries on.
#[test]
fn a_local_user_cannot_stop_or_jam_the_daemons_control_socket() {
    if !require_root("a_local_user_cannot_stop_or_jam_the_daemons_control_socket") {
        return;
    }
    let lab = Lab::up(&prefix("c"), 4, &[]);
    let mut daemon = lab.start(&[]);
    let sock = lab.run_dir().join("lab.sock");
    let sock = sock.to_str().expect("path");

    let flood = attacker_in(&lab, "laptop", &["ctl-flood", "200", sock, "4"]).stdout(Stdio::piped()).spawn();
    std::thread::sleep(Duration::from_secs(2));
    let during = ok(lab.ssm_proxy(&["status", "--name", "lab"]), "root's status during the flood");
    let flood = text(&netns::wait_with_deadline(flood.expect("flood"), Duration::from_secs(30), || {}));
    eprintln!("{flood}");
    assert!(during.contains("lab"), "{during}");
    assert!(flood.contains("200 opened, 168 refused at once, 32 held"), "{flood}");

    let garbage = text(&attacker_in(&lab, "laptop", &["ctl-garbage", "4", sock]).output().expect("garbage"));
    eprintln!("{garbage}");
    assert!(garbage.contains("4/4 refused with an error"), "{garbage}");

    let stop = nobody_in(&lab, "laptop", env!("CARGO_BIN_EXE_ssm-proxy")).args(["stop", "--name", "lab"]).output();
    let stop = stop.expect("stop as nobody");
    assert!(!stop.status.success(), "nobody stopped the tunnel: {}", text(&stop));
    assert!(text(&stop).contains("only root or the user who started this tunnel"), "{}", text(&stop));
    let status = nobody_in(&lab, "laptop", env!("CARGO_BIN_EXE_ssm-proxy")).args(["status", "--name", "lab"]).output();
    assert!(status.expect("status as nobody").status.success(), "anyone may ask for the status");

    lab.fetch_blob(60);
    let log = lab.log("daemon-lab.log");
    for line in ["others are in progress", "request longer than 4096 bytes", "bad request", "refused a stop"] {
        assert!(log.contains(line), "no log line {line:?}:\n{log}");
    }
    lab.stop(&mut daemon, "lab");
}
