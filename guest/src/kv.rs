//! The key-value protocol: one request per line.
//!
//! `SET <key> <value>` → `OK` (after the write is on disk), `GET <key>` → `VALUE <value>` or
//! `NOTFOUND`, `COUNT` → `COUNT <n>` (keys stored), `CHURN <pages> <pages_per_ms>` → `OK`,
//! `STATS` → counters, `EXITBENCH <n>` → mean cost of an MMIO and a port-I/O exit,
//! `DISKREAD <sector> <count>` and `LAYOUT` (for dirty-tracking tests),
//! anything else → `ERR <why>`. Keys and values are 1..=255 printable
//! bytes without spaces.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// Store a value.
    Set(&'a [u8], &'a [u8]),
    /// Read a value.
    Get(&'a [u8]),
    /// Number of keys.
    Count,
    /// Start/stop the memory churner.
    Churn(usize, u64),
    /// Counters.
    Stats,
    /// Measure the cost of `n` MMIO and `n` port-I/O exits.
    ExitBench(u32),
    /// Read `count` sectors from `sector` into the disk buffer (device writes guest memory).
    DiskRead(u64, u32),
    /// Where the receive buffers and the disk buffer live.
    Layout,
}

fn valid_token(t: &[u8]) -> bool {
    (1..=255).contains(&t.len()) && t.iter().all(|&b| (0x21..=0x7e).contains(&b))
}

fn number<T: core::str::FromStr>(t: &[u8]) -> Option<T> {
    core::str::from_utf8(t).ok()?.parse().ok()
}

/// Parses one line (without its newline).
pub fn parse(line: &[u8]) -> Result<Request<'_>, &'static str> {
    let mut it = line.split(|&b| b == b' ').filter(|t| !t.is_empty());
    let cmd = it.next().ok_or("empty request")?;
    let args: Vec<&[u8]> = it.collect();
    let req = match (cmd, args.as_slice()) {
        (b"SET", [k, v]) => {
            if !valid_token(k) || !valid_token(v) {
                return Err("key and value must be 1..255 printable bytes");
            }
            Request::Set(k, v)
        }
        (b"SET", _) => return Err("usage: SET <key> <value>"),
        (b"GET", [k]) => {
            if !valid_token(k) {
                return Err("key must be 1..255 printable bytes");
            }
            Request::Get(k)
        }
        (b"GET", _) => return Err("usage: GET <key>"),
        (b"COUNT", []) => Request::Count,
        (b"STATS", []) => Request::Stats,
        (b"CHURN", [p, r]) => match (number(p), number(r)) {
            (Some(p), Some(r)) => Request::Churn(p, r),
            _ => return Err("usage: CHURN <pages> <pages_per_ms>"),
        },
        (b"CHURN", _) => return Err("usage: CHURN <pages> <pages_per_ms>"),
        (b"DISKREAD", [s, c]) => match (number::<u64>(s), number::<u32>(c)) {
            (Some(s), Some(c)) if (1..=128).contains(&c) => Request::DiskRead(s, c),
            _ => return Err("usage: DISKREAD <sector> <1..128>"),
        },
        (b"LAYOUT", []) => Request::Layout,
        (b"EXITBENCH", [n]) => match number::<u32>(n) {
            Some(n) if (1..=1_000_000).contains(&n) => Request::ExitBench(n),
            _ => return Err("usage: EXITBENCH <1..1000000>"),
        },
        _ => return Err("unknown command"),
    };
    Ok(req)
}

/// The in-memory table with an undo log for the batch not yet on disk.
#[derive(Default)]
pub struct Store {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
    undo: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Store {
    /// Applies a replayed record (no undo).
    pub fn load(&mut self, k: &[u8], v: &[u8]) {
        self.map.insert(k.to_vec(), v.to_vec());
    }
    /// Sets a value, remembering the old one until the batch commits.
    pub fn set(&mut self, k: &[u8], v: &[u8]) {
        let old = self.map.insert(k.to_vec(), v.to_vec());
        self.undo.push((k.to_vec(), old));
    }
    /// Reads a value.
    pub fn get(&self, k: &[u8]) -> Option<&[u8]> {
        self.map.get(k).map(Vec::as_slice)
    }
    /// If the batch not yet on disk changed `k`: the value `k` had before it (`None` inside:
    /// the key did not exist).
    pub fn before_batch(&self, k: &[u8]) -> Option<Option<&[u8]>> {
        self.undo
            .iter()
            .find(|(key, _)| key.as_slice() == k)
            .map(|(_, old)| old.as_deref())
    }
    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }
    /// The batch is durable: forget the undo log.
    pub fn committed(&mut self) {
        self.undo.clear();
    }
    /// The batch failed: restore the previous values.
    pub fn rollback(&mut self) {
        while let Some((k, old)) = self.undo.pop() {
            match old {
                Some(v) => self.map.insert(k, v),
                None => self.map.remove(&k),
            };
        }
    }
}
