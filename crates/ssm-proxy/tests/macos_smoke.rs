//! macOS smoke test of the real utun device and routing socket (CI's macOS
//! runner, under sudo): a utun device with our addresses, a route through it,
//! a UDP packet out through the device and a reply back in, the route gone
//! again when its guard drops, and a network change seen by NetWatch.
//! Elsewhere (and without root unless SSM_PROXY_ROOT_TESTS=require) it skips.
#![cfg(target_os = "macos")]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use ipnet::IpNet;
use routing::{interfaces, Route, RouteGuard};
use tunnel::{Device, TunConfig, TunDevice};

fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(std::env::var("SSM_PROXY_ROOT_TESTS").as_deref() != Ok("require"), "the utun smoke test needs root");
    eprintln!("skipped: the utun smoke test needs root");
    false
}

fn route_get(dest: &str) -> String {
    let out = Command::new("route").args(["-n", "get", dest]).output().expect("route get");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn utun_route_and_a_udp_round_trip() {
    if !root() {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let in_use: Vec<IpNet> = interfaces().expect("interfaces").into_iter().flat_map(|i| i.networks).collect();
        let ipv4 = tunnel::allocate_v4(tunnel::DEFAULT_V4_RANGE, &in_use).expect("a free /30");
        let dev = TunDevice::create(&TunConfig {
            name: None,
            ipv4,
            ipv6: Some(tunnel::ula([0x77, 9, 8, 7, 6])),
            mtu: tunnel::DEFAULT_MTU,
        })
        .expect("create the utun device");
        assert!(dev.name().starts_with("utun"), "{}", dev.name());
        let local = dev.local_v4().expect("IPv4 address");
        let mut watch = routing::NetWatch::open(dev.index()).expect("routing socket");

        let dest: IpNet = "10.77.0.0/16".parse().expect("cidr");
        let mut guard = RouteGuard::new(routing::system_table().expect("table"), None);
        guard.add(Route::via_interface(dest, dev.index()), dev.name()).expect("route");
        let via = route_get("10.77.1.2");
        assert!(via.contains(dev.name()), "route -n get 10.77.1.2:\n{via}");
        // Our own route on our own device is not a network change.
        let seen = watch.wait(Duration::from_millis(500)).expect("read changes");
        assert!(seen.iter().all(|c| c.ifindex != dev.index()), "{seen:?}");

        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        sock.send_to(b"hello utun", "10.77.1.2:5353").expect("send");
        let mut buf = vec![0u8; 65536];
        let sport = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let n = dev.recv(&mut buf).await.expect("read from the device");
                let Ok(s) = SlicedPacket::from_ip(&buf[..n]) else { continue };
                if let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(udp))) = (s.net, s.transport) {
                    if ip.header().destination_addr() == Ipv4Addr::new(10, 77, 1, 2) && udp.payload() == b"hello utun" {
                        assert_eq!(ip.header().source_addr(), local);
                        return udp.source_port();
                    }
                }
            }
        })
        .await
        .expect("the packet came out of the utun device");

        let mut reply = Vec::new();
        PacketBuilder::ipv4([10, 77, 1, 2], local.octets(), 64)
            .udp(5353, sport)
            .write(&mut reply, b"reply through utun")
            .expect("build");
        dev.send(&reply).await.expect("write to the device");
        sock.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut got = [0u8; 1500];
        let (n, from) = sock.recv_from(&mut got).expect("the reply arrives");
        assert_eq!(&got[..n], b"reply through utun");
        assert_eq!(from, "10.77.1.2:5353".parse::<SocketAddr>().expect("addr"));

        drop(guard);
        let after = route_get("10.77.1.2");
        assert!(!after.contains(dev.name()), "the route outlived its guard:\n{after}");
        drop(dev);
    });
}
