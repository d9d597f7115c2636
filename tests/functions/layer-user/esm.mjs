// An ES module handler that imports packages of its layers by their bare names: one in
// /opt/nodejs/node_modules (with a subpath), a scoped one in /opt/nodejs/node22/node_modules.
import layeresm, { condition } from 'layeresm';
import { extra } from 'layeresm/extra';
import { release } from '@kindling-test/node22-only';

export const handler = async () => ({ value: layeresm, condition, extra, scoped: release });
