//! Load through one tunnel in the namespace lab, bounded in count and time
//! (about a minute): 1,000 TCP connections held open and echoed through,
//! 200 more against the agent's per-client flow limit (1,100 here), 20,000
//! short HTTP requests from curl 100 at a time, and UDP at 5,000 datagrams a
//! second for 10 s. It prints the figures (loss, requests per second, the
//! daemon's and the ec2-agent's peak RSS and CPU); it asserts only what must
//! hold: every held connection works, the flow limit refuses with a reset,
//! every request is answered 200. Root only.

mod labkit;
mod netns;

use labkit::*;
use std::process::{Command, Stdio};
use std::time::Instant;

const CONNECTIONS: u64 = 1_000;
const EXTRA: u64 = 200;
const FLOW_LIMIT: u64 = 1_100;
const REQUESTS: usize = 20_000;

fn script() -> String {
    repo_root().join("crates/ssm-proxy/tests/data/load.py").to_string_lossy().into_owned()
}

/// Peak RSS (KiB) and CPU time so far (s) of process `pid`.
fn figures(pid: &str) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let rest: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks: u64 = rest.get(11..13).map(|f| f.iter().filter_map(|t| t.parse::<u64>().ok()).sum()).unwrap_or(0);
    (hwm, ticks as f64 / 100.0)
}

fn json_line(out: &std::process::Output, what: &str) -> serde_json::Value {
    let text = ok(out.clone(), what);
    serde_json::from_str(text.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{what}: {e}: {text}"))
}

/// `n` requests for the small file from namespace `ns` with curl, 100 at a
/// time: how many got 200, the rate, and the first few other lines (codes,
/// and curl's message for each failure).
fn requests(lab: &Lab, ns: &str, n: usize) -> (usize, f64, String) {
    let t = Instant::now();
    let curl = Command::new("ip")
        .args(["netns", "exec", &lab.ns(ns), "curl", "-sS", "--no-progress-meter", "-Z", "--parallel-max", "100"])
        .args(["--max-time", "30", "-w", "%{stderr}%{http_code}\\n"])
        .arg(format!("http://10.10.0.2:8080/small?n=[1-{n}]"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .expect("curl");
    let took = t.elapsed().as_secs_f64();
    let codes = String::from_utf8_lossy(&curl.stderr);
    let answered = codes.lines().filter(|l| *l == "200").count();
    let failed: Vec<&str> = codes.lines().filter(|l| *l != "200").take(5).collect();
    (answered, answered as f64 / took, failed.join(","))
}

#[test]
fn a_thousand_connections_twenty_thousand_requests_and_udp_at_five_thousand_a_second() {
    if !require_root("a_thousand_connections_twenty_thousand_requests_and_udp_at_five_thousand_a_second") {
        return;
    }
    let agent_args = format!("--max-tcp-flows {FLOW_LIMIT}");
    // The agent's session at debug: a dial that fails says why in its log.
    let lab = Lab::up(&prefix("l"), 1, &[("AGENT_ARGS", &agent_args), ("RUST_LOG", "info,ec2_agent::session=debug")]);
    std::fs::write(lab.dir().join("www/small"), vec![b'x'; 1024]).expect("small file");
    let server = Command::new("ip")
        .args(["netns", "exec", &lab.ns("vpc"), "/usr/bin/python3", &script(), "server", "10.10.0.2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(lab.dir().join("load-server.log")).expect("log")))
        .spawn()
        .expect("load server");
    let _server = netns::KillOnDrop(server);
    let mut daemon = lab.start(&[]);
    let daemon_pid = tunnel_status(&lab)["pid"].as_u64().expect("pid").to_string();
    let agent_pid = lab.log("agent.pid").trim().to_string();
    let (_, daemon_cpu0) = figures(&daemon_pid);
    let (_, agent_cpu0) = figures(&agent_pid);
    let t0 = Instant::now();

    // 1,000 held, then 200 more against the limit of 1,100.
    let hold = lab.laptop_out("/usr/bin/python3", &[&script(), "hold", "10.10.0.2", "1000", "200"]);
    let hold = json_line(&hold, "hold");
    eprintln!("held connections: {hold}");
    assert_eq!(hold["held"], CONNECTIONS, "{hold}");
    assert_eq!(hold["alive_after_2s"], CONNECTIONS, "{hold}");
    let extra_ok = hold["extra_ok"].as_u64().unwrap_or(0);
    let resets = hold["errors"]["reset"].as_u64().unwrap_or(0);
    assert_eq!(extra_ok, FLOW_LIMIT - CONNECTIONS, "the flow limit admits up to 1,100: {hold}");
    assert_eq!(extra_ok + resets, EXTRA, "the rest refused with a reset, not a hang: {hold}");
    assert!(lab.log("agent.log").contains("too many TCP connections for this client"), "a log line for the refusals");

    // 20,000 short requests, 100 at a time; then 2,000 the same way from the
    // instance itself, no tunnel: what the HTTP server alone manages.
    let (answered, rate, failed) = requests(&lab, "laptop", REQUESTS);
    let (_, direct, _) = requests(&lab, "instance", REQUESTS / 10);
    eprintln!("HTTP: {answered}/{REQUESTS} answered 200, {rate:.0} requests/s; without the tunnel {direct:.0}/s");
    // (The message, and so the read of the agent's log, only on a failure.)
    assert_eq!(
        answered,
        REQUESTS,
        "every request answered; others: {failed}; the agent's failed dials: {:?}",
        lab.log("agent.log").lines().filter(|l| l.contains("connect failed")).take(5).collect::<Vec<_>>()
    );

    // UDP at 5,000 datagrams a second for 10 s.
    let udp = lab.laptop_out("/usr/bin/python3", &[&script(), "udp", "10.10.0.2", "5000", "10"]);
    let udp = json_line(&udp, "udp");
    eprintln!("UDP: {udp}");
    assert_eq!(udp["sent"], 50_000, "{udp}");
    assert!(udp["echoed"].as_u64().unwrap_or(0) > 0, "no echo at all: {udp}");

    let wall = t0.elapsed().as_secs_f64();
    let (daemon_rss, daemon_cpu) = figures(&daemon_pid);
    let (agent_rss, agent_cpu) = figures(&agent_pid);
    eprintln!(
        "load over {wall:.0} s: daemon peak RSS {} MiB, CPU {:.1} s ({:.0}%); ec2-agent peak RSS {} MiB, CPU {:.1} s ({:.0}%)",
        daemon_rss / 1024,
        daemon_cpu - daemon_cpu0,
        100.0 * (daemon_cpu - daemon_cpu0) / wall,
        agent_rss / 1024,
        agent_cpu - agent_cpu0,
        100.0 * (agent_cpu - agent_cpu0) / wall,
    );
    lab.stop(&mut daemon, "lab");
}
