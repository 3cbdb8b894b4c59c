//! Per-message costs of the pure protocol: frame parse and emit (SHA-256
//! included), a session's send-to-transmit path, and smux framing.

use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ssm_channel::codec::{message_type, Flags, Message, PayloadType, SequenceNumber};
use ssm_channel::session::{SeededEnvironment, Session, SessionConfig};
use ssm_channel::smux::{Mux, Role};

fn full_message() -> Message {
    Message {
        message_type: message_type::OUTPUT_STREAM_DATA.into(),
        schema_version: 1,
        created_date: 1_700_000_000_000,
        sequence_number: SequenceNumber(42),
        flags: Flags::NONE,
        message_id: uuid::Uuid::from_u128(7),
        payload_type: Some(PayloadType::OUTPUT),
        payload: vec![0xab; 1024],
    }
}

fn codec(c: &mut Criterion) {
    let m = full_message();
    let bytes = m.to_bytes().expect("encodes");
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Bytes(1024));
    g.bench_function("emit 1024-byte message", |b| {
        let mut out = Vec::with_capacity(2048);
        b.iter(|| {
            out.clear();
            m.emit(&mut out).expect("encodes");
        })
    });
    g.bench_function("parse 1024-byte message", |b| b.iter(|| Message::parse(&bytes).expect("parses")));
    g.finish();
}

fn session(c: &mut Criterion) {
    // An established session; the agent's side is replayed from canned frames.
    let request = br#"{"AgentVersion":"3.3.987.0","RequestedClientActions":[{"ActionType":"SessionType","ActionParameters":{"SessionType":"Port","Properties":{"type":"LocalPortForwarding","portNumber":"22"}}}]}"#;
    let agent = |seq: i64, pt: PayloadType, payload: &[u8]| {
        Message {
            sequence_number: SequenceNumber(seq),
            payload_type: Some(pt),
            payload: payload.to_vec(),
            ..full_message()
        }
        .to_bytes()
        .expect("encodes")
    };
    let now = Instant::now();
    let mut s = Session::new(SessionConfig::default(), Box::new(SeededEnvironment::new(1)));
    s.set_connected(true, now);
    s.handle_frame(now, &agent(0, PayloadType::HANDSHAKE_REQUEST, request)).expect("ok");
    s.handle_frame(
        now,
        &agent(1, PayloadType::HANDSHAKE_COMPLETE, br#"{"HandshakeTimeToComplete":1,"CustomerMessage":""}"#),
    )
    .expect("ok");
    while s.poll_transmit(now).is_some() {}
    while s.poll_event().is_some() {}
    let chunk = [0x5au8; 1024];
    let mut g = c.benchmark_group("session");
    g.throughput(Throughput::Bytes(1024));
    g.bench_function("send + transmit + ack one message", |b| {
        b.iter(|| {
            let ack_seq = s.send(&chunk).expect("room").0;
            let f = s.poll_transmit(now).expect("frame");
            let ack = format!(r#"{{"AcknowledgedMessageType":"input_stream_data","AcknowledgedMessageId":"x","AcknowledgedMessageSequenceNumber":{ack_seq},"IsSequentialMessage":true}}"#);
            let ack = Message { message_type: message_type::ACKNOWLEDGE.into(), payload_type: Some(PayloadType::NONE), payload: ack.into_bytes(), ..full_message() }
                .to_bytes()
                .expect("encodes");
            s.handle_frame(now, &ack).expect("ok");
            f
        })
    });
    let mut rx_seq = 2i64;
    g.bench_function("receive + deliver + ack one message", |b| {
        b.iter_batched(
            || {
                let f = agent(rx_seq, PayloadType::OUTPUT, &chunk);
                rx_seq += 1;
                f
            },
            |f| {
                s.handle_frame(now, &f).expect("ok");
                let ev = s.poll_event();
                let ack = s.poll_transmit(now);
                (ev, ack)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn smux(c: &mut Criterion) {
    let mut g = c.benchmark_group("smux");
    g.throughput(Throughput::Bytes(64 * 1024));
    let data = vec![1u8; 64 * 1024];
    g.bench_function("frame and deframe 64 KiB in 1024-byte pieces", |b| {
        let mut client = Mux::new(Role::Client, false).with_max_frame(4096);
        let mut server = Mux::new(Role::Server, false);
        let sid = client.open();
        b.iter(|| {
            client.write(sid, &data);
            while client.pending_output() > 0 {
                let piece = client.take_output(1024);
                server.handle_input(&piece).expect("valid");
            }
            while server.poll_event().is_some() {}
        })
    });
    g.finish();
}

criterion_group!(benches, codec, session, smux);
criterion_main!(benches);
