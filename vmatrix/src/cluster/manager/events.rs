//! The manager's event log: every [`failover::event::Event`] numbered, stamped with wall-clock
//! time, appended as one JSON line to the events file, kept (the last [`KEEP`]) in memory for
//! `GET /v1/events`, and logged.
//!
//! Numbers go on across restarts: on start the tail of the file is read back, so the last
//! events before a restart are still served and the next event gets the next number. Lines are
//! made durable after the decision that logged them was acted on ([`EventLog::sync`]).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use failover::event::Event;
use serde::{Deserialize, Serialize};

/// Events kept in memory.
pub const KEEP: usize = 1000;
/// How much of the file's end is read back on start.
const TAIL: u64 = 1 << 20;

/// One event as written and served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamped {
    /// Number, from 1, growing across restarts.
    pub seq: u64,
    /// Wall-clock time, RFC 3339 (UTC).
    pub time: String,
    /// Wall-clock time, ms since the Unix epoch.
    pub unix_ms: u64,
    /// The event (`at_ms` is manager time: ms since this manager process started).
    #[serde(flatten)]
    pub event: Event,
}

/// The log.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    file: File,
    recent: VecDeque<Stamped>,
    next_seq: u64,
    /// Events of this process.
    written: u64,
    /// Lines written since the last [`EventLog::sync`].
    unsynced: bool,
}

impl EventLog {
    /// Opens (creating) the events file for appending and reads back its tail.
    pub fn open(path: &Path) -> anyhow::Result<EventLog> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening the events file {}", path.display()))?;
        let (recent, torn) = read_tail(&mut file)
            .with_context(|| format!("reading the events file {}", path.display()))?;
        if torn {
            // A crash tore the last line: end it, so the next event starts a line of its own.
            file.write_all(b"\n")
                .with_context(|| format!("appending to the events file {}", path.display()))?;
        }
        let next_seq = recent.back().map_or(1, |e| e.seq + 1);
        Ok(EventLog {
            path: path.to_path_buf(),
            file,
            recent,
            next_seq,
            written: 0,
            unsynced: false,
        })
    }

    /// Numbers, stamps, writes and logs `event`.
    pub fn append(&mut self, event: Event) {
        let now = time::OffsetDateTime::now_utc();
        let stamped = Stamped {
            seq: self.next_seq,
            time: now
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|_| "?".into()),
            unix_ms: (now.unix_timestamp_nanos() / 1_000_000).max(0) as u64,
            event,
        };
        self.next_seq += 1;
        self.written += 1;
        let e = &stamped.event;
        tracing::info!(
            seq = stamped.seq,
            kind = ?e.kind,
            vm = e.vm.as_deref().unwrap_or("-"),
            host = e.host.as_deref().unwrap_or("-"),
            term = e.term,
            "event: {}",
            e.detail
        );
        match serde_json::to_vec(&stamped) {
            Ok(mut line) => {
                line.push(b'\n');
                // One write per line (O_APPEND): a crash leaves at most a torn last line, which
                // the next start skips.
                self.unsynced = true;
                if let Err(err) = self.file.write_all(&line) {
                    tracing::error!(
                        "cannot append to the events file {}: {err}",
                        self.path.display()
                    );
                }
            }
            Err(err) => tracing::error!("cannot encode event {}: {err}", stamped.seq),
        }
        if self.recent.len() == KEEP {
            self.recent.pop_front();
        }
        self.recent.push_back(stamped);
    }

    /// Makes the lines written so far durable (fdatasync), if any: the manager calls it after
    /// acting on a decision, so an incident's events survive a crash of the machine too, and
    /// the sync never delays the decision itself.
    pub fn sync(&mut self) {
        if !std::mem::take(&mut self.unsynced) {
            return;
        }
        if let Err(err) = self.file.sync_data() {
            tracing::error!("cannot sync the events file {}: {err}", self.path.display());
        }
    }

    /// The kept events numbered above `since`.
    pub fn since(&self, since: u64) -> Vec<Stamped> {
        let start = self.recent.partition_point(|e| e.seq <= since);
        self.recent.range(start..).cloned().collect()
    }

    /// Events logged by this process.
    pub fn written(&self) -> u64 {
        self.written
    }
}

/// The last [`KEEP`] whole, parseable events of the file, and whether its last line is
/// unfinished.
fn read_tail(file: &mut File) -> std::io::Result<(VecDeque<Stamped>, bool)> {
    let len = file.metadata()?.len();
    let from = len.saturating_sub(TAIL);
    file.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    file.take(TAIL).read_to_end(&mut buf)?;
    let torn = buf.last().is_some_and(|&b| b != b'\n');
    let mut lines = buf.split(|&b| b == b'\n').collect::<Vec<_>>();
    if from > 0 && !lines.is_empty() {
        lines.remove(0); // cut in the middle
    }
    let mut out = VecDeque::new();
    for l in lines {
        let Ok(e) = serde_json::from_slice::<Stamped>(l) else {
            continue; // empty, torn or foreign line
        };
        if out.back().is_some_and(|b: &Stamped| b.seq >= e.seq) {
            continue;
        }
        if out.len() == KEEP {
            out.pop_front();
        }
        out.push_back(e);
    }
    Ok((out, torn))
}

#[cfg(test)]
mod tests {
    use super::*;
    use failover::event::EventKind;

    fn ev(detail: &str) -> Event {
        Event {
            at_ms: 5,
            kind: EventKind::Created,
            vm: Some("web".into()),
            host: Some("a".into()),
            term: Some(1),
            detail: detail.into(),
        }
    }

    #[test]
    fn numbers_go_on_across_restarts_and_torn_lines_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("events.jsonl");
        let mut log = EventLog::open(&p).unwrap();
        log.append(ev("one"));
        log.append(ev("two"));
        assert_eq!(log.since(0).len(), 2);
        assert_eq!(log.since(1)[0].event.detail, "two");
        drop(log);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"{\"seq\": 3, \"tim")
            .unwrap();
        let mut log = EventLog::open(&p).unwrap();
        assert_eq!(log.since(0).len(), 2);
        log.append(ev("three"));
        let all = log.since(0);
        assert_eq!(all.last().unwrap().seq, 3);
        assert!(all[0].time.ends_with('Z'), "{}", all[0].time);
        drop(log);
        assert_eq!(EventLog::open(&p).unwrap().since(0).len(), 3);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("\"kind\":\"created\""), "{text}");
    }
}
