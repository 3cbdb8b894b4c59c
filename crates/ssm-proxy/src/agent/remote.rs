//! A shell on the instance through a Session Manager shell session, driven by
//! a program rather than a person.
//!
//! The SSM agent runs the shell in a pseudo terminal, so everything is text:
//! each command is framed by two markers printed with `printf`, whose typed
//! form differs from their printed form (`'SSMPX%s' '-N-done'` prints
//! `SSMPX-N-done`), so the terminal's echo of what we type is never mistaken
//! for a marker. Files travel as base64 lines (of gzip when the instance has
//! gzip) read by `base64 -d` until an end-of-file character, and are checked
//! with sha256sum on arrival.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::aws::SsmApi;
use anyhow::{bail, Context};
use base64::Engine;
use ssm_channel::shell::{self, ShellIo};
use ssm_channel::transport::Trust;
use tokio::task::JoinHandle;

use crate::ssm::{finish, SsmResume};

/// How long the instance has to start the shell and print our first marker.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// No output at all for this long while a command runs: give up.
const QUIET_TIMEOUT: Duration = Duration::from_secs(120);
/// Base64 text typed per write (whole lines).
const TYPE_CHUNK: usize = 48 << 10;
/// Raw bytes per base64 line: 76 characters, far below the terminal's
/// 4095-byte line limit.
const LINE_BYTES: usize = 57;

/// The framing of one session's commands; `nonce` keeps markers unique.
#[derive(Debug, Clone)]
pub struct Markers {
    nonce: String,
}

/// A command's end as the markers tell it.
#[derive(Debug, PartialEq, Eq)]
pub struct Done {
    pub code: i32,
    pub output: String,
}

impl Markers {
    pub fn new(nonce: &str) -> Markers {
        Markers { nonce: nonce.to_owned() }
    }

    /// What to type to print marker `what` (and `arg`, a shell word, after it).
    fn print(&self, what: &str, arg: &str) -> String {
        format!("printf 'SSMPX%s %s\\n' '-{}-{what}' {arg}", self.nonce)
    }

    fn printed(&self, what: &str) -> String {
        format!("SSMPX-{}-{what} ", self.nonce)
    }

    /// The first line: no echo, no prompts, then the `ready` marker.
    pub fn init(&self) -> String {
        format!(
            "stty -echo 2>/dev/null; unset PROMPT_COMMAND; PS1=''; PS2=''; export LC_ALL=C; {}\n",
            self.print("ready", "0")
        )
    }

    /// Runs `script` (any number of lines) in a subshell (so `set -e` and
    /// `exit` end the script, not the shell) with no input, its stderr joined
    /// to its stdout, between a `begin` and a `done` marker carrying `$?`.
    pub fn command(&self, script: &str) -> String {
        format!(
            "{}; (\n{script}\n) </dev/null 2>&1; echo; {}\n",
            self.print("begin", "0"),
            self.print("done", "\"$?\"")
        )
    }

    /// Receives base64 lines (of gzip when `gzip`) into a new temporary file,
    /// whose name the `recv` marker prints before reading starts.
    pub fn receive(&self, gzip: bool) -> String {
        let decode = if gzip { "base64 -d | gzip -dc" } else { "base64 -d" };
        format!(
            "{}; T=$(umask 077; mktemp /tmp/ssm-proxy.XXXXXXXX) && {} && {decode} > \"$T\"; echo; {}\n",
            self.print("begin", "0"),
            self.print("recv", "\"$T\""),
            self.print("done", "\"$?\"")
        )
    }

    /// Whether the `ready` marker arrived; drops everything up to it.
    pub fn take_ready(&self, buf: &mut String) -> bool {
        let Some((_, end)) = self.find_line(buf, "ready") else { return false };
        buf.drain(..=end);
        true
    }

    /// The argument of marker `what` and where its line ends, once complete.
    fn find_line(&self, buf: &str, what: &str) -> Option<(String, usize)> {
        let m = self.printed(what);
        let at = buf.find(&m)?;
        let end = at + buf[at..].find('\n')?;
        Some((buf[at + m.len()..end].to_owned(), end))
    }

    /// The `recv` marker's file name, if it has arrived (left in `buf`: the
    /// command's `done` follows it).
    pub fn find_recv(&self, buf: &str) -> Option<String> {
        self.find_line(buf, "recv").map(|(arg, _)| arg)
    }

    /// A finished command: what it printed between the markers and its exit code.
    pub fn take_done(&self, buf: &mut String) -> Option<Done> {
        let begin = self.printed("begin");
        let done = self.printed("done");
        let b = buf.find(&begin)?;
        let start = b + buf[b..].find('\n')? + 1;
        let d = start + buf[start..].find(&done)?;
        let end = d + buf[d..].find('\n')?;
        let code = buf[d + done.len()..end].trim().parse().unwrap_or(-1);
        let mut output = buf[start..d].to_owned();
        // The `echo` before the marker ends the last line of output.
        if output.ends_with('\n') {
            output.pop();
        }
        buf.drain(..=end);
        Some(Done { code, output })
    }
}

/// A shell session opened for a program.
pub struct RemoteShell {
    io: ShellIo,
    buf: String,
    markers: Markers,
    session_id: String,
    task: JoinHandle<Result<ssm_channel::port::Summary, ssm_channel::port::PortError>>,
}

impl RemoteShell {
    /// StartSession with the default shell document, then the first marker.
    pub async fn open(api: &SsmApi, instance: &str, trust: &Trust) -> anyhow::Result<RemoteShell> {
        let dialer = trust.dialer()?;
        let client_id = uuid::Uuid::new_v4();
        let started = api.start_shell_session(instance, client_id).await.map_err(|e| {
            anyhow::anyhow!(
                "{e}\n(`agent install` runs commands through a shell session: allow ssm:StartSession on \
                 arn:aws:ssm:*:*:document/SSM-SessionManagerRunShell for your identity)"
            )
        })?;
        let session_id = started.session_id.clone();
        let resume = Arc::new(SsmResume {
            api: api.clone(),
            session_id: session_id.clone(),
            stream_url: started.endpoint.stream_url.clone(),
            client_id,
            target: instance.to_owned(),
        });
        let (io, pipes) = shell::pipes();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let span = tracing::info_span!("session", id = %session_id, instance);
        let driver = shell::run(
            shell::session_config(),
            started.endpoint,
            dialer,
            resume,
            Duration::from_secs(60),
            pipes,
            ready_tx,
        );
        let task = tokio::spawn(tracing::Instrument::instrument(driver, span));
        let nonce = format!("{:016x}", fastrand::u64(..));
        let mut sh = RemoteShell { io, buf: String::new(), markers: Markers::new(&nonce), session_id, task };
        let opened = async {
            let _ = tokio::time::timeout(OPEN_TIMEOUT, ready_rx).await;
            sh.type_text(sh.markers.init()).await?;
            let deadline = Instant::now() + OPEN_TIMEOUT;
            while !sh.markers.take_ready(&mut sh.buf) {
                sh.read_some(deadline).await?;
            }
            anyhow::Ok(())
        };
        if let Err(e) = opened.await {
            let why = sh.close(api).await.err();
            let why = why.map(|w| format!(" ({w})")).unwrap_or_default();
            return Err(e.context(format!("the shell on {instance} did not start{why}")));
        }
        Ok(sh)
    }

    async fn type_text(&self, text: String) -> anyhow::Result<()> {
        self.io.input.send(text.into_bytes()).await.map_err(|_| anyhow::anyhow!("the shell session ended"))
    }

    /// Waits for more output (carriage returns dropped) until `deadline`.
    async fn read_some(&mut self, deadline: Instant) -> anyhow::Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.io.output.recv()).await {
            Ok(Some(d)) => {
                self.buf.extend(String::from_utf8_lossy(&d).chars().filter(|&c| c != '\r'));
                Ok(())
            }
            Ok(None) => bail!("the shell session ended"),
            Err(_) => bail!("the shell on the instance went quiet for {} s", left.as_secs()),
        }
    }

    /// Runs `script`; its exit code and output.
    pub async fn run(&mut self, script: &str) -> anyhow::Result<Done> {
        self.type_text(self.markers.command(script)).await?;
        self.wait_done().await
    }

    /// Reads until the running command's `done` marker.
    async fn wait_done(&mut self) -> anyhow::Result<Done> {
        loop {
            if let Some(done) = self.markers.take_done(&mut self.buf) {
                return Ok(done);
            }
            self.read_some(Instant::now() + QUIET_TIMEOUT).await?;
        }
    }

    /// Runs `script` and fails with its output unless it exits 0.
    pub async fn run_ok(&mut self, what: &str, script: &str) -> anyhow::Result<String> {
        let done = self.run(script).await?;
        if done.code != 0 {
            bail!("{what} failed on the instance (exit {}):\n{}", done.code, done.output.trim_end());
        }
        Ok(done.output)
    }

    /// Sends `data` into a new private temporary file on the instance and
    /// returns its path, checked with sha256sum. `progress(sent, total)`
    /// is called as the typed text goes out.
    pub async fn upload(
        &mut self,
        data: &[u8],
        gzip: bool,
        mut progress: impl FnMut(usize, usize),
    ) -> anyhow::Result<String> {
        let payload = if gzip { gzip_fast(data)? } else { data.to_vec() };
        let text = base64_lines(&payload);
        self.type_text(self.markers.receive(gzip)).await?;
        let path = loop {
            if let Some(p) = self.markers.find_recv(&self.buf) {
                break p;
            }
            if let Some(done) = self.markers.take_done(&mut self.buf) {
                bail!("could not create a temporary file on the instance (exit {}): {}", done.code, done.output);
            }
            self.read_some(Instant::now() + QUIET_TIMEOUT).await?;
        };
        let mut sent = 0;
        for chunk in text.as_bytes().chunks(TYPE_CHUNK) {
            self.io.input.send(chunk.to_vec()).await.map_err(|_| anyhow::anyhow!("the shell session ended"))?;
            sent += chunk.len();
            progress(sent, text.len());
        }
        // End of file for `base64 -d`: ^D at the start of a line.
        self.type_text("\u{4}".into()).await?;
        let done = self.wait_done().await?;
        if done.code != 0 {
            bail!("decoding the file on the instance failed (exit {}): {}", done.code, done.output.trim());
        }
        let want = super::install::sha256_hex(data);
        let got = self.run_ok("sha256sum", &format!("sha256sum {}", quote(&path))).await?;
        if got.split_whitespace().next() != Some(want.as_str()) {
            bail!("the file arrived damaged on the instance (sha256 {got:?}, sent {want})");
        }
        Ok(path)
    }

    /// Exits the shell, waits for the session to end and terminates it.
    pub async fn close(self, api: &SsmApi) -> anyhow::Result<()> {
        let RemoteShell { io, session_id, task, .. } = self;
        let _ = io.input.send(b"exit 0\n".to_vec()).await;
        drop(io.input);
        let done = match tokio::time::timeout(Duration::from_secs(10), task).await {
            Ok(done) => done,
            Err(_) => {
                let _ = api.terminate_session(&session_id).await;
                bail!("the shell session {session_id} did not end; terminated it");
            }
        };
        match finish(api, &session_id, done).await {
            // The shell exiting closes the channel: that is the expected end.
            Err(e) if e.to_string().starts_with("the service closed session") => Ok(()),
            other => other,
        }
    }
}

/// A shell word for `s` (single quotes).
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn gzip_fast(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut z = flate2::write::GzEncoder::new(Vec::with_capacity(data.len() / 2), flate2::Compression::fast());
    z.write_all(data).context("gzip")?;
    z.finish().context("gzip")
}

/// Base64 in lines of 76 characters, each ending in a newline.
pub fn base64_lines(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len() * 4 / 3 + data.len() / LINE_BYTES + 4);
    for line in data.chunks(LINE_BYTES) {
        base64::engine::general_purpose::STANDARD.encode_string(line, &mut out);
        out.push('\n');
    }
    out
}
