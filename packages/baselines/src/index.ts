// Types of tfjs's chained ops (x.reshape(), …) for this package's build; @kvpack/core registers them.
import type {} from '@tensorflow/tfjs-core/dist/public/chained_ops/register_all_chained_ops';
export {};
export * from './svd/index.js';
export * from './quant/index.js';
export * from './kivi/index.js';
export * from './minicache/index.js';
export * from './streamingllm/index.js';
export * from './snapkv/index.js';
export * from './stacked/index.js';
export * from './adakv/index.js';
export * from './pyramidkv/index.js';
export * from './expected-attention/index.js';
export * from './turboquant/index.js';
export * from './kvzip/index.js';

import { registerStrategy } from '@kvpack/core';
import { svdDefinition } from './svd/index.js';
import { quantDefinition } from './quant/index.js';
import { kiviDefinition } from './kivi/index.js';
import { miniCacheDefinition } from './minicache/index.js';
import { streamingLlmDefinition } from './streamingllm/index.js';
import { snapKvDefinition } from './snapkv/index.js';
import { stackedDefinition } from './stacked/index.js';

import { adaKvDefinition } from './adakv/index.js';
import { pyramidKvDefinition } from './pyramidkv/index.js';
import { expectedAttentionDefinition } from './expected-attention/index.js';
import { turboQuantDefinition } from './turboquant/index.js';
import { kvzipDefinition } from './kvzip/index.js';

/**
 * Registers the baselines: `svd`, `quant`, `kivi`, `minicache`, `streamingllm`, `snapkv`, `adakv`,
 * `pyramidkv`, `expected-attention`, `turboquant`, `kvzip`, and the composed `stacked` strategy
 * (eviction → low rank → quantized factors). Importing
 * this package already does; call it where a bundler may drop an import whose exports go unused, or
 * after `unregisterStrategy(name)`. Idempotent.
 */
export function registerBaselines(): void {
  for (const def of [svdDefinition, quantDefinition, kiviDefinition, miniCacheDefinition, streamingLlmDefinition, snapKvDefinition, adaKvDefinition, pyramidKvDefinition, expectedAttentionDefinition, turboQuantDefinition, kvzipDefinition, stackedDefinition])
    registerStrategy(def as Parameters<typeof registerStrategy>[0]);
}
