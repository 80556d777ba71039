import { MAX_TOKENS, createStrategy, deserializeCache, selectBackend, type ModelLayout } from '@kvpack/core';
import './index.js'; // registers the strategy
import { runStrategyConformance, expectOptionBounds } from '@kvpack/core/conformance';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { KeptTokensCache } from '@kvpack/strategy-utils';
import { f16, randomCache, take, type RandomCache } from '../testing/testkit.js';

runStrategyConformance('streamingllm', {
  compressing: { sinks: 4, budget: 24 },
  lossless: { budget: 64 },
  mla: { lossless: { budget: 64 } },
  badOptions: [{ sinks: 10, budget: 5 }, { budget: 0 }, { sinks: -1 }],
});

describe('streamingllm: kept tokens against a direct computation', () => {
  const layout: ModelLayout = { nLayers: 2, nHeads: 4, nKvHeads: 2, headDim: 8 };
  const { nKvHeads: H, headDim: d } = layout;
  const T = 50;
  let rc: RandomCache;
  beforeAll(async () => {
    await selectBackend('wasm');
    rc = randomCache(T, layout, 8);
  });
  afterAll(() => rc.dispose());

  it('keeps the sinks and the recent window at their original RoPE positions; bytes', async () => {
    const c = (await createStrategy({ name: 'streamingllm', options: { sinks: 3, budget: 12 } }).compress(rc.cache)) as KeptTokensCache;
    const kept = [0, 1, 2, ...Array.from({ length: 9 }, (_, i) => 41 + i)];
    for (let l = 0; l < layout.nLayers; l++) {
      expect(c.tokenCount(l)).toBe(12);
      expect(Array.from(c.keptPositions(l))).toEqual(kept.flatMap((p) => [p, p]));
      const k = take(c.keys(l));
      const v = take(c.values(l));
      // rows = float16 of the post-RoPE keys at the tokens' original positions
      const wantK = kept.flatMap((p) => Array.from(rc.postKeys[l].subarray(p * H * d, (p + 1) * H * d), f16));
      const wantV = kept.flatMap((p) => Array.from(rc.values[l].subarray(p * H * d, (p + 1) * H * d), f16));
      expect(Array.from(k)).toEqual(wantK.map(Math.fround));
      expect(Array.from(v)).toEqual(wantV.map(Math.fround));
    }
    expect(c.byteSize()).toBe(layout.nLayers * 2 * 12 * H * d * 2);
    const r = deserializeCache(c.serialize()) as KeptTokensCache;
    expect(Array.from(r.keptPositions(1))).toEqual(Array.from(c.keptPositions(1)));
    r.dispose();
    c.dispose();
  });

  it('keeps everything when T ≤ budget', async () => {
    const c = await createStrategy({ name: 'streamingllm', options: { budget: 50 } }).compress(rc.cache);
    expect(c.tokenCount(0)).toBe(T);
    c.dispose();
  });
});

describe('streamingllm option bounds', () => {
  it('sinks and budget ≤ 2^20 tokens: accepted at the bound, a config error naming it past it', () => {
    expectOptionBounds('streamingllm', [
      { option: 'budget', bound: MAX_TOKENS, at: (v) => ({ budget: v }) },
      { option: 'sinks', bound: MAX_TOKENS, at: (v) => ({ sinks: v, budget: MAX_TOKENS }) },
    ]);
  });
});
