//! Output commit (Remus): while enabled, every frame the guest transmits is tagged with the
//! current epoch and held; frames of epoch N leave only when `release(N)` says the backup has
//! acknowledged checkpoint N. The buffer is bounded: when it is full the device stops taking
//! frames from the guest's transmit ring (the guest sees a full ring and waits), so memory never
//! grows without bound.

use std::collections::VecDeque;

/// Default bound of the held-frame buffer.
pub const DEFAULT_MAX_HELD: usize = 16 << 20;

/// Held guest output.
#[derive(Debug)]
pub struct OutputCommit {
    epoch: u64,
    held: VecDeque<(u64, Vec<u8>)>,
    bytes: usize,
    max_bytes: usize,
    /// Frames released so far.
    pub released: u64,
    /// Largest number of bytes held at once.
    pub peak_bytes: usize,
}

impl OutputCommit {
    /// Holds frames of `epoch` and later.
    pub fn new(epoch: u64, max_bytes: usize) -> Self {
        OutputCommit {
            epoch,
            held: VecDeque::new(),
            bytes: 0,
            max_bytes,
            released: 0,
            peak_bytes: 0,
        }
    }

    /// Epoch that frames transmitted now belong to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// True if a frame of `len` bytes fits.
    pub fn has_room(&self, len: usize) -> bool {
        self.bytes + len <= self.max_bytes || self.held.is_empty()
    }

    /// Holds a frame of the current epoch; true if it is the epoch's first (output now waits
    /// for a checkpoint that has not been taken yet).
    pub fn hold(&mut self, frame: Vec<u8>) -> bool {
        let first = self.held.back().is_none_or(|(e, _)| *e != self.epoch);
        self.bytes += frame.len();
        self.peak_bytes = self.peak_bytes.max(self.bytes);
        self.held.push_back((self.epoch, frame));
        first
    }

    /// Closes the current epoch (called while the VM is paused); returns it.
    pub fn advance(&mut self) -> u64 {
        let e = self.epoch;
        self.epoch += 1;
        e
    }

    /// Takes every frame of epochs up to `upto`, in order.
    pub fn release(&mut self, upto: u64) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while self.held.front().is_some_and(|(e, _)| *e <= upto) {
            if let Some((_, f)) = self.held.pop_front() {
                self.bytes -= f.len();
                out.push(f);
            }
        }
        self.released += out.len() as u64;
        out
    }

    /// True if frames of the current (not yet checkpointed) epoch are held.
    pub fn current_epoch_waiting(&self) -> bool {
        self.held.back().is_some_and(|(e, _)| *e == self.epoch)
    }

    /// Frames and bytes held.
    pub fn held(&self) -> (usize, usize) {
        (self.held.len(), self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_by_epoch_and_releases_in_order() {
        let mut c = OutputCommit::new(1, 100);
        assert!(!c.current_epoch_waiting());
        assert!(c.hold(vec![1; 10]), "first frame of epoch 1");
        assert!(c.current_epoch_waiting());
        assert_eq!(c.advance(), 1);
        assert!(!c.current_epoch_waiting(), "epoch 1 is closed");
        assert!(c.hold(vec![2; 10]), "first frame of epoch 2");
        assert!(!c.hold(vec![3; 10]));
        assert_eq!(c.release(0), Vec::<Vec<u8>>::new());
        assert_eq!(c.release(1), vec![vec![1; 10]]);
        assert_eq!(c.held(), (2, 20));
        assert_eq!(c.release(5), vec![vec![2; 10], vec![3; 10]]);
        assert!(c.has_room(100));
        assert!(c.hold(vec![0; 90]), "epoch 2 again has no frame held");
        assert!(!c.has_room(20));
    }
}
