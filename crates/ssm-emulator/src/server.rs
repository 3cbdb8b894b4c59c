//! One listener serves both the API (POST /) and the ssmmessages websocket
//! (GET /v1/data-channel/<session>), like the two AWS hosts behind one
//! address. The websocket relays frames between the client and the session's
//! agent task, injecting the configured faults on the way (the "service").

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ssm_channel::payloads::OpenDataChannel;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, warn};

use crate::agent::{AgentInput, ToClient};
use crate::config::{Config, Faults};

/// One session as the service tracks it.
#[derive(Debug)]
pub struct SessionEntry {
    pub id: String,
    pub target: String,
    pub agent: mpsc::Sender<AgentInput>,
    /// Which session this is, in StartSession order (1 = the first).
    pub ordinal: u64,
    /// Websockets the client attached to this session.
    pub websockets: AtomicU64,
    tokens: Mutex<HashSet<String>>,
    terminated: AtomicBool,
}

impl SessionEntry {
    pub fn new(id: String, target: String, agent: mpsc::Sender<AgentInput>, token: String, ordinal: u64) -> Self {
        SessionEntry {
            id,
            target,
            agent,
            ordinal,
            websockets: AtomicU64::new(0),
            tokens: Mutex::new(HashSet::from([token])),
            terminated: AtomicBool::new(false),
        }
    }
    pub fn add_token(&self, t: String) {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner()).insert(t);
    }
    fn has_token(&self, t: &str) -> bool {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner()).contains(t)
    }
    pub fn mark_terminated(&self) {
        self.terminated.store(true, Ordering::SeqCst);
    }
    pub fn is_terminated(&self) -> bool {
        self.terminated.load(Ordering::SeqCst)
    }
}

/// Counters tests and the CLI read.
#[derive(Debug, Default)]
pub struct Counters {
    pub api_calls: AtomicU64,
    pub auth_failures: AtomicU64,
    pub websockets: AtomicU64,
    pub frames_dropped: AtomicU64,
    pub frames_duplicated: AtomicU64,
    pub frames_reordered: AtomicU64,
    pub forced_closes: AtomicU64,
    /// Messages the agents resent because their ack came later than the RTO
    /// (on a loaded machine, even a clean link produces some).
    pub agent_resends: Arc<AtomicU64>,
}

#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub sessions: Mutex<HashMap<String, Arc<SessionEntry>>>,
    pub counters: Counters,
    /// The data keys GenerateDataKey issued (see [`crate::kms`]).
    pub kms: Arc<crate::kms::Kms>,
    next_conn: AtomicU64,
    /// Sessions started so far (the last one's ordinal).
    started: AtomicU64,
}

impl Shared {
    pub fn new(config: Config) -> Shared {
        Shared {
            config,
            sessions: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            kms: Arc::default(),
            next_conn: AtomicU64::new(1),
            started: AtomicU64::new(0),
        }
    }

    /// The next session's ordinal (1 = the first).
    pub fn next_ordinal(&self) -> u64 {
        self.started.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Sessions by ordinal, the first started first.
    pub fn sessions_in_order(&self) -> Vec<Arc<SessionEntry>> {
        let mut all: Vec<_> = self.sessions.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        all.sort_by_key(|e| e.ordinal);
        all
    }
}

/// A running emulator.
#[derive(Debug)]
pub struct Emulator {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Emulator {
    /// Binds `addr` (port 0 picks one) and serves until dropped.
    pub async fn start(config: Config, addr: SocketAddr) -> std::io::Result<Emulator> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config));
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let _ = stream.set_nodelay(true);
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(s.clone(), req));
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades();
                    if let Err(e) = conn.await {
                        debug!("connection ended: {e}");
                    }
                });
            }
        });
        Ok(Emulator { addr, shared, task })
    }

    /// The URL to give the SDK as AWS_ENDPOINT_URL.
    pub fn endpoint_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = Full<Bytes>;

fn json_response(status: StatusCode, body: serde_json::Value, error_type: Option<&str>) -> Response<Body> {
    let mut r = Response::builder().status(status).header("content-type", "application/x-amz-json-1.1");
    if let Some(t) = error_type {
        r = r.header("x-amzn-errortype", t);
    }
    r.header("x-amzn-requestid", uuid::Uuid::new_v4().to_string())
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn error_response(code: &str, message: &str) -> Response<Body> {
    json_response(StatusCode::BAD_REQUEST, serde_json::json!({"__type": code, "message": message}), Some(code))
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, std::convert::Infallible> {
    let is_ws = req
        .headers()
        .get(hyper::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if is_ws {
        return Ok(upgrade(shared, req));
    }
    let route53 = req.method() == hyper::Method::GET && crate::route53::is_route53(req.uri().path());
    if req.method() != hyper::Method::POST && !route53 {
        return Ok(Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from_static(
                b"ssm-emulator: POST the SSM JSON API to /, or open /v1/data-channel/<session>\n",
            )))
            .unwrap_or_default());
    }
    shared.counters.api_calls.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(error_response("SerializationException", "request body too large or unreadable")),
    };
    let headers: Vec<(String, String)> =
        parts.headers.iter().filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned()))).collect();
    let uri = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    if let Err(e) = crate::sigv4::verify(parts.method.as_str(), uri, &headers, &body, &shared.config.credentials) {
        shared.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
        warn!(code = e.code, "refused API call: {}", e.message);
        let status = if e.code == "MissingAuthenticationTokenException" {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::BAD_REQUEST
        };
        return Ok(json_response(status, serde_json::json!({"__type": e.code, "message": e.message}), Some(e.code)));
    }
    if route53 {
        let (status, xml) = match crate::route53::handle(&shared, parts.uri.path(), parts.uri.query().unwrap_or("")) {
            Ok(xml) => (StatusCode::OK, xml),
            Err(e) => (StatusCode::BAD_REQUEST, crate::route53::error_body(&e)),
        };
        return Ok(Response::builder()
            .status(status)
            .header("content-type", "text/xml")
            .header("x-amzn-requestid", uuid::Uuid::new_v4().to_string())
            .body(Full::new(Bytes::from(xml)))
            .unwrap_or_default());
    }
    let target = parts.headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let host = parts.headers.get(hyper::header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("127.0.0.1");
    Ok(match crate::api::handle(&shared, target, &body, host) {
        Ok(v) => json_response(StatusCode::OK, v, None),
        Err(e) => error_response(e.code, &e.message),
    })
}

fn upgrade(shared: Arc<Shared>, mut req: Request<Incoming>) -> Response<Body> {
    let session_id = req.uri().path().strip_prefix("/v1/data-channel/").map(str::to_owned);
    let key = req.headers().get("sec-websocket-key").map(|k| k.as_bytes().to_vec());
    let (Some(session_id), Some(key)) = (session_id, key) else {
        return Response::builder().status(StatusCode::BAD_REQUEST).body(Full::default()).unwrap_or_default();
    };
    if let Err(why) = check_signed_open(&shared, &req) {
        warn!(session = %session_id, "refused data-channel open: {why}");
        shared.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
        return Response::builder()
            .status(StatusCode::FORBIDDEN)
            .body(Full::new(Bytes::from(format!("{why}\n"))))
            .unwrap_or_default();
    }
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
    tokio::spawn(async move {
        match hyper::upgrade::on(&mut req).await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(ssm_channel::transport::ws_config()),
                )
                .await;
                relay(shared, session_id, ws).await;
            }
            Err(e) => debug!("upgrade failed: {e}"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(hyper::header::CONNECTION, "Upgrade")
        .header(hyper::header::UPGRADE, "websocket")
        .header("sec-websocket-accept", accept)
        .body(Full::default())
        .unwrap_or_default()
}

/// The upgrade's SigV4 signature (session-manager-plugin 1.2.764.0 and later
/// sign it for `ssmmessages`): checked when present, required with
/// `--require-signed-open`.
fn check_signed_open(shared: &Shared, req: &Request<Incoming>) -> Result<(), String> {
    let headers: Vec<(String, String)> =
        req.headers().iter().filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned()))).collect();
    let auth = headers.iter().find(|(k, _)| k == "authorization").map(|(_, v)| v.as_str());
    match auth {
        None if shared.config.require_signed_open => Err("the open is not signed (no Authorization header)".into()),
        None => Ok(()),
        Some(a) if !a.contains("/ssmmessages/aws4_request") => Err("the open is not signed for ssmmessages".into()),
        Some(_) => {
            let uri = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
            crate::sigv4::verify("GET", uri, &headers, b"", &shared.config.credentials)
                .map_err(|e| format!("{}: {}", e.code, e.message))
        }
    }
}

fn close_msg(code: CloseCode, reason: &str) -> WsMessage {
    WsMessage::Close(Some(CloseFrame { code, reason: reason.to_owned().into() }))
}

/// The service's side of one client websocket.
async fn relay<S>(shared: Arc<Shared>, session_id: String, ws: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    shared.counters.websockets.fetch_add(1, Ordering::Relaxed);
    let (mut tx, mut rx) = ws.split();
    // First text frame: OpenDataChannel (a Ping may come first).
    let open = read_open(&mut rx).await;
    let entry = shared.sessions.lock().unwrap_or_else(|e| e.into_inner()).get(&session_id).cloned();
    let valid = match (&open, &entry) {
        (Some(o), Some(e)) => !shared.config.faults.reject_tokens && !e.is_terminated() && e.has_token(&o.token_value),
        _ => false,
    };
    let (Some(entry), true) = (entry, valid) else {
        let reason = if open.as_ref().is_some_and(|o| !o.token_value.is_empty()) {
            "request to open data channel does not contain a valid token"
        } else {
            "request to open data channel does not contain token"
        };
        let _ = tx.send(close_msg(CloseCode::Unsupported, reason)).await;
        return;
    };
    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    info!(session = %session_id, conn, "client attached");
    let (to_client_tx, to_client_rx) = mpsc::unbounded_channel::<ToClient>();
    if entry.agent.send(AgentInput::Attach { conn, tx: to_client_tx }).await.is_err() {
        let _ = tx.send(close_msg(CloseCode::Normal, "session ended")).await;
        return;
    }
    entry.websockets.fetch_add(1, Ordering::Relaxed);
    let faults = shared.config.faults.for_session(entry.ordinal);
    let seed = shared.config.seed ^ conn;

    let down = FaultLine::new(faults.clone(), seed.wrapping_mul(2));
    let recycled = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_down(
        tx,
        to_client_rx,
        down,
        shared.clone(),
        faults.delay,
        entry.agent.clone(),
        recycled.clone(),
    ));

    // Client -> agent, through the fault line, until the socket ends or is recycled.
    let mut up = FaultLine::new(faults.clone(), seed.wrapping_mul(2) + 1);
    let recycle = faults.close_every.map(|d| Instant::now() + d);
    let (up_tx, up_rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let up_task = tokio::spawn(write_up(up_rx, entry.agent.clone()));
    loop {
        tokio::select! {
            m = rx.next() => match m {
                Some(Ok(WsMessage::Binary(b))) => {
                    for (delay, f) in up.route(b.to_vec(), &shared.counters) {
                        let _ = up_tx.send((Instant::now() + delay, f));
                    }
                }
                Some(Ok(WsMessage::Text(t))) => {
                    // The plugin feeds text frames to the same parser.
                    let _ = up_tx.send((Instant::now(), t.as_bytes().to_vec()));
                }
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            _ = sleep_until(recycle) => {
                shared.counters.forced_closes.fetch_add(1, Ordering::Relaxed);
                info!(session = %session_id, conn, "closing the websocket with 1000 Bye");
                recycled.store(true, Ordering::SeqCst);
                break;
            }
        }
    }
    let _ = entry.agent.send(AgentInput::Detach { conn }).await;
    // The agent dropped our sender: the writer hands back what it holds and
    // sends "Bye" if we are recycling.
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    // Finish the close handshake, still relaying what the client sends (acks
    // above all: the client never resends those). Dropping the socket with
    // unread data would make the kernel answer with RST, which discards
    // frames the client has not read yet.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(m)) = rx.next().await {
            match m {
                WsMessage::Binary(b) => {
                    let _ = up_tx.send((Instant::now(), b.to_vec()));
                }
                WsMessage::Close(_) => break,
                _ => {}
            }
        }
    })
    .await;
    drop(up_tx);
    let _ = up_task.await;
    info!(session = %session_id, conn, "client detached");
}

/// The client's first text frame, OpenDataChannel (Pings may come first),
/// within 30 s.
async fn read_open<S>(rx: &mut futures_util::stream::SplitStream<WebSocketStream<S>>) -> Option<OpenDataChannel>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(m)) = rx.next().await {
            match m {
                WsMessage::Text(t) => return serde_json::from_str::<OpenDataChannel>(t.as_str()).ok(),
                WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
                _ => return None,
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// Agent -> client, through the fault line. Ends when the agent detaches this
/// client (its sender drops); frames not written yet go back to the agent, to
/// be delivered after the client reconnects.
async fn write_down<S>(
    mut tx: futures_util::stream::SplitSink<WebSocketStream<S>, WsMessage>,
    mut to_client_rx: mpsc::UnboundedReceiver<ToClient>,
    mut down: FaultLine,
    down_shared: Arc<Shared>,
    close_delay: Duration,
    agent_w: mpsc::Sender<AgentInput>,
    recycled_w: Arc<AtomicBool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut queue = DelayQueue::default();
    let mut closing: Option<WsMessage> = None;
    // After a failed write, keep collecting until the agent detaches us, so
    // that nothing it sent in the meantime is lost.
    let mut failed = false;
    loop {
        // Send what is due now before waiting: tokio rounds timers up to the next
        // millisecond, which would add up to 1 ms to every undelayed frame.
        while !failed {
            let Some(item) = queue.pop_due(Instant::now()) else { break };
            if item.close {
                let _ = tx.send(closing.take().unwrap_or(WsMessage::Close(None))).await;
                return;
            }
            if tx.send(WsMessage::Binary(item.frame.clone().into())).await.is_err() {
                queue.put_back(item);
                failed = true;
            }
        }
        let next = if failed { None } else { queue.next_due() };
        tokio::select! {
            m = to_client_rx.recv() => match m {
                Some(ToClient::Frame(f)) => {
                    for (delay, f) in down.route(f, &down_shared.counters) {
                        queue.push(Instant::now() + delay, f, false);
                    }
                }
                Some(ToClient::Close(code, reason)) => {
                    closing = Some(close_msg(CloseCode::from(code), &reason));
                    queue.push(Instant::now() + close_delay, Vec::new(), true);
                }
                None => break,
            },
            _ = sleep_until(next) => {}
        }
    }
    if closing.is_some() && !failed {
        // The session ended: deliver its last frames and the close.
        for item in queue.drain() {
            let msg = if item.close {
                closing.take().unwrap_or(WsMessage::Close(None))
            } else {
                WsMessage::Binary(item.frame.into())
            };
            if tx.send(msg).await.is_err() || item.close {
                return;
            }
        }
        return;
    }
    let unsent: Vec<Vec<u8>> = queue.drain().filter(|i| !i.close).map(|i| i.frame).collect();
    if !unsent.is_empty() {
        let _ = agent_w.send(AgentInput::Requeue(unsent)).await;
    }
    if recycled_w.load(Ordering::SeqCst) && !failed {
        let _ = tx.send(close_msg(CloseCode::Normal, "Bye")).await;
    }
}

/// Client -> agent: frames enter the agent when the fault line says they
/// arrive, until the client side closes and nothing is left.
async fn write_up(mut up_rx: mpsc::UnboundedReceiver<(Instant, Vec<u8>)>, agent: mpsc::Sender<AgentInput>) {
    let mut queue = DelayQueue::default();
    let mut open = true;
    loop {
        // Due frames go at once (see the writer above on timer rounding).
        while let Some(item) = queue.pop_due(Instant::now()) {
            if agent.send(AgentInput::Frame(item.frame)).await.is_err() {
                return;
            }
        }
        if !open && queue.next_due().is_none() {
            return;
        }
        tokio::select! {
            m = up_rx.recv(), if open => match m {
                Some((at, f)) => queue.push(at, f, false),
                None => open = false,
            },
            _ = sleep_until(queue.next_due()) => {}
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// A frame waiting for its delivery time.
#[derive(Debug, PartialEq, Eq)]
struct Timed {
    at: Instant,
    /// Arrival order, so equal times keep their order.
    n: u64,
    frame: Vec<u8>,
    /// A close, not a frame.
    close: bool,
}

impl Ord for Timed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.n).cmp(&(other.at, other.n))
    }
}

impl PartialOrd for Timed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Frames in delivery-time order (the fault line's delays and reordering).
#[derive(Debug, Default)]
struct DelayQueue {
    heap: BinaryHeap<std::cmp::Reverse<Timed>>,
    n: u64,
}

impl DelayQueue {
    fn push(&mut self, at: Instant, frame: Vec<u8>, close: bool) {
        self.n += 1;
        self.heap.push(std::cmp::Reverse(Timed { at, n: self.n, frame, close }));
    }

    fn put_back(&mut self, item: Timed) {
        self.heap.push(std::cmp::Reverse(item));
    }

    fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|std::cmp::Reverse(t)| t.at)
    }

    fn pop_due(&mut self, now: Instant) -> Option<Timed> {
        if self.next_due()? > now {
            return None;
        }
        self.heap.pop().map(|std::cmp::Reverse(t)| t)
    }

    /// Everything left, in order.
    fn drain(&mut self) -> impl Iterator<Item = Timed> + '_ {
        std::iter::from_fn(move || self.heap.pop().map(|std::cmp::Reverse(t)| t))
    }
}

/// Decides each frame's fate: dropped, delivered once or twice, on time or late.
struct FaultLine {
    faults: Faults,
    rng: StdRng,
}

impl FaultLine {
    fn new(faults: Faults, seed: u64) -> Self {
        FaultLine { faults, rng: StdRng::seed_from_u64(seed) }
    }

    fn route(&mut self, frame: Vec<u8>, counters: &Counters) -> Vec<(Duration, Vec<u8>)> {
        let f = &self.faults;
        if !f.is_active() {
            return vec![(Duration::ZERO, frame)];
        }
        if f.drop > 0.0 && self.rng.random_bool(f.drop) {
            counters.frames_dropped.fetch_add(1, Ordering::Relaxed);
            return Vec::new();
        }
        let mut delay = f.delay;
        if f.reorder > 0.0 && self.rng.random_bool(f.reorder) {
            counters.frames_reordered.fetch_add(1, Ordering::Relaxed);
            delay += Duration::from_millis(self.rng.random_range(2..20));
        }
        let mut out = vec![(delay, frame)];
        if f.duplicate > 0.0 && self.rng.random_bool(f.duplicate) {
            counters.frames_duplicated.fetch_add(1, Ordering::Relaxed);
            let again = out[0].1.clone();
            out.push((delay + Duration::from_millis(1), again));
        }
        out
    }
}
