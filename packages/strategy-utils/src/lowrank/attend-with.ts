import type * as tf from '@tensorflow/tfjs-core';
import { check, type AttendOptions, type CompressedCache } from '@kvpack/core';
import type { SparseSwitches } from './sparse-attend.js';

/*
 * The tuning switches of a grouped low-rank cache's attention, for kvpack's own tests, benchmarks and
 * GPU scripts: exported from `@kvpack/strategy-utils/internal` only. The public `attend` takes
 * `causalTail` (and `attendSparse` a token budget); everything here picks a path the defaults choose
 * by backend and flop count, so results agree up to float32 rounding.
 */

/** Options of {@link attendWith}: core's AttendOptions, the sparse switches, and the decode mode. */
export interface AttendSwitches extends AttendOptions, SparseSwitches {
  /** Decode mode; default the cache's own (`sparse` for caches compressed with decode: 'sparse'). */
  mode?: 'full' | 'sparse';
}

/** What a grouped low-rank cache hands to the switch-taking functions below (never public). */
interface SwitchHooks {
  attend(layer: number, queries: tf.Tensor3D, options: AttendSwitches): tf.Tensor3D;
  selection(layer: number, queries: tf.Tensor3D, budget: number | undefined): number[][];
}

const hooks = new WeakMap<object, SwitchHooks>();

/** Called by the cache's constructor. */
export function exposeSwitches(cache: object, h: SwitchHooks): void {
  hooks.set(cache, h);
}

function hooksOf(cache: CompressedCache, what: string): SwitchHooks {
  const h = hooks.get(cache);
  check(h, 'unsupported', () => `${what}: a ${cache?.strategy} cache is not a grouped low-rank (xkv, svd) cache`);
  return h;
}

/** True when `cache` takes {@link attendWith} (a grouped low-rank cache). */
export function hasAttendSwitches(cache: CompressedCache): boolean {
  return hooks.has(cache);
}

/**
 * `attend` of a grouped low-rank cache with forced paths: `mode`, the value path (`values`), and in
 * sparse mode `budget`, `gather`, `heads` and `kernels` (see {@link SparseSwitches}). q [n, H, d]
 * post-RoPE → [n, H, d].
 * @throws KvpackError('unsupported') for another cache, or a switch the backend cannot run;
 *         KvpackError('config') for a bad switch value.
 */
export function attendWith(cache: CompressedCache, layer: number, queries: tf.Tensor3D, options: AttendSwitches = {}): tf.Tensor3D {
  return hooksOf(cache, 'attendWith').attend(layer, queries, options);
}

/**
 * The chunks sparse attention would select for queries q [n, H, d] at a layer: per KV head, the chunk
 * indices (ascending; chunk i = prefill tokens i·c … i·c + c − 1). For tests and inspection.
 * @throws KvpackError('unsupported') when the cache was not compressed with decode: 'sparse'.
 */
export function sparseSelection(cache: CompressedCache, layer: number, queries: tf.Tensor3D, budget?: number): number[][] {
  return hooksOf(cache, 'sparseSelection').selection(layer, queries, budget);
}
