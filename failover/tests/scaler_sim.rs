//! Seeded simulations of the autoscaler (`failover::scaler`) in virtual time: random settings,
//! load samples at random intervals from step loads, noise within the dead band, spikes and
//! silences. Checked at every sample: the count stays within bounds; a scale-up comes at least
//! `up_cooldown` after the previous change and a scale-down at least `down_cooldown` after it;
//! And per phase: a step load is met (the count reaches what it needs within the up cool-down
//! and a sample interval); once the load is gone the count is back at the minimum within two
//! down cool-downs (plus two sample intervals), in at most two steps; a load that wanders only within the dead band around a constant makes no
//! scale-down at all once it has scaled up (no flapping). Every run prints its seed;
//! `VMATRIX_SEED=n` replays one, `VMATRIX_SEEDS=a..b` runs a range.

use std::time::Duration;

mod sim;

use failover::clones::AutoscaleSpec;
use failover::scaler::Scaler;
use sim::rng::Rng;

/// One run's world: the scaler, the count it set, and the checks of every change.
struct Run {
    seed: u64,
    spec: AutoscaleSpec,
    s: Scaler,
    now: Duration,
    current: u32,
    last_change: Option<Duration>,
    changes: Vec<(Duration, u32, u32, String)>,
    rng: Rng,
}

impl Run {
    fn new(seed: u64) -> Run {
        let mut rng = Rng::from_seed(seed);
        let max = 1 + rng.below(16) as u32;
        let spec = AutoscaleSpec {
            target: 10.0 + rng.below(90) as f64,
            min: rng.below(u64::from(max.min(3)) + 1) as u32,
            max,
            up_cooldown_ms: 200 + rng.below(3000),
            down_cooldown_ms: 1000 + rng.below(20_000),
            hysteresis: 0.1 + rng.below(30) as f64 / 100.0,
        };
        Run {
            seed,
            s: Scaler::new(spec.clone()),
            spec,
            now: Duration::ZERO,
            current: 0,
            last_change: None,
            changes: Vec::new(),
            rng,
        }
    }

    fn need(&self, load: f64) -> u32 {
        let n = ((load / self.spec.target).ceil() - 1.0).max(0.0) as u32;
        n.clamp(self.spec.min, self.spec.max)
    }

    /// Samples `load(t)` at random intervals for `d`; applies and checks each decision.
    fn drive(&mut self, d: Duration, mut load: impl FnMut(&mut Rng, Duration) -> f64) {
        let end = self.now + d;
        while self.now < end {
            self.now += Duration::from_millis(20 + self.rng.below(280));
            let l = load(&mut self.rng, self.now);
            self.s.sample(self.now, l);
            if let Some(dec) = self.s.decide(self.now, self.current) {
                self.check(&dec);
                self.changes
                    .push((self.now, self.current, dec.desired, dec.reason.clone()));
                self.current = dec.desired;
                self.last_change = Some(self.now);
                self.s.changed(self.now);
            }
        }
    }

    fn check(&self, dec: &failover::scaler::Decision) {
        let seed = self.seed;
        let (lo, hi) = (self.spec.min, self.spec.max);
        assert!(
            (lo..=hi).contains(&dec.desired),
            "seed {seed}: {} outside {lo}..={hi}",
            dec.desired
        );
        assert_ne!(
            dec.desired, self.current,
            "seed {seed}: a change to the same count"
        );
        if self.current < lo || self.current > hi {
            return; // (bringing it back into bounds is at once)
        }
        let since = self
            .last_change
            .map(|t| self.now.saturating_sub(t).as_millis() as u64);
        let cool = if dec.desired > self.current {
            self.spec.up_cooldown_ms
        } else {
            self.spec.down_cooldown_ms
        };
        assert!(
            since.is_none_or(|s| s >= cool),
            "seed {seed}: {} → {} only {since:?} ms after the last change (cool-down {cool} ms): {}",
            self.current,
            dec.desired,
            dec.reason
        );
    }

    fn ms(&self, ms: u64) -> Duration {
        Duration::from_millis(ms)
    }
}

fn run(seed: u64) {
    let mut r = Run::new(seed);
    let spec = r.spec.clone();
    // 1. Quiet start: brought to the minimum at once, nothing else.
    r.drive(r.ms(2000), |_, _| 0.0);
    assert_eq!(
        r.current, spec.min,
        "seed {seed}: not at the minimum when idle"
    );
    // 2. A step load (a flash crowd): met within the up cool-down and a sample interval.
    let level = spec.target * (1.0 + r.rng.below(20) as f64);
    let need = r.need(level);
    let t_step = r.now;
    r.drive(r.ms(spec.up_cooldown_ms + 400), |_, _| level);
    assert_eq!(
        r.current,
        need,
        "seed {seed}: load {level} needs {need} clones; {} after {:?}",
        r.current,
        r.now - t_step
    );
    // 3. The load wanders within a third of the dead band around the level: no scale-down
    //    (it may still go up, as far as the noise's peak needs).
    let band = spec.hysteresis / 3.0;
    let before = r.changes.len();
    r.drive(r.ms(spec.down_cooldown_ms * 3), move |rng, _| {
        level * (1.0 + band * rng.unit())
    });
    let downs: Vec<_> = r.changes[before..]
        .iter()
        .filter(|(_, from, to, _)| to < from)
        .collect();
    assert!(
        downs.is_empty(),
        "seed {seed}: flapped under a steady load: {downs:?}"
    );
    let top = r.need(level * (1.0 + band));
    assert!(
        r.current <= top,
        "seed {seed}: {} clones, the noisy load needs at most {top}",
        r.current
    );
    // 4. Spikes shorter than the down window: what it scaled to stays.
    let held = r.current;
    r.drive(r.ms(spec.down_cooldown_ms / 2), move |rng, _| {
        if rng.below(10) == 0 {
            level * 3.0
        } else {
            level
        }
    });
    assert!(r.current >= held, "seed {seed}: went down under spikes");
    // 5. A silence of the load balancer (no samples past STALE): the count holds.
    let held = r.current;
    r.now += failover::scaler::STALE + r.ms(1000);
    assert_eq!(
        r.s.decide(r.now, r.current),
        None,
        "seed {seed}: moved without a signal"
    );
    // 6. The load goes: back to the minimum within two down cool-downs and two intervals (the
    //    first down goes to what the window before it still needed — the spikes' level, read
    //    before the silence — the second to the minimum), in at most two steps.
    let t_gone = r.now;
    let before = r.changes.len();
    r.drive(r.ms(2 * spec.down_cooldown_ms + 600), |_, _| 0.0);
    assert!(
        r.changes.len() - before <= 2,
        "seed {seed}: {:?}",
        &r.changes[before..]
    );
    assert_eq!(
        r.current,
        spec.min,
        "seed {seed}: still {} clones {:?} after the load went (held {held}); {:?}; changes {:?}",
        r.current,
        r.now - t_gone,
        r.spec,
        &r.changes[r.changes.len().saturating_sub(3)..]
    );
}

#[test]
fn seeded_loads_scale_within_bounds_and_cool_downs_without_flapping() {
    sim::for_each_seed("scaler_sim", 1..=200, run);
}
