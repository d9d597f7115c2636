//! The i8042 keyboard controller, only for what a microVM needs: the guest's reset command
//! (`reboot=k` writes 0xFE to port 0x64) stops the VM with [`ExitReason::GuestReset`].

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;
use crate::exit::{ExitReason, VmExit};

/// Turns the controller's reset line into a VM exit request.
pub struct ResetLine(pub VmExit);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(ExitReason::GuestReset);
        Ok(())
    }
}

/// The i8042 as a bus device on ports 0x60..=0x64.
pub struct I8042(I8042Device<ResetLine>);

impl I8042 {
    pub fn new(exit: VmExit) -> Self {
        Self(I8042Device::new(ResetLine(exit)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            *byte = self.0.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            let Ok(()) = self.0.write(offset, *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_guest_reset() {
        let exit = VmExit::new().unwrap();
        let mut dev = I8042::new(exit.clone());
        dev.write(4, &[0xaa]);
        dev.write(0, &[0xfe]);
        assert_eq!(exit.reason(), None);
        dev.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestReset));
    }
}
