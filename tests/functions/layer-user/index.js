// The Node.js side of the layer tests: a module of a layer's nodejs/node_modules.
'use strict';
const layermod = require('layermod');

exports.handler = async () => ({ value: layermod.value, node: process.versions.node });
