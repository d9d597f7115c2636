//! Why a VM stopped, and the one place every part of the VMM reports it. The first reason
//! reported wins; the VMM process turns it into its exit code, so a supervisor can tell a
//! clean guest shutdown from a crash without parsing logs.

use std::fmt;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

/// The reason a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked for a reset through the i8042 (Linux `reboot=k`): its normal way to stop.
    GuestReset,
    /// A triple fault or other `KVM_EXIT_SHUTDOWN`.
    TripleFault,
    /// KVM could not run a vCPU (internal error, failed entry, unexpected exit).
    VcpuError(String),
    /// The VMM itself was stopped (signal or API) before the guest stopped.
    Stopped,
}

impl ExitReason {
    /// The process exit code for this reason. Distinct per reason; 1 and 2 are left to
    /// configuration and command-line errors.
    pub fn exit_code(&self) -> u8 {
        match self {
            ExitReason::GuestReset => 0,
            ExitReason::TripleFault => 3,
            ExitReason::VcpuError(_) => 4,
            ExitReason::Stopped => 5,
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::GuestReset => write!(f, "guest reset (i8042)"),
            ExitReason::TripleFault => write!(f, "triple fault (KVM_EXIT_SHUTDOWN)"),
            ExitReason::VcpuError(e) => write!(f, "vCPU error: {e}"),
            ExitReason::Stopped => write!(f, "stopped by the VMM"),
        }
    }
}

/// Shared "the VM must stop" latch: records the first reason and wakes the event loop.
#[derive(Clone, Debug)]
pub struct VmExit {
    reason: Arc<Mutex<Option<ExitReason>>>,
    event: Arc<EventFd>,
}

impl VmExit {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Arc::default(),
            // Blocking, so that a waiter can simply read it.
            event: Arc::new(EventFd::new(0)?),
        })
    }

    /// Records `reason` unless another reason came first, and wakes whoever waits on [`Self::event`].
    pub fn request(&self, reason: ExitReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        // A full eventfd counter still wakes the reader; nothing is lost by ignoring the error.
        let _ = self.event.write(1);
    }

    /// The recorded reason, if the VM must stop.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Readable once a reason was recorded; the event loop watches it.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_codes_are_distinct() {
        let exit = VmExit::new().unwrap();
        assert_eq!(exit.reason(), None);
        exit.request(ExitReason::TripleFault);
        exit.request(ExitReason::GuestReset);
        assert_eq!(exit.reason(), Some(ExitReason::TripleFault));
        assert_eq!(exit.event().read().unwrap(), 2);
        let codes: std::collections::HashSet<u8> = [
            ExitReason::GuestReset,
            ExitReason::TripleFault,
            ExitReason::VcpuError(String::new()),
            ExitReason::Stopped,
        ]
        .iter()
        .map(ExitReason::exit_code)
        .collect();
        assert_eq!(codes.len(), 4);
    }
}
