// Types of tfjs's chained ops (x.reshape(), …) for this package's build; @kvpack/core registers them.
import type {} from '@tensorflow/tfjs-core/dist/public/chained_ops/register_all_chained_ops';
// Importing this package registers the `xkv` strategy. Its cache (GroupSvdCache), the decode paths
// and the quantizer live in @kvpack/strategy-utils, shared with the per-layer SVD baseline.
export * from './xkv.js';
/** Bytes and ratios of a compressed xKV cache (from @kvpack/strategy-utils, where the cache lives). */
export { lowRankStats } from '@kvpack/strategy-utils';

import { registerStrategy } from '@kvpack/core';
import { xkvDefinition } from './xkv.js';

/**
 * Registers the `xkv` strategy. Importing this package already does; call it where a bundler may
 * drop an import whose exports go unused, or after `unregisterStrategy('xkv')`. Idempotent.
 */
export function registerXkv(): void {
  registerStrategy(xkvDefinition);
}
