//! A corporate HTTP proxy, end to end in the namespace lab: tinyproxy (basic
//! auth) in the wan namespace, and a laptop without a route to AWS, so that
//! only the proxy path can work. The API calls go through it as forwarded
//! plain-http requests, the websockets as CONNECT tunnels. Root only.

mod labkit;
mod netns;

use labkit::*;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

const INSTANCE: &str = "i-0123456789abcdef0";

fn lab_var(lab: &Lab, name: &str) -> String {
    lab.env
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("lab.sh env has no {name}"))
}

fn proxy_log(lab: &Lab) -> String {
    std::fs::read_to_string(lab.dir().join("proxy/tinyproxy.log")).unwrap_or_default()
}

/// `ssm-proxy forward` in the laptop namespace to the vpc's web server; once
/// it listens, the blob fetched through it with curl and checked.
fn forward_and_fetch(lab: &Lab, args: &[&str], env: &[(&str, &str)]) {
    let mut cmd = lab.laptop(env!("CARGO_BIN_EXE_ssm-proxy"));
    cmd.args(["forward", "--instance-id", INSTANCE, "--remote-host", "10.10.0.2", "--remote-port", "8080"])
        .args(["--local-port", "18080"])
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(lab.dir().join("forward.log")).expect("forward log")));
    let mut child = netns::KillOnDrop(cmd.spawn().expect("spawn forward"));
    let stdout = child.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
        panic!("forward did not start:\n{}", std::fs::read_to_string(lab.dir().join("forward.log")).unwrap_or_default())
    });
    assert!(line.starts_with("Forwarding"), "{line}");
    let out = lab.laptop_out("curl", &["-sS", "--max-time", "60", "-o", "/dev/stdout", "http://127.0.0.1:18080/blob"]);
    assert!(out.status.success(), "curl through forward: {}", text(&out));
    let got = sha256_hex(&out.stdout);
    let want = std::fs::read_to_string(lab.dir().join("blob.sha256")).expect("blob.sha256");
    assert_eq!(got, want.trim(), "the blob through forward differs");
}

fn sha256_hex(bytes: &[u8]) -> String {
    let mut child = std::process::Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    let mut stdin = child.stdin.take().expect("stdin");
    let data = bytes.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
    let out = child.wait_with_output().expect("sha256sum output");
    writer.join().expect("writer").expect("write to sha256sum");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").to_owned()
}

/// `ssm-proxy ARGS` in the laptop namespace, which must fail within `within`;
/// its stderr.
fn fails_within(lab: &Lab, args: &[&str], env: &[(&str, &str)], within: Duration) -> String {
    let started = Instant::now();
    let mut cmd = lab.laptop(env!("CARGO_BIN_EXE_ssm-proxy"));
    cmd.args(args).envs(env.iter().copied()).stdout(Stdio::null()).stderr(Stdio::piped());
    let out = netns::wait_with_deadline(cmd.spawn().expect("spawn"), within, || {});
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded:\n{err}");
    eprintln!("{args:?} failed in {:?}: {err}", started.elapsed());
    err
}

#[test]
fn the_tunnel_and_forward_work_through_a_real_proxy_with_no_direct_route() {
    if !require_root("the_tunnel_and_forward_work_through_a_real_proxy_with_no_direct_route") {
        return;
    }
    // The newest agent's behaviour (its deny list does not touch the vpc), and
    // signed opens required (the signature goes through the CONNECT tunnel), and
    // KMS encryption on (GenerateDataKey goes through the proxy too).
    let lab = Lab::up(
        &prefix("px"),
        8,
        &[
            ("PROXY", "1"),
            (
                "EMULATOR_ARGS",
                "--agent-version 3.3.4851.0 --require-signed-open --kms-key-id alias/ssm-sessions --kms-port-sessions",
            ),
        ],
    );
    let proxy = lab_var(&lab, "LAB_PROXY");

    // Without the proxy nothing reaches the emulator.
    let err = fails_within(
        &lab,
        &["forward", "--instance-id", INSTANCE, "--remote-port", "8080"],
        &[],
        Duration::from_secs(90),
    );
    assert!(err.contains("unreachable") || err.contains("Cannot reach"), "{err}");

    // The tunnel, with the proxy from the environment as curl takes it.
    let env = [("HTTP_PROXY", proxy.as_str()), ("NO_PROXY", "localhost,127.0.0.1")];
    let mut daemon = lab.start_with(
        "lab",
        &["start", "--instance-id", INSTANCE, "--name", "lab", "--cidr", "10.10.0.0/16", "--sessions", "2"],
        &env,
    );
    let bps = lab.fetch_blob(60);
    eprintln!("8 MiB through the tunnel behind the proxy at {:.2} MB/s", bps / 1e6);
    lab.stop(&mut daemon, "lab");
    let daemon_log = lab.log("daemon-lab.log");
    assert!(daemon_log.contains("GenerateDataKey"), "the sessions were not KMS-encrypted:\n{daemon_log}");

    // forward, with the proxy given on the command line.
    forward_and_fetch(&lab, &["--proxy", &proxy], &[]);

    let log = proxy_log(&lab);
    assert!(log.contains("CONNECT 192.168.102.2:4566"), "no websocket went through the proxy:\n{log}");
    assert!(log.contains("POST http://192.168.102.2:4566/"), "no API call went through the proxy:\n{log}");
}

#[test]
fn a_wrong_proxy_is_a_clear_error_naming_it() {
    if !require_root("a_wrong_proxy_is_a_clear_error_naming_it") {
        return;
    }
    let lab = Lab::up(&prefix("pw"), 1, &[("PROXY", "1")]);
    let forward = ["forward", "--instance-id", INSTANCE, "--remote-port", "8080"];
    let start = ["start", "--instance-id", INSTANCE, "--name", "lab", "--cidr", "10.10.0.0/16"];

    // Nothing listens there.
    for args in [&forward[..], &start[..]] {
        let err = fails_within(&lab, args, &[("HTTP_PROXY", "http://192.168.100.1:9")], Duration::from_secs(90));
        assert!(err.contains("proxy http://192.168.100.1:9 (from HTTP_PROXY)"), "{err}");
    }
    // The right proxy, the wrong password: named, without the password.
    let wrong = "http://lab:not-the-secret@192.168.100.1:3128";
    let err = fails_within(&lab, &[&forward[..], &["--proxy", wrong]].concat(), &[], Duration::from_secs(90));
    assert!(err.contains("proxy http://192.168.100.1:3128 (from --proxy)") && err.contains("credentials"), "{err}");
    assert!(!err.contains("not-the-secret"), "the password was printed:\n{err}");
    // A scheme we cannot speak: refused before anything is sent.
    let err = fails_within(&lab, &forward, &[("HTTPS_PROXY", "socks5://192.168.100.1:1080")], Duration::from_secs(10));
    assert!(err.contains("HTTPS_PROXY") && err.contains("SOCKS"), "{err}");
}
