//! smux deframer fuzzing: any byte stream, fed in any split, yields the same
//! events (or the same error) as feeding it whole, and never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssm_channel::smux::{Mux, Role};

fn run(chunks: &[&[u8]]) -> (Vec<ssm_channel::smux::MuxEvent>, Option<ssm_channel::smux::MuxError>) {
    let mut m = Mux::new(Role::Server, false);
    let mut err = None;
    for c in chunks {
        if let Err(e) = m.handle_input(c) {
            err = Some(e);
            break;
        }
    }
    (std::iter::from_fn(|| m.poll_event()).collect(), err)
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let whole = run(&[rest]);
    let step = (split as usize % 17) + 1;
    let pieces: Vec<&[u8]> = rest.chunks(step).collect();
    let split_run = run(&pieces);
    assert_eq!(whole.1, split_run.1);
    if whole.1.is_none() {
        // Data may arrive in different chunkings; compare the concatenation per kind.
        let flat = |ev: &[ssm_channel::smux::MuxEvent]| {
            let mut v = Vec::new();
            for e in ev {
                match e {
                    ssm_channel::smux::MuxEvent::Data(s, d) => v.extend(d.iter().map(|b| (2u8, s.0, *b))),
                    ssm_channel::smux::MuxEvent::Opened(s) => v.push((0, s.0, 0)),
                    ssm_channel::smux::MuxEvent::Closed(s) => v.push((1, s.0, 0)),
                }
            }
            v
        };
        assert_eq!(flat(&whole.0), flat(&split_run.0));
    }
});
