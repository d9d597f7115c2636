#!/usr/bin/env python3
"""Kindling's control plane and durable event queue through the clients users have: boto3
and the AWS CLI against a real `kindling serve` (sandbox isolation).

    lambda_api.py --kindling PATH --scratch DIR (api | durability [--events N])

`api`: create from a zip, wait until active, invoke, update the code and see the new
answer, update the configuration, list with paging, delete, every error case with
Lambda's error type; functions.toml's functions are listed and read-only; the registry
survives a restart; event-invoke configs and a function destination; published versions
and aliases (each version's own code, configuration and environments, whatever names it:
`fn:1`, `fn:alias`, `Qualifier`, a qualified ARN, an Event), listed with paging, with
their error cases, through boto3 and the AWS CLI.

`http`: a payload that is not JSON is refused (400 `InvalidRequestContentException`) for
RequestResponse, Event and streaming invocations before any environment starts, and an
empty one reaches the function as `{}`; function URLs made, read, changed, listed and
deleted with `*-function-url-config` (the URL answers, survives a restart, goes with its
config or function; AWS_IAM refused); layers published, read, listed and deleted, and
used by `Layers` on CreateFunction/UpdateFunctionConfiguration (the function imports the
layer's package, and keeps a deleted version it uses).

`durability`: N Event invocations (1,000 by default; some failing), the server SIGKILLed
while they run and restarted on the same state dir: every event runs, none runs again once it completed
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
import urllib.error
import urllib.request
import zipfile

import boto3
import botocore.config
import botocore.exceptions

ROLE = "arn:aws:iam::000000000000:role/kindling-test"
CLI_ARN = "arn:aws:lambda:us-east-1:000000000000:function:cli-fn"
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
# Says which code, version and configuration answered.
APP_TAGGED = '''
import os
CODE = "%s"
def handler(event, context):
    return {"code": CODE, "version": context.function_version,
            "arn": context.invoked_function_arn, "stage": os.environ.get("STAGE")}
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
        # A first start may build the runtime's root image (minutes).
        deadline = time.time() + 300
        while time.time() < deadline:
            text = open(self.err).read()
            m = re.search(r"^kindling: serving .* on http://(\S+)\n", text, re.M)
            if m:
                self.addr = m.group(1)
                return self
            if self.proc.poll() is not None:
                raise SystemExit(f"kindling serve ended ({self.proc.returncode}):\n{text}")
            time.sleep(0.05)
        self.proc.kill()
        self.proc.wait()
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

    def print_warnings(self, at_most=40):
        """The last warnings of every start's stderr, for a failure's report."""
        for n in range(1, self.starts + 1):
            path = os.path.join(self.scratch, f"serve-{n}.err")
            lines = [l for l in open(path, errors="replace").read().splitlines()
                     if "WARN" in l or "ERROR" in l] if os.path.exists(path) else []
            print(f"--- serve start {n}: {len(lines)} warnings, the last {at_most}:")
            print("\n".join(lines[-at_most:]), flush=True)

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
    try:
        server.start()
        body(server, *args)
    except BaseException:
        server.print_warnings()
        raise
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


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

    run_versions(server, lam)

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
    _, body = invoke_json(lam, "ver:live", {})
    check((body.get("code"), body.get("version")) == ("B", "2"),
          f"after a restart versions and aliases are kept ({body})")
    check(error_type(lambda: lam.invoke(FunctionName="ver:1", Payload=b"{}")) ==
          "ResourceNotFoundException", "a deleted version stays deleted after a restart")

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
    r = server.cli("publish-version", "--function-name", "cli-fn", "--description", "first")
    check(r.returncode == 0 and json.loads(r.stdout)["Version"] == "1",
          f"aws lambda publish-version ({r.stderr})")
    r = server.cli("create-alias", "--function-name", "cli-fn", "--name", "prod",
                   "--function-version", "1")
    check(r.returncode == 0 and json.loads(r.stdout)["AliasArn"].endswith(":cli-fn:prod"),
          f"aws lambda create-alias ({r.stderr})")
    open(zip_path, "wb").write(zipped(**{"app.py": APP_V2}))
    r = server.cli("update-function-code", "--function-name", "cli-fn",
                   "--zip-file", f"fileb://{zip_path}")
    check(r.returncode == 0, f"aws lambda update-function-code ({r.stderr})")
    r = server.cli("wait", "function-updated", "--function-name", "cli-fn")
    check(r.returncode == 0, f"aws lambda wait function-updated ({r.stderr})")
    for what, args, want in [
        ("unqualified: $LATEST, the new code", ["--function-name", "cli-fn"], (2, "$LATEST")),
        ("--qualifier prod: version 1's code", ["--function-name", "cli-fn", "--qualifier",
                                                "prod"], (1, "1")),
        ("cli-fn:1", ["--function-name", "cli-fn:1"], (1, "1")),
        ("cli-fn:$LATEST, the literal qualifier", ["--function-name", "cli-fn:$LATEST"],
         (2, "$LATEST")),
        ("a full ARN", ["--function-name", CLI_ARN], (2, "$LATEST")),
        ("a full ARN with a version", ["--function-name", f"{CLI_ARN}:1"], (1, "1")),
    ]:
        r = server.cli("invoke", *args, "--payload", "{}", out)
        answer = json.load(open(out)) if r.returncode == 0 else {}
        executed = json.loads(r.stdout).get("ExecutedVersion") if r.returncode == 0 else None
        check((answer.get("version"), executed) == want,
              f"aws lambda invoke {what} ({answer}, {executed}, {r.stderr})")
    r = server.cli("publish-version", "--function-name", "cli-fn")
    check(r.returncode == 0 and json.loads(r.stdout)["Version"] == "2",
          "aws lambda publish-version after an update publishes version 2")
    r = server.cli("update-alias", "--function-name", "cli-fn", "--name", "prod",
                   "--function-version", "2")
    check(r.returncode == 0, f"aws lambda update-alias ({r.stderr})")
    r = server.cli("invoke", "--function-name", "cli-fn:prod", "--payload", "{}", out)
    check(r.returncode == 0 and json.load(open(out))["version"] == 2,
          "after update-alias the alias runs version 2")
    r = server.cli("list-versions-by-function", "--function-name", "cli-fn",
                   "--page-size", "1")
    check(r.returncode == 0 and [v["Version"] for v in json.loads(r.stdout)["Versions"]] ==
          ["$LATEST", "1", "2"], f"aws lambda list-versions-by-function pages ({r.stderr})")
    r = server.cli("list-aliases", "--function-name", "cli-fn")
    check(r.returncode == 0 and [a["Name"] for a in json.loads(r.stdout)["Aliases"]] == ["prod"],
          "aws lambda list-aliases")
    r = server.cli("get-alias", "--function-name", "cli-fn", "--name", "nope")
    check(r.returncode != 0 and "ResourceNotFoundException" in r.stderr,
          "aws lambda get-alias of a missing alias: ResourceNotFoundException")
    r = server.cli("delete-function", "--function-name", "cli-fn", "--qualifier", "2")
    check(r.returncode != 0 and "ResourceConflictException" in r.stderr,
          "aws lambda delete-function of a version an alias names: ResourceConflictException")
    r = server.cli("delete-alias", "--function-name", "cli-fn", "--name", "prod")
    check(r.returncode == 0, "aws lambda delete-alias")
    r = server.cli("delete-function", "--function-name", "cli-fn", "--qualifier", "1")
    check(r.returncode == 0, "aws lambda delete-function --qualifier 1")
    r = server.cli("get-function", "--function-name", "cli-fn", "--qualifier", "1")
    check(r.returncode != 0 and "ResourceNotFoundException" in r.stderr,
          "a deleted version is ResourceNotFoundException")
    r = server.cli("delete-function", "--function-name", "cli-fn")
    check(r.returncode == 0, "aws lambda delete-function")
    server.stop()


def run_versions(server, lam):
    """Versions and aliases through boto3: each version runs its own code and configuration
    in environments of its own, however it is named."""
    code_a, code_b = (zipped(**{"app.py": APP_TAGGED % tag}) for tag in "AB")
    sha = lambda z: base64.b64encode(hashlib.sha256(z).digest()).decode()
    arn = "arn:aws:lambda:us-east-1:000000000000:function:ver"
    lam.create_function(FunctionName="ver", Runtime="python3.12", Role=ROLE,
                        Handler="app.handler", Code={"ZipFile": code_a},
                        Environment={"Variables": {"STAGE": "one"}})
    v1 = lam.publish_version(FunctionName="ver", Description="first")
    check(v1["ResponseMetadata"]["HTTPStatusCode"] == 201 and v1["Version"] == "1"
          and v1["FunctionArn"] == f"{arn}:1" and v1["CodeSha256"] == sha(code_a)
          and v1["Description"] == "first", "PublishVersion answers 201 with version 1")
    again = lam.publish_version(FunctionName="ver")
    check(again["Version"] == "1", "publishing an unchanged $LATEST answers the last version")
    alias = lam.create_alias(FunctionName="ver", Name="live", FunctionVersion="1",
                             Description="production")
    check(alias["ResponseMetadata"]["HTTPStatusCode"] == 201
          and alias["AliasArn"] == f"{arn}:live" and alias["FunctionVersion"] == "1",
          "CreateAlias answers 201 with the alias")
    lam.update_function_code(FunctionName="ver", ZipFile=code_b)
    lam.get_waiter("function_updated_v2").wait(FunctionName="ver")

    def answer(**kwargs):
        r = lam.invoke(Payload=b"{}", **kwargs)
        return json.loads(r["Payload"].read()), r.get("ExecutedVersion")

    for what, kwargs, want in [
        ("ver", {"FunctionName": "ver"}, ("B", "$LATEST", arn)),
        ("ver:1", {"FunctionName": "ver:1"}, ("A", "1", f"{arn}:1")),
        ("ver:live", {"FunctionName": "ver:live"}, ("A", "1", f"{arn}:live")),
        ("ver:$LATEST, the literal qualifier", {"FunctionName": "ver:$LATEST"},
         ("B", "$LATEST", arn)),
        ("Qualifier=1", {"FunctionName": "ver", "Qualifier": "1"}, ("A", "1", f"{arn}:1")),
        ("Qualifier=$LATEST", {"FunctionName": "ver", "Qualifier": "$LATEST"},
         ("B", "$LATEST", arn)),
        ("a full ARN with an alias", {"FunctionName": f"{arn}:live"}, ("A", "1", f"{arn}:live")),
        ("a partial ARN with a version", {"FunctionName": "000000000000:function:ver:1"},
         ("A", "1", f"{arn}:1")),
    ]:
        body, executed = answer(**kwargs)
        got = (body.get("code"), body.get("version"), body.get("arn"))
        check(got == want and executed == want[1],
              f"invoking {what} runs {want[:2]} with its own ARN ({got}, executed {executed})")
    envs = sorted(e for e in os.listdir(os.path.join(server.state, "envs"))
                  if e.startswith("ver-"))
    check(len(envs) == 2, f"$LATEST and version 1 each have an environment of their own ({envs})")
    lam.update_function_configuration(FunctionName="ver", Environment={"Variables":
                                                                       {"STAGE": "two"}})
    lam.get_waiter("function_updated_v2").wait(FunctionName="ver")
    check(answer(FunctionName="ver")[0]["stage"] == "two"
          and answer(FunctionName="ver:1")[0]["stage"] == "one",
          "a configuration update changes $LATEST, not version 1")

    latest = lam.get_function(FunctionName="ver")["Configuration"]
    cases = [
        ("publish with another CodeSha256", "InvalidParameterValueException",
         lambda: lam.publish_version(FunctionName="ver", CodeSha256=sha(code_a))),
        ("publish with a stale RevisionId", "PreconditionFailedException",
         lambda: lam.publish_version(FunctionName="ver", RevisionId="old")),
    ]
    for what, want_type, call in cases:
        got = error_type(call)
        check(got == want_type, f"{what}: {want_type} (got {got})")
    v2 = lam.publish_version(FunctionName="ver", CodeSha256=sha(code_b),
                             RevisionId=latest["RevisionId"])
    check(v2["Version"] == "2" and v2["CodeSha256"] == sha(code_b),
          "PublishVersion with $LATEST's CodeSha256 and RevisionId publishes version 2")
    live = lam.get_alias(FunctionName="ver", Name="live")
    updated = lam.update_alias(FunctionName="ver", Name="live", FunctionVersion="2",
                               RevisionId=live["RevisionId"])
    check(updated["FunctionVersion"] == "2" and updated["RevisionId"] != live["RevisionId"],
          "UpdateAlias moves the alias to version 2")
    body, executed = answer(FunctionName="ver:live")
    check((body["code"], body["version"], body["stage"], executed) == ("B", "2", "two", "2"),
          f"the alias now runs version 2's code and configuration ({body})")
    check(answer(FunctionName="ver:1")[0]["code"] == "A", "version 1 still runs its own code")

    conf = lam.get_function_configuration(FunctionName="ver", Qualifier="1")
    check((conf["Version"], conf["CodeSha256"], conf["FunctionArn"],
           conf["Environment"]["Variables"]) == ("1", sha(code_a), f"{arn}:1", {"STAGE": "one"}),
          "GetFunctionConfiguration with a Qualifier shows that version")
    conf = lam.get_function(FunctionName="ver:live")["Configuration"]
    check((conf["Version"], conf["FunctionArn"]) == ("2", f"{arn}:live"),
          "GetFunction of an alias shows its version")

    # An Event sent to a version runs that version; its record says so.
    lam.put_function_event_invoke_config(
        FunctionName="ver", DestinationConfig={"OnSuccess": {"Destination":
                                               "arn:aws:sqs:us-east-1:000000000000:ver-ok"}})
    lam.invoke(FunctionName="ver", Qualifier="1", InvocationType="Event", Payload=b'{"e": 1}')
    records = wait_for(lambda: server.destination("ver-ok"), 30)
    record = records[0] if records else {}
    check(record.get("responsePayload", {}).get("code") == "A"
          and record["requestContext"]["functionArn"] == f"{arn}:1"
          and record["responseContext"]["executedVersion"] == "1",
          f"an Event to version 1 runs version 1 ({record})")

    for name in ["beta", "alpha", "gamma"]:
        lam.create_alias(FunctionName="ver", Name=name, FunctionVersion="1")
    versions = [v["Version"] for p in lam.get_paginator("list_versions_by_function").paginate(
        FunctionName="ver", PaginationConfig={"PageSize": 1}) for v in p["Versions"]]
    check(versions == ["$LATEST", "1", "2"], f"ListVersionsByFunction pages through ({versions})")
    page = lam.list_versions_by_function(FunctionName="ver", MaxItems=2)
    check(len(page["Versions"]) == 2 and "NextMarker" in page,
          "ListVersionsByFunction stops at MaxItems with a NextMarker")
    aliases, pages, marker = [], 0, None
    while True:
        page = lam.list_aliases(FunctionName="ver", MaxItems=2,
                                **({"Marker": marker} if marker else {}))
        pages += 1
        aliases += [a["Name"] for a in page["Aliases"]]
        marker = page.get("NextMarker")
        if not marker:
            break
    check(aliases == ["alpha", "beta", "gamma", "live"] and pages == 2,
          f"ListAliases pages through every alias in order ({aliases})")
    ones = [a["Name"] for a in lam.list_aliases(FunctionName="ver", FunctionVersion="1")["Aliases"]]
    check(ones == ["alpha", "beta", "gamma"], "ListAliases with FunctionVersion")

    cases = [
        ("invoke a version that does not exist", "ResourceNotFoundException",
         lambda: lam.invoke(FunctionName="ver:9", Payload=b"{}")),
        ("invoke an alias that does not exist", "ResourceNotFoundException",
         lambda: lam.invoke(FunctionName="ver", Qualifier="nope", Payload=b"{}")),
        ("an Event to an alias that does not exist", "ResourceNotFoundException",
         lambda: lam.invoke(FunctionName="ver:nope", InvocationType="Event", Payload=b"{}")),
        ("get a version that does not exist", "ResourceNotFoundException",
         lambda: lam.get_function(FunctionName="ver", Qualifier="9")),
        ("get an alias that does not exist", "ResourceNotFoundException",
         lambda: lam.get_alias(FunctionName="ver", Name="nope")),
        ("an alias of a function that does not exist", "ResourceNotFoundException",
         lambda: lam.create_alias(FunctionName="nope", Name="x", FunctionVersion="1")),
        ("an alias of a version that does not exist", "ResourceNotFoundException",
         lambda: lam.create_alias(FunctionName="ver", Name="x", FunctionVersion="9")),
        ("an alias that exists already", "ResourceConflictException",
         lambda: lam.create_alias(FunctionName="ver", Name="live", FunctionVersion="1")),
        ("an alias named like a version", "ValidationException",
         lambda: lam.create_alias(FunctionName="ver", Name="12", FunctionVersion="1")),
        ("an alias of a version that is not a number", "ValidationException",
         lambda: lam.create_alias(FunctionName="ver", Name="x", FunctionVersion="one")),
        ("a weighted alias", "InvalidParameterValueException",
         lambda: lam.create_alias(FunctionName="ver", Name="x", FunctionVersion="1",
                                  RoutingConfig={"AdditionalVersionWeights": {"2": 0.5}})),
        ("UpdateAlias with a stale RevisionId", "PreconditionFailedException",
         lambda: lam.update_alias(FunctionName="ver", Name="live", RevisionId="old")),
        ("UpdateAlias to a version that does not exist", "ResourceNotFoundException",
         lambda: lam.update_alias(FunctionName="ver", Name="live", FunctionVersion="9")),
        ("UpdateAlias of an alias that does not exist", "ResourceNotFoundException",
         lambda: lam.update_alias(FunctionName="ver", Name="nope", FunctionVersion="1")),
        ("DeleteAlias of a function that does not exist", "ResourceNotFoundException",
         lambda: lam.delete_alias(FunctionName="nope", Name="live")),
        ("deleting a version an alias names", "ResourceConflictException",
         lambda: lam.delete_function(FunctionName="ver", Qualifier="1")),
        ("deleting $LATEST alone", "InvalidParameterValueException",
         lambda: lam.delete_function(FunctionName="ver", Qualifier="$LATEST")),
        ("deleting a version that does not exist", "ResourceNotFoundException",
         lambda: lam.delete_function(FunctionName="ver", Qualifier="9")),
        ("updating a version's code", "InvalidParameterValueException",
         lambda: lam.update_function_code(FunctionName="ver:1", ZipFile=code_a)),
        ("publishing a functions.toml function", "ResourceConflictException",
         lambda: lam.publish_version(FunctionName="from-file")),
        ("an ARN of another region", "ResourceNotFoundException",
         lambda: lam.get_function(
             FunctionName="arn:aws:lambda:eu-west-1:000000000000:function:ver:1")),
    ]
    for what, want_type, call in cases:
        got = error_type(call)
        check(got == want_type, f"{what}: {want_type} (got {got})")

    for name in ["alpha", "beta", "gamma"]:
        lam.delete_alias(FunctionName="ver", Name=name)
    gone = lam.delete_alias(FunctionName="ver", Name="gamma")
    check(gone["ResponseMetadata"]["HTTPStatusCode"] == 204,
          "DeleteAlias of an alias already gone answers 204, as Lambda")
    lam.delete_function(FunctionName="ver", Qualifier="1")
    check(error_type(lambda: lam.invoke(FunctionName="ver:1", Payload=b"{}")) ==
          "ResourceNotFoundException", "DeleteFunction with a Qualifier deletes that version")
    check([v["Version"] for v in lam.list_versions_by_function(FunctionName="ver")["Versions"]]
          == ["$LATEST", "2"], "the other versions stay")
    envs = [e for e in os.listdir(os.path.join(server.state, "envs")) if e.startswith("ver-")]
    check(len(envs) == 2, f"the deleted version's environment stopped ({envs})")
    kept = os.listdir(os.path.join(server.state, "code"))
    check(hashlib.sha256(code_a).hexdigest() + ".zip" not in kept
          and hashlib.sha256(code_b).hexdigest() + ".zip" in kept,
          "the deleted version's code left the code store; version 2's stayed")


APP_WEB = '''
import json
def handler(event, context):
    return {"statusCode": 200, "headers": {"content-type": "application/json"},
            "body": json.dumps({"path": event["rawPath"],
                                "query": event.get("queryStringParameters")})}
'''
APP_LAYERED = '''
import greeting
def handler(event, context):
    return {"greeting": greeting.MESSAGE, "from": greeting.__file__}
'''


def scenario_http(kindling, scratch):
    with_server(Serve(kindling, scratch), run_http)


def metric(server, name, function):
    """A counter's value for `function` in /metrics (0 when it has none yet)."""
    m = re.search(rf'^kindling_{name}_total{{function="{re.escape(function)}"}} (\d+)',
                  metrics(server), re.M)
    return int(m.group(1)) if m else 0


def raw_post(server, path, body):
    """POSTs `body` as it is: (status, headers with lowercase names, body)."""
    req = urllib.request.Request(f"http://{server.addr}{path}", data=body, method="POST")
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def get_url(url):
    """GETs a function URL: (status, JSON body), or None when nothing answers there."""
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None
    except (urllib.error.URLError, ConnectionError):
        return None


def run_http(server):
    lam = server.client()
    run_invalid_json(server, lam)
    run_function_urls(server, lam)
    run_layers(server, server.client())  # the server restarted meanwhile: a new port
    server.stop()


def run_invalid_json(server, lam):
    lam.create_function(FunctionName="strict", Runtime="python3.12", Role=ROLE,
                        Handler="app.handler", Code={"ZipFile": zipped(**{"app.py": APP_V1})})
    for what, payload in [("not JSON", b"not json"), ("cut short", b'{"a": '),
                          ("two values", b"{} {}"), ("not UTF-8", b'"\xff"')]:
        for kind in ("RequestResponse", "Event"):
            try:
                lam.invoke(FunctionName="strict", InvocationType=kind, Payload=payload)
                got = None
            except botocore.exceptions.ClientError as e:
                got = (e.response["ResponseMetadata"]["HTTPStatusCode"], e.response["Error"]["Code"],
                       e.response["Error"]["Message"])
            check(got is not None and got[:2] == (400, "InvalidRequestContentException")
                  and got[2].startswith("Could not parse request body into json: Could not parse payload into json: "),
                  f"boto3 {kind} with a payload {what}: 400 InvalidRequestContentException ({got})")
    status, headers, body = raw_post(
        server, "/2021-11-15/functions/strict/response-streaming-invocations", b"{nope")
    check(status == 400 and headers.get("x-amzn-errortype") == "InvalidRequestContentException"
          and json.loads(body)["Type"] == "User",
          f"InvokeWithResponseStream with a payload not JSON: 400 ({status} {headers} {body})")
    # AWS CLI v2 reads --payload as base64 unless told otherwise; v1 sends it as it is.
    version = subprocess.run(["aws", "--version"], capture_output=True, text=True)
    raw = (["--cli-binary-format", "raw-in-base64-out"]
           if (version.stdout + version.stderr).startswith("aws-cli/2") else [])
    r = server.cli("invoke", "--function-name", "strict", *raw, "--payload", "{oops",
                   os.path.join(server.scratch, "o.json"))
    check(r.returncode != 0 and "InvalidRequestContentException" in r.stderr
          and "Could not parse request body into json" in r.stderr,
          f"aws lambda invoke with a payload not JSON: InvalidRequestContentException ({r.stderr})")
    check(metric(server, "cold_starts", "strict") == 0
          and metric(server, "invocations", "strict") == 0
          and "START" not in server.log("strict")
          and not os.listdir(os.path.join(server.state, "envs")),
          "no environment was started or touched for any of them")
    r = lam.invoke(FunctionName="strict")
    check(json.loads(r["Payload"].read()) == {"version": 1, "event": {}},
          "boto3 invoke without a payload: the function gets {}")
    out = os.path.join(server.scratch, "empty.json")
    r = server.cli("invoke", "--function-name", "strict", out)
    check(r.returncode == 0 and json.load(open(out)) == {"version": 1, "event": {}},
          f"aws lambda invoke without --payload: the function gets {{}} ({r.stderr})")
    check(metric(server, "cold_starts", "strict") == 1, "only then did an environment start")


def run_function_urls(server, lam):
    lam.create_function(FunctionName="web", Runtime="python3.12", Role=ROLE,
                        Handler="app.handler", Code={"ZipFile": zipped(**{"app.py": APP_WEB})})
    r = server.cli("create-function-url-config", "--function-name", "web", "--auth-type", "NONE")
    check(r.returncode == 0, f"aws lambda create-function-url-config ({r.stderr})")
    created = json.loads(r.stdout)
    url = created["FunctionUrl"]
    check(re.fullmatch(r"http://127\.0\.0\.1:\d+/", url) and created["AuthType"] == "NONE"
          and created["FunctionArn"].endswith(":function:web") and "CreationTime" in created
          and created["InvokeMode"] == "BUFFERED",
          f"its answer names the real local URL ({created})")
    got = get_url(url + "hello/there?x=1")
    check(got == (200, {"path": "/hello/there", "query": {"x": "1"}}),
          f"the URL serves the function at once ({got})")
    conf = lam.get_function_url_config(FunctionName="web")
    check(conf["FunctionUrl"] == url and "LastModifiedTime" in conf,
          "GetFunctionUrlConfig answers the same URL")
    cases = [
        ("a second URL", "ResourceConflictException",
         lambda: lam.create_function_url_config(FunctionName="web", AuthType="NONE")),
        ("AuthType AWS_IAM", "InvalidParameterValueException",
         lambda: lam.create_function_url_config(FunctionName="strict", AuthType="AWS_IAM")),
        ("the URL of a function without one", "ResourceNotFoundException",
         lambda: lam.get_function_url_config(FunctionName="strict")),
        ("the URL of a missing function", "ResourceNotFoundException",
         lambda: lam.create_function_url_config(FunctionName="nope", AuthType="NONE")),
        ("a URL for a version", "InvalidParameterValueException",
         lambda: lam.create_function_url_config(FunctionName="web", AuthType="NONE",
                                                Qualifier="1")),
    ]
    for what, want_type, call in cases:
        got = error_type(call)
        check(got == want_type, f"{what}: {want_type} (got {got})")
    try:
        lam.create_function_url_config(FunctionName="strict", AuthType="AWS_IAM")
    except botocore.exceptions.ClientError as e:
        check("SigV4" in e.response["Error"]["Message"], "AWS_IAM's refusal says why")
    cors = {"AllowOrigins": ["https://example.com"], "AllowMethods": ["GET"]}
    updated = lam.update_function_url_config(FunctionName="web", Cors=cors)
    check(updated["Cors"] == cors and updated["FunctionUrl"] == url,
          "UpdateFunctionUrlConfig keeps the URL and records Cors")
    listed = lam.list_function_url_configs(FunctionName="web")["FunctionUrlConfigs"]
    check([c["FunctionUrl"] for c in listed] == [url], "ListFunctionUrlConfigs")
    r = server.cli("list-function-url-configs", "--function-name", "strict")
    check(r.returncode == 0 and json.loads(r.stdout)["FunctionUrlConfigs"] == [],
          "aws lambda list-function-url-configs of a function without one: none")

    server.stop()
    server.start()
    lam = server.client()
    check(lam.get_function_url_config(FunctionName="web")["FunctionUrl"] == url,
          "after a restart the URL is the same")
    got = get_url(url + "again")
    check(got == (200, {"path": "/again", "query": None}),
          f"and serves the function again ({got})")

    r = server.cli("delete-function-url-config", "--function-name", "web")
    check(r.returncode == 0, f"aws lambda delete-function-url-config ({r.stderr})")
    check(get_url(url) is None, "the deleted URL no longer answers")
    check(error_type(lambda: lam.get_function_url_config(FunctionName="web"))
          == "ResourceNotFoundException", "a deleted URL config is ResourceNotFoundException")
    again = lam.create_function_url_config(FunctionName="web", AuthType="NONE")["FunctionUrl"]
    check(get_url(again + "x")[0] == 200, "a URL made again answers")
    lam.delete_function(FunctionName="web")
    check(get_url(again) is None, "a deleted function's URL no longer answers")


def layer_zip(message, **extra):
    return zipped(**{"python/greeting/__init__.py": f"MESSAGE = {message!r}\n", **extra})


def run_layers(server, lam):
    path = os.path.join(server.scratch, "layer.zip")
    open(path, "wb").write(layer_zip("from layer 1"))
    r = server.cli("publish-layer-version", "--layer-name", "greet", "--zip-file", f"fileb://{path}",
                   "--compatible-runtimes", "python3.12", "--description", "first")
    check(r.returncode == 0, f"aws lambda publish-layer-version ({r.stderr})")
    v1 = json.loads(r.stdout)
    check(v1["Version"] == 1 and v1["LayerVersionArn"] == v1["LayerArn"] + ":1"
          and v1["LayerArn"].endswith(":layer:greet")
          and v1["Content"]["CodeSize"] == len(layer_zip("from layer 1"))
          and v1["CompatibleRuntimes"] == ["python3.12"],
          f"the layer's first version ({v1})")
    v2 = lam.publish_layer_version(LayerName="greet", Content={"ZipFile": layer_zip("from layer 2")},
                                   CompatibleRuntimes=["python3.12"])
    check(v2["Version"] == 2, "the next version is 2")
    got = lam.get_layer_version(LayerName="greet", VersionNumber=1)
    check(got["Description"] == "first" and got["LayerVersionArn"] == v1["LayerVersionArn"],
          "GetLayerVersion")
    got = lam.get_layer_version_by_arn(Arn=v2["LayerVersionArn"])
    check(got["Version"] == 2, "GetLayerVersionByArn")
    layers = lam.list_layers()["Layers"]
    check([(l["LayerName"], l["LatestMatchingVersion"]["Version"]) for l in layers] == [("greet", 2)],
          f"ListLayers shows each layer's newest version ({layers})")
    versions = lam.list_layer_versions(LayerName="greet")["LayerVersions"]
    check([v["Version"] for v in versions] == [2, 1], "ListLayerVersions, newest first")
    check(lam.list_layers(CompatibleRuntime="nodejs22.x")["Layers"] == [],
          "ListLayers by another runtime: none")
    cases = [
        ("a layer zip with a path out of /opt", "InvalidParameterValueException",
         lambda: lam.publish_layer_version(
             LayerName="bad", Content={"ZipFile": layer_zip("x", **{"../escape": "x"})})),
        ("a layer that is not a zip", "InvalidParameterValueException",
         lambda: lam.publish_layer_version(LayerName="bad", Content={"ZipFile": b"nope"})),
        ("a layer version that does not exist", "ResourceNotFoundException",
         lambda: lam.get_layer_version(LayerName="greet", VersionNumber=9)),
        ("a function with a layer that does not exist", "InvalidParameterValueException",
         lambda: lam.create_function(FunctionName="nl", Runtime="python3.12", Role=ROLE,
                                     Handler="app.handler", Layers=[v1["LayerArn"] + ":9"],
                                     Code={"ZipFile": zipped(**{"app.py": APP_LAYERED})})),
    ]
    for what, want_type, call in cases:
        got = error_type(call)
        check(got == want_type, f"{what}: {want_type} (got {got})")
    check(error_type(lambda: lam.get_layer_version(LayerName="bad", VersionNumber=1))
          == "ResourceNotFoundException", "a refused layer was not kept")

    app = os.path.join(server.scratch, "layered.zip")
    open(app, "wb").write(zipped(**{"app.py": APP_LAYERED}))
    r = server.cli("create-function", "--function-name", "layered", "--runtime", "python3.12",
                   "--role", ROLE, "--handler", "app.handler", "--zip-file", f"fileb://{app}",
                   "--layers", v1["LayerVersionArn"])
    check(r.returncode == 0 and json.loads(r.stdout)["Layers"][0]["Arn"] == v1["LayerVersionArn"],
          f"aws lambda create-function --layers ({r.stderr})")
    _, body = invoke_json(lam, "layered", {})
    check(body["greeting"] == "from layer 1" and body["from"].startswith("/opt/python/"),
          f"the function imports the layer's package from /opt/python ({body})")
    lam.update_function_configuration(FunctionName="layered", Layers=[v2["LayerVersionArn"]])
    lam.get_waiter("function_updated_v2").wait(FunctionName="layered")
    _, body = invoke_json(lam, "layered", {})
    check(body["greeting"] == "from layer 2", f"UpdateFunctionConfiguration's Layers ({body})")
    lam.delete_layer_version(LayerName="greet", VersionNumber=2)
    check([v["Version"] for v in lam.list_layer_versions(LayerName="greet")["LayerVersions"]] == [1],
          "DeleteLayerVersion")
    server.stop()
    server.start()
    lam = server.client()
    _, body = invoke_json(lam, "layered", {})
    check(body["greeting"] == "from layer 2",
          f"a deleted version stays with the function that uses it, across a restart ({body})")
    conf = lam.get_function_configuration(FunctionName="layered")
    check(conf["Layers"] == [{"Arn": v2["LayerVersionArn"], "CodeSize": v2["Content"]["CodeSize"]}],
          "GetFunctionConfiguration lists its layers")
    lam.update_function_configuration(FunctionName="layered", Layers=[])
    lam.delete_layer_version(LayerName="greet", VersionNumber=1)
    kept = os.listdir(os.path.join(server.state, "code"))
    layer_files = {hashlib.sha256(layer_zip(f"from layer {n}")).hexdigest() + ".zip" for n in (1, 2)}
    check(not layer_files & set(kept), f"unused layer zips left the code store ({kept})")
    v3 = lam.publish_layer_version(LayerName="greet", Content={"ZipFile": layer_zip("3")})
    check(v3["Version"] == 3, "a layer's version numbers are never reused")


def metrics(server):
    return urllib.request.urlopen(f"http://{server.addr}/metrics").read().decode()


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
    # Two environments, 50 ms an event: they run about three times slower than boto3 queues
    # them here, so the kill finds most still queued (1,000 take about 50 s in all on two
    # cores, in the sandbox).
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
        event = {"n": n, "sleep": 0.05, "fail": n in failing}
        r = lam.invoke(FunctionName="worker", InvocationType="Event",
                       Payload=json.dumps(event).encode())
        assert r["StatusCode"] == 202, r
        ids[r["ResponseMetadata"]["RequestId"]] = n
    check(len(ids) == events, f"{events} events accepted in {time.time() - started:.1f} s")
    gauges = dict(re.findall(r'^(kindling_event_queue_\w+)\{function="worker"\} (\S+)$',
                             metrics(server), re.M))
    check(float(gauges.get("kindling_event_queue_depth", 0)) > 0
          and float(gauges.get("kindling_event_queue_oldest_age_seconds", -1)) >= 0,
          f"/metrics shows the queue's depth and its oldest event's age ({gauges})")
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
    failed_ns = {ids[r["requestContext"]["requestId"]] for r in failed}
    unlike_lambda = [r for r in failed
                     if not (r["requestContext"]["condition"] == "RetriesExhausted"
                             and r["requestContext"]["approximateInvokeCount"] == 3
                             and r["requestPayload"]["fail"] is True
                             and r["responseContext"]["functionError"] == "Unhandled"
                             and r["responsePayload"]["errorType"] == "ValueError")]
    check(failed_ns == failing and not unlike_lambda,
          f"the {len(failing)} failing events were tried 3 times and reached the on-failure "
          f"destination with Lambda's record (missing {sorted(failing - failed_ns)[:5]}, "
          f"unexpected {sorted(failed_ns - failing)[:5]}, "
          f"{len(unlike_lambda)} unlike Lambda's: {unlike_lambda[:2]})")
    check(all(r["requestContext"]["condition"] == "Success"
              and r["responsePayload"]["n"] == ids[r["requestContext"]["requestId"]]
              and r["responsePayload"]["request_id"] == r["requestContext"]["requestId"]
              for r in done),
          "every success record carries the event's request id and its answer")
    starts = collections.Counter(re.findall(r"START RequestId: (\S+)", server.log("worker")))
    check(all(starts[i] >= 3 for i, n in ids.items() if n in failing),
          "each failing event started at least 3 times")
    scraped = metrics(server)
    check('kindling_event_queue_depth{function="worker"}' not in scraped,
          "the queue is empty in /metrics")
    retries = re.search(r'^kindling_event_retries_total\{function="worker"\} (\S+)$', scraped,
                        re.M)
    check(retries and float(retries.group(1)) > 0,
          f"/metrics counts the retries since the restart ({retries and retries.group(1)})")
    server.stop()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kindling", required=True)
    p.add_argument("--scratch", required=True)
    p.add_argument("scenario", choices=["api", "http", "durability"])
    p.add_argument("--events", type=int, default=1000)
    a = p.parse_args()
    shutil.rmtree(a.scratch, ignore_errors=True)
    os.makedirs(a.scratch)
    if a.scenario == "api":
        scenario_api(a.kindling, a.scratch)
    elif a.scenario == "http":
        scenario_http(a.kindling, a.scratch)
    else:
        scenario_durability(a.kindling, a.scratch, a.events)
    print("PASSED", flush=True)


if __name__ == "__main__":
    sys.exit(main())
