//! The SSM API calls a Port session needs (StartSession, ResumeSession,
//! TerminateSession, DescribeInstanceInformation) through aws-sdk-ssm and the
//! user's normal credential chain, with errors that say what to do.

use aws_sdk_ssm::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ssm::types::InstanceInformationStringFilter;

use std::sync::{Arc, RwLock};

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
    region: String,
    reason: String,
}

fn https_client(
    tls: &aws_smithy_http_client::tls::TlsContext,
) -> aws_smithy_runtime_api::client::http::SharedHttpClient {
    use aws_smithy_http_client::tls;
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
        .tls_context(tls.clone())
        .build_https()
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
        let http = https_client(&ctx);
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
        Ok(SsmApi { client, conf, tls: ctx, region, reason })
    }

    fn client(&self) -> aws_sdk_ssm::Client {
        self.client.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Forget the pooled HTTPS connections: after the machine's network
    /// changed they may be bound to an address it no longer has, and a call
    /// on one would wait out its timeout. Credentials stay cached.
    pub fn reset_connections(&self) {
        let conf = aws_sdk_ssm::config::Builder::from(&self.conf).http_client(https_client(&self.tls)).build();
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
                return Err(classify("ssm:StartSession", format!(" on {instance} with {document}"), e));
            }
        };
        let session_id =
            out.session_id().ok_or(ApiError::Incomplete { action: "StartSession", field: "SessionId" })?.to_owned();
        let token = out.token_value().ok_or(ApiError::Incomplete { action: "StartSession", field: "TokenValue" })?;
        let url = out.stream_url().ok_or(ApiError::Incomplete { action: "StartSession", field: "StreamUrl" })?;
        Ok(StartedSession {
            session_id,
            endpoint: Endpoint { stream_url: url.to_owned(), token: token.to_owned(), client_id },
        })
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
            _ => classify("ssm:ResumeSession", format!(" on session {session_id}"), e),
        })?;
        Ok(out.token_value().filter(|t| !t.is_empty()).map(str::to_owned))
    }

    /// TerminateSession; safe to repeat.
    pub async fn terminate_session(&self, session_id: &str) -> Result<(), ApiError> {
        self.client()
            .terminate_session()
            .session_id(session_id)
            .send()
            .await
            .map_err(|e| classify("ssm:TerminateSession", format!(" on session {session_id}"), e))?;
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
            .map_err(|e| classify("ssm:DescribeInstanceInformation", String::new(), e))?;
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
            let page = page.map_err(|e| classify("ssm:DescribeInstanceInformation", String::new(), e))?;
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
            let out =
                req.send().await.map_err(|e| classify("route53:ListHostedZonesByVPC", format!(" for {vpc}"), e))?;
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
fn classify<E, R>(action: &'static str, on: String, err: SdkError<E, R>) -> ApiError
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
    use super::parse_reason;

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
