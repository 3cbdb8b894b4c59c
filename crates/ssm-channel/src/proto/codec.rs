//! The Session Manager "ClientMessage"/"AgentMessage" binary frame.
//!
//! Layout (all integers big-endian), from `src/message/messageparser.go` in
//! aws/session-manager-plugin and `agent/session/contracts/agentmessage.go` in
//! aws/amazon-ssm-agent:
//!
//! | offset | size | field                                          |
//! |-------:|-----:|------------------------------------------------|
//! |      0 |    4 | HeaderLength (116 when we write)               |
//! |      4 |   32 | MessageType, ASCII, space padded               |
//! |     36 |    4 | SchemaVersion                                  |
//! |     40 |    8 | CreatedDate, ms since the epoch, never 0       |
//! |     48 |    8 | SequenceNumber                                 |
//! |     56 |    8 | Flags                                          |
//! |     64 |   16 | MessageId, UUID with its two halves swapped    |
//! |     80 |   32 | SHA-256 of the payload                         |
//! |    112 |    4 | PayloadType (only when HeaderLength >= 116)    |
//! |     HL |    4 | PayloadLength                                  |
//! |   HL+4 |    n | Payload                                        |
//!
//! The service sends `channel_closed` with HeaderLength 112 (no PayloadType), so
//! the reader is HeaderLength-aware: PayloadLength sits at `HL` and the payload
//! starts at `HL + 4`.

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// HeaderLength every sender writes: the offset of the PayloadLength field.
pub const HEADER_LENGTH: u32 = 116;
/// Size of a header as we emit it, PayloadLength included.
pub const HEADER_SIZE: usize = HEADER_LENGTH as usize + 4;
/// The shortest HeaderLength we accept: everything up to and including the digest.
const MIN_HEADER_LENGTH: u32 = 112;
const MESSAGE_TYPE_LEN: usize = 32;

mod offset {
    pub const MESSAGE_TYPE: usize = 4;
    pub const SCHEMA_VERSION: usize = 36;
    pub const CREATED_DATE: usize = 40;
    pub const SEQUENCE_NUMBER: usize = 48;
    pub const FLAGS: usize = 56;
    pub const MESSAGE_ID: usize = 64;
    pub const PAYLOAD_DIGEST: usize = 80;
    pub const PAYLOAD_TYPE: usize = 112;
}

/// A per-direction stream sequence number (`SequenceNumber` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SequenceNumber(pub i64);

impl SequenceNumber {
    pub fn next(self) -> Self {
        SequenceNumber(self.0 + 1)
    }
}

impl std::fmt::Display for SequenceNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Flags word. Nobody reads it, but we write what upstream writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags(pub u64);

impl Flags {
    pub const NONE: Flags = Flags(0);
    pub const SYN: Flags = Flags(1);
    /// What acknowledgements carry (SYN | FIN).
    pub const ACK: Flags = Flags(3);
}

/// The well-known message types (`src/message/clientmessage.go`).
pub mod message_type {
    pub const INPUT_STREAM_DATA: &str = "input_stream_data";
    pub const OUTPUT_STREAM_DATA: &str = "output_stream_data";
    pub const ACKNOWLEDGE: &str = "acknowledge";
    pub const CHANNEL_CLOSED: &str = "channel_closed";
    pub const START_PUBLICATION: &str = "start_publication";
    pub const PAUSE_PUBLICATION: &str = "pause_publication";
    pub const AGENT_SESSION_STATE: &str = "agent_session_state";
}

/// PayloadType values (`src/message/clientmessage.go`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PayloadType(pub u32);

impl PayloadType {
    /// Acknowledgements and control messages.
    pub const NONE: PayloadType = PayloadType(0);
    pub const OUTPUT: PayloadType = PayloadType(1);
    pub const ERROR: PayloadType = PayloadType(2);
    pub const SIZE: PayloadType = PayloadType(3);
    pub const PARAMETER: PayloadType = PayloadType(4);
    pub const HANDSHAKE_REQUEST: PayloadType = PayloadType(5);
    pub const HANDSHAKE_RESPONSE: PayloadType = PayloadType(6);
    pub const HANDSHAKE_COMPLETE: PayloadType = PayloadType(7);
    pub const ENC_CHALLENGE_REQUEST: PayloadType = PayloadType(8);
    pub const ENC_CHALLENGE_RESPONSE: PayloadType = PayloadType(9);
    pub const FLAG: PayloadType = PayloadType(10);
    pub const STDERR: PayloadType = PayloadType(11);
    pub const EXIT_CODE: PayloadType = PayloadType(12);
}

/// Why a frame was rejected. Every malformed input maps to one of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {0} bytes is shorter than the smallest header")]
    TooShort(usize),
    #[error("header length {0} is outside 112..=frame length-4")]
    BadHeaderLength(u32),
    #[error("payload length field {declared} exceeds the {present} bytes present")]
    PayloadLengthMismatch { declared: u32, present: usize },
    #[error("message type is empty")]
    EmptyMessageType,
    #[error("message type has bytes other than printable ASCII")]
    BadMessageType,
    #[error("created date is zero")]
    ZeroCreatedDate,
    #[error("payload digest does not match its SHA-256")]
    DigestMismatch,
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("message type {0:?} is empty, longer than 32 bytes or not printable ASCII")]
    BadMessageType(String),
    #[error("empty payloads are never sent (upstream's serializer rejects them)")]
    EmptyPayload,
    #[error("payload of {0} bytes does not fit the 32-bit length field")]
    PayloadTooLong(usize),
}

/// A checked, zero-copy view of a received frame.
///
/// `Frame::new_checked` validates every length so that the accessors can never
/// read out of bounds; it does not check semantics (see [`Message::parse`]).
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    buf: &'a [u8],
    header_length: u32,
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

impl<'a> Frame<'a> {
    pub fn new_checked(buf: &'a [u8]) -> Result<Self, DecodeError> {
        // Smallest frame: HL=112 header plus its 4-byte PayloadLength.
        if buf.len() < MIN_HEADER_LENGTH as usize + 4 {
            return Err(DecodeError::TooShort(buf.len()));
        }
        let header_length = be_u32(buf, 0);
        if header_length < MIN_HEADER_LENGTH || header_length as usize + 4 > buf.len() {
            return Err(DecodeError::BadHeaderLength(header_length));
        }
        let frame = Frame { buf, header_length };
        let declared = frame.payload_length();
        if declared as usize > frame.payload().len() {
            return Err(DecodeError::PayloadLengthMismatch { declared, present: frame.payload().len() });
        }
        Ok(frame)
    }

    pub fn header_length(&self) -> u32 {
        self.header_length
    }

    /// The type with NULs and then whitespace trimmed from both ends, as upstream reads it.
    pub fn message_type_raw(&self) -> &'a [u8] {
        let raw = &self.buf[offset::MESSAGE_TYPE..offset::MESSAGE_TYPE + MESSAGE_TYPE_LEN];
        let raw = trim_bytes(raw, |b| b == 0);
        trim_bytes(raw, |b| b.is_ascii_whitespace())
    }

    pub fn schema_version(&self) -> u32 {
        be_u32(self.buf, offset::SCHEMA_VERSION)
    }

    pub fn created_date(&self) -> u64 {
        be_u64(self.buf, offset::CREATED_DATE)
    }

    pub fn sequence_number(&self) -> SequenceNumber {
        SequenceNumber(be_u64(self.buf, offset::SEQUENCE_NUMBER) as i64)
    }

    pub fn flags(&self) -> Flags {
        Flags(be_u64(self.buf, offset::FLAGS))
    }

    pub fn message_id(&self) -> Uuid {
        let wire = &self.buf[offset::MESSAGE_ID..offset::MESSAGE_ID + 16];
        let mut b = [0u8; 16];
        // Upstream writes the least significant half first.
        b[..8].copy_from_slice(&wire[8..]);
        b[8..].copy_from_slice(&wire[..8]);
        Uuid::from_bytes(b)
    }

    pub fn payload_digest(&self) -> &'a [u8] {
        &self.buf[offset::PAYLOAD_DIGEST..offset::PAYLOAD_DIGEST + 32]
    }

    /// `None` for the short (HL=112) header that has no PayloadType field.
    pub fn payload_type(&self) -> Option<PayloadType> {
        (self.header_length >= HEADER_LENGTH).then(|| PayloadType(be_u32(self.buf, offset::PAYLOAD_TYPE)))
    }

    pub fn payload_length(&self) -> u32 {
        be_u32(self.buf, self.header_length as usize)
    }

    /// Everything after the PayloadLength field, as both upstream parsers slice it.
    pub fn payload(&self) -> &'a [u8] {
        &self.buf[self.header_length as usize + 4..]
    }
}

fn trim_bytes(mut s: &[u8], pred: impl Fn(u8) -> bool) -> &[u8] {
    while let [first, rest @ ..] = s {
        if pred(*first) {
            s = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = s {
        if pred(*last) {
            s = rest;
        } else {
            break;
        }
    }
    s
}

/// An owned message: what [`Message::parse`] returns and [`Message::emit`] writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub message_type: String,
    pub schema_version: u32,
    pub created_date: u64,
    pub sequence_number: SequenceNumber,
    pub flags: Flags,
    pub message_id: Uuid,
    /// `None` only for frames that arrived with the short HL=112 header.
    pub payload_type: Option<PayloadType>,
    pub payload: Vec<u8>,
}

impl Message {
    /// Parses and validates a frame the way the plugin does (`Validate` in
    /// `messageparser.go`): type present, CreatedDate non-zero, digest correct
    /// when PayloadLength is non-zero. Publication control messages skip the
    /// semantic checks, as upstream does.
    pub fn parse(buf: &[u8]) -> Result<Message, DecodeError> {
        let frame = Frame::new_checked(buf)?;
        let raw_type = frame.message_type_raw();
        // Real types are printable ASCII words; anything else (inner NULs,
        // control bytes) would not survive a re-emit and matches no handler.
        if !raw_type.iter().all(u8::is_ascii_graphic) {
            return Err(DecodeError::BadMessageType);
        }
        let message_type = String::from_utf8_lossy(raw_type).into_owned();
        let lenient =
            message_type == message_type::START_PUBLICATION || message_type == message_type::PAUSE_PUBLICATION;
        if !lenient {
            if message_type.is_empty() {
                return Err(DecodeError::EmptyMessageType);
            }
            if frame.created_date() == 0 {
                return Err(DecodeError::ZeroCreatedDate);
            }
            if frame.payload_length() != 0 && Sha256::digest(frame.payload()).as_slice() != frame.payload_digest() {
                return Err(DecodeError::DigestMismatch);
            }
        }
        Ok(Message {
            message_type,
            schema_version: frame.schema_version(),
            created_date: frame.created_date(),
            sequence_number: frame.sequence_number(),
            flags: frame.flags(),
            message_id: frame.message_id(),
            payload_type: frame.payload_type(),
            payload: frame.payload().to_vec(),
        })
    }

    /// The size of the frame [`Message::emit`] writes.
    pub fn encoded_len(&self) -> usize {
        HEADER_SIZE + self.payload.len()
    }

    /// Writes the frame with HL=116 and a space-padded type, as upstream does.
    pub fn emit(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let t = self.message_type.as_bytes();
        if t.is_empty() || t.len() > MESSAGE_TYPE_LEN || !t.iter().all(u8::is_ascii_graphic) {
            return Err(EncodeError::BadMessageType(self.message_type.clone()));
        }
        if self.payload.is_empty() {
            return Err(EncodeError::EmptyPayload);
        }
        let payload_len =
            u32::try_from(self.payload.len()).map_err(|_| EncodeError::PayloadTooLong(self.payload.len()))?;
        out.reserve(self.encoded_len());
        out.extend_from_slice(&HEADER_LENGTH.to_be_bytes());
        out.extend_from_slice(t);
        out.resize(out.len() + MESSAGE_TYPE_LEN - t.len(), b' ');
        out.extend_from_slice(&self.schema_version.to_be_bytes());
        out.extend_from_slice(&self.created_date.to_be_bytes());
        out.extend_from_slice(&(self.sequence_number.0 as u64).to_be_bytes());
        out.extend_from_slice(&self.flags.0.to_be_bytes());
        let id = self.message_id.as_bytes();
        out.extend_from_slice(&id[8..]);
        out.extend_from_slice(&id[..8]);
        out.extend_from_slice(&Sha256::digest(&self.payload));
        out.extend_from_slice(&self.payload_type.unwrap_or(PayloadType::NONE).0.to_be_bytes());
        out.extend_from_slice(&payload_len.to_be_bytes());
        out.extend_from_slice(&self.payload);
        Ok(())
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, EncodeError> {
        let mut v = Vec::with_capacity(self.encoded_len());
        self.emit(&mut v)?;
        Ok(v)
    }
}

/// Writes the short HL=112, NUL-padded header the service uses for
/// `channel_closed`: no PayloadType field. Used by the emulator for fidelity.
pub fn emit_short_header(
    message_type: &str,
    created_date: u64,
    message_id: Uuid,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let t = message_type.as_bytes();
    if t.is_empty() || t.len() > MESSAGE_TYPE_LEN || !t.iter().all(u8::is_ascii_graphic) {
        return Err(EncodeError::BadMessageType(message_type.to_owned()));
    }
    if payload.is_empty() {
        return Err(EncodeError::EmptyPayload);
    }
    let payload_len = u32::try_from(payload.len()).map_err(|_| EncodeError::PayloadTooLong(payload.len()))?;
    out.extend_from_slice(&MIN_HEADER_LENGTH.to_be_bytes());
    out.extend_from_slice(t);
    out.resize(out.len() + MESSAGE_TYPE_LEN - t.len(), 0);
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&created_date.to_be_bytes());
    out.extend_from_slice(&0u64.to_be_bytes());
    out.extend_from_slice(&0u64.to_be_bytes());
    let id = message_id.as_bytes();
    out.extend_from_slice(&id[8..]);
    out.extend_from_slice(&id[..8]);
    out.extend_from_slice(&Sha256::digest(payload));
    out.extend_from_slice(&payload_len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The vector from ssm-protocol.md §3, produced by the plugin's own serializer.
    const VECTOR: &str = concat!(
        "00000074696e7075745f73747265616d",
        "5f646174612020202020202020202020",
        "20202020000000010000015e0baa7884",
        "00000000000000070000000000000000",
        "a508b5f073f31b16dd01e56bff48483e",
        "433ebf5bc03dffa38536673207a21281",
        "612cef5faa9bc7a4d5b9be2fdb12cf1a",
        "0000000a0000000400000002",
    );

    fn vector_message() -> Message {
        Message {
            message_type: message_type::INPUT_STREAM_DATA.into(),
            schema_version: 1,
            created_date: 1503434274948,
            sequence_number: SequenceNumber(7),
            flags: Flags::NONE,
            message_id: Uuid::parse_str("dd01e56b-ff48-483e-a508-b5f073f31b16").expect("valid uuid"),
            payload_type: Some(PayloadType::FLAG),
            payload: vec![0, 0, 0, 2],
        }
    }

    #[test]
    fn emits_upstream_test_vector() {
        let bytes = vector_message().to_bytes().expect("encodes");
        assert_eq!(hex::encode(&bytes), VECTOR);
        assert_eq!(bytes.len(), 124);
    }

    #[test]
    fn parses_upstream_test_vector() {
        let bytes = hex::decode(VECTOR).expect("hex");
        assert_eq!(Message::parse(&bytes).expect("parses"), vector_message());
    }

    #[test]
    fn parses_short_nul_padded_channel_closed() {
        let id = Uuid::new_v4();
        let payload = br#"{"MessageType":"channel_closed","Output":"bye"}"#;
        let mut out = Vec::new();
        emit_short_header(message_type::CHANNEL_CLOSED, 42, id, payload, &mut out).expect("encodes");
        let m = Message::parse(&out).expect("parses");
        assert_eq!(m.message_type, "channel_closed");
        assert_eq!(m.payload_type, None);
        assert_eq!(m.payload, payload);
        assert_eq!(m.message_id, id);
    }

    #[test]
    fn rejects_bad_digest_zero_date_and_short_frames() {
        let mut bytes = hex::decode(VECTOR).expect("hex");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_eq!(Message::parse(&bytes), Err(DecodeError::DigestMismatch));

        let mut m = vector_message();
        m.created_date = 0;
        assert_eq!(Message::parse(&m.to_bytes().expect("encodes")), Err(DecodeError::ZeroCreatedDate));

        assert_eq!(Message::parse(&[0; 10]), Err(DecodeError::TooShort(10)));
        let good = vector_message().to_bytes().expect("encodes");
        assert_eq!(Message::parse(&good[..119]), Err(DecodeError::BadHeaderLength(116)));
    }

    #[test]
    fn rejects_types_with_control_bytes() {
        // Found by the fuzzer: " \0\0s" trims to "\0\0s", which a re-emit would change.
        let mut bytes = vector_message().to_bytes().expect("encodes");
        bytes[4..36].copy_from_slice(&[
            b' ', 0, 0, b's', b' ', b' ', b' ', b' ', b' ', b' ', b' ', b' ', b' ', b' ', b' ', b' ', b' ', b' ', b' ',
            b' ', b' ', b' ', b' ', b' ', b' ', b' ', b' ', b' ', b' ', b' ', b' ', b' ',
        ]);
        assert_eq!(Message::parse(&bytes), Err(DecodeError::BadMessageType));
    }

    #[test]
    fn rejects_declared_length_beyond_frame() {
        let mut bytes = vector_message().to_bytes().expect("encodes");
        bytes[116..120].copy_from_slice(&5u32.to_be_bytes());
        assert_eq!(Message::parse(&bytes), Err(DecodeError::PayloadLengthMismatch { declared: 5, present: 4 }));
    }

    #[test]
    fn publication_messages_skip_validation() {
        let mut m = vector_message();
        m.message_type = message_type::PAUSE_PUBLICATION.into();
        m.created_date = 0;
        let mut bytes = m.to_bytes().expect("encodes");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        assert_eq!(Message::parse(&bytes).expect("accepted").message_type, "pause_publication");
    }

    #[test]
    fn refuses_to_emit_empty_payload_or_bad_type() {
        let mut m = vector_message();
        m.payload.clear();
        assert_eq!(m.to_bytes(), Err(EncodeError::EmptyPayload));
        let mut m = vector_message();
        m.message_type = "x".repeat(33);
        assert!(matches!(m.to_bytes(), Err(EncodeError::BadMessageType(_))));
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        (
            "[a-z_]{1,32}",
            any::<u32>(),
            1..u64::MAX,
            any::<i64>(),
            any::<u64>(),
            any::<[u8; 16]>(),
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 1..2048),
        )
            .prop_map(|(t, schema, date, seq, flags, id, pt, payload)| Message {
                message_type: t,
                schema_version: schema,
                created_date: date,
                sequence_number: SequenceNumber(seq),
                flags: Flags(flags),
                message_id: Uuid::from_bytes(id),
                payload_type: Some(PayloadType(pt)),
                payload,
            })
    }

    proptest! {
        #[test]
        fn emit_then_parse_round_trips(m in arb_message()) {
            let bytes = m.to_bytes().expect("encodes");
            prop_assert_eq!(Message::parse(&bytes).expect("parses"), m.clone());
            // And parse-then-emit reproduces the bytes.
            prop_assert_eq!(Message::parse(&bytes).expect("parses").to_bytes().expect("encodes"), bytes);
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Message::parse(&bytes);
        }

        #[test]
        fn parse_never_panics_on_mutated_frames(m in arb_message(), pos in any::<usize>(), val in any::<u8>()) {
            let mut bytes = m.to_bytes().expect("encodes");
            let i = pos % bytes.len();
            bytes[i] = val;
            let _ = Message::parse(&bytes);
        }
    }
}
