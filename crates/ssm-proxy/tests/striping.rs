//! Striped sessions, end to end in the namespace lab with the stock agent's
//! pacing (one 1024-byte message per millisecond per session): one tunnel over
//! four SSM sessions, whole and intact through a member's websocket being
//! recycled, a member 30 ms slower than the others, and a member's session
//! terminated under an open psql. Root only; each test builds its own lab.

mod labkit;
mod netns;

use labkit::*;
use std::time::Duration;

const STOCK: (&str, &str) = ("PROFILE", "stock");

/// Members up and each member's state, from `status --json`.
fn members(s: &serde_json::Value) -> Vec<String> {
    s["members"]
        .as_array()
        .map(|m| m.iter().map(|m| m["state"].as_str().unwrap_or("").to_string()).collect())
        .unwrap_or_default()
}

/// 20 MiB down and 20 MiB up through four sessions, checked byte for byte,
/// with `emulator_args` hurting one member; the status after both.
fn both_ways(tag: &str, emulator_args: &str) -> serde_json::Value {
    let lab = Lab::up(&prefix(tag), 20, &[STOCK, ("EMULATOR_ARGS", emulator_args)]);
    let mut daemon = lab.start(&["--sessions", "4"]);
    let s = wait_status(&lab, Duration::from_secs(30), |s| members(s).iter().all(|m| m == "connected"));
    assert_eq!(members(&s), ["connected"; 4], "{s}");
    let down = lab.fetch_blob(120);
    let up = lab.upload_blob(120);
    let s = tunnel_status(&lab);
    eprintln!(
        "4 sessions, {emulator_args:?}: 20 MiB down at {:.2} MB/s, up at {:.2} MB/s; status {s}",
        down / 1e6,
        up / 1e6
    );
    lab.stop(&mut daemon, "lab");
    s
}

#[test]
fn four_sessions_carry_20_mib_each_way_intact() {
    if !require_root("four_sessions_carry_20_mib_each_way_intact") {
        return;
    }
    let s = both_ways("sa", "");
    // Every member carried part of the download (the agent spread it).
    for m in s["members"].as_array().expect("members") {
        assert!(m["received_bytes"].as_u64().unwrap_or(0) > 1 << 20, "{m}");
    }
}

#[test]
fn a_member_whose_websocket_closes_every_three_seconds_loses_nothing() {
    if !require_root("a_member_whose_websocket_closes_every_three_seconds_loses_nothing") {
        return;
    }
    let s = both_ways("sc", "--close-every 3 --fault-session 2");
    assert_eq!(s["state"], "connected", "{s}");
}

#[test]
fn a_member_30_ms_slower_than_the_others_is_put_back_in_order() {
    if !require_root("a_member_30_ms_slower_than_the_others_is_put_back_in_order") {
        return;
    }
    let s = both_ways("sd", "--delay-ms 30 --fault-session 2");
    assert!(s["reordered"].as_u64().unwrap_or(0) > 0, "a slower member reorders packets: {s}");
}

#[test]
fn psql_survives_the_loss_of_one_member_session() {
    if !require_root("psql_survives_the_loss_of_one_member_session") {
        return;
    }
    let lab = Lab::up(&prefix("sp"), 1, &[STOCK]);
    let mut daemon = lab.start(&["--sessions", "4"]);
    let s = wait_status(&lab, Duration::from_secs(30), |s| members(s).iter().all(|m| m == "connected"));
    let mut psql = Psql::open(&lab);
    let before = psql.backend_pid(Duration::from_secs(10));
    let victim = s["members"][1]["session_id"].as_str().expect("member 2's session").to_string();

    // The service ends member 2's session (an administrator's TerminateSession).
    lab.terminate_session(&victim);
    // psql answers at once, over the other members, while member 2 is replaced.
    for _ in 0..5 {
        assert_eq!(psql.backend_pid(Duration::from_secs(5)), before, "the same backend, so the same connection");
    }
    let s = wait_status(&lab, Duration::from_secs(30), |s| {
        s["members"][1]["replacements"] == 1 && members(s).iter().all(|m| m == "connected")
    });
    assert_eq!(s["members"][1]["replacements"], 1, "{s}");
    assert_ne!(s["members"][1]["session_id"], victim.as_str(), "{s}");
    assert_eq!(s["session_id"], s["members"][0]["session_id"], "member 1 is untouched: {s}");
    assert_eq!(psql.backend_pid(Duration::from_secs(5)), before);
    assert!(lab.log("agent.log").contains("one of the client's connections ended"), "{}", lab.log("agent.log"));
    drop(psql);
    lab.stop(&mut daemon, "lab");
}

#[test]
fn every_member_session_carries_the_reason() {
    if !require_root("every_member_session_carries_the_reason") {
        return;
    }
    let lab = Lab::up(&prefix("sr"), 1, &[]);
    let reason = "INC-42: checking the replicas";
    let mut daemon = lab.start(&["--sessions", "3", "--reason", reason]);
    let s = wait_status(&lab, Duration::from_secs(30), |s| members(s).iter().all(|m| m == "connected"));
    assert_eq!(members(&s), ["connected"; 3], "{s}");
    let log = lab.log("emulator.log");
    let starts: Vec<&str> = log.lines().filter(|l| l.contains("StartSession")).collect();
    assert_eq!(starts.len(), 3, "{log}");
    assert!(starts.iter().all(|l| l.contains(reason)), "every StartSession carries the reason: {starts:?}");
    lab.stop(&mut daemon, "lab");
}
