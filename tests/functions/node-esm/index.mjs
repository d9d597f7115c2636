// An ES module handler (`.mjs`), beside the CommonJS ones of node-cases: both load.
export const handler = async (event) => ({ esm: true, node: process.versions.node, event });
