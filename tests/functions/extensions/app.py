"""The function of the extensions tests (tests/sandbox_e2e/extensions.rs): logs a line,
says when it ran and whether a wrapper script started its runtime."""

import os
import sys
import time


def handler(event, context):
    print(f"function line of {context.aws_request_id}")
    if event.get("print_mb"):
        chunk = "f" * 1023
        for _ in range(event["print_mb"] * 1024):
            print(chunk)
    return {
        "at": time.time(),
        "wrapped_by": os.environ.get("WRAPPED_BY"),
        "argv0": sys.argv[0],
    }
