//! The 8250 UART on COM1: vm-superio's emulation behind the port-I/O bus. Guest output goes
//! to whatever sink the configuration names (a file, stdout or nowhere).

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
use vm_superio::Serial;

use super::IrqLine;
use crate::bus::BusDevice;

/// Where the guest console goes.
pub type SerialOut = Box<dyn Write + Send>;

/// COM1 as a bus device.
pub struct SerialDevice(Serial<IrqLine, vm_superio::serial::NoEvents, SerialOut>);

impl std::fmt::Debug for SerialDevice {
    /// Opaque: vm-superio's UART is only `Debug` with a `Debug` sink, and the console sink is
    /// any writer.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    pub fn new(irq: IrqLine, out: SerialOut) -> Self {
        Self(Serial::new(irq, out))
    }

    /// The UART's registers and unread input, for a snapshot.
    pub fn state(&self) -> SerialSnapshot {
        let s = self.0.state();
        SerialSnapshot {
            registers: [
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

    /// The UART as a snapshot left it, writing to `out`; its pending interrupt is raised again.
    pub fn from_state(
        irq: IrqLine,
        out: SerialOut,
        state: &SerialSnapshot,
    ) -> Result<Self, String> {
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            state.registers;
        let state = SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: state.in_buffer.clone(),
        };
        Serial::from_state(&state, irq, vm_superio::serial::NoEvents, out)
            .map(Self)
            .map_err(|e| format!("serial: {e:?}"))
    }
}

/// A UART's state in a snapshot: vm-superio's registers in their declaration order (divisor
/// low and high, IER, IIR, LCR, LSR, MCR, MSR, scratch) and its unread input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    registers: [u8; 9],
    in_buffer: Vec<u8>,
}

impl SerialSnapshot {
    /// Whether the UART had an interrupt pending (IIR bit 0 clear).
    pub fn interrupt_pending(&self) -> bool {
        self.registers[3] & 1 == 0
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            *byte = self.0.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            if let Err(e) = self.0.write(offset, *byte) {
                tracing::warn!("serial write failed: {e:?}");
            }
            // Console lines should reach a log file as they are written, not at exit.
            if let Err(e) = self.0.writer_mut().flush() {
                tracing::warn!("serial flush failed: {e}");
            }
        }
    }
}
