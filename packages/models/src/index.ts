// Types of tfjs's chained ops (x.reshape(), …) for this package's build; @kvpack/core registers them.
import type {} from '@tensorflow/tfjs-core/dist/public/chained_ops/register_all_chained_ops';
export * from './types.js';
export * from './llama2c/index.js';
export * from './model/index.js';
export * from './hf/index.js';
export * from './gguf/index.js';
export * from './kvdump/index.js';
export * from './mla/index.js';
export * from './load.js';
export * from './bytes.js';
