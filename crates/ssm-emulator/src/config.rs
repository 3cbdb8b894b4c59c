//! What the emulator pretends: credentials it accepts, instances it knows,
//! how its agent paces output, and which faults it injects.

use std::collections::BTreeMap;
use std::time::Duration;

/// How the emulated agent paces its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Profile {
    /// No pacing: as fast as the machine goes.
    #[default]
    Fast,
    /// Like the real agent: one message of at most 1024 bytes per millisecond.
    Stock,
}

/// Frame-level faults between the client and the agent, each direction.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Probability that a frame is dropped.
    pub drop: f64,
    /// Probability that a frame is delivered twice.
    pub duplicate: f64,
    /// Probability that a frame is held back so later frames overtake it.
    pub reorder: f64,
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Close the client's websocket with 1000 "Bye" this long after it opens.
    pub close_every: Option<Duration>,
    /// Refuse every OpenDataChannel token (close 1003).
    pub reject_tokens: bool,
    /// Lose the agent's frames while no client websocket is attached, instead
    /// of holding them until the client reconnects.
    pub lossy_reconnect: bool,
    /// Apply the link faults above (drop, duplicate, reorder, delay,
    /// close_every) only to the n-th session started (1 = the first), so a
    /// test can hurt one member of several; `None`: every session.
    pub only_session: Option<u64>,
}

impl Faults {
    /// The faults session number `ordinal` (1-based) gets.
    pub fn for_session(&self, ordinal: u64) -> Faults {
        if self.only_session.is_none_or(|n| n == ordinal) {
            return self.clone();
        }
        Faults { drop: 0.0, duplicate: 0.0, reorder: 0.0, delay: Duration::ZERO, close_every: None, ..self.clone() }
    }

    pub fn is_active(&self) -> bool {
        self.drop > 0.0 || self.duplicate > 0.0 || self.reorder > 0.0 || !self.delay.is_zero()
    }
}

/// One instance the emulator knows.
#[derive(Debug, Clone)]
pub struct Instance {
    /// The address that stands for the instance's own "localhost": Port
    /// sessions without a `host` parameter dial this host at `portNumber`.
    pub host: String,
    /// The instance's network namespace (a file such as /run/netns/NAME):
    /// Port sessions dial from it and shell sessions run in it.
    pub netns: Option<std::path::PathBuf>,
    /// What the instance's `sh` is: shell sessions run it (default `sh`).
    pub shell: String,
    /// `Online`, `ConnectionLost` or `Inactive`.
    pub ping_status: String,
    /// The instance's tags, as DescribeInstanceInformation's `tag:KEY` filters see them.
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Access key id -> secret key; requests signed otherwise are refused.
    pub credentials: BTreeMap<String, String>,
    pub instances: BTreeMap<String, Instance>,
    /// Route 53 private hosted zones: (VPC id, zone name).
    pub hosted_zones: Vec<(String, String)>,
    /// AgentVersion sent in the HandshakeRequest (4 numeric parts).
    pub agent_version: String,
    pub profile: Profile,
    pub faults: Faults,
    /// Seed for fault injection.
    pub seed: u64,
    /// Scheme of the StreamUrl handed out: `ws`, or `wss` when a TLS front
    /// end sits before the emulator.
    pub stream_url_scheme: String,
    /// The host (and port) the StreamUrl names, as AWS names ssmmessages
    /// rather than the ssm API host. `None`: the API request's Host.
    pub stream_host: Option<String>,
    /// Refuse a data-channel open without a valid SigV4 signature (403).
    pub require_signed_open: bool,
    /// Session Manager preferences with KMS encryption under this key: every
    /// agent asks its client for KMS encryption, also in shell sessions, and
    /// the emulator's KMS knows the key.
    pub kms_key_id: Option<String>,
    /// Encrypt Port sessions too. amazon-ssm-agent does not (its
    /// `isEncryptionEnabled` leaves the Port plugin out, with a TODO to make it
    /// configurable): this models an agent that does.
    pub kms_port_sessions: bool,
    /// Session documents the caller's IAM policy does not allow:
    /// StartSession with one of them is AccessDeniedException.
    pub denied_documents: Vec<String>,
}

/// The credentials tests and the demo use.
pub const TEST_ACCESS_KEY: &str = "AKIAEMULATOR00000001";
pub const TEST_SECRET_KEY: &str = "emulator/secret/key/000000000000000000000";

impl Default for Config {
    fn default() -> Self {
        Config {
            credentials: BTreeMap::from([(TEST_ACCESS_KEY.to_owned(), TEST_SECRET_KEY.to_owned())]),
            instances: BTreeMap::new(),
            hosted_zones: Vec::new(),
            agent_version: "3.3.987.0".into(),
            profile: Profile::Fast,
            faults: Faults::default(),
            seed: 1,
            denied_documents: Vec::new(),
            stream_url_scheme: "ws".into(),
            stream_host: None,
            require_signed_open: false,
            kms_key_id: None,
            kms_port_sessions: false,
        }
    }
}

impl Config {
    pub fn with_instance(mut self, id: &str, host: &str) -> Self {
        let instance = Instance {
            host: host.to_owned(),
            netns: None,
            shell: "sh".into(),
            ping_status: "Online".into(),
            tags: BTreeMap::new(),
        };
        self.instances.insert(id.to_owned(), instance);
        self
    }
}
