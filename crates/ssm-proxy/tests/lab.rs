//! End to end in the namespace lab (scripts/lab.sh): `ssm-proxy start` in `laptop`,
//! the emulator in `aws`, the real `ec2-agent` as nobody in `instance`, real servers
//! in `vpc`, and real clients (psql, curl, dig, ping, nc) with no per-app setup.
//! Root only; each test builds its own lab under its own prefix and tears it down.

mod labkit;
mod netns;

use labkit::*;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn real_clients_reach_the_vpc_through_the_tunnel() {
    if !require_root("real_clients_reach_the_vpc_through_the_tunnel") {
        return;
    }
    let lab = Lab::up(&prefix("e"), 50, &[]);
    let routes_before = main_routes(&lab);
    let mut daemon = lab.start(&["--cidr", "169.254.169.254/32"]);

    // psql: a query against the vpc's PostgreSQL.
    let answer = ok(lab.laptop_out("psql", &["-h", "10.10.0.2", "-U", "postgres", "-tAc", "select 40 + 2"]), "psql");
    assert_eq!(answer, "42");

    // curl: 50 MiB, byte-exact.
    let speed = lab.fetch_blob(120);
    eprintln!("50 MiB curl through the tunnel: {:.1} MB/s", speed / 1e6);

    // dig over UDP and over TCP.
    for transport in ["+notcp", "+tcp"] {
        let a = ok(
            lab.laptop_out("dig", &[transport, "+short", "+time=3", "+tries=1", "@10.10.0.2", "db.corp.internal"]),
            "dig",
        );
        assert_eq!(a, "10.10.0.2", "dig {transport}");
    }

    // ping -c 5, twice at once: each ping has its own identifier (and its own
    // ping socket on the agent), and each must get exactly its own replies.
    let other = lab
        .laptop("ping")
        .args(["-c", "5", "-i", "0.2", "-W", "3", "10.10.0.2"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("ping");
    let p = ok(lab.laptop_out("ping", &["-c", "5", "-i", "0.2", "-W", "3", "10.10.0.2"]), "ping");
    assert!(p.contains("5 received") && !p.contains("DUP"), "{p}");
    let q = String::from_utf8_lossy(&other.wait_with_output().expect("ping").stdout).into_owned();
    assert!(q.contains("5 received") && !q.contains("DUP"), "{q}");

    // A plain TCP port with nc.
    let listener = Command::new("ip")
        .args(["netns", "exec", &lab.ns("vpc"), "timeout", "20", "nc", "-l", "10.10.0.2", "9000"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("nc -l");
    std::thread::sleep(Duration::from_millis(300));
    let mut sender = lab.laptop("nc");
    sender.args(["-N", "-w", "5", "10.10.0.2", "9000"]).stdin(Stdio::piped());
    let mut sender = sender.spawn().expect("nc");
    {
        use std::io::Write;
        sender.stdin.take().expect("stdin").write_all(b"over the tunnel\n").expect("write");
    }
    assert!(sender.wait().expect("nc").success());
    let received = listener.wait_with_output().expect("nc -l");
    assert_eq!(String::from_utf8_lossy(&received.stdout), "over the tunnel\n");

    // The instance metadata service is refused by the agent, loudly and at once.
    let t = Instant::now();
    let imds = lab.laptop_out("curl", &["-sS", "-m", "5", "http://169.254.169.254/latest/meta-data/"]);
    assert_eq!(imds.status.code(), Some(7), "metadata must be refused (connection refused): {}", text(&imds));
    assert!(t.elapsed() < Duration::from_secs(3), "refusal took {:?}", t.elapsed());
    assert!(lab.log("agent.log").contains("refused: destination in the deny-list (169.254.0.0/16)"));

    // status for any user; stop only for root or the owner.
    let js = ok(
        lab.laptop_out("runuser", &["-u", "nobody", "--", env!("CARGO_BIN_EXE_ssm-proxy"), "status", "--json"]),
        "status",
    );
    let v: serde_json::Value = serde_json::from_str(&js).expect("status JSON");
    let t0 = &v[0];
    assert_eq!(t0["state"], "connected");
    assert!(t0["received"]["bytes"].as_u64().unwrap_or(0) > 50 << 20, "{t0}");
    assert!(t0["sent"]["packets"].as_u64().unwrap_or(0) > 100, "{t0}");
    assert!(t0["rtt_ms"].as_f64().is_some(), "{t0}");
    let refused = lab.laptop_out("runuser", &["-u", "nobody", "--", env!("CARGO_BIN_EXE_ssm-proxy"), "stop"]);
    assert!(!refused.status.success() && text(&refused).contains("only root or the user"), "{}", text(&refused));

    lab.stop(&mut daemon, "lab");
    let routes_after = main_routes(&lab);
    assert_eq!(routes_after, routes_before, "stop left routes behind");
    let links = ok(Command::new("ip").args(["-n", &lab.ns("laptop"), "link"]).output().expect("ip"), "ip link");
    assert!(!links.contains("tun"), "stop left the device: {links}");
    assert_eq!(std::fs::read_dir(lab.run_dir()).expect("run dir").count(), 0, "stop left files in the run dir");
    assert!(
        lab.log("emulator.log").contains("TerminateSession") || lab.log("daemon-lab.log").contains("ended"),
        "session not terminated"
    );
}

#[test]
fn kill_9_then_cleanup_leaves_nothing() {
    if !require_root("kill_9_then_cleanup_leaves_nothing") {
        return;
    }
    let lab = Lab::up(&prefix("k"), 1, &[]);
    let before = main_routes(&lab);
    // --detach returns once the tunnel is up; the tunnel runs on in its own session.
    let up = ok(
        lab.ssm_proxy(&[
            "start",
            "--detach",
            "--instance-id",
            "i-0123456789abcdef0",
            "--name",
            "lab",
            "--cidr",
            "10.10.0.0/16",
        ]),
        "start --detach",
    );
    assert!(up.contains("tunnel \"lab\" up") && up.contains("Running in the background"), "{up}");
    assert!(ok(lab.laptop_out("ip", &["route"]), "ip route").contains("10.10.0.0/16 dev tun"));
    let js = ok(lab.ssm_proxy(&["status", "--json"]), "status");
    let pid = serde_json::from_str::<serde_json::Value>(&js).expect("json")[0]["pid"].as_u64().expect("pid");
    ok(Command::new("kill").args(["-9", &pid.to_string()]).output().expect("kill"), "kill -9");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "the tunnel process survived SIGKILL");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The stale socket does not fool status.
    let st = lab.ssm_proxy(&["status"]);
    assert!(text(&st).contains("not answering"), "{}", text(&st));
    let c = ok(lab.ssm_proxy(&["cleanup"]), "cleanup");
    assert!(c.contains("cleaned up after tunnel \"lab\""), "{c}");
    let after = main_routes(&lab);
    assert_eq!(after, before);
    let links = ok(Command::new("ip").args(["-n", &lab.ns("laptop"), "link"]).output().expect("ip"), "ip link");
    assert!(!links.contains("tun"), "{links}");
    let left: Vec<String> = std::fs::read_dir(lab.run_dir())
        .expect("run dir")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| !n.ends_with(".log"))
        .collect();
    assert!(left.is_empty(), "cleanup left files: {left:?}");
    // And a new tunnel with the same name starts cleanly afterwards.
    let mut again = lab.start(&[]);
    ok(lab.ssm_proxy(&["stop"]), "stop");
    assert!(wait_exit(&mut again, Duration::from_secs(20)).success());
}

#[test]
fn curl_through_a_slow_lossy_link() {
    if !require_root("curl_through_a_slow_lossy_link") {
        return;
    }
    // 20 ms each way and 0.5% loss each way on the laptop <-> aws link (netem-lite).
    let lab = Lab::up(&prefix("d"), 50, &[("IMPAIR", "20 0.005")]);
    let rtt = ok(lab.laptop_out("ping", &["-c", "3", "-i", "0.2", "192.168.102.2"]), "ping aws");
    assert!(rtt.contains("rtt min/avg/max"), "{rtt}");
    let mut daemon = lab.start(&[]);
    let speed = lab.fetch_blob(200);
    eprintln!("50 MiB over 40 ms RTT, 0.5% loss: {:.2} MB/s", speed / 1e6);
    lab.stop(&mut daemon, "lab");
}

#[test]
fn two_tunnels_share_one_agent() {
    if !require_root("two_tunnels_share_one_agent") {
        return;
    }
    let lab = Lab::up(&prefix("m"), 5, &[]);
    let mut a = lab.start_named("alpha", &["--cidr", "10.10.0.2/32"], &[]);
    let mut b = lab.start_named("beta", &["--cidr", "10.10.0.3/32"], &[]);
    // A third one over the same range is refused before it touches anything.
    let clash =
        lab.ssm_proxy(&["start", "--instance-id", "i-0123456789abcdef0", "--name", "gamma", "--cidr", "10.10.0.0/24"]);
    assert!(!clash.status.success() && text(&clash).contains("conflict"), "{}", text(&clash));
    // Both carry traffic at once, each through its own device and agent client.
    let url = |host: &str| format!("http://{host}:8080/blob");
    let mut fetches: Vec<std::process::Child> = ["10.10.0.2", "10.10.0.3"]
        .iter()
        .map(|h| {
            lab.laptop("curl")
                .args(["-sS", "-m", "60", "-o", "/dev/null", "-w", "%{size_download}", &url(h)])
                .stdout(Stdio::piped())
                .spawn()
                .expect("curl")
        })
        .collect();
    for f in fetches.drain(..) {
        let out = f.wait_with_output().expect("curl");
        assert_eq!(String::from_utf8_lossy(&out.stdout), (5u64 << 20).to_string());
    }
    let js = ok(lab.ssm_proxy(&["status", "--json"]), "status");
    let v: serde_json::Value = serde_json::from_str(&js).expect("json");
    let names: Vec<&str> = v.as_array().expect("array").iter().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(names, vec!["alpha", "beta"]);
    for t in v.as_array().expect("array") {
        assert!(t["received"]["bytes"].as_u64().unwrap_or(0) >= 5 << 20, "{t}");
    }
    assert_ne!(v[0]["interface"], v[1]["interface"]);
    assert!(lab.log("agent.log").matches("client connected").count() >= 2);
    let which = lab.ssm_proxy(&["stop"]);
    assert!(text(&which).contains("several tunnels run (alpha, beta)"), "{}", text(&which));
    ok(lab.ssm_proxy(&["stop", "--name", "alpha"]), "stop alpha");
    ok(lab.ssm_proxy(&["stop", "--name", "beta"]), "stop beta");
    assert!(wait_exit(&mut a, Duration::from_secs(20)).success());
    assert!(wait_exit(&mut b, Duration::from_secs(20)).success());
}

#[test]
fn split_dns_resolves_private_names_through_the_tunnel_and_nothing_else() {
    if !require_root("split_dns_resolves_private_names_through_the_tunnel_and_nothing_else") {
        return;
    }
    let lab = Lab::up(&prefix("s"), 1, &[]);
    let mut daemon = lab.start(&["--dns-domain", "corp.internal"]);
    let s = tunnel_status(&lab);
    let server = s["dns_server"].as_str().expect("a DNS server in status").to_string();
    assert_eq!(s["dns_domains"], serde_json::json!(["corp.internal"]));

    lab.resolve_through(&server);

    let hosts = ok(lab.laptop_out("getent", &["hosts", "db.corp.internal"]), "getent");
    assert!(hosts.starts_with("10.10.0.2"), "{hosts}");
    let answer =
        ok(lab.laptop_out("psql", &["-h", "db.corp.internal", "-U", "postgres", "-tAc", "select 'by name'"]), "psql");
    assert_eq!(answer, "by name");
    // DNS over TCP reaches the instance's resolver too.
    let tcp = ok(
        lab.laptop_out("dig", &["+tcp", "+short", "+time=3", "+tries=1", &format!("@{server}"), "db.corp.internal"]),
        "dig",
    );
    assert_eq!(tcp, "10.10.0.2");

    // A name outside the domain is refused on the laptop and never reaches the
    // VPC's resolver.
    let outside = lab.laptop_out("getent", &["hosts", "www.outside.example"]);
    assert!(!outside.status.success(), "{}", text(&outside));
    let dig = text(&lab.laptop_out("dig", &["+time=3", "+tries=1", &format!("@{server}"), "mail.outside.example"]));
    assert!(dig.contains("status: REFUSED"), "{dig}");
    // Over TCP too: the agent answers REFUSED itself and the VPC never sees it.
    let dig =
        text(&lab.laptop_out("dig", &["+tcp", "+time=3", "+tries=1", &format!("@{server}"), "ftp.outside.example"]));
    assert!(dig.contains("status: REFUSED"), "{dig}");
    let queries = lab.log("dnsmasq.log");
    assert!(queries.contains("db.corp.internal"), "the vpc resolver saw no query at all:\n{queries}");
    assert!(!queries.contains("outside.example"), "a name outside the domain went through the tunnel:\n{queries}");

    let s = tunnel_status(&lab);
    assert!(s["dns_forwarded"].as_u64().unwrap_or(0) >= 2, "{s}");
    assert!(s["dns_refused"].as_u64().unwrap_or(0) >= 2, "{s}");

    lab.stop(&mut daemon, "lab");
    if !std::path::Path::new("/run/systemd/resolve").exists() {
        let log = lab.log("daemon-lab.log");
        assert!(
            log.contains("systemd-resolved is not running") && log.contains(&format!("nameserver {server}")),
            "{log}"
        );
    }
}

#[test]
fn dns_auto_resolves_the_route53_private_zone_of_the_instances_vpc() {
    if !require_root("dns_auto_resolves_the_route53_private_zone_of_the_instances_vpc") {
        return;
    }
    // The agent reports the instance's VPC; the emulated Route 53 associates the
    // private zone private.lab with it; the vpc's DNS server answers for it.
    let lab = Lab::up(&prefix("z"), 1, &[]);
    let mut daemon = lab.start(&["--dns-auto"]);
    let s = tunnel_status(&lab);
    let server = s["dns_server"].as_str().expect("a DNS server in status").to_string();
    let domains: Vec<&str> = s["dns_domains"].as_array().expect("domains").iter().filter_map(|d| d.as_str()).collect();
    assert_eq!(domains, ["ec2.internal", "eks.amazonaws.com", "private.lab"], "{s}");
    lab.resolve_through(&server);
    let answer = ok(
        lab.laptop_out("psql", &["-h", "db.private.lab", "-U", "postgres", "-tAc", "select 'private zone'"]),
        "psql",
    );
    assert_eq!(answer, "private zone");
    // corp.internal is served by the same resolver but is no zone of this VPC.
    let dig = text(&lab.laptop_out("dig", &["+time=3", "+tries=1", &format!("@{server}"), "db.corp.internal"]));
    assert!(dig.contains("status: REFUSED"), "{dig}");
    let log = lab.log("daemon-lab.log");
    assert!(log.contains("Route 53 private zones resolve through the tunnel"), "{log}");
    lab.stop(&mut daemon, "lab");
}

#[test]
fn agent_status_answers_through_ssm() {
    if !require_root("agent_status_answers_through_ssm") {
        return;
    }
    let lab = Lab::up(&prefix("a"), 1, &[]);
    let ask = || {
        let js =
            ok(lab.ssm_proxy(&["agent", "status", "--instance-id", "i-0123456789abcdef0", "--json"]), "agent status");
        serde_json::from_str::<serde_json::Value>(&js).expect("status JSON")
    };
    let idle = ask();
    assert!(idle["software"].as_str().unwrap_or("").starts_with("ec2-agent "), "{idle}");
    assert_eq!(idle["sessions"], 0, "{idle}");
    assert_eq!(idle["vpc"], "vpc-0a1b2c3d4e5f60718", "{idle}");
    assert_eq!(idle["resolvers"], serde_json::json!(["10.10.0.2"]), "{idle}");
    assert!(idle["deny"].as_array().is_some_and(|d| d.iter().any(|x| x == "169.254.0.0/16")), "{idle}");

    let mut daemon = lab.start(&[]);
    let busy = ask();
    assert_eq!(busy["sessions"], 1, "the tunnel's session: {busy}");
    assert_eq!(busy["resumable_sessions"], 1, "{busy}");
    let text = ok(lab.ssm_proxy(&["agent", "status", "--instance-id", "i-0123456789abcdef0"]), "agent status");
    assert!(text.contains("sessions   1 now"), "{text}");
    assert!(lab.log("agent.log").contains("status query"), "{}", lab.log("agent.log"));
    lab.stop(&mut daemon, "lab");
}

#[test]
fn a_tunnel_named_in_the_config_file_starts_by_name() {
    if !require_root("a_tunnel_named_in_the_config_file_starts_by_name") {
        return;
    }
    let lab = Lab::up(&prefix("c"), 1, &[]);
    let config = lab.dir().join("config.toml");
    std::fs::write(
        &config,
        "[tunnel.vpc]\ninstance_id = \"i-0123456789abcdef0\"\ncidrs = [\"10.10.0.0/16\"]\ndns_domains = [\"corp.internal\"]\n",
    )
    .expect("config");
    let env = [("SSM_PROXY_CONFIG", config.to_str().expect("path"))];
    let mut daemon = lab.start_with("vpc", &["start", "vpc"], &env);
    let listed = ok(lab.laptop(env!("CARGO_BIN_EXE_ssm-proxy")).arg("list").envs(env).output().expect("list"), "list");
    assert!(
        listed.lines().any(|l| l.starts_with("vpc") && l.contains("running") && l.contains("10.10.0.0/16")),
        "{listed}"
    );
    let answer =
        ok(lab.laptop_out("psql", &["-h", "10.10.0.2", "-U", "postgres", "-tAc", "select 'from the config'"]), "psql");
    assert_eq!(answer, "from the config");
    let s = tunnel_status(&lab);
    assert_eq!(s["name"], "vpc");
    assert_eq!(s["dns_domains"], serde_json::json!(["corp.internal"]));
    lab.stop(&mut daemon, "vpc");
}

/// The daemon SIGKILLed in the middle of a download, then simply started
/// again (no `cleanup`): the new tunnel comes up, holds exactly one route per
/// CIDR, carries the download in full, and `stop` leaves the routes as they
/// were before the first start.
#[test]
fn kill_9_mid_transfer_then_start_again_leaves_no_duplicate_route() {
    if !require_root("kill_9_mid_transfer_then_start_again_leaves_no_duplicate_route") {
        return;
    }
    let lab = Lab::up(&prefix("m"), 8, &[]);
    let before = main_routes(&lab);
    let mut first = lab.start(&[]);
    let _curl = lab.download_in_background("2M", 20);
    std::thread::sleep(Duration::from_secs(1));
    let moving = tunnel_status(&lab);
    assert!(moving["received"]["bytes"].as_u64().unwrap_or(0) > 1 << 20, "mid-transfer: {moving}");
    ok(Command::new("kill").args(["-9", &first.0.id().to_string()]).output().expect("kill"), "kill -9");
    let _ = wait_exit(&mut first, Duration::from_secs(10));

    let mut again = lab.start(&[]);
    let routes = main_routes(&lab);
    let ours: Vec<&str> = routes.lines().filter(|l| l.starts_with("10.10.0.0/16")).collect();
    assert_eq!(ours.len(), 1, "one route for the CIDR:\n{routes}");
    lab.fetch_blob(60);
    lab.stop(&mut again, "lab");
    assert_eq!(main_routes(&lab), before, "stop restored the table");
}
