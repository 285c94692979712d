//! Pre-copy inside an epoch (issue 12): the pages an epoch has dirtied so far are copied while
//! the guest runs, shortly before its pause, so that the pause copies only those dirtied since.
//!
//! Copying dirty pages is most of a busy epoch's pause: 1,000 pages are ~0.35-0.45 ms on this
//! host (memory bound), while stopping the vCPU, its state and the harvest take ~0.3 ms
//! together. [`Vm::precopy_epoch`] harvests while the guest runs (which write-protects the
//! pages again, `crate::dirty`), then copies them. The capture's pause harvests again and copies
//! what was written since — a page written after its early copy is in that harvest, so its
//! early copy is never the one sent — and after the resume [`Vm::merge_epoch_pre`] puts the two
//! together: the pause's copy where a page has both. The checkpoint is the same set of pages,
//! with the same contents, as without the early copy.
//!
//! The early copy is taken from replication's pending changes; a capture that fails gives them
//! back, a full capture lists them among its changes (its copy of all of RAM holds them).

use super::{lock, Vm};
use crate::dirty::{Consumer, Pending};
use crate::layout::PAGE_SIZE;
use crate::snapshot::SnapshotError;
use crate::vm::replicate::{CaptureKind, EpochCapture};

const PAGE: usize = PAGE_SIZE as usize;

/// Pages copied ahead of a pause: ascending page numbers and their contents.
#[derive(Debug, Default)]
pub(crate) struct EpochPre {
    pages: Vec<u64>,
    data: Vec<u8>,
}

impl Vm {
    /// Copies the pages dirtied since the last capture (or early copy) while the guest runs,
    /// for the next incremental capture to send (see the module docs). Returns how many.
    pub fn precopy_epoch(&self) -> Result<usize, SnapshotError> {
        let _one = lock(&self.captures);
        let (pages, data) = self.copy_dirty_running()?;
        if pages.is_empty() {
            return Ok(0);
        }
        let n = pages.len();
        let mut pre = lock(&self.epoch_pre);
        // A second early copy in one epoch: its pages are the newer copies.
        let older = std::mem::take(&mut *pre);
        *pre = merge(older, EpochPre { pages, data });
        Ok(n)
    }

    /// Puts a capture and the early copy of its epoch together (after the resume): the pages
    /// of both, the capture's copy where a page is in both. A full capture only lists the
    /// early pages among its changes (its pages are all of RAM).
    pub(crate) fn merge_epoch_pre(&self, c: &mut EpochCapture, kind: CaptureKind) {
        let pre = std::mem::take(&mut *lock(&self.epoch_pre));
        if pre.pages.is_empty() {
            return;
        }
        if kind == CaptureKind::Full {
            if let Some(ch) = &mut c.changes {
                add_pages(&mut ch.dirty, &pre.pages);
            }
            return;
        }
        let now = EpochPre {
            pages: std::mem::take(&mut c.pages),
            data: std::mem::take(&mut c.data),
        };
        let both = merge_refs(&pre, &now);
        c.pages = both.pages;
        c.data = both.data;
        // (The pause's buffer came from the capture pool: it goes back for the next pause.)
        self.recycle_capture(now.data);
    }

    /// A capture failed: the pages of the early copy are pending again.
    pub(crate) fn give_back_epoch_pre(&self) {
        let pre = std::mem::take(&mut *lock(&self.epoch_pre));
        if pre.pages.is_empty() {
            return;
        }
        let taken = Pending {
            dirty: crate::page_set::PageSet::from_pages(&pre.pages),
            ..Default::default()
        };
        self.give_back(Consumer::Replication, taken);
    }

    /// Drops an early copy, adding its pages to `dirty` (ascending page numbers): tracking
    /// restarts (a full sync's first pass), and what changed before is reported as changes.
    pub(crate) fn fold_epoch_pre(&self, dirty: &mut Vec<u64>) {
        let pre = std::mem::take(&mut *lock(&self.epoch_pre));
        add_pages(dirty, &pre.pages);
    }
}

/// `all ∪= more`, ascending.
fn add_pages(all: &mut Vec<u64>, more: &[u64]) {
    if more.is_empty() {
        return;
    }
    all.extend(more);
    all.sort_unstable();
    all.dedup();
}

/// The pages of `old` and `new`, ascending, `new`'s copy where both have a page.
fn merge(old: EpochPre, new: EpochPre) -> EpochPre {
    if old.pages.is_empty() {
        return new;
    }
    if new.pages.is_empty() {
        return old;
    }
    merge_refs(&old, &new)
}

/// [`merge`] into a new buffer.
fn merge_refs(old: &EpochPre, new: &EpochPre) -> EpochPre {
    let mut pages = Vec::with_capacity(old.pages.len() + new.pages.len());
    let mut data = Vec::with_capacity((old.pages.len() + new.pages.len()) * PAGE);
    let (mut i, mut j) = (0, 0);
    while i < old.pages.len() || j < new.pages.len() {
        let o = old.pages.get(i).copied().unwrap_or(u64::MAX);
        let n = new.pages.get(j).copied().unwrap_or(u64::MAX);
        let (page, from, at) = match o.cmp(&n) {
            std::cmp::Ordering::Less => {
                i += 1;
                (o, &old.data, i - 1)
            }
            std::cmp::Ordering::Equal => {
                i += 1;
                j += 1;
                (n, &new.data, j - 1)
            }
            std::cmp::Ordering::Greater => {
                j += 1;
                (n, &new.data, j - 1)
            }
        };
        pages.push(page);
        data.extend_from_slice(&from[at * PAGE..(at + 1) * PAGE]);
    }
    EpochPre { pages, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pre(pages: &[u64], tag: u8) -> EpochPre {
        EpochPre {
            pages: pages.to_vec(),
            data: pages
                .iter()
                .flat_map(|&p| std::iter::repeat_n(tag.wrapping_add(p as u8), PAGE))
                .collect(),
        }
    }

    #[test]
    fn merge_keeps_every_page_once_and_the_newer_copy() {
        let m = merge(pre(&[1, 3, 5, 9], 0), pre(&[2, 3, 9, 12], 100));
        assert_eq!(m.pages, vec![1, 2, 3, 5, 9, 12]);
        let first = |k: usize| m.data[k * PAGE];
        assert_eq!(first(0), 1); // old copy of page 1
        assert_eq!(first(1), 102); // new
        assert_eq!(first(2), 103); // both: the new copy
        assert_eq!(first(3), 5);
        assert_eq!(first(4), 109);
        assert_eq!(first(5), 112);
        assert_eq!(m.data.len(), 6 * PAGE);
        assert_eq!(merge(pre(&[], 0), pre(&[4], 1)).pages, vec![4]);
        assert_eq!(merge(pre(&[4], 1), pre(&[], 0)).pages, vec![4]);
    }
}
