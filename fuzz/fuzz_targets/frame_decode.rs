//! Decoder fuzzing: parse never panics; whatever parses re-emits to a frame
//! that parses to the same message; a frame already in canonical form (what
//! every sender writes) is reproduced byte for byte by parse-then-emit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use ssm_channel::codec::{Message, PayloadType, HEADER_LENGTH};

fn is_canonical(data: &[u8], m: &Message) -> bool {
    data.len() >= 120
        && data[0..4] == HEADER_LENGTH.to_be_bytes()
        && data[4..36] == *format!("{:<32}", m.message_type).as_bytes()
        && data[80..112] == *Sha256::digest(&data[120..]).as_slice()
        && data[116..120] == (data.len() as u32 - 120).to_be_bytes()
}

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Message::parse(data) else { return };
    let Ok(out) = m.to_bytes() else { return };
    let again = Message::parse(&out).expect("our own output parses");
    // The short (HL=112) header has no PayloadType; we write 0 for it.
    let mut expect = m.clone();
    expect.payload_type = Some(m.payload_type.unwrap_or(PayloadType::NONE));
    assert_eq!(again, expect);
    assert_eq!(again.to_bytes().expect("re-emits"), out, "emit is a fixpoint");
    if is_canonical(data, &m) {
        assert_eq!(out, data, "parse-then-emit must reproduce a canonical frame");
    }
});
