//! HTTP proxies for the websocket: which proxy a URL goes through, and the
//! CONNECT tunnel through it.
//!
//! The choice follows curl's variables (`HTTPS_PROXY`/`https_proxy` for https
//! and wss, `HTTP_PROXY`/`http_proxy` for http and ws, `ALL_PROXY` for both,
//! `NO_PROXY`/`no_proxy` to bypass) as hyper-util reads them, which is also how
//! the AWS SDK's HTTP client reads them: the API calls and the websocket take
//! the same path. An explicit proxy (`--proxy`) replaces the variables for
//! every scheme; `NO_PROXY` still applies.
//!
//! Every websocket goes through the proxy with `CONNECT host:port` (ws too:
//! the upgrade is not something a forwarding proxy can be trusted to pass),
//! with basic credentials taken from the proxy URL. TLS to AWS runs inside the
//! tunnel, verified as without a proxy.

use std::time::Duration;

use hyper_util::client::proxy::matcher::{Intercept, Matcher};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The variables a proxy can come from, in the order they are consulted.
const HTTPS_VARS: [&str; 2] = ["HTTPS_PROXY", "https_proxy"];
const HTTP_VARS: [&str; 2] = ["HTTP_PROXY", "http_proxy"];
const ALL_VARS: [&str; 2] = ["ALL_PROXY", "all_proxy"];
const NO_PROXY_VARS: [&str; 2] = ["NO_PROXY", "no_proxy"];

/// The longest CONNECT answer we read before giving up on the proxy.
const MAX_REPLY: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{source_name}={value:?} is not a proxy URL ssm-proxy can use: {why}")]
    Invalid { source_name: String, value: String, why: &'static str },
    #[error("cannot reach the proxy {proxy}: {source}")]
    Unreachable {
        proxy: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the proxy {proxy} wants credentials for CONNECT to {target} (407): give them in the proxy URL, http://user:password@host:port")]
    NeedsCredentials { proxy: String, target: String },
    #[error("the proxy {proxy} refused CONNECT to {target}: {status}")]
    Refused { proxy: String, target: String, status: String },
    #[error("the proxy {proxy} gave no valid answer to CONNECT to {target}")]
    BadReply { proxy: String, target: String },
}

/// The proxy rules for one process: explicit or from the environment.
#[derive(Clone, Debug)]
pub struct Proxies {
    matcher: std::sync::Arc<Matcher>,
    /// Where the https and the http proxy came from, for messages.
    https_from: String,
    http_from: String,
    /// The explicit proxy, when there is one.
    explicit: Option<String>,
    /// The rules are the environment's.
    from_env: bool,
}

impl Default for Proxies {
    /// No proxy at all (not even the environment's).
    fn default() -> Proxies {
        Proxies {
            matcher: std::sync::Arc::new(Matcher::builder().build()),
            https_from: String::new(),
            http_from: String::new(),
            explicit: None,
            from_env: false,
        }
    }
}

/// The proxy one URL goes through.
#[derive(Debug)]
pub struct Route {
    intercept: Intercept,
    /// `http://host:port (from HTTPS_PROXY)`, without credentials.
    pub description: String,
}

impl Proxies {
    /// `explicit` (`--proxy`) for every scheme, or else the environment's
    /// variables. Each value in use is checked here, so that a mistyped proxy
    /// is an error rather than a silent direct connection.
    pub fn new(explicit: Option<&str>) -> Result<Proxies, ProxyError> {
        Proxies::with_env(explicit, |name| std::env::var(name).ok())
    }

    /// [`Proxies::new`] with the variables read through `var`.
    pub fn with_env(explicit: Option<&str>, var: impl Fn(&str) -> Option<String>) -> Result<Proxies, ProxyError> {
        let first = |names: &[&str]| -> Option<(String, String)> {
            names.iter().find_map(|n| var(n).filter(|v| !v.trim().is_empty()).map(|v| ((*n).to_owned(), v)))
        };
        let no_proxy = first(&NO_PROXY_VARS).map(|(_, v)| v).unwrap_or_default();
        if let Some(url) = explicit.map(str::trim).filter(|u| !u.is_empty()) {
            check("--proxy", url)?;
            let url = if url.contains("://") { url.to_owned() } else { format!("http://{url}") };
            let matcher = Matcher::builder().all(url.clone()).no(no_proxy).build();
            return Ok(Proxies {
                matcher: std::sync::Arc::new(matcher),
                https_from: "--proxy".into(),
                http_from: "--proxy".into(),
                explicit: Some(url),
                from_env: false,
            });
        }
        let https = first(&HTTPS_VARS);
        let http = first(&HTTP_VARS);
        let all = first(&ALL_VARS);
        for (name, value) in [&https, &http, &all].into_iter().flatten() {
            check(name, value)?;
        }
        let name = |v: &Option<(String, String)>| v.as_ref().map(|(n, _)| n.clone());
        let https_from = name(&https).or_else(|| name(&all)).unwrap_or_default();
        let http_from = name(&http).or_else(|| name(&all)).unwrap_or_default();
        let mut builder = Matcher::builder().no(no_proxy);
        if let Some((_, v)) = all {
            builder = builder.all(v);
        }
        if let Some((_, v)) = https {
            builder = builder.https(v);
        }
        if let Some((_, v)) = http {
            builder = builder.http(v);
        }
        Ok(Proxies {
            matcher: std::sync::Arc::new(builder.build()),
            https_from,
            http_from,
            explicit: None,
            from_env: true,
        })
    }

    /// The explicit proxy URL (`--proxy`, with its scheme), to hand to other
    /// HTTP clients.
    pub fn explicit(&self) -> Option<&str> {
        self.explicit.as_deref()
    }

    /// The rules are the environment's (no `--proxy`): other HTTP clients
    /// should read the same variables.
    pub fn from_env(&self) -> bool {
        self.from_env
    }

    /// The proxy `url` goes through, or `None` to connect directly.
    pub fn route(&self, url: &str) -> Option<Route> {
        let uri: http::Uri = url.parse().ok()?;
        // The websocket schemes follow their http counterparts.
        let uri = match uri.scheme_str() {
            Some("wss") => with_scheme(&uri, "https")?,
            Some("ws") => with_scheme(&uri, "http")?,
            _ => uri,
        };
        let intercept = self.matcher.intercept(&uri)?;
        let origin = if uri.scheme_str() == Some("https") { &self.https_from } else { &self.http_from };
        let description = format!("{} (from {origin})", proxy_address(intercept.uri()));
        Some(Route { intercept, description })
    }
}

fn with_scheme(uri: &http::Uri, scheme: &str) -> Option<http::Uri> {
    let mut parts = uri.clone().into_parts();
    parts.scheme = Some(scheme.parse().ok()?);
    http::Uri::from_parts(parts).ok()
}

/// `host:port` of a proxy, the port defaulting as hyper-util's does (80).
fn proxy_address(uri: &http::Uri) -> String {
    let host = uri.host().unwrap_or("?");
    let port = uri.port_u16().unwrap_or(80);
    format!("http://{host}:{port}")
}

/// A proxy URL as we can use it: http (or no scheme), with a host.
fn check(source_name: &str, value: &str) -> Result<(), ProxyError> {
    let invalid = |why| ProxyError::Invalid { source_name: source_name.to_owned(), value: redact_userinfo(value), why };
    let uri: http::Uri = value.trim().parse().map_err(|_| invalid("not a URL"))?;
    match uri.scheme_str() {
        None | Some("http") => {}
        Some("https") => return Err(invalid("TLS to the proxy (https://) is not supported; give its http:// address")),
        Some(s) if s.starts_with("socks") => {
            return Err(invalid("SOCKS proxies are not supported; give an HTTP proxy"))
        }
        Some(_) => return Err(invalid("the scheme must be http://")),
    }
    let host = uri.authority().map(|a| a.as_str().rsplit('@').next().unwrap_or("").to_owned()).unwrap_or_default();
    if host.is_empty() || host.starts_with(':') {
        return Err(invalid("no host"));
    }
    Ok(())
}

/// A proxy URL for messages: the password, if any, replaced.
pub fn redact_userinfo(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}", redact_userinfo(rest)),
        None => match url.split_once('@') {
            Some((user, host)) => match user.split_once(':') {
                Some((name, _)) => format!("{name}:***@{host}"),
                None => url.to_owned(),
            },
            None => url.to_owned(),
        },
    }
}

/// A TCP connection to `host:port` through `route`'s proxy (HTTP CONNECT),
/// ready for TLS or the websocket upgrade.
pub async fn tunnel(route: &Route, host: &str, port: u16, timeout: Duration) -> Result<TcpStream, ProxyError> {
    let proxy = route.description.clone();
    let target = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    let proxy_uri = route.intercept.uri();
    let address = (proxy_uri.host().unwrap_or_default().trim_matches(['[', ']']), proxy_uri.port_u16().unwrap_or(80));
    let unreachable = |source| ProxyError::Unreachable { proxy: proxy.clone(), source };
    let work = async {
        let mut stream = TcpStream::connect(address).await.map_err(unreachable)?;
        stream.set_nodelay(true).map_err(unreachable)?;
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(auth) = route.intercept.basic_auth().and_then(|v| v.to_str().ok()) {
            request.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await.map_err(unreachable)?;
        let reply = read_reply(&mut stream).await.map_err(unreachable)?;
        match parse_status(&reply) {
            Some((200..=299, _)) => Ok(stream),
            Some((407, _)) => Err(ProxyError::NeedsCredentials { proxy: proxy.clone(), target: target.clone() }),
            Some((_, status)) => Err(ProxyError::Refused { proxy: proxy.clone(), target: target.clone(), status }),
            None => Err(ProxyError::BadReply { proxy: proxy.clone(), target: target.clone() }),
        }
    };
    tokio::time::timeout(timeout, work).await.unwrap_or_else(|_| {
        Err(ProxyError::Unreachable {
            proxy: route.description.clone(),
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer to CONNECT"),
        })
    })
}

/// The proxy's answer up to the blank line, read a byte at a time: whatever
/// follows belongs to the tunnel.
async fn read_reply(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut reply = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"\r\n\r\n") && reply.len() < MAX_REPLY {
        if stream.read(&mut byte).await? == 0 {
            break;
        }
        reply.push(byte[0]);
    }
    Ok(reply)
}

/// `HTTP/1.x CODE REASON` → (code, "CODE REASON").
fn parse_status(reply: &[u8]) -> Option<(u16, String)> {
    if !reply.ends_with(b"\r\n\r\n") {
        return None;
    }
    let line = reply.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let rest = line.strip_prefix("HTTP/1.")?.get(2..)?;
    let code: u16 = rest.get(..3)?.parse().ok()?;
    Some((code, rest.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
    }

    fn via(p: &Proxies, url: &str) -> Option<String> {
        p.route(url).map(|r| r.description)
    }

    #[test]
    fn the_scheme_picks_the_variable_and_websockets_follow_http() {
        let vars = [("HTTPS_PROXY", "http://secure:3128"), ("http_proxy", "plain:8080")];
        let p = Proxies::with_env(None, env(&vars)).expect("valid");
        assert_eq!(
            via(&p, "wss://ssmmessages.us-east-1.amazonaws.com/v1/data-channel/s").as_deref(),
            Some("http://secure:3128 (from HTTPS_PROXY)")
        );
        assert_eq!(
            via(&p, "https://ssm.us-east-1.amazonaws.com/").as_deref(),
            Some("http://secure:3128 (from HTTPS_PROXY)")
        );
        assert_eq!(
            via(&p, "ws://192.168.102.2:4566/v1/data-channel/s").as_deref(),
            Some("http://plain:8080 (from http_proxy)")
        );
        assert_eq!(via(&Proxies::with_env(None, env(&[])).expect("none"), "wss://a.example/x"), None);
    }

    #[test]
    fn no_proxy_matches_domains_suffixes_addresses_and_blocks() {
        let vars =
            [("HTTPS_PROXY", "http://p:3128"), ("NO_PROXY", ".internal,vpce.amazonaws.com,10.0.0.0/8,192.168.1.5")];
        let p = Proxies::with_env(None, env(&vars)).expect("valid");
        assert_eq!(via(&p, "https://db.corp.internal/"), None);
        assert_eq!(via(&p, "https://vpce-1.ssmmessages.vpce.amazonaws.com/"), None, "a subdomain of an entry");
        assert_eq!(via(&p, "https://10.1.2.3/"), None, "inside the block");
        assert_eq!(via(&p, "https://192.168.1.5:443/"), None);
        assert!(via(&p, "https://192.168.1.6/").is_some());
        assert!(via(&p, "https://ssmmessages.us-east-1.amazonaws.com/").is_some());
        assert!(via(&p, "https://notinternal/").is_some(), "a suffix matches at a dot only");
        let all = Proxies::with_env(None, env(&[("HTTPS_PROXY", "http://p:3128"), ("no_proxy", "*")])).expect("valid");
        assert_eq!(via(&all, "https://anything.example/"), None);
    }

    #[test]
    fn an_explicit_proxy_replaces_the_variables_but_not_no_proxy() {
        let vars = [("HTTPS_PROXY", "http://env:1"), ("NO_PROXY", "localhost")];
        let p = Proxies::with_env(Some("http://user:pw@cli:8888"), env(&vars)).expect("valid");
        assert_eq!(via(&p, "wss://x.example/").as_deref(), Some("http://cli:8888 (from --proxy)"));
        assert_eq!(via(&p, "ws://x.example/").as_deref(), Some("http://cli:8888 (from --proxy)"));
        assert_eq!(via(&p, "http://localhost:4566/"), None);
        let auth = p.route("wss://x.example/").and_then(|r| r.intercept.basic_auth().cloned()).expect("credentials");
        // base64("user:pw")
        assert_eq!(auth.to_str().expect("ascii"), "Basic dXNlcjpwdw==");
    }

    #[test]
    fn unusable_proxy_urls_are_errors_naming_their_source_without_the_password() {
        for (value, why) in [
            ("https://p:443", "https://"),
            ("socks5://p:1080", "SOCKS"),
            ("ftp://p:21", "http://"),
            ("http://:8080", "no host"),
        ] {
            let err = Proxies::with_env(None, env(&[("HTTPS_PROXY", value)])).expect_err(value).to_string();
            assert!(err.contains("HTTPS_PROXY") && err.contains(why), "{value}: {err}");
        }
        let err = Proxies::with_env(Some("socks5://bob:hunter2@p:1080"), env(&[])).expect_err("socks").to_string();
        assert!(err.contains("--proxy") && !err.contains("hunter2"), "{err}");
        assert_eq!(redact_userinfo("http://bob:hunter2@p:3128"), "http://bob:***@p:3128");
        assert_eq!(redact_userinfo("p:3128"), "p:3128");
    }

    #[test]
    fn connect_replies_are_read_to_the_blank_line() {
        assert_eq!(
            parse_status(b"HTTP/1.1 200 Connection established\r\n\r\n"),
            Some((200, "200 Connection established".into()))
        );
        assert_eq!(
            parse_status(b"HTTP/1.0 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n")
                .map(|s| s.0),
            Some(407)
        );
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), None, "cut short");
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH\r\n\r\n"), None);
    }

    #[tokio::test]
    async fn the_tunnel_sends_connect_with_credentials_and_hands_over_the_stream() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let request = read_reply(&mut s).await.expect("request");
            s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\nhello").await.expect("reply");
            String::from_utf8(request).expect("utf8")
        });
        let proxy = format!("http://u:p@127.0.0.1:{port}");
        let p = Proxies::with_env(Some(&proxy), env(&[])).expect("valid");
        let route = p.route("wss://ssmmessages.example:443/v1").expect("proxied");
        let mut stream = tunnel(&route, "ssmmessages.example", 443, Duration::from_secs(5)).await.expect("tunnel");
        let mut rest = [0u8; 5];
        stream.read_exact(&mut rest).await.expect("bytes after the reply");
        assert_eq!(&rest, b"hello", "what follows the reply is the tunnel's");
        let request = server.await.expect("server");
        assert!(request.starts_with("CONNECT ssmmessages.example:443 HTTP/1.1\r\n"), "{request}");
        assert!(request.contains("Proxy-Authorization: Basic dTpw\r\n"), "{request}");
    }

    #[tokio::test]
    async fn a_refusal_and_a_dead_proxy_are_errors_naming_the_proxy() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            for answer in
                [&b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"[..], b"HTTP/1.1 403 Forbidden\r\n\r\n"]
            {
                let (mut s, _) = listener.accept().await.expect("accept");
                let _ = read_reply(&mut s).await;
                s.write_all(answer).await.expect("reply");
            }
        });
        let p = Proxies::with_env(Some(&format!("127.0.0.1:{port}")), env(&[])).expect("valid");
        let route = p.route("https://h.example/").expect("proxied");
        let e = tunnel(&route, "h.example", 443, Duration::from_secs(5)).await.expect_err("407").to_string();
        assert!(e.contains("wants credentials") && e.contains(&format!("127.0.0.1:{port}")), "{e}");
        let e = tunnel(&route, "h.example", 443, Duration::from_secs(5)).await.expect_err("403").to_string();
        assert!(e.contains("refused CONNECT to h.example:443: 403 Forbidden"), "{e}");
        let dead = Proxies::with_env(Some("http://127.0.0.1:9"), env(&[])).expect("valid");
        let route = dead.route("https://h.example/").expect("proxied");
        let e = tunnel(&route, "h.example", 443, Duration::from_secs(5)).await.expect_err("dead").to_string();
        assert!(e.contains("cannot reach the proxy http://127.0.0.1:9 (from --proxy)"), "{e}");
    }
}
