//! Root tests of the tunnel device and the routes, each in a fresh network namespace:
//! real TUN devices, real routes, real `ping`, and the real `ssm-proxy cleanup`.

mod netns;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use etherparse::{Icmpv4Type, Icmpv6Type, NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use ipnet::IpNet;
use routing::{endpoint_pins, find_conflicts, interfaces, Conflict, Journal, Route, RouteGuard};
use tunnel::{Device, TunConfig, TunDevice};

const DEADLINE: Duration = Duration::from_secs(90);
const HOLDER_ENV: &str = "SSM_PROXY_TEST_HOLDER";

fn net(s: &str) -> IpNet {
    s.parse().expect("test CIDR")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

fn make_device(name: &str) -> TunDevice {
    let in_use: Vec<IpNet> = interfaces().expect("interfaces").into_iter().flat_map(|i| i.networks).collect();
    let ipv4 = tunnel::allocate_v4(tunnel::DEFAULT_V4_RANGE, &in_use).expect("a free /30");
    TunDevice::create(&TunConfig {
        name: Some(name.into()),
        ipv4,
        ipv6: Some(tunnel::ula([0x77, 1, 2, 3, 4])),
        mtu: tunnel::DEFAULT_MTU,
    })
    .expect("create the TUN device")
}

/// Read packets until `pick` accepts one; the kernel's own IPv6 chatter (router
/// solicitations, MLD reports) is skipped on the way.
async fn next_matching<T>(dev: &TunDevice, mut pick: impl FnMut(&[u8]) -> Option<T>) -> T {
    let mut buf = vec![0u8; 65536];
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let n = dev.recv(&mut buf).await.expect("read from the device");
            if let Some(t) = pick(&buf[..n]) {
                return t;
            }
        }
    })
    .await
    .expect("the expected packet reached the device")
}

/// A LAN on a veth pair: 192.168.77.1/24, default gateway .254, and a "corporate VPN"
/// route 10.66.0.0/16 via .66; in IPv6 the same as fd77::1/64, fd77::fe and
/// fd66::/48 via fd77::66.
fn lan() {
    netns::run("ip", &["link", "add", "lan0", "type", "veth", "peer", "name", "lan1"]);
    netns::run("ip", &["addr", "add", "192.168.77.1/24", "dev", "lan0"]);
    netns::run("ip", &["-6", "addr", "add", "fd77::1/64", "dev", "lan0", "nodad"]);
    netns::run("ip", &["link", "set", "lan0", "up"]);
    netns::run("ip", &["link", "set", "lan1", "up"]);
    netns::run("ip", &["route", "add", "default", "via", "192.168.77.254"]);
    netns::run("ip", &["route", "add", "10.66.0.0/16", "via", "192.168.77.66"]);
    netns::run("ip", &["-6", "route", "add", "default", "via", "fd77::fe"]);
    netns::run("ip", &["-6", "route", "add", "fd66::/48", "via", "fd77::66"]);
}

fn spawn_ping(args: &[&str]) -> std::thread::JoinHandle<std::process::Output> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    std::thread::spawn(move || Command::new("ping").args(&args).output().expect("run ping"))
}

#[test]
fn tun_carries_udp_and_icmp_both_ways() {
    if !netns::run_inside("tun_carries_udp_and_icmp_both_ways", DEADLINE) {
        return;
    }
    let before = netns::route_snapshot();
    runtime().block_on(async {
        let dev = make_device("ssmp0");
        let local = dev.local_v4().expect("IPv4 address");
        let mut guard = RouteGuard::new(routing::system_table().expect("table"), None);
        guard.add(Route::via_interface(net("10.77.0.0/16"), dev.index()), dev.name()).expect("route v4");
        guard.add(Route::via_interface(net("fd77::/64"), dev.index()), dev.name()).expect("route v6");
        assert!(netns::run("ip", &["route", "get", "10.77.1.2"]).contains("dev ssmp0"));

        // UDP from an ordinary socket comes out of the device as the exact packet.
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        sock.send_to(b"hello through the tunnel", "10.77.1.2:5353").expect("send");
        let (src, sport) = next_matching(&dev, |p| {
            let s = SlicedPacket::from_ip(p).ok()?;
            let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(udp))) = (s.net, s.transport) else { return None };
            (ip.header().destination_addr() == Ipv4Addr::new(10, 77, 1, 2)
                && udp.destination_port() == 5353
                && udp.payload() == b"hello through the tunnel")
                .then(|| (ip.header().source_addr(), udp.source_port()))
        })
        .await;
        assert_eq!(src, local, "source is the tunnel address");
        assert_eq!(sport, sock.local_addr().expect("addr").port());

        // A reply written into the device reaches the socket.
        let mut reply = Vec::new();
        PacketBuilder::ipv4([10, 77, 1, 2], local.octets(), 64)
            .udp(5353, sport)
            .write(&mut reply, b"reply from 10.77.1.2")
            .expect("build");
        dev.send(&reply).await.expect("write to the device");
        sock.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut buf = [0u8; 1500];
        let (n, from) = sock.recv_from(&mut buf).expect("the reply arrives");
        assert_eq!(&buf[..n], b"reply from 10.77.1.2");
        assert_eq!(from, "10.77.1.2:5353".parse::<SocketAddr>().expect("addr"));

        // ICMP: the real ping gets its echo reply through the device, IPv4 and IPv6.
        let ping = spawn_ping(&["-c", "1", "-W", "5", "10.77.1.3"]);
        let (id, seq, payload) = next_matching(&dev, |p| {
            let s = SlicedPacket::from_ip(p).ok()?;
            let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Icmpv4(icmp))) = (s.net, s.transport) else {
                return None;
            };
            match icmp.icmp_type() {
                Icmpv4Type::EchoRequest(e) if ip.header().destination_addr() == Ipv4Addr::new(10, 77, 1, 3) => {
                    Some((e.id, e.seq, icmp.payload().to_vec()))
                }
                _ => None,
            }
        })
        .await;
        let mut echo = Vec::new();
        PacketBuilder::ipv4([10, 77, 1, 3], local.octets(), 64)
            .icmpv4_echo_reply(id, seq)
            .write(&mut echo, &payload)
            .expect("build");
        dev.send(&echo).await.expect("write to the device");
        let out = ping.join().expect("ping thread");
        assert!(out.status.success(), "ping: {}", String::from_utf8_lossy(&out.stdout));

        let ping6 = spawn_ping(&["-6", "-c", "1", "-W", "5", "fd77::5"]);
        let (src6, id, seq, payload) = next_matching(&dev, |p| {
            let s = SlicedPacket::from_ip(p).ok()?;
            let (Some(NetSlice::Ipv6(ip)), Some(TransportSlice::Icmpv6(icmp))) = (s.net, s.transport) else {
                return None;
            };
            match icmp.icmp_type() {
                Icmpv6Type::EchoRequest(e) => Some((ip.header().source_addr(), e.id, e.seq, icmp.payload().to_vec())),
                _ => None,
            }
        })
        .await;
        let fd77_5: std::net::Ipv6Addr = "fd77::5".parse().expect("addr");
        let mut echo6 = Vec::new();
        PacketBuilder::ipv6(fd77_5.octets(), src6.octets(), 64)
            .icmpv6_echo_reply(id, seq)
            .write(&mut echo6, &payload)
            .expect("build");
        dev.send(&echo6).await.expect("write to the device");
        let out = ping6.join().expect("ping thread");
        assert!(out.status.success(), "ping -6: {}", String::from_utf8_lossy(&out.stdout));

        // Dropping the guard takes exactly its routes away, while the device still exists.
        drop(guard);
        let routes = netns::run("ip", &["route", "show", "table", "main"]);
        assert!(!routes.contains("10.77.0.0/16"), "{routes}");
        drop(dev);
    });
    assert_eq!(netns::route_snapshot(), before, "the routing table is back to exactly what it was");
}

#[test]
fn conflicts_pins_and_exact_restore() {
    if !netns::run_inside("conflicts_pins_and_exact_restore", DEADLINE) {
        return;
    }
    lan();
    let before = netns::route_snapshot();
    let run_dir = tempfile::tempdir().expect("run dir");
    runtime().block_on(async {
        let mut table = routing::system_table().expect("table");
        let entries = table.list().expect("list");
        let ifaces = interfaces().expect("interfaces");

        let found = find_conflicts(&[net("10.0.0.0/8")], &entries, &ifaces, None);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            matches!(&found[0], Conflict::Routed { existing, ifname, .. }
                if existing == "10.66.0.0/16 via 192.168.77.66 dev lan0" && ifname == "lan0"),
            "{found:?}"
        );
        let found = find_conflicts(&[net("192.168.0.0/16")], &entries, &ifaces, None);
        assert!(found.iter().any(|c| matches!(c, Conflict::Connected { ifname, .. } if ifname == "lan0")), "{found:?}");
        assert!(find_conflicts(&[net("0.0.0.0/0")], &entries, &ifaces, None)
            .contains(&Conflict::DefaultRoute { cidr: net("0.0.0.0/0") }));
        assert_eq!(find_conflicts(&[net("10.77.0.0/16"), net("fd55::/64")], &entries, &ifaces, None), vec![]);
        // The same in IPv6: a routed range, a connected one, the default route.
        let found = find_conflicts(&[net("fd66::/32")], &entries, &ifaces, None);
        assert!(
            matches!(found.as_slice(), [Conflict::Routed { existing, ifname, .. }]
                if existing.starts_with("fd66::/48 via fd77::66 dev lan0") && ifname == "lan0"),
            "{found:?}"
        );
        let found = find_conflicts(&[net("fd77::/48")], &entries, &ifaces, None);
        assert!(found.iter().any(|c| matches!(c, Conflict::Connected { ifname, .. } if ifname == "lan0")), "{found:?}");
        assert!(find_conflicts(&[net("::/0")], &entries, &ifaces, None)
            .contains(&Conflict::DefaultRoute { cidr: net("::/0") }));

        let dev = make_device("ssmp1");
        // The AWS endpoint 10.77.5.5 (a VPC endpoint address, say) must stay on the LAN.
        let endpoint: IpAddr = "10.77.5.5".parse().expect("addr");
        let pins = endpoint_pins(&[endpoint], &[net("10.77.0.0/16")], &entries, Some(dev.index())).expect("pins");
        let lan0 = ifaces.iter().find(|i| i.name == "lan0").expect("lan0").index;
        assert_eq!(
            pins,
            vec![Route {
                dest: net("10.77.5.5/32"),
                gateway: Some("192.168.77.254".parse().expect("gw")),
                ifindex: lan0
            }]
        );

        // And an IPv6 endpoint inside an IPv6 tunnel range.
        let endpoint6: IpAddr = "fd55::5".parse().expect("addr");
        let pins6 = endpoint_pins(&[endpoint6], &[net("fd55::/64")], &entries, Some(dev.index())).expect("pins");
        assert_eq!(
            pins6,
            vec![Route { dest: net("fd55::5/128"), gateway: Some("fd77::fe".parse().expect("gw")), ifindex: lan0 }]
        );

        let (journal, leftover) = Journal::open(run_dir.path(), "lab").expect("journal");
        assert!(leftover.is_none());
        let mut guard = RouteGuard::new(table, Some(journal));
        guard.add(pins[0].clone(), "lan0").expect("pin");
        guard.add(Route::via_interface(net("10.77.0.0/16"), dev.index()), dev.name()).expect("route");
        guard.add(pins6[0].clone(), "lan0").expect("pin v6");
        guard.add(Route::via_interface(net("fd55::/64"), dev.index()), dev.name()).expect("route v6");
        assert!(netns::run("ip", &["-6", "route", "get", "fd55::5"]).contains("via fd77::fe dev lan0"));
        assert!(netns::run("ip", &["-6", "route", "get", "fd55::6"]).contains("dev ssmp1"));
        let dup6 = guard.add(Route::via_interface(net("fd55::/64"), dev.index()), dev.name());
        assert!(dup6.is_err(), "duplicate IPv6 route accepted");
        assert!(netns::run("ip", &["route", "get", "10.77.5.5"]).contains("via 192.168.77.254 dev lan0"));
        assert!(netns::run("ip", &["route", "get", "10.77.5.6"]).contains("dev ssmp1"));
        assert!(netns::run("ip", &["route", "get", "10.66.1.1"]).contains("via 192.168.77.66"));
        assert!(run_dir.path().join("lab.journal").exists());

        // The kernel refuses a duplicate; the guard reports it and keeps what it has.
        let dup = guard.add(Route::via_interface(net("10.77.0.0/16"), dev.index()), dev.name());
        assert!(dup.is_err(), "duplicate route accepted");

        drop(guard);
        assert_eq!(std::fs::read_dir(run_dir.path()).expect("dir").count(), 0, "journal and lock removed");
        drop(dev);
    });
    assert_eq!(netns::route_snapshot(), before);
}

/// The process the next test kills: device, pin and route, journaled; then it waits.
fn hold(run_dir: &str) -> ! {
    runtime().block_on(async {
        let dev = make_device("ssmp2");
        let mut table = routing::system_table().expect("table");
        let entries = table.list().expect("list");
        let pins =
            endpoint_pins(&["10.77.5.5".parse().expect("addr")], &[net("10.77.0.0/16")], &entries, None).expect("pins");
        let (journal, _) = Journal::open(std::path::Path::new(run_dir), "held").expect("journal");
        let mut guard = RouteGuard::new(table, Some(journal));
        guard.add(pins[0].clone(), "lan0").expect("pin");
        guard.add(Route::via_interface(net("10.77.0.0/16"), dev.index()), dev.name()).expect("route");
        let pins6 =
            endpoint_pins(&["fd55::5".parse().expect("addr")], &[net("fd55::/64")], &entries, None).expect("pins");
        guard.add(pins6[0].clone(), "lan0").expect("pin v6");
        guard.add(Route::via_interface(net("fd55::/64"), dev.index()), dev.name()).expect("route v6");
        println!("READY");
        tokio::time::sleep(Duration::from_secs(600)).await;
        drop(guard);
    });
    std::process::exit(1)
}

#[test]
fn sigkill_then_cleanup_restores_table() {
    if let Ok(dir) = std::env::var(HOLDER_ENV) {
        hold(&dir);
    }
    if !netns::run_inside("sigkill_then_cleanup_restores_table", DEADLINE) {
        return;
    }
    lan();
    let before = netns::route_snapshot();
    let run_dir = tempfile::tempdir().expect("run dir");
    let dir = run_dir.path().to_str().expect("utf-8 path");
    let mut holder = Command::new(std::env::current_exe().expect("test binary"))
        .args(["sigkill_then_cleanup_restores_table", "--exact", "--nocapture", "--test-threads=1"])
        .env(HOLDER_ENV, dir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the holder");
    let stdout = holder.stdout.take().expect("stdout");
    let mut holder = netns::KillOnDrop(holder);
    let mut lines = BufReader::new(stdout).lines();
    let ready = lines.by_ref().map_while(Result::ok).any(|l| l.trim_end().ends_with("READY"));
    assert!(ready, "holder did not get ready");
    let held = netns::run("ip", &["route", "show"]);
    assert!(held.contains("10.77.0.0/16 dev ssmp2") && held.contains("10.77.5.5 via 192.168.77.254"), "{held}");

    holder.0.kill().expect("SIGKILL");
    holder.0.wait().expect("reap");
    // The kernel took the device and its route away; the pin outlives the process.
    let after_kill = netns::run("ip", &["route", "show"]);
    assert!(!after_kill.contains("ssmp2"), "{after_kill}");
    assert!(after_kill.contains("10.77.5.5 via 192.168.77.254"), "{after_kill}");
    let after_kill6 = netns::run("ip", &["-6", "route", "show"]);
    assert!(!after_kill6.contains("ssmp2") && after_kill6.contains("fd55::5 via fd77::fe"), "{after_kill6}");

    let cleanup = |expected: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ssm-proxy"))
            .arg("cleanup")
            .env("SSM_PROXY_RUN_DIR", dir)
            .output()
            .expect("run ssm-proxy cleanup");
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        for expect in expected {
            assert!(text.contains(expect), "expected {expect:?} in:\n{text}");
        }
    };
    cleanup(&["removed route 10.77.5.5/32 via 192.168.77.254", "removed route fd55::5/128 via fd77::fe"]);
    assert_eq!(netns::route_snapshot(), before, "cleanup restored the table exactly");
    assert_eq!(std::fs::read_dir(run_dir.path()).expect("dir").count(), 0, "journal and lock removed");
    cleanup(&["nothing to clean up"]);
}

/// Every change the watcher reports within `for_at_most` (stops at the first
/// batch that satisfies `done`).
fn watch_until(
    w: &mut routing::NetWatch,
    for_at_most: Duration,
    mut done: impl FnMut(&[routing::NetChange]) -> bool,
) -> Vec<routing::NetChange> {
    let until = std::time::Instant::now() + for_at_most;
    let mut seen = Vec::new();
    while std::time::Instant::now() < until && !done(&seen) {
        seen.extend(w.wait(Duration::from_millis(200)).expect("read changes"));
    }
    seen
}

#[test]
fn network_changes_are_reported_except_on_the_tunnel_device() {
    if !netns::run_inside("network_changes_are_reported_except_on_the_tunnel_device", DEADLINE) {
        return;
    }
    use routing::{ChangeKind, NetChange};
    let rt = runtime();
    let _in_runtime = rt.enter(); // the device is an async one
    let dev = make_device("ssmw0");
    let mut w = routing::NetWatch::open(dev.index()).expect("subscribe");
    // Our own routes on the tunnel device are not news.
    let mut guard = RouteGuard::new(routing::system_table().expect("table"), None);
    guard.add(Route::via_interface(net("10.78.0.0/16"), dev.index()), dev.name()).expect("route");
    let quiet = watch_until(&mut w, Duration::from_millis(600), |_| false);
    assert!(quiet.iter().all(|c| c.ifindex != dev.index()), "{quiet:?}");

    lan();
    let lan0 = nix::net::if_::if_nametoindex("lan0").expect("lan0 index");
    let seen = watch_until(&mut w, Duration::from_secs(5), |s| {
        s.contains(&NetChange { kind: ChangeKind::Address, ifindex: lan0 })
            && s.contains(&NetChange { kind: ChangeKind::Route, ifindex: lan0 })
    });
    assert!(seen.contains(&NetChange { kind: ChangeKind::Address, ifindex: lan0 }), "{seen:?}");
    assert!(seen.contains(&NetChange { kind: ChangeKind::Route, ifindex: lan0 }), "{seen:?}");

    // A new default gateway, as when the laptop changes networks.
    netns::run("ip", &["route", "replace", "default", "via", "192.168.77.253", "dev", "lan0"]);
    let seen = watch_until(&mut w, Duration::from_secs(5), |s| !s.is_empty());
    assert_eq!(seen.first(), Some(&NetChange { kind: ChangeKind::Route, ifindex: lan0 }), "{seen:?}");
    // Nothing more without a change.
    assert_eq!(watch_until(&mut w, Duration::from_millis(600), |_| false), vec![]);
    drop(guard);
}
