"""The guest-side half of the network tests (tests/common/internet.rs's users): what a
function's environment can reach. The event says what to try:

- `fetch`: a URL to GET (by name: it goes through /etc/resolv.conf's resolver);
- `reach`: `HOST:PORT` targets to open a TCP connection to, `gateway` standing for the
  default route's next hop (the host's end of the environment's link);
- `serve_seconds`: accept TCP connections on port 8080 for that long, answering each.

Every answer carries the environment's own address and its /etc/resolv.conf.
"""
import socket
import struct
import time
import urllib.request

PORT = 8080


def _gateway():
    with open("/proc/net/route") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == "00000000":
                return socket.inet_ntoa(struct.pack("<L", int(fields[2], 16)))
    return None


def _address():
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect(("198.51.100.2", 9))  # UDP connect: picks the source, sends nothing
        return s.getsockname()[0]
    except OSError as e:
        return f"none ({e.strerror})"


def _reach(target):
    host, port = target.rsplit(":", 1)
    if host == "gateway":
        host = _gateway()
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            return "connected"
    except socket.timeout:
        return "timeout"
    except OSError as e:
        return f"errno {e.errno}"


def _serve(seconds):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", PORT))
    server.listen(8)
    server.settimeout(0.2)
    accepted = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            conn, _ = server.accept()
        except socket.timeout:
            continue
        conn.sendall(b"peer\n")
        conn.close()
        accepted += 1
    server.close()
    return accepted


def handler(event, context):
    answer = {"address": _address()}
    try:
        with open("/etc/resolv.conf") as f:
            answer["resolv_conf"] = f.read()
    except OSError as e:
        answer["resolv_conf"] = f"unreadable: {e.strerror}"
    if "fetch" in event:
        try:
            with urllib.request.urlopen(event["fetch"], timeout=10) as page:
                answer["page"] = page.read().decode()
        except Exception as e:  # the test shows what went wrong
            answer["page_error"] = repr(e)
    if "reach" in event:
        answer["reach"] = {t: _reach(t) for t in event["reach"]}
    if "serve_seconds" in event:
        answer["accepted"] = _serve(event["serve_seconds"])
    return answer
