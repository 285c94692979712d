//! The clients' operation history: one JSON line per completed operation.
//!
//! Every operation a workload client performs on the guest's KV service is recorded once it is
//! over, with its invoke and complete times (ns since the run's start) and one of three
//! outcomes:
//!
//! - `ok`: the service answered. A get carries the value it read (`null` = key absent).
//! - `fail`: the operation definitely did not take effect (for example the connection was
//!   refused before the request was sent, or the service answered with an error).
//! - `unknown`: the request may or may not have taken effect (a timeout or a connection reset
//!   after sending). The checkers treat it as possibly applied at any time after its invoke.
//!
//! A line looks like
//!
//! ```json
//! {"client":3,"op":17,"key":"k1","kind":"set","value":"c3-17","invoke_ns":1200,"complete_ns":2900,"outcome":"ok"}
//! {"client":3,"op":18,"key":"k1","kind":"get","invoke_ns":3000,"complete_ns":3800,"outcome":"ok","read":"c3-17"}
//! {"client":4,"op":9,"key":"k2","kind":"set","value":"c4-9","invoke_ns":3100,"complete_ns":9100,"outcome":"unknown","error":"timeout"}
//! ```
//!
//! [`HistoryWriter`] appends one line per write call (so several writers on one `O_APPEND`
//! file do not interleave within a line); [`read_history`] reads a file back, accepts a torn
//! last line (a crash of the writer), which it reports, and turns every other malformed line
//! into a typed error with its line number.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// A workload client's id.
pub type ClientId = u32;

/// What an operation does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// `SET key value`: the value is unique in the whole history.
    Set {
        /// The value written.
        value: String,
    },
    /// `GET key`.
    Get,
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The service answered. For a get, `read` is the value (`None` = key absent); for a set
    /// it is always `None`.
    Ok {
        /// The value read by a get.
        read: Option<String>,
    },
    /// Definitely not applied.
    Fail {
        /// Why, for a person.
        error: String,
    },
    /// May or may not have been applied.
    Unknown {
        /// Why, for a person.
        error: String,
    },
}

/// One operation of the history.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Op {
    /// The client that performed it.
    pub client: ClientId,
    /// Its id, unique per client.
    pub op: u64,
    /// The key.
    pub key: String,
    /// Set or get.
    pub kind: OpKind,
    /// When the client sent it (ns since the run's start).
    pub invoke_ns: u64,
    /// When the client got the answer or gave up (ns since the run's start), `>= invoke_ns`.
    pub complete_ns: u64,
    /// How it ended.
    pub outcome: Outcome,
}

impl Op {
    /// The value this op writes, if it is a set.
    pub fn written(&self) -> Option<&str> {
        match &self.kind {
            OpKind::Set { value } => Some(value),
            OpKind::Get => None,
        }
    }

    /// Whether it is a set.
    pub fn is_set(&self) -> bool {
        matches!(self.kind, OpKind::Set { .. })
    }

    /// Whether the service answered.
    pub fn is_ok(&self) -> bool {
        matches!(self.outcome, Outcome::Ok { .. })
    }

    /// Whether it definitely did not apply.
    pub fn is_fail(&self) -> bool {
        matches!(self.outcome, Outcome::Fail { .. })
    }

    /// Whether it may or may not have applied.
    pub fn is_unknown(&self) -> bool {
        matches!(self.outcome, Outcome::Unknown { .. })
    }

    /// What a successful get read: `Some(None)` = key absent; `None` if this is not an ok get.
    pub fn read(&self) -> Option<Option<&str>> {
        match (&self.kind, &self.outcome) {
            (OpKind::Get, Outcome::Ok { read }) => Some(read.as_deref()),
            _ => None,
        }
    }

    /// The latency as the client saw it.
    pub fn latency_ns(&self) -> u64 {
        self.complete_ns.saturating_sub(self.invoke_ns)
    }

    /// Validates one record on its own (the checks that need no other line).
    pub fn validate(&self) -> Result<(), InvalidOp> {
        if self.complete_ns < self.invoke_ns {
            return Err(InvalidOp::CompletesBeforeInvoke {
                invoke_ns: self.invoke_ns,
                complete_ns: self.complete_ns,
            });
        }
        if let (OpKind::Set { .. }, Outcome::Ok { read: Some(_) }) = (&self.kind, &self.outcome) {
            return Err(InvalidOp::SetWithRead);
        }
        Ok(())
    }
}

/// A record that cannot be a real operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidOp {
    /// Time runs backwards.
    #[error("complete_ns {complete_ns} is before invoke_ns {invoke_ns}")]
    CompletesBeforeInvoke {
        /// Invoke.
        invoke_ns: u64,
        /// Complete.
        complete_ns: u64,
    },
    /// A set cannot read.
    #[error("a set carries a read value")]
    SetWithRead,
    /// A set must say what it wrote.
    #[error("a set without a value")]
    SetWithoutValue,
    /// A get writes nothing.
    #[error("a get with a value to write")]
    GetWithValue,
    /// An ok get must say what it read (`null` for an absent key).
    #[error("an ok get without its read value (use null for an absent key)")]
    GetWithoutRead,
    /// Only an ok get reads.
    #[error("a read value on an operation that is not an ok get")]
    UnexpectedRead,
    /// An ok operation carries no error text.
    #[error("an error text on an ok operation")]
    ErrorOnOk,
}

/// Errors of reading or writing a history.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The file could not be read or written.
    #[error("history I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A line that is not JSON of the expected shape (and not a torn last line).
    #[error("history line {line}: {message}")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A line that parses but cannot be a real operation.
    #[error("history line {line}: {error}")]
    Invalid {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        error: InvalidOp,
    },
    /// An op to write that cannot be a real operation.
    #[error("not writing an invalid op: {0}")]
    InvalidToWrite(InvalidOp),
}

/// The wire form of one line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    client: ClientId,
    op: u64,
    key: String,
    kind: LineKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    invoke_ns: u64,
    complete_ns: u64,
    outcome: LineOutcome,
    /// Present (possibly `null`) only on an ok get.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    read: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum LineKind {
    Set,
    Get,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum LineOutcome {
    Ok,
    Fail,
    Unknown,
}

/// Tells a field that is present with `null` (`Some(None)`) from an absent one (`None`).
fn present<'de, D>(d: D) -> Result<Option<Option<String>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Option::<String>::deserialize(d).map(Some)
}

impl From<&Op> for Line {
    fn from(op: &Op) -> Line {
        let (kind, value) = match &op.kind {
            OpKind::Set { value } => (LineKind::Set, Some(value.clone())),
            OpKind::Get => (LineKind::Get, None),
        };
        let (outcome, read, error) = match &op.outcome {
            Outcome::Ok { read } => {
                let read = matches!(op.kind, OpKind::Get).then(|| read.clone());
                (LineOutcome::Ok, read, None)
            }
            Outcome::Fail { error } => (LineOutcome::Fail, None, Some(error.clone())),
            Outcome::Unknown { error } => (LineOutcome::Unknown, None, Some(error.clone())),
        };
        Line {
            client: op.client,
            op: op.op,
            key: op.key.clone(),
            kind,
            value,
            invoke_ns: op.invoke_ns,
            complete_ns: op.complete_ns,
            outcome,
            read,
            error,
        }
    }
}

impl TryFrom<Line> for Op {
    type Error = InvalidOp;

    fn try_from(l: Line) -> Result<Op, InvalidOp> {
        let kind = match (l.kind, l.value) {
            (LineKind::Set, Some(value)) => OpKind::Set { value },
            (LineKind::Set, None) => return Err(InvalidOp::SetWithoutValue),
            (LineKind::Get, None) => OpKind::Get,
            (LineKind::Get, Some(_)) => return Err(InvalidOp::GetWithValue),
        };
        let is_get = matches!(kind, OpKind::Get);
        let outcome = match (l.outcome, l.read) {
            (LineOutcome::Ok, _) if l.error.is_some() => return Err(InvalidOp::ErrorOnOk),
            (LineOutcome::Ok, Some(read)) if is_get => Outcome::Ok { read },
            (LineOutcome::Ok, None) if is_get => return Err(InvalidOp::GetWithoutRead),
            (LineOutcome::Ok, None) => Outcome::Ok { read: None },
            (_, Some(_)) => return Err(InvalidOp::UnexpectedRead),
            (LineOutcome::Fail, None) => Outcome::Fail {
                error: l.error.unwrap_or_default(),
            },
            (LineOutcome::Unknown, None) => Outcome::Unknown {
                error: l.error.unwrap_or_default(),
            },
        };
        let op = Op {
            client: l.client,
            op: l.op,
            key: l.key,
            kind,
            invoke_ns: l.invoke_ns,
            complete_ns: l.complete_ns,
            outcome,
        };
        op.validate()?;
        Ok(op)
    }
}

impl Serialize for Op {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Line::from(self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Op {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Op, D::Error> {
        let line = Line::deserialize(d)?;
        Op::try_from(line).map_err(serde::de::Error::custom)
    }
}

/// Encodes one op as its JSON line, with the trailing newline.
pub fn encode_line(op: &Op) -> Result<Vec<u8>, HistoryError> {
    op.validate().map_err(HistoryError::InvalidToWrite)?;
    let mut line = serde_json::to_vec(&Line::from(op)).map_err(|e| HistoryError::Malformed {
        line: 0,
        message: e.to_string(),
    })?;
    line.push(b'\n');
    Ok(line)
}

/// Appends ops to a history, one `write_all` per line.
///
/// Wrap `W` in a `BufWriter` for throughput (and call [`HistoryWriter::flush`]); give it the
/// file itself (opened with `append`) when every line must be on disk as soon as the op ends.
#[derive(Debug)]
pub struct HistoryWriter<W: Write> {
    out: W,
    written: u64,
}

impl HistoryWriter<std::fs::File> {
    /// Opens (creating) a history file for appending.
    pub fn append_to(path: &std::path::Path) -> Result<Self, HistoryError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(HistoryWriter::new(file))
    }
}

impl<W: Write> HistoryWriter<W> {
    /// A writer appending to `out`.
    pub fn new(out: W) -> Self {
        HistoryWriter { out, written: 0 }
    }

    /// Appends one op as one line.
    pub fn append(&mut self, op: &Op) -> Result<(), HistoryError> {
        let line = encode_line(op)?;
        self.out.write_all(&line)?;
        self.written += 1;
        Ok(())
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> Result<(), HistoryError> {
        self.out.flush()?;
        Ok(())
    }

    /// Ops appended through this writer.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The underlying writer.
    pub fn into_inner(self) -> W {
        self.out
    }
}

/// A torn last line, dropped by the reader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TornTail {
    /// 1-based line number.
    pub line: usize,
    /// Its length in bytes.
    pub bytes: usize,
}

/// A history as read back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// The ops, in file order.
    pub ops: Vec<Op>,
    /// The unfinished last line a crash left, if any (not in `ops`).
    pub torn_tail: Option<TornTail>,
}

/// Reads a history.
///
/// A last line without its newline that does not parse is a torn write: it is dropped and
/// reported in [`History::torn_tail`]. A last line without its newline that parses is kept.
/// Any other line that does not parse, or that cannot be a real operation, is an error with
/// its line number; so is an empty line in the middle.
pub fn read_history(mut input: impl Read) -> Result<History, HistoryError> {
    let mut buf = Vec::new();
    input.read_to_end(&mut buf)?;
    parse_history(&buf)
}

/// Reads a history file (see [`read_history`]).
pub fn read_history_file(path: &std::path::Path) -> Result<History, HistoryError> {
    read_history(std::fs::File::open(path)?)
}

/// Parses a history from bytes (see [`read_history`]).
pub fn parse_history(buf: &[u8]) -> Result<History, HistoryError> {
    let mut history = History::default();
    let ends_with_newline = buf.last().is_none_or(|&b| b == b'\n');
    let body = buf.strip_suffix(b"\n").unwrap_or(buf);
    if body.is_empty() && ends_with_newline {
        return Ok(history);
    }
    let lines: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
    let last = lines.len();
    for (i, raw) in lines.into_iter().enumerate() {
        let line = i + 1;
        let torn_candidate = line == last && !ends_with_newline;
        match parse_line(raw, line) {
            Ok(op) => history.ops.push(op),
            Err(HistoryError::Malformed { .. }) if torn_candidate => {
                history.torn_tail = Some(TornTail {
                    line,
                    bytes: raw.len(),
                });
            }
            Err(e) => return Err(e),
        }
    }
    Ok(history)
}

fn parse_line(raw: &[u8], line: usize) -> Result<Op, HistoryError> {
    let parsed: Line = serde_json::from_slice(raw).map_err(|e| HistoryError::Malformed {
        line,
        message: if raw.is_empty() {
            "empty line".into()
        } else {
            e.to_string()
        },
    })?;
    Op::try_from(parsed).map_err(|error| HistoryError::Invalid { line, error })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An ok set.
    pub fn set(client: u32, op: u64, key: &str, value: &str, t: (u64, u64)) -> Op {
        Op {
            client,
            op,
            key: key.into(),
            kind: OpKind::Set {
                value: value.into(),
            },
            invoke_ns: t.0,
            complete_ns: t.1,
            outcome: Outcome::Ok { read: None },
        }
    }

    /// An ok get that read `read`.
    pub fn get(client: u32, op: u64, key: &str, read: Option<&str>, t: (u64, u64)) -> Op {
        Op {
            client,
            op,
            key: key.into(),
            kind: OpKind::Get,
            invoke_ns: t.0,
            complete_ns: t.1,
            outcome: Outcome::Ok {
                read: read.map(Into::into),
            },
        }
    }

    /// `op` with an unknown outcome.
    pub fn unknown(mut op: Op) -> Op {
        op.outcome = Outcome::Unknown {
            error: "timeout".into(),
        };
        op
    }

    /// `op` with a failed outcome.
    pub fn failed(mut op: Op) -> Op {
        op.outcome = Outcome::Fail {
            error: "connection refused".into(),
        };
        op
    }

    fn sample() -> Vec<Op> {
        vec![
            set(1, 1, "k", "a", (10, 20)),
            get(2, 1, "k", Some("a"), (25, 30)),
            get(2, 2, "other", None, (31, 32)),
            unknown(set(1, 2, "k", "b", (40, 90))),
            failed(get(3, 1, "k", None, (41, 41))),
        ]
    }

    #[test]
    fn round_trips_through_lines() {
        let mut w = HistoryWriter::new(Vec::new());
        for op in sample() {
            w.append(&op).unwrap();
        }
        assert_eq!(w.written(), 5);
        let bytes = w.into_inner();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains(r#""read":null"#), "{text}");
        assert!(text.contains(r#""outcome":"unknown","error":"timeout""#));
        let h = read_history(&bytes[..]).unwrap();
        assert_eq!(h.ops, sample());
        assert_eq!(h.torn_tail, None);
    }

    #[test]
    fn a_torn_last_line_is_reported_not_fatal() {
        let mut bytes = Vec::new();
        for op in sample() {
            bytes.extend(encode_line(&op).unwrap());
        }
        bytes.extend_from_slice(br#"{"client":1,"op":3,"key":"k","ki"#);
        let h = parse_history(&bytes).unwrap();
        assert_eq!(h.ops.len(), 5);
        assert_eq!(h.torn_tail, Some(TornTail { line: 6, bytes: 32 }));
    }

    #[test]
    fn a_whole_last_line_without_newline_is_kept() {
        let mut bytes = encode_line(&sample()[0]).unwrap();
        bytes.pop();
        let h = parse_history(&bytes).unwrap();
        assert_eq!(h.ops.len(), 1);
        assert_eq!(h.torn_tail, None);
    }

    #[test]
    fn malformed_lines_in_the_middle_are_errors_with_their_number() {
        let good = String::from_utf8(encode_line(&sample()[0]).unwrap()).unwrap();
        let text = format!("{good}{{\"client\":1\n{good}");
        match parse_history(text.as_bytes()) {
            Err(HistoryError::Malformed { line: 2, .. }) => {}
            other => panic!("{other:?}"),
        }
        // A broken last line that ends with its newline is not torn: it was written whole.
        let text = format!("{good}garbage\n");
        assert!(matches!(
            parse_history(text.as_bytes()),
            Err(HistoryError::Malformed { line: 2, .. })
        ));
        let text = format!("{good}\n{good}");
        assert!(matches!(
            parse_history(text.as_bytes()),
            Err(HistoryError::Malformed { line: 2, .. })
        ));
    }

    #[test]
    fn impossible_records_are_typed_errors() {
        let cases = [
            (
                r#"{"client":1,"op":1,"key":"k","kind":"get","invoke_ns":5,"complete_ns":4,"outcome":"ok","read":null}"#,
                InvalidOp::CompletesBeforeInvoke {
                    invoke_ns: 5,
                    complete_ns: 4,
                },
            ),
            (
                r#"{"client":1,"op":1,"key":"k","kind":"get","invoke_ns":1,"complete_ns":4,"outcome":"ok"}"#,
                InvalidOp::GetWithoutRead,
            ),
            (
                r#"{"client":1,"op":1,"key":"k","kind":"set","invoke_ns":1,"complete_ns":4,"outcome":"ok"}"#,
                InvalidOp::SetWithoutValue,
            ),
            (
                r#"{"client":1,"op":1,"key":"k","kind":"set","value":"v","invoke_ns":1,"complete_ns":4,"outcome":"ok","read":"x"}"#,
                InvalidOp::UnexpectedRead,
            ),
            (
                r#"{"client":1,"op":1,"key":"k","kind":"get","value":"v","invoke_ns":1,"complete_ns":4,"outcome":"fail"}"#,
                InvalidOp::GetWithValue,
            ),
        ];
        for (text, want) in cases {
            match parse_history(format!("{text}\n").as_bytes()) {
                Err(HistoryError::Invalid { line: 1, error }) => assert_eq!(error, want),
                other => panic!("{text}: {other:?}"),
            }
        }
        let unknown_field = r#"{"client":1,"op":1,"key":"k","kind":"get","invoke_ns":1,"complete_ns":4,"outcome":"fail","colour":1}"#;
        assert!(matches!(
            parse_history(format!("{unknown_field}\n").as_bytes()),
            Err(HistoryError::Malformed { line: 1, .. })
        ));
    }

    #[test]
    fn an_invalid_op_is_not_written() {
        let mut op = sample()[0].clone();
        op.complete_ns = 1;
        let mut w = HistoryWriter::new(Vec::new());
        assert!(matches!(
            w.append(&op),
            Err(HistoryError::InvalidToWrite(_))
        ));
        assert!(w.into_inner().is_empty());
    }

    #[test]
    fn empty_input_is_an_empty_history() {
        assert_eq!(parse_history(b"").unwrap(), History::default());
        assert_eq!(parse_history(b"\n").unwrap(), History::default());
    }

    #[test]
    fn a_file_appends_across_writers() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("history.jsonl");
        for op in sample() {
            let mut w = HistoryWriter::append_to(&p).unwrap();
            w.append(&op).unwrap();
        }
        assert_eq!(read_history_file(&p).unwrap().ops, sample());
    }
}
