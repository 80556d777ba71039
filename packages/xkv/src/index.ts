// Types of tfjs's chained ops (x.reshape(), …) for this package's build; @kvpack/core registers them.
import type {} from '@tensorflow/tfjs-core/dist/public/chained_ops/register_all_chained_ops';
// Importing this package registers the `xkv` strategy.
export * from './quant.js';
export * from './ratio.js';
export * from './group-svd.js';
export * from './xkv.js';
export * from './decode.js';
export * from './sparse.js';
