#!/usr/bin/python3
"""Runs as the sandbox's bootstrap: reports what it sees to the host over the host
socket (one JSON line), then waits for SIGTERM ("wait") or exits with status 3 ("exit").
Usage: probe.py ALLOC_MB SPAWN wait|exit. ALLOC_MB > 0: first try to allocate that much
in a child; SPAWN > 0: try to hold that many child processes at once.
probe.py attacks: tries the mount attacks, prints what the kernel answered, exits."""
import ctypes
import errno
import json
import os
import socket
import subprocess
import sys
import time


def try_write(path):
    try:
        with open(path, "w") as f:
            f.write("x")
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]


_MS_REMOUNT, _MS_BIND = 32, 4096


def try_mount(source, target, fstype, flags, data):
    """Mounts with whatever capabilities the caller has (the test runs it from the host,
    outside any seccomp filter), so that only the kernel's own checks answer."""
    libc = ctypes.CDLL(None, use_errno=True)
    os.makedirs(target, exist_ok=True)
    args = [x.encode() if x else None for x in (source, target, fstype, data)]
    if libc.mount(args[0], args[1], args[2], flags, args[3]) == 0:
        return "ok"
    return errno.errorcode[ctypes.get_errno()]


def try_unmount(target):
    """Detaches a mount, to see what it covers."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(target.encode(), 2) == 0:  # MNT_DETACH
        return "ok"
    return errno.errorcode[ctypes.get_errno()]


_CLONE_NEWUSER = 0x10000000


def seccomp_mode():
    return next(l.split()[1] for l in open("/proc/self/status") if l.startswith("Seccomp:"))


def new_user_namespace():
    """A user namespace of its own would give every capability there: init's seccomp
    filter, which all it starts inherit, must refuse it. A failed unshare changes nothing."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWUSER) == 0:
        return "ok"
    return errno.errorcode[ctypes.get_errno()]


def mount_attacks():
    """Run by the test from the host, joined to the sandbox's user and mount namespaces
    as their root with every capability there (more than anything inside keeps): only
    the kernel's lock on the mounts stands in the way."""
    return {
        "cap_eff": next(l.split()[1] for l in open("/proc/self/status")
                        if l.startswith("CapEff:")),
        # Read-only mounts made writable again, and a cgroup v1 hierarchy (whose
        # release_agent runs as host root): the kernel must refuse both.
        "remount_task_rw": try_mount(None, "/var/task", None, _MS_REMOUNT | _MS_BIND, None),
        "remount_usr_rw": try_mount(None, "/usr", None, _MS_REMOUNT | _MS_BIND, None),
        "remount_root_rw": try_mount(None, "/", None, _MS_REMOUNT | _MS_BIND, None),
        "mount_cgroup_v1": try_mount("cgroup", "/tmp/cg", "cgroup", 0, "memory"),
        "remount_proc_sys_rw": try_mount(None, "/proc/sys", None, _MS_REMOUNT | _MS_BIND, None),
        # Read-only covers taken away to see beneath (both are mount points: EINVAL here
        # is the kernel's lock).
        "unmount_proc_sys": try_unmount("/proc/sys"),
        "unmount_task": try_unmount("/var/task"),
    }


if sys.argv[1:] == ["attacks"]:
    print(json.dumps(mount_attacks()))
    sys.exit(0)

alloc_mb, spawn, then = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
facts = {
    "pid": os.getpid(),
    "ppid": os.getppid(),
    "pid1": open("/proc/1/cmdline", "rb").read().decode().split("\0"),
    "hostname": socket.gethostname(),
    "interfaces": sorted(os.listdir("/sys/class/net")),
    "tmp_before": os.listdir("/tmp"),
    "tmp_write": try_write("/tmp/probe"),
    "task_write": try_write("/var/task/probe-new"),
    "runtime_write": try_write("/var/runtime/probe-new"),
    "root_write": try_write("/probe-new"),
    "usr_write": try_write("/usr/probe-new"),
    "runtime": sorted(os.listdir("/var/runtime")),
    "dev": sorted(os.listdir("/dev")),
    "dev_null_write": try_write("/dev/null"),
    "host": os.environ.get("KINDLING_HOST"),
    "cap_eff": next(l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff:")),
    "seccomp": seccomp_mode(),
    "new_user_ns": new_user_namespace(),
}
if alloc_mb:
    hog = f"b = b'x' * ({alloc_mb} << 20)"
    facts["alloc_status"] = subprocess.run(["/usr/bin/python3", "-c", hog]).returncode
if spawn:
    children = []
    try:
        for _ in range(spawn):
            children.append(subprocess.Popen(["/usr/bin/sleep", "60"]))
    except OSError as e:
        facts["spawn_error"] = errno.errorcode[e.errno]
    facts["spawned"] = len(children)
    for child in children:
        child.kill()
        child.wait()

sock = socket.socket(socket.AF_UNIX)
sock.connect(facts["host"].removeprefix("unix://"))
sock.sendall(json.dumps(facts).encode() + b"\n")
sock.close()
if then == "exit":
    sys.exit(3)
while True:
    time.sleep(60)
