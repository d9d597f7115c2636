// Handlers that each exercise one trait of Lambda's Node.js runtime in the end-to-end
// tests (tests/sandbox_e2e/runtime_traits.rs); each function of a generated
// functions.toml names one.
'use strict';

// One line per console method, each with Lambda's prefix.
exports.logs = async () => {
  console.log('via log');
  console.warn('via warn');
  console.error('via error');
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
  stream.end(String(event.n));
});
