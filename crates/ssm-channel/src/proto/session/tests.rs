use super::*;
use crate::codec::emit_short_header;
use crate::payloads::{ActionStatus, HandshakeResponse};

fn session(config: SessionConfig) -> Session {
    let mut s = Session::new(config, Box::new(SeededEnvironment::new(0)));
    s.set_connected(true, Instant::now());
    s
}

fn agent_frame(seq: i64, pt: PayloadType, payload: &[u8]) -> Vec<u8> {
    Message {
        message_type: message_type::OUTPUT_STREAM_DATA.into(),
        schema_version: 1,
        created_date: 1,
        sequence_number: SequenceNumber(seq),
        flags: Flags(u64::from(seq == 0)),
        message_id: Uuid::from_u128(0xa000 + seq as u128),
        payload_type: Some(pt),
        payload: payload.to_vec(),
    }
    .to_bytes()
    .expect("encodes")
}

fn ack_frame(seq: i64) -> Vec<u8> {
    let payload = serde_json::to_vec(&Acknowledge {
        message_type: message_type::INPUT_STREAM_DATA.into(),
        message_id: Uuid::nil().to_string(),
        sequence_number: seq,
        is_sequential: true,
    })
    .expect("json");
    Message {
        message_type: message_type::ACKNOWLEDGE.into(),
        schema_version: 1,
        created_date: 1,
        sequence_number: SequenceNumber(0),
        flags: Flags::ACK,
        message_id: Uuid::from_u128(7),
        payload_type: Some(PayloadType::NONE),
        payload,
    }
    .to_bytes()
    .expect("encodes")
}

const REQUEST: &str = r#"{"AgentVersion":"3.3.987.0","RequestedClientActions":[{"ActionType":"SessionType","ActionParameters":{"SessionType":"Port","Properties":{"localPortNumber":"0","portNumber":"80","type":"LocalPortForwarding"}}}]}"#;
const COMPLETE: &str = r#"{"HandshakeTimeToComplete":1500000000,"CustomerMessage":""}"#;

fn drain(s: &mut Session, now: Instant) -> Vec<Message> {
    std::iter::from_fn(|| s.poll_transmit(now)).map(|f| Message::parse(&f).expect("valid frame")).collect()
}

fn acked_seqs(frames: &[Message]) -> Vec<i64> {
    frames
        .iter()
        .filter(|m| m.message_type == message_type::ACKNOWLEDGE)
        .map(|m| serde_json::from_slice::<Acknowledge>(&m.payload).expect("ack json").sequence_number)
        .collect()
}

fn stream_seqs(frames: &[Message]) -> Vec<i64> {
    frames.iter().filter(|m| m.message_type == message_type::INPUT_STREAM_DATA).map(|m| m.sequence_number.0).collect()
}

/// Runs the handshake; returns the session established.
fn established(config: SessionConfig) -> (Session, Instant) {
    let now = Instant::now();
    let mut s = session(config);
    s.handle_frame(now, &agent_frame(0, PayloadType::HANDSHAKE_REQUEST, REQUEST.as_bytes())).expect("ok");
    let out = drain(&mut s, now);
    s.handle_frame(now, &ack_frame(0)).expect("ok");
    s.handle_frame(now, &agent_frame(1, PayloadType::HANDSHAKE_COMPLETE, COMPLETE.as_bytes())).expect("ok");
    drain(&mut s, now);
    assert_eq!(acked_seqs(&out), vec![0]);
    while s.poll_event().is_some() {}
    assert_eq!(s.state(), &State::Established);
    (s, now)
}

#[test]
fn handshake_acks_request_answers_seq0_then_establishes() {
    let now = Instant::now();
    let mut s = session(SessionConfig::default());
    assert_eq!(s.send(b"x"), Err(SendError::NotEstablished));
    s.handle_frame(now, &agent_frame(0, PayloadType::HANDSHAKE_REQUEST, REQUEST.as_bytes())).expect("ok");
    let out = drain(&mut s, now);
    assert_eq!(out.len(), 2);
    assert_eq!(acked_seqs(&out), vec![0]);
    let resp = &out[1];
    assert_eq!(resp.sequence_number, SequenceNumber(0));
    assert_eq!(resp.payload_type, Some(PayloadType::HANDSHAKE_RESPONSE));
    let parsed: HandshakeResponse = serde_json::from_slice(&resp.payload).expect("json");
    assert_eq!(parsed.client_version, CLIENT_VERSION);
    assert_eq!(parsed.processed_client_actions[0].action_status, ActionStatus::SUCCESS);
    match s.poll_event() {
        Some(Event::Handshake(info)) => {
            assert_eq!(info.agent_version, "3.3.987.0");
            assert_eq!(info.properties["type"], "LocalPortForwarding");
            assert_eq!(info.properties["portNumber"], "80");
        }
        other => panic!("expected handshake event, got {other:?}"),
    }
    s.handle_frame(now, &agent_frame(1, PayloadType::HANDSHAKE_COMPLETE, COMPLETE.as_bytes())).expect("ok");
    assert_eq!(acked_seqs(&drain(&mut s, now)), vec![1]);
    assert_eq!(s.poll_event(), Some(Event::Established { customer_message: String::new() }));
    // The handshake response used seq 0, so data starts at 1.
    assert_eq!(s.send(b"hello"), Ok(SequenceNumber(1)));
}

const KMS_REQ: &str = r#"{"AgentVersion":"3.3.2299.0","RequestedClientActions":[{"ActionType":"KMSEncryption","ActionParameters":{"KMSKeyId":"alias/ssm","Challenge":"cmFuZG9tLWNoYWxsZW5nZQ=="}},{"ActionType":"SessionType","ActionParameters":{"SessionType":"Port","Properties":{}}}]}"#;

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).expect("base64")
}

/// KMS on: the response waits for the data key, carries its ciphertext, the
/// challenge comes back under our key, and data is sealed both ways.
#[test]
fn a_kms_handshake_waits_for_the_data_key_then_encrypts_both_ways() {
    use super::kms::{Cipher, DataKey, DataKeyRequest, End};
    let now = Instant::now();
    let mut s = session(SessionConfig::default());
    s.handle_frame(now, &agent_frame(0, PayloadType::HANDSHAKE_REQUEST, KMS_REQ.as_bytes())).expect("ok");
    let out = drain(&mut s, now);
    assert_eq!(acked_seqs(&out), vec![0]);
    assert!(stream_seqs(&out).is_empty(), "no response before the data key");
    let req = s.take_data_key_request().expect("asks for a data key");
    assert_eq!(req, DataKeyRequest { key_id: "alias/ssm".into(), challenge: Some("cmFuZG9tLWNoYWxsZW5nZQ==".into()) });
    assert_eq!(s.take_data_key_request(), None, "asked once");
    // A resent request while KMS works changes nothing.
    s.handle_frame(now, &agent_frame(0, PayloadType::HANDSHAKE_REQUEST, KMS_REQ.as_bytes())).expect("ok");
    assert!(stream_seqs(&drain(&mut s, now)).is_empty());

    let plaintext: Vec<u8> = (100..164).collect();
    s.provide_data_key(Ok(DataKey { ciphertext: b"blob".to_vec(), plaintext: plaintext.clone() }));
    let out = drain(&mut s, now);
    let resp: HandshakeResponse = serde_json::from_slice(&out[0].payload).expect("json");
    let kms = &resp.processed_client_actions[0];
    assert_eq!(kms.action_status, ActionStatus::SUCCESS);
    let result = kms.action_result.as_ref().expect("result");
    assert_eq!(result["KMSCipherTextKey"], b64(b"blob"));
    assert_eq!(result["ChallengeAcknowledgement"], true);
    assert_eq!(s.poll_event().map(|e| matches!(e, Event::Handshake(_))), Some(true));

    let agent = Cipher::new(&plaintext, End::Agent).expect("key");
    let challenge = agent.seal([3; 12], b"sixty-four random bytes, more or less");
    let req = format!(r#"{{"Challenge":"{}"}}"#, b64(&challenge));
    s.handle_frame(now, &agent_frame(1, PayloadType::ENC_CHALLENGE_REQUEST, req.as_bytes())).expect("ok");
    let out = drain(&mut s, now);
    let answer = out.iter().find(|m| m.payload_type == Some(PayloadType::ENC_CHALLENGE_RESPONSE)).expect("answer");
    let answer: serde_json::Value = serde_json::from_slice(&answer.payload).expect("json");
    let opened = agent.open(&unb64(answer["Challenge"].as_str().expect("challenge")));
    assert_eq!(opened.as_deref(), Some(&b"sixty-four random bytes, more or less"[..]));

    s.handle_frame(now, &agent_frame(2, PayloadType::HANDSHAKE_COMPLETE, COMPLETE.as_bytes())).expect("ok");
    drain(&mut s, now);
    assert!(matches!(s.poll_event(), Some(Event::Established { .. })));
    assert!(s.encrypted());
    s.send(b"SELECT 1;").expect("sent");
    let sent = drain(&mut s, now);
    let data = sent.iter().find(|m| m.payload_type == Some(PayloadType::OUTPUT)).expect("data");
    assert_ne!(data.payload, b"SELECT 1;", "sealed on the wire");
    assert_eq!(agent.open(&data.payload).as_deref(), Some(&b"SELECT 1;"[..]));
    let reply = agent.seal([4; 12], b"1");
    s.handle_frame(now, &agent_frame(3, PayloadType::OUTPUT, &reply)).expect("ok");
    assert_eq!(s.poll_event(), Some(Event::Data(b"1".to_vec())));
    // Tampered: the session ends rather than deliver it.
    let mut bad = agent.seal([5; 12], b"2");
    bad[13] ^= 1;
    s.handle_frame(now, &agent_frame(4, PayloadType::OUTPUT, &bad)).expect("ok");
    assert!(matches!(s.state(), State::Closed(CloseReason::HandshakeFailed(_))));
}

#[test]
fn a_kms_failure_answers_failed_and_ends_the_session() {
    let now = Instant::now();
    let mut s = session(SessionConfig::default());
    s.handle_frame(now, &agent_frame(0, PayloadType::HANDSHAKE_REQUEST, KMS_REQ.as_bytes())).expect("ok");
    drain(&mut s, now);
    assert!(s.take_data_key_request().is_some());
    s.provide_data_key(Err("AccessDeniedException: not authorized to perform kms:GenerateDataKey".into()));
    let out = drain(&mut s, now);
    let resp: HandshakeResponse = serde_json::from_slice(&out[0].payload).expect("json");
    assert_eq!(resp.processed_client_actions[0].action_status, ActionStatus::FAILED);
    assert!(resp.processed_client_actions[0].error.contains("kms:GenerateDataKey"));
    assert!(matches!(s.state(), State::Closed(CloseReason::HandshakeFailed(e)) if e.contains("kms:GenerateDataKey")));
}

#[test]
fn window_bounds_unacked_messages() {
    let (mut s, now) = established(SessionConfig { max_in_flight: 3, ..Default::default() });
    for i in 0..3 {
        s.send(&[i]).expect("room");
    }
    assert_eq!(s.send(b"x"), Err(SendError::WindowFull(3)));
    assert_eq!(stream_seqs(&drain(&mut s, now)), vec![1, 2, 3]);
    s.handle_frame(now, &ack_frame(2)).expect("ok");
    assert!(s.can_send());
    assert_eq!(s.send(b"y"), Ok(SequenceNumber(4)));
}

#[test]
fn retransmits_after_rto_with_identical_bytes() {
    let (mut s, now) = established(SessionConfig::default());
    let rto = s.stats().rto;
    s.send(b"payload").expect("room");
    let first = s.poll_transmit(now).expect("frame");
    assert_eq!(s.poll_timeout(), Some(now + rto));
    s.handle_timeout(now + rto - Duration::from_millis(1));
    assert!(s.poll_transmit(now).is_none());
    s.handle_timeout(now + rto);
    assert_eq!(s.poll_transmit(now + rto), Some(first));
    assert_eq!(s.stats().retransmissions, 1);
    // The expiry backed the timer off; the ack of a retransmitted message gives
    // no RTT sample (Karn), so the backoff stays until a fresh one.
    assert_eq!(s.stats().rto, rto * 2);
    s.handle_frame(now + Duration::from_millis(900), &ack_frame(1)).expect("ok");
    assert_eq!(s.stats().rto, rto * 2);
    assert_eq!(s.poll_timeout(), None);
    s.send(b"fresh").expect("room");
    let later = now + Duration::from_secs(1);
    drain(&mut s, later);
    s.handle_frame(later + Duration::from_millis(20), &ack_frame(2)).expect("ok");
    assert!(s.stats().rto < rto * 2, "a fresh sample undoes the backoff");
}

/// Runs the timer to its next expiry and returns when it was and what went out.
fn expire(s: &mut Session) -> (Instant, Vec<i64>) {
    let t = s.poll_timeout().expect("timer armed");
    s.handle_timeout(t);
    (t, stream_seqs(&drain(s, t)))
}

#[test]
fn only_the_oldest_message_is_resent_per_expiry_with_the_timer_backed_off() {
    let (mut s, now) = established(SessionConfig::default());
    for i in 0..5 {
        s.send(&[i]).expect("room");
    }
    assert_eq!(stream_seqs(&drain(&mut s, now)), vec![1, 2, 3, 4, 5]);
    let rto = s.stats().rto;
    let (t1, sent) = expire(&mut s);
    assert_eq!((t1, sent), (now + rto, vec![1]));
    let (t2, sent) = expire(&mut s);
    assert_eq!((t2, sent), (t1 + rto * 2, vec![1]));
    let (t3, _) = expire(&mut s);
    assert_eq!(t3, t2 + rto * 4);
    // Backed off up to the cap, never past it.
    let mut t = t3;
    for _ in 0..10 {
        let (next, sent) = expire(&mut s);
        assert_eq!(sent, vec![1]);
        assert!(next - t <= rto::MAX);
        t = next;
    }
    assert_eq!(s.stats().rto, rto::MAX);
    assert_eq!(s.stats().retransmissions, 13);
}

/// The real agent acks a message only once its plugin wrote it on: behind a
/// target that takes one message per 5 ms, the acks for a burst come over
/// hundreds of milliseconds, far beyond the RTO of an idle channel. As long
/// as acks keep coming, nothing is resent.
#[test]
fn acks_that_come_late_but_steadily_are_a_queue_not_a_loss() {
    let (mut s, now) = established(SessionConfig::default());
    let mut sent = Vec::new();
    let mut t = now;
    let mut acked = 0;
    for _ in 0..600 {
        while s.can_send() {
            s.send(b"bulk").expect("room");
        }
        sent.extend(stream_seqs(&drain(&mut s, t)));
        t += Duration::from_millis(5);
        if s.poll_timeout().is_some_and(|d| d <= t) {
            s.handle_timeout(t);
        }
        acked += 1;
        s.handle_frame(t, &ack_frame(acked)).expect("ok");
    }
    assert!(t - now >= Duration::from_secs(3));
    assert_eq!(s.stats().retransmissions, 0, "resent a queued message");
    let unique: std::collections::BTreeSet<_> = sent.iter().collect();
    assert_eq!(unique.len(), sent.len());
    // The window shrank to what the channel delivers (200 messages/s).
    assert_eq!(s.stats().window, MIN_WINDOW);
}

#[test]
fn a_message_overtaken_by_three_later_acks_is_resent_at_once() {
    let (mut s, now) = established(SessionConfig::default());
    s.send(&[0]).expect("room");
    s.send(&[1]).expect("room");
    drain(&mut s, now);
    // Later messages, sent more than the reorder window (1 ms here) after.
    let later = now + Duration::from_millis(5);
    for i in 2..6 {
        s.send(&[i]).expect("room");
    }
    drain(&mut s, later);
    let t = later + Duration::from_millis(2);
    s.handle_frame(t, &ack_frame(1)).expect("ok");
    // Seq 2 went missing: 3 and 4 overtake it, not yet enough.
    s.handle_frame(t, &ack_frame(3)).expect("ok");
    s.handle_frame(t, &ack_frame(4)).expect("ok");
    assert!(stream_seqs(&drain(&mut s, t)).is_empty());
    s.handle_frame(t, &ack_frame(5)).expect("ok");
    assert_eq!(stream_seqs(&drain(&mut s, t)), vec![2]);
    // Once resent, the count starts over: a later ack of 6 does not send it again.
    s.handle_frame(t, &ack_frame(6)).expect("ok");
    assert!(stream_seqs(&drain(&mut s, t)).is_empty());
    assert_eq!(s.stats().retransmissions, 1);
}

#[test]
fn out_of_order_is_acked_at_once_and_delivered_in_order() {
    let (mut s, now) = established(SessionConfig::default());
    s.handle_frame(now, &agent_frame(3, PayloadType::OUTPUT, b"c")).expect("ok");
    s.handle_frame(now, &agent_frame(4, PayloadType::OUTPUT, b"d")).expect("ok");
    assert_eq!(acked_seqs(&drain(&mut s, now)), vec![3, 4]);
    assert_eq!(s.poll_event(), None);
    s.handle_frame(now, &agent_frame(2, PayloadType::OUTPUT, b"b")).expect("ok");
    assert_eq!(acked_seqs(&drain(&mut s, now)), vec![2]);
    let data: Vec<_> = std::iter::from_fn(|| s.poll_event()).collect();
    assert_eq!(data, vec![Event::Data(b"b".to_vec()), Event::Data(b"c".to_vec()), Event::Data(b"d".to_vec())]);
}

#[test]
fn duplicates_are_reacked_and_not_redelivered() {
    let (mut s, now) = established(SessionConfig::default());
    let f = agent_frame(2, PayloadType::OUTPUT, b"once");
    s.handle_frame(now, &f).expect("ok");
    s.handle_frame(now, &f).expect("ok");
    assert_eq!(acked_seqs(&drain(&mut s, now)), vec![2, 2]);
    assert_eq!(s.poll_event(), Some(Event::Data(b"once".to_vec())));
    assert_eq!(s.poll_event(), None);
    assert_eq!(s.stats().duplicates_received, 1);
}

#[test]
fn full_receive_buffer_withholds_ack_until_app_reads() {
    let (mut s, now) = established(SessionConfig { receive_buffer_bytes: 4, ..Default::default() });
    s.handle_frame(now, &agent_frame(2, PayloadType::OUTPUT, b"abcd")).expect("ok");
    s.handle_frame(now, &agent_frame(3, PayloadType::OUTPUT, b"e")).expect("ok");
    assert_eq!(acked_seqs(&drain(&mut s, now)), vec![2], "seq 3 must not be acked while the buffer is full");
    assert_eq!(s.poll_event(), Some(Event::Data(b"abcd".to_vec())));
    // The agent resends seq 3; now there is room.
    s.handle_frame(now, &agent_frame(3, PayloadType::OUTPUT, b"e")).expect("ok");
    assert_eq!(acked_seqs(&drain(&mut s, now)), vec![3]);
    assert_eq!(s.poll_event(), Some(Event::Data(b"e".to_vec())));
}

fn shell_session() -> Session {
    session(SessionConfig { session_types: SHELL_SESSIONS, start_on_output: true, ..SessionConfig::default() })
}

/// amazon-ssm-agent runs a default shell session without a handshake: the
/// prompt is the first message. It is acked and delivered, and typing works.
#[test]
fn a_shell_session_starts_on_its_first_output_without_a_handshake() {
    let now = Instant::now();
    let mut s = shell_session();
    assert!(!s.can_send());
    s.handle_frame(now, &agent_frame(0, PayloadType::OUTPUT, b"sh-5.2$ ")).expect("ok");
    assert_eq!(acked_seqs(&drain(&mut s, now)), vec![0]);
    assert_eq!(s.poll_event(), Some(Event::Established { customer_message: String::new() }));
    assert_eq!(s.poll_event(), Some(Event::Data(b"sh-5.2$ ".to_vec())));
    assert_eq!(s.state(), &State::Established);
    assert_eq!(s.send(b"id\n"), Ok(SequenceNumber(0)), "with no handshake response, input starts at 0");
    // Later output, including some that arrived early, flows in order.
    s.handle_frame(now, &agent_frame(2, PayloadType::OUTPUT, b"b")).expect("ok");
    s.handle_frame(now, &agent_frame(1, PayloadType::OUTPUT, b"a")).expect("ok");
    let data: Vec<_> = std::iter::from_fn(|| s.poll_event()).collect();
    assert_eq!(data, vec![Event::Data(b"a".to_vec()), Event::Data(b"b".to_vec())]);
}

/// The same client still handshakes when the agent asks (KMS, Run As).
#[test]
fn a_shell_session_still_handshakes_when_the_agent_asks() {
    let now = Instant::now();
    let mut s = shell_session();
    let req = r#"{"AgentVersion":"3.3.1142.0","RequestedClientActions":[{"ActionType":"SessionType","ActionParameters":{"SessionType":"Standard_Stream","Properties":{}}}]}"#;
    s.handle_frame(now, &agent_frame(0, PayloadType::HANDSHAKE_REQUEST, req.as_bytes())).expect("ok");
    let out = drain(&mut s, now);
    assert_eq!(out[1].payload_type, Some(PayloadType::HANDSHAKE_RESPONSE));
    assert!(matches!(s.poll_event(), Some(Event::Handshake(i)) if i.session_type == "Standard_Stream"));
    assert_eq!(s.state(), &State::AwaitHandshakeComplete);
}

/// A Port session never starts without its handshake: output before it is
/// neither acked nor delivered (the agent resends it).
#[test]
fn a_port_session_does_not_start_on_output() {
    let now = Instant::now();
    let mut s = session(SessionConfig::default());
    s.handle_frame(now, &agent_frame(0, PayloadType::OUTPUT, b"early")).expect("ok");
    assert!(acked_seqs(&drain(&mut s, now)).is_empty());
    assert_eq!(s.poll_event(), None);
    assert_eq!(s.state(), &State::AwaitHandshakeRequest);
}

#[test]
fn data_before_handshake_complete_is_not_acked() {
    let now = Instant::now();
    let mut s = session(SessionConfig::default());
    s.handle_frame(now, &agent_frame(0, PayloadType::HANDSHAKE_REQUEST, REQUEST.as_bytes())).expect("ok");
    drain(&mut s, now);
    s.handle_frame(now, &agent_frame(1, PayloadType::OUTPUT, b"early")).expect("ok");
    assert!(acked_seqs(&drain(&mut s, now)).is_empty());
}

#[test]
fn pause_stops_data_but_not_acks() {
    let (mut s, now) = established(SessionConfig::default());
    let mut pause = agent_frame(0, PayloadType::NONE, b"{}");
    pause[4..36].copy_from_slice(format!("{:<32}", message_type::PAUSE_PUBLICATION).as_bytes());
    s.handle_frame(now, &pause).expect("ok");
    s.send(b"held").expect("room");
    s.handle_frame(now, &agent_frame(2, PayloadType::OUTPUT, b"x")).expect("ok");
    // Incoming stream data clears pause on the agent; we mirror that, so send a second pause.
    s.handle_frame(now, &pause).expect("ok");
    let out = drain(&mut s, now);
    assert_eq!(acked_seqs(&out), vec![2]);
    assert!(stream_seqs(&out).is_empty());
    let mut start = pause.clone();
    start[4..36].copy_from_slice(format!("{:<32}", message_type::START_PUBLICATION).as_bytes());
    s.handle_frame(now, &start).expect("ok");
    assert_eq!(stream_seqs(&drain(&mut s, now)), vec![1]);
}

#[test]
fn messages_sent_while_disconnected_go_out_after_reconnect_in_order() {
    let (mut s, now) = established(SessionConfig::default());
    s.send(b"a").expect("room");
    assert_eq!(stream_seqs(&drain(&mut s, now)), vec![1]);
    s.set_connected(false, now);
    s.send(b"b").expect("room");
    s.send(b"c").expect("room");
    assert!(s.poll_transmit(now).is_none());
    s.set_connected(true, now);
    assert_eq!(stream_seqs(&drain(&mut s, now)), vec![1, 2, 3]);
}

#[test]
fn channel_closed_with_short_header_closes() {
    let (mut s, now) = established(SessionConfig::default());
    let mut f = Vec::new();
    emit_short_header(message_type::CHANNEL_CLOSED, 5, Uuid::from_u128(1), br#"{"Output":"idle timeout"}"#, &mut f)
        .expect("encodes");
    s.handle_frame(now, &f).expect("ok");
    let reason = CloseReason::ChannelClosed { output: "idle timeout".into() };
    assert_eq!(s.poll_event(), Some(Event::Closed(reason.clone())));
    assert_eq!(s.state(), &State::Closed(reason));
    assert_eq!(s.send(b"x"), Err(SendError::Closed));
}

#[test]
fn terminate_sends_flag_and_closes_on_its_ack() {
    let (mut s, now) = established(SessionConfig::default());
    s.terminate();
    let out = drain(&mut s, now);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].payload_type, Some(PayloadType::FLAG));
    assert_eq!(out[0].payload, vec![0, 0, 0, 2]);
    s.handle_frame(now, &ack_frame(out[0].sequence_number.0)).expect("ok");
    assert_eq!(s.poll_event(), Some(Event::Closed(CloseReason::Terminated)));
}

#[test]
fn ack_timeout_closes_when_nothing_is_acked() {
    let (mut s, now) = established(SessionConfig { ack_timeout: Duration::from_secs(5), ..Default::default() });
    s.send(b"a").expect("room");
    drain(&mut s, now);
    let mut t = now;
    while !s.is_closed() {
        t = s.poll_timeout().expect("timer armed");
        s.handle_timeout(t);
        drain(&mut s, t);
    }
    assert!(t >= now + Duration::from_secs(5));
    assert_eq!(s.state(), &State::Closed(CloseReason::AckTimeout));
}

#[test]
fn a_send_after_a_long_idle_spell_is_not_an_ack_timeout() {
    let (mut s, now) = established(SessionConfig { ack_timeout: Duration::from_secs(5), ..Default::default() });
    s.send(b"a").expect("room");
    let out = drain(&mut s, now);
    s.handle_frame(now, &ack_frame(out[0].sequence_number.0)).expect("ok");
    // Ten minutes of silence with nothing outstanding, then more data.
    let later = now + Duration::from_secs(600);
    assert_eq!(s.stalled_for(later), None);
    s.send(b"b").expect("room");
    // Handed over, not yet transmitted: nothing waits for an answer yet.
    assert_eq!(s.stalled_for(later), None);
    s.handle_timeout(later);
    assert_eq!(s.state(), &State::Established);
    drain(&mut s, later);
    s.handle_timeout(later + Duration::from_millis(1));
    assert_eq!(s.state(), &State::Established);
    assert_eq!(s.stalled_for(later + Duration::from_secs(2)), Some(Duration::from_secs(2)));
}

#[test]
fn flag_from_agent_becomes_event() {
    let (mut s, now) = established(SessionConfig::default());
    s.handle_frame(now, &agent_frame(2, PayloadType::FLAG, &Flag::ConnectToPortError.to_bytes())).expect("ok");
    assert_eq!(s.poll_event(), Some(Event::Flag(Flag::ConnectToPortError)));
}

/// Acks that come out of order because the path reorders (not because a
/// message was lost): once a fast resend proves needless (its ack comes back
/// sooner than any round trip), the reorder window grows and the same late
/// arrival no longer triggers one.
#[test]
fn needless_fast_resends_widen_the_reorder_window() {
    let (mut s, now) = established(SessionConfig::default());
    // A 10 ms path: the smallest RTT is learnt from one message (after the
    // handshake's instant sample has aged out).
    let start = now + Duration::from_secs(11);
    s.send(b"a").expect("room");
    drain(&mut s, start);
    let mut t = start + Duration::from_millis(10);
    s.handle_frame(t, &ack_frame(1)).expect("ok");
    let mut needless = 0;
    let mut next_seq = 2;
    for round in 0..12 {
        // Seq k leaves 3 ms before four others; the four are acked first, then k.
        let k = next_seq;
        s.send(b"late").expect("room");
        drain(&mut s, t);
        t += Duration::from_millis(3);
        for _ in 0..4 {
            s.send(b"x").expect("room");
        }
        drain(&mut s, t);
        t += Duration::from_millis(10);
        for seq in k + 1..=k + 4 {
            s.handle_frame(t, &ack_frame(seq)).expect("ok");
        }
        let resent = stream_seqs(&drain(&mut s, t));
        t += Duration::from_millis(1);
        s.handle_frame(t, &ack_frame(k)).expect("ok");
        if resent == vec![k] {
            needless += 1;
        } else {
            assert!(resent.is_empty(), "round {round}: {resent:?}");
        }
        next_seq = k + 5;
    }
    assert!(needless >= 1, "the first late arrivals are taken for losses");
    assert!(needless <= 4, "{needless} needless resends: the window never widened");
}
