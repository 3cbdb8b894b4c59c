//! `ssm-proxy service install|uninstall NAME`: run a tunnel from the config file
//! at boot and restart it when it exits, as a systemd unit (Linux) or a launchd
//! daemon (macOS).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::config;

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  sudo ssm-proxy service install prod     # [tunnel.prod] from the config file, at boot
  ssm-proxy service install prod --print  # show the unit without installing it
  sudo ssm-proxy service uninstall prod

Linux: /etc/systemd/system/ssm-proxy-NAME.service (systemctl enable --now).
macOS: /Library/LaunchDaemons/com.ssm-proxy.NAME.plist (launchctl bootstrap system).
The service runs `ssm-proxy start NAME` as root with the config file the tunnel
was found in and the home directory of the user who installed it (for ~/.aws).")]
pub struct ServiceArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Write and load the service for tunnel NAME of the config file.
    Install {
        name: String,
        /// Print the unit (or plist) instead of installing it.
        #[arg(long)]
        print: bool,
    },
    /// Stop and remove the service for tunnel NAME.
    Uninstall { name: String },
}

/// What a service file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub name: String,
    pub exe: PathBuf,
    /// The config file defining the tunnel.
    pub config: PathBuf,
    /// HOME for the AWS credential chain (~/.aws of whoever installed it).
    pub home: Option<PathBuf>,
}

/// The systemd unit for `spec`.
pub fn systemd_unit(spec: &Spec) -> String {
    let home = spec.home.as_ref().map(|h| format!("Environment=HOME={}\n", h.display())).unwrap_or_default();
    format!(
        "# Written by `ssm-proxy service install {name}`; remove with `ssm-proxy service uninstall {name}`.
[Unit]
Description=ssm-proxy tunnel {name}
Documentation=https://github.com/ssm-proxy/ssm-proxy
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={exe} start {name}
Environment=SSM_PROXY_CONFIG={config}
{home}Restart=always
RestartSec=5
# `start` tears down its routes and DNS settings on SIGTERM.
KillSignal=SIGTERM
TimeoutStopSec=30

[Install]
WantedBy=multi-user.target
",
        name = spec.name,
        exe = spec.exe.display(),
        config = spec.config.display(),
    )
}

/// The launchd property list for `spec`.
pub fn launchd_plist(spec: &Spec) -> String {
    let home = spec
        .home
        .as_ref()
        .map(|h| format!("\n        <key>HOME</key>\n        <string>{}</string>", xml(&h.display().to_string())))
        .unwrap_or_default();
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<!-- Written by `ssm-proxy service install {name}`; remove with `ssm-proxy service uninstall {name}`. -->
<plist version="1.0">
<dict>
    <key>Label</key>
    <string>{label}</string>
    <key>ProgramArguments</key>
    <array>
        <string>{exe}</string>
        <string>start</string>
        <string>{name}</string>
    </array>
    <key>EnvironmentVariables</key>
    <dict>
        <key>SSM_PROXY_CONFIG</key>
        <string>{config}</string>{home}
    </dict>
    <key>RunAtLoad</key>
    <true/>
    <key>KeepAlive</key>
    <true/>
    <key>ThrottleInterval</key>
    <integer>5</integer>
    <key>StandardErrorPath</key>
    <string>/var/log/ssm-proxy-{name}.log</string>
</dict>
</plist>
"#,
        name = xml(&spec.name),
        label = xml(&launchd_label(&spec.name)),
        exe = xml(&spec.exe.display().to_string()),
        config = xml(&spec.config.display().to_string()),
    )
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

pub fn launchd_label(name: &str) -> String {
    format!("com.ssm-proxy.{name}")
}

fn systemd_path(name: &str) -> PathBuf {
    Path::new("/etc/systemd/system").join(systemd_unit_name(name))
}

fn launchd_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/Library/LaunchDaemons/{}.plist", launchd_label(name)))
}

/// The spec for tunnel `name` of the config files, as this process sees them.
fn spec_for(name: &str) -> anyhow::Result<Spec> {
    let tunnel = config::find(&config::default_paths(), name)?;
    let config = std::fs::canonicalize(&tunnel.file).unwrap_or(tunnel.file);
    let exe = std::env::current_exe().context("cannot find our own executable")?;
    Ok(Spec { name: tunnel.name, exe, config, home: config::invoking_home() })
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("cannot run {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Refuses a file at `path` that `service install` did not write.
fn check_ours(path: &Path) -> anyhow::Result<()> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        if !existing.contains("Written by `ssm-proxy service install") {
            bail!("{} exists and was not written by ssm-proxy; not touching it", path.display());
        }
    }
    Ok(())
}

fn write_new(path: &Path, text: &str) -> anyhow::Result<()> {
    check_ours(path)?;
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Unload the launchd daemon (if loaded: errors are expected otherwise).
fn launchd_bootout(name: &str) {
    let _ = Command::new("launchctl").args(["bootout", &format!("system/{}", launchd_label(name))]).output();
}

fn systemd_unit_name(name: &str) -> String {
    format!("ssm-proxy-{name}.service")
}

/// The machine's service manager, behind a trait so install and uninstall
/// are tested on a fake: where a tunnel's service file goes, what it says,
/// and how the manager starts and stops it.
pub trait ServiceManager {
    fn path(&self, name: &str) -> PathBuf;
    fn render(&self, spec: &Spec) -> String;
    /// Load and start the service whose file was just written.
    fn start(&self, name: &str, path: &Path) -> anyhow::Result<()>;
    /// Stop and unload it (not loaded is fine).
    fn stop(&self, name: &str);
    /// After the file is gone.
    fn forget(&self) {}
    /// Where its logs go, for the user.
    fn logs(&self, name: &str) -> String;
}

/// systemd (Linux).
pub struct Systemd;

impl ServiceManager for Systemd {
    fn path(&self, name: &str) -> PathBuf {
        systemd_path(name)
    }
    fn render(&self, spec: &Spec) -> String {
        systemd_unit(spec)
    }
    fn start(&self, name: &str, _path: &Path) -> anyhow::Result<()> {
        run(Command::new("systemctl").arg("daemon-reload"))?;
        run(Command::new("systemctl").args(["enable", "--now", &systemd_unit_name(name)]))
    }
    fn stop(&self, name: &str) {
        let _ = Command::new("systemctl").args(["disable", "--now", &systemd_unit_name(name)]).output();
    }
    fn forget(&self) {
        let _ = Command::new("systemctl").arg("daemon-reload").output();
    }
    fn logs(&self, name: &str) -> String {
        format!("journalctl -u ssm-proxy-{name}")
    }
}

/// launchd (macOS).
pub struct Launchd;

impl ServiceManager for Launchd {
    fn path(&self, name: &str) -> PathBuf {
        launchd_path(name)
    }
    fn render(&self, spec: &Spec) -> String {
        launchd_plist(spec)
    }
    fn start(&self, name: &str, path: &Path) -> anyhow::Result<()> {
        launchd_bootout(name);
        run(Command::new("launchctl").args(["bootstrap", "system"]).arg(path))
    }
    fn stop(&self, name: &str) {
        launchd_bootout(name);
    }
    fn logs(&self, name: &str) -> String {
        format!("/var/log/ssm-proxy-{name}.log")
    }
}

/// Writes the service file (never over one we did not write) and starts it.
pub fn install(manager: &impl ServiceManager, spec: &Spec) -> anyhow::Result<PathBuf> {
    let path = manager.path(&spec.name);
    write_new(&path, &manager.render(spec))?;
    manager.start(&spec.name, &path)?;
    Ok(path)
}

/// Stops the service and removes its file (only one we wrote).
pub fn uninstall(manager: &impl ServiceManager, name: &str) -> anyhow::Result<()> {
    let path = manager.path(name);
    if !path.exists() {
        bail!("no service for tunnel {name:?} ({} does not exist)", path.display());
    }
    check_ours(&path)?;
    manager.stop(name);
    std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    manager.forget();
    Ok(())
}

pub fn main(args: ServiceArgs) -> anyhow::Result<()> {
    if cfg!(target_os = "macos") {
        run_with(&Launchd, args)
    } else {
        run_with(&Systemd, args)
    }
}

fn run_with(manager: &impl ServiceManager, args: ServiceArgs) -> anyhow::Result<()> {
    match args.action {
        Action::Install { name, print } => {
            let spec = spec_for(&name)?;
            if print {
                print!("{}", manager.render(&spec));
                return Ok(());
            }
            if !nix::unistd::geteuid().is_root() {
                bail!("installing a system service needs root: run it with sudo");
            }
            let path = install(manager, &spec)?;
            println!("Installed and started {} (logs: {}).", path.display(), manager.logs(&name));
            Ok(())
        }
        Action::Uninstall { name } => {
            if !nix::unistd::geteuid().is_root() {
                bail!("removing a system service needs root: run it with sudo");
            }
            uninstall(manager, &name)?;
            println!("Removed the service for tunnel {name:?}.");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        Spec {
            name: "prod".into(),
            exe: "/usr/local/bin/ssm-proxy".into(),
            config: "/etc/ssm-proxy/config.toml".into(),
            home: Some("/home/alice".into()),
        }
    }

    #[test]
    fn the_systemd_unit_matches_its_golden_file() {
        assert_eq!(systemd_unit(&spec()), include_str!("../tests/golden/ssm-proxy-prod.service"));
    }

    #[test]
    fn the_launchd_plist_matches_its_golden_file() {
        assert_eq!(launchd_plist(&spec()), include_str!("../tests/golden/com.ssm-proxy.prod.plist"));
    }

    #[test]
    fn without_a_home_neither_file_sets_one() {
        let s = Spec { home: None, ..spec() };
        assert!(!systemd_unit(&s).contains("HOME"));
        assert!(!launchd_plist(&s).contains("HOME"));
    }

    #[test]
    fn files_we_did_not_write_are_left_alone() {
        let dir = std::env::temp_dir().join(format!("ssm-proxy-service-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let theirs = dir.join("theirs.service");
        std::fs::write(&theirs, "[Service]\nExecStart=/bin/true\n").expect("write");
        assert!(write_new(&theirs, "ours").is_err());
        assert_eq!(std::fs::read_to_string(&theirs).expect("read"), "[Service]\nExecStart=/bin/true\n");
        let ours = dir.join("ours.service");
        write_new(&ours, &systemd_unit(&spec())).expect("new file");
        write_new(&ours, &systemd_unit(&Spec { home: None, ..spec() })).expect("ours again");
        assert!(!std::fs::read_to_string(&ours).expect("read").contains("HOME"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// A service manager that writes into a directory and records what it was asked.
    struct Fake {
        dir: tempfile::TempDir,
        calls: std::sync::Mutex<Vec<String>>,
        fail_start: bool,
    }

    impl ServiceManager for Fake {
        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(format!("ssm-proxy-{name}.service"))
        }
        fn render(&self, spec: &Spec) -> String {
            systemd_unit(spec)
        }
        fn start(&self, name: &str, path: &Path) -> anyhow::Result<()> {
            assert!(path.exists(), "the file is written before the manager starts it");
            self.calls.lock().expect("lock").push(format!("start {name}"));
            if self.fail_start {
                bail!("Unit ssm-proxy-{name}.service failed");
            }
            Ok(())
        }
        fn stop(&self, name: &str) {
            self.calls.lock().expect("lock").push(format!("stop {name}"));
        }
        fn forget(&self) {
            self.calls.lock().expect("lock").push("forget".into());
        }
        fn logs(&self, name: &str) -> String {
            name.into()
        }
    }

    fn fake(fail_start: bool) -> Fake {
        Fake { dir: tempfile::tempdir().expect("tempdir"), calls: Default::default(), fail_start }
    }

    #[test]
    fn install_writes_then_starts_and_uninstall_stops_then_removes() {
        let m = fake(false);
        let path = install(&m, &spec()).expect("installed");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), systemd_unit(&spec()));
        // Installing again replaces our own file.
        install(&m, &spec()).expect("reinstalled");
        uninstall(&m, "prod").expect("uninstalled");
        assert!(!path.exists());
        assert_eq!(*m.calls.lock().expect("lock"), ["start prod", "start prod", "stop prod", "forget"]);
        let again = uninstall(&m, "prod").expect_err("nothing to remove");
        assert!(again.to_string().contains("no service for tunnel \"prod\""), "{again}");
    }

    #[test]
    fn a_service_file_someone_else_wrote_is_neither_replaced_nor_removed() {
        let m = fake(false);
        let path = m.path("prod");
        std::fs::write(&path, "[Service]\nExecStart=/bin/true\n").expect("write");
        assert!(install(&m, &spec()).is_err());
        assert!(uninstall(&m, "prod").is_err());
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "[Service]\nExecStart=/bin/true\n");
        assert!(m.calls.lock().expect("lock").is_empty(), "the manager was never asked");
    }

    #[test]
    fn a_start_that_fails_is_reported() {
        let m = fake(true);
        let err = install(&m, &spec()).expect_err("start failed");
        assert!(err.to_string().contains("failed"), "{err}");
    }
}
