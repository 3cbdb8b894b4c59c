use super::super::remote::{base64_lines, quote, Done, Markers};
use super::*;

fn layout() -> Layout {
    Layout { prefix: "/usr/local".into(), port: 7302 }
}

fn probe_text() -> &'static str {
    "os=Linux\narch=aarch64\nsudo=yes\nsystemd=yes\nhave=base64\nhave=gzip\nhave=sha256sum\nhave=mktemp\n\
     have=install\nhave=setsid\nhave=setpriv\ninstalled_sha256=abc\ninstalled_version=ec2-agent 0.1.0\nunit=yes\n\
     active=inactive\n"
}

#[test]
fn the_probe_is_read_from_its_key_value_lines() {
    // Noise a shell profile may print is ignored.
    let p = Probe::parse(&format!("Welcome!\n{}", probe_text()));
    assert_eq!((p.os.as_str(), p.arch.as_str(), p.sudo.as_str()), ("Linux", "aarch64", "yes"));
    assert!(p.systemd && p.unit && p.has("gzip") && !p.has("curl"));
    assert_eq!(p.installed_sha256.as_deref(), Some("abc"));
    assert_eq!(p.installed_version.as_deref(), Some("ec2-agent 0.1.0"));
    assert_eq!((p.active.as_deref(), p.pid), (Some("inactive"), None));
    let bare = Probe::parse("os=Linux\narch=x86_64\nsudo=root\nsystemd=no\ninstalled_sha256=\npid=4242\n");
    assert_eq!((bare.installed_sha256, bare.pid, bare.systemd), (None, Some(4242), false));
}

#[test]
fn root_work_needs_root_or_passwordless_sudo() {
    let mut p = Probe::parse(probe_text());
    assert_eq!(p.root_prefix("i-1").expect("allowed"), "sudo -n ");
    p.sudo = "root".into();
    assert_eq!(p.root_prefix("i-1").expect("allowed"), "");
    p.sudo = "no".into();
    let e = p.root_prefix("i-1").expect_err("refused").to_string();
    assert!(e.contains("may not use sudo without a password"), "{e}");
}

#[test]
fn the_plan_follows_what_is_installed() {
    let mut p = Probe::parse(probe_text());
    // Nothing there: install.
    let none = Probe { installed_sha256: None, ..p.clone() };
    assert_eq!(plan(&none, "abc", false, false, "i-1").expect("a plan"), Plan::Install { replace: false });
    // Ours, unit present, not running: start it. Running: nothing.
    assert_eq!(plan(&p, "abc", false, false, "i-1").expect("a plan"), Plan::Start);
    p.active = Some("active".into());
    assert_eq!(plan(&p, "abc", false, false, "i-1").expect("a plan"), Plan::Nothing);
    // Ours without its unit: the full install writes it.
    let no_unit = Probe { unit: false, active: None, ..p.clone() };
    assert_eq!(plan(&no_unit, "abc", false, false, "i-1").expect("a plan"), Plan::Install { replace: false });
    // Without systemd the pid is what counts.
    assert_eq!(plan(&p, "abc", false, true, "i-1").expect("a plan"), Plan::Start);
    let running = Probe { pid: Some(7), ..p.clone() };
    assert_eq!(plan(&running, "abc", false, true, "i-1").expect("a plan"), Plan::Nothing);
    // Another build: only with --upgrade.
    let e = plan(&p, "def", false, false, "i-1").expect_err("refused").to_string();
    assert!(e.contains("already has another ec2-agent (ec2-agent 0.1.0)") && e.contains("--upgrade"), "{e}");
    assert_eq!(plan(&p, "def", true, false, "i-1").expect("a plan"), Plan::Install { replace: true });
}

#[test]
fn instances_we_cannot_install_on_are_refused_with_the_reason() {
    let ok = Probe::parse(probe_text());
    assert!(check_instance(&ok, false, "i-1").is_ok());
    let err = |p: &Probe, no_systemd| check_instance(p, no_systemd, "i-1").expect_err("refused").to_string();
    let win = Probe { os: "MINGW64_NT".into(), ..ok.clone() };
    assert!(err(&win, false).contains("runs on Linux"));
    let arm32 = Probe { arch: "armv7l".into(), ..ok.clone() };
    assert!(err(&arm32, false).contains("architecture \"armv7l\""));
    let no_systemd = Probe { systemd: false, ..ok.clone() };
    let e = err(&no_systemd, false);
    assert!(e.contains("has no systemd") && e.contains("--no-systemd"), "{e}");
    assert!(check_instance(&no_systemd, true, "i-1").is_ok());
    let bare = Probe { tools: vec!["base64".into(), "install".into()], ..ok };
    let e = err(&bare, true);
    assert!(e.contains("lacks sha256sum, mktemp, setsid, setpriv"), "{e}");
}

#[test]
fn the_unit_is_the_shipped_one_with_our_path_and_port() {
    let unit = systemd_unit(&Layout { prefix: "/opt/ssm".into(), port: 7302 });
    let exec: Vec<&str> = unit.lines().filter(|l| l.starts_with("ExecStart=")).collect();
    assert_eq!(exec, ["ExecStart=/opt/ssm/bin/ec2-agent --listen 127.0.0.1:7302 --log-format json"]);
    assert!(unit.contains("written by `ssm-proxy agent install`") && !unit.contains("#   sudo"));
    // Everything else (the sandboxing above all) is the shipped unit's.
    for line in UNIT_TEMPLATE.lines().filter(|l| !l.starts_with('#') && !l.starts_with("ExecStart=")) {
        assert!(unit.lines().any(|u| u == line), "{line:?} missing");
    }
    assert!(unit.contains("DynamicUser=yes\n") && unit.contains("[Install]\nWantedBy=multi-user.target\n"));
}

#[test]
fn scripts_quote_paths_and_use_the_root_prefix() {
    let l = Layout { prefix: "/opt/it's here".into(), port: 7302 };
    let s = install_script(&l, "sudo -n ", Some("/tmp/ssm-proxy.AB"), None);
    assert!(s.starts_with("set -e\n"));
    assert!(s.contains("sudo -n install -m 0755 '/tmp/ssm-proxy.AB' '/opt/it'\\''s here/bin/ec2-agent'.new"), "{s}");
    assert!(s.contains("--reuid=nobody") && s.contains("127.0.0.1:7302"), "{s}");
    // The sent file is removed on every exit of the script.
    assert!(s.contains("trap 'rm -f '\\''/tmp/ssm-proxy.AB'\\''' EXIT\n"), "{s}");
    // With a unit: systemctl, no background process.
    let s = install_script(&layout(), "", None, Some("/tmp/u"));
    assert!(s.contains("install -m 0644 '/tmp/u' /etc/systemd/system/ec2-agent.service"), "{s}");
    assert!(s.contains("systemctl restart ec2-agent.service") && !s.contains("setpriv"), "{s}");
    assert!(!s.contains("install -m 0755"), "no binary to install: {s}");
    let u = uninstall_script(&layout(), "sudo -n ");
    assert!(u.contains("sudo -n systemctl disable --now ec2-agent.service"), "{u}");
    assert!(u.contains("sudo -n rm -f '/usr/local/bin/ec2-agent'"), "{u}");
    assert_eq!(quote("a'b"), "'a'\\''b'");
}

#[test]
fn elf_headers_tell_the_architecture() {
    let mut h = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0];
    h.resize(20, 0);
    h[18] = 62;
    assert_eq!(elf_arch(&h), Some("x86_64"));
    h[18] = 183;
    assert_eq!(elf_arch(&h), Some("aarch64"));
    h[18] = 40; // 32-bit ARM machine type
    assert_eq!(elf_arch(&h), None);
    h[18] = 62;
    h[4] = 1; // 32-bit class
    assert_eq!(elf_arch(&h), None);
    assert_eq!(elf_arch(b"#!/bin/sh\necho hi\n\0\0\0\0"), None);
    assert_eq!(elf_arch(b"\x7fELF"), None);
}

#[test]
fn agents_are_looked_for_next_to_ssm_proxy() {
    let c = candidates(Path::new("/opt/ssm-proxy/bin"), "aarch64");
    assert_eq!(c[0], Path::new("/opt/ssm-proxy/bin/ec2-agent-linux-aarch64"));
    assert_eq!(c[1], Path::new("/opt/ssm-proxy/bin/../lib/ssm-proxy/ec2-agent-linux-aarch64"));
    let native = candidates(Path::new("/x"), std::env::consts::ARCH);
    assert_eq!(native.last().expect("candidates") == Path::new("/x/ec2-agent"), cfg!(target_os = "linux"));
    let e = local_binary(Some(Path::new("/nonexistent/ec2-agent")), "x86_64").expect_err("refused").to_string();
    assert!(e.contains("cannot read /nonexistent/ec2-agent"), "{e}");
}

#[test]
fn markers_frame_a_command_and_ignore_the_echo_of_what_we_typed() {
    let m = Markers::new("n1");
    let typed = m.command("uname -m");
    // The typed text never contains a printed marker, so an echo cannot end a command.
    assert!(!typed.contains("SSMPX-n1-"), "{typed}");
    let mut buf = format!("{typed}SSMPX-n1-begin 0\nx86_64\n\nSSMPX-n1-done 0\n# ");
    assert_eq!(m.take_done(&mut buf), Some(Done { code: 0, output: "x86_64\n".into() }));
    assert_eq!(buf, "# ", "what follows stays");
    // Output without a final newline, a failure, and a done that has not fully arrived.
    let mut buf = "SSMPX-n1-begin 0\nno such file\nSSMPX-n1-done 2\n".to_string();
    assert_eq!(m.take_done(&mut buf), Some(Done { code: 2, output: "no such file".into() }));
    let mut partial = "SSMPX-n1-begin 0\nabc\n\nSSMPX-n1-done 1".to_string();
    assert_eq!(m.take_done(&mut partial), None);
    // Another session's markers are not ours.
    let mut other = "SSMPX-n2-begin 0\n\nSSMPX-n2-done 0\n".to_string();
    assert_eq!(m.take_done(&mut other), None);
    // Ready drops the banner and echo before it.
    let mut start = format!("Last login: today\n{}SSMPX-n1-ready 0\nrest", m.init());
    assert!(m.take_ready(&mut start));
    assert_eq!(start, "rest");
    // The receiver names its file before reading, and the done follows.
    let mut recv = "SSMPX-n1-begin 0\nSSMPX-n1-recv /tmp/ssm-proxy.AbC\n".to_string();
    assert_eq!(m.find_recv(&recv).as_deref(), Some("/tmp/ssm-proxy.AbC"));
    recv.push_str("\nSSMPX-n1-done 0\n");
    assert_eq!(m.take_done(&mut recv).map(|d| d.code), Some(0));
    assert!(m.receive(true).contains("base64 -d | gzip -dc > \"$T\""));
}

#[test]
fn base64_lines_are_short_and_decode_to_the_input() {
    use base64::Engine;
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 256) as u8).collect();
    let text = base64_lines(&data);
    assert!(text.lines().all(|l| l.len() <= 76) && text.ends_with('\n'));
    let joined: String = text.lines().collect();
    assert_eq!(base64::engine::general_purpose::STANDARD.decode(joined).expect("base64"), data);
    assert_eq!(base64_lines(b""), "");
}

#[test]
fn the_generated_unit_passes_systemd_analyze_verify() {
    use std::process::Command;
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        assert!(
            std::env::var("SSM_PROXY_ROOT_TESTS").as_deref() != Ok("require"),
            "systemd-analyze is missing (scripts/ensure-deps.sh installs it)"
        );
        eprintln!("skipped: no systemd-analyze");
        return;
    }
    // verify checks that ExecStart's program exists: a stand-in under a prefix of our own.
    let dir = std::env::temp_dir().join(format!("ssm-proxy-agent-unit-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("bin")).expect("dir");
    std::fs::copy("/bin/true", dir.join("bin/ec2-agent")).expect("stand-in");
    let unit = systemd_unit(&Layout { prefix: dir.to_str().expect("path").into(), port: 7302 });
    let path = dir.join("ec2-agent.service");
    std::fs::write(&path, unit).expect("unit");
    let verify = Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("systemd-analyze");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}
