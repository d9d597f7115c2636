//! A helper process that must not outlive the host process that started it, set up by
//! the helper itself.

use std::io;

use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::Signal;
use nix::unistd::getppid;

/// Makes the calling process die (SIGKILL) with its parent, and checks that its parent is
/// still `host_pid`: a host that ended before the signal was set would never send it.
///
/// A `pre_exec` hook would do the same between fork and exec, but it makes the host fork
/// (copying the page tables of a large, many-threaded process: 3.6–19 ms measured on this
/// project's machine) where it could `posix_spawn`. The signal comes when the *thread*
/// that spawned the helper ends: hosts spawn from threads that live as long as they do.
pub fn die_with_parent(host_pid: u32) -> io::Result<()> {
    set_pdeathsig(Signal::SIGKILL)?;
    let parent = getppid();
    if u32::try_from(parent.as_raw()).ok() != Some(host_pid) {
        return Err(io::Error::other(format!(
            "the process {host_pid} that started this one is gone (its parent is now {parent})"
        )));
    }
    Ok(())
}
