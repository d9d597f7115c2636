"""Handlers that each exercise one path of the Invoke API in the end-to-end tests
(tests/sandbox_e2e.rs); each function of a generated functions.toml names one.

Answers carry `stream`, the log stream name, which names the execution environment:
that is how the tests see which environment served a request."""
import os
import sys
import time

# What was imported before this module: the runtime's own imports, and the interpreter's.
IMPORTED_AT_START = sorted(
    m for m in ("socket", "selectors", "importlib", "http.client", "logging") if m in sys.modules
)


def runtime_start(event, context):
    """How the runtime started: from the image's compiled copy (a checked-hash .pyc that
    matches its source), with which of the modules it avoids imported."""
    import importlib.util  # after the look at sys.modules

    runtime = sys.modules["kindling_runtime"]
    with open(runtime.__file__, "rb") as f:
        source = f.read()
    with open(runtime.__cached__, "rb") as f:
        header = f.read(16)
    return {
        "cached": runtime.__cached__,
        "checked_hash": int.from_bytes(header[4:8], "little") == 0b11,
        "matches_source": header[8:16] == importlib.util.source_hash(source),
        "imported": IMPORTED_AT_START,
    }


def whoami(context):
    return {"stream": context.log_stream_name, "pid": os.getpid()}


def echo(event, context):
    """Answers with the event's id, so that concurrent callers can check each got the
    answer to its own request; `sleep` (seconds) keeps the environment busy a while."""
    time.sleep(event.get("sleep", 0))
    print(f"echo {event.get('id')}")
    return {"id": event.get("id"), "request_id": context.aws_request_id, **whoami(context)}


def raises(event, context):
    raise ValueError(f"bad input: {event.get('why', 'none given')}")


def exits(event, context):
    """Ends the runtime's process mid-invocation, as a crash would; `{"exit": false}`
    answers normally instead."""
    if event.get("exit", True):
        os._exit(3)
    return {"survived": True, **whoami(context)}


def sleeps(event, context):
    """Sleeps `seconds` (default: far past any test's timeout), holding `hold_mib` MiB
    (default none) meanwhile."""
    seconds = event.get("seconds", 60)
    held = bytearray(event.get("hold_mib", 0) << 20)
    time.sleep(seconds)
    del held
    return {"slept": seconds, **whoami(context)}


def big(event, context):
    """Returns a string of `mib` MiB: 7 by default, over the 6 MiB response limit."""
    return "x" * (event.get("mib", 7) << 20)


def hog(event, context):
    """Allocates `mib` MiB (default 512), far past a 128 MB function's memory."""
    block = bytearray(event.get("mib", 512) << 20)
    return {"held": len(block)}


def raw_bytes(event, context):
    """Returns bytes, which Lambda's Python runtime sends as they are."""
    return b"\x00raw\xff" + event.get("tail", "").encode()


def caller(event, context):
    """What the context says of the caller: awslambdaric's identity and client context."""
    identity, cc = context.identity, context.client_context
    return {
        "identity": [type(identity).__name__, identity.cognito_identity_id,
                     identity.cognito_identity_pool_id],
        "client_context": None if cc is None else {"custom": cc.custom, "env": cc.env},
    }


def http_echo(event, context):
    """A function URL's handler: answers with the event it got (status 200, JSON) and a
    header and a cookie of its own; `?status=N` picks the status."""
    import json

    status = int((event.get("queryStringParameters") or {}).get("status", "200"))
    return {
        "statusCode": status,
        "headers": {"content-type": "application/json", "x-echo": "yes"},
        "cookies": ["seen=1; Path=/"],
        "body": json.dumps(event),
    }


def rest_echo(event, context):
    """An API Gateway REST (payload format 1.0) handler: answers with the event it got, a
    header, two cookies through `multiValueHeaders`, and `?status=N`'s status."""
    import json

    status = int((event.get("queryStringParameters") or {}).get("status", "200"))
    return {
        "statusCode": status,
        "headers": {"content-type": "application/json", "x-echo": "rest"},
        "multiValueHeaders": {"set-cookie": ["a=1; Path=/", "b=2; Path=/"]},
        "body": json.dumps(event),
        "isBase64Encoded": False,
    }


def http_bare(event, context):
    """A function URL's handler that returns no status: a plain value."""
    return {"bare": event["rawPath"]}


class _Deeper:
    """`cases.nested.deeper.handler`: a handler reached through attributes."""

    @staticmethod
    def handler(event, context):
        return {"nested": event}


class _Nested:
    deeper = _Deeper()


nested = _Nested()
