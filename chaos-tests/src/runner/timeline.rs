//! The fault loop: every scheduled event becomes timed actions (inject at its start, heal at its
//! end; a swizzle also stalls its links one by one and heals them in its order), executed in
//! time order — overlapping events, as a hand-written schedule may have, work too. Each event
//! is logged to `faults.jsonl` once it is healed (or skipped, or when the run stops), with the
//! real times and what its role resolved to. While it waits the loop keeps the resolver's view
//! of the roles fresh, keeps the index lock fresh and notes processes that exited on their own.
//! Before each injection it may wait for the VM to be protected again ([`run_faults`]), and it
//! stops injecting once the VM is down for good.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::time::{Duration, Instant};

use super::faults::{self, Active, Ctx};
use super::RunnerError;
use crate::schedule::{Fault, Injection, Schedule, ScheduledEvent};

/// What to do at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Heal the event (everything it left).
    Heal,
    /// Swizzle: heal link `i`.
    SwizzleHeal(usize),
    /// Swizzle: stall link `i`.
    SwizzleStall(usize),
    /// Inject the event.
    Inject,
}

/// One timed action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Action {
    /// When (ns on the run's clock).
    pub at_ns: u64,
    /// Index into the schedule's events.
    pub event: usize,
    /// What.
    pub step: Step,
}

/// The actions of a schedule in the order they run (at the same time: heals first).
pub fn plan(schedule: &Schedule) -> Vec<Action> {
    let mut out = Vec::new();
    for (i, ev) in schedule.events.iter().enumerate() {
        let at = |at_ns, step| Action {
            at_ns,
            event: i,
            step,
        };
        out.push(at(ev.start_ns, Step::Inject));
        if let Fault::Swizzle {
            links,
            step_ns,
            heal_order,
        } = &ev.fault
        {
            let n = links.len() as u64;
            for k in 1..n {
                out.push(at(
                    ev.start_ns + k * step_ns,
                    Step::SwizzleStall(k as usize),
                ));
            }
            for (j, &l) in heal_order.iter().enumerate() {
                let t = ev.start_ns + (n + j as u64) * step_ns;
                out.push(at(t.min(ev.end_ns), Step::SwizzleHeal(l as usize)));
            }
        }
        out.push(at(ev.end_ns, Step::Heal));
    }
    let rank = |s: Step| match s {
        Step::Heal => 0,
        Step::SwizzleHeal(_) => 1,
        Step::SwizzleStall(_) => 2,
        Step::Inject => 3,
    };
    out.sort_by_key(|a| (a.at_ns, rank(a.step), a.event));
    out
}

/// Where the loop reports.
pub struct Sinks<'a> {
    /// `faults.jsonl`.
    pub injections: &'a mut File,
    /// The runner's log.
    pub log: &'a mut dyn FnMut(String),
    /// Ctrl-C.
    pub interrupted: &'a dyn Fn() -> bool,
    /// Called about every 30 s while waiting (keeps the index lock fresh).
    pub keepalive: &'a mut dyn FnMut(),
}

fn write_injection(f: &mut File, i: &Injection) -> Result<(), RunnerError> {
    let mut line = serde_json::to_vec(i).map_err(|e| RunnerError::Config(e.to_string()))?;
    line.push(b'\n');
    f.write_all(&line)
        .map_err(RunnerError::io(std::path::Path::new(
            crate::run_dir::INJECTIONS_FILE,
        )))
}

/// Waits until `at_ns`, refreshing the resolver every 500 ms and noting unexpected exits.
fn wait_until(ctx: &mut Ctx<'_>, sinks: &mut Sinks<'_>, at_ns: u64) -> Result<(), RunnerError> {
    let mut last_refresh = Instant::now();
    let mut last_keepalive = Instant::now();
    loop {
        if (sinks.interrupted)() {
            return Err(RunnerError::Interrupted);
        }
        let now = ctx.clock.now_ns();
        if now >= at_ns {
            return Ok(());
        }
        for what in ctx.fleet.exited() {
            (sinks.log)(format!(
                "{:.3} s: {what} (not caused by a fault)",
                now as f64 / 1e9
            ));
        }
        if last_refresh.elapsed() >= Duration::from_millis(500) {
            let _ = ctx.resolver.refresh(now);
            last_refresh = Instant::now();
        }
        if last_keepalive.elapsed() >= Duration::from_secs(30) {
            (sinks.keepalive)();
            last_keepalive = Instant::now();
        }
        let left = Duration::from_nanos(at_ns.saturating_sub(ctx.clock.now_ns()));
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

/// What the loop did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoopEnd {
    /// Faults injected (not skipped).
    pub injected: usize,
    /// How much later than planned everything after the waits for the VM to be protected again
    /// ran (the final heal too).
    pub shift_ns: u64,
    /// The loop stopped injecting because the VM was down for good.
    pub gave_up: bool,
}

/// Runs the schedule's faults until its final heal time. With `settle_ns`, before each
/// injection it waits (up to that long) until the manager says the VM is protected again, and
/// moves the rest of the schedule by the wait, so each fault meets a recovered system as the
/// schedule's quiet gaps intend however slow this machine is (said in the fault's note). On an
/// error (Ctrl-C) the events under way are logged unhealed; the caller's guard tears down.
pub fn run_faults(
    ctx: &mut Ctx<'_>,
    schedule: &Schedule,
    settle_ns: Option<u64>,
    sinks: &mut Sinks<'_>,
) -> Result<LoopEnd, RunnerError> {
    let mut active: BTreeMap<usize, (Injection, Active)> = BTreeMap::new();
    let mut end = LoopEnd::default();
    let r = run_actions(ctx, schedule, settle_ns, sinks, &mut active, &mut end);
    // Anything still active (the run stopped early, or an event ends after the final heal):
    // healed now when the loop ended normally, logged as it is otherwise.
    for (_, (mut rec, act)) in std::mem::take(&mut active) {
        if r.is_ok() {
            heal_logged(ctx, &mut rec, act);
        } else {
            rec.note = Some(join_note(
                rec.note.take(),
                "run stopped before its heal".into(),
            ));
        }
        write_injection(sinks.injections, &rec)?;
    }
    r.map(|_| end)
}

fn join_note(a: Option<String>, b: String) -> String {
    match a {
        Some(a) => format!("{a}; {b}"),
        None => b,
    }
}

/// How long the VM may stay `down` before the loop stops injecting: faults on a VM that is
/// gone for good test nothing (a soak would waste the rest of the run).
pub const DOWN_GIVE_UP_NS: u64 = 10_000_000_000;

/// Whether to stop before an injection: the VM down for [`DOWN_GIVE_UP_NS`] (since when).
fn gave_up(ctx: &Ctx<'_>, step: Step) -> Option<u64> {
    let since = ctx.resolver.down_since?;
    let long = ctx.clock.now_ns().saturating_sub(since) >= DOWN_GIVE_UP_NS;
    (step == Step::Inject && long).then_some(since)
}

/// Waits up to `limit_ns` until the manager says the VM is protected; returns how long it
/// waited and, unless it got there, why not (a note for the fault). While the manager says the
/// VM is down it waits at most [`DOWN_GIVE_UP_NS`]; a manager that does not answer is asked
/// again (no fault is under way when this runs: the machine stalled).
fn settle(
    ctx: &mut Ctx<'_>,
    sinks: &mut Sinks<'_>,
    limit_ns: u64,
) -> Result<(u64, Option<String>), RunnerError> {
    let t0 = ctx.clock.now_ns();
    loop {
        let now = ctx.clock.now_ns();
        let waited = now - t0;
        let why = match ctx.resolver.refresh(now) {
            Ok(r) if r.status == "protected" => return Ok((waited, None)),
            // (Down may pass: a primary stalled before its backup synced is "down" until its
            // host answers again; a fault injected then was a double fault of the runner's
            // making — crash soak seed 1015. Waited for as long as the loop's give-up.)
            Ok(r) if r.status == "down" && waited >= limit_ns.min(DOWN_GIVE_UP_NS) => {
                Some(format!("the VM is down ({})", r.describe()))
            }
            Ok(r) if waited >= limit_ns => Some(format!(
                "not protected again after {} ms ({})",
                waited / 1_000_000,
                r.describe()
            )),
            Ok(_) => None,
            // With no fault under way the manager should answer: a machine stall, wait.
            Err(e) if waited >= limit_ns => Some(format!(
                "could not ask the manager whether the VM is protected for {} ms: {e}",
                waited / 1_000_000
            )),
            Err(_) => None,
        };
        if let Some(why) = why {
            return Ok((waited, Some(format!("{why}; injected anyway"))));
        }
        if (sinks.interrupted)() {
            return Err(RunnerError::Interrupted);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run_actions(
    ctx: &mut Ctx<'_>,
    schedule: &Schedule,
    settle_ns: Option<u64>,
    sinks: &mut Sinks<'_>,
    active: &mut BTreeMap<usize, (Injection, Active)>,
    end: &mut LoopEnd,
) -> Result<(), RunnerError> {
    for a in plan(schedule) {
        if a.at_ns > schedule.final_heal_ns {
            break;
        }
        wait_until(ctx, sinks, a.at_ns + end.shift_ns)?;
        if let Some(since) = gave_up(ctx, a.step) {
            (sinks.log)(format!(
                "{:.3} s: the manager has said the VM is down since {:.3} s (it never restarts \
                 a VM from an older image): no more faults; the heals of those under way follow",
                ctx.clock.now_ns() as f64 / 1e9,
                since as f64 / 1e9
            ));
            end.gave_up = true;
            return Ok(());
        }
        let ev = &schedule.events[a.event];
        match a.step {
            Step::Inject => {
                let mut note = None;
                // Only between faults: with another one under way the VM cannot recover.
                if let Some(limit) = settle_ns.filter(|_| active.is_empty()) {
                    let (waited, why) = settle(ctx, sinks, limit)?;
                    end.shift_ns += waited;
                    note = match (why, waited >= 1_000_000) {
                        (Some(why), _) => Some(why),
                        (None, true) => Some(format!(
                            "waited {} ms for the VM to be protected again",
                            waited / 1_000_000
                        )),
                        (None, false) => None,
                    };
                }
                if let Some((i, act)) = inject_logged(ctx, sinks, ev, note)? {
                    end.injected += 1;
                    active.insert(a.event, (i, act));
                }
            }
            Step::SwizzleStall(i) | Step::SwizzleHeal(i) => {
                if let Some((rec, act)) = active.get_mut(&a.event) {
                    let stall = matches!(a.step, Step::SwizzleStall(_));
                    if let Err(e) = faults::swizzle_step(ctx, act, i, stall) {
                        rec.note = Some(join_note(rec.note.take(), format!("link {i}: {e}")));
                    }
                }
            }
            Step::Heal => {
                if let Some((mut rec, act)) = active.remove(&a.event) {
                    heal_logged(ctx, &mut rec, act);
                    let now = rec.end_ns.unwrap_or_default();
                    (sinks.log)(format!(
                        "{:.3} s: event {} healed",
                        now as f64 / 1e9,
                        ev.index
                    ));
                    write_injection(sinks.injections, &rec)?;
                }
            }
        }
    }
    Ok(())
}

/// Injects one event; `None` if it was skipped (then already logged to `faults.jsonl`).
fn inject_logged(
    ctx: &mut Ctx<'_>,
    sinks: &mut Sinks<'_>,
    ev: &ScheduledEvent,
    note: Option<String>,
) -> Result<Option<(Injection, Active)>, RunnerError> {
    let t0 = ctx.clock.now_ns();
    let mut rec = Injection {
        event: ev.index,
        kind: ev.fault.kind(),
        target: String::new(),
        start_ns: t0,
        end_ns: None,
        note,
    };
    match faults::inject(ctx, ev) {
        Ok(done) => {
            (sinks.log)(format!(
                "{:.3} s: event {} {} on {}{}",
                done.acted_ns as f64 / 1e9,
                ev.index,
                ev.fault.describe(),
                done.target,
                done.note
                    .as_deref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            ));
            rec.start_ns = done.acted_ns;
            rec.target = done.target;
            if let Some(n) = done.note {
                rec.note = Some(join_note(rec.note.take(), n));
            }
            Ok(Some((rec, done.active)))
        }
        Err(why) => {
            (sinks.log)(format!(
                "{:.3} s: event {} {} skipped: {why}",
                t0 as f64 / 1e9,
                ev.index,
                ev.fault.describe()
            ));
            rec.end_ns = Some(t0);
            rec.note = Some(format!(
                "skipped: {why}{}",
                rec.note.map(|n| format!("; {n}")).unwrap_or_default()
            ));
            write_injection(sinks.injections, &rec)?;
            Ok(None)
        }
    }
}

/// Heals one event, noting what the heal said, and stamps its end.
fn heal_logged(ctx: &mut Ctx<'_>, rec: &mut Injection, act: Active) {
    match faults::heal(ctx, act) {
        Ok(Some(n)) => rec.note = Some(join_note(rec.note.take(), n)),
        Ok(None) => {}
        Err(e) => rec.note = Some(join_note(rec.note.take(), format!("heal: {e}"))),
    }
    rec.end_ns = Some(ctx.clock.now_ns());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{generate, FaultKind, FaultSet, ScheduleConfig};

    #[test]
    fn a_plan_injects_heals_and_swizzles_in_time_order() {
        let faults: FaultSet = [FaultKind::Swizzle, FaultKind::KillManager]
            .into_iter()
            .collect();
        let cfg = ScheduleConfig::new(7, Duration::from_secs(60), faults);
        let s = generate(&cfg).unwrap();
        let p = plan(&s);
        assert!(p.windows(2).all(|w| w[0].at_ns <= w[1].at_ns));
        for (i, ev) in s.events.iter().enumerate() {
            let mine: Vec<&Action> = p.iter().filter(|a| a.event == i).collect();
            assert_eq!(mine.first().unwrap().step, Step::Inject);
            assert_eq!(mine.last().unwrap().step, Step::Heal);
            assert!(mine
                .iter()
                .all(|a| a.at_ns >= ev.start_ns && a.at_ns <= ev.end_ns));
            if let Fault::Swizzle { links, .. } = &ev.fault {
                let heals = mine
                    .iter()
                    .filter(|a| matches!(a.step, Step::SwizzleHeal(_)))
                    .count();
                let stalls = mine
                    .iter()
                    .filter(|a| matches!(a.step, Step::SwizzleStall(_)))
                    .count();
                assert_eq!((heals, stalls + 1), (links.len(), links.len()));
            }
        }
        assert!(s
            .events
            .iter()
            .any(|e| e.fault.kind() == FaultKind::Swizzle));
    }
}
