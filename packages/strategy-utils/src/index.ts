// Types of tfjs's chained ops (x.reshape(), …) for this package's build; @kvpack/core registers them.
import type {} from '@tensorflow/tfjs-core/dist/public/chained_ops/register_all_chained_ops';
// What strategies share, as provider-utils is to vercel/ai's providers. Strategies import this
// package, never each other. Registers nothing.
export * from './lowrank/options.js';
export * from './lowrank/ratio.js';
export * from './lowrank/group-svd.js';
export * from './lowrank/decode.js';
export * from './lowrank/sparse.js';
export * from './quant/quantize.js';
export * from './quant/packing.js';
export * from './eviction/kept-tokens.js';
export * from './eviction/scorer.js';
