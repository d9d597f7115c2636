//! SIGTERM and SIGINT as events on the VMM's event loop (a signalfd), so that a supervisor's
//! stop request ends the VM through the normal exit path: vCPUs stopped, sockets unlinked.
//!
//! The first SIGTERM asks the guest to shut down (Ctrl-Alt-Del through the i8042) when its
//! keyboard driver listens, resuming a paused VM so that it can; otherwise, and on a second
//! SIGTERM or any SIGINT, the VM stops at once with [`ExitReason::Stopped`].

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use crate::devices::i8042::CtrlAltDel;
use crate::exit::{ExitReason, VmExit};
use crate::vcpu::VcpuControl;

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write the set we own; the signal numbers are valid.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Blocks SIGTERM/SIGINT in the calling thread and every thread it starts afterwards; call
/// it first thing in `main`, then read them through [`TermSignals`].
pub fn block_termination_signals() -> io::Result<()> {
    let set = termination_set();
    // SAFETY: `set` is a valid, initialised signal set; the old mask is not requested.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// The event-loop subscriber for SIGTERM/SIGINT.
#[derive(Debug)]
pub struct TermSignals {
    fd: OwnedFd,
    exit: VmExit,
    ctrl_alt_del: CtrlAltDel,
    vcpus: VcpuControl,
    asked_guest: bool,
}

impl TermSignals {
    pub fn new(exit: VmExit, ctrl_alt_del: CtrlAltDel, vcpus: VcpuControl) -> io::Result<Self> {
        let set = termination_set();
        // SAFETY: a new signalfd (-1) for a valid set; the result is checked before use.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            fd,
            exit,
            ctrl_alt_del,
            vcpus,
            asked_guest: false,
        })
    }
}

impl MutEventSubscriber for TermSignals {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            tracing::error!("cannot watch termination signals: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        // SAFETY: reads at most `info.len()` bytes into a buffer we own.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
        if usize::try_from(n).ok() != Some(info.len()) {
            return;
        }
        // `ssi_signo`, the first field.
        let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
        let sigterm = i32::try_from(signo) == Ok(libc::SIGTERM);
        if sigterm && !self.asked_guest && self.ctrl_alt_del.press() {
            self.asked_guest = true;
            if self.vcpus.is_paused() {
                // A paused guest cannot answer: let it run to shut down.
                self.vcpus.resume();
                tracing::info!("SIGTERM: resumed the paused VM");
            }
            tracing::info!("SIGTERM: asked the guest to shut down (Ctrl-Alt-Del)");
        } else {
            tracing::info!("signal {signo}: stopping the VM");
            self.exit.request(ExitReason::Stopped);
        }
    }
}

/// Whether SIGTERM or SIGINT is pending (blocked and not yet read), for the wait before the
/// VM exists and no event loop runs.
pub fn termination_pending() -> bool {
    // SAFETY: sigpending/sigismember only write/read the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut set) == 0
            && (libc::sigismember(&set, libc::SIGTERM) == 1
                || libc::sigismember(&set, libc::SIGINT) == 1)
    }
}
