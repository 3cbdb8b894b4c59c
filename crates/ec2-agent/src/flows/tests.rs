use etherparse::PacketBuilder;

use super::*;
use crate::packet;

const CLIENT: [u8; 4] = [100, 127, 0, 1];
/// The client's tunnel resolver address, announced in its HELLO.
const TUNNEL_DNS: [u8; 4] = [100, 127, 0, 2];

fn table() -> FlowTable {
    let limits = Limits {
        policy: Policy::new(&[], &[], false),
        resolvers: vec!["10.0.0.2".parse().expect("ip")],
        max_tcp_flows: 2,
        max_udp_flows: 2,
        idle_ms: 30_000,
    };
    FlowTable::new(limits, vec![IpAddr::from(TUNNEL_DNS)])
}

fn tcp(dst: [u8; 4], sport: u16, syn: bool, ack: bool, rst: bool) -> Vec<u8> {
    tcp_to(dst, 5432, sport, syn, ack, rst)
}

fn tcp_to(dst: [u8; 4], dport: u16, sport: u16, syn: bool, ack: bool, rst: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let b = PacketBuilder::ipv4(CLIENT, dst, 64).tcp(sport, dport, 1000, 64240);
    let b = if syn { b.syn() } else { b };
    let b = if ack { b.ack(1) } else { b };
    let b = if rst { b.rst() } else { b };
    b.write(&mut out, &[]).expect("build");
    out
}

fn udp(dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(CLIENT, dst, 64).udp(40000, dport).write(&mut out, b"query").expect("build");
    out
}

fn echo(dst: [u8; 4], id: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(CLIENT, dst, 64).icmpv4_echo_request(id, 1).write(&mut out, b"ping").expect("build");
    out
}

fn classify(t: &mut FlowTable, raw: &[u8], tcp_known: bool, now: u64) -> Action {
    let p = packet::parse(raw).expect("a packet");
    t.classify(&p, tcp_known, 0, || now)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

#[test]
fn a_syn_is_held_while_its_destination_is_dialled() {
    let mut t = table();
    let syn = tcp([10, 0, 1, 5], 40000, true, false, false);
    let Action::Dial { key, target } = classify(&mut t, &syn, false, 0) else { panic!("a dial") };
    assert_eq!(target, addr("10.0.1.5:5432"));
    // The client's SYN again while we dial: kept as it is, no second dial.
    assert_eq!(classify(&mut t, &syn, false, 1), Action::Ignore);
    t.dialled(&key);
    // Dialled and taken by the stack: its segments go there.
    assert_eq!(classify(&mut t, &tcp([10, 0, 1, 5], 40000, false, true, false), true, 2), Action::ToStack);
}

#[test]
fn unknown_segments_are_reset_and_unknown_resets_ignored() {
    let mut t = table();
    let segment = tcp([10, 0, 1, 5], 40001, false, true, false);
    assert_eq!(classify(&mut t, &segment, false, 0), Action::Refuse(Refusal::Reset));
    let rst = tcp([10, 0, 1, 5], 40001, false, false, true);
    assert_eq!(classify(&mut t, &rst, false, 0), Action::Ignore);
}

#[test]
fn the_deny_list_refuses_metadata_and_loopback_with_the_right_answer() {
    let mut t = table();
    let imds = tcp([169, 254, 169, 254], 40000, true, false, false);
    assert_eq!(classify(&mut t, &imds, false, 0), Action::Refuse(Refusal::Reset));
    let loopback = udp([127, 0, 0, 1], 53);
    assert_eq!(classify(&mut t, &loopback, false, 0), Action::Refuse(Refusal::Unreachable(Unreachable::Prohibited)));
    let ping = echo([169, 254, 169, 254], 7);
    assert_eq!(classify(&mut t, &ping, false, 0), Action::Refuse(Refusal::Unreachable(Unreachable::Prohibited)));
    // Outside the allowed ranges is refused too.
    assert_eq!(
        classify(&mut t, &udp([8, 8, 8, 8], 53), false, 0),
        Action::Refuse(Refusal::Unreachable(Unreachable::Prohibited))
    );
    assert_eq!(t.denied, 4);
}

#[test]
fn dns_to_the_tunnel_resolver_goes_to_the_instances_resolver() {
    let mut t = table();
    let query = udp(TUNNEL_DNS, 53);
    let Action::Udp { open: Some(target), .. } = classify(&mut t, &query, false, 0) else { panic!("a new UDP flow") };
    assert_eq!(target, addr("10.0.0.2:53"));
    let dns_over_tcp = tcp_to(TUNNEL_DNS, 53, 40000, true, false, false);
    let Action::Dial { target, .. } = classify(&mut t, &dns_over_tcp, false, 0) else {
        panic!("DNS over TCP is dialled too")
    };
    assert_eq!(target, addr("10.0.0.2:53"));
    assert_eq!(t.dns_queries, 2);
    // Another port of the same address is not DNS: it goes where it is addressed.
    let other = classify(&mut t, &udp(TUNNEL_DNS, 54), false, 0);
    assert!(matches!(other, Action::Udp { open: Some(a), .. } if a == addr("100.127.0.2:54")), "{other:?}");
}

#[test]
fn without_a_resolver_on_the_instance_dns_is_answered_unreachable() {
    let limits = Limits {
        policy: Policy::new(&[], &[], false),
        resolvers: vec![],
        max_tcp_flows: 2,
        max_udp_flows: 2,
        idle_ms: 30_000,
    };
    let mut t = FlowTable::new(limits, vec![IpAddr::from(TUNNEL_DNS)]);
    let query = udp(TUNNEL_DNS, 53);
    assert_eq!(classify(&mut t, &query, false, 0), Action::Refuse(Refusal::Unreachable(Unreachable::Host)));
}

#[test]
fn udp_flows_open_once_and_expire_when_idle() {
    let mut t = table();
    let d = udp([10, 0, 2, 2], 5353);
    let Action::Udp { key, open: Some(_) } = classify(&mut t, &d, false, 0) else { panic!("new flow") };
    let last = t.udp_opened(key, 0);
    assert_eq!(classify(&mut t, &d, false, 10_000), Action::Udp { key, open: None }, "the flow exists");
    // A reply at 25 s (the socket's task moves the clock) keeps it alive past 30 s of the first datagram.
    last.store(25_000, Ordering::Relaxed);
    assert_eq!(t.expire(40_000), (vec![], vec![]));
    assert_eq!(t.expire(55_000), (vec![key], vec![]));
    assert_eq!(t.udp_flows(), 0);
    assert!(matches!(classify(&mut t, &d, false, 56_000), Action::Udp { open: Some(_), .. }), "opened afresh");
}

#[test]
fn ping_flows_are_per_identifier_and_expire() {
    let mut t = table();
    let Action::Echo { key, open: true } = classify(&mut t, &echo([10, 0, 2, 2], 7), false, 0) else { panic!() };
    t.echo_opened(key, 0);
    assert_eq!(classify(&mut t, &echo([10, 0, 2, 2], 7), false, 1_000), Action::Echo { key, open: false });
    assert!(matches!(classify(&mut t, &echo([10, 0, 2, 2], 8), false, 1_000), Action::Echo { open: true, .. }));
    assert_eq!(t.expire(31_000), (vec![], vec![key]));
}

#[test]
fn the_tcp_flow_limit_counts_dials_under_way() {
    let mut t = table();
    assert!(matches!(classify(&mut t, &tcp([10, 0, 1, 5], 1, true, false, false), false, 0), Action::Dial { .. }));
    let p_raw = tcp([10, 0, 1, 5], 2, true, false, false);
    let p = packet::parse(&p_raw).expect("packet");
    // One flow in the stack plus one dial under way: the limit of two is reached.
    assert_eq!(t.classify(&p, false, 1, || 0), Action::Refuse(Refusal::Reset));
}

#[test]
fn the_udp_flow_limit_refuses_a_new_flow_and_keeps_the_open_ones() {
    let mut t = table();
    for dport in [1000, 1001] {
        let p_raw = udp([10, 0, 1, 5], dport);
        let p = packet::parse(&p_raw).expect("packet");
        let Action::Udp { key, open: Some(_) } = t.classify(&p, false, 0, || 0) else { panic!("a new flow") };
        t.udp_opened(key, 0);
    }
    let p_raw = udp([10, 0, 1, 5], 1002);
    let p = packet::parse(&p_raw).expect("packet");
    assert_eq!(t.classify(&p, false, 0, || 0), Action::Refuse(Refusal::Unreachable(Unreachable::Prohibited)));
    // The open ones still pass.
    let p_raw = udp([10, 0, 1, 5], 1000);
    let p = packet::parse(&p_raw).expect("packet");
    assert!(matches!(t.classify(&p, false, 0, || 0), Action::Udp { open: None, .. }));
}
