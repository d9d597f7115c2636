//! The 8250 UART on COM1: vm-superio's emulation behind the port-I/O bus. Guest output goes
//! to whatever sink the configuration names (a file, stdout or nowhere).

use std::io::Write;

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
