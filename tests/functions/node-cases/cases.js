// Handlers that each exercise one trait of Lambda's Node.js runtime, in the end-to-end
// tests (tests/sandbox_e2e/runtime_traits.rs) and behind the bare bootstrap
// (bootstrap/tests/node_runtime.rs); each function names one.
'use strict';

// One line per console method, each with Lambda's prefix.
exports.logs = async () => {
  console.log('via log %d', 1);
  console.info('via info');
  console.warn('via warn');
  console.error('via error');
  console.debug('via debug');
  console.trace('via trace');
  return 'logged';
};

exports.fails = async (event) => {
  throw new RangeError(`out of range: ${event.n}`);
};

// A callback answer with a timer still pending: Lambda answers once the timer has run,
// unless the handler says not to wait.
exports.late = (event, context, callback) => {
  if (event.noWait) context.callbackWaitsForEmptyEventLoop = false;
  setTimeout(() => console.log('timer fired'), event.ms);
  callback(null, { waits: context.callbackWaitsForEmptyEventLoop });
};

exports.nested = { deeper: { handler: async (event) => ({ nested: event }) } };

exports.streams = awslambda.streamifyResponse(async (event, responseStream) => {
  const stream = awslambda.HttpResponseStream.from(responseStream, { statusCode: 201 });
  stream.write('streamed ');
  await new Promise((r) => setTimeout(r, 5));
  stream.end(String(event.n));
});

// The Node.js release the runtime runs.
exports.version = async () => process.versions.node;
const pause = (ms) => new Promise((r) => setTimeout(r, ms));

// Streams as it goes: `first`, a pause (event.pauseMs, 1000 by default), then `second`,
// or a failure in mid-stream when event.fail.
exports.streamsSlowly = awslambda.streamifyResponse(async (event, responseStream) => {
  responseStream.setContentType('text/plain');
  responseStream.write('first\n');
  await pause(event.pauseMs ?? 1000);
  if (event.fail) throw new Error('deliberate failure in mid-stream');
  responseStream.end('second\n');
});

// A function URL's streamed page: a status, headers and a cookie in the prelude, then
// the body a second apart.
exports.streamsPage = awslambda.streamifyResponse(async (event, responseStream) => {
  const stream = awslambda.HttpResponseStream.from(responseStream, {
    statusCode: 207,
    headers: { 'content-type': 'text/plain', 'x-path': event.rawPath },
    cookies: ['streamed=1'],
  });
  stream.write('first\n');
  await pause(1000);
  stream.end('second\n');
});
