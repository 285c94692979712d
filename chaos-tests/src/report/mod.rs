//! The run's report: one self-contained HTML page (inline CSS and SVG, no script, no external
//! asset) that a person reads to see what happened and whether anything went wrong.
//!
//! It holds the verdict and its reasons, a summary table (operations, acknowledged writes, lost
//! writes, linearizability, split-brain time, liveness and recovery times, faults by kind), the
//! command that replays the run, the SVG timeline ([`svg`]), and tables of every problem found
//! (lost writes, bad reads, counter-examples, split-brain intervals) and of the faults.
//!
//! [`render_run_dir`] re-renders `report.html` from the files of a run directory
//! ([`crate::run_dir`]), so `vmatrix chaos report <dir>` needs nothing else. Every text taken
//! from those files is escaped ([`html::esc`]).

pub mod events;
pub mod html;
pub mod svg;

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use crate::checker::{Linearizability, Verdict, VerdictOutcome};
use crate::history::{Op, OpKind, Outcome};
use crate::run_dir::{self, RunDirError, RunInfo};
use crate::schedule::{FaultKind, Injection, Schedule};
pub use events::{parse_manager_events, ParsedEvents, TimelineEvent};
use html::{esc, millis, percentile, secs, Table};
use svg::{FaultBar, TimelineInput};

/// Errors of rendering a run directory.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file of the run directory is missing or bad.
    #[error(transparent)]
    RunDir(#[from] RunDirError),
}

/// Everything the page shows.
#[derive(Debug, Clone, Copy)]
pub struct ReportData<'a> {
    /// The page's title (untrusted).
    pub title: &'a str,
    /// The clients' operations.
    pub history: &'a [Op],
    /// The planned faults.
    pub schedule: Option<&'a Schedule>,
    /// The faults as injected (shown instead of the plan when present).
    pub injections: &'a [Injection],
    /// The manager's events on the run's clock.
    pub events: &'a [TimelineEvent],
    /// The checks' verdict.
    pub verdict: Option<&'a Verdict>,
    /// Facts about the run.
    pub run: Option<&'a RunInfo>,
    /// Remarks about the inputs (missing files, torn lines), untrusted.
    pub notes: &'a [String],
}

const STYLE: &str = "body{font-family:sans-serif;margin:20px;color:#222}\
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;\
text-align:left;font-size:13px;vertical-align:top}th{background:#f4f4f4}\
pre{background:#f7f7f7;padding:8px;white-space:pre-wrap;word-break:break-all}\
.pass{color:#1e8449}.fail{color:#c0392b}.inconclusive{color:#b9770e}\
h1 span{font-size:70%}.timeline{border:1px solid #ddd;max-width:100%;height:auto}\
table.summary th{font-weight:normal;color:#555}";

/// Renders the page.
pub fn render_html(d: &ReportData<'_>) -> String {
    let mut page = String::with_capacity(64 * 1024);
    let (outcome, class) = match d.verdict.map(|v| v.outcome) {
        Some(VerdictOutcome::Pass) => ("PASS", "pass"),
        Some(VerdictOutcome::Fail) => ("FAIL", "fail"),
        Some(VerdictOutcome::Inconclusive) => ("INCONCLUSIVE", "inconclusive"),
        None => ("NOT CHECKED", "inconclusive"),
    };
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\
         <style>{STYLE}</style></head><body><h1>{} <span class=\"{class}\">{outcome}</span></h1>",
        esc(d.title),
        esc(d.title)
    );
    if let Some(v) = d.verdict.filter(|v| !v.reasons.is_empty()) {
        page.push_str("<ul>");
        for r in &v.reasons {
            let _ = write!(page, "<li class=\"{class}\">{}</li>", esc(r));
        }
        page.push_str("</ul>");
    }
    if let Some(s) = d.schedule {
        let _ = write!(
            page,
            "<p>Replay this run:</p><pre class=\"replay\">{}</pre>",
            esc(&s.replay_command())
        );
    }
    page.push_str("<h2>Summary</h2>");
    page.push_str(&summary(d));
    page.push_str("<h2>Timeline</h2>");
    page.push_str(&timeline(d));
    page.push_str(&problems(d));
    page.push_str(&fault_table(d));
    if !d.notes.is_empty() {
        page.push_str("<h2>Notes on the inputs</h2><ul>");
        for n in d.notes {
            let _ = write!(page, "<li>{}</li>", esc(n));
        }
        page.push_str("</ul>");
    }
    page.push_str("</body></html>\n");
    page
}

/// The summary table.
fn summary(d: &ReportData<'_>) -> String {
    let mut t = Table::new("summary", &[]);
    let mut row = |k: &str, v: String| t.key_row(&esc(k), &v);
    if let Some(r) = d.run {
        row("seed / run", format!("{} / {}", r.seed, r.run));
        if let Some(c) = &r.commit {
            row("commit", esc(c));
        }
    }
    if let Some(s) = d.schedule {
        row("duration", secs(s.config.duration_ns));
        row("faults enabled", esc(&s.config.faults.to_string()));
    }
    let mut lat: Vec<u64> = d
        .history
        .iter()
        .filter(|o| o.is_ok())
        .map(Op::latency_ns)
        .collect();
    lat.sort_unstable();
    let p = |q| percentile(&lat, q).map_or("-".into(), millis);
    row(
        "ok latency p50 / p99 / max",
        format!("{} / {} / {}", p(50), p(99), p(100)),
    );
    if let Some(v) = d.verdict {
        let o = &v.ops;
        row(
            "operations",
            format!(
                "{} ({} sets, {} gets; {} ok, {} fail, {} unknown) on {} keys",
                o.total, o.sets, o.gets, o.ok, o.fail, o.unknown, o.keys
            ),
        );
        row("acknowledged writes", o.acknowledged_writes.to_string());
        row(
            "lost acknowledged writes",
            format!(
                "{} (keys checked {}, not read back {})",
                count(v.lost.violations.len()),
                v.lost.keys_checked,
                v.lost.unread_keys.len()
            ),
        );
        let anomalies: Vec<String> = v
            .read_anomaly_counts
            .iter()
            .map(|(k, n)| format!("{k:?}: {n}"))
            .collect();
        let bad = if anomalies.is_empty() {
            count(0)
        } else {
            format!("<span class=\"fail\">{}</span>", esc(&anomalies.join(", ")))
        };
        row("bad reads", bad);
        let l = &v.linearizability;
        row(
            "linearizability",
            format!(
                "{} ({} keys: {} linearizable, {} failed, {} out of budget; {} steps)",
                lin_name(l.result),
                l.keys,
                l.linearizable_keys,
                l.failed_keys,
                l.unknown_keys,
                l.steps
            ),
        );
        row(
            "split brain",
            format!(
                "{} interval(s), {} ns",
                count(v.split_brain.intervals_total),
                v.split_brain.split_brain_ns
            ),
        );
        row("liveness after the heal", liveness(v));
        row("time to serve again", recovery(v));
    }
    t.finish()
}

/// A count of problems: green when zero, red otherwise.
fn count(n: usize) -> String {
    let class = if n == 0 { "pass" } else { "fail" };
    format!("<strong class=\"{class}\">{n}</strong>")
}

fn lin_name(l: Linearizability) -> &'static str {
    match l {
        Linearizability::Linearizable => "linearizable",
        Linearizability::NotLinearizable => "NOT linearizable",
        Linearizability::Unknown => "unknown (budget exhausted)",
    }
}

fn liveness(v: &Verdict) -> String {
    let Some(l) = &v.liveness else {
        return "not observed".into();
    };
    let show = |t: Option<u64>| t.map_or("never".into(), millis);
    let mut s = format!(
        "protected after {}, answering after {}",
        show(l.protected_after_ns),
        show(l.answering_after_ns)
    );
    for p in &l.problems {
        let _ = write!(s, "; {}", esc(&format!("{p:?}")));
    }
    s
}

/// Recovery times: all faults and crashes only, p50 / p99 / max.
fn recovery(v: &Verdict) -> String {
    let stats = |crash_only: bool| {
        let faults: Vec<_> = v
            .recovery
            .iter()
            .filter(|r| !crash_only || r.fault.kind.is_crash())
            .collect();
        let mut times: Vec<u64> = faults.iter().filter_map(|r| r.serve_again_ns).collect();
        times.sort_unstable();
        let p = |q| percentile(&times, q).map_or("-".into(), millis);
        format!(
            "{} of {} followed by an outage; served again after p50 {} / p99 {} / max {}",
            times.len(),
            faults.len(),
            p(50),
            p(99),
            p(100)
        )
    };
    format!("all faults: {}<br>crashes: {}", stats(false), stats(true))
}

/// The fault bars: as injected if known, else as planned.
fn fault_bars(d: &ReportData<'_>) -> Vec<FaultBar> {
    if !d.injections.is_empty() {
        let heal = d.schedule.map_or(u64::MAX, |s| s.final_heal_ns);
        return d
            .injections
            .iter()
            .map(|i| FaultBar {
                event: i.event,
                kind: i.kind,
                start_ns: i.start_ns,
                end_ns: i.end_ns.unwrap_or(heal).max(i.start_ns),
                label: i.kind.name().to_string(),
                title: format!(
                    "#{} {} on {} from {}{}",
                    i.event,
                    i.kind,
                    i.target,
                    secs(i.start_ns),
                    i.note
                        .as_deref()
                        .map(|n| format!(" ({n})"))
                        .unwrap_or_default()
                ),
            })
            .collect();
    }
    d.schedule.map_or_else(Vec::new, |s| {
        s.events
            .iter()
            .map(|e| FaultBar {
                event: e.index,
                kind: e.fault.kind(),
                start_ns: e.start_ns,
                end_ns: e.end_ns,
                label: e.fault.kind().name().to_string(),
                title: format!(
                    "#{} {} (vm {}) {} – {}",
                    e.index,
                    e.fault.describe(),
                    e.vm,
                    secs(e.start_ns),
                    secs(e.end_ns)
                ),
            })
            .collect()
    })
}

fn timeline(d: &ReportData<'_>) -> String {
    let bars = fault_bars(d);
    let end = [
        d.schedule.map_or(0, |s| s.config.duration_ns),
        d.history.iter().map(|o| o.complete_ns).max().unwrap_or(0),
        d.events.last().map_or(0, |e| e.time_ns),
        bars.iter().map(|b| b.end_ns).max().unwrap_or(0),
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    let (split, outages) = d.verdict.map_or((&[][..], &[][..]), |v| {
        (&v.split_brain.intervals[..], &v.outages[..])
    });
    svg::render_timeline(&TimelineInput {
        end_ns: end + end / 50 + 1,
        faults: &bars,
        events: d.events,
        history: d.history,
        split_brain: split,
        outages,
        heal_ns: d.schedule.map(|s| s.final_heal_ns),
    })
}

/// One op as table cells: who, what, when, outcome.
fn op_cells(op: &Op) -> Vec<String> {
    let what = match &op.kind {
        OpKind::Set { value } => format!("set {}", esc(value)),
        OpKind::Get => "get".into(),
    };
    let outcome = match &op.outcome {
        Outcome::Ok { read: Some(v) } => format!("ok → {}", esc(v)),
        Outcome::Ok { read: None } if !op.is_set() => "ok → (absent)".into(),
        Outcome::Ok { read: None } => "ok".into(),
        Outcome::Fail { error } => format!("fail: {}", esc(error)),
        Outcome::Unknown { error } => format!("unknown: {}", esc(error)),
    };
    vec![
        format!("client {} op {}", op.client, op.op),
        esc(&op.key),
        what,
        format!("{} – {}", secs(op.invoke_ns), secs(op.complete_ns)),
        outcome,
    ]
}

const OP_HEADERS: [&str; 5] = ["op", "key", "what", "invoke – complete", "outcome"];

/// Tables of everything the checks found.
fn problems(d: &ReportData<'_>) -> String {
    let Some(v) = d.verdict else {
        return String::new();
    };
    let mut out = String::new();
    if !v.lost.violations.is_empty() {
        out.push_str("<h2>Lost acknowledged writes</h2>");
        let mut t = Table::new(
            "lost",
            &["key", "found", "kind", "last acknowledged", "allowed"],
        );
        let opt = |v: &Option<String>| v.as_deref().map_or("(absent)".into(), esc);
        for l in &v.lost.violations {
            let allowed: Vec<String> = l.allowed.iter().map(|a| esc(a)).collect();
            t.row(&[
                esc(&l.key),
                opt(&l.found),
                format!("{:?}", l.kind),
                opt(&l.last_acknowledged),
                format!("{} ({} in all)", allowed.join(", "), l.allowed_total),
            ]);
        }
        out.push_str(&t.finish());
    }
    if !v.read_anomalies.is_empty() {
        out.push_str("<h2>Bad reads</h2>");
        let mut headers = vec!["kind"];
        headers.extend(OP_HEADERS);
        headers.extend(["value's set", "newer acknowledged set"]);
        let mut t = Table::new("reads", &headers);
        for a in &v.read_anomalies {
            let mut cells = vec![format!("{:?}", a.kind)];
            cells.extend(op_cells(&a.read));
            let brief = |o: &Option<Op>| {
                o.as_ref().map_or("-".into(), |w| {
                    format!("client {} op {} {}", w.client, w.op, secs(w.invoke_ns))
                })
            };
            cells.push(brief(&a.write));
            cells.push(brief(&a.newer));
            t.row(&cells);
        }
        out.push_str(&t.finish());
    }
    for p in &v.linearizability.problems {
        let _ = write!(
            out,
            "<h2>Key {}: {}</h2><p>{} ops, {} searched, {} steps.</p>",
            esc(&p.key),
            lin_name(p.result),
            p.ops,
            p.searched_ops,
            p.steps
        );
        if let Some(ce) = &p.counter_example {
            let _ = write!(
                out,
                "<p>A{} sub-history that no order explains:</p>",
                if ce.minimal { " minimal" } else { " small" }
            );
            let mut t = Table::new("counter-example", &OP_HEADERS);
            for op in &ce.ops {
                t.row(&op_cells(op));
            }
            out.push_str(&t.finish());
        }
    }
    if !v.split_brain.intervals.is_empty() {
        out.push_str("<h2>Split brain</h2>");
        let mut t = Table::new("split", &["from – to", "hosts", "frames", "terms"]);
        for i in &v.split_brain.intervals {
            t.row(&[
                format!("{} – {}", secs(i.start_ns), secs(i.end_ns)),
                format!("{}, {}", esc(&i.hosts[0]), esc(&i.hosts[1])),
                format!("{}, {}", i.frames[0], i.frames[1]),
                format!("{:?}, {:?}", i.terms[0], i.terms[1]),
            ]);
        }
        out.push_str(&t.finish());
    }
    out
}

/// Faults by kind, then every fault with its recovery time.
fn fault_table(d: &ReportData<'_>) -> String {
    let bars = fault_bars(d);
    let mut by_kind: BTreeMap<FaultKind, usize> = BTreeMap::new();
    for b in &bars {
        *by_kind.entry(b.kind).or_insert(0) += 1;
    }
    let mut out = String::from("<h2>Faults</h2>");
    let mut t = Table::new("fault-kinds", &["kind", "count"]);
    for (k, n) in &by_kind {
        t.row(&[k.name().to_string(), n.to_string()]);
    }
    out.push_str(&t.finish());
    let recovery: BTreeMap<u32, Option<u64>> = d
        .verdict
        .map(|v| {
            v.recovery
                .iter()
                .map(|r| (r.fault.event, r.serve_again_ns))
                .collect()
        })
        .unwrap_or_default();
    let mut t = Table::new("faults", &["fault", "from – to", "serve again after"]);
    for b in &bars {
        let again = match recovery.get(&b.event) {
            Some(Some(ns)) => millis(*ns),
            Some(None) => "no outage".into(),
            None => "-".into(),
        };
        t.row(&[
            esc(&b.title),
            format!("{} – {}", secs(b.start_ns), secs(b.end_ns)),
            again,
        ]);
    }
    out.push_str(&t.finish());
    out
}

/// Reads a run directory's files, writes its `report.html` and returns that path.
///
/// `history.jsonl` and `schedule.json` are required; `events.jsonl`, `verdict.json`,
/// `run.json` and `faults.jsonl` are shown when present (the page says what was missing).
pub fn render_run_dir(dir: &Path) -> Result<PathBuf, ReportError> {
    let mut notes = Vec::new();
    let history = run_dir::read_history(dir)?;
    if let Some(t) = &history.torn_tail {
        notes.push(format!(
            "{}: torn last line {} ({} bytes) left out",
            run_dir::HISTORY_FILE,
            t.line,
            t.bytes
        ));
    }
    let schedule: Schedule = run_dir::read_json(&dir.join(run_dir::SCHEDULE_FILE))?;
    let verdict: Option<Verdict> = run_dir::read_json_if_present(&dir.join(run_dir::VERDICT_FILE))?;
    if verdict.is_none() {
        notes.push(format!(
            "{} missing: the run was not checked",
            run_dir::VERDICT_FILE
        ));
    }
    let run: Option<RunInfo> = run_dir::read_json_if_present(&dir.join(run_dir::RUN_FILE))?;
    let injections = run_dir::read_json_lines::<Injection>(&dir.join(run_dir::INJECTIONS_FILE))?;
    if let Some(l) = injections.torn_line {
        notes.push(format!(
            "{}: torn last line {l} left out",
            run_dir::INJECTIONS_FILE
        ));
    }
    let events = read_events(dir, run.as_ref(), &mut notes)?;
    let title = format!(
        "vmatrix chaos run, seed {}",
        run.as_ref().map_or(schedule.config.seed, |r| r.seed)
    );
    let html = render_html(&ReportData {
        title: &title,
        history: &history.ops,
        schedule: Some(&schedule),
        injections: &injections.items,
        events: &events,
        verdict: verdict.as_ref(),
        run: run.as_ref(),
        notes: &notes,
    });
    let path = dir.join(run_dir::REPORT_FILE);
    run_dir::write_atomic(&path, html.as_bytes())?;
    Ok(path)
}

/// The manager's events on the run's clock, with notes on what could not be used.
fn read_events(
    dir: &Path,
    run: Option<&RunInfo>,
    notes: &mut Vec<String>,
) -> Result<Vec<TimelineEvent>, ReportError> {
    let path = dir.join(run_dir::EVENTS_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            notes.push(format!(
                "{} missing: no manager events",
                run_dir::EVENTS_FILE
            ));
            return Ok(Vec::new());
        }
        Err(source) => return Err(RunDirError::Io { path, source }.into()),
    };
    let Some(run) = run else {
        notes.push(format!(
            "{} missing: the manager's events cannot be placed on the run's clock",
            run_dir::RUN_FILE
        ));
        return Ok(Vec::new());
    };
    let parsed = parse_manager_events(&bytes, run.start_unix_ms);
    if !parsed.skipped_lines.is_empty() {
        notes.push(format!(
            "{}: {} line(s) did not parse (torn by a crash of the manager?): {:?}",
            run_dir::EVENTS_FILE,
            parsed.skipped_lines.len(),
            &parsed.skipped_lines[..parsed.skipped_lines.len().min(20)]
        ));
    }
    if parsed.before_start > 0 {
        notes.push(format!(
            "{}: {} event(s) before the run's start (setup) not shown",
            run_dir::EVENTS_FILE,
            parsed.before_start
        ));
    }
    Ok(parsed.events)
}

#[cfg(test)]
mod tests;
