//! The autoscaler: a pure state machine. Inputs: load samples of one VM (open connections, or
//! requests per second, measured at the load balancer in front of the primary and its clones)
//! and time; settings: [`AutoscaleSpec`] (a target load per replica, min/max clones, cool-downs
//! up and down, a dead band); output: the clone count to ask for, with the reason the event log
//! shows.
//!
//! The rules:
//! - **Replicas** are the primary and its clones: `n` clones serve with `n + 1` replicas.
//! - **Up, at once and all the way**: a sample whose load needs more replicas than run
//!   (`ceil(load / target) - 1` clones) scales straight to that count, once `up_cooldown` has
//!   passed since the last change — a flash crowd is met in one step, not one clone per
//!   cool-down.
//! - **Down, late and only as far as the window allows**: the count to scale down to is the
//!   highest demand seen during the last `down_cooldown`, each sample judged against the target
//!   shrunk by the dead band (`ceil(load / (target × (1 − hysteresis))) - 1`); it happens only
//!   once `down_cooldown` has passed since the last change and the samples cover that whole
//!   window. So a load hovering near a boundary (within the band) never makes it flap: the down
//!   rule needs the load clearly below what would make the up rule fire again.
//! - **Bounds**: always within `min..=max`; a count outside (a user's manual scale, new
//!   bounds) is brought back at once.
//! - **No signal, no change**: with no sample newer than [`STALE`] it holds the count (a load
//!   balancer that stopped reporting must not read as "no load" and scale everything down).

use std::collections::VecDeque;
use std::time::Duration;

use crate::clones::AutoscaleSpec;

/// A sample older than this is no signal.
pub const STALE: Duration = Duration::from_secs(10);

/// What the autoscaler asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Clones to run.
    pub desired: u32,
    /// Why, for the event log.
    pub reason: String,
}

/// One VM's autoscaler.
#[derive(Debug, Clone)]
pub struct Scaler {
    spec: AutoscaleSpec,
    /// (time, load, clones the down rule would keep) of the samples in the down window.
    window: VecDeque<(Duration, f64, u32)>,
    /// The latest sample.
    last: Option<(Duration, f64)>,
    /// When the count last changed (by it or by anybody: see [`Scaler::changed`]).
    last_change: Option<Duration>,
}

impl Scaler {
    /// A scaler with `spec` and no sample yet.
    pub fn new(spec: AutoscaleSpec) -> Scaler {
        Scaler {
            spec,
            window: VecDeque::new(),
            last: None,
            last_change: None,
        }
    }

    /// Its settings.
    pub fn spec(&self) -> &AutoscaleSpec {
        &self.spec
    }

    /// The latest load sample.
    pub fn last_load(&self) -> Option<f64> {
        self.last.map(|(_, l)| l)
    }

    /// New settings (samples are kept).
    pub fn set_spec(&mut self, spec: AutoscaleSpec) {
        self.spec = spec;
    }

    fn clamp(&self, n: f64) -> u32 {
        let n = if n.is_finite() { n.max(0.0) } else { 0.0 };
        (n.min(f64::from(self.spec.max))) as u32
    }

    /// Clones needed for `load` at `target` per replica (before bounds).
    fn need(&self, load: f64, target: f64) -> u32 {
        let replicas = (load / target).ceil();
        self.clamp(replicas - 1.0).max(self.spec.min)
    }

    /// Records a load sample (a negative or non-finite one is ignored).
    pub fn sample(&mut self, now: Duration, load: f64) {
        if !load.is_finite() || load < 0.0 {
            return;
        }
        let keep = self.need(load, self.spec.target * (1.0 - self.spec.hysteresis));
        self.window.push_back((now, load, keep));
        self.last = Some((now, load));
        let horizon = Duration::from_millis(self.spec.down_cooldown_ms);
        // Keep one sample at or before the window's start: it says the window is covered.
        while self.window.len() > 1 && now.saturating_sub(self.window[1].0) >= horizon {
            self.window.pop_front();
        }
    }

    /// The count changed (a decision of this scaler applied, or a user's scale): cool-downs
    /// count from now.
    pub fn changed(&mut self, now: Duration) {
        self.last_change = Some(now);
    }

    fn cooled(&self, now: Duration, ms: u64) -> bool {
        self.last_change
            .is_none_or(|t| now.saturating_sub(t) >= Duration::from_millis(ms))
    }

    /// What to do with `current` clones running (or asked for) at `now`; None: keep it.
    pub fn decide(&mut self, now: Duration, current: u32) -> Option<Decision> {
        let s = &self.spec;
        if current < s.min {
            return Some(Decision {
                desired: s.min,
                reason: format!("{current} clones is below the minimum {}", s.min),
            });
        }
        if current > s.max {
            return Some(Decision {
                desired: s.max,
                reason: format!("{current} clones is above the maximum {}", s.max),
            });
        }
        let (at, load) = self.last?;
        if now.saturating_sub(at) > STALE {
            return None;
        }
        let up = self.need(load, s.target);
        if up > current && self.cooled(now, s.up_cooldown_ms) {
            return Some(Decision {
                desired: up,
                reason: format!(
                    "load {load:.1} over {} replicas is above the target {:.1} each: \
                     {current} → {up} clones",
                    current + 1,
                    s.target
                ),
            });
        }
        let horizon = Duration::from_millis(s.down_cooldown_ms);
        let covered = self
            .window
            .front()
            .is_some_and(|(t, _, _)| now.saturating_sub(*t) >= horizon);
        if !covered || !self.cooled(now, s.down_cooldown_ms) {
            return None;
        }
        let keep = self.window.iter().map(|(_, _, k)| *k).max()?;
        let peak = self.window.iter().map(|(_, l, _)| *l).fold(0.0, f64::max);
        (keep < current).then(|| Decision {
            desired: keep,
            reason: format!(
                "load at most {peak:.1} for {} s fits {} replicas within {:.0} % of the \
                 target {:.1}: {current} → {keep} clones",
                s.down_cooldown_ms / 1000,
                keep + 1,
                (1.0 - s.hysteresis) * 100.0,
                s.target
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AutoscaleSpec {
        AutoscaleSpec {
            target: 50.0,
            min: 0,
            max: 8,
            up_cooldown_ms: 1000,
            down_cooldown_ms: 10_000,
            hysteresis: 0.2,
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn scales_up_at_once_and_down_after_the_window() {
        let mut s = Scaler::new(spec());
        s.sample(S, 260.0);
        let d = s.decide(S, 0).unwrap();
        assert_eq!(d.desired, 5, "{d:?}");
        s.changed(S);
        // Load gone: nothing for 10 s after the change, then down to the window's peak.
        for i in 2..=11 {
            s.sample(S * i, 0.0);
            assert_eq!(s.decide(S * i, 5), None, "at {i} s");
        }
        s.sample(S * 12, 0.0);
        assert_eq!(s.decide(S * 12, 5).unwrap().desired, 0);
    }

    #[test]
    fn holds_without_a_signal_and_keeps_bounds() {
        let mut s = Scaler::new(spec());
        assert_eq!(s.decide(S, 3), None);
        s.sample(S, 10_000.0);
        assert_eq!(s.decide(S, 0).unwrap().desired, 8);
        assert_eq!(s.decide(S * 20, 3), None, "stale");
        assert_eq!(s.decide(S * 20, 9).unwrap().desired, 8);
        s.sample(S, f64::NAN);
        s.sample(S, -1.0);
        let mut m = spec();
        m.min = 2;
        s.set_spec(m);
        assert_eq!(s.decide(S * 20, 0).unwrap().desired, 2);
    }
}
