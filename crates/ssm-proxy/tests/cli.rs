//! The command line's own outputs: completions and man pages.

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
