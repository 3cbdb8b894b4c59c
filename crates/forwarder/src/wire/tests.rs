use super::*;
use proptest::prelude::*;

fn hello() -> Hello {
    Hello {
        version: VERSION,
        role: Role::Client,
        caps: caps::PING | caps::IPV6,
        mtu: 1400,
        client_id: [7; 16],
        software: "ssm-proxy 0.1.0".into(),
        resolvers: vec!["10.0.0.2".parse().expect("addr"), "fd00:ec2::253".parse().expect("addr")],
        dns: vec!["100.127.0.2".parse().expect("addr")],
        vpc: Some(("vpc-0abc".into(), "eu-west-1".into())),
        dns_domains: vec!["corp.internal".into(), "ec2.internal".into()],
    }
}

/// The fixed part of [`hello`] only: no options at all.
fn bare_hello() -> Hello {
    Hello { software: String::new(), resolvers: vec![], dns: vec![], vpc: None, dns_domains: vec![], ..hello() }
}

fn all_frames() -> Vec<Frame> {
    vec![
        Frame::Hello(hello()),
        Frame::Packet(Bytes::from_static(&[0x45, 0, 0, 20, 1, 2, 3])),
        Frame::Ping(0x0102_0304_0506_0708),
        Frame::Pong(u64::MAX),
        Frame::Ack(1 << 40),
        Frame::Goodbye { reason: Reason::Shutdown, message: "agent stopping".into() },
        Frame::Status(r#"{"software":"ec2-agent 0.1.0","sessions":2}"#.into()),
        Frame::Packet(Bytes::from(vec![0x60; 1400])),
        Frame::Seq { flow: 513, seq: 0xfffe_0001, packet: Bytes::from_static(&[0x45, 0, 0, 20]) },
    ]
}

fn decode_all(bytes: &[u8]) -> Vec<Frame> {
    let mut d = Deframer::new();
    d.push(bytes);
    let mut out = Vec::new();
    while let Some(f) = d.next_frame().expect("valid stream") {
        out.push(f);
    }
    assert_eq!(d.pending(), 0);
    out
}

#[test]
fn every_frame_round_trips() {
    let mut out = BytesMut::new();
    for f in all_frames() {
        encode(&f, &mut out);
    }
    assert_eq!(decode_all(&out), all_frames());
}

#[test]
fn the_vpc_option_is_vpc_space_region() {
    let mut out = BytesMut::new();
    let h = Hello { vpc: hello().vpc, ..bare_hello() };
    encode(&Frame::Hello(h.clone()), &mut out);
    let option = [&[tlv::VPC, 18][..], b"vpc-0abc eu-west-1"].concat();
    assert!(out.ends_with(&option), "{out:?}");
    assert_eq!(decode_all(&out), vec![Frame::Hello(h)]);
    // Without a region it is malformed, not silently half-read.
    let mut bad = out[..out.len() - option.len()].to_vec();
    bad.extend_from_slice(&[tlv::VPC, 8]);
    bad.extend_from_slice(b"vpc-0abc");
    bad[2] -= 10; // the body is 10 bytes shorter
    let mut d = Deframer::new();
    d.push(&bad);
    assert!(d.next_frame().is_err());
}

#[test]
fn hello_bytes_are_as_specified() {
    let mut out = BytesMut::new();
    let h = Hello {
        software: "x".into(),
        resolvers: vec!["10.0.0.2".parse().expect("addr")],
        dns: vec!["100.127.0.2".parse().expect("addr")],
        vpc: None,
        dns_domains: vec![],
        ..hello()
    };
    encode(&Frame::Hello(h), &mut out);
    let mut want = vec![T_HELLO, 0, 30 + 3 + 6 + 6];
    want.extend_from_slice(b"SSMP");
    want.extend_from_slice(&[1, 1, 0, 0]); // version, role client, reserved
    want.extend_from_slice(&[0, 0, 0, 3]); // caps PING | IPV6
    want.extend_from_slice(&[0x05, 0x78]); // mtu 1400
    want.extend_from_slice(&[7; 16]);
    want.extend_from_slice(&[tlv::SOFTWARE, 1, b'x']);
    want.extend_from_slice(&[tlv::RESOLVER, 4, 10, 0, 0, 2]);
    want.extend_from_slice(&[tlv::DNS_ADDRESS, 4, 100, 127, 0, 2]);
    assert_eq!(&out[..], &want[..]);
}

#[test]
fn packet_frame_is_three_bytes_of_overhead() {
    let mut out = BytesMut::new();
    encode_packet(&[0x45, 9, 9], &mut out);
    assert_eq!(&out[..], &[T_PACKET, 0, 3, 0x45, 9, 9]);
}

#[test]
fn ack_frame_bytes_are_as_specified() {
    let mut out = BytesMut::new();
    encode(&Frame::Ack(0x0102_0304_0506_0708), &mut out);
    assert_eq!(&out[..], &[T_ACK, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
}

#[test]
fn unknown_hello_options_are_skipped() {
    let mut out = BytesMut::new();
    encode(&Frame::Hello(bare_hello()), &mut out);
    // Append an unknown option (type 99) and fix the length.
    out.extend_from_slice(&[99, 2, 0xaa, 0xbb]);
    let len = (out.len() - HEADER_LEN) as u16;
    out[1..3].copy_from_slice(&len.to_be_bytes());
    let frames = decode_all(&out);
    assert!(matches!(&frames[0], Frame::Hello(h) if h.mtu == 1400 && h.software.is_empty()));
}

#[test]
fn bad_streams_are_named_errors() {
    let cases: Vec<(Vec<u8>, WireError)> = vec![
        (vec![0x09, 0, 0], WireError::UnknownType(9)),
        (vec![T_PING, 0, 4, 1, 2, 3, 4], WireError::BadLength { kind: T_PING, len: 4, expected: "8" }),
        (vec![T_ACK, 0, 2, 1, 2], WireError::BadLength { kind: T_ACK, len: 2, expected: "8" }),
        (vec![T_PACKET, 0, 0], WireError::EmptyPacket),
        (vec![T_GOODBYE, 0, 1, 77], WireError::BadReason(77)),
        (
            {
                let mut v = vec![T_HELLO, 0, 30];
                v.extend_from_slice(b"HTTP");
                v.extend_from_slice(&[0; 26]);
                v
            },
            WireError::BadMagic(*b"HTTP"),
        ),
        (
            {
                let mut out = BytesMut::new();
                encode(&Frame::Hello(bare_hello()), &mut out);
                out.extend_from_slice(&[tlv::SOFTWARE, 5, b'a']);
                let len = (out.len() - HEADER_LEN) as u16;
                out[1..3].copy_from_slice(&len.to_be_bytes());
                out.to_vec()
            },
            WireError::BadHello("truncated option"),
        ),
    ];
    for (bytes, want) in cases {
        let mut d = Deframer::new();
        d.push(&bytes);
        assert_eq!(d.next_frame(), Err(want));
    }
    // An unknown type is reported from its header alone, without waiting for a body.
    let mut d = Deframer::new();
    d.push(&[0x47, 0x45, 0x54]);
    assert_eq!(d.next_frame(), Err(WireError::UnknownType(0x47)));
}

proptest! {
    /// Any split of a valid stream into chunks yields exactly the same frames.
    #[test]
    fn any_split_yields_the_same_frames(cuts in proptest::collection::vec(0usize..2000, 0..40)) {
        let mut stream = BytesMut::new();
        for f in all_frames() {
            encode(&f, &mut stream);
        }
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.sort_unstable();
        let mut d = Deframer::new();
        let mut got = Vec::new();
        let mut last = 0;
        for c in cuts.into_iter().chain(std::iter::once(stream.len())) {
            d.push(&stream[last..c]);
            last = c;
            while let Some(f) = d.next_frame().expect("valid") {
                got.push(f);
            }
        }
        prop_assert_eq!(got, all_frames());
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let mut d = Deframer::new();
        d.push(&bytes);
        while let Ok(Some(_)) = d.next_frame() {}
    }
}

#[test]
fn the_link_mtu_is_the_smaller_hello_and_never_below_ipv6s_minimum() {
    assert_eq!(negotiate_mtu(1400, 9000), 1400);
    assert_eq!(negotiate_mtu(9000, 1500), 1500);
    assert_eq!(negotiate_mtu(1400, 576), MIN_MTU, "a peer's tiny MTU claim is raised to the floor");
    assert_eq!(negotiate_mtu(0, 0), MIN_MTU);
}

#[test]
fn a_seq_frame_is_its_flow_and_number_then_the_packet() {
    let mut out = BytesMut::new();
    encode(&Frame::Seq { flow: 3, seq: 7, packet: Bytes::from_static(&[0x45, 1]) }, &mut out);
    assert_eq!(&out[..], &[T_SEQ, 0, 8, 0, 3, 0, 0, 0, 7, 0x45, 1]);
    // A number without a packet is not a frame.
    let mut d = Deframer::new();
    d.push(&[T_SEQ, 0, 6, 0, 3, 0, 0, 0, 7]);
    assert!(matches!(d.next_frame(), Err(WireError::BadLength { kind: T_SEQ, len: 6, .. })));
}
