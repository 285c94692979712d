//! Capture and restore of everything KVM exposes about a vCPU.
//!
//! Captured only while the vCPU is parked (see `vcpu.rs`): `KVM_RUN` last returned `EINTR`,
//! which completed any MMIO or port-I/O access in flight, so no exit is half done.
//!
//! Restore order (measured to work on this host, ARCHITECTURE.md): MP state, regs, sregs,
//! XSAVE, XCRs, debug registers, MSRs, vCPU events (the TSC rate is saved but not restored). `MSR_KVM_POLL_CONTROL` is not
//! captured: KVM refuses to set it without an in-kernel irqchip. The guest's time comes from the
//! platform device's clock (saved with the device), which the guest reads from its clock page
//! anchored anew to this host's TSC in every process (`crate::pvclock`).

use kvm_bindings::{
    kvm_debugregs, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// MSR that KVM refuses to restore without an irqchip.
const MSR_KVM_POLL_CONTROL: u32 = 0x4b56_4d05;

/// The saved state of one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state (legacy 4 KiB XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Multiprocessing state.
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// Model-specific registers from KVM's index list.
    pub msrs: Vec<kvm_msr_entry>,
    /// TSC frequency, if KVM reports it.
    pub tsc_khz: Option<u32>,
}

impl Clone for VcpuState {
    fn clone(&self) -> Self {
        VcpuState {
            regs: self.regs,
            sregs: self.sregs,
            // kvm_xsave is plain data but not `Clone` (it ends in a flexible array member).
            xsave: kvm_xsave {
                region: self.xsave.region,
                ..Default::default()
            },
            xcrs: self.xcrs,
            debugregs: self.debugregs,
            mp_state: self.mp_state,
            events: self.events,
            msrs: self.msrs.clone(),
            tsc_khz: self.tsc_khz,
        }
    }
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("rsp", &format_args!("{:#x}", self.regs.rsp))
            .field("msrs", &self.msrs.len())
            .field("tsc_khz", &self.tsc_khz)
            .finish()
    }
}

/// The MSR indices to save: KVM's list without the ones that cannot be restored.
pub fn msr_indices(kvm: &Kvm) -> Result<Vec<u32>> {
    let list = kvm
        .get_msr_index_list()
        .map_err(Error::kvm("get_msr_index_list"))?;
    Ok(list
        .as_slice()
        .iter()
        .copied()
        .filter(|&i| i != MSR_KVM_POLL_CONTROL)
        .collect())
}

/// Checks that the host's XSAVE state fits the legacy 4 KiB area we save.
pub fn check_xsave_size(kvm: &Kvm) -> Result<()> {
    let size = kvm.check_extension_int(kvm_ioctls::Cap::Xsave2);
    if size > 4096 {
        return Err(Error::Host(format!(
            "this host's XSAVE state is {size} bytes (AMX?); vCPU snapshots support 4096"
        )));
    }
    Ok(())
}

/// Reads the whole state of a parked vCPU; `synced`: its registers, special registers and
/// events are current in its run page (`KVM_CAP_SYNC_REGS`), read there instead of by ioctls.
/// `tsc_khz`: the vCPU's TSC frequency, read once (it is set only before the vCPU first runs).
pub fn capture(
    vcpu: &VcpuFd,
    msr_indices: &[u32],
    synced: bool,
    tsc_khz: &std::sync::OnceLock<Option<u32>>,
) -> Result<VcpuState> {
    let entries: Vec<kvm_msr_entry> = msr_indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs =
        Msrs::from_entries(&entries).map_err(|e| Error::Host(format!("MSR list: {e:?}")))?;
    let n = vcpu.get_msrs(&mut msrs).map_err(Error::kvm("get_msrs"))?;
    let msrs = msrs.as_slice()[..n].to_vec();
    let by_ioctl = || -> Result<(kvm_regs, kvm_sregs, kvm_vcpu_events)> {
        Ok((
            vcpu.get_regs().map_err(Error::kvm("get_regs"))?,
            vcpu.get_sregs().map_err(Error::kvm("get_sregs"))?,
            vcpu.get_vcpu_events()
                .map_err(Error::kvm("get_vcpu_events"))?,
        ))
    };
    let (regs, sregs, events) = match synced {
        true => {
            let s = vcpu.sync_regs();
            let got = (s.regs, s.sregs, s.events);
            // Debug builds (every test) check the run page against the ioctls.
            if cfg!(debug_assertions) {
                let bytes = |x: &(kvm_regs, kvm_sregs, kvm_vcpu_events)| {
                    postcard::to_stdvec(x).unwrap_or_default()
                };
                if bytes(&got) != bytes(&by_ioctl()?) {
                    return Err(Error::Host(
                        "the run page's registers differ from KVM's (KVM_CAP_SYNC_REGS)".into(),
                    ));
                }
            }
            got
        }
        false => by_ioctl()?,
    };
    Ok(VcpuState {
        regs,
        sregs,
        xsave: vcpu.get_xsave().map_err(Error::kvm("get_xsave"))?,
        xcrs: vcpu.get_xcrs().map_err(Error::kvm("get_xcrs"))?,
        debugregs: vcpu
            .get_debug_regs()
            .map_err(Error::kvm("get_debug_regs"))?,
        mp_state: vcpu.get_mp_state().map_err(Error::kvm("get_mp_state"))?,
        events,
        msrs,
        tsc_khz: *tsc_khz.get_or_init(|| vcpu.get_tsc_khz().ok()),
    })
}

/// Sets MSRs in one batch. KVM stops at the first MSR it refuses; such an MSR is accepted only
/// if the vCPU already holds the saved value (KVM refuses some paravirtual MSRs without the
/// matching feature enabled, at their reset value), and the batch goes on after it.
fn set_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<()> {
    let mut rest = entries;
    while !rest.is_empty() {
        let msrs = Msrs::from_entries(rest).map_err(|e| Error::Host(format!("MSR list: {e:?}")))?;
        let n = vcpu.set_msrs(&msrs).map_err(Error::kvm("set_msrs"))?;
        if n == rest.len() {
            break;
        }
        let refused = rest[n];
        let mut probe = Msrs::from_entries(&[kvm_msr_entry {
            index: refused.index,
            ..Default::default()
        }])
        .map_err(|e| Error::Host(format!("MSR list: {e:?}")))?;
        let got = vcpu.get_msrs(&mut probe).map_err(Error::kvm("get_msrs"))?;
        let current = probe.as_slice().first().map(|m| m.data);
        if got != 1 || current != Some(refused.data) {
            return Err(Error::Host(format!(
                "KVM refused MSR {:#x} = {:#x} (vCPU holds {current:x?})",
                refused.index, refused.data
            )));
        }
        tracing::debug!(
            "MSR {:#x} refused but already {:#x}",
            refused.index,
            refused.data
        );
        rest = &rest[n + 1..];
    }
    Ok(())
}

/// Writes `s` into a freshly created vCPU.
pub fn restore(vcpu: &VcpuFd, s: &VcpuState) -> Result<()> {
    // The TSC rate is not restored: the guest's TSC runs at this host's rate, and its clock
    // page is anchored anew to it (`crate::pvclock`), as kvmclock is after a migration. (PVM
    // cannot scale the TSC, yet accepts `KVM_SET_TSC_KHZ` and then reports the rate it was
    // given: restoring it made the clock page run at the old host's rate — review finding.)
    vcpu.set_mp_state(s.mp_state)
        .map_err(Error::kvm("set_mp_state"))?;
    vcpu.set_regs(&s.regs).map_err(Error::kvm("set_regs"))?;
    vcpu.set_sregs(&s.sregs).map_err(Error::kvm("set_sregs"))?;
    // SAFETY: `check_xsave_size` (called when the VM is built) guarantees the host's XSAVE
    // state fits the 4 KiB `kvm_xsave` struct, so KVM reads only within it.
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(Error::kvm("set_xsave"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(Error::kvm("set_xcrs"))?;
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(Error::kvm("set_debug_regs"))?;
    set_msrs(vcpu, &s.msrs)?;
    vcpu.set_vcpu_events(&s.events)
        .map_err(Error::kvm("set_vcpu_events"))?;
    Ok(())
}
