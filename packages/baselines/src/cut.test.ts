// The `cutPrefix` capability of the baselines: svd cuts its token bases (as xkv); kivi refuses with
// its reason; strategies that declare nothing are refused by core.
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStrategy, cutCachePrefix, prefixCutter, selectBackend } from '@kvpack/core';
import { GroupSvdCache } from '@kvpack/strategy-utils';
import './index.js';
import { randomCache, take } from './testing/testkit.js';

const layout = { nLayers: 3, nHeads: 4, nKvHeads: 2, headDim: 8 };
const T = 20;

let start: number;
beforeAll(async () => {
  await selectBackend('wasm');
  start = tf.memory().numTensors;
});
afterAll(() => expect(tf.memory().numTensors).toBe(start));

describe('prefix cuts of the baselines', () => {
  it('svd: every layer keeps its basis rows [0, t) and its factor; values are U[0:t]·B in float64', async () => {
    const rc = randomCache(T, layout, 9);
    const c = (await createStrategy({ name: 'svd', options: { rankK: 4, rankV: 5 } }).compress(rc.cache)) as GroupSvdCache;
    rc.dispose();
    const cut = (await cutCachePrefix(c, 9)) as GroupSvdCache;
    expect(cut.prefillLength).toBe(9);
    const F = 16;
    for (let l = 0; l < layout.nLayers; l++) {
      const U = take(cut.basis('v', l));
      expect(U).toEqual(take(c.basis('v', l)).subarray(0, 9 * 5));
      const B = take(cut.factor('v', l));
      const v = take(cut.values(l));
      let err = 0;
      for (let i = 0; i < 9; i++)
        for (let f = 0; f < F; f++) {
          let s = 0;
          for (let r = 0; r < 5; r++) s += U[i * 5 + r] * B[r * F + f];
          err = Math.max(err, Math.abs(v[i * F + f] - s) / (1 + Math.abs(s)));
        }
      expect(err).toBeLessThan(1e-5);
    }
    cut.dispose();
    c.dispose();
  });

  it('kivi refuses (quantization groups span tokens); strategies without the capability are refused by core', async () => {
    const kivi = prefixCutter('kivi', createStrategy({ name: 'kivi', options: { bits: 2, quantGroupSize: 4, residualLength: 8 } }).options);
    expect(kivi).toMatch(/^kivi quantizes keys per channel over groups of 4 tokens/);
    const rc = randomCache(T, layout, 10);
    for (const [name, options, message] of [
      ['kivi', { bits: 2, quantGroupSize: 4, residualLength: 8 }, /cannot cut a kivi cache to a prefix: kivi quantizes keys per channel/],
      ['streamingllm', { sinks: 2, budget: 8 }, /cannot cut a streamingllm cache to a prefix: streamingllm declares no prefix cut/],
    ] as const) {
      const c = await createStrategy({ name, options }).compress(rc.cache);
      await expect(cutCachePrefix(c, 4)).rejects.toMatchObject({ code: 'unsupported', message: expect.stringMatching(message) });
      c.dispose();
    }
    rc.dispose();
  });
});
