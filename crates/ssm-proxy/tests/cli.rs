//! The command line's own outputs: completions, man pages and service files.

use std::process::{Command, Output};

fn ssm_proxy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ssm-proxy")).args(args).output().expect("run ssm-proxy")
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn completions_cover_every_command_and_option_for_each_shell() {
    let bash = stdout(&ssm_proxy(&["completions", "bash"]));
    for word in ["start", "status", "stop", "cleanup", "forward", "--instance-id", "--cidr", "--dns-domain"] {
        assert!(bash.contains(word), "bash completion lacks {word}");
    }
    assert!(stdout(&ssm_proxy(&["completions", "zsh"])).starts_with("#compdef ssm-proxy"));
    let fish = stdout(&ssm_proxy(&["completions", "fish"]));
    assert!(fish.contains("complete -c ssm-proxy") && fish.contains("dns-domain"), "{fish}");
    let bad = ssm_proxy(&["completions", "tcsh"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("possible values"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn the_man_page_is_roff_and_one_page_per_command_can_be_written() {
    let page = stdout(&ssm_proxy(&["man"]));
    assert!(page.contains(".TH ssm-proxy 1"), "{page}");
    assert!(page.contains("SUBCOMMANDS") && page.contains("ssm\\-proxy\\-start"), "{page}");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("man1");
    stdout(&ssm_proxy(&["man", "--dir", d.to_str().expect("path")]));
    let start = std::fs::read_to_string(d.join("ssm-proxy-start.1")).expect("start page");
    assert!(start.contains("\\-\\-dns\\-domain"), "{start}");
    assert!(start.contains("Examples"), "the examples are missing: {start}");
    for cmd in ["forward", "status", "stop", "cleanup"] {
        assert!(d.join(format!("ssm-proxy-{cmd}.1")).exists(), "{cmd}");
    }
}

#[test]
fn the_systemd_unit_for_a_configured_tunnel_passes_systemd_analyze_verify() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        assert!(
            std::env::var("SSM_PROXY_ROOT_TESTS").as_deref() != Ok("require"),
            "systemd-analyze is missing (scripts/ensure-deps.sh installs it)"
        );
        eprintln!("skipped: no systemd-analyze");
        return;
    }
    let dir = std::env::temp_dir().join(format!("ssm-proxy-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("config.toml");
    std::fs::write(&config, "[tunnel.prod]\ninstance_id = \"i-0123456789abcdef0\"\ncidrs = [\"10.0.0.0/16\"]\n")
        .expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_ssm-proxy"))
        .args(["service", "install", "prod", "--print"])
        .env("SSM_PROXY_CONFIG", &config)
        .output()
        .expect("run ssm-proxy");
    let unit = stdout(&out);
    assert!(unit.contains(&format!("ExecStart={} start prod", env!("CARGO_BIN_EXE_ssm-proxy"))), "{unit}");
    assert!(unit.contains(&format!("Environment=SSM_PROXY_CONFIG={}", config.display())), "{unit}");
    let path = dir.join("ssm-proxy-prod.service");
    std::fs::write(&path, &unit).expect("unit");
    let verify = Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("systemd-analyze");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );

    // A tunnel that is not in the config file is an error naming the file.
    let missing = Command::new(env!("CARGO_BIN_EXE_ssm-proxy"))
        .args(["service", "install", "staging", "--print"])
        .env("SSM_PROXY_CONFIG", "/nonexistent/config.toml")
        .output()
        .expect("run ssm-proxy");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no tunnel named \"staging\""));
}

#[test]
fn a_session_count_outside_1_to_16_is_refused_before_anything_starts() {
    for n in ["0", "17", "four"] {
        let o = ssm_proxy(&["start", "--instance-id", "i-0abc123def4567890", "--cidr", "10.0.0.0/16", "--sessions", n]);
        assert!(!o.status.success(), "--sessions {n} was accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("--sessions"), "the error must name the option: {err}");
    }
}
