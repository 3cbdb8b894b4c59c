//! Where a session's wall-clock time and message ids come from.

use uuid::Uuid;

/// Where wall-clock time and randomness come from. Tests inject deterministic ones.
pub trait Environment: Send {
    /// Milliseconds since the Unix epoch, for CreatedDate (never 0).
    fn wall_clock_ms(&mut self) -> u64;
    /// A fresh random message id.
    fn message_id(&mut self) -> Uuid;
}

/// The real clock and a thread-local RNG.
#[derive(Debug, Default)]
pub struct SystemEnvironment;

impl Environment for SystemEnvironment {
    fn wall_clock_ms(&mut self) -> u64 {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1);
        ms.max(1)
    }
    fn message_id(&mut self) -> Uuid {
        Uuid::new_v4()
    }
}

/// A deterministic environment for tests, benchmarks, fuzz targets and
/// simulations: a clock that starts at `ms` and ticks one millisecond per
/// reading, and message ids from a splitmix64 sequence seeded with `seed`
/// (two sessions with different seeds never share an id in practice).
#[derive(Debug, Clone)]
pub struct SeededEnvironment {
    ms: u64,
    state: u64,
}

impl SeededEnvironment {
    /// The clock starts at 2023-11-14, a date the codec accepts.
    pub fn new(seed: u64) -> Self {
        SeededEnvironment { ms: 1_700_000_000_000, state: seed }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl Environment for SeededEnvironment {
    fn wall_clock_ms(&mut self) -> u64 {
        self.ms += 1;
        self.ms
    }
    fn message_id(&mut self) -> Uuid {
        Uuid::from_u64_pair(self.next(), self.next())
    }
}
