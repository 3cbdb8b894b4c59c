//! The forwarder <-> ec2-agent deframer: arbitrary bytes in arbitrary splits must
//! never panic, and whatever decodes must re-encode to the same frames.
#![no_main]

use bytes::BytesMut;
use forwarder::wire::{encode, Deframer, Frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let cut = (split as usize).min(rest.len());
    let mut d = Deframer::new();
    let mut frames: Vec<Frame> = Vec::new();
    for part in [&rest[..cut], &rest[cut..]] {
        d.push(part);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) | Err(_) => break,
            }
        }
    }
    let mut out = BytesMut::new();
    for f in &frames {
        encode(f, &mut out);
    }
    let mut again = Deframer::new();
    again.push(&out);
    for f in &frames {
        assert_eq!(again.next_frame().ok().flatten().as_ref(), Some(f));
    }
});
