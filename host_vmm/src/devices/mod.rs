//! Legacy and platform devices: what a Linux guest needs besides virtio.

pub mod boot_timer;
pub mod i8042;
pub mod serial;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line: an eventfd registered with KVM as an irqfd, so a write raises the
/// guest IRQ without a trip through the VMM.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl IrqLine {
    /// Another handle on the same line.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
