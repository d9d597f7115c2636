"""The guest-side half of tests/microvm_e2e.rs (and of some sandbox tests): one handler
whose event names what to do, so that every test function boots the same code and the
tests differ only in their events.

Every answer carries the guest's boot id, which tells one microVM from another.
"""
import ctypes
import os
import subprocess
import sys
import time


def _read(path):
    with open(path) as f:
        return f.read()


def _can_write(folder):
    try:
        path = os.path.join(folder, f".probe-{os.getpid()}")
        with open(path, "w") as f:
            f.write("x")
        os.remove(path)
        return True
    except OSError:
        return False


# What a function may learn of its own credentials (/proc/self/status).
_IDENTITY_KEYS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                  "NoNewPrivs", "Seccomp")

_CLONE_NEWUSER = 0x10000000
_SYS_KEYCTL = 250  # x86-64
_KEYCTL_GET_KEYRING_ID = 0
_KEY_SPEC_SESSION_KEYRING = -3


def _errno_of(call):
    """0 when the call succeeds, else its errno."""
    ctypes.set_errno(0)
    return 0 if call() != -1 else ctypes.get_errno()


def _denied():
    """What the function gets for calls its seccomp filter refuses (even where the kernel
    would allow them to an unprivileged user: a user namespace, the session keyring)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return {
        "unshare_user_ns": _errno_of(lambda: libc.unshare(_CLONE_NEWUSER)),
        "keyctl": _errno_of(
            lambda: libc.syscall(_SYS_KEYCTL, _KEYCTL_GET_KEYRING_ID, _KEY_SPEC_SESSION_KEYRING, 0)
        ),
    }


def _kernel_views():
    """What the host kernel shows and lets change: runc's masked and read-only paths."""
    def read(path):
        try:
            return _read(path)[:200]
        except OSError as e:
            return f"errno {e.errno}"

    def listing(path):
        try:
            return sorted(os.listdir(path))
        except OSError as e:
            return f"errno {e.errno}"

    def write_errno(path):
        try:
            with open(path, "w") as f:
                f.write("x")
            return 0
        except OSError as e:
            return e.errno

    return {
        "read": {path: read(path) for path in ("/proc/timer_list", "/proc/keys")},
        "listing": {path: listing(path) for path in ("/sys/firmware", "/proc/acpi")},
        "write_errno": {path: write_errno(path) for path in ("/proc/sys/kernel/hostname",)},
    }


# Made once, in the init phase: every clone of a SnapStart snapshot shares it (what
# Lambda warns about), while bytes read from the kernel in a handler differ once the
# clone's kernel random generator has been reseeded.
_INIT_RANDOM = os.urandom(16).hex()

_STAMPS = "/tmp/probe-stamps"
# A background process that outlives the invocation that starts it, as a handler's
# background work does: it appends the time to _STAMPS every 20 ms.
_STAMPER = f"""
import time
while True:
    with open({_STAMPS!r}, "a") as f:
        f.write(f"{{time.time()}}\\n")
    time.sleep(0.02)
"""
_stamper = None


def _stamps():
    try:
        return [float(line) for line in _read(_STAMPS).split()]
    except (OSError, ValueError):
        return []


def _stamp(seconds):
    """Starts the stamper (once per environment), lets it run `seconds` during this
    invocation, and tells what it wrote: how many stamps in all and during those seconds,
    and the largest gap between two consecutive stamps (a frozen environment's stamper
    makes none between invocations)."""
    global _stamper
    if _stamper is None:
        _stamper = subprocess.Popen([sys.executable, "-c", _STAMPER])
        deadline = time.time() + 10
        while not _stamps() and time.time() < deadline:
            time.sleep(0.01)
    since = time.time()
    time.sleep(seconds)
    stamps = _stamps()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {
        "stamps": len(stamps),
        "during": sum(1 for s in stamps if s >= since),
        "largest_gap": max(gaps, default=0.0),
    }


def handler(event, context):
    action = event.get("action", "hello")
    if action == "sleep":
        # The tests wait for this line in the function's log before they act.
        print(f"sleeping {event['seconds']} s", flush=True)
        time.sleep(event["seconds"])
    elif action == "exit":
        os.kill(os.getpid(), 9)
    answer = {
        "action": action,
        "boot_id": _read("/proc/sys/kernel/random/boot_id").strip(),
        "pid": os.getpid(),
    }
    if action == "inspect":
        answer["pid1_comm"] = _read("/proc/1/comm").strip()
        answer["mounts"] = _read("/proc/mounts")
        answer["cmdline"] = _read("/proc/cmdline").strip()
        # Absent when the kernel cannot load modules at all.
        answer["proc_modules"] = os.path.exists("/proc/modules")
        # The guest's wall clock, which bootstrap keeps on the host's.
        answer["time"] = time.time()
    if action == "stamp":
        answer["stamp"] = _stamp(event.get("seconds", 0.5))
    if action in ("random", "sleep"):
        answer["init_random"] = _INIT_RANDOM
        answer["urandom"] = os.urandom(16).hex()
    if action == "kernel_views":
        answer["views"] = _kernel_views()
    if action == "identity":
        status = dict(
            line.split(":", 1) for line in _read("/proc/self/status").splitlines() if ":" in line
        )
        answer["status"] = {key: " ".join(status[key].split()) for key in _IDENTITY_KEYS}
        answer["denied"] = _denied()
        # Whose ids these are on the host: "0 <first host id> <count>" per line (a kernel
        # without user namespaces, as the microVMs' minimal one, has no such file).
        uid_map = "/proc/self/uid_map"
        answer["uid_map"] = _read(uid_map).split() if os.path.exists(uid_map) else None
        answer["writable"] = {
            folder: _can_write(folder)
            for folder in ("/tmp", "/dev/shm", "/var/task", "/var/runtime", "/")
        }
    return answer
