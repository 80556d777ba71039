import * as tf from '@tensorflow/tfjs-core';
import { beforeAll, describe, expect, it } from 'vitest';
import { KvpackError, createStrategy, selectBackend, type KVCache } from '@kvpack/core';
import '@kvpack/baselines';
import { attentionOutputError } from './attention-error.js';

// A small GQA cache: L = 2 layers, H = 4 query heads over H_kv = 2 KV heads, d = 8, T = 12 tokens at
// positions 3 … 14 (startPosition 3), Hugging Face rotate-half RoPE; queries of the last 3 tokens.
const L = 2;
const H = 4;
const Hkv = 2;
const d = 8;
const T = 12;
const START = 3;
const NQ = 3;
const THETA = 10000;

function lcg(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32 - 0.5;
  };
}
const rnd = lcg(7);
const host = (n: number, scale = 1) => Float32Array.from({ length: n }, () => scale * 2 * rnd());
const K = Array.from({ length: L }, () => host(T * Hkv * d, 1.5));
const V = Array.from({ length: L }, () => host(T * Hkv * d));
const Q = Array.from({ length: L }, () => host(NQ * H * d, 1.5));

function makeCache(): KVCache {
  return {
    layout: { nLayers: L, nHeads: H, nKvHeads: Hkv, headDim: d },
    rope: { theta: THETA, layout: 'half', scaling: null },
    keys: K.map((k) => tf.tensor3d(k, [T, Hkv, d])),
    values: V.map((v) => tf.tensor3d(v, [T, Hkv, d])),
    queries: Q.map((q) => tf.tensor3d(q, [NQ, H, d])),
    startPosition: START,
  };
}

/** Rotate-half RoPE of one [T, Hkv, d] pre-RoPE key array at positions START + t, float64. */
function ropeHalf(k: Float32Array): Float64Array {
  const out = new Float64Array(k.length);
  for (let t = 0; t < T; t++)
    for (let h = 0; h < Hkv; h++)
      for (let i = 0; i < d / 2; i++) {
        const o = (t * Hkv + h) * d;
        const a = (START + t) * Math.pow(THETA, (-2 * i) / d);
        const x = k[o + i];
        const y = k[o + i + d / 2];
        out[o + i] = x * Math.cos(a) - y * Math.sin(a);
        out[o + i + d / 2] = x * Math.sin(a) + y * Math.cos(a);
      }
  return out;
}

/**
 * softmax(q·kᵀ/√d)·v in float64 over cached tokens with known positions; query row i sits at
 * position START + T − NQ + i and sees cached tokens whose position is ≤ its own. GQA: query head h
 * reads KV head ⌊h / (H / Hkv)⌋. Returns [NQ, H, d].
 */
function attend64(q: Float32Array, k: ArrayLike<number>, v: ArrayLike<number>, pos: number[]): Float64Array {
  const out = new Float64Array(NQ * H * d);
  const N = pos.length;
  for (let i = 0; i < NQ; i++) {
    const qpos = START + T - NQ + i;
    for (let h = 0; h < H; h++) {
      const kv = Math.floor(h / (H / Hkv));
      const s = new Float64Array(N).fill(-Infinity);
      let m = -Infinity;
      for (let j = 0; j < N; j++) {
        if (pos[j] > qpos) continue;
        let dot = 0;
        for (let c = 0; c < d; c++) dot += q[(i * H + h) * d + c] * k[(j * Hkv + kv) * d + c];
        s[j] = dot / Math.sqrt(d);
        m = Math.max(m, s[j]);
      }
      let z = 0;
      for (let j = 0; j < N; j++) z += s[j] === -Infinity ? 0 : Math.exp(s[j] - m);
      for (let j = 0; j < N; j++) {
        if (s[j] === -Infinity) continue;
        const p = Math.exp(s[j] - m) / z;
        for (let c = 0; c < d; c++) out[(i * H + h) * d + c] += p * v[(j * Hkv + kv) * d + c];
      }
    }
  }
  return out;
}

/** Per-layer and pooled relative errors, float64, for compressed keys/values read back with their positions. */
function oracle(khat: Float32Array[], vhat: Float32Array[], pos: number[]) {
  const all = Array.from({ length: T }, (_, t) => START + t);
  let numAll = 0;
  let denAll = 0;
  const perLayer: number[] = [];
  for (let l = 0; l < L; l++) {
    const exact = attend64(Q[l], ropeHalf(K[l]), V[l], all);
    const approx = attend64(Q[l], khat[l], vhat[l], pos);
    let num = 0;
    let den = 0;
    for (let x = 0; x < exact.length; x++) {
      num += (exact[x] - approx[x]) ** 2;
      den += exact[x] ** 2;
    }
    perLayer.push(Math.sqrt(num / den));
    numAll += num;
    denAll += den;
  }
  return { perLayer, pooled: Math.sqrt(numAll / denAll) };
}

/** Reads a tensor to the host and disposes it. */
function take(t: tf.Tensor): Float32Array {
  const d = t.dataSync() as Float32Array;
  t.dispose();
  return d;
}

beforeAll(async () => {
  await selectBackend('wasm');
});

describe('attention-output error', () => {
  it('matches a float64 re-computation for a quantized cache (all tokens kept)', async () => {
    const cache = makeCache();
    const c = await createStrategy({ name: 'quant', options: { bits: 4 } }).compress(cache);
    const start = tf.memory().numTensors;
    const khat = Array.from({ length: L }, (_, l) => take(c.keys(l)));
    const vhat = Array.from({ length: L }, (_, l) => take(c.values(l)));
    const want = oracle(khat, vhat, Array.from({ length: T }, (_, t) => START + t));
    const got = await attentionOutputError(cache, c);
    expect(got.queries).toBe(NQ);
    expect(want.pooled).toBeGreaterThan(1e-3); // int4 really perturbs the output
    for (let l = 0; l < L; l++) expect(got.perLayer[l]).toBeCloseTo(want.perLayer[l], 5);
    expect(got.pooled).toBeCloseTo(want.pooled, 5);
    expect(got.max).toBe(Math.max(...got.perLayer));
    expect(tf.memory().numTensors).toBe(start); // no tensor left behind
    c.dispose();
    tf.dispose([...cache.keys, ...cache.values, ...cache.queries!]);
  });

  it('matches a float64 re-computation for an evicting cache (StreamingLLM keeps positions 0, 1 and the last 4)', async () => {
    const cache = makeCache();
    const c = await createStrategy({ name: 'streamingllm', options: { sinks: 2, budget: 6 } }).compress(cache);
    const kept = [0, 1, 8, 9, 10, 11];
    expect(c.tokenCount(0)).toBe(kept.length);
    const khat = Array.from({ length: L }, (_, l) => take(c.keys(l)));
    const vhat = Array.from({ length: L }, (_, l) => take(c.values(l)));
    // The oracle masks by the kept tokens' true positions, not by the causal-tail shortcut.
    const want = oracle(khat, vhat, kept.map((t) => START + t));
    const got = await attentionOutputError(cache, c);
    expect(want.pooled).toBeGreaterThan(1e-2);
    for (let l = 0; l < L; l++) expect(got.perLayer[l]).toBeCloseTo(want.perLayer[l], 5);
    expect(got.pooled).toBeCloseTo(want.pooled, 5);
    // Only the last query row: the oracle restricted to that row.
    const one = await attentionOutputError(cache, c, { count: 1 });
    expect(one.queries).toBe(1);
    c.dispose();
    tf.dispose([...cache.keys, ...cache.values, ...cache.queries!]);
  });

  it('is 0 for an exact (dense float32) cache, and explains missing queries or a bad count', async () => {
    const cache = makeCache();
    const c = await createStrategy({ name: 'dense', options: { storage: 'float32' } }).compress(cache);
    const got = await attentionOutputError(cache, c);
    expect(got.pooled).toBeLessThan(1e-6);
    const { queries, ...noQ } = cache;
    await expect(attentionOutputError(noQ, c)).rejects.toThrow(/needs post-RoPE queries.*observationWindow/);
    await expect(attentionOutputError(cache, c, { count: 4 })).rejects.toThrow(KvpackError);
    await expect(attentionOutputError(cache, c, { count: 4 })).rejects.toThrow(/count 4 must be an integer in \[1, 3\]/);
    c.dispose();
    tf.dispose([...cache.keys, ...cache.values, ...queries!]);
  });
});
