//! The instance side of a session: the data channel as the SSM agent runs it
//! ([`channel`]), the port plugin that dials targets, modelled on
//! `agent/session/plugins/port/port_basic.go` and `port_mux.go`, and the shell
//! plugin ([`instance`], `agent/session/shell/shell.go`).
//!
//! One task per session owns everything. It starts when StartSession is
//! called (the real agent starts its plugin on the service's start_session
//! message, before the client connects) and outlives client websockets, which
//! attach and detach as the client reconnects.

pub mod channel;
mod denylist;
mod instance;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use ssm_channel::codec::{emit_short_header, message_type};
use ssm_channel::payloads::{ChannelClosed, Flag};
use ssm_channel::session::{Environment, SystemEnvironment};
use ssm_channel::smux::{Mux, MuxEvent, Role, StreamId};
use ssm_channel::version::PortMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::config::Profile;
use channel::{AgentChannel, AgentEvent, PAYLOAD_SIZE};

/// What the websocket side tells the agent.
#[derive(Debug)]
pub enum AgentInput {
    /// A client websocket is now relayed to this agent.
    Attach {
        conn: u64,
        tx: mpsc::UnboundedSender<ToClient>,
    },
    Detach {
        conn: u64,
    },
    /// Frames the service had queued for a client that went away, oldest first.
    Requeue(Vec<Vec<u8>>),
    Frame(Vec<u8>),
    /// TerminateSession was called.
    Terminate,
}

/// What the agent (via the service) sends down a client websocket.
#[derive(Debug)]
pub enum ToClient {
    Frame(Vec<u8>),
    Close(u16, String),
}

/// Where the port plugin connects.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    /// From the remote-host document (`host` given): the deny list applies.
    pub remote: bool,
}

/// Which session plugin runs.
#[derive(Debug, Clone)]
pub enum Plugin {
    /// Port forwarding to `target`.
    Port(Target),
    /// A shell in a pseudo terminal: `Standard_Stream` (`command: None`) or
    /// `InteractiveCommands` (`sh -c command`). `program` is what the
    /// instance's `sh` is (bash on Amazon Linux, dash on Debian).
    Shell { command: Option<String>, program: String },
}

impl Plugin {
    /// The SessionType of the handshake.
    pub fn session_type(&self) -> &'static str {
        match self {
            Plugin::Port(_) => "Port",
            Plugin::Shell { command: None, .. } => "Standard_Stream",
            Plugin::Shell { command: Some(_), .. } => "InteractiveCommands",
        }
    }
}

#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub session_id: String,
    pub instance_id: String,
    pub agent_version: String,
    pub properties: BTreeMap<String, serde_json::Value>,
    pub plugin: Plugin,
    /// The instance's network namespace (a file such as /run/netns/NAME): where
    /// targets are dialled from and shells run. `None`: the emulator's own.
    pub netns: Option<std::path::PathBuf>,
    pub profile: Profile,
    /// Hold frames for a detached client and deliver them when it reattaches.
    pub buffer_detached: bool,
    /// Where this session's resends are counted (the emulator's counters).
    pub resends: Arc<AtomicU64>,
    /// KMS encryption demanded, under this key, checked against the emulator's KMS.
    pub kms: Option<(String, Arc<crate::kms::Kms>)>,
}

/// Frames held for a detached client. MGS's behaviour here is not public; a
/// bounded buffer is our model, and `--lossy-reconnect` models losing them.
const DETACHED_BUFFER: usize = 10_000;

enum TargetEvent {
    Dialed(u32, std::io::Result<TcpStream>),
    Data(u32, Vec<u8>),
    Eof(u32),
    ShellOutput(Vec<u8>),
    /// The shell ended, with its exit status.
    ShellExited(String),
}

/// How long a shell session that ended waits for the client to ack what is
/// still outstanding (the agent's PrepareToCloseChannel) before it closes.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

enum Stream {
    Dialing(Vec<Vec<u8>>),
    Open(mpsc::UnboundedSender<Vec<u8>>, tokio::task::JoinHandle<()>),
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Stream::Open(_, reader) = self {
            reader.abort();
        }
    }
}

/// Read backlog above which target sockets are not read (the agent's reads block).
const MAX_OUT: usize = 64 << 10;
/// Input that mux mode holds between the data channel and the targets before
/// the data channel's write blocks: smux's session receive bucket
/// (`MaxReceiveBuffer`, 4 MiB in `smux.DefaultConfig()`, protocol v1 has no
/// per-stream window), which `recvLoop` waits on once it is used up, plus the
/// Unix socket the data channel writes into (`port_mux.go` dials its
/// `mux.sock`; about 128 KiB of 1 KiB writes fit Linux's default 208 KiB
/// socket buffer). Tokens come back as each stream's `io.Copy` reads.
const MUX_INPUT_BUFFER: usize = (4 << 20) + (128 << 10);
/// Bytes read from a target at once: upstream io.Copy's buffer in mux mode,
/// StreamDataPayloadSize in basic mode.
const MUX_READ: usize = 32 << 10;

/// Input bytes that left the plugin's buffer: taken by a stream's `io.Copy`
/// (mux mode) or written to the socket or terminal (basic mode, shell).
pub(crate) struct Released(pub usize);

struct Runtime {
    spec: AgentSpec,
    chan: AgentChannel,
    client: Option<(u64, mpsc::UnboundedSender<ToClient>)>,
    detached: VecDeque<Vec<u8>>,
    mode: Option<PortMode>,
    mux: Option<Mux>,
    streams: HashMap<u32, Stream>,
    /// Basic mode: the single target connection and whether to redial on data.
    basic_id: u32,
    /// Output waiting to be sent to the client, at most PAYLOAD_SIZE per message.
    out: BytesMut,
    events_tx: mpsc::Sender<TargetEvent>,
    done: Option<String>,
    shell: Option<instance::Shell>,
    /// The shell exited: the session closes once its output is acked, or at this time.
    closing: Option<Instant>,
    released_tx: mpsc::UnboundedSender<Released>,
    /// Input handed on and not yet released (see [`MUX_INPUT_BUFFER`]).
    input_held: usize,
    /// An [`AgentEvent::Input`] whose write has not returned yet.
    write_pending: bool,
}

/// Runs one session's agent until it ends; returns why.
pub async fn run(spec: AgentSpec, mut input: mpsc::Receiver<AgentInput>) -> String {
    let (events_tx, mut events_rx) = mpsc::channel(16);
    // Separate from target events, which are not read while output backs up:
    // the real agent's input writes do not wait for its output.
    let (released_tx, mut released_rx) = mpsc::unbounded_channel();
    let mut chan = AgentChannel::new(
        Box::new(SystemEnvironment),
        spec.agent_version.clone(),
        spec.plugin.session_type(),
        spec.properties.clone(),
    );
    if let Some((key, kms)) = &spec.kms {
        chan = chan.with_kms(key.clone(), kms.clone(), spec.session_id.clone(), spec.instance_id.clone());
    }
    let mut rt = Runtime {
        spec,
        chan,
        client: None,
        detached: VecDeque::new(),
        mode: None,
        mux: None,
        streams: HashMap::new(),
        basic_id: 0,
        out: BytesMut::new(),
        events_tx,
        done: None,
        shell: None,
        closing: None,
        released_tx,
        input_held: 0,
        write_pending: false,
    };
    let start = Instant::now();
    rt.chan.start(start.into_std());
    rt.handle_events().await;
    let mut next_send = start;
    loop {
        rt.flush();
        if let Some(t) = rt.closing {
            // SendAgentSessionStateMessage(Terminating) after PrepareToCloseChannel.
            if (rt.pending_out() == 0 && rt.chan.unacked() == 0) || Instant::now() >= t {
                rt.done = Some(String::new());
            }
        }
        if let Some(why) = rt.done.take() {
            rt.close_client(&why);
            return why;
        }
        if matches!(rt.spec.profile, Profile::Fast) && rt.pending_out() > 0 {
            // Unpaced: send now rather than through a timer, which tokio rounds up
            // to the next millisecond.
            let now = Instant::now();
            while rt.pending_out() > 0 {
                rt.send_chunk(now);
            }
            next_send = now;
            continue;
        }
        // From here on output waits (in `out` or the mux) only with the stock profile.
        let timer = [rt.chan.poll_timeout().map(Instant::from_std), rt.closing].into_iter().flatten().min();
        let pace = (rt.pending_out() > 0).then_some(next_send);
        let read_targets = rt.pending_out() < MAX_OUT;
        tokio::select! {
            msg = input.recv() => match msg {
                None => return "service gone".into(),
                Some(msg) => rt.handle_service(msg).await,
            },
            ev = events_rx.recv(), if read_targets => {
                if let Some(ev) = ev {
                    rt.handle_target(ev);
                }
            }
            Some(Released(n)) = released_rx.recv() => {
                rt.input_held = rt.input_held.saturating_sub(n);
                rt.complete_write();
                rt.handle_events().await;
            }
            _ = sleep_until(timer) => {
                let before = rt.chan.resends;
                rt.chan.handle_timeout(Instant::now().into_std());
                rt.spec.resends.fetch_add(rt.chan.resends - before, Ordering::Relaxed);
                rt.handle_events().await;
            }
            // The agent's read loop: one read of at most 1024 bytes, send, sleep 1 ms.
            // Paced on a schedule, not by sleeping 1 ms after each send: tokio's
            // timer rounds a 1 ms sleep up to about 2 ms, which would halve the
            // rate the real agent achieves.
            _ = sleep_until(pace) => {
                let now = Instant::now();
                rt.send_chunk(now);
                next_send += Duration::from_millis(1);
                if next_send + Duration::from_millis(2) < now {
                    next_send = now; // idle before: no burst
                }
            }
        }
    }
}

impl Runtime {
    /// What the service hands the agent: a client (re)attaching or leaving,
    /// frames to requeue or to handle, the end.
    async fn handle_service(&mut self, msg: AgentInput) {
        match msg {
            AgentInput::Attach { conn, tx } => {
                for f in self.detached.drain(..) {
                    let _ = tx.send(ToClient::Frame(f));
                }
                self.client = Some((conn, tx));
            }
            AgentInput::Detach { conn } => {
                if self.client.as_ref().is_some_and(|(c, _)| *c == conn) {
                    self.client = None;
                }
            }
            AgentInput::Requeue(frames) => {
                if let Some((_, tx)) = &self.client {
                    // The client is already back: order does not matter to the protocol.
                    for f in frames {
                        let _ = tx.send(ToClient::Frame(f));
                    }
                } else if self.spec.buffer_detached {
                    for f in frames.into_iter().rev() {
                        self.detached.push_front(f);
                    }
                    self.detached.truncate(DETACHED_BUFFER);
                }
            }
            AgentInput::Frame(f) => {
                self.chan.handle_frame(Instant::now().into_std(), &f);
                self.handle_events().await;
            }
            AgentInput::Terminate => self.done = Some(String::new()),
        }
    }
}

/// When a target's writer releases input: as `io.Copy` takes it from the
/// smux stream (mux mode) or once the socket write returned (basic mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Release {
    OnTake,
    AfterWrite,
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

impl Runtime {
    /// Output waiting for the client: the mux's (mux mode) or `out` (basic
    /// mode, shell).
    fn pending_out(&self) -> usize {
        self.out.len() + self.mux.as_ref().map_or(0, Mux::pending_output)
    }

    /// Send the next message: at most PAYLOAD_SIZE bytes of output.
    fn send_chunk(&mut self, now: Instant) {
        // Mux output is taken a message at a time, so smux's shaper decides
        // which stream's frame goes next (`port_mux.go` reads 1024 bytes of it
        // per message).
        let chunk = match &mut self.mux {
            Some(m) => m.take_output(PAYLOAD_SIZE),
            None => {
                let n = self.out.len().min(PAYLOAD_SIZE);
                self.out.split_to(n)
            }
        };
        self.chan.send_output(now.into_std(), &chunk);
    }

    /// Sends what the channel has for the client. With no client attached the
    /// frames wait in a bounded buffer (or are lost, with `buffer_detached` off).
    fn flush(&mut self) {
        while let Some(f) = self.chan.poll_transmit() {
            match &self.client {
                Some((_, tx)) => {
                    let _ = tx.send(ToClient::Frame(f));
                }
                None if self.spec.buffer_detached && self.detached.len() < DETACHED_BUFFER => {
                    self.detached.push_back(f)
                }
                None => {}
            }
        }
    }

    /// channel_closed as the service sends it: HL=112 and a NUL-padded type.
    fn close_client(&mut self, output: &str) {
        let Some((_, tx)) = self.client.take() else { return };
        let id = uuid::Uuid::new_v4();
        let now_ms = SystemEnvironment.wall_clock_ms();
        let payload = serde_json::to_vec(&ChannelClosed {
            message_id: id.to_string(),
            created_date: now_ms.to_string(),
            destination_id: self.spec.instance_id.clone(),
            session_id: self.spec.session_id.clone(),
            message_type: message_type::CHANNEL_CLOSED.into(),
            schema_version: 1,
            output: output.to_owned(),
        })
        .unwrap_or_default();
        let mut frame = Vec::new();
        if emit_short_header(message_type::CHANNEL_CLOSED, now_ms, id, &payload, &mut frame).is_ok() {
            let _ = tx.send(ToClient::Frame(frame));
        }
        let _ = tx.send(ToClient::Close(1000, "session ended".into()));
    }

    /// How much input may wait between the data channel and the target
    /// before the data channel's write blocks: none in basic mode and in a
    /// shell (one blocking write to the socket or terminal), smux's buffers
    /// in mux mode.
    fn input_buffer(&self) -> usize {
        match self.mode {
            Some(PortMode::Mux { .. }) => MUX_INPUT_BUFFER,
            _ => 0,
        }
    }

    /// Input was handed on (`n` bytes of it are now buffered): the write
    /// returns once what is held fits the buffer.
    fn handed_on(&mut self, n: usize) {
        self.input_held += n;
        self.write_pending = true;
        self.complete_write();
    }

    fn complete_write(&mut self) {
        if self.write_pending && self.input_held <= self.input_buffer() {
            self.write_pending = false;
            self.chan.input_done(Instant::now().into_std());
        }
    }

    fn start_shell(&mut self) {
        let Plugin::Shell { command, program } = &self.spec.plugin else { return };
        info!(session = %self.spec.session_id, %program, "starting the shell");
        let netns = self.spec.netns.as_deref();
        match instance::Shell::spawn(
            program,
            command.as_deref(),
            netns,
            self.events_tx.clone(),
            self.released_tx.clone(),
        ) {
            Ok(sh) => self.shell = Some(sh),
            Err(e) => self.done = Some(format!("Unable to start command: {e}")),
        }
    }

    async fn handle_events(&mut self) {
        while let Some(ev) = self.chan.poll_event() {
            match ev {
                AgentEvent::HandshakeSkipped => {
                    info!(session = %self.spec.session_id, "no handshake for this session type");
                    self.start_shell();
                }
                AgentEvent::HandshakeDone { client_version, .. }
                    if matches!(self.spec.plugin, Plugin::Shell { .. }) =>
                {
                    info!(session = %self.spec.session_id, %client_version, "handshake complete");
                    self.start_shell();
                }
                AgentEvent::Size { cols, rows } => {
                    if let Some(Err(e)) = self.shell.as_ref().map(|sh| sh.resize(cols, rows)) {
                        warn!("Unable to set pty size: {e}");
                    }
                }
                AgentEvent::HandshakeDone { client_version, mode } => {
                    info!(session = %self.spec.session_id, %client_version, ?mode, "handshake complete");
                    let t = self.target();
                    if let Some(refusal) =
                        t.remote.then(|| denylist::refusal(&self.spec.agent_version, &t.host)).flatten()
                    {
                        // The plugin's parameters fail before any dial: the session ends with its output.
                        warn!(session = %self.spec.session_id, "{refusal}");
                        self.done = Some(refusal);
                        continue;
                    }
                    self.mode = Some(mode);
                    match mode {
                        PortMode::Mux { keepalive } => {
                            let mut m = Mux::new(Role::Server, keepalive);
                            m.handle_timeout(std::time::Instant::now());
                            self.mux = Some(m);
                        }
                        // port_basic.go dials right after the handshake and fails the session if it cannot.
                        PortMode::Basic => {
                            if let Err(e) = self.dial_basic().await {
                                self.done = Some(format!("Unable to connect to specified port: {e}"));
                            }
                        }
                    }
                }
                AgentEvent::Input(d) => self.handle_input(d).await,
                AgentEvent::Flag(Flag::TerminateSession) => {
                    self.done = Some(String::new());
                }
                AgentEvent::Flag(Flag::DisconnectToPort) => {
                    if self.mode == Some(PortMode::Basic) {
                        // Close the target; the next Output dials again.
                        self.streams.remove(&self.basic_id);
                    }
                }
                AgentEvent::Flag(_) => {}
                AgentEvent::Failed(e) => self.done = Some(e),
            }
        }
    }

    fn target(&self) -> Target {
        match &self.spec.plugin {
            Plugin::Port(t) => t.clone(),
            // Never dialled: shell sessions have no port mode.
            Plugin::Shell { .. } => Target { host: String::new(), port: 0, remote: false },
        }
    }

    async fn dial_basic(&mut self) -> std::io::Result<()> {
        let t = self.target();
        let stream = instance::dial(&t.host, t.port, self.spec.netns.as_deref()).await?;
        self.basic_id += 1;
        let id = self.basic_id;
        self.streams.insert(id, Stream::Dialing(Vec::new()));
        self.open_stream(id, stream, PAYLOAD_SIZE, Release::AfterWrite);
        Ok(())
    }

    /// The plugin's write of one input message. Whatever it hands on counts
    /// as held until released; what goes nowhere is done at once.
    async fn handle_input(&mut self, d: Vec<u8>) {
        if let Some(sh) = &self.shell {
            let n = d.len();
            let handed = sh.write(d);
            self.handed_on(if handed { n } else { 0 });
            return;
        }
        match self.mode {
            Some(PortMode::Basic) => {
                let n = d.len();
                if !self.streams.contains_key(&self.basic_id) {
                    // The target went away earlier: dial again on data (port_basic.go).
                    if let Err(e) = self.dial_basic().await {
                        warn!("redial failed: {e}");
                        self.handed_on(0);
                        return;
                    }
                }
                let handed = self.write_stream(self.basic_id, d);
                self.handed_on(if handed { n } else { 0 });
            }
            Some(PortMode::Mux { .. }) => {
                let result = self.mux.as_mut().map(|m| m.handle_input(&d));
                if let Some(Err(e)) = result {
                    self.done = Some(format!("smux session failed: {e}"));
                    self.handed_on(0);
                    return;
                }
                let mut held = 0;
                while let Some(ev) = self.mux.as_mut().and_then(Mux::poll_event) {
                    match ev {
                        MuxEvent::Opened(sid) => self.dial_mux(sid),
                        MuxEvent::Data(sid, d) => {
                            let n = d.len();
                            if self.write_stream(sid.0, d) {
                                held += n;
                            }
                        }
                        MuxEvent::Closed(sid) => self.remove_stream(sid.0),
                    }
                }
                self.handed_on(held);
            }
            None => self.handed_on(0),
        }
    }

    /// Drops a stream; input still waiting for its dial goes back to the
    /// buffer, as smux returns a closed stream's tokens.
    fn remove_stream(&mut self, id: u32) {
        if let Some(Stream::Dialing(pending)) = self.streams.remove(&id).as_mut() {
            let n: usize = std::mem::take(pending).iter().map(Vec::len).sum();
            self.input_held = self.input_held.saturating_sub(n);
            self.complete_write();
        }
    }

    /// AcceptStream then DialCall for each new stream.
    fn dial_mux(&mut self, sid: StreamId) {
        self.streams.insert(sid.0, Stream::Dialing(Vec::new()));
        let tx = self.events_tx.clone();
        let t = self.target();
        let netns = self.spec.netns.clone();
        tokio::spawn(async move {
            let r = tokio::time::timeout(Duration::from_secs(10), instance::dial(&t.host, t.port, netns.as_deref()))
                .await
                .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "dial timed out")));
            let _ = tx.send(TargetEvent::Dialed(sid.0, r)).await;
        });
    }

    /// Queues bytes for a target; false if there is no such stream.
    fn write_stream(&mut self, id: u32, d: Vec<u8>) -> bool {
        match self.streams.get_mut(&id) {
            Some(Stream::Dialing(pending)) => {
                pending.push(d);
                true
            }
            Some(Stream::Open(tx, _)) => tx.send(d).is_ok(),
            None => false,
        }
    }

    fn open_stream(&mut self, id: u32, stream: TcpStream, read_size: usize, release: Release) {
        // The agent dials with Go's net package, which turns Nagle off on every TCP
        // connection by default; with it on, small writes wait for delayed ACKs.
        let _ = stream.set_nodelay(true);
        let (mut r, mut w) = stream.into_split();
        let (wtx, mut wrx) = mpsc::unbounded_channel::<Vec<u8>>();
        let released = self.released_tx.clone();
        tokio::spawn(async move {
            // Every byte handed over is released exactly once, written or not,
            // so a dead target never holds the data channel's writes.
            let mut failed = false;
            while let Some(d) = wrx.recv().await {
                let n = d.len();
                if release == Release::OnTake {
                    let _ = released.send(Released(n));
                }
                failed = failed || w.write_all(&d).await.is_err();
                if release == Release::AfterWrite {
                    let _ = released.send(Released(n));
                }
            }
            let _ = w.shutdown().await;
        });
        let events = self.events_tx.clone();
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; read_size];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = events.send(TargetEvent::Eof(id)).await;
                        return;
                    }
                    Ok(n) => {
                        if events.send(TargetEvent::Data(id, buf[..n].to_vec())).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let pending = match self.streams.insert(id, Stream::Open(wtx.clone(), reader)) {
            Some(mut s) => match &mut s {
                Stream::Dialing(p) => std::mem::take(p),
                Stream::Open(..) => Vec::new(),
            },
            None => Vec::new(),
        };
        for d in pending {
            let _ = wtx.send(d);
        }
    }

    fn handle_target(&mut self, ev: TargetEvent) {
        let now = Instant::now().into_std();
        match ev {
            TargetEvent::Dialed(id, Ok(stream)) => {
                if self.streams.contains_key(&id) {
                    self.open_stream(id, stream, MUX_READ, Release::OnTake);
                }
            }
            TargetEvent::Dialed(id, Err(e)) => {
                warn!(stream = id, "Unable to dial connection to server: {e}");
                self.remove_stream(id);
                // Flag first, then close the stream (FIN), as port_mux.go does.
                self.chan.send_flag(now, Flag::ConnectToPortError);
                if let Some(m) = &mut self.mux {
                    m.close(StreamId(id));
                }
            }
            TargetEvent::Data(id, d) => match self.mode {
                Some(PortMode::Mux { .. }) => {
                    if let Some(m) = &mut self.mux {
                        m.write(StreamId(id), &d);
                    }
                }
                _ => {
                    if id == self.basic_id {
                        self.out.extend_from_slice(&d);
                    }
                }
            },
            TargetEvent::Eof(id) => {
                debug!(stream = id, "target closed");
                self.remove_stream(id);
                if let Some(m) = &mut self.mux {
                    m.close(StreamId(id));
                }
                // Basic mode tells the client nothing; the next Output redials.
            }
            TargetEvent::ShellOutput(d) => self.out.extend_from_slice(&d),
            TargetEvent::ShellExited(status) => {
                info!(session = %self.spec.session_id, %status, "the shell exited");
                self.closing = Some(Instant::now() + CLOSE_WAIT);
            }
        }
    }
}
