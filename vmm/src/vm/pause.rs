//! Pausing a VM: the vCPU parked and the receive thread quiesced (nothing writes guest memory
//! until the resume), and the real-time pause path of short captures (`crate::rt`,
//! `--rt-pause`).

use super::{lock, Vm};
use crate::vcpu::VmExit;

impl Vm {
    /// Pauses the vCPU and quiesces device threads. On return nothing writes guest memory.
    pub fn pause(&self) -> std::result::Result<(), VmExit> {
        self.control.pause()?;
        if let (Some(rx), Some(n)) = (lock(&self.rx).as_ref(), &self.devices.net) {
            rx.quiesce(n);
        }
        Ok(())
    }

    /// Ends one pause; the VM runs again once every pause has been resumed.
    pub fn resume(&self) {
        let rx = lock(&self.rx);
        if self.control.resume() {
            if let Some(rx) = rx.as_ref() {
                rx.resume();
            }
        }
    }

    /// [`pause`](Self::pause) for a short capture by this thread, at real-time priority where
    /// the VM's owner asked for it ([`Vm::set_rt_pause`]); end it with `resume_boosted`.
    pub(crate) fn pause_boosted(&self) -> std::result::Result<crate::rt::Boosted, VmExit> {
        let b = self.control.pause_boosted()?;
        if let (Some(rx), Some(n)) = (lock(&self.rx).as_ref(), &self.devices.net) {
            rx.quiesce(n);
        }
        Ok(b)
    }

    /// Ends a [`pause_boosted`](Self::pause_boosted).
    /// Returns what is still boosted (this thread): lower it with
    /// [`lower_boosted`](Self::lower_boosted) once the pause's end is taken.
    pub(crate) fn resume_boosted(&self, b: crate::rt::Boosted) -> crate::rt::Boosted {
        let rx = lock(&self.rx);
        let (runs, mine) = self.control.resume_boosted(b);
        if runs {
            if let Some(rx) = rx.as_ref() {
                rx.resume();
            }
        }
        mine
    }

    /// Lowers this thread after a [`resume_boosted`](Self::resume_boosted).
    pub(crate) fn lower_boosted(&self, b: crate::rt::Boosted) {
        self.control.lower_boosted(b);
    }

    /// When the pause path of incremental captures runs at real-time priority (`crate::rt`):
    /// from the pause request to the resume, the vCPU thread and the capturing thread are
    /// `SCHED_FIFO`, so a pause does not wait for a busy neighbour's time slice — for every
    /// pause (`On`), none (`Off`, the default of a bare VM), or while pauses are seen waiting
    /// for the scheduler (`Auto`, `vmatrix primary`'s default).
    pub fn set_rt_pause(&self, mode: crate::rt::RtMode) {
        self.control.boost.set_mode(mode);
    }

    /// Whether pauses may run at real-time priority (a mode other than `Off`, and the host
    /// allowed it).
    pub fn rt_pause(&self) -> bool {
        self.control.boost.enabled()
    }

    /// The `--rt-pause` mode asked for.
    pub fn rt_mode(&self) -> crate::rt::RtMode {
        self.control.boost.mode()
    }

    /// Whether a pause starting now would run at real-time priority.
    pub fn rt_boosting(&self) -> bool {
        self.control.boost.boosting()
    }

    /// (pauses that ran at real-time priority, times `Auto` turned the boost on).
    pub fn rt_counts(&self) -> (u64, u64) {
        self.control.boost.counts()
    }
}
