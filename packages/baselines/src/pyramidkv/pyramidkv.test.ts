import * as tf from '@tensorflow/tfjs-core';
import { createStrategy, selectBackend, type ModelLayout } from '@kvpack/core';
import { runStrategyConformance } from '@kvpack/core/conformance';
import { pyramidBudgets, type KeptTokensCache } from '@kvpack/strategy-utils';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import './index.js'; // registers the strategy
import { snapkvScores64 } from '../testing/eviction-oracle.js';
import { f16, randomCache, take, type RandomCache } from '../testing/testkit.js';

runStrategyConformance('pyramidkv', {
  compressing: { budget: 24, beta: 4, scorer: { name: 'snapkv', window: 8, kernelSize: 5 } },
  lossless: { budget: 64, scorer: { name: 'snapkv', window: 8 } },
  badOptions: [{ budget: 8, scorer: { name: 'snapkv', window: 8 } }, { beta: 0.5 }, { scorer: { name: 'h2o' } }],
  failingCompress: [{ budget: 24, scorer: { name: 'snapkv', window: 16 } }],
});

describe('pyramid layer budgets', () => {
  it('decrease arithmetically from 2S − S/β to S/β, their total L·S (worked by hand)', () => {
    // S = 16, β = 4: min 4, max 28, step 8.
    expect(pyramidBudgets(4, 64, 20, 4, 4)).toEqual([28, 20, 12, 4]);
    // S = 16, β = 3: 26⅔, 16, 5⅓ → floors 26, 16, 5 (47); the one left goes to the largest remainder (layer 0).
    expect(pyramidBudgets(3, 1000, 16, 0, 3)).toEqual([27, 16, 5]);
    // max capped at T − window = 30: S = 20, min = 2·20 − 30 = 10, step 10.
    expect(pyramidBudgets(3, 32, 22, 2, 20)).toEqual([30, 20, 10]);
    // β = 1: uniform.
    expect(pyramidBudgets(5, 500, 40, 8, 1)).toEqual([32, 32, 32, 32, 32]);
    for (const [L, T, B, w, beta] of [[7, 300, 50, 4, 20], [12, 90, 33, 0, 5.5], [2, 40, 39, 3, 2]])
      expect(pyramidBudgets(L, T, B, w, beta).reduce((a, b) => a + b, 0)).toBe(L * (B - w));
  });
});

describe('pyramidkv: kept tokens against a direct float64 computation', () => {
  const layout: ModelLayout = { nLayers: 4, nHeads: 4, nKvHeads: 2, headDim: 16 };
  const { nKvHeads: H, headDim: d } = layout;
  const T = 64;
  let rc: RandomCache;
  beforeAll(async () => {
    await selectBackend('wasm');
    rc = randomCache(T, layout, 23, 8);
  });
  afterAll(() => rc.dispose());

  it('layer l keeps per head the top b_l prefix tokens of the SnapKV scores plus the window; bytes are those of a uniform budget', async () => {
    const w = 4;
    const n0 = tf.memory().numTensors;
    const c = (await createStrategy({ name: 'pyramidkv', options: { budget: 20, beta: 4, scorer: { name: 'snapkv', window: w, kernelSize: 7 } } }).compress(rc.cache)) as KeptTokensCache;
    const want = [28, 20, 12, 4];
    for (let l = 0; l < layout.nLayers; l++) {
      const n = want[l] + w;
      expect(c.tokenCount(l)).toBe(n);
      const pos = c.keptPositions(l);
      const keys = take(c.keys(l));
      const scores = snapkvScores64(rc.queries[l], 8, rc.postKeys[l], T, w, layout, 7, 'avg');
      for (let h = 0; h < H; h++) {
        const kept = Array.from({ length: n }, (_, j) => pos[j * H + h]);
        expect(kept.slice(n - w)).toEqual([60, 61, 62, 63]);
        const kth = [...scores[h]].sort((a, b) => b - a)[n - 1];
        for (let t = 0; t < T - w; t++) {
          if (kept.includes(t)) expect(scores[h][t]).toBeGreaterThanOrEqual(kth - 1e-6);
          else expect(scores[h][t]).toBeLessThanOrEqual(kth + 1e-6);
        }
        kept.forEach((p, j) => {
          for (let ch = 0; ch < d; ch++) expect(keys[(j * H + h) * d + ch]).toBe(Math.fround(f16(rc.postKeys[l][(p * H + h) * d + ch])));
        });
      }
    }
    // The same total as a uniform budget of 20: 4 layers · 20 tokens · H_kv · (keys + values float16 + an int32 position).
    expect(c.byteSize()).toBe(4 * 20 * H * (2 * d * 2 + 4));
    c.dispose();
    expect(tf.memory().numTensors).toBe(n0);
  });
});
