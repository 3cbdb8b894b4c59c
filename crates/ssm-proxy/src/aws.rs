//! The SSM API calls a Port session needs (StartSession, ResumeSession,
//! TerminateSession, DescribeInstanceInformation) through aws-sdk-ssm and the
//! user's normal credential chain, with errors that say what to do.

use aws_sdk_ssm::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ssm::types::InstanceInformationStringFilter;

use std::sync::{Arc, RwLock};

mod sign;

use ssm_channel::proxy::Proxies;
use ssm_channel::transport::{Endpoint, Trust};

/// Document names for Port sessions.
pub const PORT_DOCUMENT: &str = "AWS-StartPortForwardingSession";
pub const REMOTE_HOST_DOCUMENT: &str = "AWS-StartPortForwardingSessionToRemoteHost";
/// The document a StartSession without DocumentName runs: a shell.
pub const SHELL_DOCUMENT: &str = "SSM-SessionManagerRunShell";

/// Connecting to the API endpoint; a new network is up within this or not at all.
const API_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// One attempt of an API call (the SDK retries transient failures, timeouts included).
const API_ATTEMPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// ResumeSession answers in milliseconds; while the tunnel stalls, a stuck
/// attempt is given up sooner.
const RESUME_ATTEMPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(4);

#[derive(Debug, Clone, Default)]
pub struct AwsOptions {
    pub region: Option<String>,
    pub profile: Option<String>,
    /// StartSession's Reason on every session (default "ssm-proxy").
    pub reason: Option<String>,
    /// Where the data channel goes instead of StartSession's host
    /// (`--ssmmessages-endpoint`; else `AWS_ENDPOINT_URL_SSMMESSAGES`).
    pub ssmmessages_endpoint: Option<String>,
}

/// The variable the SDKs read for the ssmmessages service's endpoint.
pub const SSMMESSAGES_ENDPOINT_VAR: &str = "AWS_ENDPOINT_URL_SSMMESSAGES";

/// The DNS suffixes of AWS partitions' public endpoints.
const AWS_SUFFIXES: [&str; 8] = [
    "amazonaws.com",
    "amazonaws.com.cn",
    "api.aws",
    "amazonaws.eu",
    "c2s.ic.gov",
    "sc2s.sgov.gov",
    "cloud.adc-e.uk",
    "csp.hci.ic.gov",
];

/// Whether `stream_url` is a Session Manager data-channel endpoint for
/// `region`: `wss://ssmmessages[-fips].REGION.<an AWS partition's suffix>/v1/data-channel/...`.
/// Checked before the session token is sent, unless an endpoint is
/// configured (then the user chose where the API and the stream go).
/// Plugin 1.2.889.0 validates the stream URL too; its rule is not public,
/// this one is ours.
pub fn check_stream_url(stream_url: &str, region: &str) -> Result<(), String> {
    let refuse = |why: &str| {
        Err(format!(
            "StartSession returned a stream URL that is not a Session Manager endpoint ({why}): the session token is not \
             sent there. Behind a private endpoint set AWS_ENDPOINT_URL_SSMMESSAGES (or --ssmmessages-endpoint)"
        ))
    };
    let Some(rest) = stream_url.strip_prefix("wss://") else { return refuse("not wss://") };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = host.split(':').next().unwrap_or_default().to_ascii_lowercase();
    let mut labels = host.splitn(3, '.');
    let (service, in_region, suffix) = (labels.next(), labels.next(), labels.next());
    if !matches!(service, Some("ssmmessages" | "ssmmessages-fips")) {
        return refuse(&format!("host {host}"));
    }
    if in_region != Some(region) {
        return refuse(&format!("host {host} is not in {region}"));
    }
    if !suffix.is_some_and(|s| AWS_SUFFIXES.contains(&s)) {
        return refuse(&format!("host {host}"));
    }
    if !path.starts_with("v1/data-channel/") {
        return refuse(&format!("path /{path}"));
    }
    Ok(())
}

/// StartSession's stream URL sent to `endpoint` instead (a PrivateLink
/// interface endpoint, say): its scheme and host replace the URL's (https
/// becomes wss, http ws), its path, if any, goes in front of the session's
/// path, and the session's path and query stay as they are. TLS then checks
/// the endpoint's name, which is the host dialled.
pub fn rewrite_stream_url(stream_url: &str, endpoint: &str) -> Result<String, String> {
    let (scheme, rest) = endpoint.split_once("://").unwrap_or(("https", endpoint));
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "https" | "wss" => "wss",
        "http" | "ws" => "ws",
        other => return Err(format!("{endpoint:?}: the scheme must be https (or http), not {other:?}")),
    };
    let (host, prefix) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p.trim_end_matches('/')));
    if host.is_empty() || host.contains('@') || host.contains(['?', '#']) {
        return Err(format!("{endpoint:?}: give the endpoint as https://HOST[:PORT], without credentials or query"));
    }
    let (_, after_scheme) =
        stream_url.split_once("://").ok_or_else(|| format!("the stream URL {stream_url:?} has no scheme"))?;
    let path = after_scheme.find('/').map_or("/", |i| &after_scheme[i..]);
    let prefix = if prefix.is_empty() { String::new() } else { format!("/{prefix}") };
    Ok(format!("{scheme}://{host}{prefix}{path}"))
}

/// The trust settings (`AWS_CA_BUNDLE`) and proxies (`proxy`, else the
/// environment's) the API client and the websockets share.
pub fn trust(proxy: Option<&str>) -> anyhow::Result<Trust> {
    Ok(Trust::from_env()?.with_proxies(Proxies::new(proxy)?))
}

/// The Reason StartSession carries unless the user gives one.
pub const DEFAULT_REASON: &str = "ssm-proxy";

/// A StartSession Reason as the service accepts it: 1 to 256 characters, no
/// line breaks (the API's pattern is `^.{1,256}$`).
pub fn parse_reason(s: &str) -> Result<String, String> {
    let n = s.chars().count();
    if n == 0 || n > 256 {
        return Err(format!("a reason is 1 to 256 characters ({n} given)"));
    }
    if s.chars().any(|c| c == '\n' || c == '\r') {
        return Err("a reason is one line".into());
    }
    Ok(s.to_owned())
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no AWS region: pass --region, set AWS_REGION, or set one in your profile")]
    NoRegion,
    #[error(
        "instance {instance} is not a managed node in {region}: check the instance id and region, \
         and that its SSM agent runs with an instance profile that allows Session Manager"
    )]
    UnknownInstance { instance: String, region: String },
    #[error("instance {instance} is not connected to Session Manager (PingStatus {status}): is it running with the SSM agent online?")]
    InstanceOffline { instance: String, status: String },
    #[error("not authorized to perform {action}{on}: {message}. Add {action} to your IAM policy")]
    AccessDenied { action: &'static str, on: String, message: String },
    #[error(
        "the AWS credentials were rejected ({code}): {message}. Refresh them (aws sso login, new keys) or pick another --profile"
    )]
    BadCredentials { code: String, message: String },
    #[error("{action} failed: {detail}{hint}")]
    Other { action: &'static str, detail: String, hint: &'static str },
    #[error(
        "{action} failed through the proxy {proxy}: {detail}. Check the proxy's address and port, that it \
         allows CONNECT to port 443, and its credentials (http://user:password@host:port)"
    )]
    ThroughProxy { action: &'static str, proxy: String, detail: String },
    #[error("session {0} does not exist or has been terminated")]
    SessionNotFound(String),
    #[error("{action} returned no {field}")]
    Incomplete { action: &'static str, field: &'static str },
}

/// What StartSession hands back.
#[derive(Debug, Clone)]
pub struct StartedSession {
    pub session_id: String,
    pub endpoint: Endpoint,
}

/// An instance's registration as SSM sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceStatus {
    pub ping_status: String,
    pub agent_version: String,
    pub platform: String,
}

#[derive(Debug, Clone)]
pub struct SsmApi {
    /// Replaced by [`SsmApi::reset_connections`]; clones share it.
    client: Arc<RwLock<aws_sdk_ssm::Client>>,
    conf: aws_config::SdkConfig,
    tls: aws_smithy_http_client::tls::TlsContext,
    proxy_config: aws_smithy_http_client::proxy::ProxyConfig,
    region: String,
    reason: String,
    /// The proxy the API calls go through, for messages.
    proxy: Option<String>,
    /// [`AwsOptions::ssmmessages_endpoint`], or the variable's.
    stream_endpoint: Option<String>,
    /// The API endpoint is configured (`AWS_ENDPOINT_URL[_SSM]`, a profile):
    /// its stream URLs are not AWS's to check.
    custom_endpoint: bool,
}

fn https_client(
    tls: &aws_smithy_http_client::tls::TlsContext,
    proxy: &aws_smithy_http_client::proxy::ProxyConfig,
) -> aws_smithy_runtime_api::client::http::SharedHttpClient {
    use aws_smithy_http_client::{tls, Connector};
    let (tls, proxy) = (tls.clone(), proxy.clone());
    // What Builder::build_https does, plus the proxy (which only the
    // connector builder takes).
    aws_smithy_http_client::Builder::new().build_with_connector_fn(move |settings, components| {
        let mut builder = Connector::builder();
        builder.set_connector_settings(settings.cloned());
        // The sleep makes the connect timeout work.
        if let Some(components) = components {
            builder.set_sleep_impl(components.sleep_impl());
        }
        builder
            .proxy_config(proxy.clone())
            .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
            .tls_context(tls.clone())
            .build()
    })
}

/// The SDK's proxy settings for `proxies`: the same variables, or `--proxy`.
fn proxy_config(proxies: &Proxies) -> Result<aws_smithy_http_client::proxy::ProxyConfig, ApiError> {
    use aws_smithy_http_client::proxy::ProxyConfig;
    let Some(url) = proxies.explicit() else {
        return Ok(if proxies.from_env() { ProxyConfig::from_env() } else { ProxyConfig::disabled() });
    };
    let config = ProxyConfig::all(url).map_err(|e| ApiError::Other {
        action: "proxy setup",
        detail: format!("{}: {e}", ssm_channel::proxy::redact_userinfo(url)),
        hint: "",
    })?;
    let no_proxy = ["NO_PROXY", "no_proxy"].iter().find_map(|v| std::env::var(v).ok().filter(|v| !v.is_empty()));
    Ok(match no_proxy {
        Some(rules) => config.no_proxy(rules),
        None => config,
    })
}

impl SsmApi {
    /// Loads the standard chain (env, profiles, SSO, process credentials),
    /// honouring `AWS_ENDPOINT_URL`/`AWS_ENDPOINT_URL_SSM` and the CA bundle.
    pub async fn load(opts: &AwsOptions, trust: &Trust) -> Result<SsmApi, ApiError> {
        use aws_smithy_http_client::tls;
        let mut store = tls::TrustStore::default();
        if let Some(pem) = &trust.ca_bundle_pem {
            store = store.with_pem_certificate(pem.clone());
        }
        let ctx = tls::TlsContext::builder().with_trust_store(store).build().map_err(|e| ApiError::Other {
            action: "TLS setup",
            detail: e.to_string(),
            hint: "",
        })?;
        let proxy_cfg = proxy_config(&trust.proxies)?;
        let http = https_client(&ctx, &proxy_cfg);
        // Without these an API call on a pooled connection that died with the
        // laptop's old network would wait forever.
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(API_CONNECT_TIMEOUT)
            .operation_attempt_timeout(API_ATTEMPT_TIMEOUT)
            .build();
        let mut loader =
            aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http).timeout_config(timeouts);
        if let Some(p) = &opts.profile {
            loader = loader.profile_name(p);
        }
        if let Some(r) = &opts.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        let conf = loader.load().await;
        let region = conf.region().map(|r| r.to_string()).ok_or(ApiError::NoRegion)?;
        let client = Arc::new(RwLock::new(aws_sdk_ssm::Client::new(&conf)));
        let reason = opts.reason.clone().unwrap_or_else(|| DEFAULT_REASON.to_owned());
        let endpoint = std::env::var("AWS_ENDPOINT_URL_SSM")
            .ok()
            .or_else(|| conf.endpoint_url().map(str::to_owned))
            .unwrap_or_else(|| format!("https://ssm.{region}.amazonaws.com"));
        let proxy = trust.proxies.route(&endpoint).map(|r| r.description);
        let custom_endpoint = std::env::var("AWS_ENDPOINT_URL_SSM").is_ok() || conf.endpoint_url().is_some();
        let stream_endpoint = opts
            .ssmmessages_endpoint
            .clone()
            .or_else(|| std::env::var(SSMMESSAGES_ENDPOINT_VAR).ok())
            .filter(|e| !e.trim().is_empty());
        if let Some(e) = &stream_endpoint {
            rewrite_stream_url("wss://ssmmessages.example/v1/data-channel/s", e).map_err(|detail| ApiError::Other {
                action: "the ssmmessages endpoint",
                detail,
                hint: "",
            })?;
        }
        Ok(SsmApi {
            client,
            conf,
            tls: ctx,
            proxy_config: proxy_cfg,
            region,
            reason,
            proxy,
            stream_endpoint,
            custom_endpoint,
        })
    }

    fn client(&self) -> aws_sdk_ssm::Client {
        self.client.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Forget the pooled HTTPS connections: after the machine's network
    /// changed they may be bound to an address it no longer has, and a call
    /// on one would wait out its timeout. Credentials stay cached.
    pub fn reset_connections(&self) {
        let conf = aws_sdk_ssm::config::Builder::from(&self.conf)
            .http_client(https_client(&self.tls, &self.proxy_config))
            .build();
        *self.client.write().unwrap_or_else(|p| p.into_inner()) = aws_sdk_ssm::Client::from_conf(conf);
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// StartSession with AWS-StartPortForwardingSession, or ...ToRemoteHost when `host` is set.
    pub async fn start_port_session(
        &self,
        instance: &str,
        remote_port: u16,
        host: Option<&str>,
        client_id: uuid::Uuid,
    ) -> Result<StartedSession, ApiError> {
        let document = if host.is_some() { REMOTE_HOST_DOCUMENT } else { PORT_DOCUMENT };
        let mut params = vec![("portNumber", remote_port.to_string()), ("localPortNumber", "0".to_owned())];
        if let Some(h) = host {
            params.push(("host", h.to_owned()));
        }
        self.start_session(instance, Some(document), &params, client_id).await
    }

    /// StartSession with the account's default shell document
    /// ([`SHELL_DOCUMENT`]): a shell as the SSM agent's session user.
    pub async fn start_shell_session(&self, instance: &str, client_id: uuid::Uuid) -> Result<StartedSession, ApiError> {
        self.start_session(instance, None, &[], client_id).await
    }

    async fn start_session(
        &self,
        instance: &str,
        document: Option<&str>,
        params: &[(&str, String)],
        client_id: uuid::Uuid,
    ) -> Result<StartedSession, ApiError> {
        let mut req = self.client().start_session().target(instance).reason(&self.reason);
        if let Some(d) = document {
            req = req.document_name(d);
        }
        for (k, v) in params {
            req = req.parameters(*k, vec![v.clone()]);
        }
        let out = match req.send().await {
            Ok(o) => o,
            Err(e) => {
                if e.as_service_error().is_some_and(|s| s.is_target_not_connected()) {
                    return Err(self.explain_not_connected(instance).await);
                }
                let document = document.unwrap_or(SHELL_DOCUMENT);
                return Err(classify(
                    self.proxy.as_deref(),
                    "ssm:StartSession",
                    format!(" on {instance} with {document}"),
                    e,
                ));
            }
        };
        let session_id =
            out.session_id().ok_or(ApiError::Incomplete { action: "StartSession", field: "SessionId" })?.to_owned();
        let token = out.token_value().ok_or(ApiError::Incomplete { action: "StartSession", field: "TokenValue" })?;
        let url = out.stream_url().ok_or(ApiError::Incomplete { action: "StartSession", field: "StreamUrl" })?;
        let url = match &self.stream_endpoint {
            Some(e) => rewrite_stream_url(url, e).map_err(|detail| ApiError::Other {
                action: "the ssmmessages endpoint",
                detail,
                hint: "",
            })?,
            None if self.custom_endpoint => url.to_owned(),
            None => {
                check_stream_url(url, &self.region).map_err(|detail| ApiError::Other {
                    action: "StartSession",
                    detail,
                    hint: "",
                })?;
                url.to_owned()
            }
        };
        let headers = self.data_channel_headers(&url).await?;
        Ok(StartedSession {
            session_id,
            endpoint: Endpoint { stream_url: url, token: token.to_owned(), client_id, headers },
        })
    }

    /// The SigV4 headers that sign the websocket upgrade to `url` now, with
    /// the credentials the API calls use (see [`sign`]).
    pub async fn data_channel_headers(&self, url: &str) -> Result<Vec<(String, String)>, ApiError> {
        use aws_credential_types::provider::ProvideCredentials;
        let fail = |detail: String| ApiError::Other { action: "signing the data channel", detail, hint: "" };
        let Some(provider) = self.conf.credentials_provider() else {
            return Err(fail("no credentials".into()));
        };
        let credentials =
            provider.provide_credentials().await.map_err(|e| fail(DisplayErrorContext(&e).to_string()))?;
        sign::stream_headers(url, &credentials, &self.region, std::time::SystemTime::now()).map_err(fail)
    }

    /// KMS GenerateDataKey: 64 bytes under `key_id` with `context`, for a
    /// session whose agent asked for KMS encryption.
    pub async fn generate_data_key(
        &self,
        key_id: &str,
        context: Vec<(String, String)>,
    ) -> Result<ssm_channel::session::kms::DataKey, ApiError> {
        let kms = aws_sdk_kms::Client::new(&self.conf);
        let mut req =
            kms.generate_data_key().key_id(key_id).number_of_bytes(ssm_channel::session::kms::DATA_KEY_BYTES as i32);
        for (k, v) in context {
            req = req.encryption_context(k, v);
        }
        let out = req
            .send()
            .await
            .map_err(|e| classify(self.proxy.as_deref(), "kms:GenerateDataKey", format!(" on {key_id}"), e))?;
        let ciphertext = out.ciphertext_blob().map(|b| b.as_ref().to_vec());
        let plaintext = out.plaintext().map(|b| b.as_ref().to_vec());
        match (ciphertext, plaintext) {
            (Some(ciphertext), Some(plaintext)) => Ok(ssm_channel::session::kms::DataKey { ciphertext, plaintext }),
            _ => Err(ApiError::Incomplete { action: "GenerateDataKey", field: "CiphertextBlob and Plaintext" }),
        }
    }

    async fn explain_not_connected(&self, instance: &str) -> ApiError {
        match self.instance_status(instance).await {
            Ok(None) => ApiError::UnknownInstance { instance: instance.to_owned(), region: self.region.clone() },
            Ok(Some(s)) => ApiError::InstanceOffline { instance: instance.to_owned(), status: s.ping_status },
            Err(e) => e,
        }
    }

    /// ResumeSession: a fresh token for the same StreamUrl, or `None` when the
    /// service says the session is gone (empty token).
    pub async fn resume_session(&self, session_id: &str) -> Result<Option<String>, ApiError> {
        let quick = aws_sdk_ssm::config::Builder::default().timeout_config(
            aws_config::timeout::TimeoutConfig::builder().operation_attempt_timeout(RESUME_ATTEMPT_TIMEOUT).build(),
        );
        let call = self.client().resume_session().session_id(session_id).customize().config_override(quick);
        let out = call.send().await.map_err(|e| match e.code() {
            Some("DoesNotExistException") => ApiError::SessionNotFound(session_id.to_owned()),
            _ => classify(self.proxy.as_deref(), "ssm:ResumeSession", format!(" on session {session_id}"), e),
        })?;
        Ok(out.token_value().filter(|t| !t.is_empty()).map(str::to_owned))
    }

    /// TerminateSession; safe to repeat.
    pub async fn terminate_session(&self, session_id: &str) -> Result<(), ApiError> {
        self.client().terminate_session().session_id(session_id).send().await.map_err(|e| {
            classify(self.proxy.as_deref(), "ssm:TerminateSession", format!(" on session {session_id}"), e)
        })?;
        Ok(())
    }

    /// DescribeInstanceInformation for one instance; `None` if SSM does not know it.
    pub async fn instance_status(&self, instance: &str) -> Result<Option<InstanceStatus>, ApiError> {
        let filter = string_filter("InstanceIds", instance)?;
        let out = self
            .client()
            .describe_instance_information()
            .filters(filter)
            .send()
            .await
            .map_err(|e| classify(self.proxy.as_deref(), "ssm:DescribeInstanceInformation", String::new(), e))?;
        Ok(out.instance_information_list().iter().find(|i| i.instance_id() == Some(instance)).map(|i| InstanceStatus {
            ping_status: i.ping_status().map(|p| p.as_str().to_owned()).unwrap_or_default(),
            agent_version: i.agent_version().unwrap_or_default().to_owned(),
            platform: i.platform_type().map(|p| p.as_str().to_owned()).unwrap_or_default(),
        }))
    }
}

impl SsmApi {
    /// The managed instances that carry every one of `tags` (KEY, VALUE) and
    /// whose SSM agent is online, sorted by id: DescribeInstanceInformation
    /// with `tag:KEY` and `PingStatus` filters, all pages.
    pub async fn online_instances_tagged(&self, tags: &[(String, String)]) -> Result<Vec<String>, ApiError> {
        let mut req = self.client().describe_instance_information().max_results(50);
        for (k, v) in tags {
            req = req.filters(string_filter(format!("tag:{k}"), v)?);
        }
        req = req.filters(string_filter("PingStatus", "Online")?);
        let mut pages = req.into_paginator().send();
        let mut ids = Vec::new();
        while let Some(page) = pages.next().await {
            let page =
                page.map_err(|e| classify(self.proxy.as_deref(), "ssm:DescribeInstanceInformation", String::new(), e))?;
            for i in page.instance_information_list() {
                // The filter asked for Online; an answer that is not is not used.
                if i.ping_status().is_some_and(|p| p.as_str() == "Online") {
                    ids.extend(i.instance_id().map(str::to_owned));
                }
            }
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// The names of the Route 53 private hosted zones associated with `vpc` in
    /// `vpc_region` (ListHostedZonesByVPC, all pages), without the trailing dot.
    pub async fn private_zones(&self, vpc: &str, vpc_region: &str) -> Result<Vec<String>, ApiError> {
        let client = aws_sdk_route53::Client::new(&self.conf);
        let mut names = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut req = client
                .list_hosted_zones_by_vpc()
                .vpc_id(vpc)
                .vpc_region(aws_sdk_route53::types::VpcRegion::from(vpc_region))
                .max_items(100);
            if let Some(t) = &token {
                req = req.next_token(t);
            }
            let out = req.send().await.map_err(|e| {
                classify(self.proxy.as_deref(), "route53:ListHostedZonesByVPC", format!(" for {vpc}"), e)
            })?;
            names.extend(out.hosted_zone_summaries().iter().map(|z| z.name().trim_end_matches('.').to_owned()));
            match out.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_owned()),
                _ => break,
            }
        }
        names.sort();
        names.dedup();
        Ok(names)
    }
}

/// One DescribeInstanceInformation filter: `key` with the single `value`.
fn string_filter(key: impl Into<String>, value: &str) -> Result<InstanceInformationStringFilter, ApiError> {
    InstanceInformationStringFilter::builder().key(key).values(value).build().map_err(|e| ApiError::Other {
        action: "DescribeInstanceInformation",
        detail: e.to_string(),
        hint: "",
    })
}

/// Maps an SDK error to a message naming the action and what to do.
fn classify<E, R>(proxy: Option<&str>, action: &'static str, on: String, err: SdkError<E, R>) -> ApiError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let code = err.code().unwrap_or_default().to_owned();
    let message = err.message().unwrap_or_default().to_owned();
    match code.as_str() {
        "AccessDeniedException" | "AccessDenied" => ApiError::AccessDenied { action, on, message },
        "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "ExpiredTokenException"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch" => ApiError::BadCredentials { code, message },
        _ => {
            let detail = DisplayErrorContext(&err).to_string();
            let unreachable = matches!(err, SdkError::DispatchFailure(_) | SdkError::TimeoutError(_));
            // A proxy's refusal comes back as a failed CONNECT (https) or as its own
            // answer to the forwarded request (http): 407, or 401 from some
            // proxies (tinyproxy). The API itself never answers 401 or 407.
            let refused = ["StatusCode(407)", "StatusCode(401)", "407 Proxy"].iter().any(|s| detail.contains(s));
            if let Some(proxy) = proxy.filter(|_| unreachable || refused) {
                let detail =
                    if refused { "the proxy wants other credentials (it answered 401/407)".to_owned() } else { detail };
                return ApiError::ThroughProxy { action, proxy: proxy.to_owned(), detail };
            }
            let hint = if detail.contains("credentials") || detail.contains("Credentials") {
                ". No usable AWS credentials: set AWS_PROFILE or --profile, run `aws sso login`, or export AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
            } else if matches!(err, SdkError::DispatchFailure(_) | SdkError::TimeoutError(_)) {
                ". Cannot reach the SSM endpoint: check the network, --region and AWS_ENDPOINT_URL"
            } else {
                ""
            };
            ApiError::Other { action, detail, hint }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_reason, rewrite_stream_url};

    #[test]
    fn only_a_session_manager_endpoint_in_the_region_gets_the_token() {
        use super::check_stream_url;
        let ok = "wss://ssmmessages.eu-west-1.amazonaws.com/v1/data-channel/alice-0a1b?role=publish_subscribe&cell-number=AAE";
        assert_eq!(check_stream_url(ok, "eu-west-1"), Ok(()));
        assert!(check_stream_url(
            "wss://ssmmessages-fips.us-gov-west-1.amazonaws.com/v1/data-channel/s",
            "us-gov-west-1"
        )
        .is_ok());
        assert!(
            check_stream_url("wss://ssmmessages.cn-north-1.amazonaws.com.cn/v1/data-channel/s", "cn-north-1").is_ok()
        );
        assert!(check_stream_url("wss://ssmmessages.eu-west-1.api.aws/v1/data-channel/s", "eu-west-1").is_ok());
        for bad in [
            "ws://ssmmessages.eu-west-1.amazonaws.com/v1/data-channel/s",
            "wss://ssmmessages.eu-west-1.amazonaws.com.evil.example/v1/data-channel/s",
            "wss://evil.example/v1/data-channel/s",
            "wss://ssmmessages.us-east-1.amazonaws.com/v1/data-channel/s",
            "wss://ssm.eu-west-1.amazonaws.com/v1/data-channel/s",
            "wss://ssmmessages.eu-west-1.amazonaws.com/elsewhere",
        ] {
            let err = check_stream_url(bad, "eu-west-1").expect_err(bad);
            assert!(err.contains("AWS_ENDPOINT_URL_SSMMESSAGES"), "{err}");
        }
    }

    #[test]
    fn the_ssmmessages_endpoint_replaces_scheme_and_host_and_keeps_the_session_path() {
        let url =
            "wss://ssmmessages.us-east-1.amazonaws.com/v1/data-channel/bob-0a1b?role=publish_subscribe&cell-number=AAE";
        let vpce = "https://vpce-0123-abcd.ssmmessages.us-east-1.vpce.amazonaws.com";
        assert_eq!(
            rewrite_stream_url(url, vpce).as_deref(),
            Ok("wss://vpce-0123-abcd.ssmmessages.us-east-1.vpce.amazonaws.com/v1/data-channel/bob-0a1b?role=publish_subscribe&cell-number=AAE")
        );
        // A port, plain http (ws), a path prefix with and without its slash, no scheme.
        assert_eq!(
            rewrite_stream_url(url, "http://127.0.0.1:4566/").as_deref(),
            Ok("ws://127.0.0.1:4566/v1/data-channel/bob-0a1b?role=publish_subscribe&cell-number=AAE")
        );
        assert_eq!(
            rewrite_stream_url("wss://h/v1/data-channel/s", "https://gw.corp/ssm/").as_deref(),
            Ok("wss://gw.corp/ssm/v1/data-channel/s")
        );
        assert_eq!(rewrite_stream_url("wss://h/v1/x", "gw.corp:8443").as_deref(), Ok("wss://gw.corp:8443/v1/x"));
        for bad in ["ftp://gw.corp", "https://", "https://user:pw@gw.corp", "https://gw.corp?x=1"] {
            assert!(rewrite_stream_url(url, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_reason_is_one_line_of_1_to_256_characters() {
        assert_eq!(parse_reason("INC-42: replica lag").as_deref(), Ok("INC-42: replica lag"));
        // Characters, not bytes: 256 two-byte letters are fine.
        assert!(parse_reason(&"é".repeat(256)).is_ok());
        assert!(parse_reason(&"é".repeat(257)).expect_err("too long").contains("257 given"));
        assert!(parse_reason("").is_err());
        assert!(parse_reason("two\nlines").expect_err("two lines").contains("one line"));
    }
}
