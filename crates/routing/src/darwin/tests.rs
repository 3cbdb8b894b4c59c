use super::*;

fn net(s: &str) -> IpNet {
    s.parse().expect("test CIDR")
}

fn header(kind: u8, flags: i32, addrs: i32, index: u16, seq: i32) -> Vec<u8> {
    let mut h = vec![0u8; RT_MSGHDR_LEN];
    h[2] = RTM_VERSION;
    h[3] = kind;
    h[4..6].copy_from_slice(&index.to_ne_bytes());
    h[8..12].copy_from_slice(&flags.to_ne_bytes());
    h[12..16].copy_from_slice(&addrs.to_ne_bytes());
    h[20..24].copy_from_slice(&seq.to_ne_bytes());
    h
}

fn finish(mut m: Vec<u8>) -> Vec<u8> {
    let len = m.len() as u16;
    m[0..2].copy_from_slice(&len.to_ne_bytes());
    m
}

fn sin(a: [u8; 4]) -> Vec<u8> {
    let mut s = vec![16, AF_INET, 0, 0];
    s.extend_from_slice(&a);
    s.extend_from_slice(&[0; 8]);
    s
}

#[test]
fn roundup_is_four_byte() {
    assert_eq!([0, 1, 4, 5, 16, 20, 28].map(roundup), [4, 4, 4, 8, 16, 20, 28]);
}

#[test]
fn netmask_maths() {
    assert_eq!(prefix_to_mask(8, 4), vec![255, 0, 0, 0]);
    assert_eq!(prefix_to_mask(20, 4), vec![255, 255, 240, 0]);
    assert_eq!(prefix_to_mask(0, 4), vec![0, 0, 0, 0]);
    assert_eq!(prefix_to_mask(32, 4), vec![255; 4]);
    assert_eq!(prefix_to_mask(65, 16)[..9], [255, 255, 255, 255, 255, 255, 255, 255, 128]);
    for p in 0..=128u8 {
        assert_eq!(mask_to_prefix(&prefix_to_mask(p, 16)), Some(p));
    }
    assert_eq!(mask_to_prefix(&[255, 255]), Some(16), "truncated masks");
    assert_eq!(mask_to_prefix(&[]), Some(0));
    assert_eq!(mask_to_prefix(&[255, 0, 255, 0]), None);
    assert_eq!(mask_to_prefix(&[0b1011_0000]), None);
}

#[test]
fn interface_route_message_matches_route_8() {
    // route -n add -net 10.0.0.0/8 -interface utun7 (ifindex 7)
    let msg = route_message(RTM_ADD, 42, &Route::via_interface(net("10.0.0.0/8"), 7));
    let mut want = header(RTM_ADD, RTF_UP | RTF_STATIC, RTA_DST | RTA_GATEWAY | RTA_NETMASK, 0, 42);
    want.extend(sin([10, 0, 0, 0]));
    let mut dl = vec![20, AF_LINK];
    dl.extend_from_slice(&7u16.to_ne_bytes());
    dl.extend_from_slice(&[0; 16]);
    want.extend(dl);
    want.extend(sin([255, 0, 0, 0]));
    assert_eq!(msg, finish(want));
    assert_eq!(msg.len(), 92 + 16 + 20 + 16);
}

#[test]
fn host_route_via_gateway_has_no_netmask() {
    let r = Route { dest: net("52.94.1.10/32"), gateway: Some("192.168.1.1".parse().expect("gw")), ifindex: 4 };
    let msg = route_message(RTM_DELETE, 1, &r);
    let mut want = header(RTM_DELETE, RTF_UP | RTF_STATIC | RTF_GATEWAY | RTF_HOST, RTA_DST | RTA_GATEWAY, 0, 1);
    want.extend(sin([52, 94, 1, 10]));
    want.extend(sin([192, 168, 1, 1]));
    assert_eq!(msg, finish(want));
}

#[test]
fn ipv6_route_message() {
    let msg = route_message(RTM_ADD, 3, &Route::via_interface(net("fd00:10::/32"), 9));
    assert_eq!(msg.len(), 92 + 28 + 20 + 28);
    assert_eq!(&msg[92..94], &[28, AF_INET6]);
    assert_eq!(&msg[100..104], &[0xfd, 0x00, 0x00, 0x10]);
    assert_eq!(&msg[92 + 28 + 20 + 8..92 + 28 + 20 + 14], &[255, 255, 255, 255, 0, 0]);
}

#[test]
fn our_messages_parse_back() {
    for r in [
        Route::via_interface(net("10.0.0.0/8"), 7),
        Route::via_interface(net("fd00:10::/32"), 9),
        Route { dest: net("52.94.1.10/32"), gateway: Some("192.168.1.1".parse().expect("gw")), ifindex: 0 },
        Route { dest: net("2001:db8::5/128"), gateway: Some("fe80::1".parse().expect("gw")), ifindex: 0 },
    ] {
        let parsed = parse_dump(&route_message(RTM_ADD, 1, &r)).expect("parse");
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].route, r);
    }
}

/// A dump as the kernel writes it: trimmed netmasks, a zero-length default mask,
/// rtm_index set, embedded link-local scope, and entries we must skip.
#[test]
fn kernel_dump_is_read() {
    let mut buf = Vec::new();
    // default via 192.168.1.1 on en0 (index 4): netmask sockaddr of length 0.
    let mut m = header(4, RTF_UP | RTF_GATEWAY | RTF_STATIC, RTA_DST | RTA_GATEWAY | RTA_NETMASK, 4, 0);
    m.extend(sin([0, 0, 0, 0]));
    m.extend(sin([192, 168, 1, 1]));
    m.extend([0, 0, 0, 0]);
    buf.extend(finish(m));
    // 10.20.0.0/16 -interface utun3 (index 7): netmask trimmed to 6 bytes, family 0xff.
    let mut m = header(4, RTF_UP | RTF_STATIC, RTA_DST | RTA_GATEWAY | RTA_NETMASK, 7, 0);
    m.extend(sin([10, 20, 0, 0]));
    let mut dl = vec![20, AF_LINK];
    dl.extend_from_slice(&7u16.to_ne_bytes());
    dl.extend_from_slice(&[0; 16]);
    m.extend(dl);
    m.extend([6, 0xff, 0, 0, 255, 255, 0, 0]);
    buf.extend(finish(m));
    // An ARP entry (cloned): skipped.
    let mut m = header(4, RTF_UP | RTF_HOST | RTF_WASCLONED, RTA_DST | RTA_GATEWAY, 4, 0);
    m.extend(sin([192, 168, 1, 1]));
    m.extend(sin([0, 0, 0, 0]));
    buf.extend(finish(m));
    // fe80::%en0/64 with the scope embedded in the address, mask of 16 bytes.
    let mut m = header(4, RTF_UP, RTA_DST | RTA_GATEWAY | RTA_NETMASK, 4, 0);
    let mut sa6 = vec![28, AF_INET6, 0, 0, 0, 0, 0, 0, 0xfe, 0x80, 0, 4];
    sa6.extend_from_slice(&[0; 12]);
    sa6.extend_from_slice(&[0; 4]);
    m.extend(sa6);
    let mut dl = vec![20, AF_LINK];
    dl.extend_from_slice(&4u16.to_ne_bytes());
    dl.extend_from_slice(&[0; 16]);
    m.extend(dl);
    m.extend([16, 0xff, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255, 255, 255, 255, 255]);
    buf.extend(finish(m));
    // An interface-scoped default route.
    let mut m = header(4, RTF_UP | RTF_GATEWAY | RTF_IFSCOPE, RTA_DST | RTA_GATEWAY | RTA_NETMASK, 5, 0);
    m.extend(sin([0, 0, 0, 0]));
    m.extend(sin([172, 20, 10, 1]));
    m.extend([0, 0, 0, 0]);
    buf.extend(finish(m));

    let got = parse_dump(&buf).expect("parse");
    let routes: Vec<(String, Option<String>, u32, bool)> = got
        .iter()
        .map(|d| {
            (
                d.route.dest.to_string(),
                d.route.gateway.map(|g| g.to_string()),
                d.route.ifindex,
                d.flags & RTF_IFSCOPE != 0,
            )
        })
        .collect();
    assert_eq!(
        routes,
        vec![
            ("0.0.0.0/0".into(), Some("192.168.1.1".into()), 4, false),
            ("10.20.0.0/16".into(), None, 7, false),
            ("fe80::/64".into(), None, 4, false),
            ("0.0.0.0/0".into(), Some("172.20.10.1".into()), 5, true),
        ]
    );
}

#[test]
fn malformed_dumps_are_errors_not_panics() {
    let good = route_message(RTM_ADD, 1, &Route::via_interface(net("10.0.0.0/8"), 7));
    assert!(parse_dump(&good[..50]).is_err());
    let mut bad_len = good.clone();
    bad_len[0..2].copy_from_slice(&10u16.to_ne_bytes());
    assert!(parse_dump(&bad_len).is_err());
    let mut bad_version = good.clone();
    bad_version[2] = 4;
    assert!(parse_dump(&bad_version).is_err());
    // Addresses announced but absent.
    let mut short = header(4, RTF_UP, RTA_DST | RTA_GATEWAY, 0, 0);
    short.extend(sin([10, 0, 0, 0]));
    assert!(parse_dump(&finish(short)).is_err());
    assert_eq!(parse_dump(&[]), Ok(vec![]));
}

/// An `ifa_msghdr`/`if_msghdr`-shaped message: addrs at 4, flags at 8, index at 12.
fn if_header(kind: u8, index: u16) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[2] = RTM_VERSION;
    h[3] = kind;
    h[12..14].copy_from_slice(&index.to_ne_bytes());
    finish(h)
}

#[test]
fn change_messages_are_classified_by_kind_and_interface() {
    use crate::{ChangeKind, NetChange};
    let change = |kind, ifindex| Some(NetChange { kind, ifindex });
    assert_eq!(classify_change(&if_header(RTM_NEWADDR, 5)), change(ChangeKind::Address, 5));
    assert_eq!(classify_change(&if_header(RTM_DELADDR, 6)), change(ChangeKind::Address, 6));
    assert_eq!(classify_change(&if_header(RTM_IFINFO, 7)), change(ChangeKind::Link, 7));
    // A new default route through en0 (index 4), as `route change default` sends.
    let mut default = header(RTM_CHANGE, RTF_UP | RTF_GATEWAY | RTF_STATIC, RTA_DST | RTA_GATEWAY | RTA_NETMASK, 4, 9);
    default.extend(sin([0, 0, 0, 0]));
    default.extend(sin([192, 168, 1, 1]));
    default.extend(sin([0, 0, 0, 0]));
    assert_eq!(classify_change(&finish(default)), change(ChangeKind::Route, 4));
    assert_eq!(classify_change(&finish(header(RTM_DELETE, RTF_UP, 0, 3, 1))), change(ChangeKind::Route, 3));
    // The kernel's cloned ARP/ND entries and host routes come and go all the time.
    for noise in [RTF_WASCLONED, RTF_LLINFO | RTF_HOST, RTF_HOST, RTF_MULTICAST, RTF_BROADCAST] {
        assert_eq!(classify_change(&finish(header(RTM_ADD, RTF_UP | noise, 0, 4, 1))), None, "flags {noise:#x}");
    }
}

#[test]
fn other_routing_messages_are_not_changes() {
    const RTM_GET: u8 = 0x4;
    const RTM_MISS: u8 = 0x7;
    const RTM_NEWMADDR: u8 = 0xf;
    for kind in [RTM_GET, RTM_MISS, RTM_NEWMADDR] {
        assert_eq!(classify_change(&finish(header(kind, RTF_UP, 0, 4, 1))), None, "type {kind}");
    }
    let mut old = if_header(RTM_NEWADDR, 5);
    old[2] = RTM_VERSION - 1;
    assert_eq!(classify_change(&old), None);
    assert_eq!(classify_change(&if_header(RTM_NEWADDR, 5)[..15]), None);
    assert_eq!(classify_change(&[]), None);
}

proptest::proptest! {
    #[test]
    fn classify_change_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..120)) {
        let _ = classify_change(&bytes);
    }


    #[test]
    fn parse_dump_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
        let _ = parse_dump(&bytes);
    }
}
