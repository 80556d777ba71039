import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, createStrategy, denseCacheBytes, getStrategyDefinition, parseStrategyOptions, selectBackend, type KVCache } from '@kvpack/core';
import { disposeKVCache, syntheticCache } from '@kvpack/core/conformance';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import './index.js';

/**
 * Target ratios: for each strategy, a target resolves its knob so that the measured ratio (dense fp16
 * bytes ÷ byteSize() right after compress) is ≥ the target, the next better knob setting (one more
 * token, more bits, a higher start layer, checked by compressing with it explicitly) is below the
 * target, and an unreachable target is a KvpackError('config' | 'rank') naming the reachable range.
 */
interface Case {
  name: string;
  base: Record<string, unknown>;
  target: number;
  knob: string;
  /** Options one step better than the resolved knob (more bytes), from the compressed cache; null when the knob is already at its best. */
  better(resolved: { tokens: number; options: Record<string, unknown> }): Record<string, unknown> | null;
  unreachable: number;
}

const T = 64;
const CASES: Case[] = [
  { name: 'snapkv', base: { window: 8, kernelSize: 5 }, target: 4, knob: 'budget', better: ({ tokens }) => ({ window: 8, kernelSize: 5, budget: tokens + 1 }), unreachable: 8 },
  { name: 'streamingllm', base: { sinks: 4 }, target: 5, knob: 'budget', better: ({ tokens }) => ({ sinks: 4, budget: tokens + 1 }), unreachable: 20 },
  { name: 'quant', base: {}, target: 2, knob: 'bits', better: () => ({ bits: 8 }), unreachable: 4 },
  { name: 'kivi', base: { quantGroupSize: 8, residualLength: 16 }, target: 2, knob: 'bits', better: () => ({ quantGroupSize: 8, residualLength: 16, bits: 4 }), unreachable: 3 },
  // The resolved start layer is the cache's own (startLayer + 1 is checked below).
  { name: 'minicache', base: {}, target: 1.3, knob: 'startLayer', better: () => null, unreachable: 3 },
];

describe('target ratios, resolved per strategy from measured bytes', () => {
  let cache: KVCache;
  let start = 0;
  beforeAll(async () => {
    await selectBackend('cpu');
    start = tf.memory().numTensors;
    cache = syntheticCache(T);
  });
  afterAll(() => {
    disposeKVCache(cache);
    expect(tf.memory().numTensors).toBe(start);
  });
  const dense = () => denseCacheBytes(cache.layout, T);

  for (const c of CASES) {
    it(`${c.name}: targetRatio ${c.target} resolves ${c.knob}; the measured ratio reaches it and the next ${c.knob} does not`, async () => {
      const def = getStrategyDefinition(c.name);
      const opts = { ...c.base, targetRatio: c.target };
      expect(def.capabilities?.ratioTarget?.(parseStrategyOptions(c.name, opts))).toEqual({ target: c.target, knob: c.knob });
      expect(def.capabilities?.ratioTarget?.(parseStrategyOptions(c.name, c.base))).toBeNull();
      const s = createStrategy({ name: c.name, options: opts });
      const x = await s.compress(cache);
      expect(dense() / x.byteSize()).toBeGreaterThanOrEqual(c.target);
      // kvpress's form gives the same cache.
      const y = await createStrategy({ name: c.name, options: { ...c.base, compressionRatio: 1 - 1 / c.target } }).compress(cache);
      expect(y.byteSize()).toBe(x.byteSize());
      // Round trip through the strategy (which resolves the knob again from T) and through the file.
      const bytes = x.serialize();
      const back = s.deserialize(bytes);
      expect(back.byteSize()).toBe(x.byteSize());
      const better = c.better({ tokens: x.tokenCount(0), options: (x as unknown as { options: Record<string, unknown> }).options });
      if (c.name === 'minicache') {
        const startLayer = (x as unknown as { startLayer: number }).startLayer;
        const b = await createStrategy({ name: c.name, options: { startLayer: startLayer + 1 } }).compress(cache);
        expect(dense() / b.byteSize()).toBeLessThan(c.target);
        b.dispose();
      } else if (better) {
        const b = await createStrategy({ name: c.name, options: better }).compress(cache);
        expect(dense() / b.byteSize()).toBeLessThan(c.target);
        b.dispose();
      }
      for (const k of [x, y, back]) k.dispose();
      const err = await createStrategy({ name: c.name, options: { ...c.base, targetRatio: c.unreachable } })
        .compress(cache)
        .catch((e) => e);
      expect(err).toBeInstanceOf(KvpackError);
      expect(err.code).toBe('config');
      expect(err.message).toMatch(new RegExp(`targetRatio ${c.unreachable} .*out of reach at T=${T}.*reachable`));
    });
  }

  it('a target and the knob it resolves exclude each other; targetRatio and compressionRatio must agree', () => {
    for (const [name, knob] of [['snapkv', { budget: 32 }], ['streamingllm', { budget: 32 }], ['quant', { bits: 4 }], ['kivi', { bits: 2 }], ['minicache', { startLayer: 1 }]] as const) {
      expect(() => parseStrategyOptions(name, { ...knob, targetRatio: 2 })).toThrow(/not both/);
      expect(() => parseStrategyOptions(name, { targetRatio: 2, compressionRatio: 0.75 })).toThrow(/disagree/);
      expect(parseStrategyOptions(name, { targetRatio: 4, compressionRatio: 0.75 })).toMatchObject({ targetRatio: 4 });
    }
  });
});
