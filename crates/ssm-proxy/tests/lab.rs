//! End to end in the namespace lab (scripts/lab.sh): `ssm-proxy start` in `laptop`,
//! the emulator in `aws`, the real `ec2-agent` as nobody in `instance`, real servers
//! in `vpc`, and real clients (psql, curl, dig, ping, nc) with no per-app setup.
//! Root only; each test builds its own lab under its own prefix and tears it down.

mod netns;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_ssm-proxy")).parent().expect("target dir").to_path_buf()
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A lab that is torn down when dropped, pass or fail.
struct Lab {
    prefix: String,
    env: Vec<(String, String)>,
}

impl Lab {
    fn up(prefix: &str, blob_mib: u32, extra_env: &[(&str, &str)]) -> Lab {
        for b in ["ssm-emulator", "ec2-agent"] {
            assert!(
                bin_dir().join(b).exists(),
                "{b} is not built in {}: run `cargo build --workspace --bins` first (make test does)",
                bin_dir().display()
            );
        }
        let lab = Lab { prefix: prefix.to_string(), env: Vec::new() };
        let mut cmd = Command::new("bash");
        cmd.arg(repo_root().join("scripts/lab.sh")).arg("up").arg(bin_dir());
        cmd.env("LAB", prefix).env("BLOB_MIB", blob_mib.to_string()).stdin(Stdio::null());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run lab.sh");
        assert!(out.status.success(), "lab.sh up failed: {}", String::from_utf8_lossy(&out.stderr));
        let env_out = Command::new("bash")
            .arg(repo_root().join("scripts/lab.sh"))
            .arg("env")
            .env("LAB", prefix)
            .output()
            .expect("lab.sh env");
        let mut lab = lab;
        lab.env = String::from_utf8_lossy(&env_out.stdout)
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect();
        lab
    }

    fn ns(&self, which: &str) -> String {
        format!("{}-{which}", self.prefix)
    }

    fn dir(&self) -> PathBuf {
        PathBuf::from(format!("/tmp/ssm-proxy-{}", self.prefix))
    }

    fn run_dir(&self) -> PathBuf {
        self.dir().join("run")
    }

    /// A command in the laptop namespace with the lab's AWS environment.
    fn laptop(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns("laptop"), program]);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c.stdin(Stdio::null());
        c
    }

    fn laptop_out(&self, program: &str, args: &[&str]) -> Output {
        self.laptop(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"))
    }

    fn ssm_proxy(&self, args: &[&str]) -> Output {
        self.laptop_out(env!("CARGO_BIN_EXE_ssm-proxy"), args)
    }

    /// Start the daemon; returns once it printed its ready line.
    fn start(&self, extra: &[&str]) -> netns::KillOnDrop {
        self.start_named("lab", &["--cidr", "10.10.0.0/16"], extra)
    }

    fn start_named(&self, name: &str, cidrs: &[&str], extra: &[&str]) -> netns::KillOnDrop {
        let mut args = vec!["start", "--instance-id", "i-0123456789abcdef0", "--name", name];
        args.extend_from_slice(cidrs);
        args.extend_from_slice(extra);
        self.start_with(name, &args, &[])
    }

    /// `ssm-proxy <args>` (a start), waiting for tunnel `name`'s ready line.
    fn start_with(&self, name: &str, args: &[&str], env: &[(&str, &str)]) -> netns::KillOnDrop {
        let mut cmd = self.laptop(env!("CARGO_BIN_EXE_ssm-proxy"));
        cmd.args(args).envs(env.iter().copied());
        cmd.stdout(Stdio::piped()).stderr(Stdio::from(
            std::fs::File::create(self.dir().join(format!("daemon-{name}.log"))).expect("daemon log"),
        ));
        let mut child = cmd.spawn().expect("spawn ssm-proxy start");
        let stdout = child.stdout.take().expect("stdout");
        let child = netns::KillOnDrop(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains(&format!("tunnel \"{name}\" up")) => return child,
                Ok(_) => {}
                Err(_) => panic!(
                    "the daemon did not come up:\n{}",
                    std::fs::read_to_string(self.dir().join(format!("daemon-{name}.log"))).unwrap_or_default()
                ),
            }
        }
    }

    /// Download the vpc's test file with curl through the tunnel, check it byte for
    /// byte (sha256), and return curl's speed in bytes per second.
    fn fetch_blob(&self, max_secs: u32) -> f64 {
        self.fetch_blob_limited(max_secs, "0")
    }

    /// The same at most `rate` bytes per second (curl's --limit-rate; "0": no limit).
    fn fetch_blob_limited(&self, max_secs: u32, rate: &str) -> f64 {
        let file = self.dir().join("download");
        let out = self.laptop_out(
            "curl",
            &[
                "-sS",
                "--limit-rate",
                rate,
                "-m",
                &max_secs.to_string(),
                "-o",
                file.to_str().expect("path"),
                "-w",
                "%{speed_download}",
                "http://10.10.0.2:8080/blob",
            ],
        );
        let speed = ok(out, "curl");
        let got = ok(Command::new("sha256sum").arg(&file).output().expect("sha256sum"), "sha256sum");
        assert_eq!(got.split_whitespace().next(), Some(self.log("blob.sha256").trim()), "download corrupted");
        speed.parse().unwrap_or(0.0)
    }

    /// `ssm-proxy stop --name NAME`; the daemon must exit cleanly within 20 s.
    fn stop(&self, daemon: &mut netns::KillOnDrop, name: &str) {
        ok(self.ssm_proxy(&["stop", "--name", name]), "stop");
        let log = format!("daemon-{name}.log");
        assert!(wait_exit(daemon, Duration::from_secs(20)).success(), "{}", self.log(&log));
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir().join(name)).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // A failed test shows the logs of what it ran before they go with the lab.
        if std::thread::panicking() {
            let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir())
                .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            logs.retain(|p| p.extension().is_some_and(|e| e == "log"));
            logs.sort();
            for log in logs {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("----- {} (last {} lines) -----", log.display(), lines.len().min(40));
                for line in &lines[lines.len().saturating_sub(40)..] {
                    eprintln!("{line}");
                }
            }
        }
        let _ =
            Command::new("bash").arg(repo_root().join("scripts/lab.sh")).arg("down").env("LAB", &self.prefix).output();
    }
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn ok(o: Output, what: &str) -> String {
    assert!(o.status.success(), "{what} failed: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The laptop's main routing tables, IPv4 and IPv6: where routes are added. (The
/// local table also holds the veth's link-local address, which the kernel assigns
/// on its own schedule after the link comes up.)
fn main_routes(lab: &Lab) -> String {
    let v4 = ok(
        Command::new("ip").args(["-n", &lab.ns("laptop"), "route", "show", "table", "main"]).output().expect("ip"),
        "ip route",
    );
    let v6 = ok(
        Command::new("ip")
            .args(["-n", &lab.ns("laptop"), "-6", "route", "show", "table", "main"])
            .output()
            .expect("ip"),
        "ip -6 route",
    );
    format!("{v4}\n--- ipv6 ---\n{v6}")
}

fn wait_exit(child: &mut netns::KillOnDrop, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.0.try_wait().expect("wait") {
            return s;
        }
        assert!(Instant::now() < deadline, "the daemon did not exit within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(std::env::var("SSM_PROXY_ROOT_TESTS").as_deref() != Ok("require"), "{test} needs root");
    eprintln!("skipped: {test} needs root (network namespaces)");
    false
}

fn prefix(tag: &str) -> String {
    format!("{tag}{}", std::process::id() % 100_000)
}

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

    // ping -c 5.
    let p = ok(lab.laptop_out("ping", &["-c", "5", "-i", "0.2", "-W", "3", "10.10.0.2"]), "ping");
    assert!(p.contains("5 received"), "{p}");

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

    // The laptop resolves through the tunnel resolver, as a resolv.conf line would
    // make it (this lab has no systemd-resolved to route by domain).
    let etc = PathBuf::from(format!("/etc/netns/{}", lab.ns("laptop")));
    std::fs::create_dir_all(&etc).expect("/etc/netns dir");
    std::fs::write(etc.join("resolv.conf"), format!("nameserver {server}\noptions timeout:2 attempts:1\n"))
        .expect("resolv.conf");

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

/// One psql session held open from the laptop, asked one query at a time.
struct Psql {
    _child: netns::KillOnDrop,
    input: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Psql {
    fn open(lab: &Lab) -> Psql {
        let mut psql = lab.laptop("psql");
        psql.args(["-h", "10.10.0.2", "-U", "postgres", "-tA", "-v", "ON_ERROR_STOP=1"]);
        psql.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = netns::KillOnDrop(psql.spawn().expect("psql"));
        let input = child.0.stdin.take().expect("stdin");
        let output = child.0.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(output).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Psql { _child: child, input, lines }
    }

    /// The server process behind this connection: the same answer means the
    /// same TCP connection.
    fn backend_pid(&mut self, within: Duration) -> String {
        use std::io::Write;
        self.input.write_all(b"select pg_backend_pid();\n").expect("psql stdin");
        self.input.flush().expect("flush");
        self.lines.recv_timeout(within).expect("psql answered")
    }
}

fn tunnel_status(lab: &Lab) -> serde_json::Value {
    let js = ok(lab.ssm_proxy(&["status", "--json"]), "status");
    serde_json::from_str::<serde_json::Value>(&js).expect("status JSON")[0].clone()
}

#[test]
fn a_download_survives_the_websocket_being_recycled_every_ten_seconds() {
    if !require_root("a_download_survives_the_websocket_being_recycled_every_ten_seconds") {
        return;
    }
    // The service ends every websocket with 1000 "Bye" after 10 s, as the real one
    // does after its own limits; the client resumes the session each time.
    let lab = Lab::up(&prefix("w"), 50, &[("EMULATOR_ARGS", "--close-every 10")]);
    let mut daemon = lab.start(&[]);
    // 1.5 MiB/s: the 50 MiB take about 33 s, across three recycles (curl's
    // limit is an average; it bursts at the start).
    let speed = lab.fetch_blob_limited(120, "1536K");
    let s = tunnel_status(&lab);
    eprintln!("50 MiB while the websocket is recycled every 10 s: {:.2} MB/s, status {s}", speed / 1e6);
    assert!(s["reconnects"].as_u64().unwrap_or(0) >= 2, "{s}");
    assert_eq!(s["state"], "connected", "{s}");
    lab.stop(&mut daemon, "lab");
}

#[test]
fn a_psql_connection_survives_a_thirty_second_outage() {
    if !require_root("a_psql_connection_survives_a_thirty_second_outage") {
        return;
    }
    let lab = Lab::up(&prefix("o"), 1, &[]);
    let mut daemon = lab.start(&[]);
    let mut psql = Psql::open(&lab);
    let before = psql.backend_pid(Duration::from_secs(10));

    // The laptop loses its network for 30 s: the far end of its link goes down.
    let link = |state: &str| {
        ok(
            Command::new("ip")
                .args(["-n", &lab.ns("wan"), "link", "set", &format!("{}-w0", lab.prefix), state])
                .output()
                .expect("ip"),
            "ip link",
        )
    };
    link("down");
    std::thread::sleep(Duration::from_secs(10));
    let during = tunnel_status(&lab);
    std::thread::sleep(Duration::from_secs(15));
    let later = tunnel_status(&lab);
    std::thread::sleep(Duration::from_secs(5));
    link("up");
    let t = Instant::now();
    let after = psql.backend_pid(Duration::from_secs(120));
    assert!(during["state"].as_str().unwrap_or("").starts_with("stalled"), "status 10 s into the outage: {during}");
    // After 15 s without an answer the daemon gives up on that websocket.
    assert_eq!(later["state"], "reconnecting", "status 25 s into the outage: {later}");
    eprintln!("psql answered {:?} after the link came back; status during the outage: {during}", t.elapsed());
    assert_eq!(after, before, "the same backend, so the same connection");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = tunnel_status(&lab);
    while s["state"] != "connected" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        s = tunnel_status(&lab);
    }
    assert_eq!(s["state"], "connected", "{s}");
    assert!(s["reconnects"].as_u64().unwrap_or(0) >= 1, "{s}");
    drop(psql);
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

/// Poll `status` until `done` holds (or `within` passes); the last status.
fn wait_status(lab: &Lab, within: Duration, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let s = tunnel_status(lab);
        if done(&s) || Instant::now() >= deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_psql_connection_survives_the_session_being_terminated() {
    if !require_root("a_psql_connection_survives_the_session_being_terminated") {
        return;
    }
    let lab = Lab::up(&prefix("t"), 1, &[]);
    let mut daemon = lab.start(&[]);
    let mut psql = Psql::open(&lab);
    let before = psql.backend_pid(Duration::from_secs(10));
    let old = tunnel_status(&lab)["session_id"].as_str().expect("session id").to_string();

    // The service ends the session (as an administrator's TerminateSession or the
    // maximum session duration would): the daemon starts a new one to the same
    // instance, and the ec2-agent hands the flows of our client id back.
    let env: std::collections::HashMap<_, _> = lab.env.iter().cloned().collect();
    let key = format!("{}:{}", env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]);
    let terminated = lab.laptop_out(
        "curl",
        &[
            "-sS",
            "--fail-with-body",
            "--aws-sigv4",
            "aws:amz:us-east-1:ssm",
            "--user",
            &key,
            "-H",
            "X-Amz-Target: AmazonSSM.TerminateSession",
            "-H",
            "Content-Type: application/x-amz-json-1.1",
            "-d",
            &format!("{{\"SessionId\":\"{old}\"}}"),
            &env["AWS_ENDPOINT_URL"],
        ],
    );
    ok(terminated, "TerminateSession");
    let s =
        wait_status(&lab, Duration::from_secs(30), |s| s["session_id"] != old.as_str() && s["state"] == "connected");
    assert_eq!(s["state"], "connected", "{s}");
    assert_ne!(s["session_id"], old.as_str(), "{s}");
    assert_eq!(s["new_sessions"], 1, "{s}");
    assert_eq!(s["failovers"], 0, "{s}");
    let after = psql.backend_pid(Duration::from_secs(30));
    assert_eq!(after, before, "the same backend, so the same connection");
    assert!(lab.log("agent.log").contains("client resumed its session"), "{}", lab.log("agent.log"));
    drop(psql);
    lab.stop(&mut daemon, "lab");
}

#[test]
fn traffic_moves_to_the_second_instance_when_the_first_agent_dies() {
    if !require_root("traffic_moves_to_the_second_instance_when_the_first_agent_dies") {
        return;
    }
    let lab = Lab::up(&prefix("f"), 1, &[("SECOND_INSTANCE", "1")]);
    let env: std::collections::HashMap<_, _> = lab.env.iter().cloned().collect();
    let (first, second) = (env["LAB_INSTANCE"].as_str(), env["LAB_INSTANCE2"].as_str());
    let args = ["start", "--instance-id", first, "--instance-id", second, "--name", "lab", "--cidr", "10.10.0.0/16"];
    let mut daemon = lab.start_with("lab", &args, &[]);
    let get = || lab.laptop_out("curl", &["-sS", "-m", "2", "-o", "/dev/null", "http://10.10.0.2:8080/"]);
    ok(get(), "curl through the first instance");
    assert_eq!(tunnel_status(&lab)["instance_id"], first);

    // The first instance's ec2-agent dies.
    let pid = lab.log("agent.pid").trim().to_string();
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(cmdline.contains("ec2-agent"), "agent.pid names {cmdline:?}");
    ok(Command::new("kill").args(["-9", &pid]).output().expect("kill"), "kill");
    let killed = Instant::now();
    let mut answered = None;
    while killed.elapsed() < Duration::from_secs(60) {
        if get().status.success() {
            answered = Some(killed.elapsed());
            break;
        }
    }
    let switch =
        answered.unwrap_or_else(|| panic!("no answer through the second instance:\n{}", lab.log("daemon-lab.log")));
    let s = wait_status(&lab, Duration::from_secs(10), |s| s["state"] == "connected");
    eprintln!(
        "traffic moved to the second instance {:.2} s after the first agent was killed; status {s}",
        switch.as_secs_f64()
    );
    assert_eq!(s["instance_id"], second, "{s}");
    assert_eq!(s["failovers"], 1, "{s}");
    assert_eq!(s["state"], "connected", "{s}");
    assert!(lab.log("daemon-lab.log").contains("failed over to another instance"), "{}", lab.log("daemon-lab.log"));
    lab.stop(&mut daemon, "lab");
}
