//! The committed image's write-back: the newest contents of the pages (and the disk writes) of
//! small checkpoints that are journaled but not yet written into the image files.
//!
//! A checkpoint was written twice — its journal record, then each page in place — and a
//! 16-client KV load's checkpoints write mostly the same hot pages again and again (38.5 pages
//! each; 16 of them, 107 distinct pages). So a small checkpoint's pages wait here after its
//! journal record (which makes it durable) and are written in place once per journal ring
//! ([`crate::journal::SLOTS`] checkpoints): each page once, its newest version, consecutive
//! pages as one write (on the blocking thread when that is more than
//! [`crate::applier::INLINE_FLUSH`]). The ring
//! holds every checkpoint whose writes wait here, so a backup killed with writes waiting loses
//! nothing: recovery redoes the ring in order (`image::recover`). Measured: −82 % of the page
//! writes in place and −4 % of the backup's CPU per checkpoint; no throughput on the one-host
//! bench, where the write in place was after the acknowledgement (docs/BENCHMARKS.md, "Journal
//! only what changed; pages in place once per ring").
//!
//! While pages wait here the memory file is stale for them: decoding the next checkpoint's
//! deltas reads a page here first ([`WriteBack::page`]). Whatever reads the files directly
//! (an export) has the image flush first; a finalization recovers (redoes the ring) first.

use std::collections::HashMap;

use protocol::page::PAGE;

/// Pages and disk writes waiting to be written into the image files.
#[derive(Default)]
pub(crate) struct WriteBack {
    /// Guest frame number → index of its page in `pages`.
    index: HashMap<u64, usize>,
    /// The waiting pages' newest contents, 4 KiB each.
    pages: Vec<u8>,
    /// Disk writes (offset, bytes) in the order the checkpoints made them.
    disk: Vec<(u64, Vec<u8>)>,
}

/// What a flush writes: runs of consecutive pages, then disk writes in order.
pub(crate) struct Runs {
    /// (first guest frame number, contents of the run's pages).
    pub pages: Vec<(u64, Vec<u8>)>,
    /// Disk writes in order.
    pub disk: Vec<(u64, Vec<u8>)>,
}

impl WriteBack {
    /// Nothing waits.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty() && self.disk.is_empty()
    }

    /// Pages waiting.
    #[cfg(test)]
    pub fn pages(&self) -> usize {
        self.index.len()
    }

    /// Bytes a flush would write now.
    pub fn bytes(&self) -> usize {
        self.pages.len() + self.disk.iter().map(|d| d.1.len()).sum::<usize>()
    }

    /// The newest contents of page `gfn`, if it waits here.
    pub fn page(&self, gfn: u64) -> Option<&[u8]> {
        let i = *self.index.get(&gfn)?;
        self.pages.get(i * PAGE..(i + 1) * PAGE)
    }

    /// Adds a checkpoint's writes (`data`: 4 KiB per entry of `gfns`), newer than all waiting.
    pub fn add(&mut self, gfns: &[u64], data: &[u8], disk: Vec<(u64, Vec<u8>)>) {
        for (gfn, page) in gfns.iter().zip(data.chunks_exact(PAGE)) {
            let next = self.index.len();
            let i = *self.index.entry(*gfn).or_insert(next);
            if i == next {
                self.pages.extend_from_slice(page);
            } else {
                self.pages[i * PAGE..(i + 1) * PAGE].copy_from_slice(page);
            }
        }
        self.disk.extend(disk);
    }

    /// Everything waiting, pages sorted and coalesced into runs of consecutive frames. It
    /// stays here until [`clear`](Self::clear): a flush that fails leaves it waiting (and the
    /// deltas decoded against it right).
    pub fn runs(&self) -> Runs {
        let mut gfns: Vec<(u64, usize)> = self.index.iter().map(|(g, i)| (*g, *i)).collect();
        gfns.sort_unstable();
        let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut prev: Option<u64> = None;
        for (gfn, i) in gfns {
            let page = &self.pages[i * PAGE..(i + 1) * PAGE];
            match runs.last_mut() {
                Some((_, run)) if prev.is_some_and(|p| p + 1 == gfn) => run.extend_from_slice(page),
                _ => runs.push((gfn, page.to_vec())),
            }
            prev = Some(gfn);
        }
        Runs {
            pages: runs,
            disk: self.disk.clone(),
        }
    }

    /// Forgets everything waiting (written).
    pub fn clear(&mut self) {
        self.index.clear();
        self.pages.clear();
        self.disk.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Vec<u8> {
        vec![b; PAGE]
    }

    #[test]
    fn the_newest_version_of_each_page_is_written_once_in_runs() {
        let mut wb = WriteBack::default();
        assert!(wb.is_empty());
        wb.add(
            &[7, 3],
            &[page(1), page(2)].concat(),
            vec![(0, vec![1; 10])],
        );
        wb.add(&[3, 4, 9], &[page(3), page(4), page(5)].concat(), vec![]);
        wb.add(&[8], &page(6), vec![(5, vec![2; 10])]);
        assert_eq!(wb.pages(), 5);
        assert_eq!(wb.page(3), Some(&page(3)[..]));
        assert_eq!(wb.page(7), Some(&page(1)[..]));
        assert_eq!(wb.page(5), None);
        let runs = wb.runs();
        assert_eq!(wb.pages(), 5, "still waiting until cleared");
        wb.clear();
        let got: Vec<(u64, Vec<u8>)> = runs.pages;
        assert_eq!(
            got,
            vec![
                (3, [page(3), page(4)].concat()),
                (7, [page(1), page(6), page(5)].concat()),
            ]
        );
        // Disk writes stay in order (the second overlaps the first).
        assert_eq!(runs.disk, vec![(0, vec![1; 10]), (5, vec![2; 10])]);
        assert!(wb.is_empty() && wb.page(3).is_none());
        // Reused after a take.
        wb.add(&[1], &page(9), vec![]);
        assert_eq!(wb.runs().pages, vec![(1, page(9))]);
    }
}
