//! The run directory: one per run, holding everything needed to check it again and to render
//! its report.
//!
//! | file | written by | what |
//! |---|---|---|
//! | [`HISTORY_FILE`] | runner, during the run | the clients' ops ([`crate::history`]) |
//! | [`SCHEDULE_FILE`] | runner, before the run | the planned faults ([`Schedule`]) |
//! | [`INJECTIONS_FILE`] | runner, during the run | what it really injected ([`Injection`], JSON lines) |
//! | [`EVENTS_FILE`] | runner, copied from the manager | the manager's event log (its own format) |
//! | [`FRAMES_FILE`] | runner, from its LAN capture | guest frames ([`GuestFrame`], JSON lines) |
//! | [`FINALS_FILE`] | runner, after the heal | every key's final value (a JSON object; `null` = absent) |
//! | [`RUN_FILE`] | runner | [`RunInfo`]: seed, wall-clock start, liveness observation |
//! | [`VERDICT_FILE`] | [`check_run_dir`] or the runner | the [`Verdict`] |
//! | [`REPORT_FILE`] | [`crate::report::render_run_dir`] | the HTML page |
//!
//! JSON files are written whole through a temporary file and a rename; JSON-lines files are
//! read back with a torn last line accepted (a crash) and any other bad line an error.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::checker::{
    self, CheckConfig, CheckError, FaultWindow, GuestFrame, LivenessObservation, Verdict,
};
use crate::history::{self, HistoryError};
use crate::schedule::{Injection, Schedule};

/// The clients' operations.
pub const HISTORY_FILE: &str = "history.jsonl";
/// The fault schedule.
pub const SCHEDULE_FILE: &str = "schedule.json";
/// The faults as injected.
pub const INJECTIONS_FILE: &str = "faults.jsonl";
/// The manager's event log.
pub const EVENTS_FILE: &str = "events.jsonl";
/// Guest frames seen on the clients' LAN.
pub const FRAMES_FILE: &str = "frames.jsonl";
/// Final values read after the heal.
pub const FINALS_FILE: &str = "final.json";
/// Facts about the run.
pub const RUN_FILE: &str = "run.json";
/// The checks' verdict.
pub const VERDICT_FILE: &str = "verdict.json";
/// The report.
pub const REPORT_FILE: &str = "report.html";

/// Facts about one run that no other file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    /// This run's seed (the schedule's).
    pub seed: u64,
    /// Its number in the sweep, from 0.
    pub run: u32,
    /// Wall-clock time of the run's time 0, ms since the Unix epoch (to place the manager's
    /// wall-clock events on the run's clock).
    pub start_unix_ms: u64,
    /// The commit of vmatrix that ran, if known.
    #[serde(default)]
    pub commit: Option<String>,
    /// What the runner saw after the final heal.
    #[serde(default)]
    pub liveness: Option<LivenessObservation>,
}

/// Errors of reading or writing a run directory.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A JSON file or line that does not parse.
    #[error("{path}{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Json {
        /// The file.
        path: PathBuf,
        /// The 1-based line, for JSON lines.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// The history file is bad.
    #[error("{path}: {source}")]
    History {
        /// The file.
        path: PathBuf,
        /// Why.
        source: HistoryError,
    },
    /// The history cannot be checked.
    #[error("checking: {0}")]
    Check(#[from] CheckError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RunDirError + '_ {
    move |source| RunDirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `value` as pretty JSON to `path`, atomically (temporary file, fsync, rename).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), RunDirError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| RunDirError::Json {
        path: path.to_path_buf(),
        line: None,
        message: e.to_string(),
    })?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RunDirError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Reads a JSON file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, RunDirError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&bytes).map_err(|e| RunDirError::Json {
        path: path.to_path_buf(),
        line: None,
        message: e.to_string(),
    })
}

/// Reads a JSON file if it exists.
pub fn read_json_if_present<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, RunDirError> {
    if !path.exists() {
        return Ok(None);
    }
    read_json(path).map(Some)
}

/// Parsed JSON lines, and whether a torn last line was dropped (its 1-based number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonLines<T> {
    /// The records.
    pub items: Vec<T>,
    /// The torn last line, if any.
    pub torn_line: Option<usize>,
}

/// Parses JSON lines: a last line without its newline that does not parse is torn (dropped and
/// reported); any other bad line is an error; empty lines are skipped.
pub fn parse_json_lines<T: DeserializeOwned>(
    bytes: &[u8],
    path: &Path,
) -> Result<JsonLines<T>, RunDirError> {
    let complete = bytes.last().is_none_or(|&b| b == b'\n');
    let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    let last = lines.len();
    let mut out = JsonLines {
        items: Vec::new(),
        torn_line: None,
    };
    for (i, line) in lines.into_iter().enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice(line) {
            Ok(item) => out.items.push(item),
            Err(_) if i + 1 == last && !complete => out.torn_line = Some(i + 1),
            Err(e) => {
                return Err(RunDirError::Json {
                    path: path.to_path_buf(),
                    line: Some(i + 1),
                    message: e.to_string(),
                })
            }
        }
    }
    Ok(out)
}

/// Reads a JSON-lines file (see [`parse_json_lines`]); a missing file is empty.
pub fn read_json_lines<T: DeserializeOwned>(path: &Path) -> Result<JsonLines<T>, RunDirError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err(path)(e)),
    };
    parse_json_lines(&bytes, path)
}

/// Reads the history of a run directory.
pub fn read_history(dir: &Path) -> Result<history::History, RunDirError> {
    let path = dir.join(HISTORY_FILE);
    history::read_history_file(&path).map_err(|source| RunDirError::History { path, source })
}

/// Checks a run directory again from its files (history, final values, frames, run facts,
/// injections or else the schedule), writes [`VERDICT_FILE`] and returns the verdict.
pub fn check_run_dir(dir: &Path, cfg: &CheckConfig) -> Result<Verdict, RunDirError> {
    let history = read_history(dir)?;
    let finals: BTreeMap<String, Option<String>> = read_json(&dir.join(FINALS_FILE))?;
    let frames: JsonLines<GuestFrame> = read_json_lines(&dir.join(FRAMES_FILE))?;
    let run: Option<RunInfo> = read_json_if_present(&dir.join(RUN_FILE))?;
    let schedule: Option<Schedule> = read_json_if_present(&dir.join(SCHEDULE_FILE))?;
    let injections: JsonLines<Injection> = read_json_lines(&dir.join(INJECTIONS_FILE))?;
    let faults = match (&schedule, injections.items.is_empty()) {
        (Some(s), false) => FaultWindow::from_injections(&injections.items, s.final_heal_ns),
        (Some(s), true) => FaultWindow::from_schedule(s),
        (None, _) => FaultWindow::from_injections(&injections.items, u64::MAX),
    };
    let input = checker::CheckInput {
        history: &history.ops,
        finals: &finals,
        frames: &frames.items,
        liveness: run.and_then(|r| r.liveness),
        faults: &faults,
    };
    let verdict = checker::check(&input, cfg)?;
    write_json(&dir.join(VERDICT_FILE), &verdict)?;
    Ok(verdict)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::VerdictOutcome;
    use crate::history::tests::{get, set};
    use crate::history::HistoryWriter;

    #[test]
    fn json_lines_accept_a_torn_tail_only() {
        let p = Path::new("x.jsonl");
        let ok: JsonLines<GuestFrame> = parse_json_lines(
            b"{\"time_ns\":1,\"host\":\"a\"}\n\n{\"time_ns\":2,\"host\":\"b\",\"term\":3}\n{\"time_ns\":3,\"ho",
            p,
        )
        .unwrap();
        assert_eq!(ok.items.len(), 2);
        assert_eq!(ok.items[1].term, Some(3));
        assert_eq!(ok.torn_line, Some(4));
        let bad = parse_json_lines::<GuestFrame>(b"{\"time_ns\":1,\"host\":\"a\"}\nnope\n", p);
        assert!(matches!(bad, Err(RunDirError::Json { line: Some(2), .. })));
    }

    #[test]
    fn a_run_dir_is_checked_again_from_its_files() {
        let d = tempfile::tempdir().unwrap();
        let mut w = HistoryWriter::append_to(&d.path().join(HISTORY_FILE)).unwrap();
        w.append(&set(1, 1, "k", "a", (0, 10))).unwrap();
        w.append(&get(2, 1, "k", Some("a"), (20, 30))).unwrap();
        let finals: BTreeMap<String, Option<String>> =
            [("k".to_string(), Some("a".to_string()))].into();
        write_json(&d.path().join(FINALS_FILE), &finals).unwrap();
        std::fs::write(
            d.path().join(FRAMES_FILE),
            "{\"time_ns\":5,\"host\":\"a\"}\n",
        )
        .unwrap();
        let run = RunInfo {
            seed: 1,
            run: 0,
            start_unix_ms: 1_700_000_000_000,
            commit: None,
            liveness: Some(LivenessObservation {
                heal_ns: 40,
                protected_ns: Some(50),
                answering_ns: Some(45),
            }),
        };
        write_json(&d.path().join(RUN_FILE), &run).unwrap();
        let v = check_run_dir(d.path(), &CheckConfig::default()).unwrap();
        assert_eq!(v.outcome, VerdictOutcome::Pass, "{:?}", v.reasons);
        let again: Verdict = read_json(&d.path().join(VERDICT_FILE)).unwrap();
        assert_eq!(again, v);
        assert!(!d.path().join("verdict.json.tmp").exists());
    }

    #[test]
    fn missing_required_files_are_errors_naming_them() {
        let d = tempfile::tempdir().unwrap();
        let e = check_run_dir(d.path(), &CheckConfig::default()).unwrap_err();
        assert!(e.to_string().contains(HISTORY_FILE), "{e}");
    }
}
