// Handlers that aws-lambda-ric runs (tests/sandbox_e2e/node_ric.rs): a plain answer, an
// error, and a response-streaming handler through the client's `awslambda` global.

const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export const answers = async (event, context) => ({
  event,
  requestId: context.awsRequestId,
  functionName: context.functionName,
  arn: context.invokedFunctionArn,
  remainingOk: context.getRemainingTimeInMillis() > 0,
  node: process.versions.node,
  runtime: 'aws-lambda-ric',
});

class PaymentDeclined extends Error {
  constructor(message) {
    super(message);
    this.name = 'PaymentDeclined';
  }
}

export const fails = async (event) => {
  throw new PaymentDeclined(`declined: ${event.card}`);
};

// `first`, then after `pauseMs` (default 1 s) `second`, or a failure in mid-stream.
export const streams = awslambda.streamifyResponse(async (event, responseStream) => {
  responseStream.setContentType('text/plain');
  responseStream.write('first\n');
  await pause(event.pauseMs ?? 1000);
  if (event.fail) throw new Error('deliberate failure in mid-stream');
  responseStream.end('second\n');
});
