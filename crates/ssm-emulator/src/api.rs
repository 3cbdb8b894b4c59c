//! The SSM JSON API (awsJson1_1, `X-Amz-Target: AmazonSSM.<Operation>`):
//! StartSession, ResumeSession, TerminateSession, DescribeInstanceInformation.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::info;

use crate::agent::{self, AgentInput, AgentSpec, Plugin, Target};
use crate::server::{SessionEntry, Shared};

/// An error body as AWS sends it for awsJson1_1 (HTTP 400).
#[derive(Debug)]
pub struct ApiError {
    pub code: &'static str,
    pub message: String,
}

fn err(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError { code, message: message.into() }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StartSessionRequest {
    target: String,
    document_name: Option<String>,
    #[serde(default)]
    parameters: BTreeMap<String, Vec<String>>,
    /// Shown in CloudTrail and the console; the API's pattern is `^.{1,256}$`.
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SessionIdRequest {
    session_id: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct DescribeRequest {
    #[serde(default)]
    filters: Vec<Filter>,
    #[serde(default)]
    instance_information_filter_list: Vec<FilterList>,
    max_results: Option<i64>,
    next_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Filter {
    key: String,
    #[serde(default)]
    values: Vec<String>,
}

#[derive(Deserialize)]
struct FilterList {
    key: String,
    #[serde(rename = "valueSet", default)]
    value_set: Vec<String>,
}

/// Dispatches one API call; `host` is the Host header, used to build StreamUrl.
pub fn handle(shared: &Arc<Shared>, target: &str, body: &[u8], host: &str) -> Result<Value, ApiError> {
    if let Some(op) = target.strip_prefix("TrentService.") {
        let keys: Vec<String> = shared.config.kms_key_id.iter().cloned().collect();
        return match op {
            "GenerateDataKey" => shared.kms.generate_data_key(&keys, body),
            _ => Err(err("UnknownOperationException", format!("KMS operation {op} is not emulated"))),
        };
    }
    let op = target.strip_prefix("AmazonSSM.").ok_or_else(|| err("UnknownOperationException", target.to_owned()))?;
    let parse_err = |e: serde_json::Error| err("SerializationException", e.to_string());
    match op {
        "StartSession" => start_session(shared, serde_json::from_slice(body).map_err(parse_err)?, host),
        "ResumeSession" => resume_session(shared, serde_json::from_slice(body).map_err(parse_err)?, host),
        "TerminateSession" => terminate_session(shared, serde_json::from_slice(body).map_err(parse_err)?),
        "DescribeInstanceInformation" => {
            let req: DescribeRequest = if body.is_empty() {
                DescribeRequest::default()
            } else {
                serde_json::from_slice(body).map_err(parse_err)?
            };
            describe(shared, req)
        }
        _ => Err(err("UnknownOperationException", format!("operation {op} is not emulated"))),
    }
}

fn stream_url(shared: &Shared, host: &str, session_id: &str) -> String {
    let scheme = &shared.config.stream_url_scheme;
    let host = shared.config.stream_host.as_deref().unwrap_or(host);
    format!("{scheme}://{host}/v1/data-channel/{session_id}?role=publish_subscribe&cell-number=emulator")
}

fn start_session(shared: &Arc<Shared>, req: StartSessionRequest, host: &str) -> Result<Value, ApiError> {
    if let Some(r) = &req.reason {
        let n = r.chars().count();
        if n == 0 || n > 256 || r.contains(['\n', '\r']) {
            return Err(err(
                "ValidationException",
                "1 validation error detected: Value at 'reason' failed to satisfy constraint: \
                 Member must satisfy regular expression pattern: ^.{1,256}$",
            ));
        }
    }
    let document = req.document_name.clone().unwrap_or_else(|| "SSM-SessionManagerRunShell".into());
    if shared.config.denied_documents.contains(&document) {
        // IAM evaluates the document as a resource of ssm:StartSession.
        return Err(err(
            "AccessDeniedException",
            format!(
                "User: arn:aws:iam::123456789012:user/emulator is not authorized to perform: ssm:StartSession \
                 on resource: arn:aws:ssm:us-east-1::document/{document} because no identity-based policy \
                 allows the ssm:StartSession action"
            ),
        ));
    }
    let Some(instance) = shared.config.instances.get(&req.target) else {
        return Err(err("TargetNotConnected", format!("{} is not connected.", req.target)));
    };
    if instance.ping_status != "Online" {
        return Err(err("TargetNotConnected", format!("{} is not connected.", req.target)));
    }
    let (plugin, properties) = plugin_for(&document, &req, instance)?;
    let is_port = matches!(plugin, Plugin::Port(_));
    let session_id = format!("emulator-{:017x}", rand::random::<u64>() >> 4);
    let token = new_token();
    let spec = AgentSpec {
        session_id: session_id.clone(),
        instance_id: req.target.clone(),
        agent_version: shared.config.agent_version.clone(),
        properties,
        plugin,
        netns: instance.netns.clone(),
        profile: shared.config.profile,
        buffer_detached: !shared.config.faults.lossy_reconnect,
        resends: shared.counters.agent_resends.clone(),
        // isEncryptionEnabled (sessionplugin.go): never for the Port plugin,
        // unless --kms-port-sessions models an agent that does.
        kms: shared
            .config
            .kms_key_id
            .clone()
            .filter(|_| !is_port || shared.config.kms_port_sessions)
            .map(|k| (k, shared.kms.clone())),
    };
    let (tx, rx) = mpsc::channel::<AgentInput>(1024);
    let ordinal = shared.next_ordinal();
    let entry = Arc::new(SessionEntry::new(session_id.clone(), req.target.clone(), tx, token.clone(), ordinal));
    shared.sessions.lock().unwrap_or_else(|e| e.into_inner()).insert(session_id.clone(), entry.clone());
    info!(session = %session_id, target = %req.target, %document, reason = req.reason.as_deref().unwrap_or(""), "StartSession");
    tokio::spawn(async move {
        let why = agent::run(spec, rx).await;
        info!(session = %entry.id, reason = %why, "session ended");
        entry.mark_terminated();
    });
    Ok(json!({"SessionId": session_id, "TokenValue": token, "StreamUrl": stream_url(shared, host, &session_id)}))
}

/// The session plugin a document runs, and the properties the agent fills in.
fn plugin_for(
    document: &str,
    req: &StartSessionRequest,
    instance: &crate::config::Instance,
) -> Result<(Plugin, BTreeMap<String, Value>), ApiError> {
    let one = |k: &str| req.parameters.get(k).and_then(|v| v.first()).cloned();
    Ok(match document {
        "AWS-StartPortForwardingSession" | "AWS-StartPortForwardingSessionToRemoteHost" => {
            let remote_host = if document == "AWS-StartPortForwardingSessionToRemoteHost" {
                Some(one("host").ok_or_else(|| err("ValidationException", "parameter host is required"))?)
            } else {
                None
            };
            let port: u16 = one("portNumber")
                .ok_or_else(|| err("ValidationException", "parameter portNumber is required"))?
                .parse()
                .map_err(|_| err("ValidationException", "portNumber must be a port number"))?;
            let local_port = one("localPortNumber").unwrap_or_else(|| "0".into());
            // The document's properties as the agent fills them in.
            let mut properties = BTreeMap::from([
                ("portNumber".to_owned(), json!(port.to_string())),
                ("type".to_owned(), json!("LocalPortForwarding")),
                ("localPortNumber".to_owned(), json!(local_port)),
            ]);
            if let Some(h) = &remote_host {
                properties.insert("host".into(), json!(h));
            }
            let remote = remote_host.is_some();
            let target = Target { host: remote_host.unwrap_or_else(|| instance.host.clone()), port, remote };
            (Plugin::Port(target), properties)
        }
        // The default shell document: sessionType Standard_Stream, no properties.
        "SSM-SessionManagerRunShell" => {
            (Plugin::Shell { command: None, program: instance.shell.clone() }, BTreeMap::new())
        }
        "AWS-StartInteractiveCommand" => {
            let command = one("command").ok_or_else(|| err("ValidationException", "parameter command is required"))?;
            let shell = json!({"commands": command, "runAsElevated": false});
            let properties = BTreeMap::from([("linux".to_owned(), shell.clone()), ("macos".to_owned(), shell)]);
            (Plugin::Shell { command: Some(command), program: instance.shell.clone() }, properties)
        }
        other => return Err(err("InvalidDocument", format!("Document {other} is not supported by this emulator"))),
    })
}

fn new_token() -> String {
    format!("{:032x}{:032x}", rand::random::<u128>(), rand::random::<u128>())
}

fn lookup(shared: &Arc<Shared>, id: &str) -> Result<Arc<SessionEntry>, ApiError> {
    let sessions = shared.sessions.lock().unwrap_or_else(|e| e.into_inner());
    match sessions.get(id) {
        Some(s) if !s.is_terminated() => Ok(s.clone()),
        _ => Err(err("DoesNotExistException", format!("Session with id {id} does not exist or has been terminated."))),
    }
}

fn resume_session(shared: &Arc<Shared>, req: SessionIdRequest, host: &str) -> Result<Value, ApiError> {
    let entry = lookup(shared, &req.session_id)?;
    let token = new_token();
    entry.add_token(token.clone());
    info!(session = %entry.id, "ResumeSession");
    Ok(json!({"SessionId": entry.id, "TokenValue": token, "StreamUrl": stream_url(shared, host, &entry.id)}))
}

fn terminate_session(shared: &Arc<Shared>, req: SessionIdRequest) -> Result<Value, ApiError> {
    // Terminating a finished session succeeds, as on AWS.
    if let Ok(entry) = lookup(shared, &req.session_id) {
        info!(session = %entry.id, "TerminateSession");
        let _ = entry.agent.try_send(AgentInput::Terminate);
    }
    Ok(json!({"SessionId": req.session_id}))
}

/// One condition of DescribeInstanceInformation, as the service applies them:
/// every filter must hold, and within one filter any of its values.
enum Condition<'a> {
    Ids(&'a [String]),
    Ping(&'a [String]),
    Tag(&'a str, &'a [String]),
    TagKey(&'a [String]),
    ResourceType(&'a [String]),
    Platform(&'a [String]),
}

impl Condition<'_> {
    fn holds(&self, id: &str, i: &crate::config::Instance) -> bool {
        let any = |values: &[String], v: &str| values.iter().any(|x| x == v);
        match self {
            Condition::Ids(v) => any(v, id),
            Condition::Ping(v) => any(v, &i.ping_status),
            Condition::Tag(key, v) => i.tags.get(*key).is_some_and(|t| any(v, t)),
            Condition::TagKey(v) => v.iter().any(|k| i.tags.contains_key(k)),
            Condition::ResourceType(v) => any(v, "EC2Instance"),
            Condition::Platform(v) => any(v, "Linux"),
        }
    }
}

/// Results per page when MaxResults is not given.
const DEFAULT_PAGE: usize = 50;

fn describe(shared: &Arc<Shared>, req: DescribeRequest) -> Result<Value, ApiError> {
    let mut conditions = Vec::new();
    for f in &req.filters {
        if f.values.is_empty() {
            return Err(err("InvalidInstanceInformationFilterValue", format!("filter {} has no values", f.key)));
        }
        conditions.push(match f.key.as_str() {
            "InstanceIds" => Condition::Ids(&f.values),
            "PingStatus" => Condition::Ping(&f.values),
            "tag-key" => Condition::TagKey(&f.values),
            "ResourceType" => Condition::ResourceType(&f.values),
            "PlatformTypes" => Condition::Platform(&f.values),
            key => match key.strip_prefix("tag:") {
                Some(k) if !k.is_empty() => Condition::Tag(k, &f.values),
                _ => return Err(err("InvalidFilterKey", format!("filter key {key} is not valid"))),
            },
        });
    }
    for f in &req.instance_information_filter_list {
        conditions.push(match f.key.as_str() {
            "InstanceIds" => Condition::Ids(&f.value_set),
            "PingStatus" => Condition::Ping(&f.value_set),
            "ResourceType" => Condition::ResourceType(&f.value_set),
            "PlatformTypes" => Condition::Platform(&f.value_set),
            key => return Err(err("InvalidFilterKey", format!("filter key {key} is not emulated"))),
        });
    }
    let page = match req.max_results {
        None => DEFAULT_PAGE,
        Some(n) if (5..=50).contains(&n) => n as usize,
        Some(n) => {
            return Err(err(
                "ValidationException",
                format!("1 validation error detected: Value '{n}' at 'maxResults' failed to satisfy constraint: Member must have value between 5 and 50"),
            ))
        }
    };
    let skip = match &req.next_token {
        None => 0,
        Some(t) => t
            .strip_prefix("emulator-page-")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| err("InvalidNextToken", "The specified token is not valid."))?,
    };
    let matching: Vec<(&String, &crate::config::Instance)> =
        shared.config.instances.iter().filter(|(id, i)| conditions.iter().all(|c| c.holds(id, i))).collect();
    let list: Vec<Value> = matching
        .iter()
        .skip(skip)
        .take(page)
        .map(|(id, i)| {
            json!({
                "InstanceId": id,
                "PingStatus": i.ping_status,
                "AgentVersion": shared.config.agent_version,
                "PlatformType": "Linux",
                "PlatformName": "Emulated Linux",
                "ResourceType": "EC2Instance",
                "IPAddress": i.host,
                "LastPingDateTime": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0),
            })
        })
        .collect();
    let mut out = json!({"InstanceInformationList": list});
    if skip + page < matching.len() {
        out["NextToken"] = json!(format!("emulator-page-{}", skip + page));
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
