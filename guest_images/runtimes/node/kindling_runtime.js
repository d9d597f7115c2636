// Kindling's Node.js runtime (Node 18+, core modules only), behaving as AWS's Node.js
// runtime interface client does.
//
// Loads `_HANDLER` (`[dir/]file.export[.deeper]`, the file found under LAMBDA_TASK_ROOT as
// .js, .cjs or .mjs, the export found by walking the properties after the file's name),
// then loops over the Lambda Runtime API at AWS_LAMBDA_RUNTIME_API: fetch an event, call
// the handler (async, or with a callback that honours callbackWaitsForEmptyEventLoop),
// post its JSON result or its error as {errorType, errorMessage, trace}. Console lines
// carry Lambda's `<ISO time>\t<request id>\t<LEVEL>\t` prefix. The `awslambda` global
// offers streamifyResponse and HttpResponseStream: a streaming handler's writes are
// streamed to the Runtime API as they are made (response streaming). ES modules find
// packages in NODE_PATH's node_modules folders (the layers'), as Lambda's Node.js 18+ do.
// Failures while loading the handler go to /runtime/init/error, after which the process
// exits, as the Runtime API asks.
'use strict';

const fs = require('fs');
const http = require('http');
const Module = require('module');
const path = require('path');
const { Writable } = require('stream');
const { pathToFileURL } = require('url');
const util = require('util');

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
    console.error(`POST ${urlPath}: ${res.status} ${res.body}`);
  }
}

// The request id in flight, for the console's prefix: `undefined` outside an invocation,
// as Lambda prints it.
let currentRequestId;

// console.* write `<ISO time>\t<request id>\t<LEVEL>\t<message>` lines to stdout, as
// Lambda's runtime does (console.log is INFO; console.trace prints no stack).
function patchConsole() {
  const line = (level) => (message, ...params) => {
    process.stdout.write(
      `${new Date().toISOString()}\t${currentRequestId}\t${level}\t${util.format(message, ...params)}\n`,
    );
  };
  for (const [method, level] of [
    ['trace', 'TRACE'],
    ['debug', 'DEBUG'],
    ['info', 'INFO'],
    ['log', 'INFO'],
    ['warn', 'WARN'],
    ['error', 'ERROR'],
    ['fatal', 'FATAL'],
  ]) {
    console[method] = line(level);
  }
}

// The error JSON Lambda's Node.js runtime posts: the stack, first line included, as
// `trace`; anything thrown that is not an Error is named by its type.
function errorBody(err) {
  if (util.types.isNativeError(err) || (err && typeof err.stack === 'string' && typeof err.name === 'string')) {
    return { errorType: err.name, errorMessage: err.message, trace: err.stack.split('\n') };
  }
  return { errorType: typeof err, errorMessage: String(err), trace: [] };
}

// How Lambda logs a failure: `<what> \t{"errorType",...}` on an ERROR line.
function logError(what, err) {
  let formatted;
  try {
    formatted = JSON.stringify(err instanceof Error
      ? { errorType: err.name, errorMessage: err.message, code: err.code, ...err, stack: err.stack.split('\n') }
      : err);
  } catch {
    formatted = JSON.stringify(errorBody(err));
  }
  console.error(what, `\t${formatted}`);
}

class TypedError extends Error {
  constructor(errorType, message) {
    super(message);
    this.name = errorType;
  }
}

// What streamifyResponse marks, under the symbols AWS's runtime uses.
const HANDLER_STREAMING = Symbol.for('aws.lambda.runtime.handler.streaming');
const HANDLER_HIGHWATERMARK = Symbol.for('aws.lambda.runtime.handler.streaming.highWaterMark');

// A streamifyResponse handler's response stream: a streamed POST to /response
// (`Lambda-Runtime-Function-Response-Mode: streaming`, chunked), each write sent as it is
// made; a write completes once the bytes are on their way, so a slow caller holds the
// handler back instead of filling memory. The content type can change until the first
// write; a failure ends the body with the error trailers.
class ResponseStream extends Writable {
  constructor(id, options) {
    super(options);
    this.started = false;
    // Set by HttpResponseStream.from: writes the prelude before the first byte.
    this._onBeforeFirstWrite = null;
    this.answered = new Promise((resolve, reject) => {
      this.request = http.request(
        {
          host: apiHost,
          port: apiPort,
          method: 'POST',
          path: `${API_PREFIX}/invocation/${id}/response`,
          agent,
          headers: {
            'Content-Type': 'application/octet-stream',
            'Lambda-Runtime-Function-Response-Mode': 'streaming',
            'Transfer-Encoding': 'chunked',
            Trailer: 'Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body',
          },
        },
        (res) => {
          const chunks = [];
          res.on('data', (c) => chunks.push(c));
          res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks) }));
          res.on('error', reject);
        },
      );
      this.request.on('error', reject);
    });
  }

  setContentType(contentType) {
    if (this.started) throw new Error('Tried to set the content type after the stream started.');
    this.request.setHeader('Content-Type', contentType);
  }

  // The first bytes: the prelude of HttpResponseStream.from goes before them.
  start() {
    if (this.started) return;
    this.started = true;
    if (this._onBeforeFirstWrite) {
      const before = this._onBeforeFirstWrite;
      this._onBeforeFirstWrite = null;
      before((c) => this.request.write(c));
    }
  }

  _write(chunk, encoding, done) {
    this.start();
    this.request.write(chunk, encoding, done);
  }

  _final(done) {
    this.start();
    this.request.end(done);
  }

  // Ends the body with the error as its trailers (what was written stays sent); too late
  // once the body has ended.
  fail(error) {
    if (this.request.writableEnded) return;
    this.started = true;
    this.request.addTrailers({
      'Lambda-Runtime-Function-Error-Type': error.errorType,
      'Lambda-Runtime-Function-Error-Body': Buffer.from(JSON.stringify(error)).toString('base64'),
    });
    this.request.end();
  }
}

// The `awslambda` global of Lambda's Node.js runtime.
globalThis.awslambda = {
  streamifyResponse(handler, options) {
    handler[HANDLER_STREAMING] = 'response';
    if (typeof options?.highWaterMark === 'number') handler[HANDLER_HIGHWATERMARK] = options.highWaterMark;
    return handler;
  },
  HttpResponseStream: class HttpResponseStream {
    static from(stream, prelude) {
      stream.setContentType('application/vnd.awslambda.http-integration-response');
      const metadata = JSON.stringify(prelude);
      stream._onBeforeFirstWrite = (write) => {
        write(metadata);
        write(new Uint8Array(8));
      };
      return stream;
    }
  },
};

async function loadHandler(spec, taskRoot) {
  if (spec.includes('..')) {
    throw new TypedError('Runtime.MalformedHandlerName',
      `'${spec}' is not a valid handler name. Use absolute paths when specifying root directories in handler names.`);
  }
  // As Lambda splits it: the directory, then the file up to the first dot, then the
  // property path (`app.nested.deep`: file app, property nested.deep).
  const base = path.basename(spec);
  const dot = base.indexOf('.');
  if (dot <= 0 || dot === base.length - 1) {
    throw new TypedError('Runtime.MalformedHandlerName', 'Bad handler');
  }
  const moduleName = base.slice(0, dot);
  const modulePath = path.resolve(taskRoot, path.dirname(spec), moduleName);
  const file = ['.js', '.cjs', '.mjs'].map((ext) => modulePath + ext).find((f) => fs.existsSync(f));
  if (!file) {
    throw new TypedError('Runtime.ImportModuleError', `Error: Cannot find module '${moduleName}'`);
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
  const handler = base.slice(dot + 1).split('.').reduce((obj, key) => obj && obj[key], mod);
  if (!handler) throw new TypedError('Runtime.HandlerNotFound', `${spec} is undefined or not exported`);
  if (typeof handler !== 'function') throw new TypedError('Runtime.HandlerNotFound', `${spec} is not a function`);
  return handler;
}

// Node's ES module loader ignores NODE_PATH; Lambda's runtime searches it for ES modules
// too, so a handler can `import` a layer's package from /opt/nodejs/node_modules. A bare
// specifier that the usual lookup (the code's own node_modules first) cannot find is
// looked up again from each NODE_PATH folder named node_modules that holds its package,
// with Node's own resolver (package.json `exports`, the `import` condition).
function searchNodePathForModules() {
  if (typeof Module.registerHooks !== 'function') return; // Node < 22.15: not offered
  const folders = (process.env.NODE_PATH || '')
    .split(':')
    .filter((dir) => path.isAbsolute(dir) && path.basename(dir) === 'node_modules')
    .filter((dir) => fs.existsSync(dir));
  if (folders.length === 0) return; // no layer brings packages: nothing to hook
  Module.registerHooks({
    resolve(specifier, context, nextResolve) {
      try {
        return nextResolve(specifier, context);
      } catch (e) {
        // Relative, absolute and URL specifiers (file:, node:, data:) are not packages.
        if (e.code !== 'ERR_MODULE_NOT_FOUND' || /^[./]|^[a-z][a-z0-9+.-]*:/i.test(specifier)) throw e;
        const parts = specifier.split('/');
        const name = specifier.startsWith('@') ? parts.slice(0, 2).join('/') : parts[0];
        const folder = folders.find((dir) => fs.existsSync(path.join(dir, name)));
        if (!folder) throw e;
        // As if imported by a module beside the folder: Node looks in its node_modules.
        const parentURL = pathToFileURL(path.join(path.dirname(folder), 'index.mjs')).href;
        return nextResolve(specifier, { ...context, parentURL });
      }
    },
  });
}

function parseJsonHeader(value) {
  if (!value) return undefined;
  try {
    return JSON.parse(value);
  } catch {
    return undefined;
  }
}

function makeContext(headers) {
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
    getRemainingTimeInMillis: () => Math.max(0, deadline - Date.now()),
  };
}

// Runs `onEmpty` once the event loop has nothing left to do (Node's 'beforeExit'), unless
// it is replaced or cleared before.
const whenIdle = {
  listener: null,
  set(onEmpty) {
    this.clear();
    this.listener = onEmpty;
    process.once('beforeExit', onEmpty);
  },
  clear() {
    if (this.listener) process.removeListener('beforeExit', this.listener);
    this.listener = null;
  },
};

// Runs one invocation of an ordinary handler; resolves with its result or rejects with
// its error. As in Lambda's runtime: a promise's outcome is posted at once; a callback's
// result once the event loop is empty unless context.callbackWaitsForEmptyEventLoop is
// false (its error at once); a handler that never answers gets null when the loop empties
// (an async one: Runtime.NodeJsExit); only the first answer counts.
function callHandler(handler, event, context) {
  return new Promise((resolve, reject) => {
    let finished = false;
    const finish = (err, result) => {
      if (finished) return;
      finished = true;
      whenIdle.clear();
      if (err !== null && err !== undefined) reject(err);
      else resolve(result);
    };
    let waitForEmptyEventLoop = true;
    Object.defineProperty(context, 'callbackWaitsForEmptyEventLoop', {
      get: () => waitForEmptyEventLoop,
      set: (value) => { waitForEmptyEventLoop = value; },
      enumerable: true,
    });
    context.done = finish;
    context.succeed = (result) => finish(null, result);
    context.fail = (err) => finish(err ?? 'handled');
    const callback = (err, result) => {
      if (finished) return;
      if ((err !== null && err !== undefined) || !waitForEmptyEventLoop) finish(err, result);
      else whenIdle.set(() => setImmediate(() => finish(null, result)));
    };
    const isAsync = handler.constructor && handler.constructor.name === 'AsyncFunction';
    whenIdle.set(() => finish(isAsync ? new TypedError('Runtime.NodeJsExit',
      'The Lambda runtime client detected an unexpected Node.js exit code. This is most commonly caused by a Promise that was never settled.') : null, null));
    try {
      const returned = handler(event, context, callback);
      if (returned && typeof returned.then === 'function') {
        returned.then((r) => finish(null, r), (e) => finish(e ?? new Error('rejected')));
      }
    } catch (e) {
      finish(e);
    }
  });
}

// Runs one invocation of a streamifyResponse handler: its stream goes to the Runtime API
// as it writes. Resolves once the host has the whole response (or the error, sent as
// the stream's trailers).
async function callStreamingHandler(handler, event, context, id) {
  const hwm = handler[HANDLER_HIGHWATERMARK];
  const stream = new ResponseStream(id, typeof hwm === 'number' ? { highWaterMark: hwm } : undefined);
  const ended = new Promise((resolve, reject) => {
    stream.on('finish', resolve);
    stream.on('error', reject);
  });
  ended.catch(() => {}); // awaited only when the handler left the stream ending
  try {
    const returned = handler(event, stream, context);
    if (!returned || typeof returned.then !== 'function') {
      throw new TypedError('Runtime.MalformedStreamingHandler', 'Streaming does not support non-async handlers.');
    }
    const result = await returned;
    if (result !== undefined) console.warn('Streaming handlers ignore return values.');
    if (!stream.writableFinished) {
      if (!stream.writableEnded) throw new TypedError('Runtime.InvalidStreamingOperation', 'Response stream is not finished.');
      await ended;
    }
  } catch (e) {
    logError('Invoke Error', e);
    stream.fail(errorBody(e));
  }
  const answer = await stream.answered;
  if (answer.status >= 300) console.error(`POST /invocation/${id}/response: ${answer.status} ${answer.body}`);
}

async function invoke(handler, res) {
  const id = res.headers['lambda-runtime-aws-request-id'];
  const traceId = res.headers['lambda-runtime-trace-id'];
  if (traceId) process.env._X_AMZN_TRACE_ID = traceId;
  else delete process.env._X_AMZN_TRACE_ID;
  currentRequestId = id;
  let response;
  try {
    let event;
    try {
      event = res.body.length ? JSON.parse(res.body.toString()) : null;
    } catch (e) {
      throw new TypedError('Runtime.UnmarshalError', `Unable to unmarshal input: ${e.message}`);
    }
    const context = makeContext(res.headers);
    if (handler[HANDLER_STREAMING] === 'response') {
      await callStreamingHandler(handler, event, context, id);
      return;
    }
    const result = await callHandler(handler, event, context);
    response = { body: JSON.stringify(result === undefined ? null : result), contentType: 'application/json' };
  } catch (e) {
    logError('Invoke Error', e);
    const error = errorBody(e);
    await post(`/invocation/${id}/error`, JSON.stringify(error), {
      'Lambda-Runtime-Function-Error-Type': error.errorType,
    });
    return;
  }
  await post(`/invocation/${id}/response`, response.body, { 'Content-Type': response.contentType });
}

async function main() {
  patchConsole();
  searchNodePathForModules();
  let handler;
  try {
    handler = await loadHandler(process.env._HANDLER || '', process.env.LAMBDA_TASK_ROOT || '/var/task');
  } catch (e) {
    logError('Uncaught Exception', e);
    const error = errorBody(e);
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
  console.error(`runtime: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
