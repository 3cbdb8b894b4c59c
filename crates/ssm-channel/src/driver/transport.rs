//! The websocket to the ssmmessages endpoint: TLS trust, the upgrade, and the
//! OpenDataChannel text frame that authenticates it
//! (`src/datachannel/streaming.go`, `src/websocketutil/websocketutil.go`).

use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

use crate::payloads::OpenDataChannel;
use crate::proxy::{self, Proxies, ProxyError};
use crate::version::CLIENT_VERSION;

pub type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The plugin's dialer handshake timeout.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(45);
/// The plugin pings every 5 minutes (`PingTimeInterval`).
pub const PING_INTERVAL: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot read CA bundle {path}: {source}")]
    CaBundle {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("CA bundle {0} holds no usable PEM certificate")]
    EmptyCaBundle(String),
    #[error("no trusted root certificates: the system store is empty and no AWS_CA_BUNDLE was given")]
    NoRoots,
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
    #[error("connecting to {0} timed out after 45 s")]
    Timeout(String),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error("the stream URL {0} has no host")]
    NoHost(String),
}

/// Trust and proxy settings shared by the AWS API client and the websocket.
#[derive(Clone, Debug, Default)]
pub struct Trust {
    /// Extra PEM roots from `AWS_CA_BUNDLE` (or `SSL_CERT_FILE`).
    pub ca_bundle_pem: Option<Vec<u8>>,
    pub ca_bundle_path: Option<String>,
    /// The HTTP proxies (none by default; see [`Trust::with_proxies`]).
    pub proxies: Proxies,
}

/// How a websocket is dialled: the TLS settings and the proxies.
#[derive(Clone, Debug, Default)]
pub struct Dialer {
    /// `None`: tungstenite's own roots.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub proxies: Proxies,
}

impl Trust {
    /// Reads `AWS_CA_BUNDLE`, falling back to `SSL_CERT_FILE`.
    pub fn from_env() -> Result<Trust, TransportError> {
        let path = std::env::var("AWS_CA_BUNDLE")
            .ok()
            .filter(|p| !p.is_empty())
            .or_else(|| std::env::var("SSL_CERT_FILE").ok().filter(|p| !p.is_empty()));
        let Some(path) = path else { return Ok(Trust::default()) };
        let pem = std::fs::read(&path).map_err(|source| TransportError::CaBundle { path: path.clone(), source })?;
        Ok(Trust { ca_bundle_pem: Some(pem), ca_bundle_path: Some(path), proxies: Proxies::default() })
    }

    /// The same trust, through `proxies`.
    pub fn with_proxies(self, proxies: Proxies) -> Trust {
        Trust { proxies, ..self }
    }

    /// The websocket's dialer: [`Trust::rustls_config`] and the proxies.
    pub fn dialer(&self) -> Result<Dialer, TransportError> {
        Ok(Dialer { tls: Some(self.rustls_config()?), proxies: self.proxies.clone() })
    }

    /// A rustls client config: the system's roots plus the bundle.
    pub fn rustls_config(&self) -> Result<Arc<rustls::ClientConfig>, TransportError> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            // Skip certificates the system store has but rustls cannot use.
            let _ = roots.add(cert);
        }
        if let (Some(pem), Some(path)) = (&self.ca_bundle_pem, &self.ca_bundle_path) {
            use rustls_pki_types::pem::PemObject;
            let mut added = 0;
            for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem).flatten() {
                if roots.add(cert).is_ok() {
                    added += 1;
                }
            }
            if added == 0 {
                return Err(TransportError::EmptyCaBundle(path.clone()));
            }
        }
        if roots.is_empty() {
            return Err(TransportError::NoRoots);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|_| TransportError::NoRoots)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

/// Where to connect and how to authenticate: StartSession's or ResumeSession's answer.
#[derive(Clone)]
pub struct Endpoint {
    pub stream_url: String,
    pub token: String,
    /// Random per process, kept across reconnects.
    pub client_id: Uuid,
    /// Extra headers for the upgrade request: the SigV4 signature of the open
    /// (made by the caller, who holds the credentials).
    pub headers: Vec<(String, String)>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never log the token.
        f.debug_struct("Endpoint").field("stream_url", &self.stream_url).finish_non_exhaustive()
    }
}

/// Dials the StreamUrl exactly as given (no extra headers), directly or
/// through the proxy for it, then sends the OpenDataChannel frame with a fresh
/// RequestId.
pub async fn connect(endpoint: &Endpoint, dialer: &Dialer) -> Result<WsStream, TransportError> {
    let url = endpoint.stream_url.clone();
    let connector = dialer.tls.clone().map(tokio_tungstenite::Connector::Rustls);
    let connect_err = |e| TransportError::Connect { url: redact(&url), source: Box::new(e) };
    let request = upgrade_request(&url, &endpoint.headers).map_err(connect_err)?;
    let mut ws = match dialer.proxies.route(&url) {
        None => {
            let dial = tokio_tungstenite::connect_async_tls_with_config(request, Some(ws_config()), true, connector);
            let (ws, _resp) = tokio::time::timeout(HANDSHAKE_TIMEOUT, dial)
                .await
                .map_err(|_| TransportError::Timeout(redact(&url)))?
                .map_err(connect_err)?;
            ws
        }
        Some(route) => {
            let (host, port) = host_port(&url).ok_or_else(|| TransportError::NoHost(redact(&url)))?;
            let dial = async {
                let tcp = proxy::tunnel(&route, &host, port, HANDSHAKE_TIMEOUT).await?;
                let upgrade =
                    tokio_tungstenite::client_async_tls_with_config(request, tcp, Some(ws_config()), connector);
                upgrade.await.map_err(connect_err)
            };
            let (ws, _resp) = tokio::time::timeout(HANDSHAKE_TIMEOUT, dial)
                .await
                .map_err(|_| TransportError::Timeout(format!("{} through {}", redact(&url), route.description)))??;
            ws
        }
    };
    let open = OpenDataChannel {
        message_schema_version: "1.0".into(),
        request_id: Uuid::new_v4().to_string(),
        token_value: endpoint.token.clone(),
        client_id: endpoint.client_id.to_string(),
        client_version: CLIENT_VERSION.into(),
    };
    let text = serde_json::to_string(&open).unwrap_or_default();
    ws.send(WsMessage::Text(text.into())).await.map_err(connect_err)?;
    Ok(ws)
}

/// The upgrade request for `url` with `headers` added.
fn upgrade_request(
    url: &str,
    headers: &[(String, String)],
) -> Result<tokio_tungstenite::tungstenite::handshake::client::Request, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
    let mut request = url.into_client_request()?;
    for (name, value) in headers {
        let name =
            HeaderName::from_bytes(name.as_bytes()).map_err(tokio_tungstenite::tungstenite::http::Error::from)?;
        let value = HeaderValue::from_str(value).map_err(tokio_tungstenite::tungstenite::http::Error::from)?;
        request.headers_mut().insert(name, value);
    }
    Ok(request)
}

/// The host (without brackets) and port a ws/wss URL dials.
fn host_port(url: &str) -> Option<(String, u16)> {
    let uri: http::Uri = url.parse().ok()?;
    let default = if uri.scheme_str() == Some("wss") { 443 } else { 80 };
    let host = uri.host()?.trim_matches(['[', ']']).to_owned();
    Some((host, uri.port_u16().unwrap_or(default)))
}

/// Websocket settings for the data channel. tungstenite zero-fills its whole
/// read buffer before every read (128 KiB by default): with frames of about a
/// kilobyte that memset was a tenth of the daemon's CPU per request/response.
/// 16 KiB reads still take a dozen frames at once.
pub fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(16 << 10)
}

/// The StreamUrl without its query string, for messages and logs.
pub fn redact(url: &str) -> String {
    url.split('?').next().unwrap_or(url).to_owned()
}
