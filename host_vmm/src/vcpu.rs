//! The vCPU thread: runs `KVM_RUN` in a loop and dispatches port-I/O and MMIO exits to the
//! buses. Any exit that ends the guest is reported to the shared [`VmExit`] latch; the other
//! vCPUs are then kicked out of `KVM_RUN` with a signal and see the latch.

use std::sync::{Arc, Once, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::bus::Bus;
use crate::exit::{ExitReason, VmExit};

/// One vCPU and what it needs to handle its exits.
#[derive(Debug)]
pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub exit: VmExit,
    /// Set by the first vCPU to enter `KVM_RUN` (the "start to first KVM_RUN" timing).
    pub first_run: Arc<OnceLock<Instant>>,
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn ignore_kick(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler once per process; without a handler the signal would
/// kill the process, with it `KVM_RUN` returns `EINTR`.
fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = register_signal_handler(kick_signal(), ignore_kick));
    result
}

impl Vcpu {
    /// Starts the vCPU on its own thread.
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        install_kick_handler().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || self.run())
    }

    fn run(mut self) {
        let exit = self.exit.clone();
        if let Some(reason) = self.run_loop() {
            tracing::info!("vcpu{} stopped: {reason}", self.index);
            exit.request(reason);
        }
    }

    /// Runs until the guest stops (returns why) or the VM is asked to stop (returns `None`).
    fn run_loop(&mut self) -> Option<ExitReason> {
        loop {
            if self.exit.reason().is_some() {
                return None;
            }
            self.first_run.get_or_init(Instant::now);
            match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    if !self.io_bus.write(u64::from(port), data) {
                        tracing::trace!("unhandled port write {port:#x}");
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !self.io_bus.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !self.mmio_bus.write(addr, data) {
                        tracing::debug!("unhandled MMIO write {addr:#x}");
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.mmio_bus.read(addr, data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::Shutdown) => return Some(ExitReason::TripleFault),
                Ok(VcpuExit::SystemEvent(kind, _)) if kind == KVM_SYSTEM_EVENT_RESET => {
                    return Some(ExitReason::GuestReset)
                }
                Ok(VcpuExit::SystemEvent(kind, _)) if kind == KVM_SYSTEM_EVENT_SHUTDOWN => {
                    return Some(ExitReason::GuestReset)
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    return Some(ExitReason::VcpuError(format!(
                        "KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x}, cpu {cpu})"
                    )))
                }
                Ok(VcpuExit::InternalError) => {
                    return Some(ExitReason::VcpuError(
                        "KVM_EXIT_INTERNAL_ERROR (instruction emulation failed)".into(),
                    ))
                }
                Ok(other) => {
                    return Some(ExitReason::VcpuError(format!("unexpected exit {other:?}")))
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => return Some(ExitReason::VcpuError(format!("KVM_RUN failed: {e}"))),
            }
        }
    }
}

/// Stops vCPU threads once the VM's exit latch is set: kicks each until it has left
/// `KVM_RUN` (a kick sent just before the thread enters `KVM_RUN` would be lost, so it is
/// repeated) and joins it.
pub fn stop_all(threads: Vec<JoinHandle<()>>) {
    for thread in threads {
        while !thread.is_finished() {
            if let Err(e) = thread.kill(kick_signal()) {
                tracing::warn!("kicking a vCPU thread failed: {e}");
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if thread.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}
