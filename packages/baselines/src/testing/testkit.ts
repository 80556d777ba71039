import { gaussian, mulberry32 } from '@kvpack/core';
/**
 * Test helpers shared by the baselines' tests (not exported from the package): float64 references
 * written independently of the code under test.
 */
import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, applyRope, createStrategy, type KVCache, type ModelLayout, type RopeConfig } from '@kvpack/core';
import { expect } from 'vitest';

/**
 * Rounds to the nearest float16 value (ties to even), in float64, after the float32 rounding every
 * stored value goes through. Overflow gives ±Infinity; subnormals are kept.
 */
export function f16(x: number): number {
  x = Math.fround(x);
  if (!Number.isFinite(x) || x === 0) return x;
  const a = Math.abs(x);
  if (a >= 65520) return Math.sign(x) * Infinity;
  let e = Math.floor(Math.log2(a));
  if (2 ** e > a) e--;
  if (2 ** (e + 1) <= a) e++;
  const step = 2 ** (Math.max(e, -14) - 10);
  const q = a / step;
  let r = Math.round(q);
  if (r - q === 0.5 && r % 2 === 1) r -= 1;
  return Math.sign(x) * r * step;
}

/** Round half to even, as torch.round. */
export function rint(x: number): number {
  const f = Math.floor(x);
  const d = x - f;
  return d < 0.5 ? f : d > 0.5 ? f + 1 : f % 2 === 0 ? f : f + 1;
}

/** Seeded uniform PRNG (core's mulberry32). */
export const prng = mulberry32;

/** Host data of a small random cache: per layer pre-RoPE keys and values [T, H_kv, d] and queries [T_obs, H, d]. */
export interface RandomCache {
  cache: KVCache;
  keys: Float32Array[];
  values: Float32Array[];
  /** Post-RoPE keys (rotated by core's applyRope, the input every strategy sees). */
  postKeys: Float32Array[];
  queries: Float32Array[];
  dispose(): void;
}

export const TEST_ROPE: RopeConfig = { theta: 10000, layout: 'interleaved' };

/** A fixed random cache: normal-ish entries with a per-channel scale (so channels differ, as in real keys). */
export function randomCache(T: number, layout: ModelLayout, seed: number, tObs = 8): RandomCache {
  const gauss = gaussian(seed);
  const { nLayers: L, nHeads: Hq, nKvHeads: H, headDim: d } = layout;
  const chan = Float64Array.from({ length: d }, (_, c) => 0.5 + (c % 5));
  const mk = (n: number, heads: number, scaled: boolean) =>
    Float32Array.from({ length: n * heads * d }, (_, i) => gauss() * (scaled ? chan[i % d] : 1));
  const keys = Array.from({ length: L }, () => mk(T, H, true));
  const values = Array.from({ length: L }, () => mk(T, H, false));
  const queriesPre = Array.from({ length: L }, () => mk(tObs, Hq, false));
  const cache: KVCache = {
    layout,
    rope: TEST_ROPE,
    keys: keys.map((k) => tf.tensor3d(k, [T, H, d])),
    values: values.map((v) => tf.tensor3d(v, [T, H, d])),
    queries: queriesPre.map((q) => {
      const t = tf.tensor3d(q, [tObs, Hq, d]);
      const r = applyRope(t, TEST_ROPE, { start: T - tObs, count: tObs });
      t.dispose();
      return r;
    }),
  };
  const postKeys = cache.keys.map((k) => {
    const r = applyRope(k, TEST_ROPE, { start: 0, count: T });
    const out = r.dataSync() as Float32Array;
    r.dispose();
    return Float32Array.from(out);
  });
  const queries = cache.queries!.map((q) => Float32Array.from(q.dataSync() as Float32Array));
  return {
    cache,
    keys,
    values,
    postKeys,
    queries,
    dispose: () => tf.dispose([...cache.keys, ...cache.values, ...(cache.queries ?? [])]),
  };
}

/** Reads a tensor and disposes it. */
export function take(x: tf.Tensor): Float32Array {
  const out = Float32Array.from(x.dataSync() as Float32Array);
  x.dispose();
  return out;
}

/** Pre-RoPE keys of a compressed cache's prefill (inverse rotation of keys(layer)), [N, H_kv, d]. */
export function unrotate(post: tf.Tensor3D, rope: RopeConfig = TEST_ROPE, start = 0): Float32Array {
  const pre = applyRope(post, rope, { start, count: post.shape[0] }, true);
  post.dispose();
  return take(pre);
}

/** Largest |a − b| over all elements. */
export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

