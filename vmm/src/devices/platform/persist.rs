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
            last_wait,
        })
    }
}
