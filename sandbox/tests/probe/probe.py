#!/usr/bin/python3
"""Runs as the sandbox's bootstrap: reports what it sees to the host over the host
socket (one JSON line), then waits for SIGTERM ("wait") or exits with status 3 ("exit").
Usage: probe.py ALLOC_MB SPAWN wait|exit. ALLOC_MB > 0: first try to allocate that much
in a child; SPAWN > 0: try to hold that many child processes at once."""
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
    """Mounts with whatever capabilities the caller has (no seccomp filter here: only
    the function's runtime gets one), so that only the kernel's own checks answer."""
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


_CLONE_NEWUSER, _CLONE_NEWNS = 0x10000000, 0x00020000


def mount_attacks():
    """Every capability a process in the sandbox can still get (init bounds all it
    starts to the agent's set, without CAP_SYS_ADMIN): those of a user namespace of its
    own, with a mount namespace of its own, where the sandbox's mounts arrive locked.
    Run in a child, which answers over a pipe."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS) != 0:
            seen = {"unshare": errno.errorcode[ctypes.get_errno()]}
        else:
            seen = {
                "cap_eff": next(l.split()[1] for l in open("/proc/self/status")
                                if l.startswith("CapEff:")),
                # Read-only mounts made writable again, and a cgroup v1 hierarchy (whose
                # release_agent runs as host root): the kernel must refuse both.
                "remount_task_rw": try_mount(None, "/var/task", None, _MS_REMOUNT | _MS_BIND, None),
                "remount_usr_rw": try_mount(None, "/usr", None, _MS_REMOUNT | _MS_BIND, None),
                "remount_root_rw": try_mount(None, "/", None, _MS_REMOUNT | _MS_BIND, None),
                "mount_cgroup_v1": try_mount("cgroup", "/tmp/cg", "cgroup", 0, "memory"),
                "remount_proc_sys_rw": try_mount(None, "/proc/sys", None, _MS_REMOUNT | _MS_BIND, None),
                # Read-only covers taken away to see beneath (both are mount points:
                # EINVAL here is the kernel's lock).
                "unmount_proc_sys": try_unmount("/proc/sys"),
                "unmount_task": try_unmount("/var/task"),
            }
        os.write(write, json.dumps(seen).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        seen = json.loads(answer.read())
    os.waitpid(child, 0)
    return seen


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
    "in_own_user_ns": mount_attacks(),
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
