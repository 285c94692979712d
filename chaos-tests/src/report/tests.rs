//! Report tests: a whole run directory rendered, escaping, missing files.

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;
use crate::checker::{self, CheckConfig, CheckInput, GuestFrame, LivenessObservation};
use crate::history::tests::{get, set, unknown};
use crate::history::HistoryWriter;
use crate::run_dir::*;
use crate::schedule::{generate, FaultSet, ScheduleConfig};

const EVIL: &str = "<script>alert('pwned')</script>";
const MS: u64 = 1_000_000;

fn history() -> Vec<Op> {
    let mut h = Vec::new();
    for i in 0..2000u64 {
        let t = i * 15 * MS;
        let key = if i % 3 == 0 { EVIL } else { "plain" };
        h.push(set(1, 2 * i, key, &format!("v{i}\"&<b>"), (t, t + MS)));
        h.push(get(
            2,
            2 * i + 1,
            key,
            Some(&format!("v{i}\"&<b>")),
            (t + 2 * MS, t + 3 * MS),
        ));
    }
    h.push(unknown(set(
        3,
        1,
        "plain",
        "lost-in-flight",
        (5000 * MS, 5100 * MS),
    )));
    h
}

/// A run directory with every file, checked; `bad` adds a stale read of the evil key and a
/// frame from a second host in the middle of the primary's service.
fn make_run_dir(dir: &Path, bad: bool) {
    let mut h = history();
    if bad {
        h.push(get(
            9,
            1,
            EVIL,
            Some("v0\"&<b>"),
            (29_000 * MS, 29_001 * MS),
        ));
    }
    let mut w = HistoryWriter::append_to(&dir.join(HISTORY_FILE)).unwrap();
    for op in &h {
        w.append(op).unwrap();
    }
    let schedule = generate(&ScheduleConfig::new(
        11,
        Duration::from_secs(30),
        FaultSet::all(),
    ))
    .unwrap();
    write_json(&dir.join(SCHEDULE_FILE), &schedule).unwrap();
    let injections: Vec<Injection> = schedule
        .events
        .iter()
        .map(|e| Injection {
            event: e.index,
            kind: e.fault.kind(),
            target: format!("host {EVIL}"),
            start_ns: e.start_ns + MS,
            end_ns: Some(e.end_ns + MS),
            note: None,
        })
        .collect();
    let lines: String = injections
        .iter()
        .map(|i| serde_json::to_string(i).unwrap() + "\n")
        .collect();
    std::fs::write(dir.join(INJECTIONS_FILE), lines).unwrap();
    let start_unix_ms = 1_760_000_000_000u64;
    let events = [
        ("detected", 3_100, "primary a failed"),
        ("term_changed", 3_180, EVIL),
        ("promoting", 3_200, "b"),
        ("protected", 3_900, ""),
    ];
    let mut text = String::new();
    for (i, (kind, at, detail)) in events.iter().enumerate() {
        let line = serde_json::json!({
            "seq": i + 1, "time": "x", "unix_ms": start_unix_ms + at, "at_ms": at,
            "kind": kind, "vm": "web", "host": "b", "term": 2, "detail": detail,
        });
        text.push_str(&format!("{line}\n"));
    }
    text.push_str("{\"seq\": 9, \"tim\n");
    std::fs::write(dir.join(EVENTS_FILE), text).unwrap();
    let liveness = LivenessObservation {
        heal_ns: schedule.final_heal_ns,
        protected_ns: Some(schedule.final_heal_ns + 500 * MS),
        answering_ns: Some(schedule.final_heal_ns + 10 * MS),
    };
    let run = RunInfo {
        seed: 11,
        run: 0,
        start_unix_ms,
        commit: Some("abc123".into()),
        liveness: Some(liveness),
    };
    write_json(&dir.join(RUN_FILE), &run).unwrap();
    let finals: BTreeMap<String, Option<String>> = [
        (EVIL.to_string(), Some("v1998\"&<b>".to_string())),
        ("plain".to_string(), Some("v1999\"&<b>".to_string())),
    ]
    .into();
    let mut frames: Vec<GuestFrame> = (0..30_000u64)
        .step_by(7)
        .map(|t| GuestFrame {
            time_ns: t * MS,
            host: if t < 3_150 { "a".into() } else { "b".into() },
            term: None,
        })
        .collect();
    if bad {
        frames.push(GuestFrame {
            time_ns: 10_000 * MS + 1,
            host: EVIL.into(),
            term: Some(1),
        });
    }
    let faults = checker::FaultWindow::from_injections(&injections, schedule.final_heal_ns);
    let v = checker::check(
        &CheckInput {
            history: &h,
            finals: &finals,
            frames: &frames,
            liveness: Some(liveness),
            faults: &faults,
        },
        &CheckConfig::default(),
    )
    .unwrap();
    write_json(&dir.join(VERDICT_FILE), &v).unwrap();
}

#[test]
fn a_run_dir_renders_with_its_timeline_and_escapes_everything() {
    let d = tempfile::tempdir().unwrap();
    make_run_dir(d.path(), true);
    let path = render_run_dir(d.path()).unwrap();
    assert_eq!(path, d.path().join(REPORT_FILE));
    let page = std::fs::read_to_string(&path).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(page.contains("<svg"), "no timeline");
    assert!(page.contains("</svg>"));
    // Nothing from the files becomes markup.
    assert!(!page.contains("<script"), "unescaped script");
    assert!(!page.contains("<b>"), "unescaped value");
    assert!(page.contains("&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;"));
    assert!(page.contains("v0&quot;&amp;&lt;b&gt;"));
    // No external asset, no script.
    assert!(!page.contains("src="));
    assert!(!page.contains("href="));
    // What a person looks for.
    assert!(page.contains("FAIL"));
    assert!(page.contains("vmatrix chaos run --seed 11 --runs 1 --duration 30s --faults all"));
    assert!(page.contains("Lost acknowledged writes") || page.contains("lost acknowledged writes"));
    assert!(page.contains("StaleRead"));
    assert!(page.contains("sub-history that no order explains"));
    assert!(page.contains("Split brain"));
    assert!(page.contains("term_changed"));
    assert!(
        page.contains("did not parse"),
        "the torn events line is noted"
    );
    assert!(page.contains("abc123"));
    assert!(page.len() < 2_000_000, "{} bytes", page.len());
    // The SVG part is well-formed enough: every element opened is closed.
    let svg = &page[page.find("<svg").unwrap()..page.find("</svg>").unwrap()];
    assert_eq!(svg.matches("<g>").count(), svg.matches("</g>").count());
    assert_eq!(
        svg.matches("<title>").count(),
        svg.matches("</title>").count()
    );
}

#[test]
fn a_clean_run_passes_and_missing_optional_files_are_noted() {
    let d = tempfile::tempdir().unwrap();
    make_run_dir(d.path(), false);
    let page = std::fs::read_to_string(render_run_dir(d.path()).unwrap()).unwrap();
    assert!(page.contains("PASS"), "{page}");
    assert!(!page.contains("FAIL"));
    for f in [VERDICT_FILE, EVENTS_FILE, RUN_FILE, INJECTIONS_FILE] {
        std::fs::remove_file(d.path().join(f)).unwrap();
    }
    let page = std::fs::read_to_string(render_run_dir(d.path()).unwrap()).unwrap();
    assert!(page.contains("NOT CHECKED"));
    assert!(page.contains("verdict.json missing"));
    assert!(page.contains("events.jsonl missing"));
    assert!(page.contains("<svg"));
}

#[test]
fn required_files_missing_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    assert!(render_run_dir(d.path()).is_err());
    HistoryWriter::append_to(&d.path().join(HISTORY_FILE)).unwrap();
    let e = render_run_dir(d.path()).unwrap_err();
    assert!(e.to_string().contains(SCHEDULE_FILE), "{e}");
}
