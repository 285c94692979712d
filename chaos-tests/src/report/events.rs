//! The manager's event log, placed on the run's clock for the timeline.
//!
//! The manager (`vmatrix/src/cluster/manager/events.rs`) appends one JSON object per
//! [`failover::event::Event`], stamped: `{"seq":7,"time":"2026-…Z","unix_ms":…,"at_ms":…,
//! "kind":"term_changed","vm":"web","host":"b","term":2,"detail":"…"}`. `at_ms` restarts with
//! every manager process (and the chaos runner kills the manager), so events are placed by
//! `unix_ms` against the run's wall-clock start ([`crate::run_dir::RunInfo::start_unix_ms`]).
//!
//! A manager killed in the middle of a write leaves a torn line, and on restart it ends that
//! line and carries on, so a torn line can sit in the middle of the file: unparseable lines are
//! skipped and counted (their numbers are reported), not errors.

use serde::{Deserialize, Serialize};

use failover::event::Event;

/// One event on the run's clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEvent {
    /// When (ns since the run's start).
    pub time_ns: u64,
    /// What (the manager's kind, snake case: `detected`, `term_changed`, `promoting`, ...).
    pub kind: String,
    /// The VM, if one.
    pub vm: Option<String>,
    /// The host, if one.
    pub host: Option<String>,
    /// The VM's term after it, if one.
    pub term: Option<u64>,
    /// For a person.
    pub text: String,
}

/// The parsed log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedEvents {
    /// The events at or after the run's start, by time.
    pub events: Vec<TimelineEvent>,
    /// 1-based numbers of the lines that did not parse (torn by a crash, or foreign).
    pub skipped_lines: Vec<usize>,
    /// Events stamped before the run's start (the cluster's setup), left out.
    pub before_start: usize,
}

/// One line as the manager writes it (mirrors its `Stamped`).
#[derive(Debug, Deserialize)]
struct ManagerLine {
    #[allow(dead_code)]
    seq: u64,
    unix_ms: u64,
    #[serde(flatten)]
    event: Event,
}

/// Parses the manager's event log; `start_unix_ms` is the run's time 0.
pub fn parse_manager_events(bytes: &[u8], start_unix_ms: u64) -> ParsedEvents {
    let mut out = ParsedEvents::default();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Ok(m) = serde_json::from_slice::<ManagerLine>(line) else {
            out.skipped_lines.push(i + 1);
            continue;
        };
        let Some(ms) = m.unix_ms.checked_sub(start_unix_ms) else {
            out.before_start += 1;
            continue;
        };
        out.events
            .push(timeline_event(ms.saturating_mul(1_000_000), m.event));
    }
    out.events.sort_by_key(|e| e.time_ns);
    out
}

fn timeline_event(time_ns: u64, e: Event) -> TimelineEvent {
    let kind = serde_json::to_value(e.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{:?}", e.kind));
    let mut text = kind.clone();
    if let Some(vm) = &e.vm {
        text.push_str(&format!(" vm {vm}"));
    }
    if let Some(host) = &e.host {
        text.push_str(&format!(" host {host}"));
    }
    if let Some(term) = e.term {
        text.push_str(&format!(" term {term}"));
    }
    if !e.detail.is_empty() {
        text.push_str(": ");
        text.push_str(&e.detail);
    }
    TimelineEvent {
        time_ns,
        kind,
        vm: e.vm,
        host: e.host,
        term: e.term,
        text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"seq":3,"time":"2026-01-01T00:00:01.5Z","unix_ms":1500,"at_ms":12,"kind":"term_changed","vm":"web","host":"b","term":2,"detail":"primary a failed"}"#;

    #[test]
    fn parses_what_the_manager_writes() {
        // Exactly the manager's encoding of its own type, flattened under the stamp.
        let event = Event {
            at_ms: 40,
            kind: failover::event::EventKind::Protected,
            vm: Some("web".into()),
            host: None,
            term: Some(2),
            detail: String::new(),
        };
        let mut stamped = serde_json::to_value(&event).unwrap();
        stamped["seq"] = 4.into();
        stamped["time"] = "2026-01-01T00:00:02Z".into();
        stamped["unix_ms"] = 2000.into();
        let text = format!("{LINE}\n{stamped}\n");
        let p = parse_manager_events(text.as_bytes(), 1000);
        assert!(p.skipped_lines.is_empty());
        assert_eq!(p.events.len(), 2);
        let e = &p.events[0];
        assert_eq!(e.time_ns, 500_000_000);
        assert_eq!(e.kind, "term_changed");
        assert_eq!(e.term, Some(2));
        assert_eq!(
            e.text,
            "term_changed vm web host b term 2: primary a failed"
        );
        assert_eq!(p.events[1].kind, "protected");
        assert_eq!(p.events[1].text, "protected vm web term 2");
    }

    #[test]
    fn torn_and_foreign_lines_are_skipped_and_setup_events_left_out() {
        let torn = &LINE[..40];
        let text = format!("{LINE}\n{torn}\n\nnot json\n{LINE}");
        let p = parse_manager_events(text.as_bytes(), 0);
        assert_eq!(p.events.len(), 2);
        assert_eq!(p.skipped_lines, vec![2, 4]);
        let p = parse_manager_events(LINE.as_bytes(), 2000);
        assert!(p.events.is_empty());
        assert_eq!(p.before_start, 1);
    }
}
