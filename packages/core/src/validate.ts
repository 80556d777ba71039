import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, check } from './errors.js';
import { nonFiniteFlagsWgsl } from './finite-wgsl.js';
import { isWebGpuBackend } from './webgpu.js';
import type { KVCache, ModelLayout } from './types.js';

/** Checks a layout's integers and head grouping. @throws KvpackError('layout') */
export function validateLayout(layout: ModelLayout): void {
  for (const k of ['nLayers', 'nHeads', 'nKvHeads', 'headDim'] as const) {
    check(Number.isInteger(layout[k]) && layout[k] > 0, 'layout', `model layout: ${k} must be a positive integer, got ${layout[k]}`);
  }
  check(layout.nHeads % layout.nKvHeads === 0, 'layout', `model layout: ${layout.nHeads} query heads are not a multiple of ${layout.nKvHeads} KV heads`);
}

/**
 * Throws unless `x` is a float32 [T, H_kv, d] tensor matching `layout` (and `T` when given).
 * @throws KvpackError('shape' | 'dtype')
 */
export function checkKV(x: tf.Tensor, layout: ModelLayout, what: string, T?: number): void {
  check(x instanceof tf.Tensor, 'dtype', `${what}: expected a tf.Tensor, got ${typeof x}`);
  check(x.dtype === 'float32', 'dtype', `${what}: dtype must be float32, got ${x.dtype}`);
  check(
    x.rank === 3 && x.shape[1] === layout.nKvHeads && x.shape[2] === layout.headDim && (T === undefined || x.shape[0] === T),
    'shape',
    `${what}: shape must be [${T ?? 'T'}, H_kv=${layout.nKvHeads}, d=${layout.headDim}], got [${x.shape}]`,
  );
}

/**
 * A scalar that is NaN iff x holds a NaN or ±Inf (0 otherwise): x·0 summed, formed as a product of x
 * viewed as [size / last, last] with a zero vector — one pass over x at matmul speed (tfjs-webgpu's
 * full reductions are ~25 ms per 32K-token layer, the product ~100× less). Call inside tf.tidy. @internal
 */
export function nonFiniteProbe(x: tf.Tensor): tf.Scalar {
  const last = x.rank === 0 ? 1 : x.shape[x.rank - 1] || 1;
  return tf.sum(tf.matMul(tf.reshape(x, [-1, last]) as tf.Tensor2D, tf.zeros([last, 1])));
}

/**
 * One value per tensor, non-zero (or NaN) exactly when that tensor holds a NaN or ±Inf: on webgpu a
 * memory-bound scan kernel per float32 tensor ({@link nonFiniteFlagsWgsl}), elsewhere
 * {@link nonFiniteProbe} per tensor. Empty tensors are finite. Call inside tf.tidy. @internal
 */
export function nonFiniteFlags(xs: readonly tf.Tensor[]): tf.Tensor1D {
  const full = xs.filter((x) => x.size > 0);
  if (full.length === 0) return tf.zeros([xs.length]);
  if (isWebGpuBackend() && full.length === xs.length && xs.every((x) => x.dtype === 'float32')) return nonFiniteFlagsWgsl(xs);
  return tf.stack(xs.map((x) => (x.size === 0 ? tf.scalar(0) : nonFiniteProbe(x)))) as tf.Tensor1D;
}

/** The indices of the tensors whose {@link nonFiniteFlags} are set, in one readback. */
export async function nonFiniteIndices(xs: readonly tf.Tensor[]): Promise<number[]> {
  const flags = tf.tidy(() => nonFiniteFlags(xs));
  const v = await flags.data();
  flags.dispose();
  const out: number[] = [];
  v.forEach((f, i) => {
    if (f !== 0) out.push(i);
  });
  return out;
}

/** True when every element is finite (one scan or product and one readback on the backend). */
export async function allFinite(x: tf.Tensor): Promise<boolean> {
  return (await nonFiniteIndices([x])).length === 0;
}

/**
 * Validates a prefill cache: layer count, shapes, dtypes, and no NaN/Inf.
 * @throws KvpackError('layout' | 'shape' | 'dtype' | 'nonfinite') naming the layer and tensor.
 */
export async function validateKVCache(cache: KVCache): Promise<number> {
  validateLayout(cache.layout);
  const L = cache.layout.nLayers;
  check(
    Array.isArray(cache.keys) && Array.isArray(cache.values),
    'shape',
    'KV cache: keys and values must be arrays of per-layer [T, H_kv, d] tensors',
  );
  check(cache.keys.length === L, 'layout', `KV cache has ${cache.keys.length} key layers but the model has ${L} layers`);
  check(cache.values.length === L, 'layout', `KV cache has ${cache.values.length} value layers but the model has ${L} layers`);
  check(cache.keys[0] instanceof tf.Tensor && cache.keys[0].rank === 3, 'shape', `KV cache: layer 0 keys must be [T, H_kv, d]`);
  const T = cache.keys[0].shape[0];
  check(T > 0, 'shape', 'KV cache is empty (T = 0)');
  if (cache.windows !== undefined) {
    check(Array.isArray(cache.windows) && cache.windows.length === L, 'layout', `KV cache: windows must list one sliding window (tokens, or null) per layer, ${L} in all`);
    cache.windows.forEach((w, l) =>
      check(w === null || (Number.isInteger(w) && w > 0), 'config', () => `KV cache: layer ${l}'s sliding window ${JSON.stringify(w)} must be a positive integer (tokens) or null`),
    );
  }
  for (let l = 0; l < L; l++) {
    checkKV(cache.keys[l], cache.layout, `KV cache layer ${l} keys`, T);
    checkKV(cache.values[l], cache.layout, `KV cache layer ${l} values`, T);
  }
  // One flag per tensor, in a single readback: one host round-trip for the whole cache.
  const bad = await nonFiniteIndices(cache.keys.flatMap((k, l) => [k, cache.values[l]]));
  if (bad.length) throw new KvpackError('nonfinite', `KV cache layer ${bad[0] >> 1} ${bad[0] & 1 ? 'values' : 'keys'} contain NaN or Inf`);
  return T;
}

/** Disposes every tensor of a KVCache (keys, values and queries). */
export function disposeKVCache(c: KVCache): void {
  tf.dispose([...c.keys, ...c.values, ...(c.queries ?? [])]);
}
