//! Turns an epoch capture into a protocol checkpoint, encoding each page against the version
//! the backup holds (kept here as a shadow copy of every page sent). The shadow is also the
//! source of a quick resync: it holds every page as of its last capture.

use std::collections::HashMap;

use protocol::message::Kind;
use protocol::page::{encode, EncodeOptions, PAGE};
use protocol::Checkpoint;
use vmm::snapshot::format::FORMAT_VERSION;
use vmm::{DiskCapture, EpochCapture};

/// Disk chunk size of an initial sync; all-zero chunks are not sent (the replica disk starts
/// zeroed).
const SYNC_DISK_CHUNK: usize = 64 << 10;

/// Last version of every page the backup has been sent.
#[derive(Default)]
pub struct Shadow {
    pages: HashMap<u64, Vec<u8>>,
    opts: EncodeOptions,
}

impl Shadow {
    /// A shadow using `opts` for incremental checkpoints.
    pub fn new(opts: EncodeOptions) -> Self {
        Shadow {
            pages: HashMap::new(),
            opts,
        }
    }

    /// `new` is what the backup holds of page `gfn` now (copied over the old version: no
    /// allocation for a page sent before).
    fn remember(&mut self, gfn: u64, new: &[u8]) {
        match self.pages.get_mut(&gfn) {
            Some(p) => p.copy_from_slice(new),
            None => {
                self.pages.insert(gfn, new.to_vec());
            }
        }
    }

    /// A slice of pre-copy round 0 (checkpoint `seq`): the non-zero pages it copied, for a side
    /// image that starts zeroed. The first slice forgets every page (the shadow describes the
    /// side image from then on; a full sync abandoned half way makes the primary forget its
    /// record of changes, see `Policy`'s drop).
    pub fn precopy_slice(&mut self, seq: u64, first: bool, cap: &EpochCapture) -> Checkpoint {
        if first {
            self.pages.clear();
        }
        let zero = vec![0u8; PAGE];
        let mut pages = Vec::with_capacity(cap.pages.len());
        for (i, &gfn) in cap.pages.iter().enumerate() {
            let new = &cap.data[i * PAGE..(i + 1) * PAGE];
            pages.push((gfn, encode(new, Some(&zero), self.opts)));
            self.remember(gfn, new);
        }
        Checkpoint {
            epoch: seq,
            kind: Kind::PreCopy,
            mem_size: cap.mem_size,
            pages,
            disk: disk_part(&cap.disk, Kind::PreCopy),
            state: None,
        }
    }

    /// Builds checkpoint `epoch` from `cap`; a full capture becomes the initial sync, a pre-copy
    /// pass a `PreCopy` round (the shadow is cleared by a sync; see [`clear`](Self::clear)).
    pub fn checkpoint(&mut self, epoch: u64, kind: Kind, cap: &EpochCapture) -> Checkpoint {
        let zero = vec![0u8; PAGE];
        let mut pages = Vec::with_capacity(cap.pages.len());
        if kind == Kind::Sync {
            self.pages.clear();
        }
        for (i, &gfn) in cap.pages.iter().enumerate() {
            let new = &cap.data[i * PAGE..(i + 1) * PAGE];
            let opts = match kind {
                Kind::Sync | Kind::Resync { .. } => EncodeOptions {
                    xor: false,
                    lz4: false,
                },
                Kind::Incremental | Kind::PreCopy => self.opts,
            };
            let old = self.pages.get(&gfn).map_or(&zero[..], |p| &p[..]);
            // Reported dirty but unchanged (a hot page, see vmm::dirty_log): the backup has it.
            if kind != Kind::Sync && old == new {
                continue;
            }
            pages.push((gfn, encode(new, Some(old), opts)));
            self.remember(gfn, new);
        }
        Checkpoint {
            epoch,
            kind,
            mem_size: cap.mem_size,
            pages,
            disk: disk_part(&cap.disk, kind),
            // A pre-copy round has no state: the image is not consistent until the final pause.
            state: (kind != Kind::PreCopy).then(|| (FORMAT_VERSION, cap.state.clone())),
        }
    }

    /// From a full capture (taken to sync a joining backup), the incremental checkpoint
    /// `epoch` for the backups that hold the previous state: its dirty pages and disk writes,
    /// encoded against the shadow, which is updated as usual.
    pub fn incremental_from_full(&mut self, epoch: u64, cap: &EpochCapture) -> Checkpoint {
        let Some(ch) = &cap.changes else {
            return self.checkpoint(epoch, Kind::Incremental, cap);
        };
        let mut data = Vec::with_capacity(ch.dirty.len() * PAGE);
        for gfn in &ch.dirty {
            match cap.pages.binary_search(gfn) {
                Ok(i) => data.extend_from_slice(&cap.data[i * PAGE..(i + 1) * PAGE]),
                // Not in the full capture: the page is all zero now.
                Err(_) => data.resize(data.len() + PAGE, 0),
            }
        }
        let inc = EpochCapture {
            epoch: cap.epoch,
            pause: cap.pause,
            pages: ch.dirty.clone(),
            data,
            disk: ch.disk.clone(),
            state: cap.state.clone(),
            mem_size: cap.mem_size,
            changes: None,
            extra_disk: Vec::new(),
        };
        self.checkpoint(epoch, Kind::Incremental, &inc)
    }

    /// The initial sync of a backup joining a running session, numbered `epoch` in its own
    /// session: every page of the full capture, raw. The shadow is left alone (it already
    /// describes these pages once [`incremental_from_full`](Self::incremental_from_full) of
    /// the same capture has run).
    pub fn sync_for_joining(&self, epoch: u64, cap: &EpochCapture) -> Checkpoint {
        let zero = vec![0u8; PAGE];
        let raw = EncodeOptions {
            xor: false,
            lz4: false,
        };
        let pages = cap
            .pages
            .iter()
            .enumerate()
            .map(|(i, &gfn)| {
                let new = &cap.data[i * PAGE..(i + 1) * PAGE];
                (gfn, encode(new, Some(&zero), raw))
            })
            .collect();
        Checkpoint {
            epoch,
            kind: Kind::Sync,
            mem_size: cap.mem_size,
            pages,
            disk: disk_part(&cap.disk, Kind::Sync),
            state: Some((FORMAT_VERSION, cap.state.clone())),
        }
    }

    /// The quick resync `seq` of a backup committed at `from`: the pages `gfns` (every page
    /// changed after `from`, see [`crate::history`]) as the shadow holds them — which, once the
    /// checkpoint of the same capture was built, is their content at this capture — raw; the
    /// disk ranges read in the pause (`cap.extra_disk`) followed by the epoch's own disk part
    /// (re-applying writes already in those ranges is harmless: the last writer is the same);
    /// and the state.
    pub fn resync(&self, seq: u64, from: u64, gfns: &[u64], cap: &EpochCapture) -> Checkpoint {
        let zero = vec![0u8; PAGE];
        let raw = EncodeOptions {
            xor: false,
            lz4: false,
        };
        let pages = gfns
            .iter()
            .map(|gfn| {
                let cur = self.pages.get(gfn).map_or(&zero[..], |p| &p[..]);
                (*gfn, encode(cur, Some(&zero), raw))
            })
            .collect();
        // When the capture carries the whole disk (its write log overflowed), the ranges read
        // for the resync are in it already: send the disk once.
        let mut disk = match cap.disk {
            DiskCapture::Full(_) => Vec::new(),
            _ => cap.extra_disk.clone(),
        };
        disk.extend(disk_part(&cap.disk, Kind::Incremental));
        Checkpoint {
            epoch: seq,
            kind: Kind::Resync { from },
            mem_size: cap.mem_size,
            pages,
            disk,
            state: Some((FORMAT_VERSION, cap.state.clone())),
        }
    }
}

/// The disk part of a checkpoint: writes as they are; a whole disk as its chunks — only the
/// non-zero ones for a checkpoint that starts a new (zeroed) image, all of them for one applied
/// to an existing image (after the write log overflowed), or blocks the guest zeroed would stay
/// stale on the backup.
fn disk_part(disk: &DiskCapture, kind: Kind) -> Vec<(u64, Vec<u8>)> {
    let fresh = matches!(kind, Kind::Sync | Kind::PreCopy);
    match disk {
        DiskCapture::None => Vec::new(),
        DiskCapture::Writes(w) => w.clone(),
        DiskCapture::Full(bytes) => bytes
            .chunks(SYNC_DISK_CHUNK)
            .enumerate()
            .filter(|(_, c)| !fresh || c.iter().any(|&b| b != 0))
            .map(|(i, c)| ((i * SYNC_DISK_CHUNK) as u64, c.to_vec()))
            .collect(),
    }
}
