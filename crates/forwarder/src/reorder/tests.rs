use super::*;
use proptest::prelude::*;

const BOUND: Duration = Duration::from_millis(50);

fn pkt(n: u32) -> Bytes {
    Bytes::copy_from_slice(&n.to_be_bytes())
}

fn num(p: &Bytes) -> u32 {
    u32::from_be_bytes(p[..4].try_into().expect("4 bytes"))
}

/// Pushes `seqs` at `now` and returns what came out, as numbers.
fn push_all(r: &mut Reorder, seqs: &[u32], now: Instant) -> Vec<u32> {
    let mut out = Vec::new();
    for &s in seqs {
        r.push(s, pkt(s), now, &mut |p| out.push(num(&p)));
    }
    out
}

#[test]
fn packets_in_order_pass_straight_through() {
    let mut r = Reorder::new(BOUND, 64);
    let t = Instant::now();
    assert_eq!(push_all(&mut r, &[5, 6, 7], t), [5, 6, 7]);
    assert_eq!(r.deadline(), None);
    assert_eq!(r.stats, ReorderStats { delivered: 3, ..ReorderStats::default() });
}

#[test]
fn an_early_packet_waits_for_the_one_before_it() {
    let mut r = Reorder::new(BOUND, 64);
    let t = Instant::now();
    assert_eq!(push_all(&mut r, &[0, 2, 3], t), [0]);
    assert_eq!(r.deadline(), Some(t + BOUND));
    assert_eq!(push_all(&mut r, &[1], t), [1, 2, 3]);
    assert_eq!(r.deadline(), None);
    assert_eq!(r.stats.held, 2);
    assert_eq!(r.stats.skipped, 0);
}

#[test]
fn a_gap_is_skipped_after_the_bound_and_its_late_packet_still_goes_on() {
    let mut r = Reorder::new(BOUND, 64);
    let t = Instant::now();
    assert_eq!(push_all(&mut r, &[0, 2, 4], t), [0]);
    let mut out = Vec::new();
    r.on_timeout(t + BOUND - Duration::from_millis(1), &mut |p| out.push(num(&p)));
    assert!(out.is_empty(), "nothing is skipped before the bound");
    r.on_timeout(t + BOUND, &mut |p| out.push(num(&p)));
    // 1 is given up on; 2 goes; the gap before 4 started when 1's was skipped.
    assert_eq!(out, [2]);
    assert_eq!(r.deadline(), Some(t + 2 * BOUND));
    r.on_timeout(t + 2 * BOUND, &mut |p| out.push(num(&p)));
    assert_eq!(out, [2, 4]);
    assert_eq!(push_all(&mut r, &[1, 5], t + 2 * BOUND), [1, 5]);
    assert_eq!(r.stats.skipped, 2);
    assert_eq!(r.stats.late, 1);
    assert_eq!(r.stats.delivered, 5);
}

#[test]
fn a_flush_lets_everything_held_go_in_order() {
    let mut r = Reorder::new(BOUND, 64);
    let t = Instant::now();
    push_all(&mut r, &[10, 14, 12, 13], t);
    let mut out = Vec::new();
    r.flush(&mut |p| out.push(num(&p)));
    assert_eq!(out, [12, 13, 14]);
    assert_eq!(r.stats.skipped, 1);
    assert_eq!(push_all(&mut r, &[15], t), [15]);
}

#[test]
fn too_many_held_packets_skip_the_gap_at_once() {
    let mut r = Reorder::new(BOUND, 3);
    let t = Instant::now();
    assert_eq!(push_all(&mut r, &[0, 2, 3, 4], t), [0]);
    assert_eq!(push_all(&mut r, &[5], t), [2, 3, 4, 5]);
    assert_eq!(r.held(), 0);
}

#[test]
fn numbers_wrap_around() {
    let mut r = Reorder::new(BOUND, 64);
    let t = Instant::now();
    assert_eq!(push_all(&mut r, &[u32::MAX - 1, 0, u32::MAX, 1], t), [u32::MAX - 1, u32::MAX, 0, 1]);
    assert_eq!(r.stats.skipped + r.stats.late, 0);
}

#[test]
fn a_restarted_sequence_is_followed_not_waited_for() {
    let mut r = Reorder::new(BOUND, 64);
    let t = Instant::now();
    push_all(&mut r, &[3_000_000, 3_000_002], t);
    // The peer's numbering restarted (a new agent session): 0 is not "late".
    assert_eq!(push_all(&mut r, &[0, 1], t), [3_000_002, 0, 1]);
    assert_eq!(r.stats.resyncs, 1);
}

#[test]
fn a_duplicate_is_held_once() {
    let mut r = Reorder::new(BOUND, 64);
    let t = Instant::now();
    assert_eq!(push_all(&mut r, &[0, 2, 2, 1], t), [0, 1, 2]);
}

proptest! {
    /// Any arrival order within the buffer's reach, without timeouts: every
    /// packet comes out exactly once, and in order.
    #[test]
    fn any_shuffle_comes_out_in_order(
        start in any::<u32>(),
        swaps in proptest::collection::vec((0usize..200, 0usize..200), 0..100),
    ) {
        let mut seqs: Vec<u32> = (0..200u32).map(|i| start.wrapping_add(i)).collect();
        for (a, b) in swaps {
            seqs.swap(a, b);
        }
        let mut r = Reorder::new(BOUND, 1000);
        let t = Instant::now();
        // The first packet sets where the sequence starts; the sender's first comes first.
        let first = seqs.iter().position(|&s| s == start).expect("present");
        seqs.swap(0, first);
        let out = push_all(&mut r, &seqs, t);
        let want: Vec<u32> = (0..200u32).map(|i| start.wrapping_add(i)).collect();
        prop_assert_eq!(out, want);
    }

    /// With timeouts and a small buffer: nothing is lost or doubled.
    #[test]
    fn nothing_is_lost_or_doubled(
        seqs in proptest::collection::vec(0u32..64, 1..200),
        ticks in proptest::collection::vec(any::<bool>(), 200),
    ) {
        let mut r = Reorder::new(BOUND, 8);
        let mut t = Instant::now();
        let mut out = Vec::new();
        for (i, &s) in seqs.iter().enumerate() {
            r.push(s, pkt(s), t, &mut |p| out.push(num(&p)));
            if ticks[i % ticks.len()] {
                t += BOUND;
                r.on_timeout(t, &mut |p| out.push(num(&p)));
            }
        }
        r.flush(&mut |p| out.push(num(&p)));
        let mut got = out.clone();
        got.sort_unstable();
        let mut sent = seqs.clone();
        sent.sort_unstable();
        sent.dedup();
        // Duplicates of a packet already delivered come out again (IP copes);
        // every distinct packet comes out at least once.
        got.dedup();
        prop_assert_eq!(got, sent);
        prop_assert_eq!(r.held(), 0);
    }
}
