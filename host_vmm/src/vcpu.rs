//! The vCPU thread: runs `KVM_RUN` in a loop and dispatches port-I/O and MMIO exits to the
//! buses. Any exit that ends the guest is reported to the shared [`VmExit`] latch; the other
//! vCPUs are then kicked out of `KVM_RUN` with a signal and see the latch. [`VcpuControl`]
//! pauses and resumes them the same way: kicked out of `KVM_RUN`, each parks until resumed;
//! a parked vCPU saves its KVM state for a snapshot when asked, on its own thread (the only
//! thread whose seccomp filter allows its KVM ioctls).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::bus::Bus;
use crate::exit::{ExitReason, VmExit};
use crate::seccomp::{Filters, ThreadKind};
use crate::snapshot::kvm_state::VcpuState;

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
    pub control: VcpuControl,
    /// Installed on the thread before its first `KVM_RUN`.
    pub seccomp: Filters,
    /// The MSRs a snapshot saves (`KVM_GET_MSR_INDEX_LIST`).
    pub msr_indices: Arc<[u32]>,
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
    /// Starts the vCPU on its own thread, which its [`VcpuControl`] then holds.
    pub fn spawn(self) -> std::io::Result<()> {
        install_kick_handler().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        let control = self.control.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || self.run())?;
        control.threads().push(thread);
        Ok(())
    }

    fn run(mut self) {
        let exit = self.exit.clone();
        if let Err(e) = self.seccomp.apply(ThreadKind::Vcpu) {
            exit.request(ExitReason::VcpuError(format!("vcpu{}: {e}", self.index)));
            return;
        }
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
            if self.control.is_paused() {
                self.park();
                continue;
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

    /// Waits, outside `KVM_RUN`, until the VM is resumed or stopped. KVM is told the guest
    /// was paused (`KVM_KVMCLOCK_CTRL`) so that its watchdogs do not count the pause as a
    /// soft lockup; a guest without kvmclock refuses that, harmlessly.
    fn park(&mut self) {
        self.complete_pending_io();
        if let Err(e) = self.fd.kvmclock_ctrl() {
            tracing::debug!("vcpu{}: KVM_KVMCLOCK_CTRL: {e}", self.index);
        }
        let mut state = self.control.state();
        state.parked += 1;
        self.control.0.changed.notify_all();
        while state.paused && self.exit.reason().is_none() {
            if let Some(slot @ None) = state
                .saved
                .as_mut()
                .and_then(|saved| saved.get_mut(usize::from(self.index)))
            {
                *slot = Some(
                    VcpuState::save(&self.fd, &self.msr_indices)
                        .map_err(|e| format!("vcpu{}: {e}", self.index)),
                );
                self.control.0.changed.notify_all();
            }
            // The exit latch has no condition variable: look again now and then.
            state = self
                .control
                .0
                .changed
                .wait_timeout(state, Duration::from_millis(50))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        state.parked -= 1;
        self.control.0.changed.notify_all();
    }

    /// KVM finishes an I/O exit (the data of a port or MMIO read) only on the next `KVM_RUN`,
    /// and until then the vCPU's registers do not show it. One `KVM_RUN` with `immediate_exit`
    /// set completes it and returns before any guest instruction runs, so that what a
    /// snapshot saves is consistent.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => tracing::warn!("vcpu{}: completing pending I/O: {e}", self.index),
            Ok(exit) => tracing::warn!("vcpu{}: exit {exit:?} while parking", self.index),
        }
        self.fd.set_kvm_immediate_exit(0);
    }
}

/// Pauses and resumes a VM's vCPUs (Firecracker's `PATCH /vm`), and holds their threads.
#[derive(Debug, Clone, Default)]
pub struct VcpuControl(Arc<ControlShared>);

#[derive(Debug, Default)]
struct ControlShared {
    state: Mutex<RunState>,
    changed: Condvar,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

#[derive(Debug, Default)]
struct RunState {
    paused: bool,
    /// vCPU threads waiting in [`Vcpu::park`].
    parked: usize,
    /// A snapshot in progress: each parked vCPU fills its slot with its saved state.
    saved: Option<Vec<Option<Result<VcpuState, String>>>>,
}

/// Why the vCPUs could not be paused.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("the microVM has stopped")]
    Stopped,
    #[error("the vCPUs did not pause within {0:?}")]
    Timeout(Duration),
    #[error("the microVM is not paused")]
    NotPaused,
    #[error("the vCPUs did not save their state within {0:?}")]
    SaveTimeout(Duration),
    #[error("saving vCPU state: {0}")]
    Save(String),
}

/// How long a pause may take: a vCPU leaves `KVM_RUN` within microseconds of its kick.
const PAUSE_LIMIT: Duration = Duration::from_secs(2);

impl VcpuControl {
    fn state(&self) -> MutexGuard<'_, RunState> {
        self.0.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn threads(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.0
            .threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn is_paused(&self) -> bool {
        self.state().paused
    }

    /// Stops every vCPU outside `KVM_RUN`; returns once all are parked, so guest memory and
    /// vCPU state no longer change (devices on the event loop still take host-side input).
    pub fn pause(&self) -> Result<(), PauseError> {
        self.state().paused = true;
        let deadline = Instant::now() + PAUSE_LIMIT;
        loop {
            let threads = self.threads();
            if threads.iter().any(JoinHandle::is_finished) {
                drop(threads);
                self.state().paused = false;
                return Err(PauseError::Stopped);
            }
            if self.state().parked == threads.len() {
                return Ok(());
            }
            // A kick sent just before a thread enters `KVM_RUN` is lost: kick until parked.
            for thread in threads.iter() {
                if let Err(e) = thread.kill(kick_signal()) {
                    tracing::warn!("kicking a vCPU thread failed: {e}");
                }
            }
            drop(threads);
            if Instant::now() > deadline {
                self.resume();
                return Err(PauseError::Timeout(PAUSE_LIMIT));
            }
            let state = self.state();
            drop(
                self.0
                    .changed
                    .wait_timeout(state, Duration::from_millis(1))
                    .unwrap_or_else(PoisonError::into_inner),
            );
        }
    }

    /// Has every parked vCPU save its KVM state on its own thread; the VM must be paused.
    pub fn save_states(&self) -> Result<Vec<VcpuState>, PauseError> {
        let count = self.threads().len();
        let mut state = self.state();
        if !state.paused || state.parked != count {
            return Err(PauseError::NotPaused);
        }
        state.saved = Some((0..count).map(|_| None).collect());
        self.0.changed.notify_all();
        let deadline = Instant::now() + PAUSE_LIMIT;
        while !state
            .saved
            .as_ref()
            .is_some_and(|saved| saved.iter().all(Option::is_some))
        {
            if Instant::now() > deadline {
                state.saved = None;
                return Err(PauseError::SaveTimeout(PAUSE_LIMIT));
            }
            state = self
                .0
                .changed
                .wait_timeout(state, Duration::from_millis(10))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        state
            .saved
            .take()
            .into_iter()
            .flatten()
            .map(|saved| match saved {
                Some(result) => result.map_err(PauseError::Save),
                None => Err(PauseError::Save("a vCPU saved nothing".into())),
            })
            .collect()
    }

    /// Lets parked vCPUs run again (a no-op on a running VM, as in Firecracker).
    pub fn resume(&self) {
        self.state().paused = false;
        self.0.changed.notify_all();
    }

    /// Stops the vCPU threads once the VM's exit latch is set (see [`stop_all`]).
    pub fn stop_all(&self) {
        self.resume();
        stop_all(std::mem::take(&mut *self.threads()));
    }
}

/// Stops vCPU threads once the VM's exit latch is set: kicks each until it has left
/// `KVM_RUN` (a kick sent just before the thread enters `KVM_RUN` would be lost, so it is
/// repeated) and joins it.
fn stop_all(threads: Vec<JoinHandle<()>>) {
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
