use super::*;
use simple_dns::{Name, Question, CLASS, QCLASS, QTYPE, TYPE};

const LAPTOP: [u8; 4] = [100, 127, 0, 1];
const RESOLVER: [u8; 4] = [100, 127, 0, 2];

fn query(names: &[&str]) -> Vec<u8> {
    let mut p = Packet::new_query(0x1234);
    for n in names {
        p.questions.push(Question::new(Name::new_unchecked(n), QTYPE::TYPE(TYPE::A), QCLASS::CLASS(CLASS::IN), false));
    }
    p.build_bytes_vec().expect("query")
}

fn to_resolver(payload: &[u8], port: u16) -> Vec<u8> {
    ip::udp(SocketAddr::new(LAPTOP.into(), 40000), SocketAddr::new(RESOLVER.into(), port), payload).expect("packet")
}

fn split() -> SplitDns {
    SplitDns::new(
        vec![IpAddr::from(RESOLVER)],
        vec![Domain::parse("corp.internal").expect("domain"), Domain::parse("eu-west-1.compute.internal").expect("d")],
    )
}

#[test]
fn domains_are_validated_and_normalised() {
    assert_eq!(Domain::parse("Corp.Internal.").expect("ok").as_str(), "corp.internal");
    assert!(matches!(Domain::parse("internal"), Err(DomainError::TopLevel(_))));
    for bad in ["", ".", "a..b", "-a.b", "a-.b", "a b.c", "a_b.c", &"x".repeat(64), "*.corp.internal"] {
        assert!(matches!(Domain::parse(bad), Err(DomainError::Invalid(_))), "{bad:?}");
    }
}

#[test]
fn a_domain_contains_itself_and_names_below_it_only() {
    let d = Domain::parse("corp.internal").expect("domain");
    assert!(d.contains("corp.internal"));
    assert!(d.contains("db.corp.internal."));
    assert!(d.contains("A.B.CORP.INTERNAL"));
    assert!(!d.contains("evilcorp.internal"));
    assert!(!d.contains("corp.internal.example.com"));
    assert!(!d.contains("internal"));
}

#[test]
fn queries_for_configured_domains_go_through_the_tunnel() {
    let s = split();
    let p = to_resolver(&query(&["db.corp.internal"]), 53);
    assert_eq!(s.inspect(&p), Verdict::Forward);
    let p = to_resolver(&query(&["ip-10-0-1-5.eu-west-1.compute.internal"]), 53);
    assert_eq!(s.inspect(&p), Verdict::Forward);
    assert_eq!(s.forwarded.load(Ordering::Relaxed), 2);
    assert_eq!(s.refused.load(Ordering::Relaxed), 0);
}

#[test]
fn other_names_are_refused_on_the_laptop() {
    let s = split();
    let q = query(&["www.example.com"]);
    let Verdict::Answer(reply) = s.inspect(&to_resolver(&q, 53)) else { panic!("forwarded") };
    // The answer comes from the resolver address to the asking socket.
    let sliced = SlicedPacket::from_ip(&reply).expect("ip");
    let Some(NetSlice::Ipv4(ip)) = &sliced.net else { panic!("not ipv4") };
    assert_eq!(ip.header().source_addr().octets(), RESOLVER);
    assert_eq!(ip.header().destination_addr().octets(), LAPTOP);
    let Some(TransportSlice::Udp(u)) = sliced.transport else { panic!("not udp") };
    assert_eq!((u.source_port(), u.destination_port()), (53, 40000));
    let answer = Packet::parse(u.payload()).expect("dns");
    assert_eq!(answer.id(), 0x1234);
    assert!(answer.has_flags(PacketFlag::RESPONSE));
    assert_eq!(answer.rcode(), RCODE::Refused);
    assert_eq!(answer.questions.len(), 1);
    assert_eq!(answer.questions[0].qname.to_string(), "www.example.com");
    assert_eq!(s.refused.load(Ordering::Relaxed), 1);
    assert_eq!(s.forwarded.load(Ordering::Relaxed), 0);
}

#[test]
fn a_query_mixing_inside_and_outside_names_is_refused() {
    let s = split();
    let p = to_resolver(&query(&["db.corp.internal", "www.example.com"]), 53);
    assert!(matches!(s.inspect(&p), Verdict::Answer(_)));
}

#[test]
fn garbage_to_the_resolver_is_neither_forwarded_nor_answered() {
    let s = split();
    assert_eq!(s.inspect(&to_resolver(&[1, 2, 3], 53)), Verdict::Answer(Vec::new()));
}

#[test]
fn other_traffic_passes_untouched() {
    let s = split();
    // Another port on the resolver address, DNS to another server, TCP, junk.
    assert_eq!(s.inspect(&to_resolver(&query(&["www.example.com"]), 5353)), Verdict::Forward);
    let elsewhere = ip::udp(
        SocketAddr::new(LAPTOP.into(), 40000),
        SocketAddr::new([10, 0, 0, 2].into(), 53),
        &query(&["www.example.com"]),
    )
    .expect("packet");
    assert_eq!(s.inspect(&elsewhere), Verdict::Forward);
    let mut tcp = to_resolver(&query(&["www.example.com"]), 53);
    tcp[9] = 6;
    assert_eq!(s.inspect(&tcp), Verdict::Forward);
    assert_eq!(s.inspect(&[]), Verdict::Forward);
    assert_eq!(s.inspect(&[0x45, 0, 0]), Verdict::Forward);
    assert_eq!(s.refused.load(Ordering::Relaxed), 0);
}
