"""The guest-side half of tests/microvm_e2e.rs (and of some sandbox tests): one handler
whose event names what to do, so that every test function boots the same code and the
tests differ only in their events.

Every answer carries the guest's boot id, which tells one microVM from another.
"""
import ctypes
import errno
import os
import signal
import socket
import stat
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

# What init (PID 1) and the agent keep (/proc/PID/status of each, readable by anyone).
_GUEST_CAP_KEYS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
# The agent's command name, as the kernel truncates it (15 characters).
_AGENT_COMM = "kindling-bootstrap"[:15]


def _status_of(pid, keys):
    status = dict(
        line.split(":", 1) for line in _read(f"/proc/{pid}/status").splitlines() if ":" in line
    )
    return {key: " ".join(status[key].split()) for key in keys}


def _guest_privileges():
    """The capability sets of init and of the agent(s), as the function sees them."""
    agents = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and _read(f"/proc/{entry}/comm").strip() == _AGENT_COMM:
                agents.append(_status_of(entry, _GUEST_CAP_KEYS))
        except OSError:
            pass  # gone meanwhile
    return {"init": _status_of(1, _GUEST_CAP_KEYS), "agents": agents}


_CLONE_NEWUSER = 0x10000000
_SYS_KEYCTL = 250  # x86-64
_KEYCTL_GET_KEYRING_ID = 0
_KEY_SPEC_SESSION_KEYRING = -3
_AF_VSOCK = 40
# Where the agent reaches the host's Runtime API: a Unix socket in the sandbox, vsock port
# 9001 of the host (CID 2) in a microVM.
_HOST_SOCKET = "/run/kindling/host.sock"
_HOST_VSOCK = (2, 9001)


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
        # Only the agent talks to the host; a function could flood it (as Docker, no vsock).
        "vsock_socket": _errno_of(lambda: libc.socket(_AF_VSOCK, socket.SOCK_STREAM, 0)),
    }


def _connect_errno(family, address):
    """0 when a stream socket of `family` connects to `address`, else the errno."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            return s.connect_ex(address)
    except OSError as e:
        return e.errno


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


# x86-64 system call numbers and flags the attacks use.
_SYS = {"init_module": 175, "kexec_load": 246, "bpf": 321, "perf_event_open": 298,
        "userfaultfd": 323, "open_by_handle_at": 304, "reboot": 169, "io_uring_setup": 425}
_MS_RDONLY, _MS_REMOUNT, _MS_BIND = 1, 32, 4096
_CLONE_NEWNS = 0x00020000
_PTRACE_ATTACH = 16


def _write_errno(path, data="x"):
    """0 when `data` could be written to `path`, else the errno."""
    try:
        with open(path, "w") as f:
            f.write(data)
        return 0
    except OSError as e:
        return e.errno


def _os_errno(call):
    """0 when an `os` call succeeds, else its errno."""
    try:
        call()
        return 0
    except OSError as e:
        return e.errno


def _limit_files():
    """Every cgroup control file that would raise the function's limits, as it sees them."""
    found = []
    for folder, _, files in os.walk("/sys/fs/cgroup"):
        found += [os.path.join(folder, f) for f in files
                  if f in ("memory.max", "memory.high", "memory.swap.max", "pids.max",
                           "cgroup.procs", "release_agent", "notify_on_release")]
    return found


def _attacks(event):
    """Each way out of its environment a hostile function would try, with what it got: 0
    where the attempt succeeded, else the errno it failed with."""
    libc = ctypes.CDLL(None, use_errno=True)
    got = {}
    for path in ("/var/task", "/var/runtime", "/usr", "/"):
        got[f"remount {path} rw"] = _errno_of(
            lambda: libc.mount(None, path.encode(), None, _MS_REMOUNT | _MS_BIND, None))
        got[f"write into {path}"] = _write_errno(os.path.join(path, ".attack"))
    os.makedirs("/tmp/cg", exist_ok=True)
    got["mount cgroup v1"] = _errno_of(
        lambda: libc.mount(b"cgroup", b"/tmp/cg", b"cgroup", 0, b"memory"))
    got["mount proc"] = _errno_of(lambda: libc.mount(b"proc", b"/tmp/cg", b"proc", 0, None))
    got["mount tmpfs"] = _errno_of(lambda: libc.mount(b"tmpfs", b"/tmp/cg", b"tmpfs", 0, None))
    got["unshare mount ns"] = _errno_of(lambda: libc.unshare(_CLONE_NEWNS))
    for path in _limit_files():
        # "max" lifts a limit; our pid in a parent's cgroup.procs would leave ours.
        data = str(os.getpid()) if path.endswith("cgroup.procs") else "max"
        if path.endswith("release_agent"):
            data = "/tmp/escape.sh"
        got[f"write {path}"] = _write_errno(path, data)
    for path in ("/proc/sys/kernel/core_pattern", "/proc/sys/kernel/modprobe",
                 "/proc/sys/vm/overcommit_memory", "/sys/kernel/uevent_helper"):
        got[f"write {path}"] = _write_errno(path, "|/tmp/escape.sh")
    for name, number in _SYS.items():
        got[name] = _errno_of(lambda: libc.syscall(number, 0, 0, 0, 0, 0))
    got["mknod block device"] = _os_errno(
        lambda: os.mknod("/tmp/sda", 0o600 | stat.S_IFBLK, os.makedev(8, 0)))
    got["setuid 0"] = _os_errno(lambda: os.setuid(0))
    got["chroot"] = _os_errno(lambda: os.chroot("/tmp"))
    # The processes it does not own: init and the agent.
    me = os.getuid()
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            if os.stat(f"/proc/{pid}").st_uid == me:
                continue
            comm = _read(f"/proc/{pid}/comm").strip()
        except OSError:
            continue
        got[f"ptrace {comm}"] = _errno_of(lambda: libc.ptrace(_PTRACE_ATTACH, pid, None, None))
        got[f"kill {comm}"] = _os_errno(lambda: os.kill(pid, signal.SIGKILL))
        got[f"read {comm}'s environ"] = _os_errno(lambda: _read(f"/proc/{pid}/environ"))
    # The host: a file the test made there, and its services on loopback.
    secret = event["host_file"]
    got["open the host's file"] = _os_errno(lambda: _read(secret))
    got["open it through /proc/1/root"] = _os_errno(lambda: _read(f"/proc/1/root{secret}"))
    # The host's side of the agent's connection, past the agent.
    if os.path.exists(_HOST_SOCKET):
        got["connect to the host's Runtime API"] = _connect_errno(socket.AF_UNIX, _HOST_SOCKET)
    else:
        got["connect to the host's Runtime API"] = _connect_errno(_AF_VSOCK, _HOST_VSOCK)
    for port in event["host_ports"]:
        with socket.socket() as s:
            s.settimeout(2)
            got[f"connect to 127.0.0.1:{port}"] = s.connect_ex(("127.0.0.1", port))
    return got


def _fork_bomb():
    """Forks until the kernel refuses; every child does the same. Ends with the timeout."""
    while True:
        try:
            os.fork()
        except OSError:
            time.sleep(0.01)


def _fill_tmp():
    """Writes /tmp full; tells how much it took and how it stopped."""
    written, block = 0, b"x" * (1 << 20)
    try:
        with open("/tmp/fill", "wb") as f:
            while True:
                f.write(block)
                written += len(block)
    except OSError as e:
        stopped = errno.errorcode.get(e.errno, str(e.errno))
    os.remove("/tmp/fill")
    return {"written": written, "stopped": stopped}


def _spew(mib):
    """Prints `mib` MiB of log lines (1 KiB each) as fast as it can."""
    line = "y" * 1023 + "\n"
    chunk = line * 1024
    for _ in range(mib):
        sys.stdout.write(chunk)
    sys.stdout.flush()
    return mib


def _runtime_api_abuse():
    """Garbage, a lying Content-Length, a bogus request id and a pile of idle connections
    on its own Runtime API, then a normal answer; tells the status lines it saw."""
    host, port = os.environ["AWS_LAMBDA_RUNTIME_API"].rsplit(":", 1)
    address = (host, int(port))
    prefix = "/2018-06-01/runtime/invocation"

    def exchange(data, read=True):
        with socket.create_connection(address, timeout=5) as s:
            try:
                s.sendall(data)
                return s.recv(200).split(b"\r\n", 1)[0].decode(errors="replace") if read else ""
            except OSError as e:
                return f"errno {e.errno}"

    seen = {
        "garbage": exchange(b"\x00\xff\x16\x03\x01 not http at all\r\n\r\n" * 64),
        "huge header": exchange(b"GET / HTTP/1.1\r\nX: " + b"a" * (1 << 20) + b"\r\n\r\n"),
        "bogus id": exchange(
            f"POST {prefix}/not-a-request/response HTTP/1.1\r\nHost: x\r\n"
            "Content-Length: 2\r\n\r\n{}".encode()),
        "lying length": exchange(
            f"POST {prefix}/not-a-request/error HTTP/1.1\r\nHost: x\r\n"
            "Content-Length: 100000000\r\n\r\n".encode() + b"z" * (1 << 20), read=False),
    }
    idle = []
    for _ in range(200):
        try:
            idle.append(socket.create_connection(address, timeout=5))
        except OSError as e:
            seen["idle"] = f"errno {e.errno} after {len(idle)}"
            break
    for s in idle:
        s.close()
    return seen


def _cut_runtime_api():
    """Shuts down every socket the runtime holds (its Runtime API connection)."""
    cut = 0
    for fd in (int(f) for f in os.listdir("/proc/self/fd")):
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                socket.socket(fileno=os.dup(fd)).shutdown(socket.SHUT_RDWR)
                cut += 1
        except OSError:
            pass
    return cut


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
        # What the kernel keeps time with, and the step of its timers: 1 ns with
        # high-resolution timers, a tick (4 ms) on jiffies.
        answer["clocksource"] = _read(
            "/sys/devices/system/clocksource/clocksource0/current_clocksource").strip()
        answer["clock_resolution"] = time.clock_getres(time.CLOCK_MONOTONIC)
    if action == "stamp":
        answer["stamp"] = _stamp(event.get("seconds", 0.5))
    if action in ("random", "sleep"):
        answer["init_random"] = _INIT_RANDOM
        answer["urandom"] = os.urandom(16).hex()
    if action == "kernel_views":
        answer["views"] = _kernel_views()
    if action == "attacks":
        answer["attacks"] = _attacks(event)
    if action == "fork_bomb":
        _fork_bomb()
    if action == "fill_tmp":
        answer["fill_tmp"] = _fill_tmp()
    if action == "spew":
        answer["spewed_mib"] = _spew(event["mib"])
    if action == "runtime_api_abuse":
        answer["seen"] = _runtime_api_abuse()
    if action == "cut_runtime_api":
        answer["cut"] = _cut_runtime_api()
    if action == "identity":
        answer["status"] = _status_of("self", _IDENTITY_KEYS)
        answer["guest"] = _guest_privileges()
        answer["denied"] = _denied()
        # Whose ids these are on the host: "0 <first host id> <count>" per line (a kernel
        # without user namespaces, as the microVMs' minimal one, has no such file).
        uid_map = "/proc/self/uid_map"
        answer["uid_map"] = _read(uid_map).split() if os.path.exists(uid_map) else None
        answer["writable"] = {
            folder: _can_write(folder)
            for folder in ("/tmp", "/dev/shm", "/var/task", "/var/runtime", "/opt", "/")
        }
    return answer
