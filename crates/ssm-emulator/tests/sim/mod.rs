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

/// The client end of a simulated link: a session, or a Port machine.
pub trait Client {
    fn poll_transmit(&mut self, now: std::time::Instant) -> Option<Vec<u8>>;
    fn handle_frame(&mut self, now: std::time::Instant, frame: &[u8]);
}

impl Client for ssm_channel::session::Session {
    fn poll_transmit(&mut self, now: std::time::Instant) -> Option<Vec<u8>> {
        ssm_channel::session::Session::poll_transmit(self, now)
    }
    fn handle_frame(&mut self, now: std::time::Instant, frame: &[u8]) {
        ssm_channel::session::Session::handle_frame(self, now, frame).expect("agent frames are well-formed");
    }
}

impl Client for ssm_channel::proto::port::Port {
    fn poll_transmit(&mut self, now: std::time::Instant) -> Option<Vec<u8>> {
        ssm_channel::proto::port::Port::poll_transmit(self, now)
    }
    fn handle_frame(&mut self, now: std::time::Instant, frame: &[u8]) {
        ssm_channel::proto::port::Port::handle_frame(self, now, frame).expect("agent frames are well-formed");
    }
}

impl Link {
    /// Puts what both ends transmit on the link at `sim`, then delivers what is due.
    pub fn exchange(
        &mut self,
        sim: Duration,
        now: std::time::Instant,
        client: &mut impl Client,
        agent: &mut ssm_emulator::agent::channel::AgentChannel,
    ) {
        while let Some(f) = client.poll_transmit(now) {
            self.push(sim, true, f);
        }
        while let Some(f) = agent.poll_transmit() {
            self.push(sim, false, f);
        }
        while let Some((to_agent, frame)) = self.pop_due(sim) {
            if to_agent {
                agent.handle_frame(now, &frame);
            } else {
                client.handle_frame(now, &frame);
            }
        }
    }
}
