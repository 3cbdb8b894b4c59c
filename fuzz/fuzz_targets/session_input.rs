//! Session fuzzing: a client session fed arbitrary frames (and frames built
//! from fuzz data so they pass the codec) never panics and never emits a frame
//! it could not parse itself.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use ssm_channel::codec::{message_type, Flags, Message, PayloadType, SequenceNumber};
use ssm_channel::session::{SeededEnvironment, Session, SessionConfig};

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut s = Session::new(SessionConfig { max_in_flight: 8, reorder_capacity: 16, receive_buffer_bytes: 256, ..Default::default() }, Box::new(SeededEnvironment::new(1)));
    s.set_connected(true, t0);
    let mut now = t0;
    for (i, chunk) in data.chunks(64).enumerate() {
        now += Duration::from_millis(chunk.first().copied().unwrap_or(0) as u64);
        if i % 2 == 0 {
            let _ = s.handle_frame(now, chunk);
        } else {
            let (kind, rest) = chunk.split_first().unwrap_or((&0, &[]));
            let (mt, pt) = match kind % 4 {
                0 => (message_type::OUTPUT_STREAM_DATA, PayloadType((kind / 4 % 13) as u32)),
                1 => (message_type::ACKNOWLEDGE, PayloadType::NONE),
                2 => (message_type::PAUSE_PUBLICATION, PayloadType::NONE),
                _ => (message_type::CHANNEL_CLOSED, PayloadType::NONE),
            };
            let seq = rest.first().copied().unwrap_or(0) as i64 % 8;
            let payload = if rest.len() > 1 { rest[1..].to_vec() } else { vec![b'{', b'}'] };
            let m = Message { message_type: mt.into(), schema_version: 1, created_date: 1, sequence_number: SequenceNumber(seq), flags: Flags::NONE, message_id: uuid::Uuid::nil(), payload_type: Some(pt), payload };
            if let Ok(b) = m.to_bytes() {
                let _ = s.handle_frame(now, &b);
            }
        }
        if s.can_send() {
            let _ = s.send(chunk.get(..chunk.len().min(16)).filter(|c| !c.is_empty()).unwrap_or(b"x"));
        }
        if let Some(t) = s.poll_timeout() {
            if t <= now {
                s.handle_timeout(now);
            }
        }
        while let Some(f) = s.poll_transmit(now) {
            Message::parse(&f).expect("the session emits valid frames");
        }
        while s.poll_event().is_some() {}
        if i == 10 {
            s.set_connected(false, now);
            s.set_connected(true, now);
        }
    }
});
