//! Giving up privilege. Dropping root for good: the function's runtime (in the bootstrap)
//! and the jailed VMM (in kindling-jailer) both leave uid 0 the same way, with every
//! capability set empty and `no_new_privs`, so that no set-uid binary or file capability
//! gives any of it back ([`drop_to`]). Keeping only what is needed: init and the agent stay
//! root but trim their capabilities to a named set once what needs more is done
//! ([`keep_only`], with [`AGENT_IN_MICROVM`] and [`AGENT_IN_SANDBOX`]).

use std::io;

use nix::libc;

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// A Linux capability, by its number in `<linux/capability.h>`: those that init and the
/// agent keep (every other one they drop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Capability {
    DacOverride = 1,
    Kill = 5,
    Setgid = 6,
    Setuid = 7,
    Setpcap = 8,
    NetAdmin = 12,
    SysAdmin = 21,
    SysBoot = 22,
    SysTime = 25,
}

/// A set of capabilities, one bit per capability number, as `/proc/PID/status` shows them
/// (`CapBnd`, `CapEff`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities(u64);

impl Capabilities {
    /// No capability at all.
    pub const NONE: Capabilities = Capabilities(0);

    /// The set of `caps`.
    pub const fn of(caps: &[Capability]) -> Capabilities {
        let mut bits = 0u64;
        let mut i = 0;
        while i < caps.len() {
            bits |= 1 << caps[i] as u8;
            i += 1;
        }
        Capabilities(bits)
    }

    /// Both sets together.
    pub const fn union(self, other: Capabilities) -> Capabilities {
        Capabilities(self.0 | other.0)
    }

    /// One bit per capability number.
    pub const fn bits(self) -> u64 {
        self.0
    }

    const fn holds(self, number: u32) -> bool {
        number < 64 && self.0 & (1 << number) != 0
    }

    /// The low and high 32-bit words, as capset(2) takes them.
    fn words(self) -> [u32; 2] {
        let [a, b, c, d, e, f, g, h] = self.0.to_le_bytes();
        [
            u32::from_le_bytes([a, b, c, d]),
            u32::from_le_bytes([e, f, g, h]),
        ]
    }
}

/// What the agent (kindling-bootstrap) keeps, as root of a namespace sandbox, for the rest
/// of its life:
/// - `SETUID`, `SETGID`, `SETPCAP`: each start of the runtime or of an external extension
///   drops the child to the runtime's user ([`drop_to`]: setgroups/setresgid/setresuid, and
///   emptying its bounding set);
/// - `KILL`: it signals the runtime's process group and what is left in its cgroup, which
///   run as that other user.
pub const AGENT_IN_SANDBOX: Capabilities = Capabilities::of(&[
    Capability::Setuid,
    Capability::Setgid,
    Capability::Setpcap,
    Capability::Kill,
]);

/// What the agent keeps, as root of a microVM: [`AGENT_IN_SANDBOX`] and, for the first
/// event of a restored SnapStart clone (at any point of its life, so never given up):
/// - `SYS_ADMIN`: `RNDADDENTROPY` and `RNDRESEEDCRNG`, reseeding the kernel's random
///   generator with the host's bytes (no narrower capability allows either ioctl);
/// - `SYS_TIME`: setting the clock to the host's (`clock_settime`);
/// - `NET_ADMIN`: moving the interface onto the clone's own address, route and neighbours
///   (rtnetlink).
pub const AGENT_IN_MICROVM: Capabilities = AGENT_IN_SANDBOX.union(Capabilities::of(&[
    Capability::SysAdmin,
    Capability::SysTime,
    Capability::NetAdmin,
]));

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Drops the calling process to `uid`/`gid` for good: no capabilities left in any set
/// (effective, permitted, inheritable, ambient, bounding), no supplementary group but
/// `gid`, `no_new_privs`. Makes only async-signal-safe system calls and allocates nothing,
/// so a forked child may call it before exec.
pub fn drop_to(uid: libc::uid_t, gid: libc::gid_t) -> io::Result<()> {
    // The bounding set first: dropping from it needs CAP_SETPCAP, gone after setresuid.
    bound_to(Capabilities::NONE)?;
    clear_ambient()?;
    let groups = [gid];
    // SAFETY: `groups` outlives the call and holds exactly the one gid we pass.
    check(unsafe { libc::setgroups(1, groups.as_ptr()) })?;
    // SAFETY: plain id changes; no memory is passed.
    check(unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: as above. Leaving uid 0 empties the effective and permitted sets.
    check(unsafe { libc::setresuid(uid, uid, uid) })?;
    // The inheritable set survives a uid change: empty every set explicitly (always
    // allowed), which also covers a `uid` of 0.
    hold(Capabilities::NONE)?;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes only integers.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
}

/// Keeps the calling process's ids but trims its capabilities for good: `own` becomes its
/// effective and permitted sets (it must hold them already), its inheritable and ambient
/// sets are emptied, and its bounding set, all that any program it starts can ever have,
/// becomes `bounding`. A root process that execs a program hands it its whole bounding
/// set, so `bounding` is what its children (init's agent) keep; `own` may hold more than
/// `bounding` (init's own shutdown duties). Needs `CAP_SETPCAP`.
pub fn keep_only(bounding: Capabilities, own: Capabilities) -> io::Result<()> {
    bound_to(bounding)?;
    clear_ambient()?;
    hold(own)
}

/// Drops from the bounding set every capability not in `keep`.
fn bound_to(keep: Capabilities) -> io::Result<()> {
    // Capability numbers run from 0 to the kernel's last; past it prctl says EINVAL.
    for cap in (0..64).filter(|&cap| !keep.holds(cap)) {
        // SAFETY: PR_CAPBSET_DROP takes a capability number and touches no memory.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } == -1 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(err);
        }
    }
    Ok(())
}

fn clear_ambient() -> io::Result<()> {
    // SAFETY: clearing the ambient set takes no pointers.
    check(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    })
}

/// Makes `caps` the effective and permitted sets, with an empty inheritable set.
fn hold(caps: Capabilities) -> io::Result<()> {
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = caps.words().map(|word| CapData {
        effective: word,
        permitted: word,
        inheritable: 0,
    });
    // SAFETY: capset reads a v3 header and two data words, both live for the call.
    if unsafe { libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    use super::*;

    #[test]
    fn sets_read_as_proc_status_shows_them() {
        assert_eq!(AGENT_IN_SANDBOX.bits(), 0x1e0);
        assert_eq!(AGENT_IN_MICROVM.bits(), 0x0220_11e0);
        assert_eq!(
            Capabilities::of(&[Capability::SysBoot]).words(),
            [0x40_0000, 0]
        );
    }

    /// A root child trimmed by `keep_only` execs a program that has exactly the bounding
    /// set it was given, in every set a root exec fills from it, and nothing inheritable.
    #[test]
    fn a_program_started_after_keep_only_has_only_the_bounding_set() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED (host cannot): needs root to hold capabilities to drop");
            return;
        }
        let mut cat = Command::new("cat");
        cat.arg("/proc/self/status");
        // SAFETY: keep_only makes only prctl(2) and capset(2) calls and allocates nothing.
        unsafe {
            cat.pre_exec(|| keep_only(AGENT_IN_SANDBOX, Capabilities::of(&[Capability::Kill])));
        }
        let out = cat.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let status = String::from_utf8(out.stdout).unwrap();
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap()
                .trim()
                .to_owned()
        };
        assert_eq!(field("CapBnd:"), "00000000000001e0");
        assert_eq!(field("CapPrm:"), "00000000000001e0");
        assert_eq!(field("CapEff:"), "00000000000001e0");
        assert_eq!(field("CapInh:"), "0000000000000000");
        assert_eq!(field("CapAmb:"), "0000000000000000");
    }
}
