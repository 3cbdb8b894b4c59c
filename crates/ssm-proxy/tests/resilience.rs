//! Resilience, end to end in the namespace lab: websockets recycled by the
//! service, outages of the laptop's network, sessions terminated, agents that
//! die, network changes, rotation, instances found by tag. Root only; each test
//! builds its own lab under its own prefix and tears it down.

mod labkit;
mod netns;

use labkit::*;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn a_download_survives_the_websocket_being_recycled_every_ten_seconds() {
    if !require_root("a_download_survives_the_websocket_being_recycled_every_ten_seconds") {
        return;
    }
    // The service ends every websocket with 1000 "Bye" after 10 s, as the real one
    // does after its own limits; the client resumes the session each time.
    let lab = Lab::up(&prefix("w"), 50, &[("EMULATOR_ARGS", "--close-every 10")]);
    let mut daemon = lab.start(&[]);
    // 1.5 MiB/s: the 50 MiB take about 33 s, across three recycles (curl's
    // limit is an average; it bursts at the start).
    let speed = lab.fetch_blob_limited(120, "1536K");
    let s = tunnel_status(&lab);
    eprintln!("50 MiB while the websocket is recycled every 10 s: {:.2} MB/s, status {s}", speed / 1e6);
    assert!(s["reconnects"].as_u64().unwrap_or(0) >= 2, "{s}");
    assert_eq!(s["state"], "connected", "{s}");
    lab.stop(&mut daemon, "lab");
}

#[test]
fn a_psql_connection_survives_a_thirty_second_outage() {
    if !require_root("a_psql_connection_survives_a_thirty_second_outage") {
        return;
    }
    let lab = Lab::up(&prefix("o"), 1, &[]);
    let mut daemon = lab.start(&[]);
    let mut psql = Psql::open(&lab);
    let before = psql.backend_pid(Duration::from_secs(10));

    // The laptop loses its network for 30 s: the far end of its link goes down.
    let link = |state: &str| {
        ok(
            Command::new("ip")
                .args(["-n", &lab.ns("wan"), "link", "set", &format!("{}-w0", lab.prefix), state])
                .output()
                .expect("ip"),
            "ip link",
        )
    };
    link("down");
    std::thread::sleep(Duration::from_secs(10));
    let during = tunnel_status(&lab);
    std::thread::sleep(Duration::from_secs(15));
    let later = tunnel_status(&lab);
    std::thread::sleep(Duration::from_secs(5));
    let logged_before_up = lab.log("daemon-lab.log").len();
    link("up");
    let t = Instant::now();
    let after = psql.backend_pid(Duration::from_secs(120));
    // The laptop's link lost its carrier: the daemon hears it from the kernel,
    // finds its websocket unanswered within 3 s and is reconnecting from then on.
    assert_eq!(during["state"], "reconnecting", "status 10 s into the outage: {during}");
    assert_eq!(later["state"], "reconnecting", "status 25 s into the outage: {later}");
    // When the link comes back the kernel tells the daemon, which retries at
    // once instead of waiting out its backoff; a retry already due in that
    // moment may win the race (reconnected before the change was read). The
    // kernel may report the carrier up to a second late (linkwatch), after
    // psql has already answered: wait for the daemon's line.
    let heard = |log: &str| log.get(logged_before_up..).is_some_and(|l| l.contains("INFO network changed ("));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut log = lab.log("daemon-lab.log");
    while !heard(&log) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        log = lab.log("daemon-lab.log");
    }
    assert!(heard(&log), "the daemon did not hear that the link came back: {log}");
    let raced = match (log.find("websocket reconnected"), log.rfind("INFO network changed (")) {
        (Some(reconnected), Some(last_change)) => reconnected < last_change,
        _ => false,
    };
    assert!(log.contains("network changed") && (log.contains("trying to reconnect now") || raced), "{log}");
    eprintln!("psql answered {:?} after the link came back; status during the outage: {during}", t.elapsed());
    assert_eq!(after, before, "the same backend, so the same connection");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = tunnel_status(&lab);
    while s["state"] != "connected" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        s = tunnel_status(&lab);
    }
    assert_eq!(s["state"], "connected", "{s}");
    assert!(s["reconnects"].as_u64().unwrap_or(0) >= 1, "{s}");
    drop(psql);
    lab.stop(&mut daemon, "lab");
}

#[test]
fn a_psql_connection_survives_the_session_being_terminated() {
    if !require_root("a_psql_connection_survives_the_session_being_terminated") {
        return;
    }
    let lab = Lab::up(&prefix("t"), 1, &[]);
    // One session: the agent must hand the flows over to the new one (with
    // several, the others keep them; striping.rs covers that).
    let mut daemon = lab.start(&["--sessions", "1"]);
    let mut psql = Psql::open(&lab);
    let before = psql.backend_pid(Duration::from_secs(10));
    let old = tunnel_status(&lab)["session_id"].as_str().expect("session id").to_string();

    // The service ends the session (as an administrator's TerminateSession or the
    // maximum session duration would): the daemon starts a new one to the same
    // instance, and the ec2-agent hands the flows of our client id back.
    lab.terminate_session(&old);
    let s =
        wait_status(&lab, Duration::from_secs(30), |s| s["session_id"] != old.as_str() && s["state"] == "connected");
    assert_eq!(s["state"], "connected", "{s}");
    assert_ne!(s["session_id"], old.as_str(), "{s}");
    assert_eq!(s["new_sessions"], 1, "{s}");
    assert_eq!(s["failovers"], 0, "{s}");
    let after = psql.backend_pid(Duration::from_secs(30));
    assert_eq!(after, before, "the same backend, so the same connection");
    assert!(lab.log("agent.log").contains("client resumed its session"), "{}", lab.log("agent.log"));
    drop(psql);
    lab.stop(&mut daemon, "lab");
}

#[test]
fn traffic_moves_to_the_second_instance_when_the_first_agent_dies() {
    if !require_root("traffic_moves_to_the_second_instance_when_the_first_agent_dies") {
        return;
    }
    let lab = Lab::up(&prefix("f"), 1, &[("SECOND_INSTANCE", "1")]);
    let env: std::collections::HashMap<_, _> = lab.env.iter().cloned().collect();
    let (first, second) = (env["LAB_INSTANCE"].as_str(), env["LAB_INSTANCE2"].as_str());
    let args = ["start", "--instance-id", first, "--instance-id", second, "--name", "lab", "--cidr", "10.10.0.0/16"];
    let mut daemon = lab.start_with("lab", &args, &[]);
    let get = || lab.laptop_out("curl", &["-sS", "-m", "2", "-o", "/dev/null", "http://10.10.0.2:8080/"]);
    ok(get(), "curl through the first instance");
    assert_eq!(tunnel_status(&lab)["instance_id"], first);

    // The first instance's ec2-agent dies.
    lab.kill_first_agent();
    let killed = Instant::now();
    let mut answered = None;
    while killed.elapsed() < Duration::from_secs(60) {
        if get().status.success() {
            answered = Some(killed.elapsed());
            break;
        }
    }
    let switch =
        answered.unwrap_or_else(|| panic!("no answer through the second instance:\n{}", lab.log("daemon-lab.log")));
    let s = wait_status(&lab, Duration::from_secs(10), |s| s["state"] == "connected");
    eprintln!(
        "traffic moved to the second instance {:.2} s after the first agent was killed; status {s}",
        switch.as_secs_f64()
    );
    assert_eq!(s["instance_id"], second, "{s}");
    assert_eq!(s["failovers"], 1, "{s}");
    assert_eq!(s["state"], "connected", "{s}");
    assert!(lab.log("daemon-lab.log").contains("failed over to another instance"), "{}", lab.log("daemon-lab.log"));
    lab.stop(&mut daemon, "lab");
}

#[test]
fn a_new_laptop_address_is_noticed_at_once_and_psql_carries_on() {
    if !require_root("a_new_laptop_address_is_noticed_at_once_and_psql_carries_on") {
        return;
    }
    let lab = Lab::up(&prefix("n"), 1, &[]);
    let mut daemon = lab.start(&[]);
    let mut psql = Psql::open(&lab);
    let before = psql.backend_pid(Duration::from_secs(10));

    // The laptop moves to another address (a new Wi-Fi network, a DHCP change):
    // the websocket, bound to the old one, can never answer again. The daemon
    // hears of it from the kernel and replaces the websocket at once, instead of
    // waiting for unanswered data to time out.
    let dev = format!("{}-l0", lab.prefix);
    let ip = |args: &[&str]| {
        ok(Command::new("ip").args(["-n", &lab.ns("laptop")]).args(args).output().expect("ip"), "ip");
    };
    let t = Instant::now();
    ip(&["addr", "del", "192.168.100.2/24", "dev", &dev]);
    ip(&["addr", "add", "192.168.100.3/24", "dev", &dev]);
    ip(&["route", "replace", "default", "via", "192.168.100.1"]);
    let s = wait_status(&lab, Duration::from_secs(30), |s| {
        s["reconnects"].as_u64().unwrap_or(0) >= 1 && s["state"] == "connected"
    });
    let reconnected = t.elapsed();
    let after = psql.backend_pid(Duration::from_secs(30));
    eprintln!("new websocket {reconnected:?} after the address changed; psql answered after {:?}", t.elapsed());
    assert_eq!(after, before, "the same backend, so the same connection");
    assert_eq!(s["state"], "connected", "{s}");
    let log = lab.log("daemon-lab.log");
    for line in ["network changed", "checking that the websocket still answers", "did not answer within"] {
        assert!(log.contains(line), "no {line:?} in the daemon's log:\n{log}");
    }
    drop(psql);
    lab.stop(&mut daemon, "lab");
}

#[test]
fn sessions_rotate_on_schedule_without_breaking_a_download_or_psql() {
    if !require_root("sessions_rotate_on_schedule_without_breaking_a_download_or_psql") {
        return;
    }
    let lab = Lab::up(&prefix("r"), 8, &[]);
    // A new session every 3 s, each opened before the old one is let go.
    let mut daemon = lab.start(&["--rotate-after", "3s"]);
    let mut psql = Psql::open(&lab);
    let before = psql.backend_pid(Duration::from_secs(10));
    // 8 MiB at 1 MiB/s: about 8 s, across two or three rotations; sha256 checked.
    let speed = lab.fetch_blob_limited(60, "1M");
    let s = wait_status(&lab, Duration::from_secs(20), |s| s["rotations"].as_u64().unwrap_or(0) >= 3);
    eprintln!("8 MiB across session rotations every 3 s: {:.2} MB/s; status {s}", speed / 1e6);
    assert!(s["rotations"].as_u64().unwrap_or(0) >= 3, "{s}");
    assert_eq!(s["new_sessions"], 0, "no session failed: {s}");
    assert_eq!(psql.backend_pid(Duration::from_secs(10)), before, "the same backend, so the same connection");
    let log = lab.log("daemon-lab.log");
    assert!(log.contains("session rotated"), "{log}");
    assert!(!log.contains("opening a new session"), "a rotation broke the link:\n{log}");
    // The service saw the old sessions ended.
    assert!(lab.log("emulator.log").matches("session ended").count() >= 3, "{}", lab.log("emulator.log"));
    drop(psql);
    lab.stop(&mut daemon, "lab");
}

#[test]
fn instances_found_by_tag_carry_the_tunnel_and_take_over_from_each_other() {
    if !require_root("instances_found_by_tag_carry_the_tunnel_and_take_over_from_each_other") {
        return;
    }
    let (first, second) = ("i-0123456789abcdef0", "i-0fedcba9876543210");
    let tags = format!("--tag {first}=Role=ssm-proxy --tag {second}=Role=ssm-proxy --tag {first}=Env=lab");
    let lab = Lab::up(&prefix("g"), 1, &[("SECOND_INSTANCE", "1"), ("EMULATOR_ARGS", &tags)]);

    // A tag nobody carries: a clear refusal before anything is set up.
    let none = lab.ssm_proxy(&["start", "--instance-tag", "Role=web", "--name", "lab", "--cidr", "10.10.0.0/16"]);
    assert!(!none.status.success());
    let said = text(&none);
    assert!(said.contains("no managed instance") && said.contains("Role=web"), "{said}");

    let args = ["start", "--instance-tag", "Role=ssm-proxy", "--name", "lab", "--cidr", "10.10.0.0/16"];
    let mut daemon = lab.start_with("lab", &args, &[]);
    let s = tunnel_status(&lab);
    assert_eq!(s["instances"], serde_json::json!([first, second]), "{s}");
    assert_eq!(s["instance_id"], first, "{s}");
    let get = || lab.laptop_out("curl", &["-sS", "-m", "2", "-o", "/dev/null", "http://10.10.0.2:8080/"]);
    ok(get(), "curl through the first instance");

    // The first instance's agent dies: the tunnel moves to the other tagged one.
    lab.kill_first_agent();
    let s = wait_status(&lab, Duration::from_secs(30), |s| s["instance_id"] == second && s["state"] == "connected");
    assert_eq!(s["instance_id"], second, "{s}");
    assert_eq!(s["failovers"], 1, "{s}");
    ok(get(), "curl through the second instance");
    lab.stop(&mut daemon, "lab");
}

/// The instance's ec2-agent killed under an open psql and a running download,
/// and restarted: the tunnel reconnects on its own; the download, silent on
/// the laptop's side, is reset by the daemon as soon as the new agent says it
/// holds none of the tunnel's flows (caps::FRESH); the psql connection is
/// reset when it next speaks; new connections work.
#[test]
fn an_agent_restarted_under_psql_resets_its_connection_and_the_tunnel_comes_back() {
    if !require_root("an_agent_restarted_under_psql_resets_its_connection_and_the_tunnel_comes_back") {
        return;
    }
    let lab = Lab::up(&prefix("r"), 2, &[]);
    let mut daemon = lab.start(&[]);
    let mut psql = Psql::open(&lab);
    psql.backend_pid(Duration::from_secs(10));
    // 2 MiB at 256 KiB/s: still running when the agent dies; without a reset
    // it would wait out its 120 s.
    let mut curl = lab.download_in_background("256K", 120);
    std::thread::sleep(Duration::from_secs(2));

    lab.kill_first_agent();
    std::thread::sleep(Duration::from_secs(2));
    lab.restart_first_agent();
    let restarted = Instant::now();
    let s = wait_status(&lab, Duration::from_secs(90), |s| s["state"] == "connected");
    let ended = exit_within(&mut curl, Duration::from_secs(30));
    let download_ended = restarted.elapsed();
    let lost = psql.lost_within(Duration::from_secs(90));
    eprintln!("agent restarted; tunnel {s}; the download ended {download_ended:?} after the restart ({ended:?}); psql lost its connection after {lost:?}");
    assert!(ended.is_some_and(|e| !e.success()), "the download hung or finished after its source died: {ended:?}");
    let resets = wait_status(&lab, Duration::from_secs(5), |s| s["flows_reset"].as_u64().unwrap_or(0) >= 1);
    assert!(resets["flows_reset"].as_u64().unwrap_or(0) >= 1, "{resets}");
    assert!(
        lost.is_some(),
        "the old psql connection hung instead of being reset:\n{}\n{}",
        lab.log("daemon-lab.log"),
        lab.log("agent.log")
    );
    let answer = ok(lab.laptop_out("psql", &["-h", "10.10.0.2", "-U", "postgres", "-tAc", "select 6 * 7"]), "psql");
    assert_eq!(answer, "42");
    lab.fetch_blob(60);
    eprintln!(
        "a new psql answered and 2 MiB came through {:.1} s after the restart",
        restarted.elapsed().as_secs_f64()
    );
    lab.stop(&mut daemon, "lab");
}

/// The instance's resolver gone, two ways: its answers dropped (a blackhole:
/// the agent answers SERVFAIL when its deadline passes) and its process
/// killed (port unreachable: SERVFAIL at once). Never silence; a name that
/// resolved before the fault did resolve.
#[test]
fn the_instances_resolver_gone_is_answered_servfail_not_silence() {
    if !require_root("the_instances_resolver_gone_is_answered_servfail_not_silence") {
        return;
    }
    let lab = Lab::up(&prefix("r"), 1, &[]);
    let mut daemon = lab.start(&["--dns-domain", "corp.internal"]);
    let server = tunnel_status(&lab)["dns_server"].as_str().expect("a DNS server in status").to_string();
    let dig = |name: &str, secs: u32| {
        let t = Instant::now();
        let out = lab.laptop_out("dig", &[&format!("+time={secs}"), "+tries=1", &format!("@{server}"), name]);
        (text(&out), t.elapsed())
    };
    let (before, _) = dig("db.corp.internal", 3);
    assert!(before.contains("status: NOERROR") && before.contains("10.10.0.2"), "{before}");

    // Blackholed: dnsmasq is up and gets the query, but its answer to the
    // instance goes nowhere (a blackhole route for the instance's address).
    let vpc = lab.ns("vpc");
    let route = |op: &str| {
        let args = ["netns", "exec", vpc.as_str(), "ip", "route", op, "blackhole", "10.10.0.1/32"];
        ok(Command::new("ip").args(args).output().expect("ip route"), "ip route");
    };
    route("add");
    let (blackholed, took) = dig("api.corp.internal", 15);
    eprintln!("blackholed resolver: answered in {took:?}");
    assert!(blackholed.contains("status: SERVFAIL"), "{blackholed}");
    route("del");

    // Killed: the port is closed and the instance's kernel says so.
    let pid = lab.log("dnsmasq.pid").trim().to_string();
    ok(Command::new("kill").arg(&pid).output().expect("kill"), "kill dnsmasq");
    std::thread::sleep(Duration::from_millis(300));
    let (killed, took) = dig("web.corp.internal", 5);
    eprintln!("killed resolver: answered in {took:?}");
    assert!(killed.contains("status: SERVFAIL"), "{killed}");

    let log = lab.log("agent.log");
    assert!(log.contains("the instance's resolver is unreachable"), "{log}");
    lab.stop(&mut daemon, "lab");
}

/// The emulator (the whole AWS side: service and SSM agent) killed and
/// started again under an open psql: every session is gone and cannot be
/// resumed, so the tunnel starts new ones by itself; the ec2-agent keeps the
/// client's flows through its grace period, so the psql connection carries on.
#[test]
fn the_tunnel_comes_back_with_new_sessions_after_the_service_restarts() {
    if !require_root("the_tunnel_comes_back_with_new_sessions_after_the_service_restarts") {
        return;
    }
    let lab = Lab::up(&prefix("e"), 2, &[]);
    let mut daemon = lab.start(&["--sessions", "2"]);
    let mut psql = Psql::open(&lab);
    let before = psql.backend_pid(Duration::from_secs(10));
    let sessions = |s: &serde_json::Value| -> Vec<String> {
        s["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["state"] == "connected")
            .filter_map(|m| m["session_id"].as_str().map(String::from))
            .collect()
    };
    let old = sessions(&wait_status(&lab, Duration::from_secs(30), |s| sessions(s).len() == 2));
    assert_eq!(old.len(), 2, "{old:?}");

    lab.restart_emulator();
    let t = Instant::now();
    let after = psql.backend_pid(Duration::from_secs(90));
    eprintln!("psql answered {:?} after the emulator came back", t.elapsed());
    assert_eq!(after, before, "the same backend, so the same connection");
    let s = wait_status(&lab, Duration::from_secs(30), |s| s["state"] == "connected" && sessions(s).len() == 2);
    let new = sessions(&s);
    assert_eq!(new.len(), 2, "{s}");
    assert!(new.iter().all(|id| !old.contains(id)), "new sessions, not resumed ones: {old:?} -> {new:?}");
    lab.fetch_blob(60);
    drop(psql);
    lab.stop(&mut daemon, "lab");
}
