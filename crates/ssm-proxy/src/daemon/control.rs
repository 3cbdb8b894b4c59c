//! The control socket of a running tunnel (`<run dir>/<name>.sock`) and the
//! `status` and `stop` commands that talk to it.
//!
//! Protocol: the client writes one JSON line, `{"cmd":"status"}` or `{"cmd":"stop"}`,
//! and reads one JSON line back. Anyone on the machine may ask for the status; `stop`
//! is accepted only from root or the user who started the tunnel (the kernel's peer
//! credentials of the socket, not anything the client claims).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

impl From<&forwarder::link::Direction> for Counter {
    fn from(d: &forwarder::link::Direction) -> Self {
        let (packets, bytes) = d.read();
        Counter { packets, bytes }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub name: String,
    pub pid: u32,
    /// The instance carrying the tunnel now, and all the candidates.
    pub instance_id: String,
    #[serde(default)]
    pub instances: Vec<String>,
    pub region: String,
    pub session_id: String,
    /// `connected`, `stalled (...)`, `reconnecting` (resuming the session) or
    /// `reconnecting (new session, attempt N)`.
    pub state: String,
    /// While reconnecting with new sessions: what went wrong last.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Sessions opened after the first, and how many moved to another instance.
    #[serde(default)]
    pub new_sessions: u64,
    #[serde(default)]
    pub failovers: u64,
    /// Sessions replaced on schedule (--rotate-after).
    #[serde(default)]
    pub rotations: u64,
    pub uptime_secs: u64,
    pub cidrs: Vec<String>,
    pub interface: String,
    pub addresses: Vec<String>,
    pub agent: String,
    /// Laptop -> VPC.
    pub sent: Counter,
    /// VPC -> laptop.
    pub received: Counter,
    /// Round trip through the whole path (forwarder PING to the ec2-agent), ms.
    pub rtt_ms: Option<f64>,
    /// The data channel's smoothed RTT as its retransmission logic sees it, ms.
    pub channel_srtt_ms: f64,
    /// Stream messages this session put on the wire towards the agent, resends
    /// included; the distinct ones; resends (of the current session).
    #[serde(default)]
    pub messages_sent: u64,
    #[serde(default)]
    pub messages_distinct: u64,
    pub retransmissions: u64,
    /// `retransmissions / messages_sent`.
    #[serde(default)]
    pub resend_ratio: f64,
    pub reconnects: u64,
    /// Packets the outgoing queue dropped (CoDel, overflow) and that the device refused.
    pub dropped_codel: u64,
    pub dropped_overflow: u64,
    pub dropped_device: u64,
    /// TCP connections reset on the laptop because the agent no longer had them.
    #[serde(default)]
    pub flows_reset: u64,
    pub queue_delay_ms: f64,
    pub queue_delay_max_ms: f64,
    /// Split DNS: the domains resolved through the tunnel, its resolver address,
    /// queries sent through and queries for other names refused on this machine.
    #[serde(default)]
    pub dns_domains: Vec<String>,
    #[serde(default)]
    pub dns_server: Option<String>,
    #[serde(default)]
    pub dns_forwarded: u64,
    #[serde(default)]
    pub dns_refused: u64,
    /// Send window towards the agent and bytes in it now (0: the agent does not acknowledge).
    pub window_bytes: u64,
    pub in_flight_bytes: u64,
    /// Striping: the member sessions asked for, and each member (the first
    /// is the one the fields above describe).
    #[serde(default)]
    pub sessions_wanted: usize,
    #[serde(default)]
    pub members: Vec<MemberStatus>,
    /// Why there are fewer members than asked (an agent that cannot stripe).
    #[serde(default)]
    pub striping_note: Option<String>,
    /// Packets from the agent that waited for an earlier one, and numbers
    /// given up on (their packets came too late or not at all).
    #[serde(default)]
    pub reordered: u64,
    #[serde(default)]
    pub reorder_skipped: u64,
    #[serde(default)]
    pub reorder_bound_ms: f64,
}

/// One member session of a striped tunnel.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MemberStatus {
    /// 1-based; member 1 is the one that fails over and looks up instances.
    pub member: usize,
    pub state: String,
    pub session_id: String,
    pub sent_bytes: u64,
    pub received_bytes: u64,
    /// The send window's delivery-rate estimate towards the agent, bytes/s.
    pub rate_out: u64,
    /// Bytes/s received from the agent since the previous `status`
    /// (since the start on the first).
    pub rate_in: u64,
    pub rtt_ms: Option<f64>,
    pub window_bytes: u64,
    pub retransmissions: u64,
    /// Sessions opened for this member after its first.
    pub replacements: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    cmd: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Reply {
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<Status>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default)]
    stopping: bool,
}

pub fn socket_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

/// The longest request line read; a longer one is refused unread.
pub const MAX_REQUEST: u64 = 4096;
/// Requests in progress at once from users other than root and the owner;
/// beyond it a connection is closed at once. Each holds at most
/// [`REQUEST_TIMEOUT`].
pub const MAX_OTHERS: usize = 32;
/// How long a peer has to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve the control socket until dropped. `status` builds the answer; `stop` is
/// called (once per accepted request) when an authorised peer asks to stop.
///
/// Anyone on the machine may connect, so everyone but root and the owner
/// shares [`MAX_OTHERS`] places: a local user's flood or slow-loris cannot
/// keep the owner from `status` or `stop`. Every refusal is logged.
pub async fn serve(
    listener: UnixListener,
    owner_uid: u32,
    status: impl Fn() -> Status + Send + Sync + 'static,
    stop: impl Fn() + Send + Sync + 'static,
) {
    let status = std::sync::Arc::new(status);
    let stop = std::sync::Arc::new(stop);
    let others = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_OTHERS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let uid = stream.peer_cred().map(|c| c.uid()).ok();
        let place = match uid {
            Some(u) if u == 0 || u == owner_uid => None,
            _ => match others.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    tracing::warn!(?uid, "control socket: refusing a connection: {MAX_OTHERS} others are in progress");
                    continue;
                }
            },
        };
        let (status, stop) = (status.clone(), stop.clone());
        tokio::spawn(async move {
            let _place = place;
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let mut r = BufReader::new(r).take(MAX_REQUEST);
            let reply = match tokio::time::timeout(REQUEST_TIMEOUT, r.read_line(&mut line)).await {
                Ok(Ok(0)) => return, // connected and left: a probe
                Ok(Ok(_)) if !line.ends_with('\n') && line.len() as u64 >= MAX_REQUEST => {
                    tracing::warn!(?uid, "control socket: a request longer than {MAX_REQUEST} bytes: refused");
                    Reply::refused(format!("request longer than {MAX_REQUEST} bytes"))
                }
                Ok(Ok(_)) => answer(&line, uid, owner_uid, &*status, &*stop),
                Ok(Err(e)) => {
                    tracing::warn!(?uid, "control socket: unreadable request: {e}");
                    Reply::refused(format!("bad request: {e}"))
                }
                Err(_) => {
                    tracing::warn!(?uid, "control socket: no request within {REQUEST_TIMEOUT:?}: closed");
                    return;
                }
            };
            if let Ok(mut text) = serde_json::to_string(&reply) {
                text.push('\n');
                let _ = w.write_all(text.as_bytes()).await;
            }
        });
    }
}

impl Reply {
    fn refused(error: String) -> Reply {
        Reply { status: None, error: Some(error), stopping: false }
    }
}

/// The answer to one request line from a peer with `peer_uid` (`None`: the
/// kernel did not say): `status` for anyone, `stop` for root and the
/// tunnel's owner only.
fn answer(line: &str, peer_uid: Option<u32>, owner_uid: u32, status: &dyn Fn() -> Status, stop: &dyn Fn()) -> Reply {
    match serde_json::from_str::<Request>(line) {
        Ok(req) if req.cmd == "status" => Reply { status: Some(status()), error: None, stopping: false },
        Ok(req) if req.cmd == "stop" => match peer_uid {
            Some(u) if u == 0 || u == owner_uid => {
                stop();
                Reply { status: None, error: None, stopping: true }
            }
            _ => {
                tracing::warn!(uid = ?peer_uid, "control socket: refused a stop: not root or the tunnel's owner");
                Reply::refused("only root or the user who started this tunnel may stop it".into())
            }
        },
        Ok(req) => {
            tracing::warn!(uid = ?peer_uid, "control socket: unknown command {:?}", req.cmd);
            Reply::refused(format!("unknown command {:?}", req.cmd))
        }
        Err(e) => {
            tracing::warn!(uid = ?peer_uid, "control socket: bad request: {e}");
            Reply::refused(format!("bad request: {e}"))
        }
    }
}

async fn ask(path: &Path, cmd: &str) -> anyhow::Result<Reply> {
    let stream = UnixStream::connect(path).await.with_context(|| format!("cannot reach {}", path.display()))?;
    let (r, mut w) = stream.into_split();
    w.write_all(format!("{{\"cmd\":\"{cmd}\"}}\n").as_bytes()).await?;
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(5), BufReader::new(r).read_line(&mut line))
        .await
        .context("the tunnel did not answer within 5 s")??;
    let reply: Reply = serde_json::from_str(&line).context("unreadable answer from the tunnel")?;
    if let Some(e) = reply.error.clone() {
        bail!("{e}");
    }
    Ok(reply)
}

/// Names of the tunnels with a control socket in `dir`, sorted.
pub fn tunnel_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".sock")).map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

pub async fn status_of(dir: &Path, name: &str) -> anyhow::Result<Status> {
    ask(&socket_path(dir, name), "status").await?.status.context("the tunnel sent no status")
}

/// Ask `name` to stop and wait until it is gone.
pub async fn stop(dir: &Path, name: &str, wait: Duration) -> anyhow::Result<()> {
    let path = socket_path(dir, name);
    ask(&path, "stop").await?;
    let deadline = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < deadline {
        if UnixStream::connect(&path).await.is_err() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("tunnel {name:?} accepted the stop request but is still running after {}s", wait.as_secs())
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// The human-readable status block.
/// The striping lines of [`render`]: one per member session.
fn render_members(s: &Status) -> String {
    if s.sessions_wanted <= 1 && s.members.len() <= 1 {
        return String::new();
    }
    let up = s.members.iter().filter(|m| m.state == "connected").count();
    let mut out = format!(
        "\n  striping   {up} of {} sessions up; {} packets reordered, {} given up on (bound {:.0} ms)",
        s.sessions_wanted, s.reordered, s.reorder_skipped, s.reorder_bound_ms
    );
    if let Some(n) = &s.striping_note {
        out += &format!("\n             {n}");
    }
    for m in &s.members {
        let rtt = m.rtt_ms.map(|r| format!("{r:.1} ms")).unwrap_or_else(|| "-".into());
        out += &format!(
            "\n  member {:<3} {}, {}: out {}/s ({} sent), in {}/s ({} received), rtt {rtt}, window {}, {} resent, {} replaced",
            m.member,
            m.state,
            if m.session_id.is_empty() { "-" } else { &m.session_id },
            human_bytes(m.rate_out),
            human_bytes(m.sent_bytes),
            human_bytes(m.rate_in),
            human_bytes(m.received_bytes),
            human_bytes(m.window_bytes),
            m.retransmissions,
            m.replacements,
        );
    }
    out
}

pub fn render(s: &Status) -> String {
    let up = s.uptime_secs;
    let sessions = format!(
        "{} replaced ({} by another instance), {} rotated; candidates {}",
        s.new_sessions,
        s.failovers,
        s.rotations,
        if s.instances.is_empty() { "-".to_string() } else { s.instances.join(", ") }
    );
    let rtt = s.rtt_ms.map(|r| format!("{r:.1} ms")).unwrap_or_else(|| "-".into());
    format!(
        "tunnel {name} (pid {pid}): {state}, up {h}h{m:02}m{sec:02}s\n  \
         instance   {inst} in {region}, session {session}\n  \
         agent      {agent}\n  \
         routes     {cidrs} via {iface} ({addrs})\n  \
         sent       {sp} packets, {sb}\n  \
         received   {rp} packets, {rb}\n  \
         rtt        {rtt} (channel srtt {srtt:.1} ms), {rec} reconnects{resets}\n  \
         messages   {msent} sent to the agent, {mdist} distinct, {retx} resent ({ratio:.2}%)\n  \
         queue      delay {qd:.1} ms (max {qm:.1} ms), dropped {dc} (CoDel) + {dov} (overflow) + {dd} (device)\n  \
         sessions   {sessions}\n  \
         window     {win}, {infl} in flight{members}{dns}{error}",
        name = s.name,
        pid = s.pid,
        state = s.state,
        h = up / 3600,
        m = up / 60 % 60,
        sec = up % 60,
        inst = s.instance_id,
        region = s.region,
        session = s.session_id,
        agent = s.agent,
        cidrs = s.cidrs.join(", "),
        iface = s.interface,
        addrs = s.addresses.join(", "),
        sp = s.sent.packets,
        sb = human_bytes(s.sent.bytes),
        rp = s.received.packets,
        rb = human_bytes(s.received.bytes),
        srtt = s.channel_srtt_ms,
        retx = s.retransmissions,
        msent = s.messages_sent,
        mdist = s.messages_distinct,
        ratio = 100.0 * s.resend_ratio,
        rec = s.reconnects,
        resets = match s.flows_reset {
            0 => String::new(),
            n => format!(", {n} connections reset (the agent had lost them)"),
        },
        qd = s.queue_delay_ms,
        qm = s.queue_delay_max_ms,
        dc = s.dropped_codel,
        dov = s.dropped_overflow,
        dd = s.dropped_device,
        win = if s.window_bytes == 0 { "off (agent without acks)".to_string() } else { human_bytes(s.window_bytes) },
        infl = human_bytes(s.in_flight_bytes),
        members = render_members(s),
        error = match &s.last_error {
            Some(e) => format!("\n  last error {e}"),
            None => String::new(),
        },
        dns = match &s.dns_server {
            Some(server) => format!(
                "\n  dns        {} via {server}: {} queries through the tunnel, {} other names refused",
                s.dns_domains.join(", "),
                s.dns_forwarded,
                s.dns_refused
            ),
            None => String::new(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_like_a_human_wrote_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(50 << 20), "50.0 MiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }

    #[test]
    fn status_shows_what_the_channel_resent() {
        let s = Status {
            messages_sent: 1000,
            messages_distinct: 990,
            retransmissions: 10,
            resend_ratio: 0.01,
            ..Status::default()
        };
        let text = render(&s);
        assert!(text.contains("messages   1000 sent to the agent, 990 distinct, 10 resent (1.00%)"), "{text}");
        let json = serde_json::to_value(&s).expect("json");
        assert_eq!(json["messages_sent"], 1000);
        assert_eq!(json["messages_distinct"], 990);
        assert_eq!(json["retransmissions"], 10);
        assert_eq!(json["resend_ratio"], 0.01);
    }

    #[test]
    fn who_may_ask_what() {
        let stops = std::cell::Cell::new(0);
        let status = || Status { name: "t".into(), ..Status::default() };
        let stop = || stops.set(stops.get() + 1);
        let owner = 501;
        let ask = |line: &str, uid: Option<u32>| answer(line, uid, owner, &status, &stop);
        // Anyone may ask how the tunnel is.
        let r = ask(r#"{"cmd":"status"}"#, Some(502));
        assert_eq!(r.status.map(|s| s.name), Some("t".into()));
        // Only its owner and root may stop it; an unknown peer may not.
        for uid in [Some(502), None] {
            let r = ask(r#"{"cmd":"stop"}"#, uid);
            assert!(!r.stopping && r.error.as_deref().is_some_and(|e| e.contains("only root")), "{uid:?}");
        }
        assert_eq!(stops.get(), 0);
        assert!(ask(r#"{"cmd":"stop"}"#, Some(owner)).stopping);
        assert!(ask(r#"{"cmd":"stop"}"#, Some(0)).stopping);
        assert_eq!(stops.get(), 2);
        // Garbage and unknown commands get an error, not a crash or silence.
        assert!(ask("{", Some(owner)).error.is_some_and(|e| e.starts_with("bad request")));
        assert!(ask(r#"{"cmd":"reboot"}"#, Some(0)).error.is_some_and(|e| e.contains("unknown command")));
        assert_eq!(stops.get(), 2);
    }

    #[tokio::test]
    async fn stop_needs_the_owner_and_status_does_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = socket_path(dir.path(), "t");
        let listener = UnixListener::bind(&path).expect("bind");
        let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stopped.clone();
        let me = nix::unistd::geteuid().as_raw();
        // Owned by someone else (and we are not root in this check unless uid 0).
        let other = if me == 0 { 0 } else { me + 1 };
        tokio::spawn(serve(
            listener,
            other,
            || Status { name: "t".into(), pid: 42, ..Status::default() },
            move || flag.store(true, std::sync::atomic::Ordering::SeqCst),
        ));
        let s = status_of(dir.path(), "t").await.expect("status");
        assert_eq!((s.name.as_str(), s.pid), ("t", 42));
        let r = ask(&path, "stop").await;
        if me == 0 {
            assert!(r.is_ok() && stopped.load(std::sync::atomic::Ordering::SeqCst));
        } else {
            assert!(r.expect_err("refused").to_string().contains("only root or the user"));
            assert!(!stopped.load(std::sync::atomic::Ordering::SeqCst));
        }
        assert!(ask(&path, "reboot").await.is_err());
        assert_eq!(tunnel_names(dir.path()), vec!["t".to_string()]);
    }

    /// A request line past the limit is refused without reading the rest,
    /// and a silent connection does not hold up anyone's status.
    #[tokio::test]
    async fn a_long_or_silent_request_is_refused_and_status_still_answers() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = socket_path(dir.path(), "t");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(serve(listener, 0, || Status { name: "t".into(), ..Status::default() }, || {}));
        let _silent: Vec<UnixStream> = futures_util::future::join_all((0..8).map(|_| UnixStream::connect(&path)))
            .await
            .into_iter()
            .flatten()
            .collect();
        let mut long = UnixStream::connect(&path).await.expect("connect");
        // 64 KiB with no newline: the daemon reads 4 KiB of it, answers, closes.
        let _ = long.write_all(&vec![b'x'; 64 * 1024]).await;
        // Read up to the end or the reset the unread rest of the request earns.
        let (mut reply, mut buf) = (Vec::new(), [0u8; 4096]);
        while let Ok(n @ 1..) = long.read(&mut buf).await {
            reply.extend_from_slice(&buf[..n]);
        }
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.contains("request longer than 4096 bytes"), "{reply:?}");
        let s = status_of(dir.path(), "t").await.expect("status while others are silent");
        assert_eq!(s.name, "t");
    }
}
