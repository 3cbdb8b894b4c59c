//! `ssm-emulator`: run the local AWS stand-in.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ssm_emulator::{Config, Emulator, Faults, Profile};

/// A local stand-in for AWS SSM Session Manager (API, websocket and instance
/// agent) for tests and demos.
///
/// Example:
///   ssm-emulator --listen 127.0.0.1:4566 --instance i-0123456789abcdef0=127.0.0.1
///   (add --netns i-0123456789abcdef0=NAME to put that instance in network namespace NAME)
///   AWS_ENDPOINT_URL=http://127.0.0.1:4566 AWS_REGION=us-east-1 \
///   AWS_ACCESS_KEY_ID=AKIAEMULATOR00000001 \
///   AWS_SECRET_ACCESS_KEY=emulator/secret/key/000000000000000000000 \
///   ssm-proxy forward --instance-id i-0123456789abcdef0 --remote-port 22
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// Address to listen on (API and websocket).
    #[arg(long, default_value = "127.0.0.1:4566")]
    listen: SocketAddr,
    /// An instance: ID=HOST, where HOST stands for the instance's localhost. Repeatable.
    #[arg(long = "instance", value_name = "ID=HOST", required = true)]
    instances: Vec<String>,
    /// The network namespace an instance lives in: ID=NAME (in /run/netns) or
    /// ID=PATH. Its Port sessions dial HOST from there and its shell sessions
    /// (the default shell document, AWS-StartInteractiveCommand) run there. Root only.
    #[arg(long = "netns", value_name = "ID=NAME")]
    netns: Vec<String>,
    /// What an instance's `sh` is, for its shell sessions: ID=PROGRAM (default
    /// sh; bash is what Amazon Linux's sh is). Repeatable.
    #[arg(long = "shell", value_name = "ID=PROGRAM")]
    shells: Vec<String>,
    /// A tag of an instance: ID=KEY=VALUE. Repeatable.
    #[arg(long = "tag", value_name = "ID=KEY=VALUE")]
    tags: Vec<String>,
    /// A Route 53 private hosted zone associated with a VPC: VPC=ZONE. Repeatable.
    #[arg(long = "hosted-zone", value_name = "VPC=ZONE")]
    hosted_zones: Vec<String>,
    /// An instance's PingStatus (default Online): ID=STATUS. Repeatable.
    #[arg(long = "ping-status", value_name = "ID=STATUS")]
    ping_statuses: Vec<String>,
    /// A session document the caller may not use (AccessDeniedException), as an
    /// IAM policy without it would. Repeatable.
    #[arg(long = "deny-document", value_name = "DOCUMENT")]
    deny_documents: Vec<String>,
    /// Accepted credentials as ACCESS_KEY:SECRET (default: the built-in test pair). Repeatable.
    #[arg(long = "credentials", value_name = "KEY:SECRET")]
    credentials: Vec<String>,
    /// AgentVersion announced in the handshake (selects mux or basic mode).
    #[arg(long, default_value = "3.3.987.0")]
    agent_version: String,
    /// Output pacing: fast (none) or stock (one 1024-byte message per ms, like the real agent).
    #[arg(long, value_enum, default_value_t = Profile::Fast)]
    profile: Profile,
    /// Probability of dropping each frame (each direction).
    #[arg(long, default_value_t = 0.0)]
    drop: f64,
    /// Probability of duplicating each frame.
    #[arg(long, default_value_t = 0.0)]
    duplicate: f64,
    /// Probability of delaying a frame so later ones overtake it.
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// One-way delay per frame, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Close each client websocket with 1000 "Bye" after this many seconds.
    #[arg(long)]
    close_every: Option<f64>,
    /// Reject every data channel token (close 1003).
    #[arg(long)]
    reject_tokens: bool,
    /// Lose the agent's frames while the client is reconnecting (default: hold them).
    #[arg(long)]
    lossy_reconnect: bool,
    /// Apply --drop, --duplicate, --reorder, --delay-ms and --close-every only
    /// to the N-th session started (1 = the first), to hurt one of several.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    fault_session: Option<u64>,
    /// Seed for fault injection.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// StreamUrl scheme to hand out: ws, or wss behind a TLS front end.
    #[arg(long, default_value = "ws", value_parser = ["ws", "wss"])]
    stream_url_scheme: String,
    /// HOST[:PORT] the StreamUrl names instead of the API request's Host (a
    /// client then needs AWS_ENDPOINT_URL_SSMMESSAGES to reach the emulator).
    #[arg(long, value_name = "HOST")]
    stream_host: Option<String>,
    /// Refuse a data-channel open (the websocket upgrade) that is not SigV4
    /// signed for ssmmessages, as for clients from plugin 1.2.764.0 on. A
    /// signature that is present is always checked.
    #[arg(long)]
    require_signed_open: bool,
    /// Session Manager preferences with KMS encryption under KEY (an id,
    /// alias/NAME or ARN): agents demand the KMS handshake, also for shells,
    /// and the emulator answers KMS GenerateDataKey for KEY.
    #[arg(long, value_name = "KEY")]
    kms_key_id: Option<String>,
    /// With --kms-key-id: encrypt Port sessions too. The stock agent leaves
    /// them out (isEncryptionEnabled); this models one that does not.
    #[arg(long, requires = "kms_key_id")]
    kms_port_sessions: bool,
}

fn probability(name: &str, p: f64) -> anyhow::Result<f64> {
    anyhow::ensure!((0.0..=1.0).contains(&p), "--{name} must be between 0 and 1, got {p}");
    Ok(p)
}

// One thread, like the daemon and the agent: fewer cross-core wake-ups per frame.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let mut config = Config {
        agent_version: args.agent_version,
        profile: args.profile,
        seed: args.seed,
        stream_url_scheme: args.stream_url_scheme,
        stream_host: args.stream_host,
        require_signed_open: args.require_signed_open,
        kms_key_id: args.kms_key_id,
        kms_port_sessions: args.kms_port_sessions,
        denied_documents: args.deny_documents,
        faults: Faults {
            drop: probability("drop", args.drop)?,
            duplicate: probability("duplicate", args.duplicate)?,
            reorder: probability("reorder", args.reorder)?,
            delay: Duration::from_millis(args.delay_ms),
            close_every: args.close_every.map(Duration::from_secs_f64),
            reject_tokens: args.reject_tokens,
            lossy_reconnect: args.lossy_reconnect,
            only_session: args.fault_session,
        },
        ..Config::default()
    };
    for spec in &args.instances {
        let (id, host) = spec.split_once('=').with_context(|| format!("--instance {spec:?}: expected ID=HOST"))?;
        config = config.with_instance(id, host);
    }
    for spec in &args.tags {
        let parsed = spec.split_once('=').and_then(|(id, kv)| kv.split_once('=').map(|(k, v)| (id, k, v)));
        let (id, key, value) = parsed.with_context(|| format!("--tag {spec:?}: expected ID=KEY=VALUE"))?;
        let instance = config.instances.get_mut(id).with_context(|| format!("--tag {spec:?}: no --instance {id}"))?;
        instance.tags.insert(key.to_owned(), value.to_owned());
    }
    for spec in &args.netns {
        let (id, ns) = spec.split_once('=').with_context(|| format!("--netns {spec:?}: expected ID=NAME"))?;
        let path =
            if ns.contains('/') { std::path::PathBuf::from(ns) } else { std::path::Path::new("/run/netns").join(ns) };
        std::fs::File::open(&path).with_context(|| format!("--netns {spec:?}: cannot open {}", path.display()))?;
        let instance = config.instances.get_mut(id).with_context(|| format!("--netns {spec:?}: no --instance {id}"))?;
        instance.netns = Some(path);
    }
    for spec in &args.shells {
        let (id, program) = spec.split_once('=').with_context(|| format!("--shell {spec:?}: expected ID=PROGRAM"))?;
        let instance = config.instances.get_mut(id).with_context(|| format!("--shell {spec:?}: no --instance {id}"))?;
        instance.shell = program.to_owned();
    }
    for spec in &args.hosted_zones {
        let (vpc, zone) = spec.split_once('=').with_context(|| format!("--hosted-zone {spec:?}: expected VPC=ZONE"))?;
        config.hosted_zones.push((vpc.to_owned(), zone.to_owned()));
    }
    for spec in &args.ping_statuses {
        let (id, status) =
            spec.split_once('=').with_context(|| format!("--ping-status {spec:?}: expected ID=STATUS"))?;
        anyhow::ensure!(
            ["Online", "ConnectionLost", "Inactive"].contains(&status),
            "--ping-status {spec:?}: STATUS is Online, ConnectionLost or Inactive"
        );
        let instance =
            config.instances.get_mut(id).with_context(|| format!("--ping-status {spec:?}: no --instance {id}"))?;
        instance.ping_status = status.to_owned();
    }
    if !args.credentials.is_empty() {
        config.credentials.clear();
        for c in &args.credentials {
            let (k, s) = c.split_once(':').with_context(|| format!("--credentials {c:?}: expected KEY:SECRET"))?;
            config.credentials.insert(k.to_owned(), s.to_owned());
        }
    }
    let emulator =
        Emulator::start(config, args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?;
    println!("ssm-emulator listening on {} (AWS_ENDPOINT_URL={})", emulator.addr, emulator.endpoint_url());
    tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
    Ok(())
}
