#!/usr/bin/env python3
"""Kindling's control plane and durable event queue through the clients users have: boto3
and the AWS CLI against a real `kindling serve` (sandbox isolation).

    lambda_api.py --kindling PATH --scratch DIR (api | durability [--events N])

`api`: create from a zip, wait until active, invoke, update the code and see the new
answer, update the configuration, list with paging, delete, every error case with
Lambda's error type; functions.toml's functions are listed and read-only; the registry
survives a restart; event-invoke configs and a function destination.

`durability`: N Event invocations (some failing), the server SIGKILLed while they run and
restarted on the same state dir: every event runs, none runs again once it completed
cleanly, and the failing ones are retried (MaximumRetryAttempts 2) and delivered to the
on-failure destination with Lambda's record.

Prints one line per check; exits non-zero at the first failure. Kills what it started.
"""

import argparse
import base64
import collections
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile

import boto3
import botocore.config
import botocore.exceptions

ROLE = "arn:aws:iam::000000000000:role/kindling-test"
APP_V1 = '''
import time
def handler(event, context):
    time.sleep(event.get("sleep", 0))
    return {"version": 1, "event": event}
'''
APP_V2 = '''
import os
def handler(event, context):
    return {"version": 2, "event": event, "greeting": os.environ.get("GREETING")}
'''
# Sleeps a little so that events are still running when the server is killed.
APP_EVENTS = '''
import time
def handler(event, context):
    time.sleep(event.get("sleep", 0))
    if event.get("fail"):
        raise ValueError("failing on purpose: %s" % event["n"])
    return {"n": event["n"], "request_id": context.aws_request_id}
'''


def zipped(**files):
    """A zip of `files`, world-readable (as Lambda, which runs code as another user, needs:
    zipfile's default for a name is 0600)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, text in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o644 << 16
            z.writestr(info, text)
    return out.getvalue()


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", flush=True)
        raise SystemExit(1)
    print(f"ok: {what}", flush=True)


class Serve:
    """A `kindling serve` with its own state dir; `addr` once it listens."""

    def __init__(self, kindling, scratch, *extra):
        self.kindling, self.scratch, self.extra = kindling, scratch, extra
        self.state = os.path.join(scratch, "state")
        self.proc = None
        self.starts = 0

    def start(self):
        self.starts += 1
        self.err = os.path.join(self.scratch, f"serve-{self.starts}.err")
        with open(self.err, "wb") as err, open(self.err[:-4] + ".out", "wb") as out:
            self.proc = subprocess.Popen(
                [self.kindling, "serve", "--isolation", "sandbox", "--addr", "127.0.0.1:0",
                 "--state-dir", self.state, *self.extra],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        deadline = time.time() + 30
        while time.time() < deadline:
            text = open(self.err).read()
            m = re.search(r"^kindling: serving .* on http://(\S+)$", text, re.M)
            if m:
                self.addr = m.group(1)
                return self
            if self.proc.poll() is not None:
                raise SystemExit(f"kindling serve ended ({self.proc.returncode}):\n{text}")
            time.sleep(0.05)
        raise SystemExit(f"kindling serve did not listen:\n{open(self.err).read()}")

    def client(self):
        return boto3.client(
            "lambda", endpoint_url=f"http://{self.addr}", region_name="us-east-1",
            aws_access_key_id="x", aws_secret_access_key="x",
            config=botocore.config.Config(retries={"max_attempts": 1}, read_timeout=120))

    def cli(self, *args):
        env = dict(os.environ, AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x",
                   AWS_DEFAULT_REGION="us-east-1")
        return subprocess.run(["aws", "lambda", *args, "--endpoint-url", f"http://{self.addr}"],
                              env=env, capture_output=True, text=True)

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        """SIGTERM; checks a clean exit that leaves no environment behind."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise SystemExit("kindling serve did not stop within 60 s of SIGTERM")
        check(code == 0, f"the server exits 0 on SIGTERM (got {code})")
        envs = os.path.join(self.state, "envs")
        left = os.listdir(envs) if os.path.isdir(envs) else []
        check(not left, f"no environment folder left ({left})")

    def destination(self, name):
        path = os.path.join(self.state, "destinations", f"{name}.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]

    def log(self, function):
        path = os.path.join(self.state, "logs", f"{function}.log")
        return open(path).read() if os.path.exists(path) else ""


def error_type(call):
    try:
        call()
    except botocore.exceptions.ClientError as e:
        return e.response["Error"]["Code"]
    return None


def invoke_json(client, name, event):
    r = client.invoke(FunctionName=name, Payload=json.dumps(event).encode())
    return r["StatusCode"], json.loads(r["Payload"].read())


def scenario_api(kindling, scratch):
    toml_code = os.path.join(scratch, "toml-code")
    os.makedirs(toml_code)
    open(os.path.join(toml_code, "app.py"), "w").write(APP_V1)
    functions = os.path.join(scratch, "functions.toml")
    open(functions, "w").write(
        f'[functions.from-file]\ncode = "{toml_code}"\nruntime = "python"\n'
        'handler = "app.handler"\nisolation = "sandbox"\nmaximum_retry_attempts = 1\n'
        'on_success = "arn:aws:sqs:us-east-1:000000000000:from-file-ok"\n')
    with_server(Serve(kindling, scratch, "--functions", functions), run_api, scratch)


def with_server(server, body, *args):
    """Runs `body(server, *args)` on the started server, which is killed if left running."""
    server.start()
    try:
        body(server, *args)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()


def run_api(server, scratch):
    lam = server.client()
    v1 = zipped(**{"app.py": APP_V1})
    created = lam.create_function(
        FunctionName="hello", Runtime="python3.12", Role=ROLE, Handler="app.handler",
        Code={"ZipFile": v1}, MemorySize=256, Timeout=5, Description="first")
    check(created["ResponseMetadata"]["HTTPStatusCode"] == 201, "CreateFunction answers 201")
    check(created["CodeSha256"] == base64.b64encode(hashlib.sha256(v1).digest()).decode(),
          "CodeSha256 is the zip's base64 SHA-256")
    check((created["Runtime"], created["Role"], created["MemorySize"], created["Timeout"]) ==
          ("python3.12", ROLE, 256, 5), "Runtime, Role, MemorySize and Timeout are recorded")
    lam.get_waiter("function_active_v2").wait(FunctionName="hello")
    lam.get_waiter("function_active").wait(FunctionName="hello")
    check(True, "waiters function_active and function_active_v2 pass")
    status, body = invoke_json(lam, "hello", {"a": 1})
    check(status == 200 and body == {"version": 1, "event": {"a": 1}}, f"invoke runs v1 ({body})")

    # An invocation in flight during the update finishes on the old code.
    in_flight = {}
    slow = threading.Thread(target=lambda: in_flight.update(
        answer=invoke_json(server.client(), "hello", {"sleep": 2})[1]))
    slow.start()
    time.sleep(0.5)
    v2 = zipped(**{"app.py": APP_V2})
    updated = lam.update_function_code(FunctionName="hello", ZipFile=v2)
    check(updated["LastUpdateStatus"] in ("Successful", "InProgress"), "UpdateFunctionCode")
    _, body = invoke_json(lam, "hello", {"during": "drain"})
    check(body.get("version") == 2, "an invocation after the update runs the new code at once")
    slow.join()
    check(in_flight.get("answer", {}).get("version") == 1,
          f"the invocation in flight finished on the old code ({in_flight})")
    lam.get_waiter("function_updated_v2").wait(FunctionName="hello")
    lam.get_waiter("function_updated").wait(FunctionName="hello")
    status, body = invoke_json(lam, "hello", {"a": 2})
    check(body.get("version") == 2, f"after the update the new code answers ({body})")
    conf = lam.update_function_configuration(
        FunctionName="hello", Environment={"Variables": {"GREETING": "hi"}}, Timeout=7)
    check(conf["Timeout"] == 7 and conf["Environment"]["Variables"] == {"GREETING": "hi"},
          "UpdateFunctionConfiguration")
    lam.get_waiter("function_updated").wait(FunctionName="hello")
    _, body = invoke_json(lam, "hello", {})
    check(body.get("greeting") == "hi", f"the new environment reaches the function ({body})")
    got = lam.get_function(FunctionName="hello")
    check(got["Configuration"]["FunctionName"] == "hello" and "Location" in got["Code"],
          "GetFunction")
    conf = lam.get_function_configuration(
        FunctionName="arn:aws:lambda:us-east-1:000000000000:function:hello")
    check(conf["Description"] == "first" and conf["State"] == "Active",
          "GetFunctionConfiguration by ARN")

    for i in range(5):
        lam.create_function(FunctionName=f"page-{i}", Runtime="python3.11", Role=ROLE,
                            Handler="app.handler", Code={"ZipFile": v1})
    names, pages, marker = [], 0, None
    while True:
        kwargs = {"MaxItems": 2, **({"Marker": marker} if marker else {})}
        page = lam.list_functions(**kwargs)
        pages += 1
        check(len(page["Functions"]) <= 2, f"a page holds at most MaxItems (page {pages})")
        names += [f["FunctionName"] for f in page["Functions"]]
        marker = page.get("NextMarker")
        if not marker:
            break
    want = sorted(["hello", "from-file"] + [f"page-{i}" for i in range(5)])
    check(sorted(names) == want and pages == 4, f"ListFunctions pages through all ({names})")
    paginated = [f["FunctionName"] for p in lam.get_paginator("list_functions").paginate(
        PaginationConfig={"PageSize": 3}) for f in p["Functions"]]
    check(sorted(paginated) == want, "boto3's paginator sees every function")

    # Each error case with Lambda's error type.
    cases = [
        ("get a missing function", "ResourceNotFoundException",
         lambda: lam.get_function(FunctionName="nope")),
        ("invoke a missing function", "ResourceNotFoundException",
         lambda: lam.invoke(FunctionName="nope", Payload=b"{}")),
        ("delete a missing function", "ResourceNotFoundException",
         lambda: lam.delete_function(FunctionName="nope")),
        ("update a missing function", "ResourceNotFoundException",
         lambda: lam.update_function_code(FunctionName="nope", ZipFile=v1)),
        ("create a function twice", "ResourceConflictException",
         lambda: lam.create_function(FunctionName="hello", Runtime="python3.12", Role=ROLE,
                                     Handler="app.handler", Code={"ZipFile": v1})),
        ("an unsupported runtime", "InvalidParameterValueException",
         lambda: lam.create_function(FunctionName="rb", Runtime="ruby3.3", Role=ROLE,
                                     Handler="app.handler", Code={"ZipFile": v1})),
        ("a handler missing from the zip", "InvalidParameterValueException",
         lambda: lam.create_function(FunctionName="nh", Runtime="python3.12", Role=ROLE,
                                     Handler="missing.handler", Code={"ZipFile": v1})),
        ("code that is not a zip", "InvalidParameterValueException",
         lambda: lam.create_function(FunctionName="nz", Runtime="python3.12", Role=ROLE,
                                     Handler="app.handler", Code={"ZipFile": b"not a zip"})),
        ("a zip with a path out of the code folder", "InvalidParameterValueException",
         lambda: lam.create_function(FunctionName="ev", Runtime="python3.12", Role=ROLE,
                                     Handler="app.handler",
                                     Code={"ZipFile": zipped(**{"app.py": APP_V1, "../x": "x"})})),
        ("code from S3", "InvalidParameterValueException",
         lambda: lam.create_function(FunctionName="s3", Runtime="python3.12", Role=ROLE,
                                     Handler="app.handler",
                                     Code={"S3Bucket": "bucket", "S3Key": "k.zip"})),
        ("a stale RevisionId", "PreconditionFailedException",
         lambda: lam.update_function_code(FunctionName="hello", ZipFile=v1, RevisionId="old")),
        ("a qualifier that does not exist", "ResourceNotFoundException",
         lambda: lam.get_function(FunctionName="hello", Qualifier="7")),
        ("changing a functions.toml function", "ResourceConflictException",
         lambda: lam.update_function_code(FunctionName="from-file", ZipFile=v1)),
        ("deleting a functions.toml function", "ResourceConflictException",
         lambda: lam.delete_function(FunctionName="from-file")),
        ("a destination that is not an ARN", "InvalidParameterValueException",
         lambda: lam.put_function_event_invoke_config(
             FunctionName="hello", DestinationConfig={"OnFailure": {"Destination": "nowhere"}})),
        ("an event over 1 MB", "RequestEntityTooLargeException",
         lambda: lam.invoke(FunctionName="hello", InvocationType="Event",
                            Payload=json.dumps("x" * (1 << 20)).encode())),
    ]
    for what, want_type, call in cases:
        got = error_type(call)
        check(got == want_type, f"{what}: {want_type} (got {got})")
    check(not any(f["FunctionName"] in ("rb", "nh", "nz", "ev", "s3")
                  for f in lam.list_functions()["Functions"]), "nothing refused was kept")
    kept = sorted(os.listdir(os.path.join(server.state, "code")))
    in_use = sorted({hashlib.sha256(z).hexdigest() + ".zip" for z in (v1, v2)})
    check(kept == in_use, f"the code store holds only the zips in use ({kept})")
    _, body = invoke_json(lam, "from-file", {"b": 1})
    check(body == {"version": 1, "event": {"b": 1}}, "functions.toml's function still runs")
    got = lam.get_function_event_invoke_config(FunctionName="from-file")
    check(got["MaximumRetryAttempts"] == 1, "functions.toml's event-invoke keys are its config")
    lam.invoke(FunctionName="from-file", InvocationType="Event", Payload=b'{"c": 3}')
    ok_records = wait_for(lambda: server.destination("from-file-ok"), 30)
    check(ok_records and ok_records[0]["requestPayload"] == {"c": 3},
          "functions.toml's on_success destination gets the record")

    # Event invoke config, and a function as a destination.
    lam.create_function(FunctionName="sink", Runtime="python3.12", Role=ROLE,
                        Handler="app.handler", Code={"ZipFile": v1})
    lam.put_function_event_invoke_config(
        FunctionName="hello", MaximumRetryAttempts=0,
        DestinationConfig={"OnSuccess": {"Destination":
                                         "arn:aws:lambda:us-east-1:000000000000:function:sink"}})
    lam.put_function_event_invoke_config(
        FunctionName="sink", DestinationConfig={"OnSuccess": {"Destination":
                                                "arn:aws:sqs:us-east-1:000000000000:sunk"}})
    got = lam.get_function_event_invoke_config(FunctionName="hello")
    check(got["MaximumRetryAttempts"] == 0 and got["MaximumEventAgeInSeconds"] == 21600,
          "GetFunctionEventInvokeConfig")
    r = lam.invoke(FunctionName="hello", InvocationType="Event", Payload=b'{"via": "event"}')
    check(r["StatusCode"] == 202, "an Event is accepted with 202")
    request_id = r["ResponseMetadata"]["RequestId"]
    sunk = wait_for(lambda: server.destination("sunk"), 30)
    record = sunk[0]["requestPayload"] if sunk else {}
    check(record.get("requestContext", {}).get("requestId") == request_id
          and record["requestContext"]["condition"] == "Success"
          and record["requestPayload"] == {"via": "event"}
          and record["responsePayload"]["version"] == 2,
          "hello's success record reached the function sink, whose own reached its file")

    # The registry survives a restart; a deleted function is gone for good.
    invoke_json(lam, "page-0", {})
    envs = lambda: [e for e in os.listdir(os.path.join(server.state, "envs"))
                    if e.startswith("page-0-")]
    check(len(envs()) == 1, "page-0 has a warm environment")
    lam.delete_function(FunctionName="page-0")
    check(error_type(lambda: lam.get_function(FunctionName="page-0")) ==
          "ResourceNotFoundException", "DeleteFunction")
    check(not envs(), "a deleted function's warm environment is stopped (when the call returns)")
    server.stop()
    server.start()
    lam = server.client()
    names = {f["FunctionName"] for f in lam.list_functions()["Functions"]}
    check("hello" in names and "page-0" not in names, "the registry survives a restart")
    _, body = invoke_json(lam, "hello", {"after": "restart"})
    check(body.get("version") == 2 and body.get("greeting") == "hi",
          "after a restart the function runs its last code and configuration")

    # The AWS CLI, as a user would.
    zip_path = os.path.join(scratch, "cli.zip")
    open(zip_path, "wb").write(v1)
    r = server.cli("create-function", "--function-name", "cli-fn", "--runtime",
                   "nodejs22.x", "--handler", "index.handler", "--role", ROLE,
                   "--zip-file", f"fileb://{zip_path}")
    check(r.returncode != 0 and "InvalidParameterValueException" in r.stderr,
          "aws lambda create-function names a missing handler's error type")
    r = server.cli("create-function", "--function-name", "cli-fn", "--runtime",
                   "python3.13", "--handler", "app.handler", "--role", ROLE,
                   "--zip-file", f"fileb://{zip_path}")
    check(r.returncode == 0, f"aws lambda create-function ({r.stderr})")
    r = server.cli("wait", "function-active", "--function-name", "cli-fn")
    check(r.returncode == 0, f"aws lambda wait function-active ({r.stderr})")
    out = os.path.join(scratch, "cli-out.json")
    r = server.cli("invoke", "--function-name", "cli-fn", "--payload", '{"cli": true}', out)
    check(r.returncode == 0 and json.load(open(out)) == {"version": 1, "event": {"cli": True}},
          f"aws lambda invoke ({r.stderr})")
    r = server.cli("delete-function", "--function-name", "cli-fn")
    check(r.returncode == 0, "aws lambda delete-function")
    server.stop()


def wait_for(probe, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(0.1)
    return probe()


def scenario_durability(kindling, scratch, events):
    server = Serve(kindling, scratch, "--event-retry-base-ms", "100",
                   "--event-queue-depth", str(events * 2))
    with_server(server, run_durability, events)


def run_durability(server, events):
    lam = server.client()
    lam.create_function(FunctionName="worker", Runtime="python3.12", Role=ROLE,
                        Handler="app.handler", Code={"ZipFile": zipped(**{"app.py": APP_EVENTS})},
                        Timeout=10)
    # Two environments: the events take a while, and the kill finds many still queued.
    lam.put_function_concurrency(FunctionName="worker", ReservedConcurrentExecutions=2)
    check(lam.get_function_concurrency(FunctionName="worker")["ReservedConcurrentExecutions"] == 2,
          "PutFunctionConcurrency")
    lam.put_function_event_invoke_config(
        FunctionName="worker",
        DestinationConfig={
            "OnSuccess": {"Destination": "arn:aws:sqs:us-east-1:000000000000:done"},
            "OnFailure": {"Destination": "arn:aws:sqs:us-east-1:000000000000:failed"},
        })
    failing = set(range(0, events, 10))
    ids = {}
    started = time.time()
    for n in range(events):
        event = {"n": n, "sleep": 0.1, "fail": n in failing}
        r = lam.invoke(FunctionName="worker", InvocationType="Event",
                       Payload=json.dumps(event).encode())
        assert r["StatusCode"] == 202, r
        ids[r["ResponseMetadata"]["RequestId"]] = n
    check(len(ids) == events, f"{events} events accepted in {time.time() - started:.1f} s")
    # Kill the server once part of the events have completed.
    wait_for(lambda: len(server.destination("done")) >= events // 4, 120)
    server.kill9()
    done_before = {r["requestContext"]["requestId"] for r in server.destination("done")}
    failed_before = {r["requestContext"]["requestId"] for r in server.destination("failed")}
    check(0 < len(done_before) < events,
          f"SIGKILLed with {len(done_before)} of {events} events completed")
    log_mark = len(server.log("worker"))
    server.start()
    lam = server.client()
    wanted = events

    def finished():
        seen = {r["requestContext"]["requestId"] for r in
                server.destination("done") + server.destination("failed")}
        return seen if len(seen) >= wanted else None

    seen = wait_for(finished, 300)
    check(seen is not None and set(ids) <= seen, "after the restart every event completed")
    done = server.destination("done")
    failed = server.destination("failed")
    by_id = collections.Counter(r["requestContext"]["requestId"] for r in done + failed)
    after_restart = server.log("worker")[log_mark:]
    restarted = set(re.findall(r"START RequestId: (\S+)", after_restart))
    rerun = restarted & (done_before | failed_before)
    check(not rerun, f"no event that had completed ran again after the restart ({len(rerun)})")
    twice = [i for i, c in by_id.items() if c > 1]
    check(len(twice) <= 10,
          f"at most the events in flight at the kill were delivered twice ({len(twice)})")
    check({ids[r["requestContext"]["requestId"]] for r in failed} == failing
          and all(r["requestContext"]["condition"] == "RetriesExhausted"
                  and r["requestContext"]["approximateInvokeCount"] == 3
                  and r["requestPayload"]["fail"] is True
                  and r["responseContext"]["functionError"] == "Unhandled"
                  and r["responsePayload"]["errorType"] == "ValueError"
                  for r in failed),
          f"the {len(failing)} failing events were tried 3 times and reached the on-failure "
          "destination with Lambda's record")
    check(all(r["requestContext"]["condition"] == "Success"
              and r["responsePayload"]["n"] == ids[r["requestContext"]["requestId"]]
              and r["responsePayload"]["request_id"] == r["requestContext"]["requestId"]
              for r in done),
          "every success record carries the event's request id and its answer")
    starts = collections.Counter(re.findall(r"START RequestId: (\S+)", server.log("worker")))
    check(all(starts[i] >= 3 for i, n in ids.items() if n in failing),
          "each failing event started at least 3 times")
    metrics = urllib.request.urlopen(f"http://{server.addr}/metrics").read().decode()
    check('kindling_event_queue_depth{function="worker"}' not in metrics,
          "the queue is empty in /metrics")
    check('kindling_event_retries_total{function="worker"}' in metrics, "retries are counted")
    server.stop()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kindling", required=True)
    p.add_argument("--scratch", required=True)
    p.add_argument("scenario", choices=["api", "durability"])
    p.add_argument("--events", type=int, default=200)
    a = p.parse_args()
    shutil.rmtree(a.scratch, ignore_errors=True)
    os.makedirs(a.scratch)
    if a.scenario == "api":
        scenario_api(a.kindling, a.scratch)
    else:
        scenario_durability(a.kindling, a.scratch, a.events)
    print("PASSED", flush=True)


if __name__ == "__main__":
    sys.exit(main())
