// Types of tfjs's chained ops (x.reshape(), …) for this package's build; @kvpack/core registers them.
import type {} from '@tensorflow/tfjs-core/dist/public/chained_ops/register_all_chained_ops';
export {};
export * from './svd/index.js';
export * from './quant/index.js';
export * from './kivi/index.js';
export * from './minicache/index.js';
export * from './streamingllm/index.js';
export * from './snapkv/index.js';
