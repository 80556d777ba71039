import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, check } from './errors.js';
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

/** True when every element is finite (one reduction on the backend). */
export async function allFinite(x: tf.Tensor): Promise<boolean> {
  const s = tf.tidy(() => tf.sum(tf.mul(x, 0)));
  const v = (await s.data())[0];
  s.dispose();
  return Number.isFinite(v);
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
  for (let l = 0; l < L; l++) {
    checkKV(cache.keys[l], cache.layout, `KV cache layer ${l} keys`, T);
    checkKV(cache.values[l], cache.layout, `KV cache layer ${l} values`, T);
  }
  for (let l = 0; l < L; l++) {
    for (const [name, x] of [['keys', cache.keys[l]], ['values', cache.values[l]]] as const) {
      if (!(await allFinite(x))) throw new KvpackError('nonfinite', `KV cache layer ${l} ${name} contain NaN or Inf`);
    }
  }
  return T;
}

/** Disposes every tensor of a KVCache (keys, values and queries). */
export function disposeKVCache(c: KVCache): void {
  tf.dispose([...c.keys, ...c.values, ...(c.queries ?? [])]);
}
