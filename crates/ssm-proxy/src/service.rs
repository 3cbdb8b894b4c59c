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

pub fn main(args: ServiceArgs) -> anyhow::Result<()> {
    let macos = cfg!(target_os = "macos");
    match args.action {
        Action::Install { name, print } => {
            let spec = spec_for(&name)?;
            let text = if macos { launchd_plist(&spec) } else { systemd_unit(&spec) };
            if print {
                print!("{text}");
                return Ok(());
            }
            if !nix::unistd::geteuid().is_root() {
                bail!("installing a system service needs root: run it with sudo");
            }
            if macos {
                let path = launchd_path(&name);
                write_new(&path, &text)?;
                launchd_bootout(&name);
                run(Command::new("launchctl").args(["bootstrap", "system"]).arg(&path))?;
                println!("Installed and started {} (logs: /var/log/ssm-proxy-{name}.log).", path.display());
            } else {
                let path = systemd_path(&name);
                write_new(&path, &text)?;
                run(Command::new("systemctl").arg("daemon-reload"))?;
                run(Command::new("systemctl").args(["enable", "--now", &systemd_unit_name(&name)]))?;
                println!("Installed and started {} (logs: journalctl -u ssm-proxy-{name}).", path.display());
            }
            Ok(())
        }
        Action::Uninstall { name } => {
            if !nix::unistd::geteuid().is_root() {
                bail!("removing a system service needs root: run it with sudo");
            }
            let path = if macos { launchd_path(&name) } else { systemd_path(&name) };
            if !path.exists() {
                bail!("no service for tunnel {name:?} ({} does not exist)", path.display());
            }
            check_ours(&path)?;
            if macos {
                launchd_bootout(&name);
            } else {
                let _ = Command::new("systemctl").args(["disable", "--now", &systemd_unit_name(&name)]).output();
            }
            std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
            if !macos {
                let _ = Command::new("systemctl").arg("daemon-reload").output();
            }
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
}
