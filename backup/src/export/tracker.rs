//! Where the writes into the committed image are recorded while an export runs (see the
//! parent module): pages and 4 KiB disk blocks, recorded by [`crate::replica::Replica`] after
//! each write lands. Each export has its own generation: a thread of an abandoned export can
//! never take (or see) what a later one needs.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use crate::BackupError;

/// Unit of the disk blocks recorded.
pub(crate) const BLOCK: u64 = 4096;

/// Pages and disk blocks written into the committed image since an export started.
#[derive(Debug, Clone, Default)]
pub struct Tracker(Arc<Mutex<Track>>);

#[derive(Debug, Default)]
struct Track {
    /// The export recording now (0: none).
    gen: u64,
    /// The last generation given out.
    last: u64,
    replaced: bool,
    pages: BTreeSet<u64>,
    blocks: BTreeSet<u64>,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Track> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts recording for a new export: its generation.
    pub(crate) fn start(&self) -> u64 {
        let mut t = self.lock();
        let gen = t.last + 1;
        *t = Track {
            gen,
            last: gen,
            ..Track::default()
        };
        gen
    }

    /// Stops recording for export `gen` (nothing if another one records now).
    pub(crate) fn stop(&self, gen: u64) {
        let mut t = self.lock();
        if t.gen == gen {
            let last = t.last;
            *t = Track {
                last,
                ..Track::default()
            };
        }
    }

    /// Whether an export records writes now.
    pub(crate) fn active(&self) -> bool {
        self.lock().gen != 0
    }

    /// Pages and disk ranges `(offset, len)` just written into the committed image.
    pub(crate) fn record(&self, gfns: &[u64], disk: &[(u64, u64)]) {
        let mut t = self.lock();
        if t.gen == 0 {
            return;
        }
        t.pages.extend(gfns.iter().copied());
        for (off, len) in disk.iter().filter(|(_, l)| *l > 0) {
            t.blocks.extend(off / BLOCK..=(off + len - 1) / BLOCK);
        }
    }

    /// The committed image was replaced (a full sync was promoted).
    pub(crate) fn replaced(&self) {
        let mut t = self.lock();
        if t.gen != 0 {
            t.replaced = true;
        }
    }

    /// Takes what was recorded for export `gen` (an error if the image was replaced, or if
    /// `gen` no longer records).
    pub(crate) fn take(&self, gen: u64) -> Result<(Vec<u64>, Vec<u64>), BackupError> {
        let mut t = self.lock();
        if t.gen != gen {
            return Err(BackupError::Export("the export was abandoned".into()));
        }
        if t.replaced {
            return Err(BackupError::Export(
                "a full sync replaced the image during the export".into(),
            ));
        }
        let pages = std::mem::take(&mut t.pages).into_iter().collect();
        let blocks = std::mem::take(&mut t.blocks).into_iter().collect();
        Ok((pages, blocks))
    }

    /// Pages and blocks recorded for export `gen` and not taken yet.
    pub(crate) fn pending(&self, gen: u64) -> usize {
        let t = self.lock();
        match t.gen == gen {
            true => t.pages.len() + t.blocks.len(),
            false => 0,
        }
    }
}
