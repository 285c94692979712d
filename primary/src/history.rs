//! The primary's history: the checkpoint identity it hands out, `(history, term, seq)`, and
//! what changed since each checkpoint, so that a backup which comes back at a position of this
//! history gets one checkpoint with just the changes (quick resync, as DRBD's out-of-sync bitmap)
//! instead of a full sync.
//!
//! It outlives replication sessions: seqs run on across reconnects, and so does the record of
//! changes. Per guest page it keeps the last seq whose capture included the page; per 64 KiB
//! disk chunk the last seq whose capture wrote it (or, after the disk write log overflowed, a
//! mark that the whole disk changed at that seq). The pages changed after seq `S` are then
//! exactly those marked later than `S`. Pure data, no I/O: unit-tested below.

use std::collections::BTreeMap;

use protocol::message::Position;
use vmm::DiskCapture;

/// Granularity of the disk change record.
pub const DISK_CHUNK: u64 = 64 << 10;

/// See the module docs.
#[derive(Debug)]
pub struct History {
    /// Random id of this primary's history.
    pub id: u64,
    /// Term granted to this primary.
    pub term: u64,
    next_seq: u64,
    /// Positions before this seq cannot be resynced: a capture failed after it had taken
    /// changes (dirty bits, disk writes) that were never recorded.
    known_from: u64,
    /// Per page: 1 + the last seq that captured it (0: never).
    page_seq: Vec<u64>,
    /// Per disk chunk: the last seq that wrote it.
    disk_seq: BTreeMap<u64, u64>,
    /// The whole disk changed at this seq (write log overflowed, or a whole-disk copy).
    disk_all: Option<u64>,
    /// Output epoch each unacknowledged consistent checkpoint closed.
    pub closes: BTreeMap<u64, u64>,
    /// Highest output epoch released.
    pub released: Option<u64>,
}

impl History {
    /// A new history `id` at `term` for a guest of `mem_size` bytes.
    pub fn new(id: u64, term: u64, mem_size: u64) -> Self {
        History {
            id,
            term,
            next_seq: 0,
            known_from: 0,
            page_seq: vec![0; (mem_size / protocol::page::PAGE as u64) as usize],
            disk_seq: BTreeMap::new(),
            disk_all: None,
            closes: BTreeMap::new(),
            released: None,
        }
    }

    /// A fresh random history id (never 0, which stands for "a version-2 primary").
    pub fn random_id() -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write_u32(std::process::id());
        h.finish().max(1)
    }

    /// The seq the next checkpoint will have.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Hands out the next seq.
    pub fn take_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq - 1
    }

    /// Records what checkpoint `seq` changed: the pages `gfns` and the disk part `disk`.
    pub fn record(&mut self, seq: u64, gfns: &[u64], disk: &DiskCapture) {
        for &g in gfns {
            if let Some(s) = self.page_seq.get_mut(g as usize) {
                *s = seq + 1;
            }
        }
        match disk {
            DiskCapture::None => {}
            DiskCapture::Full(_) => self.disk_all = Some(seq),
            DiskCapture::Writes(w) => {
                for (off, data) in w {
                    let end = off + data.len() as u64;
                    for c in off / DISK_CHUNK..end.div_ceil(DISK_CHUNK) {
                        self.disk_seq.insert(c, seq);
                    }
                }
            }
        }
    }

    /// True if a backup committed at `pos` can be brought up to date with a quick resync: the
    /// position is a checkpoint of this history and term that was already taken.
    pub fn can_resync(&self, pos: &Position) -> bool {
        pos.history == self.id
            && pos.term == self.term
            && pos.seq >= self.known_from
            && pos.seq < self.next_seq
    }

    /// A capture failed and may have taken changes it never recorded: no position taken so
    /// far can be brought up to date by a quick resync any more (a full sync follows).
    pub fn forget_changes(&mut self) {
        self.known_from = self.next_seq;
    }

    /// The pages changed after checkpoint `from` (ascending).
    pub fn pages_since(&self, from: u64) -> Vec<u64> {
        let mark = from + 1;
        self.page_seq
            .iter()
            .enumerate()
            .filter(|(_, &s)| s > mark)
            .map(|(g, _)| g as u64)
            .collect()
    }

    /// Bytes a quick resync from `from` would carry at most: its pages and disk ranges (the
    /// whole disk counts as `disk_len`).
    pub fn resync_bytes(&self, from: u64, disk_len: u64) -> u64 {
        let pages = self.page_seq.iter().filter(|&&s| s > from + 1).count() as u64;
        let disk: u64 = self
            .disk_since(from)
            .iter()
            .map(|&(_, l)| l.min(disk_len))
            .sum();
        pages * protocol::page::PAGE as u64 + disk
    }

    /// The disk ranges `(offset, len)` changed after checkpoint `from`, merged; the whole disk
    /// (`(0, u64::MAX)`, clipped by the reader) if it all changed since.
    pub fn disk_since(&self, from: u64) -> Vec<(u64, u64)> {
        if self.disk_all.is_some_and(|s| s > from) {
            return vec![(0, u64::MAX)];
        }
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (&c, _) in self.disk_seq.iter().filter(|(_, &s)| s > from) {
            let off = c * DISK_CHUNK;
            match out.last_mut() {
                Some((o, l)) if *o + *l == off => *l += DISK_CHUNK,
                _ => out.push((off, DISK_CHUNK)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(h: &History, seq: u64) -> Position {
        Position {
            history: h.id,
            term: h.term,
            seq,
        }
    }

    #[test]
    fn changes_after_a_position_are_exactly_the_later_marks() {
        let mut h = History::new(7, 2, 64 * 4096);
        let s0 = h.take_seq();
        h.record(
            s0,
            &[1, 2, 3],
            &DiskCapture::Writes(vec![(0, vec![1; 512])]),
        );
        let s1 = h.take_seq();
        h.record(
            s1,
            &[3, 9],
            &DiskCapture::Writes(vec![(DISK_CHUNK * 3 - 1, vec![1; 2])]),
        );
        let s2 = h.take_seq();
        h.record(s2, &[10], &DiskCapture::None);
        assert_eq!(h.pages_since(s0), vec![3, 9, 10]);
        assert_eq!(h.pages_since(s1), vec![10]);
        assert!(h.pages_since(s2).is_empty());
        assert_eq!(h.disk_since(s0), vec![(DISK_CHUNK * 2, DISK_CHUNK * 2)]);
        assert!(h.disk_since(s1).is_empty());
        // The whole disk changed at s3: any older position gets all of it.
        let s3 = h.take_seq();
        h.record(s3, &[], &DiskCapture::Full(Vec::new()));
        assert_eq!(h.disk_since(s2), vec![(0, u64::MAX)]);
        assert_eq!(h.resync_bytes(s2, 1 << 20), 1 << 20);
        assert_eq!(h.resync_bytes(s0, 1 << 20), 3 * 4096 + (1 << 20));
        assert!(h.disk_since(s3).is_empty());
    }

    #[test]
    fn only_a_position_of_this_history_and_term_already_taken_resyncs() {
        let mut h = History::new(7, 2, 16 * 4096);
        assert!(!h.can_resync(&pos(&h, 0)), "nothing taken yet");
        h.take_seq();
        h.take_seq();
        assert!(h.can_resync(&pos(&h, 1)));
        assert!(!h.can_resync(&pos(&h, 2)), "from the future");
        let other = Position {
            history: 8,
            ..pos(&h, 1)
        };
        assert!(!h.can_resync(&other), "another primary's history");
        let old_term = Position {
            term: 1,
            ..pos(&h, 1)
        };
        assert!(!h.can_resync(&old_term));
    }

    #[test]
    fn after_a_failed_capture_no_earlier_position_resyncs() {
        let mut h = History::new(7, 2, 16 * 4096);
        h.take_seq();
        h.take_seq();
        h.forget_changes();
        assert!(!h.can_resync(&pos(&h, 1)));
        let s = h.take_seq();
        assert!(h.can_resync(&pos(&h, s)), "later positions do");
    }

    #[test]
    fn pages_beyond_ram_are_ignored() {
        let mut h = History::new(1, 1, 4 * 4096);
        let s = h.take_seq();
        h.record(s, &[2, 99], &DiskCapture::None);
        assert!(h.pages_since(s).is_empty());
        let t = h.take_seq();
        h.record(t, &[3], &DiskCapture::None);
        assert_eq!(h.pages_since(s), vec![3]);
    }

    #[test]
    fn random_ids_differ_and_are_never_zero() {
        let a = History::random_id();
        let b = History::random_id();
        assert_ne!(a, 0);
        assert_ne!(a, b);
    }
}
