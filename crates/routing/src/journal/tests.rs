use super::*;
use crate::{MemoryTable, RouteEntry};

fn jr(dest: &str, ifindex: u32, ifname: &str) -> JournaledRoute {
    JournaledRoute { route: Route::via_interface(dest.parse().expect("test CIDR"), ifindex), ifname: ifname.into() }
}

fn entry(j: &JournaledRoute) -> RouteEntry {
    RouteEntry { route: j.route.clone(), ifname: j.ifname.clone(), scoped: false }
}

/// What a daemon killed with SIGKILL leaves: a journal, an unlocked lock file.
fn leave_crashed(dir: &Path, name: &str, routes: Vec<JournaledRoute>) {
    let state = JournalState {
        version: VERSION,
        name: name.into(),
        pid: 999_999,
        started: 1,
        interface: Some("tun7".into()),
        routes,
    };
    write_state(&dir.join(format!("{name}.journal")), &state).expect("write");
    File::create(dir.join(format!("{name}.lock"))).expect("lock file");
}

#[test]
fn names_are_checked() {
    for bad in ["", ".hidden", "a/b", "x y", &"n".repeat(65)] {
        assert!(!valid_name(bad), "{bad:?}");
    }
    for good in ["default", "prod-eu.1", "A_b"] {
        assert!(valid_name(good), "{good:?}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(matches!(Journal::open(dir.path(), "../x"), Err(JournalError::BadName(_))));
}

#[test]
fn second_open_of_a_live_name_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, leftover) = Journal::open(dir.path(), "prod").expect("open");
    assert!(leftover.is_none());
    let err = Journal::open(dir.path(), "prod").expect_err("in use");
    assert!(matches!(err, JournalError::InUse { .. }), "{err}");
    assert!(Journal::open(dir.path(), "dev").is_ok(), "other names are independent");
    drop(first);
    assert!(Journal::open(dir.path(), "prod").is_ok(), "free again once the owner is gone");
}

#[test]
fn journal_records_before_and_forgets_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut j, _) = Journal::open(dir.path(), "t").expect("open");
    j.set_interface("tun0").expect("iface");
    j.record_add(&jr("10.0.0.0/8", 5, "tun0")).expect("add");
    let on_disk = read_state(&dir.path().join("t.journal")).expect("read").expect("exists");
    assert_eq!(on_disk.routes, vec![jr("10.0.0.0/8", 5, "tun0")]);
    assert_eq!(on_disk.interface.as_deref(), Some("tun0"));
    assert_eq!(on_disk.pid, std::process::id());
    j.record_removed(&jr("10.0.0.0/8", 5, "tun0").route).expect("remove");
    drop(j);
    assert_eq!(fs::read_dir(dir.path()).expect("dir").count(), 0, "nothing left behind");
}

#[test]
fn cleanup_removes_exactly_the_journaled_routes_of_dead_daemons() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pin = JournaledRoute {
        route: Route {
            dest: "10.1.2.3/32".parse().expect("net"),
            gateway: Some("192.168.1.1".parse().expect("gw")),
            ifindex: 2,
        },
        ifname: "en0".into(),
    };
    let gone = jr("10.0.0.0/8", 7, "tun7");
    let renamed = jr("172.16.0.0/12", 3, "tun7");
    leave_crashed(dir.path(), "crashed", vec![pin.clone(), gone.clone(), renamed.clone()]);
    let (mut live, _) = Journal::open(dir.path(), "live").expect("open");
    live.record_add(&jr("192.168.50.0/24", 8, "tun8")).expect("add");

    let other = RouteEntry {
        route: Route {
            dest: "0.0.0.0/0".parse().expect("net"),
            gateway: Some("192.168.1.1".parse().expect("gw")),
            ifindex: 2,
        },
        ifname: "en0".into(),
        scoped: false,
    };
    // The table: the pin is still there, the tun route died with the device, and
    // ifindex 3 now belongs to a different interface with a same-looking route.
    let mut foreign = entry(&renamed);
    foreign.ifname = "eth3".into();
    let live_route = entry(&jr("192.168.50.0/24", 8, "tun8"));
    let mut table = MemoryTable::new(vec![other.clone(), entry(&pin), foreign.clone(), live_route.clone()]);

    let report = cleanup_stale(dir.path(), &mut table, None).expect("cleanup");
    assert_eq!(report.journals, vec!["crashed".to_string()]);
    assert_eq!(report.removed, vec![pin.clone()]);
    assert_eq!(report.already_gone, vec![renamed, gone]);
    assert_eq!(report.running, vec!["live".to_string()]);
    assert!(report.failed.is_empty() && report.unreadable.is_empty());
    assert_eq!(table.entries(), vec![other, foreign, live_route]);
    assert!(!dir.path().join("crashed.journal").exists());
    assert!(!dir.path().join("crashed.lock").exists());
    assert!(dir.path().join("live.journal").exists());
    drop(live);
}

#[test]
fn failed_cleanup_keeps_what_is_left_and_a_rerun_finishes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = jr("10.0.0.0/8", 7, "tun7");
    let b = jr("172.16.0.0/12", 7, "tun7");
    leave_crashed(dir.path(), "x", vec![a.clone(), b.clone()]);
    let mut table = MemoryTable::new(vec![entry(&a), entry(&b)]);
    table.fail_delete(0, nix::libc::EBUSY);
    let report = cleanup_stale(dir.path(), &mut table, None).expect("cleanup");
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].0, b);
    assert_eq!(report.removed, vec![a]);
    assert!(report.journals.is_empty());
    let report = cleanup_stale(dir.path(), &mut table, None).expect("second cleanup");
    assert_eq!(report.removed, vec![b]);
    assert_eq!(report.journals, vec!["x".to_string()]);
    assert!(table.entries().is_empty());
}

#[test]
fn open_hands_back_a_dead_owners_leftovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    leave_crashed(dir.path(), "prod", vec![jr("10.0.0.0/8", 7, "tun7")]);
    let (j, leftover) = Journal::open(dir.path(), "prod").expect("open");
    assert_eq!(leftover.expect("leftover").routes, vec![jr("10.0.0.0/8", 7, "tun7")]);
    assert_eq!(j.state().routes.len(), 1, "still journaled until cleaned");
}

#[test]
fn corrupt_and_foreign_files_are_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("bad.journal"), b"{not json").expect("write");
    fs::write(dir.path().join("notes.txt"), b"hello").expect("write");
    let mut table = MemoryTable::new(vec![]);
    let report = cleanup_stale(dir.path(), &mut table, None).expect("cleanup");
    assert_eq!(report.unreadable.len(), 1, "{report:?}");
    assert!(dir.path().join("bad.journal").exists());
    assert!(dir.path().join("notes.txt").exists());
    assert_eq!(table.ops(), vec![]);
}

#[test]
fn only_cleans_the_named_tunnel() {
    let dir = tempfile::tempdir().expect("tempdir");
    leave_crashed(dir.path(), "a", vec![]);
    leave_crashed(dir.path(), "b", vec![]);
    let mut table = MemoryTable::new(vec![]);
    let report = cleanup_stale(dir.path(), &mut table, Some("b")).expect("cleanup");
    assert_eq!(report.journals, vec!["b".to_string()]);
    assert!(dir.path().join("a.journal").exists());
}

#[test]
fn group_writable_run_dir_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    fs::create_dir(&run).expect("mkdir");
    fs::set_permissions(&run, fs::Permissions::from_mode(0o777)).expect("chmod");
    assert!(matches!(Journal::open(&run, "t"), Err(JournalError::UnsafeDir { .. })));
}
