//! The tunnel's link to an ec2-agent (a Port session plus the forwarder's HELLO),
//! and the supervisor that replaces it when it fails: a new session to the same
//! instance first, whose agent hands back our flows (same client id, within its
//! grace period), then the other candidate instances, with backoff, until the
//! user stops the tunnel. The device and routes stay up throughout. With a
//! rotation period, a new session is opened before the old one is given up
//! (make before break), ahead of the account's maximum session duration.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::link::{self, ClientConfig, ClientHandle, Stop};
use crate::aws::SsmApi;
use forwarder::wire::{caps, Deframer, Hello};
use ssm_channel::port::{Live, PortConfig};
use ssm_channel::session::SessionConfig;
use ssm_channel::transport::Trust;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};
use tunnel::Device;

use crate::ssm::{agent_stream, finish, open_port_session, PortSession};

/// The agent unheard for this long while the service's websocket is up: the
/// agent (or its instance) is gone, whatever the channel says.
pub const LINK_DEAD: Duration = Duration::from_secs(20);

/// A new session's agent has this long to answer HELLO (an idle, fresh channel
/// answers in milliseconds; a frozen agent whose port still accepts must not
/// hold up the move to the next instance for long).
const RENEW_HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait between rounds of attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The wait after the `attempt`-th failed round: exponential from 1 s up to
/// [`MAX_BACKOFF`], with ±25% jitter.
fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(500).saturating_mul(1 << attempt.min(6)).min(MAX_BACKOFF);
    base.mul_f64(0.75 + fastrand::f64() / 2.0)
}

/// Which instances may carry the tunnel: these ids, in order, then the online
/// managed instances that carry all of these tags (looked up again before
/// every round of new sessions, so replaced instances are found).
#[derive(Debug, Clone, Default)]
pub struct Candidates {
    pub ids: Vec<String>,
    pub tags: Vec<(String, String)>,
}

impl Candidates {
    pub fn tags_text(&self) -> String {
        self.tags.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")
    }

    /// The instances to try, in order.
    pub async fn resolve(&self, api: &SsmApi) -> anyhow::Result<Vec<String>> {
        let mut out = self.ids.clone();
        if !self.tags.is_empty() {
            let found = api.online_instances_tagged(&self.tags).await?;
            out.extend(found.into_iter().filter(|i| !self.ids.contains(i)));
        }
        if out.is_empty() {
            anyhow::bail!(
                "no managed instance in {} carries the tags {} with its SSM agent online \
                 (DescribeInstanceInformation, PingStatus Online)",
                api.region(),
                self.tags_text()
            );
        }
        Ok(out)
    }
}

/// One working link: the session and the stream through it, HELLOs exchanged.
pub struct Uplink {
    pub instance: String,
    pub session: PortSession,
    /// Where this session publishes its counters.
    pub live: Arc<Mutex<Live>>,
    reader: mpsc::Receiver<Vec<u8>>,
    writer: mpsc::Sender<bytes::Bytes>,
    pub agent: (Hello, Deframer),
}

/// What every link of this tunnel is made with.
#[derive(Clone)]
pub struct Target<'a> {
    pub api: &'a SsmApi,
    pub trust: &'a Trust,
    pub port: u16,
    pub mtu: u16,
    pub client: ClientConfig,
    /// Open a replacement session this long after each session started.
    pub rotate_after: Option<Duration>,
    /// News of network changes and wake-ups (see [`crate::daemon::netwatch`]).
    pub network_changed: watch::Receiver<u64>,
    /// Member sessions to stripe the tunnel over (1: no striping).
    pub sessions: usize,
}

impl Target<'_> {
    /// The same, with the short HELLO timeout of replacement sessions.
    fn quick(&self) -> Self {
        Target { client: ClientConfig { hello_timeout: RENEW_HELLO_TIMEOUT, ..self.client.clone() }, ..self.clone() }
    }
}

/// What `status` shows about the link beyond the counters.
#[derive(Debug, Default, Clone)]
pub struct LinkState {
    /// The current session's counters.
    pub live: Arc<Mutex<Live>>,
    /// The instances that may carry the tunnel, as last looked up.
    pub candidates: Vec<String>,
    pub instance_id: String,
    pub session_id: String,
    pub agent: String,
    /// Getting a new session: the attempt and the last error (`None`: linked).
    pub renewing: Option<(u32, String)>,
    /// Sessions opened after the first one, and how many of them went to
    /// another instance.
    pub new_sessions: u64,
    pub failovers: u64,
    /// Sessions replaced on schedule (make before break).
    pub rotations: u64,
    /// Websocket reconnects of the sessions before the current one.
    pub earlier_reconnects: u64,
    /// The member sessions beyond the first (striping), in order.
    pub members: Vec<MemberState>,
    /// Why the tunnel has fewer member sessions than asked, if it does.
    pub striping_note: Option<String>,
}

/// What `status` shows about one member session beyond the first.
#[derive(Debug, Default, Clone)]
pub struct MemberState {
    /// `connected`, `connecting`, or `waiting (attempt N)`.
    pub state: String,
    pub session_id: String,
    pub live: Arc<Mutex<Live>>,
    /// Sessions opened for this member after its first.
    pub replacements: u64,
    pub last_error: Option<String>,
}

fn port_config(live: Arc<Mutex<Live>>, network_changed: watch::Receiver<u64>) -> PortConfig {
    PortConfig {
        // The forwarder's own send window keeps queues short (SPECIFICATION §6.4),
        // so the channel's in-flight limit only has to cover long, fast paths.
        session: SessionConfig::default(),
        max_backlog: 16 << 10,
        read_chunk: 16 << 10,
        live: Some(live),
        // Through an outage of the laptop's network, keep resuming the session
        // (a day at most); a dead agent is found by LINK_DEAD instead.
        reconnect_for: Duration::from_secs(86_400),
        network_changed: Some(network_changed),
        ..PortConfig::default()
    }
}

/// A Port session to the ec2-agent on `instance` and the HELLOs through it.
pub async fn connect(t: &Target<'_>, instance: &str) -> anyhow::Result<Uplink> {
    let live = Arc::new(Mutex::new(Live::default()));
    let config = port_config(live.clone(), t.network_changed.clone());
    let session =
        open_port_session(t.api, instance, t.port, None, t.trust, config, 4, Box::pin(std::future::pending())).await?;
    let linked = match agent_stream(&session.conns).await {
        Ok((mut reader, mut writer)) => link::handshake(&mut reader, &mut writer, &t.client, t.mtu)
            .await
            .map(|agent| (reader, writer, agent))
            .map_err(anyhow::Error::from),
        Err(e) => Err(e),
    };
    match linked {
        Ok((reader, writer, agent)) => {
            Ok(Uplink { instance: instance.to_string(), session, live, reader, writer, agent })
        }
        Err(e) => {
            let _ = session.close(t.api).await;
            anyhow::bail!("{e} (instance {instance}, port {})", t.port)
        }
    }
}

/// The first candidate that answers, in order. All errors if none does.
pub async fn connect_first(t: &Target<'_>, candidates: &[String]) -> anyhow::Result<Uplink> {
    let mut errors = Vec::new();
    for instance in candidates {
        match connect(t, instance).await {
            Ok(up) => return Ok(up),
            Err(e) if candidates.len() == 1 => return Err(e),
            Err(e) => {
                warn!(%instance, "{e:#}; trying the next instance");
                errors.push(format!("  - {instance}: {e:#}"));
            }
        }
    }
    anyhow::bail!("no instance answered:\n{}", errors.join("\n"))
}

/// Completes when the agent has been silent for [`LINK_DEAD`] while the
/// service's websocket was up the whole time (PINGs go out every few seconds,
/// so a live agent is never that quiet). During an outage of our own network
/// the websocket is down and this waits.
async fn silent(handle: &ClientHandle, member: usize, live: &Mutex<Live>) {
    let reads = || handle.members[member].reads.load(std::sync::atomic::Ordering::Relaxed);
    let mut last = reads();
    let mut quiet = Duration::ZERO;
    let tick = Duration::from_secs(1);
    loop {
        tokio::time::sleep(tick).await;
        let connected = live.lock().map(|l| l.connected).unwrap_or(false);
        let now = reads();
        if now != last || !connected {
            last = now;
            quiet = Duration::ZERO;
        } else {
            quiet += tick;
            if quiet >= LINK_DEAD {
                return;
            }
        }
    }
}

/// How a link's turn ended.
enum Next {
    /// It failed, for this reason: find another.
    Failed(String),
    /// Its replacement is up already.
    Rotated(Box<Uplink>),
}

/// Carry the tunnel: the device's side for its whole life, the first member
/// over `up` (see [`lead`]) and, when the agent stripes, `t.sessions - 1` more
/// members beside it (see [`follow`]), until `stop` turns true. Returns the
/// first member's session to close then (the others close their own).
pub async fn supervise(
    t: &Target<'_>,
    candidates: &Candidates,
    up: Uplink,
    device: Arc<impl Device>,
    handle: Arc<ClientHandle>,
    state: Arc<Mutex<LinkState>>,
    stop: watch::Receiver<bool>,
) -> Option<PortSession> {
    let _device = link::serve_device(device, &t.client, &handle);
    let wanted = t.sessions.min(handle.members.len());
    let stripes = up.agent.0.caps & caps::STRIPE != 0;
    let extra = if wanted > 1 && stripes { wanted - 1 } else { 0 };
    if wanted > 1 && !stripes {
        let why = format!(
            "the ec2-agent on {} ({}) does not stripe; the tunnel uses one session (update it: `ssm-proxy agent install --upgrade`)",
            up.instance, up.agent.0.software
        );
        warn!("{why}");
        lock(&state).striping_note = Some(why);
    }
    lock(&state).members = vec![MemberState::default(); extra];
    let followers =
        futures_util::future::join_all((1..=extra).map(|k| follow(t, k, handle.clone(), state.clone(), stop.clone())));
    let (leader, _) = tokio::join!(lead(t, candidates, up, handle.clone(), state.clone(), stop), followers);
    leader
}

fn lock(state: &Mutex<LinkState>) -> std::sync::MutexGuard<'_, LinkState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The first member: carries packets over `up`, replacing it whenever it fails
/// (and on schedule, with `t.rotate_after`), failing over to another instance
/// if need be, until `stop` turns true. Returns the session to close then
/// (`None`: stopped between sessions).
async fn lead(
    t: &Target<'_>,
    candidates: &Candidates,
    mut up: Uplink,
    handle: Arc<ClientHandle>,
    state: Arc<Mutex<LinkState>>,
    stop: watch::Receiver<bool>,
) -> Option<PortSession> {
    let update = |f: &dyn Fn(&mut LinkState)| f(&mut state.lock().unwrap_or_else(|p| p.into_inner()));
    loop {
        let Uplink { instance, mut session, live, reader, writer, agent } = up;
        let next = {
            let mut stop_rx = stop.clone();
            let (h, l) = (handle.clone(), live.clone());
            let shutdown = async move {
                tokio::select! {
                    _ = stop_rx.wait_for(|s| *s) => Stop::Goodbye,
                    () = silent(&h, 0, &l) => Stop::Abandon,
                }
            };
            // Dropped at the end of this block, which stops the old link's tasks.
            let run = link::run(reader, writer, agent, &t.client, handle.clone(), 0, shutdown);
            let rotation = rotate(t, &instance);
            tokio::pin!(run, rotation);
            tokio::select! {
                end = &mut run => Next::Failed(match end {
                    None if *stop.borrow() => return Some(session),
                    None => format!("the ec2-agent on {instance} has not answered for {} s", LINK_DEAD.as_secs()),
                    Some(end) => format!("the link to the ec2-agent on {instance} ended: {end}"),
                }),
                done = &mut session.task => Next::Failed(match finish(t.api, &session.session_id, done).await {
                    Ok(()) => format!("the SSM session to {instance} was terminated"),
                    Err(e) => format!("the SSM session to {instance} ended: {e:#}"),
                }),
                new = &mut rotation => Next::Rotated(Box::new(new)),
            }
        };
        if !session.task.is_finished() {
            // Without waiting: the old session may never answer again.
            let api = t.api.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), session.close(&api)).await;
            });
        }
        let earlier = live.lock().map(|l| l.reconnects).unwrap_or(0);
        up = match next {
            Next::Rotated(new) => {
                info!(instance = %instance, session = %new.session.session_id, "session rotated: the new one carries the tunnel");
                update(&|s| {
                    s.session_id = new.session.session_id.clone();
                    s.live = new.live.clone();
                    s.rotations += 1;
                    s.earlier_reconnects += earlier;
                });
                *new
            }
            Next::Failed(why) => {
                warn!("{why}; opening a new session");
                update(&|s| s.earlier_reconnects += earlier);
                renew(t, candidates, &instance, why, &state, stop.clone()).await?
            }
        };
    }
}

/// Member `k` (1-based beyond the first) of a striped tunnel: a session to the
/// instance the first member is on, carried until it fails or is rotated, then
/// replaced on its own, with backoff while none can be had, until `stop`.
/// The other members carry the traffic meanwhile.
async fn follow(
    t: &Target<'_>,
    k: usize,
    handle: Arc<ClientHandle>,
    state: Arc<Mutex<LinkState>>,
    mut stop: watch::Receiver<bool>,
) {
    let set = |f: &dyn Fn(&mut MemberState)| {
        if let Some(m) = lock(&state).members.get_mut(k - 1) {
            f(m);
        }
    };
    let mut failures = 0u32;
    let mut opened = 0u64;
    let mut next: Option<Uplink> = None;
    while !*stop.borrow() {
        let up = match next.take() {
            Some(up) => Ok(up),
            None => {
                set(&|m| m.state = "connecting".into());
                tokio::select! {
                    r = member_session(t, &state) => r,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        };
        let up = match up {
            Ok(up) => up,
            Err(e) => {
                failures += 1;
                let why = format!("{e:#}");
                if failures == 1 {
                    warn!(member = k + 1, "no session for this member: {why}; the others carry the tunnel");
                }
                set(&|m| {
                    m.state = format!("waiting (attempt {failures})");
                    m.last_error = Some(why.clone());
                });
                tokio::select! {
                    () = tokio::time::sleep(backoff(failures)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                continue;
            }
        };
        failures = 0;
        opened += 1;
        set(&|m| {
            m.state = "connected".into();
            m.session_id = up.session.session_id.clone();
            m.live = up.live.clone();
            m.replacements = opened - 1;
            m.last_error = None;
        });
        info!(member = k + 1, session = %up.session.session_id, "member session up");
        next = carry_member(t, k, up, &handle, &stop).await;
    }
}

/// A new member session to the instance the first member is on, whose agent
/// joins it to our others.
async fn member_session(t: &Target<'_>, state: &Mutex<LinkState>) -> anyhow::Result<Uplink> {
    let instance = lock(state).instance_id.clone();
    let up = connect(&t.quick(), &instance).await?;
    if up.agent.0.caps & caps::STRIPE == 0 {
        let software = up.agent.0.software.clone();
        let _ = up.session.close(t.api).await;
        anyhow::bail!("the ec2-agent on {instance} ({software}) does not stripe");
    }
    Ok(up)
}

/// Carry member `k` over `up` until it ends, is rotated (returns the new
/// session) or `stop`; its session is closed either way.
async fn carry_member(
    t: &Target<'_>,
    k: usize,
    up: Uplink,
    handle: &Arc<ClientHandle>,
    stop: &watch::Receiver<bool>,
) -> Option<Uplink> {
    let Uplink { instance, mut session, live, reader, writer, agent } = up;
    let mut stop_rx = stop.clone();
    let (h, l) = (handle.clone(), live.clone());
    let shutdown = async move {
        tokio::select! {
            _ = stop_rx.wait_for(|s| *s) => Stop::Goodbye,
            () = silent(&h, k, &l) => Stop::Abandon,
        }
    };
    let run = link::run(reader, writer, agent, &t.client, handle.clone(), k, shutdown);
    let rotation = rotate(t, &instance);
    tokio::pin!(run, rotation);
    let next = tokio::select! {
        end = &mut run => {
            if !*stop.borrow() {
                let why = end.map_or_else(|| "its agent went silent".to_string(), |e| e.to_string());
                warn!(member = k + 1, "member session ended ({why}); replacing it");
            }
            None
        }
        done = &mut session.task => {
            let why = finish(t.api, &session.session_id, done).await.err().map_or_else(|| "terminated".into(), |e| format!("{e:#}"));
            warn!(member = k + 1, "member session ended ({why}); replacing it");
            None
        }
        new = &mut rotation => {
            info!(member = k + 1, session = %new.session.session_id, "member session rotated");
            Some(new)
        }
    };
    if !session.task.is_finished() {
        let _ = tokio::time::timeout(Duration::from_secs(10), session.close(t.api)).await;
    }
    next
}

/// After `t.rotate_after` (never without one), a new session to `instance`
/// whose HELLO moved our flows to it; retried every minute while the old
/// session carries on.
async fn rotate(t: &Target<'_>, instance: &str) -> Uplink {
    let Some(every) = t.rotate_after else { return std::future::pending().await };
    tokio::time::sleep(every).await;
    let quick = t.quick();
    loop {
        match connect(&quick, instance).await {
            Ok(up) => return up,
            Err(e) => {
                warn!(%instance, "no replacement session yet ({e:#}); the current one carries on; trying again in 60 s");
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        }
    }
}

/// Rounds of attempts, `current` first, then the other candidates, with
/// exponential backoff and jitter between rounds; `None` once `stop` is true.
async fn renew(
    t: &Target<'_>,
    candidates: &Candidates,
    current: &str,
    why: String,
    state: &Mutex<LinkState>,
    mut stop: watch::Receiver<bool>,
) -> Option<Uplink> {
    let update = |f: &dyn Fn(&mut LinkState)| f(&mut state.lock().unwrap_or_else(|p| p.into_inner()));
    let quick = t.quick();
    let t = &quick;
    let mut last_error = why;
    for attempt in 1u32.. {
        let mut list = state.lock().map(|s| s.candidates.clone()).unwrap_or_default();
        if !candidates.tags.is_empty() {
            match candidates.resolve(t.api).await {
                Ok(found) => {
                    if found != list {
                        info!(instances = ?found, tags = %candidates.tags_text(), "candidate instances");
                    }
                    update(&|s| s.candidates = found.clone());
                    list = found;
                }
                Err(e) => {
                    warn!("{e:#}; trying the instances known before");
                    last_error = format!("{e:#}");
                }
            }
        }
        // The current instance first: its agent holds our flows.
        let order: Vec<&String> =
            list.iter().filter(|c| *c == current).chain(list.iter().filter(|c| *c != current)).collect();
        for instance in &order {
            update(&|s| s.renewing = Some((attempt, last_error.clone())));
            let result = tokio::select! {
                r = connect(t, instance) => r,
                _ = stop.wait_for(|s| *s) => return None,
            };
            match result {
                Ok(up) => {
                    let moved = instance.as_str() != current;
                    if moved {
                        warn!(from = %current, to = %instance, "failed over to another instance");
                    }
                    info!(instance = %instance, session = %up.session.session_id, attempt, "new session up");
                    update(&|s| {
                        s.instance_id = instance.to_string();
                        s.session_id = up.session.session_id.clone();
                        s.live = up.live.clone();
                        s.agent = up.agent.0.software.clone();
                        s.renewing = None;
                        s.new_sessions += 1;
                        s.failovers += u64::from(moved);
                    });
                    return Some(up);
                }
                Err(e) => {
                    warn!(%instance, attempt, "no new session: {e:#}");
                    last_error = format!("{instance}: {e:#}");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff(attempt)) => {}
            _ = stop.wait_for(|s| *s) => return None,
        }
    }
    None
}
