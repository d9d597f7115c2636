// Invokes a function with the AWS SDK for JavaScript v3's `InvokeWithResponseStreamCommand`,
// unmodified, and prints one JSON line per event as it arrives, stamped with the seconds
// since the call began, in the format of invoke_stream.py (boto3's twin):
//
//     {"t": 0.01, "event": "head", "status": 200, "content_type": ..., "version": ...}
//     {"t": 0.02, "event": "PayloadChunk", "size": 6, "data": "<base64>"}
//     {"t": 1.03, "event": "InvokeComplete", "ErrorCode": ..., "ErrorDetails": ..., "LogResult": ...}
//
// Usage: node invoke_stream.cjs ENDPOINT FUNCTION PAYLOAD [LOG_TYPE]
// The SDK is where scripts/setup.sh installs it ($KINDLING_JS_SDK, /opt/kindling-js-sdk);
// tests/sandbox_e2e/streaming.rs runs this.
"use strict";
const path = require("path");
const sdkDir = process.env.KINDLING_JS_SDK || "/opt/kindling-js-sdk";
const {
  LambdaClient,
  InvokeWithResponseStreamCommand,
} = require(path.join(sdkDir, "node_modules", "@aws-sdk", "client-lambda"));

const [endpoint, functionName, payload, logType] = process.argv.slice(2);
const client = new LambdaClient({
  endpoint,
  region: "us-east-1",
  credentials: { accessKeyId: "x", secretAccessKey: "x" },
  maxAttempts: 1,
});
const start = process.hrtime.bigint();
const emit = (fields) => {
  const t = Number(process.hrtime.bigint() - start) / 1e9;
  process.stdout.write(JSON.stringify({ t, ...fields }) + "\n");
};

(async () => {
  const response = await client.send(
    new InvokeWithResponseStreamCommand({
      FunctionName: functionName,
      Payload: Buffer.from(payload),
      ...(logType ? { LogType: logType } : {}),
    }),
  );
  emit({
    event: "head",
    status: response.StatusCode,
    content_type: response.ResponseStreamContentType,
    version: response.ExecutedVersion,
  });
  for await (const event of response.EventStream) {
    if (event.PayloadChunk) {
      const data = Buffer.from(event.PayloadChunk.Payload ?? []);
      emit({ event: "PayloadChunk", size: data.length, data: data.toString("base64") });
    } else if (event.InvokeComplete) {
      emit({ event: "InvokeComplete", ...event.InvokeComplete });
    } else {
      emit({ event: "unknown", keys: Object.keys(event) });
    }
  }
})().catch((e) => {
  process.stderr.write(`${e.name}: ${e.message}\n`);
  process.exit(1);
});
