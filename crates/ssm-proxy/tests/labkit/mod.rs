//! The namespace lab (scripts/lab.sh) as the end-to-end tests drive it: the
//! lab itself, the daemon in its laptop namespace, and the clients.
#![allow(dead_code)] // Each test binary uses its own part of the kit.

use crate::netns;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_ssm-proxy")).parent().expect("target dir").to_path_buf()
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A lab that is torn down when dropped, pass or fail.
pub struct Lab {
    pub prefix: String,
    pub env: Vec<(String, String)>,
}

impl Lab {
    pub fn up(prefix: &str, blob_mib: u32, extra_env: &[(&str, &str)]) -> Lab {
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

    pub fn ns(&self, which: &str) -> String {
        format!("{}-{which}", self.prefix)
    }

    pub fn dir(&self) -> PathBuf {
        PathBuf::from(format!("/tmp/ssm-proxy-{}", self.prefix))
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir().join("run")
    }

    /// A command in the laptop namespace with the lab's AWS environment.
    pub fn laptop(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns("laptop"), program]);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c.stdin(Stdio::null());
        c
    }

    pub fn laptop_out(&self, program: &str, args: &[&str]) -> Output {
        self.laptop(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"))
    }

    pub fn ssm_proxy(&self, args: &[&str]) -> Output {
        self.laptop_out(env!("CARGO_BIN_EXE_ssm-proxy"), args)
    }

    /// Start the daemon; returns once it printed its ready line.
    pub fn start(&self, extra: &[&str]) -> netns::KillOnDrop {
        self.start_named("lab", &["--cidr", "10.10.0.0/16"], extra)
    }

    pub fn start_named(&self, name: &str, cidrs: &[&str], extra: &[&str]) -> netns::KillOnDrop {
        let mut args = vec!["start", "--instance-id", "i-0123456789abcdef0", "--name", name];
        args.extend_from_slice(cidrs);
        args.extend_from_slice(extra);
        self.start_with(name, &args, &[])
    }

    /// `ssm-proxy <args>` (a start), waiting for tunnel `name`'s ready line.
    pub fn start_with(&self, name: &str, args: &[&str], env: &[(&str, &str)]) -> netns::KillOnDrop {
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
    pub fn fetch_blob(&self, max_secs: u32) -> f64 {
        self.fetch_blob_limited(max_secs, "0")
    }

    /// The same at most `rate` bytes per second (curl's --limit-rate; "0": no limit).
    pub fn fetch_blob_limited(&self, max_secs: u32, rate: &str) -> f64 {
        self.fetch_url("http://10.10.0.2:8080/blob", max_secs, rate)
    }

    /// [`Lab::fetch_blob_limited`] from `url` (another address of the vpc's
    /// server, an IPv6 literal in brackets included).
    pub fn fetch_url(&self, url: &str, max_secs: u32, rate: &str) -> f64 {
        let file = self.dir().join("download");
        let out = self.laptop_out(
            "curl",
            &[
                "-gsS",
                "--limit-rate",
                rate,
                "-m",
                &max_secs.to_string(),
                "-o",
                file.to_str().expect("path"),
                "-w",
                "%{speed_download}",
                url,
            ],
        );
        let speed = ok(out, "curl");
        let got = ok(Command::new("sha256sum").arg(&file).output().expect("sha256sum"), "sha256sum");
        assert_eq!(got.split_whitespace().next(), Some(self.log("blob.sha256").trim()), "download corrupted");
        speed.parse().unwrap_or(0.0)
    }

    /// The vpc's test file downloading in the background at `rate`, for at
    /// most `max_secs`, its bytes thrown away: a transfer to break. Killed
    /// when dropped.
    pub fn download_in_background(&self, rate: &str, max_secs: u32) -> netns::KillOnDrop {
        let curl = self
            .laptop("curl")
            .args(["-sS", "--limit-rate", rate, "-m", &max_secs.to_string(), "-o", "/dev/null"])
            .arg("http://10.10.0.2:8080/blob")
            .stderr(Stdio::null())
            .spawn()
            .expect("curl");
        netns::KillOnDrop(curl)
    }

    /// Send the vpc's test file from the laptop to a sink in the vpc through the
    /// tunnel, check that the sink got it byte for byte (sha256), and return
    /// the bytes per second.
    pub fn upload_blob(&self, max_secs: u64) -> f64 {
        const SINK: &str = "import hashlib, socket, sys\n\
s = socket.create_server(('10.10.0.2', 9000))\n\
print('ready', flush=True)\n\
c, _ = s.accept()\n\
h, n = hashlib.sha256(), 0\n\
while True:\n    d = c.recv(1 << 16)\n    if not d: break\n    h.update(d); n += len(d)\n\
print(n, h.hexdigest(), flush=True)\n";
        const SEND: &str = "import socket, sys, time\n\
c = socket.create_connection(('10.10.0.2', 9000))\n\
t = time.monotonic(); n = 0\n\
with open(sys.argv[1], 'rb') as f:\n    while d := f.read(1 << 16):\n        c.sendall(d); n += len(d)\n\
c.shutdown(socket.SHUT_WR); c.recv(1)\n\
print(n / (time.monotonic() - t))\n";
        let mut sink = Command::new("ip");
        sink.args(["netns", "exec", &self.ns("vpc"), "python3", "-c", SINK]).stdout(Stdio::piped());
        let mut sink = netns::KillOnDrop(sink.spawn().expect("python3 sink"));
        let mut lines = BufReader::new(sink.0.stdout.take().expect("stdout")).lines();
        assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("ready"), "the sink did not start");
        let blob = self.dir().join("www/blob");
        let mut send = self.laptop("timeout");
        send.args([&max_secs.to_string(), "python3", "-c", SEND, blob.to_str().expect("path")]);
        let speed = ok(send.output().expect("python3 sender"), "upload");
        let got = lines.next().and_then(Result::ok).unwrap_or_default();
        let size = std::fs::metadata(&blob).expect("blob").len();
        assert_eq!(got, format!("{size} {}", self.log("blob.sha256").trim()), "upload corrupted or cut short");
        speed.parse().unwrap_or(0.0)
    }

    /// TerminateSession for `session_id`, as an administrator (or the maximum
    /// session duration) would end it: a signed API call from the laptop.
    pub fn terminate_session(&self, session_id: &str) {
        let env: std::collections::HashMap<_, _> = self.env.iter().cloned().collect();
        let key = format!("{}:{}", env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]);
        let body = format!("{{\"SessionId\":\"{session_id}\"}}");
        let terminated = self.laptop_out(
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
                &body,
                &env["AWS_ENDPOINT_URL"],
            ],
        );
        ok(terminated, "TerminateSession");
    }

    /// `ssm-proxy stop --name NAME`; the daemon must exit cleanly within 20 s.
    pub fn stop(&self, daemon: &mut netns::KillOnDrop, name: &str) {
        ok(self.ssm_proxy(&["stop", "--name", name]), "stop");
        let log = format!("daemon-{name}.log");
        assert!(wait_exit(daemon, Duration::from_secs(20)).success(), "{}", self.log(&log));
    }

    /// Point the laptop's resolv.conf at `server` (the tunnel resolver), as a
    /// `nameserver` line would (the lab has no systemd-resolved to route by domain).
    pub fn resolve_through(&self, server: &str) {
        let etc = PathBuf::from(format!("/etc/netns/{}", self.ns("laptop")));
        std::fs::create_dir_all(&etc).expect("/etc/netns dir");
        std::fs::write(etc.join("resolv.conf"), format!("nameserver {server}\noptions timeout:2 attempts:1\n"))
            .expect("resolv.conf");
    }

    /// `kill -9` the first instance's ec2-agent (after checking the pid is it).
    /// Starts the instance's ec2-agent again, as lab.sh does (its pid replaces
    /// the old one in agent.pid; `down` stops it with the namespace).
    pub fn restart_first_agent(&self) {
        let vpc = "vpc-0a1b2c3d4e5f60718 us-east-1";
        let log =
            std::fs::OpenOptions::new().append(true).create(true).open(self.dir().join("agent.log")).expect("log");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns("instance"),
                "setpriv",
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
            ])
            .arg(bin_dir().join("ec2-agent"))
            .args(["--listen", "127.0.0.1:7301", "--vpc", vpc])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start the ec2-agent again");
        std::fs::write(self.dir().join("agent.pid"), child.id().to_string()).expect("agent.pid");
        // Reaped when it ends (lab.sh down kills everything in the namespace).
        let mut child = child;
        std::thread::spawn(move || child.wait());
    }

    /// Kill the emulator (the AWS side: every session and websocket with it)
    /// and start it again with the same command line, as a service restart
    /// would look to the laptop; returns once it listens again.
    pub fn restart_emulator(&self) {
        let pids = ok(Command::new("ip").args(["netns", "pids", &self.ns("aws")]).output().expect("ip"), "netns pids");
        let (pid, cmdline) = pids
            .lines()
            .find_map(|p| {
                let c = std::fs::read(format!("/proc/{p}/cmdline")).ok()?;
                String::from_utf8_lossy(&c).contains("ssm-emulator").then(|| (p.to_string(), c))
            })
            .expect("the emulator's process");
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        ok(Command::new("kill").args(["-9", &pid]).output().expect("kill"), "kill the emulator");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let log =
            std::fs::OpenOptions::new().append(true).create(true).open(self.dir().join("emulator.log")).expect("log");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns("aws")])
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start the emulator again");
        // Reaped when it ends (lab.sh down kills everything in the namespace).
        std::thread::spawn(move || child.wait());
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let up = Command::new("ip")
                .args(["netns", "exec", &self.ns("laptop"), "bash", "-c", "exec 3<>/dev/tcp/192.168.102.2/4566"])
                .output()
                .is_ok_and(|o| o.status.success());
            if up {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the emulator did not listen again:\n{}", self.log("emulator.log"));
    }

    pub fn kill_first_agent(&self) {
        let pid = self.log("agent.pid").trim().to_string();
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(cmdline.contains("ec2-agent"), "agent.pid names {cmdline:?}");
        ok(Command::new("kill").args(["-9", &pid]).output().expect("kill"), "kill the first agent");
    }

    pub fn log(&self, name: &str) -> String {
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

pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

pub fn ok(o: Output, what: &str) -> String {
    assert!(o.status.success(), "{what} failed: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The laptop's main routing tables, IPv4 and IPv6: where routes are added. (The
/// local table also holds the veth's link-local address, which the kernel assigns
/// on its own schedule after the link comes up.)
pub fn main_routes(lab: &Lab) -> String {
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

pub fn wait_exit(child: &mut netns::KillOnDrop, within: Duration) -> std::process::ExitStatus {
    exit_within(child, within).unwrap_or_else(|| panic!("the daemon did not exit within {within:?}"))
}

/// How `child` exited, if it does within `within`.
pub fn exit_within(child: &mut netns::KillOnDrop, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.0.try_wait().expect("wait") {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(std::env::var("SSM_PROXY_ROOT_TESTS").as_deref() != Ok("require"), "{test} needs root");
    eprintln!("skipped: {test} needs root (network namespaces)");
    false
}

/// A lab prefix unique to this process and this call (tests of one binary
/// run at once, so two of them giving the same tag still get two labs):
/// the tag, the pid and a letter; short enough for interface names.
pub fn prefix(tag: &str) -> String {
    static CALLS: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 26;
    format!("{tag}{}{}", std::process::id() % 100_000, char::from(b'a' + n))
}

/// One psql session held open from the laptop, asked one query at a time.
pub struct Psql {
    _child: netns::KillOnDrop,
    input: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Psql {
    pub fn open(lab: &Lab) -> Psql {
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

    /// Asks again and waits for the connection to be lost (psql exits): how
    /// long that took, or `None` if psql answered or was still waiting.
    pub fn lost_within(&mut self, within: Duration) -> Option<Duration> {
        use std::io::Write;
        let started = Instant::now();
        let _ = self.input.write_all(b"select pg_backend_pid();\n").and_then(|()| self.input.flush());
        match self.lines.recv_timeout(within) {
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Some(started.elapsed()),
            Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
        }
    }

    /// The server process behind this connection: the same answer means the
    /// same TCP connection.
    pub fn backend_pid(&mut self, within: Duration) -> String {
        use std::io::Write;
        self.input.write_all(b"select pg_backend_pid();\n").expect("psql stdin");
        self.input.flush().expect("flush");
        self.lines.recv_timeout(within).expect("psql answered")
    }
}

pub fn tunnel_status(lab: &Lab) -> serde_json::Value {
    let js = ok(lab.ssm_proxy(&["status", "--json"]), "status");
    serde_json::from_str::<serde_json::Value>(&js).expect("status JSON")[0].clone()
}

/// Poll `status` until `done` holds (or `within` passes); the last status.
pub fn wait_status(lab: &Lab, within: Duration, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let s = tunnel_status(lab);
        if done(&s) || Instant::now() >= deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
