import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, createStrategy, denseCacheBytes, getStrategyDefinition, parseStrategyOptions, selectBackend, type CompressedCache, type KVCache } from '@kvpack/core';
import type { RaggedKeptCache } from '@kvpack/strategy-utils';
import { disposeKVCache, syntheticCache } from '@kvpack/core/conformance';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import './index.js';

/**
 * Target ratios: for each strategy, a target resolves its knob so that the measured ratio (dense fp16
 * bytes ÷ byteSize() right after compress) is ≥ the target, the next better knob setting (one more
 * token, more bits, a higher start layer, checked by compressing with it explicitly) is below the
 * target, and an unreachable target is a KvpackError('config' | 'rank') naming the reachable range.
 * Where `counted` is given, the bytes are also counted directly from what the cache keeps (rows,
 * per-head counts, bits) and must equal byteSize().
 */
interface Case {
  name: string;
  base: Record<string, unknown>;
  target: number;
  knob: string;
  /** Options one step better than the resolved knob (more bytes), from the compressed cache; null when the knob is already at its best. */
  better(resolved: { tokens: number; options: Record<string, unknown> }): Record<string, unknown> | null;
  unreachable: number;
  /** The cache's bytes counted from what it keeps, independently of byteSize(). */
  counted?(x: CompressedCache): number;
  /** Needs KVzip's reconstruction scores on the cache. */
  reconstruction?: boolean;
}

const T = 64;
// syntheticCache's layout: L = 4 layers, H_kv = 2, d = 16.
const L = 4;
const H = 2;
const d = 16;
const snap = { name: 'snapkv', window: 8, kernelSize: 5 };
const optionsOf = (x: CompressedCache) => (x as unknown as { options: Record<string, unknown> }).options;
/** Ragged caches: float16 keys and values and an int32 position per kept row, an int32 count per head and layer. */
const raggedCounted = (x: CompressedCache) => {
  let bytes = 0;
  for (let l = 0; l < L; l++) bytes += (x as unknown as RaggedKeptCache).headCounts(l).reduce((a, n) => a + n * (2 * d * 2 + 4) + 4, 0);
  return bytes;
};
/** Per-layer budgets, every head the same count: float16 keys and values and an int32 position per kept token and head. */
const keptCounted = (x: CompressedCache) => {
  let bytes = 0;
  for (let l = 0; l < L; l++) bytes += x.tokenCount(l) * H * (2 * d * 2 + 4);
  return bytes;
};
/** TurboQuant at T tokens: per layer and row of d coordinates, packed codes, float16 norms, the QJL bits and residual norm. */
const turboBytes = (k: number, v: number, qjl = true) => {
  const N = T * H;
  return L * (Math.ceil((N * d * k) / 8) + 2 * N + (qjl ? Math.ceil((N * d) / 8) + 2 * N : 0) + Math.ceil((N * d * v) / 8) + 2 * N);
};
/** The (keyBits, valueBits) pairs by bytes, most first (ties: more key bits), recomputed here. */
const TURBO_PAIRS = [1, 2, 4]
  .flatMap((k) => [1, 2, 4].map((v) => [k, v]))
  .sort((a, b) => turboBytes(b[0], b[1]) - turboBytes(a[0], a[1]) || b[0] - a[0]);

const CASES: Case[] = [
  { name: 'snapkv', base: { window: 8, kernelSize: 5 }, target: 4, knob: 'budget', better: ({ tokens }) => ({ window: 8, kernelSize: 5, budget: tokens + 1 }), unreachable: 8 },
  { name: 'streamingllm', base: { sinks: 4 }, target: 5, knob: 'budget', better: ({ tokens }) => ({ sinks: 4, budget: tokens + 1 }), unreachable: 20 },
  { name: 'quant', base: {}, target: 2, knob: 'bits', better: () => ({ bits: 8 }), unreachable: 4 },
  { name: 'kivi', base: { quantGroupSize: 8, residualLength: 16 }, target: 2, knob: 'bits', better: () => ({ quantGroupSize: 8, residualLength: 16, bits: 4 }), unreachable: 3 },
  // The resolved start layer is the cache's own (startLayer + 1 is checked below).
  { name: 'minicache', base: {}, target: 1.3, knob: 'startLayer', better: () => null, unreachable: 3 },
  // Budgets (tokens per KV head and layer on average); the cache records the resolved budget.
  { name: 'adakv', base: { scorer: snap }, target: 4, knob: 'budget', better: ({ options }) => ({ scorer: snap, budget: (options.budget as number) + 1 }), unreachable: 8, counted: raggedCounted },
  { name: 'pyramidkv', base: { beta: 4, scorer: snap }, target: 4, knob: 'budget', better: ({ options }) => ({ beta: 4, scorer: snap, budget: (options.budget as number) + 1 }), unreachable: 8, counted: keptCounted },
  { name: 'expected-attention', base: { statistics: 'keys' }, target: 4, knob: 'budget', better: ({ tokens }) => ({ statistics: 'keys', budget: tokens + 1 }), unreachable: 100, counted: keptCounted },
  { name: 'kvzip', base: {}, target: 4, knob: 'budget', better: ({ options }) => ({ budget: (options.budget as number) + 1 }), unreachable: 100, counted: raggedCounted, reconstruction: true },
  {
    name: 'turboquant',
    base: { seed: 3 },
    target: 4,
    knob: 'keyBits/valueBits',
    better: ({ options }) => {
      const i = TURBO_PAIRS.findIndex(([k, v]) => k === options.keyBits && v === options.valueBits);
      expect(i).toBeGreaterThanOrEqual(0);
      return i === 0 ? null : { seed: 3, keyBits: TURBO_PAIRS[i - 1][0], valueBits: TURBO_PAIRS[i - 1][1] };
    },
    unreachable: 6,
    counted: (x) => turboBytes(optionsOf(x).keyBits as number, optionsOf(x).valueBits as number),
  },
  { name: 'kvzip', base: { layerwise: true, nSink: 2 }, target: 9, knob: 'budget', better: ({ options }) => ({ layerwise: true, nSink: 2, budget: (options.budget as number) + 1 }), unreachable: 100, counted: raggedCounted, reconstruction: true },
];

describe('target ratios, resolved per strategy from measured bytes', () => {
  let plain: KVCache;
  let withScores: KVCache;
  let start = 0;
  beforeAll(async () => {
    await selectBackend('cpu');
    start = tf.memory().numTensors;
    plain = syntheticCache(T);
    // KVzip's context-reconstruction scores [T, H_kv] per layer, as the runner hands them over.
    withScores = { ...plain, reconstructionScores: plain.keys.map((_, l) => tf.randomUniform([T, H], 0, 1, 'float32', 40 + l) as tf.Tensor2D) };
  });
  afterAll(() => {
    tf.dispose(withScores.reconstructionScores!);
    disposeKVCache(plain);
    expect(tf.memory().numTensors).toBe(start);
  });
  const dense = () => denseCacheBytes(plain.layout, T);

  for (const c of CASES) {
    it(`${c.name} ${JSON.stringify(c.base)}: targetRatio ${c.target} resolves ${c.knob}; the measured ratio reaches it and the next ${c.knob} does not`, async () => {
      const cache = c.reconstruction ? withScores : plain;
      expect(dense()).toBe(L * T * H * d * 2 * 2);
      const def = getStrategyDefinition(c.name);
      const opts = { ...c.base, targetRatio: c.target };
      expect(def.capabilities?.ratioTarget?.(parseStrategyOptions(c.name, opts))).toEqual({ target: c.target, knob: c.knob });
      expect(def.capabilities?.ratioTarget?.(parseStrategyOptions(c.name, c.base))).toBeNull();
      const s = createStrategy({ name: c.name, options: opts });
      const x = await s.compress(cache);
      expect(dense() / x.byteSize()).toBeGreaterThanOrEqual(c.target);
      if (c.counted) expect(c.counted(x)).toBe(x.byteSize());
      // kvpress's form gives the same cache.
      const y = await createStrategy({ name: c.name, options: { ...c.base, compressionRatio: 1 - 1 / c.target } }).compress(cache);
      expect(y.byteSize()).toBe(x.byteSize());
      // Round trip through the strategy (which resolves the knob again from T) and through the file.
      const bytes = x.serialize();
      const back = s.deserialize(bytes);
      expect(back.byteSize()).toBe(x.byteSize());
      const better = c.better({ tokens: x.tokenCount(0), options: optionsOf(x) });
      if (c.name === 'minicache') {
        const startLayer = (x as unknown as { startLayer: number }).startLayer;
        const b = await createStrategy({ name: c.name, options: { startLayer: startLayer + 1 } }).compress(cache);
        expect(dense() / b.byteSize()).toBeLessThan(c.target);
        b.dispose();
      } else if (better) {
        const b = await createStrategy({ name: c.name, options: better }).compress(cache);
        expect(dense() / b.byteSize()).toBeLessThan(c.target);
        if (c.counted) expect(c.counted(b)).toBe(b.byteSize());
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
    for (const [name, knob] of [
      ['snapkv', { budget: 32 }],
      ['streamingllm', { budget: 32 }],
      ['quant', { bits: 4 }],
      ['kivi', { bits: 2 }],
      ['minicache', { startLayer: 1 }],
      ['adakv', { budget: 64 }],
      ['pyramidkv', { budget: 64 }],
      ['expected-attention', { budget: 32 }],
      ['kvzip', { budget: 32 }],
      ['turboquant', { keyBits: 4 }],
      ['turboquant', { valueBits: 1 }],
    ] as const) {
      expect(() => parseStrategyOptions(name, { ...knob, targetRatio: 2 })).toThrow(/not both/);
      expect(() => parseStrategyOptions(name, { targetRatio: 2, compressionRatio: 0.75 })).toThrow(/disagree/);
      expect(parseStrategyOptions(name, { targetRatio: 4, compressionRatio: 0.75 })).toMatchObject({ targetRatio: 4 });
    }
  });
});
