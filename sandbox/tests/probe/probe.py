#!/usr/bin/python3
"""Runs as the sandbox's bootstrap: reports what it sees to the host over the host
socket (one JSON line), then waits for SIGTERM ("wait") or exits with status 3 ("exit").
Usage: probe.py ALLOC_MB SPAWN wait|exit. ALLOC_MB > 0: first try to allocate that much
in a child; SPAWN > 0: try to hold that many child processes at once."""
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
