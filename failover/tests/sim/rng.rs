//! The seeded RNG of every simulation (xorshift64: tiny, fast, the same sequence everywhere).

/// A seeded xorshift64 generator.
pub struct Rng(pub u64);

impl Rng {
    /// The generator of run `seed` (never the all-zero state).
    pub fn from_seed(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in `0..n` (0 for n = 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// True `per_mille` times in a thousand.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
    /// Uniform in [-1, 1].
    pub fn unit(&mut self) -> f64 {
        (self.below(2_000_001) as f64 - 1e6) / 1e6
    }
}
