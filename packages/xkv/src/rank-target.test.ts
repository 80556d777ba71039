import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KvpackError, createStrategy, denseCacheBytes, deserializeCache, disposeKVCache, selectBackend, type KVCache, type ModelLayout } from '@kvpack/core';
import { lowRankBytes, type GroupSvdCache } from '@kvpack/strategy-utils';
import './index.js';
import { syntheticCache } from './test-utils.js';

/**
 * Rank targets of xkv: a compression ratio or a rank fraction resolved into group ranks at compress
 * time. Layout: 6 layers, H_kv·d = 32, groups of 4 → groups of 4 and 2 layers (features 128 and 64).
 */
const layout: ModelLayout = { nLayers: 6, nHeads: 4, nKvHeads: 2, headDim: 16 };
const F = 32;
const T = 80;
const groupLayers = [4, 2];

/**
 * The maximal proportional ranks for a target ratio, found independently of the library: every
 * breakpoint s = m / (r · n) of the floors is tried in order, bytes by the closed form for float16
 * factors 2 · Σ_g (T + n_g·F)(R_K,g + R_V,g); the last s within dense / ratio wins.
 */
function oracleRanks(ratio: number, rankK: number, rankV: number): { k: number[]; v: number[] } {
  const dense = 2 * layout.nLayers * T * F * 2;
  const bound = groupLayers.map((n) => Math.min(T, n * F));
  const at = (s: number) => ({
    k: groupLayers.map((n, g) => Math.min(bound[g], Math.max(1, Math.floor(s * rankK * n + 1e-9)))),
    v: groupLayers.map((n, g) => Math.min(bound[g], Math.max(1, Math.floor(s * rankV * n + 1e-9)))),
  });
  const bytes = (r: { k: number[]; v: number[] }) => 2 * groupLayers.reduce((a, n, g) => a + (T + n * F) * (r.k[g] + r.v[g]), 0);
  const points = new Set<number>([0]);
  for (const r of [rankK, rankV]) for (const n of groupLayers) for (let m = 1; m <= T * 2; m++) points.add(m / (r * n));
  let best = at(0);
  for (const s of [...points].sort((a, b) => a - b)) if (bytes(at(s)) <= dense / ratio) best = at(s);
  return best;
}

const ranksOf = (c: GroupSvdCache) => ({ k: c.stats().groups.map((g) => g.rankK), v: c.stats().groups.map((g) => g.rankV) });

describe('xkv rank targets', () => {
  let cache: KVCache;
  let start: number;
  beforeAll(async () => {
    await selectBackend('wasm');
    start = tf.memory().numTensors;
    cache = syntheticCache(layout, T).cache;
  });
  afterAll(() => {
    disposeKVCache(cache);
    expect(tf.memory().numTensors).toBe(start);
  });
  const compress = async (options: Record<string, unknown>) => (await createStrategy({ name: 'xkv', options: { layersPerGroup: 4, ...options } }).compress(cache)) as GroupSvdCache;

  it('targetRatio: the largest proportional ranks whose measured ratio is ≥ the target', async () => {
    for (const ratio of [3, 8, 12.5]) {
      const c = await compress({ targetRatio: ratio });
      const measured = denseCacheBytes(layout, T) / c.byteSize();
      expect(measured).toBeGreaterThanOrEqual(ratio);
      expect(ranksOf(c)).toEqual(oracleRanks(ratio, 16, 24));
      expect(c.stats().measuredRatio).toBe(measured);
      c.dispose();
    }
    // The proportion follows rankK : rankV.
    const c = await compress({ targetRatio: 6, rankK: 1, rankV: 1 });
    expect(ranksOf(c)).toEqual(oracleRanks(6, 1, 1));
    expect(ranksOf(c).k).toEqual(ranksOf(c).v);
    c.dispose();
  });

  it('counts every stored byte: quantized factors and the sparse index, still ≥ the target', async () => {
    // The sparse index keeps 16 of 80 tokens exact and 9 landmarks per layer: at most ~3.5× in all, so 2 there.
    for (const [ratio, extra] of [
      [5, { factorQuantization: { bits: 4 } }],
      [5, { storage: 'float32' }],
      [2, { decode: 'sparse', sparse: { budget: 16, chunkSize: 8, outlierChunks: 1, localTokens: 8 } }],
    ] as const) {
      const c = await compress({ targetRatio: ratio, ...extra });
      expect(denseCacheBytes(layout, T) / c.byteSize()).toBeGreaterThanOrEqual(ratio);
      // The rank search's byte count is the cache's own.
      expect(lowRankBytes(c.config, layout, T, ranksOf(c))).toBe(c.byteSize());
      // One step up in every group would not fit (the ranks were rounded down, not too far).
      const up = { k: ranksOf(c).k.map((r) => r + 1), v: ranksOf(c).v.map((r) => r + 1) };
      expect(denseCacheBytes(layout, T) / lowRankBytes(c.config, layout, T, up)).toBeLessThan(ratio);
      c.dispose();
    }
  });

  it('rankFraction: ⌊f · min(T, group features)⌋ for keys and values', async () => {
    const c = await compress({ rankFraction: 0.5 });
    expect(ranksOf(c)).toEqual({ k: [40, 32], v: [40, 32] });
    c.dispose();
    const tiny = await compress({ rankFraction: 0.001 });
    expect(ranksOf(tiny)).toEqual({ k: [1, 1], v: [1, 1] });
    tiny.dispose();
  });

  it('a target ratio restores from its bytes with the ranks it got', async () => {
    const c = await compress({ targetRatio: 8 });
    const back = deserializeCache(c.serialize()) as GroupSvdCache;
    expect(ranksOf(back)).toEqual(ranksOf(c));
    const [a, b] = [c.keys(2), back.keys(2)];
    expect(Array.from(await b.data())).toEqual(Array.from(await a.data()));
    tf.dispose([a, b]);
    for (const x of [c, back]) x.dispose();
  });

  it('errors: both targets, a ratio out of reach, and explicit ranks above min(T, features)', async () => {
    const code = async (o: Record<string, unknown>) => {
      try {
        (await compress(o)).dispose();
      } catch (e) {
        expect(e).toBeInstanceOf(KvpackError);
        return `${(e as KvpackError).code}: ${(e as Error).message}`;
      }
      return 'no error';
    };
    expect(await code({ targetRatio: 4, rankFraction: 0.5 })).toMatch(/^config: .*targetRatio or rankFraction, not both/s);
    expect(await code({ targetRatio: 0.5 })).toMatch(/^config: /);
    expect(await code({ rankFraction: 0 })).toMatch(/^config: /);
    expect(await code({ rankFraction: 1.5 })).toMatch(/^config: /);
    expect(await code({ targetRatio: 1000 })).toMatch(/^rank: xkv: targetRatio 1000 is out of reach at T=80: rank 1 in every group already gives \d+\.\d+× dense fp16/);
    expect(await code({ rankK: 21 })).toMatch(/^rank: xkv: group 0 \(layers 0–3\) key rank 84 \(rankK 21 × 4 layers\) is out of range \[1, min\(T=80, features=128\) = 80\]/);
  });
});
