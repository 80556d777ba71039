import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KvpackError, createStrategy, selectBackend, type MlaKVCache } from '@kvpack/core';
import { disposeMlaCache, syntheticMlaCache } from '@kvpack/core/conformance';
import * as tf from '@tensorflow/tfjs-core';
import './index.js';
import type { MlaKeptTokensCache } from '@kvpack/strategy-utils';

/**
 * SnapKV on MLA latent caches against a float64 reference written here: absorbed-form window queries
 * vote over [c_KV ; RoPE(k_R)], averaged over all heads (one shared latent), avg-pooled, top-k.
 */
const T = 40;
const START = 3;
const W = 6;
let cache: MlaKVCache;
beforeAll(async () => {
  await selectBackend('wasm');
  cache = syntheticMlaCache(T, { nLayers: 2, nHeads: 3, kvLoraRank: 10, qkRopeHeadDim: 4 }, 21, { theta: 10000, layout: 'interleaved' }, START);
});
afterAll(() => disposeMlaCache(cache));

function referenceKept(l: number, budget: number, kernel: number): number[] {
  const { nHeads: H, kvLoraRank: dc, qkRopeHeadDim: dr } = cache.layout;
  const D = dc + dr;
  const c = cache.latents[l].dataSync();
  const k = cache.ropeKeys[l].dataSync();
  const q = cache.queries![l].dataSync();
  const obs = cache.queries![l].shape[0];
  const keys: number[][] = [];
  for (let t = 0; t < T; t++) {
    const row = Array.from(c.subarray(t * dc, (t + 1) * dc), Number);
    for (let i = 0; i < dr / 2; i++) {
      const a = (START + t) * Math.pow(10000, (-2 * i) / dr);
      const [x0, x1] = [k[t * dr + 2 * i], k[t * dr + 2 * i + 1]];
      row.push(x0 * Math.cos(a) - x1 * Math.sin(a), x0 * Math.sin(a) + x1 * Math.cos(a));
    }
    keys.push(row);
  }
  const votes = new Float64Array(T - W);
  for (let h = 0; h < H; h++) {
    for (let i = 0; i < W; i++) {
      const qi = obs - W + i;
      const lim = T - W + i;
      const logits: number[] = [];
      for (let t = 0; t <= lim; t++) {
        let s = 0;
        for (let j = 0; j < D; j++) s += q[(qi * H + h) * D + j] * keys[t][j];
        logits.push(s);
      }
      const m = Math.max(...logits);
      const e = logits.map((x) => Math.exp(x - m));
      const z = e.reduce((a, b) => a + b, 0);
      for (let t = 0; t < T - W; t++) votes[t] += e[t] / z / H;
    }
  }
  const r = (kernel - 1) / 2;
  const pooled = Array.from({ length: T - W }, (_, t) => {
    let s = 0;
    for (let u = t - r; u <= t + r; u++) if (u >= 0 && u < T - W) s += votes[u];
    return s / kernel;
  });
  const top = pooled
    .map((s, t) => [s, t])
    .sort((a, b) => b[0] - a[0] || a[1] - b[1])
    .slice(0, budget - W)
    .map((x) => x[1]);
  return [...top, ...Array.from({ length: W }, (_, i) => T - W + i)].sort((a, b) => a - b);
}

describe('snapkv on MLA latent caches', () => {
  it('keeps the tokens a float64 reference of the absorbed-form votes keeps, positions stored and counted', async () => {
    const c = (await createStrategy({ name: 'snapkv', options: { budget: 16, window: W, kernelSize: 5 } }).compress(cache)) as unknown as MlaKeptTokensCache;
    for (let l = 0; l < 2; l++) expect(Array.from(c.keptPositions(l)), `layer ${l}`).toEqual(referenceKept(l, 16, 5));
    expect(c.byteSize()).toBe(2 * (16 * (10 + 4) * 2 + 16 * 4));
    c.dispose();
  });

  it('refuses an MLA cache without absorbed-form queries, saying what it needs, leaking nothing', async () => {
    const before = tf.memory().numTensors;
    const s = createStrategy({ name: 'snapkv', options: { budget: 16, window: W } });
    await expect(s.compress({ ...cache, queries: undefined })).rejects.toThrow(KvpackError);
    await expect(s.compress({ ...cache, queries: undefined })).rejects.toThrow(/snapkv on an MLA latent cache needs the absorbed-form observation-window queries/);
    expect(tf.memory().numTensors).toBe(before);
  });
});
