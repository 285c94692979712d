//! The guest clock read without a VM exit (as a Linux guest reads kvmclock): the platform
//! device anchors the guest's monotonic clock to the TSC and publishes the anchor in a guest
//! page, so the guest computes the time from `rdtsc` instead of reading the platform device's
//! clock register (an exit of ~27 µs here, and the most frequent exit of the KV service: 0.26
//! per SET unprotected, 0.43 protected — docs/BENCHMARKS.md).
//!
//! The clock page at [`CLOCK_PAGE_ADDR`] (little-endian):
//!
//! ```text
//! 0   magic u32 "VCLK" (0 = no anchor: read the clock register)
//! 4   version u32 (1)
//! 8   mult u64       ns per TSC tick, 32.32 fixed point
//! 16  tsc_base u64   the guest's TSC at the anchor
//! 24  ns_base u64    guest time at the anchor, ns
//! ```
//!
//! guest ns = `ns_base + ((tsc - tsc_base) * mult) >> 32`. The device computes its own clock
//! (the register, the time saved in a snapshot) the same way, so the two never disagree. The
//! page is written only while the guest does not run: by the vCPU thread just before the
//! guest's first instruction in each VMM process (boot, restore, clone, promotion; after any
//! pause it starts in, so a paused restore's memory is still the snapshot's), anchoring anew to
//! this host's TSC at the guest time it restored — a page copied from another host is never
//! used. The write goes through the device bitmap, so the next checkpoint carries it. Without a
//! TSC frequency from KVM the page is cleared and the guest reads the register. The rate is
//! this host's: a restore does not set the checkpoint's TSC rate (`vcpu_state::restore`). The
//! guest checks each new anchor against the register once, before its first use.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

/// Guest physical address of the clock page (in the generation word's page, its own cache
/// line).
pub const CLOCK_PAGE_ADDR: u64 = crate::layout::GENID_ADDR + 0x40;

/// "VCLK".
pub const CLOCK_MAGIC: u32 = 0x4b4c_4356;

/// Layout version.
pub const CLOCK_VERSION: u32 = 1;

/// Bytes of the clock page.
pub const CLOCK_PAGE_LEN: usize = 32;

const MSR_IA32_TSC: u32 = 0x10;

/// The host's TSC.
pub fn host_tsc() -> u64 {
    // SAFETY: rdtsc has no preconditions and no side effects (user mode may execute it unless
    // CR4.TSD is set, which Linux does not do).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The guest's TSC rate and its offset from the host's, read from KVM: `None` where KVM does
/// not tell the rate. Under PVM the guest reads the host's counter (offset 0, which the read
/// finds: the MSR lies within the ioctl's span of host TSC); under VMX KVM offsets it.
pub fn probe(vcpu: &VcpuFd) -> Option<(u32, i64)> {
    let khz = vcpu.get_tsc_khz().ok().filter(|&k| k > 0)?;
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_TSC,
        ..Default::default()
    }])
    .ok()?;
    let before = host_tsc();
    let n = vcpu.get_msrs(&mut msrs).ok()?;
    let after = host_tsc();
    if n != 1 {
        return None;
    }
    let guest = msrs.as_slice()[0].data;
    let offset = match (before..=after).contains(&guest) {
        true => 0,
        false => guest.wrapping_sub(before.midpoint(after)) as i64,
    };
    Some((khz, offset))
}

/// The guest clock as a function of the TSC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TscClock {
    /// ns per tick, 32.32.
    pub mult: u64,
    /// Guest TSC minus host TSC.
    pub offset: i64,
    /// Guest TSC at the anchor.
    pub tsc_base: u64,
    /// Guest ns at the anchor.
    pub ns_base: u64,
}

impl TscClock {
    /// A clock reading `ns` now, for a TSC of `khz` kHz at `offset` from the host's.
    pub fn anchor(ns: u64, khz: u32, offset: i64) -> Option<TscClock> {
        let mult = ((1_000_000u128 << 32) / u128::from(khz.max(1))) as u64;
        (mult > 0).then(|| TscClock {
            mult,
            offset,
            tsc_base: host_tsc().wrapping_add_signed(offset),
            ns_base: ns,
        })
    }

    /// Guest ns at guest TSC `tsc` (the anchor's time for a TSC before it).
    pub fn at(&self, tsc: u64) -> u64 {
        let ticks = tsc.saturating_sub(self.tsc_base);
        let ns = (u128::from(ticks) * u128::from(self.mult)) >> 32;
        self.ns_base
            .saturating_add(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// Guest ns now.
    pub fn now(&self) -> u64 {
        self.at(host_tsc().wrapping_add_signed(self.offset))
    }

    /// The page the guest reads.
    pub fn page(&self) -> [u8; CLOCK_PAGE_LEN] {
        let mut p = [0u8; CLOCK_PAGE_LEN];
        p[0..4].copy_from_slice(&CLOCK_MAGIC.to_le_bytes());
        p[4..8].copy_from_slice(&CLOCK_VERSION.to_le_bytes());
        p[8..16].copy_from_slice(&self.mult.to_le_bytes());
        p[16..24].copy_from_slice(&self.tsc_base.to_le_bytes());
        p[24..32].copy_from_slice(&self.ns_base.to_le_bytes());
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_runs_at_the_tsc_rate_from_its_anchor() {
        let c = TscClock {
            mult: (1u64 << 32) / 2, // 2 GHz: half a ns per tick
            offset: 0,
            tsc_base: 1_000,
            ns_base: 5_000,
        };
        assert_eq!(c.at(1_000), 5_000);
        assert_eq!(c.at(3_000), 6_000);
        assert_eq!(c.at(10), 5_000, "a TSC before the anchor reads the anchor");
        assert_eq!(c.at(u64::MAX), 5_000 + (u64::MAX - 1_000) / 2);
    }

    #[test]
    fn an_anchor_matches_the_host_clock_and_encodes_its_page() {
        let khz = 2_596_134;
        let c = TscClock::anchor(7_000_000, khz, 0).unwrap();
        // 1 s of ticks is 1e9 ns, to well under a ppm.
        let s = c.at(c.tsc_base + u64::from(khz) * 1000);
        assert!((s - 7_000_000).abs_diff(1_000_000_000) < 10, "{s}");
        let p = c.page();
        assert_eq!(u32::from_le_bytes(p[0..4].try_into().unwrap()), CLOCK_MAGIC);
        assert_eq!(u64::from_le_bytes(p[8..16].try_into().unwrap()), c.mult);
        assert_eq!(
            u64::from_le_bytes(p[16..24].try_into().unwrap()),
            c.tsc_base
        );
        assert_eq!(u64::from_le_bytes(p[24..32].try_into().unwrap()), 7_000_000);
        assert!(c.now() >= 7_000_000);
    }
}
