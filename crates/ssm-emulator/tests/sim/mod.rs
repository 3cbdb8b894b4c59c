//! What the simulated pair harnesses share: a seeded link between client and
//! agent that delays, drops, duplicates and reorders frames.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, Copy)]
pub struct LinkFaults {
    pub drop: f64,
    pub duplicate: f64,
    pub base_delay_ms: u64,
    /// Uniform extra delay; anything above 0 reorders frames.
    pub jitter_ms: u64,
}

/// Frames in flight: (deliver at, tie-breaker) -> (to agent?, bytes).
pub struct Link {
    rng: StdRng,
    faults: LinkFaults,
    queue: BinaryHeap<Reverse<(Duration, u64)>>,
    frames: BTreeMap<u64, (bool, Vec<u8>)>,
    n: u64,
    pub dropped: u64,
    pub duplicated: u64,
}

impl Link {
    pub fn new(seed: u64, faults: LinkFaults) -> Self {
        Link {
            rng: StdRng::seed_from_u64(seed),
            faults,
            queue: BinaryHeap::new(),
            frames: BTreeMap::new(),
            n: 0,
            dropped: 0,
            duplicated: 0,
        }
    }

    pub fn push(&mut self, at: Duration, to_agent: bool, frame: Vec<u8>) {
        if self.rng.random_bool(self.faults.drop) {
            self.dropped += 1;
            return;
        }
        let copies = if self.rng.random_bool(self.faults.duplicate) {
            self.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self.faults.base_delay_ms + self.rng.random_range(0..=self.faults.jitter_ms);
            self.n += 1;
            self.queue.push(Reverse((at + Duration::from_millis(delay), self.n)));
            self.frames.insert(self.n, (to_agent, frame.clone()));
        }
    }

    pub fn next_due(&self) -> Option<Duration> {
        self.queue.peek().map(|Reverse((t, _))| *t)
    }

    pub fn pop_due(&mut self, now: Duration) -> Option<(bool, Vec<u8>)> {
        match self.queue.peek() {
            Some(Reverse((t, _))) if *t <= now => {
                let Reverse((_, n)) = self.queue.pop()?;
                self.frames.remove(&n)
            }
            _ => None,
        }
    }
}
