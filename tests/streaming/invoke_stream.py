"""Invokes a function with boto3's `invoke_with_response_stream`, unmodified, and prints
one JSON line per event as it arrives, stamped with the seconds since the call began:

    {"t": 0.01, "event": "head", "status": 200, "content_type": ..., "version": ...}
    {"t": 0.02, "event": "PayloadChunk", "size": 6, "data": "<base64>"}
    {"t": 1.03, "event": "InvokeComplete", "ErrorCode": ..., "ErrorDetails": ..., "LogResult": ...}

Usage: invoke_stream.py ENDPOINT FUNCTION PAYLOAD [LOG_TYPE]
(tests/sandbox_e2e/streaming.rs runs it)."""
import base64
import json
import sys
import time

import boto3
from botocore.config import Config

endpoint, function, payload = sys.argv[1:4]
client = boto3.client(
    "lambda",
    endpoint_url=endpoint,
    region_name="us-east-1",
    aws_access_key_id="x",
    aws_secret_access_key="x",
    config=Config(retries={"max_attempts": 0}, read_timeout=60),
)
extra = {"LogType": sys.argv[4]} if len(sys.argv) > 4 else {}
start = time.monotonic()
response = client.invoke_with_response_stream(
    FunctionName=function, Payload=payload.encode(), **extra
)


def emit(**fields):
    print(json.dumps({"t": time.monotonic() - start, **fields}), flush=True)


emit(
    event="head",
    status=response["StatusCode"],
    content_type=response.get("ResponseStreamContentType"),
    version=response.get("ExecutedVersion"),
)
for event in response["EventStream"]:
    if "PayloadChunk" in event:
        data = event["PayloadChunk"]["Payload"]
        emit(event="PayloadChunk", size=len(data), data=base64.b64encode(data).decode())
    elif "InvokeComplete" in event:
        emit(event="InvokeComplete", **event["InvokeComplete"])
    else:
        emit(event="other", keys=sorted(event))
