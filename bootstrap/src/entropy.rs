//! Re-seeding the guest kernel's random number generator with bytes from the host
//! (SnapStart). Every clone of a snapshot resumes with the same kernel random state, so two
//! clones would read the same "random" bytes from `/dev/urandom` and `getrandom(2)` until
//! their kernels reseed on their own schedule (a minute, in Linux 6.1). The host hands
//! fresh bytes on the first event of such an environment: they are mixed into the input
//! pool (`RNDADDENTROPY`) and the CRNG is made to reseed from it at once
//! (`RNDRESEEDCRNG`), before the runtime sees the event, as Firecracker advises for clones.
//! Both ioctls need `CAP_SYS_ADMIN`, which the agent (root in its VM) keeps for this
//! ([`kindling_plumbing::privileges::AGENT_IN_MICROVM`]).

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use kindling_wire::ENTROPY_BYTES;

/// `struct rand_pool_info` of `<linux/random.h>` with its buffer inline.
#[repr(C)]
struct RandPoolInfo {
    /// Bits of entropy credited.
    entropy_count: nix::libc::c_int,
    /// Bytes in `buf`.
    buf_size: nix::libc::c_int,
    buf: [u8; ENTROPY_BYTES],
}

/// `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: u32 = 0x4008_5203;
/// `_IO('R', 0x07)`.
const RNDRESEEDCRNG: u32 = 0x5207;

nix::ioctl_write_ptr_bad!(rnd_add_entropy, RNDADDENTROPY, RandPoolInfo);
nix::ioctl_none_bad!(rnd_reseed_crng, RNDRESEEDCRNG);

/// Mixes `bytes` (exactly [`ENTROPY_BYTES`]) into the kernel's pool, credits them, and
/// reseeds the CRNG from the pool.
pub fn reseed(bytes: &[u8]) -> Result<(), String> {
    let buf: [u8; ENTROPY_BYTES] = bytes
        .try_into()
        .map_err(|_| format!("{} bytes of entropy, not {ENTROPY_BYTES}", bytes.len()))?;
    let info = RandPoolInfo {
        entropy_count: nix::libc::c_int::try_from(ENTROPY_BYTES * 8)
            .unwrap_or(nix::libc::c_int::MAX),
        buf_size: nix::libc::c_int::try_from(ENTROPY_BYTES).unwrap_or(nix::libc::c_int::MAX),
        buf,
    };
    let urandom = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    // SAFETY: the fd is open for as long as `urandom` lives; RNDADDENTROPY reads a
    // `rand_pool_info` header and then `buf_size` bytes, all inside `info`, which outlives
    // the call; RNDRESEEDCRNG takes no argument.
    unsafe {
        rnd_add_entropy(urandom.as_raw_fd(), &info).map_err(|e| format!("RNDADDENTROPY: {e}"))?;
        rnd_reseed_crng(urandom.as_raw_fd()).map_err(|e| format!("RNDRESEEDCRNG: {e}"))?;
    }
    Ok(())
}
