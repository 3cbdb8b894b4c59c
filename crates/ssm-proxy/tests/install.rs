//! `ssm-proxy agent install` / `uninstall` in the namespace lab: the emulator
//! runs the shell sessions in the `instance` namespace, as the SSM agent runs
//! them on an instance, and the installed ec2-agent then carries a tunnel.
//! Root only. The lab has no systemd, so the agent is installed with
//! `--no-systemd` under a prefix inside the lab's directory.

mod labkit;
mod netns;
mod summary;

use labkit::*;
use summary::Summary;

use std::path::Path;
use std::process::Output;

const INSTANCE: &str = "i-0123456789abcdef0";

/// The agent's pid from its pid file, if that process is an ec2-agent.
fn installed_pid(root: &Path) -> Option<u32> {
    let pid = std::fs::read_to_string(root.join("var/ec2-agent/ec2-agent.pid")).ok()?;
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", pid.trim())).ok()?;
    cmdline.contains("ec2-agent").then(|| pid.trim().parse().ok())?
}

fn uid_of(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap_or("").split_whitespace().next().unwrap_or("").into()
}

/// The temporary files `agent install` makes on the instance (/tmp/ssm-proxy.XXXXXXXX).
fn sent_files() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/tmp")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    v.retain(|n| n.starts_with("ssm-proxy.") && n.len() == "ssm-proxy.".len() + 8);
    v.sort();
    v
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The install tests look at the instance's /tmp (the sent file is removed):
/// one at a time.
static ONE_INSTALL_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn agent_install_puts_a_working_agent_on_the_instance_through_ssm() {
    if !require_root("agent_install_puts_a_working_agent_on_the_instance_through_ssm") {
        return;
    }
    let _one = ONE_INSTALL_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // The instance's sh is bash, as on Amazon Linux: an interactive bash echoes
    // typed input through readline whatever stty says, the harder case for the
    // markers (the demo runs Debian's dash).
    let lab = Lab::up(&prefix("n"), 2, &[("EMULATOR_ARGS", "--shell i-0123456789abcdef0=bash")]);
    let root = lab.dir().join("instance-root");
    let root_s = root.to_str().expect("path").to_owned();
    // Each session's summary (at info) counts what the typed input cost.
    let sessions = std::cell::RefCell::new(Vec::new());
    let agent = |args: &[&str]| {
        let out = lab
            .laptop(env!("CARGO_BIN_EXE_ssm-proxy"))
            .args(args)
            .env("RUST_LOG", "warn,ssm_proxy=info")
            .output()
            .expect("run ssm-proxy");
        sessions.borrow_mut().extend(Summary::all(&text(&out)));
        out
    };
    let install = |extra: &[&str]| {
        let mut args = vec!["agent", "install", "--instance-id", INSTANCE, "--agent-port", "7302", "--prefix", &root_s];
        args.extend_from_slice(extra);
        agent(&args)
    };

    // The lab's instance has no systemd: refused with the way out, nothing sent.
    if !Path::new("/run/systemd/system").exists() {
        let out = install(&[]);
        assert!(!out.status.success());
        let t = text(&out);
        assert!(t.contains("has no systemd") && t.contains("--no-systemd"), "{t}");
        assert!(!root.join("bin/ec2-agent").exists());
    }

    // Installed (found next to ssm-proxy, as the native build), started as nobody, answering.
    let temps_before = sent_files();
    let out = install(&["--no-systemd"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("Installing") && t.contains("sending the ec2-agent: done"), "{t}");
    assert!(t.contains(&format!("answers on {INSTANCE} port 7302")), "{t}");
    let pid = installed_pid(&root).expect("the installed agent runs");
    assert_eq!(uid_of(pid), "65534", "runs as nobody");
    let sent = std::fs::read(root.join("bin/ec2-agent")).expect("installed binary");
    assert_eq!(sent, std::fs::read(bin_dir().join("ec2-agent")).expect("local agent"), "sent byte for byte");
    assert_eq!(sent_files(), temps_before, "the sent file was removed from /tmp");

    // Its status, through a Port session of its own.
    let t = text(&agent(&["agent", "status", "--instance-id", INSTANCE, "--agent-port", "7302"]));
    assert!(t.contains(&format!("on {INSTANCE} (listening on")) && t.contains(":7302)"), "{t}");

    // Again: nothing to do, same process.
    let t = text(&install(&["--no-systemd"]));
    assert!(t.contains("already runs this ec2-agent") && t.contains("nothing to do"), "{t}");
    assert_eq!(installed_pid(&root), Some(pid));

    // Another build replaces it only with --upgrade.
    let other = lab.dir().join("ec2-agent-other");
    let mut bytes = sent.clone();
    bytes.extend_from_slice(b"another build");
    std::fs::write(&other, &bytes).expect("other build");
    std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let other_s = other.to_str().expect("path");
    let out = install(&["--no-systemd", "--agent-binary", other_s]);
    assert!(!out.status.success() && text(&out).contains("pass --upgrade"), "{}", text(&out));
    assert_eq!(installed_pid(&root), Some(pid), "left alone");
    let out = install(&["--no-systemd", "--agent-binary", other_s, "--upgrade"]);
    assert!(out.status.success(), "{}", text(&out));
    let upgraded = installed_pid(&root).expect("the upgraded agent runs");
    assert_ne!(upgraded, pid);
    assert_eq!(std::fs::read(root.join("bin/ec2-agent")).expect("binary"), bytes);

    // A tunnel through the installed agent (the lab's own agent is stopped first).
    lab.kill_first_agent();
    let mut daemon = lab.start(&["--agent-port", "7302"]);
    let answer = ok(lab.laptop_out("psql", &["-h", "10.10.0.2", "-U", "postgres", "-tAc", "select 6 * 7"]), "psql");
    assert_eq!(answer, "42");
    lab.fetch_blob(60);
    lab.stop(&mut daemon, "lab");

    // Uninstall: stopped and removed; a second one finds nothing.
    let out = agent(&["agent", "uninstall", "--instance-id", INSTANCE, "--prefix", &root_s]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains(&format!("stopped pid {upgraded}")) && t.contains("removed"), "{t}");
    assert!(!root.join("bin/ec2-agent").exists() && installed_pid(&root).is_none());
    let t = text(&agent(&["agent", "uninstall", "--instance-id", INSTANCE, "--prefix", &root_s]));
    assert!(t.contains("nothing removed"), "{t}");
    // The emulator's shells start without a handshake, as amazon-ssm-agent's
    // do, and ack typed input only once the terminal took it: the 3.8 MB
    // binary went through as typed text, resent at most 2%.
    let sessions = sessions.into_inner();
    let total = sessions.iter().fold(Summary::default(), |a, s| Summary {
        messages_sent: a.messages_sent + s.messages_sent,
        distinct: a.distinct + s.distinct,
        resends: a.resends + s.resends,
    });
    eprintln!(
        "agent sessions: {} summaries, {total:?}, resend ratio {:.2}%",
        sessions.len(),
        100.0 * total.resend_ratio()
    );
    assert!(sessions.len() >= 5, "{sessions:?}");
    assert!(total.distinct > 2_000, "the binary was typed: {total:?}");
    assert!(total.resend_ratio() <= 0.02, "{total:?}");
    assert!(lab.log("emulator.log").contains("no handshake for this session type"), "{}", lab.log("emulator.log"));
    // The emulator ran each of those as a bash session in the instance namespace.
    assert!(lab.log("emulator.log").contains("program=bash"), "{}", lab.log("emulator.log"));
}

/// Session Manager preferences with KMS encryption make the agent demand the
/// KMS handshake on shell sessions: `agent install` still installs (its
/// typed binary encrypted), and `agent status` answers through a Port
/// session, which the stock agent does not encrypt.
#[test]
fn agent_install_works_when_session_manager_requires_kms() {
    if !require_root("agent_install_works_when_session_manager_requires_kms") {
        return;
    }
    let _one = ONE_INSTALL_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up(&prefix("k"), 1, &[("EMULATOR_ARGS", "--kms-key-id alias/ssm-sessions")]);
    let root = lab.dir().join("instance-root");
    let root_s = root.to_str().expect("path").to_owned();
    let run = |args: &[&str]| {
        lab.laptop(env!("CARGO_BIN_EXE_ssm-proxy"))
            .args(args)
            .env("RUST_LOG", "warn,ssm_proxy=info")
            .output()
            .expect("run")
    };
    let args =
        ["agent", "install", "--instance-id", INSTANCE, "--agent-port", "7302", "--prefix", &root_s, "--no-systemd"];
    let out = run(&args);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("GenerateDataKey"), "the shell session asked for KMS: {t}");
    let pid = installed_pid(&root).expect("the installed agent runs");
    assert_eq!(
        std::fs::read(root.join("bin/ec2-agent")).expect("binary"),
        std::fs::read(bin_dir().join("ec2-agent")).expect("local")
    );
    // The Port session of `agent status` is not encrypted: the stock agent leaves Port out.
    let out = run(&["agent", "status", "--instance-id", INSTANCE, "--agent-port", "7302"]);
    let t = text(&out);
    assert!(t.contains(&format!("on {INSTANCE} (listening on")), "{t}");
    assert!(!t.contains("GenerateDataKey"), "{t}");
    let log = lab.log("emulator.log");
    assert!(!log.contains("no handshake for this session type"), "with KMS every shell handshakes:\n{log}");
    let out = run(&["agent", "uninstall", "--instance-id", INSTANCE, "--prefix", &root_s]);
    assert!(out.status.success() && text(&out).contains(&format!("stopped pid {pid}")), "{}", text(&out));
}

/// A user whose IAM policy lacks the shell document learns which permission to add.
#[tokio::test(flavor = "multi_thread")]
async fn agent_install_without_the_shell_document_names_the_permission() {
    use ssm_emulator::config::{TEST_ACCESS_KEY, TEST_SECRET_KEY};
    let config = ssm_emulator::Config {
        denied_documents: vec!["SSM-SessionManagerRunShell".into()],
        ..ssm_emulator::Config::default()
    }
    .with_instance(INSTANCE, "127.0.0.1");
    let emulator = ssm_emulator::Emulator::start(config, "127.0.0.1:0".parse().expect("addr")).await.expect("emulator");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ssm-proxy"))
        // A binary that does not exist: should the refusal ever fail to come,
        // nothing could be installed on this machine.
        .args(["agent", "install", "--instance-id", INSTANCE, "--agent-binary", "/nonexistent/ec2-agent"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AWS_ENDPOINT_URL", emulator.endpoint_url())
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .await
        .expect("run ssm-proxy");
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains(&format!(
            "not authorized to perform ssm:StartSession on {INSTANCE} with SSM-SessionManagerRunShell"
        )),
        "{t}"
    );
    assert!(t.contains("allow ssm:StartSession on arn:aws:ssm:*:*:document/SSM-SessionManagerRunShell"), "{t}");
}
