//! `ssm-proxy agent install` and `uninstall`: the ec2-agent put on an
//! instance through Session Manager alone (no internet, S3 or SSH on the
//! instance). A shell session ([`super::remote`]) finds the instance's OS,
//! architecture, privileges and service manager, sends the matching static
//! binary, installs it with a systemd unit (or, with `--no-systemd`, starts it
//! as a background process) and a Port session then checks that it answers.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use sha2::Digest;

use super::remote::{quote, RemoteShell};

/// Where the unit goes (systemd's directory for units of the administrator).
pub const UNIT_PATH: &str = "/etc/systemd/system/ec2-agent.service";
/// The unit we ship; `install` rewrites its ExecStart for the prefix and port.
const UNIT_TEMPLATE: &str = include_str!("../../../../packaging/ec2-agent.service");
/// The user a `--no-systemd` agent runs as.
const NO_SYSTEMD_USER: &str = "nobody";

/// Where things go on the instance.
#[derive(Debug, Clone)]
pub struct Layout {
    pub prefix: String,
    pub port: u16,
}

impl Layout {
    pub fn bin(&self) -> String {
        format!("{}/bin/ec2-agent", self.prefix)
    }
    /// State of an agent started without systemd.
    fn state_dir(&self) -> String {
        format!("{}/var/ec2-agent", self.prefix)
    }
    fn pid_file(&self) -> String {
        format!("{}/ec2-agent.pid", self.state_dir())
    }
    fn log_file(&self) -> String {
        format!("{}/ec2-agent.log", self.state_dir())
    }
    fn listen(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// What the instance told us about itself.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Probe {
    pub os: String,
    pub arch: String,
    /// "root", "yes" (passwordless sudo) or "no".
    pub sudo: String,
    pub systemd: bool,
    pub tools: Vec<String>,
    pub installed_sha256: Option<String>,
    pub installed_version: Option<String>,
    pub unit: bool,
    /// `systemctl is-active ec2-agent`, when systemctl exists.
    pub active: Option<String>,
    /// A running agent started without systemd.
    pub pid: Option<u32>,
}

impl Probe {
    pub fn parse(output: &str) -> Probe {
        let mut p = Probe::default();
        for line in output.lines() {
            let Some((k, v)) = line.split_once('=') else { continue };
            let v = v.trim().to_owned();
            match k.trim() {
                "os" => p.os = v,
                "arch" => p.arch = v,
                "sudo" => p.sudo = v,
                "systemd" => p.systemd = v == "yes",
                "have" => p.tools.push(v),
                "installed_sha256" if !v.is_empty() => p.installed_sha256 = Some(v),
                "installed_version" if !v.is_empty() => p.installed_version = Some(v),
                "unit" => p.unit = v == "yes",
                "active" if !v.is_empty() => p.active = Some(v),
                "pid" => p.pid = v.parse().ok(),
                _ => {}
            }
        }
        p
    }

    pub fn has(&self, tool: &str) -> bool {
        self.tools.iter().any(|t| t == tool)
    }

    /// The command prefix for root's work: nothing as root, `sudo -n` else.
    pub fn root_prefix(&self, instance: &str) -> anyhow::Result<&'static str> {
        match self.sudo.as_str() {
            "root" => Ok(""),
            "yes" => Ok("sudo -n "),
            _ => bail!(
                "the session user on {instance} is not root and may not use sudo without a password; \
                 installing needs root. Session Manager's default user ssm-user has passwordless sudo: \
                 check /etc/sudoers.d/ssm-agent-users, or set Run As to a user that may"
            ),
        }
    }

    fn running(&self, no_systemd: bool) -> bool {
        if no_systemd {
            self.pid.is_some()
        } else {
            self.active.as_deref() == Some("active")
        }
    }
}

/// The script that fills a [`Probe`].
pub fn probe_script(l: &Layout) -> String {
    format!(
        r#"B={bin}
echo "os=$(uname -s)"
echo "arch=$(uname -m)"
if [ "$(id -u)" = 0 ]; then echo sudo=root
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then echo sudo=yes
else echo sudo=no; fi
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then echo systemd=yes; else echo systemd=no; fi
for t in base64 gzip sha256sum mktemp install setsid setpriv; do command -v $t >/dev/null 2>&1 && echo "have=$t"; done
if [ -f "$B" ]; then echo "installed_sha256=$(sha256sum "$B" | cut -d' ' -f1)"; echo "installed_version=$("$B" --version 2>/dev/null | head -n 1)"; fi
if [ -f {unit} ]; then echo unit=yes; fi
if command -v systemctl >/dev/null 2>&1; then echo "active=$(systemctl is-active ec2-agent.service 2>/dev/null)"; fi
P={pid}; if [ -f "$P" ]; then p=$(cat "$P"); if grep -q ec2-agent "/proc/$p/cmdline" 2>/dev/null; then echo "pid=$p"; fi; fi
true"#,
        bin = quote(&l.bin()),
        unit = UNIT_PATH,
        pid = quote(&l.pid_file()),
    )
}

/// What `install` will do, decided from the probe and the local binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The same binary is installed and running: only check it answers.
    Nothing,
    /// The same binary is installed but not running: start it.
    Start,
    /// Send the binary and install it (`replace`: over another build).
    Install { replace: bool },
}

pub fn plan(p: &Probe, local_sha256: &str, upgrade: bool, no_systemd: bool, instance: &str) -> anyhow::Result<Plan> {
    Ok(match p.installed_sha256.as_deref() {
        None => Plan::Install { replace: false },
        Some(s) if s == local_sha256 => {
            // A unit for another port, or a missing unit, needs the full install.
            if p.running(no_systemd) {
                Plan::Nothing
            } else if no_systemd || p.unit {
                Plan::Start
            } else {
                Plan::Install { replace: false }
            }
        }
        Some(_) if upgrade => Plan::Install { replace: true },
        Some(_) => bail!(
            "{instance} already has another ec2-agent ({}); pass --upgrade to replace it with this one",
            p.installed_version.as_deref().unwrap_or("version unknown")
        ),
    })
}

/// Checks the probe against what installing needs.
pub fn check_instance(p: &Probe, no_systemd: bool, instance: &str) -> anyhow::Result<()> {
    if p.os != "Linux" {
        bail!("the ec2-agent runs on Linux; {instance} runs {:?}", p.os);
    }
    if !matches!(p.arch.as_str(), "x86_64" | "aarch64") {
        bail!("there is no ec2-agent build for {instance}'s architecture {:?} (x86_64 and aarch64 exist)", p.arch);
    }
    let mut needed = vec!["base64", "sha256sum", "mktemp", "install"];
    if no_systemd {
        needed.extend(["setsid", "setpriv"]);
    }
    let missing: Vec<&str> = needed.into_iter().filter(|t| !p.has(t)).collect();
    if !missing.is_empty() {
        bail!("{instance} lacks {} (coreutils/util-linux), which installing needs", missing.join(", "));
    }
    if !p.systemd && !no_systemd {
        bail!(
            "{instance} has no systemd (/run/systemd/system is missing). Pass --no-systemd to run the \
             ec2-agent as a background process as {NO_SYSTEMD_USER} instead; it is then not restarted \
             after a crash or a reboot (run `agent install` again)"
        );
    }
    Ok(())
}

/// The systemd unit for `l`: the shipped one with its ExecStart rewritten.
pub fn systemd_unit(l: &Layout) -> String {
    let mut out = String::with_capacity(UNIT_TEMPLATE.len());
    for line in UNIT_TEMPLATE.lines() {
        if line.starts_with("ExecStart=") {
            let _ = writeln!(out, "ExecStart={} --listen {} --log-format json", l.bin(), l.listen());
        } else if line.starts_with("#   sudo") {
            // The install notes are for doing it by hand; this unit was installed for you.
            continue;
        } else if line.starts_with("# systemd unit for the ssm-proxy ec2-agent.") {
            out.push_str("# systemd unit for the ssm-proxy ec2-agent, written by `ssm-proxy agent install`.\n");
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Installs the binary at `tmp` (and the unit at `unit_tmp`) and (re)starts the agent.
pub fn install_script(l: &Layout, s: &str, tmp: Option<&str>, unit_tmp: Option<&str>) -> String {
    let bin = quote(&l.bin());
    let mut script = String::from("set -e\n");
    // The sent files go whatever happens.
    let temps: Vec<String> = tmp.iter().chain(unit_tmp.iter()).map(|t| quote(t)).collect();
    if !temps.is_empty() {
        let _ = writeln!(script, "trap 'rm -f {}' EXIT", temps.join(" ").replace('\'', "'\\''"));
    }
    if let Some(tmp) = tmp {
        let _ = write!(
            script,
            "{s}install -d -m 0755 {dir}\n{s}install -m 0755 {tmp} {bin}.new\n{s}mv -f {bin}.new {bin}\n",
            dir = quote(&format!("{}/bin", l.prefix)),
            tmp = quote(tmp),
        );
    }
    match unit_tmp {
        Some(unit) => {
            let _ = write!(
                script,
                "{s}install -m 0644 {u} {UNIT_PATH}\n{s}systemctl daemon-reload\n\
                 {s}systemctl enable ec2-agent.service\n{s}systemctl restart ec2-agent.service\n\
                 sleep 1\nsystemctl is-active ec2-agent.service\n",
                u = quote(unit),
            );
        }
        None => {
            let _ = write!(
                script,
                r#"{s}install -d -m 0755 {state}
P={pid}
if [ -f "$P" ]; then p=$(cat "$P"); if grep -q ec2-agent "/proc/$p/cmdline" 2>/dev/null; then
  {s}kill "$p"; i=0; while grep -q ec2-agent "/proc/$p/cmdline" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
fi; fi
{s}sh -c 'setsid setpriv --reuid={user} --regid="$(id -g {user})" --clear-groups "$0" --listen "$1" >>"$2" 2>&1 </dev/null & echo $! >"$3"' {bin} {listen} {log} "$P"
sleep 1
p=$(cat "$P")
if ! grep -q ec2-agent "/proc/$p/cmdline" 2>/dev/null; then echo "the ec2-agent exited at once; the end of its log:"; tail -n 20 {log}; exit 1; fi
echo "pid=$p"
"#,
                state = quote(&l.state_dir()),
                pid = quote(&l.pid_file()),
                user = NO_SYSTEMD_USER,
                listen = l.listen(),
                log = quote(&l.log_file()),
            );
        }
    }
    script
}

/// Stops the agent and removes what `install` put there; prints `removed=` lines.
pub fn uninstall_script(l: &Layout, s: &str) -> String {
    format!(
        r#"if [ -f {UNIT_PATH} ]; then {s}systemctl disable --now ec2-agent.service 2>&1 || true; {s}rm -f {UNIT_PATH}; {s}systemctl daemon-reload || true; echo "removed={UNIT_PATH}"; fi
P={pid}
if [ -f "$P" ]; then p=$(cat "$P"); if grep -q ec2-agent "/proc/$p/cmdline" 2>/dev/null; then {s}kill "$p" && echo "stopped=pid $p"; fi; {s}rm -f "$P"; fi
if [ -f {log} ]; then {s}rm -f {log}; echo "removed="{log}; fi
if [ -f {bin} ]; then {s}rm -f {bin}; echo "removed="{bin}; fi
{s}rmdir {state} 2>/dev/null || true
true"#,
        pid = quote(&l.pid_file()),
        log = quote(&l.log_file()),
        bin = quote(&l.bin()),
        state = quote(&l.state_dir()),
    )
}

/// The architecture an ELF executable is for (`uname -m` spelling).
pub fn elf_arch(head: &[u8]) -> Option<&'static str> {
    if head.len() < 20 || &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return None; // not a 64-bit little-endian ELF file
    }
    match u16::from_le_bytes([head[18], head[19]]) {
        62 => Some("x86_64"),
        183 => Some("aarch64"),
        _ => None,
    }
}

/// Where a Linux ec2-agent for `arch` is looked for when `--agent-binary` is not given.
pub fn candidates(exe_dir: &Path, arch: &str) -> Vec<PathBuf> {
    let name = format!("ec2-agent-linux-{arch}");
    let mut c = vec![exe_dir.join(&name), exe_dir.join("../lib/ssm-proxy").join(&name)];
    if cfg!(target_os = "linux") && std::env::consts::ARCH == arch {
        c.push(exe_dir.join("ec2-agent"));
    }
    c
}

/// The local ec2-agent for `arch`, read and checked.
pub fn local_binary(explicit: Option<&Path>, arch: &str) -> anyhow::Result<(PathBuf, Vec<u8>)> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => {
            let exe = std::env::current_exe().context("where is this ssm-proxy?")?;
            let dir = exe.parent().unwrap_or(Path::new("."));
            let c = candidates(dir, arch);
            match c.iter().find(|p| p.is_file()) {
                Some(p) => p.clone(),
                None => bail!(
                    "no ec2-agent for linux-{arch} here (looked for {}); download ec2-agent for linux-{arch} \
                     from the release page and pass --agent-binary PATH",
                    c.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                ),
            }
        }
    };
    let data = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    match elf_arch(&data) {
        Some(a) if a == arch => Ok((path, data)),
        Some(a) => bail!("{} is an ec2-agent for {a}, but the instance is {arch}", path.display()),
        None => bail!("{} is not a Linux x86_64 or aarch64 executable", path.display()),
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(data))
}

/// Runs the probe.
pub async fn probe(sh: &mut RemoteShell, l: &Layout) -> anyhow::Result<Probe> {
    let out = sh.run_ok("looking at the instance", &probe_script(l)).await?;
    Ok(Probe::parse(&out))
}

#[cfg(test)]
mod tests;
