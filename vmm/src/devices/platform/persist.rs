//! Platform device state: the guest clock (so guest time neither jumps by the downtime nor runs
//! backwards after a restore), the config string, the generation id and the last wait outcome.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::device::Platform;
use crate::events::{GuestEvents, WaitOutcome};
use crate::memory::GuestMem;
use crate::persist::{Persist, RestoreError};
use crate::vcpu::Control;

/// Saved platform device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformPersist {
    /// Guest clock at capture, ns.
    pub clock_ns: u64,
    /// Generation id.
    pub generation: u64,
    /// RAM size in bytes.
    pub mem_size: u64,
    /// The config string.
    pub config: Vec<u8>,
    /// Outcome of the last wait (0, 1, 2).
    pub last_wait: u8,
}

/// Host resources of a restored platform device.
pub struct PlatformArgs {
    /// Event counter of the new VM.
    pub events: Arc<GuestEvents>,
    /// Control block of the new VM.
    pub control: Arc<Control>,
    /// Guest memory of the new VM.
    pub mem: GuestMem,
    /// Generation id to report from now on (a clone gets a new one).
    pub generation: Option<u64>,
}

impl Persist for Platform {
    type State = PlatformPersist;
    type Args = PlatformArgs;

    fn save(&self) -> PlatformPersist {
        PlatformPersist {
            clock_ns: self.clock_ns(),
            generation: self.generation,
            mem_size: self.mem_size,
            config: self.config.clone(),
            last_wait: self.last_wait as u8,
        }
    }

    fn restore(a: PlatformArgs, st: &PlatformPersist) -> Result<Self, RestoreError> {
        let last_wait = match st.last_wait {
            0 => WaitOutcome::Timeout,
            1 => WaitOutcome::Event,
            2 => WaitOutcome::Interrupted,
            n => {
                return Err(RestoreError::new(
                    "platform",
                    format!("bad wait outcome {n}"),
                ))
            }
        };
        if st.config.len() > 4096 {
            return Err(RestoreError::new(
                "platform",
                "config string longer than 4 KiB",
            ));
        }
        Ok(Platform {
            seen_seq: a.events.seq(),
            events: a.events,
            control: a.control,
            mem: a.mem,
            config: st.config.clone(),
            generation: a.generation.unwrap_or(st.generation),
            mem_size: st.mem_size,
            clock_origin: Instant::now(),
            clock_base_ns: st.clock_ns,
            // (Anchored anew by the VM that restores it, to this host's TSC.)
            tsc: None,
            last_wait,
            // A new process: a new incarnation (deliberately not saved).
            incarnation: super::device::new_incarnation(),
            // (Host resource: set by the VM with its serial port's console.)
            console: None,
            bad_console: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::devices::platform::device::regs;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn read(p: &mut Platform, reg: u64) -> u64 {
        let mut b = [0u8; 8];
        p.read(reg, &mut b);
        u64::from_le_bytes(b)
    }

    /// A fresh device on 1 MiB of memory, and what a restore of it needs.
    fn fresh(config: &[u8], generation: u64) -> (Platform, PlatformArgs) {
        let events = Arc::new(GuestEvents::default());
        let control = Arc::new(Control::new(events.clone()));
        let mem: GuestMem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let p = Platform::new(
            events.clone(),
            control.clone(),
            mem.clone(),
            1 << 20,
            config.to_vec(),
            generation,
        );
        let args = PlatformArgs {
            events,
            control,
            mem,
            generation: None,
        };
        (p, args)
    }

    #[test]
    fn a_restore_keeps_generation_and_clock_but_changes_the_incarnation() {
        let (mut p, args) = fresh(b"ip=10.0.0.2/24", 7);
        let inc = read(&mut p, regs::INCARNATION);
        assert_ne!(inc, 0);
        assert_eq!(
            read(&mut p, regs::INCARNATION),
            inc,
            "stable within a process"
        );
        let saved = p.save();
        let mut q = Platform::restore(args, &saved).unwrap();
        assert_eq!(read(&mut q, regs::GENERATION), 7);
        assert!(read(&mut q, regs::CLOCK_NS) >= saved.clock_ns);
        assert_ne!(read(&mut q, regs::INCARNATION), inc);
    }

    fn page(mem: &GuestMem) -> [u8; crate::pvclock::CLOCK_PAGE_LEN] {
        let mut p = [0u8; crate::pvclock::CLOCK_PAGE_LEN];
        mem.read_slice(&mut p, GuestAddress(crate::pvclock::CLOCK_PAGE_ADDR))
            .unwrap();
        p
    }

    #[test]
    fn an_anchored_clock_runs_on_from_its_time_and_a_restore_anchors_it_anew() {
        use crate::pvclock::CLOCK_MAGIC;
        let (mut p, args) = fresh(b"", 1);
        let mem = args.mem.clone();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let khz = 2_000_000;
        p.anchor_clock(Some((khz, 0)));
        assert!(p.clock_anchored());
        let pg = page(&mem);
        assert_eq!(
            u32::from_le_bytes(pg[0..4].try_into().unwrap()),
            CLOCK_MAGIC
        );
        let ns_base = u64::from_le_bytes(pg[24..32].try_into().unwrap());
        assert!(
            ns_base >= 5_000_000,
            "anchored at the time it read: {ns_base}"
        );
        // The register and the page are one clock: what the guest computes from the page at
        // a TSC equals what the device computes.
        let c = p.tsc.unwrap();
        assert_eq!(c.page(), pg);
        let t0 = read(&mut p, regs::CLOCK_NS);
        assert!(t0 >= ns_base);
        // A restore in a new process anchors anew, at the saved time: never backwards.
        let saved = p.save();
        assert!(saved.clock_ns >= t0);
        mem.write_slice(&[0xAA; 32], GuestAddress(crate::pvclock::CLOCK_PAGE_ADDR))
            .unwrap();
        let mut q = Platform::restore(args, &saved).unwrap();
        assert!(!q.clock_anchored(), "not until the VM anchors it");
        q.anchor_clock(Some((khz, 0)));
        let pg2 = page(&mem);
        let base2 = u64::from_le_bytes(pg2[24..32].try_into().unwrap());
        assert!(base2 >= saved.clock_ns, "{base2} < {}", saved.clock_ns);
        assert!(read(&mut q, regs::CLOCK_NS) >= base2);
        assert_ne!(pg2, [0xAA; 32]);
        // Without a TSC rate the page is cleared (the guest reads the register) and the clock
        // still runs on from where it was.
        let before = read(&mut q, regs::CLOCK_NS);
        q.anchor_clock(None);
        assert_eq!(page(&mem), [0u8; 32]);
        assert!(!q.clock_anchored());
        assert!(read(&mut q, regs::CLOCK_NS) >= before);
    }
}
