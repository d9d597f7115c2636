// The bundled Node.js example: an async handler.
exports.handler = async (event, context) => {
  const name = (event && event.name) || "world";
  console.log(`greeting ${name}`);
  return { message: `Hello, ${name}!`, request_id: context.awsRequestId };
};
