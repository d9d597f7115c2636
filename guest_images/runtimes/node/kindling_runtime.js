// Kindling's Node.js runtime (Node 18+, core modules only).
//
// Loads `_HANDLER` (`file.export`, the file found under LAMBDA_TASK_ROOT as .js, .cjs or
// .mjs), then loops over the Lambda Runtime API at AWS_LAMBDA_RUNTIME_API: fetch an
// event, call the handler (async, or with a callback), post its JSON result or its error
// as {errorMessage, errorType, stackTrace}. Failures while loading the handler go to
// /runtime/init/error, after which the process exits, as the Runtime API asks.
'use strict';

const fs = require('fs');
const http = require('http');
const path = require('path');
const { pathToFileURL } = require('url');

const API_PREFIX = '/2018-06-01/runtime';

// Assigning to the real process.env calls setenv(3), and glibc keeps every value ever set:
// with a new _X_AMZN_TRACE_ID each invocation the process would grow without bound. A
// plain copy keeps the per-invocation values in JavaScript only (child processes get it
// as their default environment all the same).
process.env = { ...process.env };

const [apiHost, apiPort] = (() => {
  const address = process.env.AWS_LAMBDA_RUNTIME_API;
  const colon = address.lastIndexOf(':');
  return [address.slice(0, colon), Number(address.slice(colon + 1))];
})();

// One keep-alive connection, without Nagle's delay.
const agent = new http.Agent({ keepAlive: true, maxSockets: 1, noDelay: true });

function request(method, urlPath, body, headers) {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host: apiHost, port: apiPort, method, path: API_PREFIX + urlPath, agent, headers },
      (res) => {
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    // end(body) sends the head and the body together.
    req.end(body);
  });
}

async function post(urlPath, body, headers) {
  const res = await request('POST', urlPath, body, {
    'Content-Type': 'application/json',
    'Content-Length': Buffer.byteLength(body),
    ...headers,
  });
  if (res.status >= 300) {
    // The host refused the result (e.g. too large): this invocation is lost, the next one
    // may still work.
    console.error(`[ERROR] POST ${urlPath}: ${res.status} ${res.body}`);
  }
}

function errorBody(err, errorType) {
  const isError = err instanceof Error;
  return {
    errorType: errorType || (isError ? err.name : typeof err === 'string' ? 'string' : 'Error'),
    errorMessage: isError ? err.message : typeof err === 'string' ? err : JSON.stringify(err),
    stackTrace: isError && err.stack ? err.stack.split('\n').slice(1).map((l) => l.trim()) : [],
  };
}

function logError(error) {
  console.error(`[ERROR] ${error.errorType}: ${error.errorMessage}\n${error.stackTrace.join('\n')}`);
}

class TypedError extends Error {
  constructor(errorType, message) {
    super(message);
    this.errorType = errorType;
  }
}

async function loadHandler(spec, taskRoot) {
  const dot = spec.lastIndexOf('.');
  if (dot <= 0 || dot === spec.length - 1) {
    throw new TypedError('Runtime.MalformedHandlerName', `Bad handler '${spec}'`);
  }
  const base = path.resolve(taskRoot, spec.slice(0, dot));
  const exportPath = spec.slice(dot + 1);
  const file = ['.js', '.cjs', '.mjs'].map((ext) => base + ext).find((f) => fs.existsSync(f));
  if (!file) {
    throw new TypedError('Runtime.ImportModuleError', `Error: Cannot find module '${spec.slice(0, dot)}'`);
  }
  let mod;
  try {
    mod = file.endsWith('.mjs') ? await import(pathToFileURL(file).href) : require(file);
  } catch (e) {
    if (e.code !== 'ERR_REQUIRE_ESM') {
      if (e instanceof SyntaxError) throw new TypedError('Runtime.UserCodeSyntaxError', `${e.name}: ${e.message}`);
      throw e;
    }
    mod = await import(pathToFileURL(file).href); // a .js file in an ES module package
  }
  const handler = exportPath.split('.').reduce((obj, key) => (obj == null ? obj : obj[key]), mod);
  if (typeof handler !== 'function') {
    throw new TypedError('Runtime.HandlerNotFound', `${spec} is undefined or not exported`);
  }
  return handler;
}

function parseJsonHeader(value) {
  if (!value) return undefined;
  try {
    return JSON.parse(value);
  } catch {
    return undefined;
  }
}

function makeContext(headers, settle) {
  const env = process.env;
  const deadline = Number(headers['lambda-runtime-deadline-ms'] || 0);
  return {
    awsRequestId: headers['lambda-runtime-aws-request-id'],
    invokedFunctionArn: headers['lambda-runtime-invoked-function-arn'],
    functionName: env.AWS_LAMBDA_FUNCTION_NAME,
    functionVersion: env.AWS_LAMBDA_FUNCTION_VERSION,
    memoryLimitInMB: env.AWS_LAMBDA_FUNCTION_MEMORY_SIZE,
    logGroupName: env.AWS_LAMBDA_LOG_GROUP_NAME,
    logStreamName: env.AWS_LAMBDA_LOG_STREAM_NAME,
    tenantId: headers['lambda-runtime-aws-tenant-id'],
    clientContext: parseJsonHeader(headers['lambda-runtime-client-context']),
    identity: parseJsonHeader(headers['lambda-runtime-cognito-identity']),
    callbackWaitsForEmptyEventLoop: true,
    getRemainingTimeInMillis: () => Math.max(0, deadline - Date.now()),
    done: (err, result) => settle(err, result),
    succeed: (result) => settle(null, result),
    fail: (err) => settle(err ?? new Error('handled')),
  };
}

// Runs one invocation; resolves with the handler's result or rejects with its error.
function callHandler(handler, event, headers) {
  return new Promise((resolve, reject) => {
    let settled = false;
    const settle = (err, result) => {
      if (settled) return;
      settled = true;
      if (err !== null && err !== undefined) reject(err);
      else resolve(result);
    };
    const context = makeContext(headers, settle);
    let returned;
    try {
      returned = handler(event, context, settle);
    } catch (e) {
      settle(e);
      return;
    }
    if (returned && typeof returned.then === 'function') {
      returned.then((r) => settle(null, r), (e) => settle(e ?? new Error('rejected')));
    } else if (handler.length < 3) {
      // A synchronous handler without a callback: its return value is the result.
      settle(null, returned);
    }
  });
}

async function invoke(handler, res) {
  const id = res.headers['lambda-runtime-aws-request-id'];
  const traceId = res.headers['lambda-runtime-trace-id'];
  if (traceId) process.env._X_AMZN_TRACE_ID = traceId;
  else delete process.env._X_AMZN_TRACE_ID;
  let payload;
  try {
    let event;
    try {
      event = res.body.length ? JSON.parse(res.body.toString()) : null;
    } catch (e) {
      throw new TypedError('Runtime.UnmarshalError', `Unable to unmarshal input: ${e.message}`);
    }
    const result = await callHandler(handler, event, res.headers);
    payload = JSON.stringify(result === undefined ? null : result);
  } catch (e) {
    const error = errorBody(e, e && e.errorType);
    logError(error);
    await post(`/invocation/${id}/error`, JSON.stringify(error), {
      'Lambda-Runtime-Function-Error-Type': error.errorType,
    });
    return;
  }
  await post(`/invocation/${id}/response`, payload, {});
}

async function main() {
  let handler;
  try {
    handler = await loadHandler(process.env._HANDLER || '', process.env.LAMBDA_TASK_ROOT || '/var/task');
  } catch (e) {
    const error = errorBody(e, e && e.errorType);
    logError(error);
    await post('/init/error', JSON.stringify(error), { 'Lambda-Runtime-Function-Error-Type': error.errorType });
    process.exit(1);
  }
  for (;;) {
    const res = await request('GET', '/invocation/next');
    if (res.status !== 200) throw new Error(`/next answered ${res.status}: ${res.body}`);
    await invoke(handler, res);
  }
}

main().catch((e) => {
  console.error(`[ERROR] runtime: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
