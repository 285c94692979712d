//! Serial console state: the 16550A registers and its receive FIFO.

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;

use super::device::{ConsoleOut, NoIrq, Serial};
use crate::persist::{Persist, RestoreError};

/// Saved UART registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialPersist {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub regs: [u8; 9],
    /// Bytes waiting in the receive FIFO.
    pub in_buffer: Vec<u8>,
}

impl Persist for Serial {
    type State = SerialPersist;
    type Args = ConsoleOut;

    fn save(&self) -> SerialPersist {
        let s = self.uart.state();
        SerialPersist {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    fn restore(out: ConsoleOut, st: &SerialPersist) -> Result<Self, RestoreError> {
        let r = st.regs;
        let state = SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: st.in_buffer.clone(),
        };
        let uart = vm_superio::Serial::from_state(&state, NoIrq, vm_superio::serial::NoEvents, out)
            .map_err(|e| RestoreError::new("serial", format!("{e:?}")))?;
        Ok(Serial { uart })
    }
}
