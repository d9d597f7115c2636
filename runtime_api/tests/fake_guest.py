"""A fake guest for the scheduler tests: speaks the Runtime API and Kindling's
/kindling/v1 extension endpoints over the host's Unix socket, the way bootstrap does.

Each event is JSON with an "action": echo (default), sleep, error, exit (the process
dies), runtime_exit (reports the runtime's death first, as bootstrap would), big (a
response of "bytes" bytes), big_error (an /error of "bytes" bytes), spam ("lines" log
lines "line <i> xxx..." of "width" bytes each, posted in batches of about 1 MiB).
The function's env var INIT_ERROR makes init fail through /init/error.
"""
import http.client
import json
import os
import socket
import sys
import time

START = time.monotonic()


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost")
        self.unix_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.unix_path)
        self.sock = sock


conn = UnixConnection(sys.argv[1])


def call(method, path, body=None, headers=None):
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    return resp, resp.read()


def post_json(path, value, headers=None):
    return call("POST", path, json.dumps(value).encode(), headers)


_, env_body = call("GET", "/kindling/v1/environment")
env = json.loads(env_body)
variables = env.get("variables", {})
if "INIT_ERROR" in variables:
    post_json("/2018-06-01/runtime/init/error",
              {"errorMessage": variables["INIT_ERROR"], "errorType": "Runtime.BadInit"},
              {"Lambda-Runtime-Function-Error-Type": "Runtime.BadInit"})
    sys.exit(1)

init_ms = (time.monotonic() - START) * 1000.0
first = True
while True:
    resp, event = call("GET", "/2018-06-01/runtime/invocation/next")
    request_id = resp.getheader("Lambda-Runtime-Aws-Request-Id")
    began = time.monotonic()
    ev = json.loads(event or b"{}")
    action = ev.get("action", "echo")
    call("POST", "/kindling/v1/logs", f"handling {ev.get('n', '-')} {action}\n".encode(),
         {"Lambda-Runtime-Aws-Request-Id": request_id})
    if action == "sleep":
        time.sleep(ev["seconds"])
    if action == "spam":
        batch = []
        size = 0
        for i in range(ev["lines"]):
            line = f"line {i} "
            line += "x" * (ev["width"] - len(line) - 1) + "\n"
            batch.append(line)
            size += len(line)
            if size >= (1 << 20) - ev["width"] or i == ev["lines"] - 1:
                call("POST", "/kindling/v1/logs", "".join(batch).encode(),
                     {"Lambda-Runtime-Aws-Request-Id": request_id})
                batch, size = [], 0
    if action == "memory":
        # As a microVM's agent does while an invocation runs; a stale id's is ignored.
        post_json("/kindling/v1/memory", {"requestId": request_id, "maxMemoryUsedMb": ev["mb"]})
        post_json("/kindling/v1/memory", {"requestId": "another", "maxMemoryUsedMb": 999})
        time.sleep(ev["seconds"])
    if action == "exit":
        os._exit(3)
    if action == "runtime_exit":
        post_json("/kindling/v1/runtime/exit", {"requestId": request_id, "exitCode": 7})
        os._exit(7)
    report = {"durationMs": (time.monotonic() - began) * 1000.0, "maxMemoryUsedMb": 12}
    if first:
        report["initDurationMs"] = init_ms
        first = False
    # As bootstrap does: the report rides on the result.
    reported = {"Kindling-Invocation-Report": json.dumps(report)}
    base = f"/2018-06-01/runtime/invocation/{request_id}"
    if action == "error":
        post_json(base + "/error", {"errorMessage": "boom", "errorType": "ValueError", "stackTrace": []},
                  {"Lambda-Runtime-Function-Error-Type": "Function.Boom", **reported})
    elif action == "big":
        call("POST", base + "/response", b"x" * ev["bytes"], reported)
    elif action == "big_error":
        call("POST", base + "/error", b"e" * ev["bytes"],
             {"Lambda-Runtime-Function-Error-Type": "Function.Loud", **reported})
    else:
        answer = {"echo": ev, "pid": os.getpid(), "requestId": request_id,
                  "deadline": resp.getheader("Lambda-Runtime-Deadline-Ms"),
                  "arn": resp.getheader("Lambda-Runtime-Invoked-Function-Arn"),
                  "trace": resp.getheader("Lambda-Runtime-Trace-Id"),
                  "clientContext": resp.getheader("Lambda-Runtime-Client-Context"),
                  "greeting": variables.get("GREETING")}
        post_json(base + "/response", answer, reported)
