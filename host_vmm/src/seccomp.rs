//! Per-thread seccomp filters, installed the way Firecracker installs them: each kind of
//! thread (the VMM's event loop, the API server, the vCPUs) gets an allowlist of the system
//! calls it makes, before it handles anything the guest or a client sends. Anything else
//! raises SIGSYS; the handler names the system call on stderr and ends the process with
//! [`BAD_SYSCALL_EXIT`], since a VMM making a call it never makes is a VMM under attack.
//!
//! The filters are seccompiler's JSON (`resources/seccomp/x86_64.json`, compiled in);
//! `--seccomp-filter FILE` replaces them with the same format and `--no-seccomp` turns them
//! off, as Firecracker's flags of those names do.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use seccompiler::{BpfProgram, TargetArch};

/// The filters kindling-vmm installs unless told otherwise.
const DEFAULT_FILTERS: &str = include_str!("../resources/seccomp/x86_64.json");

/// Exit status after a forbidden system call (Firecracker's).
pub const BAD_SYSCALL_EXIT: i32 = 148;

/// The kinds of thread, each with its filter (the JSON's top-level keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread once the VM runs: the device event loop.
    Vmm,
    /// The API server thread.
    Api,
    /// A vCPU thread.
    Vcpu,
}

impl ThreadKind {
    const ALL: [ThreadKind; 3] = [ThreadKind::Vmm, ThreadKind::Api, ThreadKind::Vcpu];

    fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Api => "api",
            ThreadKind::Vcpu => "vcpu",
        }
    }
}

/// Why the filters could not be loaded or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("reading the seccomp filters {0}: {1}")]
    Read(String, std::io::Error),
    #[error("compiling the seccomp filters: {0}")]
    Compile(seccompiler::Error),
    #[error("the seccomp filters have no {0:?} filter")]
    Missing(&'static str),
    #[error("installing the {0:?} seccomp filter: {1}")]
    Install(&'static str, seccompiler::Error),
}

/// The compiled filters, or none (`--no-seccomp`); cheap to clone into threads.
#[derive(Clone, Default)]
pub struct Filters(Option<Arc<HashMap<String, BpfProgram>>>);

impl fmt::Debug for Filters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            None => f.write_str("Filters(off)"),
            Some(map) => f.debug_tuple("Filters").field(&map.keys()).finish(),
        }
    }
}

impl Filters {
    /// kindling-vmm's own filters.
    pub fn default_filters() -> Result<Filters, SeccompError> {
        Self::from_json(DEFAULT_FILTERS.as_bytes())
    }

    /// Filters from a seccompiler JSON file, which must have one per [`ThreadKind`].
    pub fn from_file(path: &Path) -> Result<Filters, SeccompError> {
        let json =
            std::fs::read(path).map_err(|e| SeccompError::Read(path.display().to_string(), e))?;
        Self::from_json(&json)
    }

    /// No filtering at all.
    pub fn off() -> Filters {
        Filters(None)
    }

    fn from_json(json: &[u8]) -> Result<Filters, SeccompError> {
        let map = seccompiler::compile_from_json(json, TargetArch::x86_64)
            .map_err(SeccompError::Compile)?;
        for kind in ThreadKind::ALL {
            if !map.contains_key(kind.name()) {
                return Err(SeccompError::Missing(kind.name()));
            }
        }
        install_sigsys_handler();
        Ok(Filters(Some(Arc::new(map))))
    }

    /// Installs `kind`'s filter on the calling thread (and the threads it starts later);
    /// a no-op when filtering is off.
    pub fn apply(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let Some(map) = &self.0 else {
            return Ok(());
        };
        let program = map
            .get(kind.name())
            .ok_or(SeccompError::Missing(kind.name()))?;
        seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(kind.name(), e))
    }
}

/// The `_sigsys` member of `siginfo_t` for SIGSYS, as the kernel lays it out on x86-64.
#[repr(C)]
struct SigsysInfo {
    _signo: libc::c_int,
    _errno: libc::c_int,
    _code: libc::c_int,
    _pad: libc::c_int,
    _call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    _arch: libc::c_uint,
}

/// Names the forbidden call on stderr and exits. Only async-signal-safe calls: the number
/// is formatted by hand into a stack buffer.
extern "C" fn on_bad_syscall(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel hands a SIGSYS handler registered with SA_SIGINFO a valid
    // `siginfo_t`, whose union holds `_sigsys` (laid out as `SigsysInfo`) for this signal.
    let syscall = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let mut digits = [0u8; 10];
    let mut at = digits.len();
    let mut n = syscall.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + u8::try_from(n % 10).unwrap_or(0);
        n /= 10;
        if n == 0 || at == 0 {
            break;
        }
    }
    let parts: [&[u8]; 3] = [
        b"kindling-vmm: seccomp: forbidden system call ",
        &digits[at..],
        b"; exiting\n",
    ];
    for part in parts {
        // SAFETY: write(2) is async-signal-safe and reads `part.len()` bytes of a live slice.
        unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
    // SAFETY: _exit(2) is async-signal-safe and ends the process without running anything.
    unsafe { libc::_exit(BAD_SYSCALL_EXIT) };
}

/// Routes SIGSYS to [`on_bad_syscall`] (once per process).
fn install_sigsys_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_bad_syscall)
        {
            tracing::warn!("cannot handle SIGSYS ({e}): a forbidden system call kills silently");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_filters_compile_with_one_per_thread_kind() {
        let filters = Filters::default_filters().unwrap();
        assert!(format!("{filters:?}").contains("vcpu"));
    }

    #[test]
    fn a_filter_file_missing_a_thread_kind_is_refused() {
        let json =
            br#"{"vmm": {"default_action": "trap", "filter_action": "allow", "filter": []}}"#;
        let e = Filters::from_json(json).unwrap_err();
        assert!(matches!(e, SeccompError::Missing("api")), "{e}");
        assert!(matches!(
            Filters::from_json(b"{").unwrap_err(),
            SeccompError::Compile(_)
        ));
    }
}
