"""The guest-side half of tests/microvm_e2e.rs: one handler whose event names what to do,
so that every test function boots the same code and the tests differ only in their events.

Every answer carries the guest's boot id, which tells one microVM from another.
"""
import os
import time


def _read(path):
    with open(path) as f:
        return f.read()


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
    return answer
