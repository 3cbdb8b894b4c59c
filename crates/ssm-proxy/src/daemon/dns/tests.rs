use super::*;

fn d(s: &str) -> Domain {
    Domain::parse(s).expect("domain")
}

fn server() -> IpAddr {
    "100.127.0.2".parse().expect("addr")
}

/// A temporary root with a run directory and a resolver directory.
fn root() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempfile::tempdir().expect("tempdir");
    let run = t.path().join("run");
    std::fs::create_dir_all(&run).expect("run dir");
    let resolver = t.path().join("etc/resolver");
    (t, run, resolver)
}

#[test]
fn the_plan_refuses_domains_that_hold_the_tunnels_own_endpoints() {
    for bad in ["amazonaws.com", "eu-west-1.amazonaws.com", "ssm.eu-west-1.amazonaws.com"] {
        let e = plan(&[d(bad)], false, "eu-west-1", &[]).expect_err(bad).to_string();
        assert!(e.contains("the tunnel itself needs"), "{e}");
    }
    let e = plan(&[d("example.net")], false, "eu-west-1", &["api.example.net".into()]).expect_err("own host");
    assert!(e.to_string().contains("api.example.net"), "{e}");
    let ok = plan(&[d("corp.internal"), d("Corp.Internal")], false, "eu-west-1", &[]).expect("plan");
    assert_eq!(ok, vec![d("corp.internal")]);
}

#[test]
fn dns_auto_adds_the_regions_internal_domain_and_eks() {
    let p = plan(&[], true, "eu-west-1", &[]).expect("plan");
    assert_eq!(p, vec![d("eu-west-1.compute.internal"), d("eks.amazonaws.com")]);
    let p = plan(&[d("corp.internal")], true, "us-east-1", &[]).expect("plan");
    assert_eq!(p, vec![d("corp.internal"), d("ec2.internal"), d("eks.amazonaws.com")]);
}

#[test]
fn private_zones_join_the_domains_unless_they_would_capture_our_own_endpoints() {
    let mut domains = vec![d("ec2.internal"), d("corp.internal")];
    let zones: Vec<String> = [
        "corp.internal",
        "db.example",
        "amazonaws.com",
        "eu-west-1.amazonaws.com",
        "bad..name",
        "route53.amazonaws.com",
    ]
    .iter()
    .map(|z| z.to_string())
    .collect();
    let added = add_zones(&mut domains, &zones, "eu-west-1", &[]);
    assert_eq!(added, vec![d("db.example")]);
    assert_eq!(domains, vec![d("ec2.internal"), d("corp.internal"), d("db.example")]);
    // A zone holding a configured endpoint host is left out too.
    let added = add_zones(&mut domains, &["lab.test".to_string()], "eu-west-1", &["api.lab.test".to_string()]);
    assert_eq!(added, vec![]);
}

#[test]
fn resolvectl_gets_a_server_routing_domains_and_no_default_route() {
    let c = resolvectl_commands("tun3", server(), &[d("corp.internal"), d("ec2.internal")]);
    assert_eq!(
        c,
        vec![
            vec!["dns", "tun3", "100.127.0.2"],
            vec!["domain", "tun3", "~corp.internal", "~ec2.internal"],
            vec!["default-route", "tun3", "false"],
        ]
    );
}

#[cfg(target_os = "linux")]
#[test]
fn systemd_resolved_is_detected_by_its_runtime_directory() {
    let t = tempfile::tempdir().expect("tempdir");
    assert_eq!(detect(t.path()), Backend::Unsupported);
    std::fs::create_dir_all(t.path().join("run/systemd/resolve")).expect("dir");
    assert_eq!(detect(t.path()), Backend::Unsupported);
    std::fs::write(t.path().join("run/systemd/resolve/io.systemd.Resolve"), "").expect("socket stand-in");
    assert_eq!(detect(t.path()), Backend::Resolved);
}

#[test]
fn resolver_files_are_written_journaled_and_removed() {
    let (_t, run, dir) = root();
    let mut setup = configure(
        Backend::ResolverDir(dir.clone()),
        &run,
        "prod",
        "utun7",
        server(),
        &[d("corp.internal"), d("ec2.internal")],
    )
    .expect("configure");
    let text = std::fs::read_to_string(dir.join("corp.internal")).expect("file");
    assert!(text.starts_with("# written by ssm-proxy for tunnel \"prod\""), "{text}");
    assert!(text.contains("\nnameserver 100.127.0.2\n"), "{text}");
    assert!(dir.join("ec2.internal").exists());
    let journal = std::fs::read_to_string(run.join("prod.dns.json")).expect("journal");
    assert!(journal.contains("corp.internal") && journal.contains("ec2.internal"), "{journal}");
    setup.undo();
    assert!(!dir.join("corp.internal").exists());
    assert!(!dir.join("ec2.internal").exists());
    assert!(!run.join("prod.dns.json").exists());
}

#[test]
fn files_we_did_not_write_are_never_touched() {
    let (_t, run, dir) = root();
    std::fs::create_dir_all(&dir).expect("dir");
    let theirs = "nameserver 10.9.9.9\n";
    std::fs::write(dir.join("corp.internal"), theirs).expect("user file");
    // Another tunnel's file is not ours either.
    std::fs::write(dir.join("ec2.internal"), "# written by ssm-proxy for tunnel \"other\"\nnameserver 1.2.3.4\n")
        .expect("other tunnel");
    let setup = configure(
        Backend::ResolverDir(dir.clone()),
        &run,
        "prod",
        "utun7",
        server(),
        &[d("corp.internal"), d("ec2.internal"), d("db.example")],
    )
    .expect("configure");
    assert_eq!(std::fs::read_to_string(dir.join("corp.internal")).expect("file"), theirs);
    assert!(std::fs::read_to_string(dir.join("ec2.internal")).expect("file").contains("\"other\""));
    assert!(ours(&dir.join("db.example"), "prod"));
    drop(setup);
    assert_eq!(std::fs::read_to_string(dir.join("corp.internal")).expect("file"), theirs);
    assert!(dir.join("ec2.internal").exists());
    assert!(!dir.join("db.example").exists());
}

#[test]
fn a_file_edited_after_we_wrote_it_is_left_alone() {
    let (_t, run, dir) = root();
    let setup = configure(Backend::ResolverDir(dir.clone()), &run, "prod", "utun7", server(), &[d("corp.internal")])
        .expect("c");
    std::fs::write(dir.join("corp.internal"), "nameserver 10.1.1.1\n").expect("edit");
    drop(setup);
    assert_eq!(std::fs::read_to_string(dir.join("corp.internal")).expect("file"), "nameserver 10.1.1.1\n");
}

#[test]
fn after_a_crash_cleanup_removes_the_files_of_dead_tunnels_only() {
    let (_t, run, dir) = root();
    let dead = configure(Backend::ResolverDir(dir.clone()), &run, "dead", "utun7", server(), &[d("corp.internal")])
        .expect("dead");
    let alive = configure(Backend::ResolverDir(dir.clone()), &run, "alive", "utun8", server(), &[d("ec2.internal")])
        .expect("alive");
    // A crash: nothing undone.
    std::mem::forget(dead);
    assert!(dir.join("corp.internal").exists());
    let cleaned = cleanup_stale(&run, &["alive".to_string()], None);
    assert_eq!(cleaned, vec!["dead".to_string()]);
    assert!(!dir.join("corp.internal").exists());
    assert!(!run.join("dead.dns.json").exists());
    assert!(dir.join("ec2.internal").exists(), "a running tunnel's file was removed");
    assert!(run.join("alive.dns.json").exists());
    // `--name` limits it to one tunnel.
    std::mem::forget(alive);
    assert!(cleanup_stale(&run, &[], Some("other")).is_empty());
    assert!(dir.join("ec2.internal").exists());
    assert_eq!(cleanup_stale(&run, &[], Some("alive")), vec!["alive".to_string()]);
    assert!(!dir.join("ec2.internal").exists());
}

#[test]
fn a_crash_between_journal_and_file_leaves_nothing_for_cleanup_to_break() {
    // The journal lists a file that was never written (the crash came first).
    let (_t, run, dir) = root();
    std::fs::create_dir_all(&dir).expect("dir");
    let j = Journal { version: 1, name: "prod".into(), files: vec![dir.join("corp.internal")] };
    write_journal(&run.join("prod.dns.json"), &j).expect("journal");
    assert_eq!(cleanup_stale(&run, &[], None), vec!["prod".to_string()]);
    assert!(!run.join("prod.dns.json").exists());
}
