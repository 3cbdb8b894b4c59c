//! `ssm-proxy agent status`: how an instance's ec2-agent is doing, asked
//! through a Port session to its port like a tunnel would (no shell, no SSH):
//! a HELLO with the QUERY capability, answered by one STATUS frame.

use std::time::Duration;

use anyhow::{bail, Context};
use forwarder::client::{self, ClientConfig};
use forwarder::link;
use forwarder::wire::{caps, Frame};
use ssm_channel::aws::{AwsOptions, SsmApi};
use ssm_channel::port::{Conn, PortConfig};
use ssm_channel::transport::Trust;

use crate::ssm::{agent_stream, open_port_session, parse_instance_id};
use crate::start::DEFAULT_AGENT_PORT;

/// An agent that does not answer the query within this long is too old to know it.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    #[command(subcommand)]
    command: AgentCommand,
}

#[derive(Debug, clap::Subcommand)]
enum AgentCommand {
    /// Ask an instance's ec2-agent for its version, uptime, sessions and policy.
    #[command(after_help = "Examples:
  ssm-proxy agent status --instance-id i-0abc123def4567890
  ssm-proxy agent status --instance-id i-0abc123def4567890 --agent-port 7302 --json

Needs the same permissions as `start` (ssm:StartSession with AWS-StartPortForwardingSession),
no root.")]
    Status(StatusArgs),
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    /// The managed instance running the ec2-agent (i-... or mi-...).
    #[arg(long, value_parser = parse_instance_id)]
    instance_id: String,
    /// The ec2-agent's port on the instance's loopback.
    #[arg(long, default_value_t = DEFAULT_AGENT_PORT)]
    agent_port: u16,
    /// AWS region (default: from the environment or profile).
    #[arg(long)]
    region: Option<String>,
    /// AWS profile to use.
    #[arg(long)]
    profile: Option<String>,
    /// Print the agent's answer as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let AgentCommand::Status(args) = args.command;
    let trust = Trust::from_env()?;
    let api = SsmApi::load(&AwsOptions { region: args.region.clone(), profile: args.profile.clone() }, &trust).await?;
    let session = open_port_session(
        &api,
        &args.instance_id,
        args.agent_port,
        None,
        &trust,
        PortConfig::default(),
        1,
        Box::pin(std::future::pending()),
    )
    .await?;
    let answer = ask(&session.conns).await;
    let closed = session.close(&api).await;
    let json = answer
        .with_context(|| format!("no status from the ec2-agent on {} port {}", args.instance_id, args.agent_port))?;
    closed?;
    let v: serde_json::Value = serde_json::from_str(&json).context("the agent's status is not JSON")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", render(&args.instance_id, &v));
    }
    Ok(())
}

/// HELLO with QUERY through a new connection of the session; the STATUS answer.
async fn ask(conns: &tokio::sync::mpsc::Sender<Conn>) -> anyhow::Result<String> {
    let (mut reader, mut writer) = agent_stream(conns).await?;
    let config = ClientConfig { caps: caps::QUERY, hello_timeout: ANSWER_TIMEOUT, ..ClientConfig::default() };
    let (_agent, mut deframer) = client::handshake(&mut reader, &mut writer, &config, 1280).await?;
    match tokio::time::timeout(ANSWER_TIMEOUT, link::read_frame(&mut reader, &mut deframer)).await {
        Ok(Ok(Frame::Status(json))) => Ok(json),
        Ok(Ok(Frame::Goodbye { message, .. })) => bail!("the agent said goodbye: {message}"),
        Ok(Ok(other)) => bail!("the agent answered {other:?} instead of its status"),
        Ok(Err(e)) => bail!("{e}"),
        Err(_) => bail!(
            "the agent did not answer the status query within {} s; it may predate `agent status` (upgrade it)",
            ANSWER_TIMEOUT.as_secs()
        ),
    }
}

fn render(instance: &str, v: &serde_json::Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("-").to_string();
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    let list = |k: &str| {
        let items: Vec<&str> =
            v[k].as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect()).unwrap_or_default();
        if items.is_empty() {
            "-".to_string()
        } else {
            items.join(", ")
        }
    };
    let up = n("uptime_secs");
    format!(
        "{} on {instance} (listening on {}), up {}h{:02}m{:02}s\n  \
         sessions   {} now (at most {}), {} resumable within {} s\n  \
         vpc        {} in {}\n  \
         resolvers  {}\n  \
         allow      {}\n  \
         deny       {}",
        s("software"),
        s("listen"),
        up / 3600,
        up / 60 % 60,
        up % 60,
        n("sessions"),
        n("max_clients"),
        n("resumable_sessions"),
        n("grace_secs"),
        s("vpc"),
        s("region"),
        list("resolvers"),
        list("allow"),
        list("deny"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_rendered_for_people() {
        let v = serde_json::json!({
            "software": "ec2-agent 0.1.0", "uptime_secs": 3725, "listen": "127.0.0.1:7301",
            "sessions": 1, "resumable_sessions": 1, "max_clients": 16, "grace_secs": 120,
            "vpc": "vpc-0abc", "region": "eu-west-1", "resolvers": ["10.0.0.2"],
            "allow": ["10.0.0.0/8"], "deny": ["169.254.0.0/16"],
        });
        let text = render("i-0123456789abcdef0", &v);
        assert!(
            text.starts_with("ec2-agent 0.1.0 on i-0123456789abcdef0 (listening on 127.0.0.1:7301), up 1h02m05s"),
            "{text}"
        );
        assert!(text.contains("sessions   1 now (at most 16), 1 resumable within 120 s"), "{text}");
        assert!(text.contains("vpc        vpc-0abc in eu-west-1"), "{text}");
        assert!(text.contains("deny       169.254.0.0/16"), "{text}");
        // An agent outside EC2 has no VPC.
        let bare = render("mi-0123456789abcdef0", &serde_json::json!({"software": "ec2-agent 0.1.0"}));
        assert!(bare.contains("vpc        - in -") && bare.contains("resolvers  -"), "{bare}");
    }
}
