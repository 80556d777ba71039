import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStrategy, disposeKVCache, selectBackend } from '@kvpack/core';
import '@kvpack/xkv';
import '@kvpack/baselines';
import { resolveConfig } from './config.js';
import { runBench, type BenchPrompt, type BenchRunResult } from './runner.js';
import { ToyModel } from './testing/toy-model.js';

const layout = { nLayers: 4, nHeads: 4, nKvHeads: 2, headDim: 8 };
let model: ToyModel;
let run: BenchRunResult;
let startTensors: number;
const ids = Array.from({ length: 48 }, (_, i) => (i * 7 + 3 + ((i * i) % 5)) % 48);
const prompts: BenchPrompt[] = [
  { name: 'a', contextIds: ids.slice(0, 36), continuationIds: ids.slice(36, 44) },
  { name: 'b', contextIds: ids.slice(4, 30), continuationIds: ids.slice(30, 40) },
];
const cfg = () =>
  resolveConfig(
    {
      model: 'toy',
      prompts: [{ ids: [1, 2, 3] }],
      strategies: [
        { name: 'dense', options: { storage: ['float32', 'float16'] } },
        { name: 'xkv', options: { layersPerGroup: 2, rankK: 4, rankV: 6 } },
        { name: 'streamingllm', options: { sinks: 2, budget: 12 } },
        { name: 'snapkv', options: { budget: 12, window: 4 } },
      ],
    },
    '/tmp',
  );

/** Post-RoPE key error recomputed in plain float64 loops (interleaved RoPE, theta 10000). */
function keyErrorSums(pre: Float32Array, post: Float32Array, T: number, H: number, d: number): { num: number; den: number } {
  let num = 0;
  let den = 0;
  for (let t = 0; t < T; t++)
    for (let h = 0; h < H; h++)
      for (let i = 0; i < d / 2; i++) {
        const o = (t * H + h) * d + 2 * i;
        const a = t * Math.pow(10000, (-2 * i) / d);
        const r0 = pre[o] * Math.cos(a) - pre[o + 1] * Math.sin(a);
        const r1 = pre[o] * Math.sin(a) + pre[o + 1] * Math.cos(a);
        num += (r0 - post[o]) ** 2 + (r1 - post[o + 1]) ** 2;
        den += r0 * r0 + r1 * r1;
      }
  return { num, den };
}

beforeAll(async () => {
  await selectBackend('wasm');
  model = new ToyModel(layout);
  startTensors = tf.memory().numTensors;
  run = await runBench(model, prompts, cfg().settings, { decodeTokens: 6, repeats: 2 });
});
afterAll(() => model.dispose());

describe('runBench (toy transformer)', () => {
  it('frees every tensor it made', () => {
    expect(tf.memory().numTensors).toBe(startTensors);
  });

  it('the decode path reproduces the uncompressed forward pass (self-check)', () => {
    for (const r of run.references) {
      expect(Math.abs(r.decodePathNllDelta)).toBeLessThan(1e-5);
      expect(r.greedyForwardAgreement).toBe(1);
      expect(r.greedyTokens).toHaveLength(6);
    }
  });

  it('dense float32: ΔNLL 0, agreement 1, ratio 0.5, zero error; float16: ratio 1', () => {
    const [f32, f16] = run.results;
    expect(Math.abs(f32.deltaNll)).toBeLessThan(1e-5);
    expect(f32.agreement).toBe(1);
    expect(f32.top1Agreement).toBe(1);
    expect(f32.firstDivergence).toBeNull();
    expect(f32.ratio).toBe(0.5);
    expect(f32.keyError).toBeLessThan(1e-6);
    expect(f32.valueError).toBe(0);
    expect(f16.ratio).toBe(1);
    expect(f16.keyError).toBeGreaterThan(0);
    expect(f16.keyError).toBeLessThan(1e-3); // fp16 rounding only
    expect(f32.tokens).toBe(35 + 25);
  });

  it("xkv's key and value errors equal a float64 re-computation pooled over layers and prompts", async () => {
    const xkv = run.results[2];
    const strategy = createStrategy({ name: 'xkv', options: { layersPerGroup: 2, rankK: 4, rankV: 6 } });
    const k = { num: 0, den: 0 };
    const v = { num: 0, den: 0 };
    let bytes = 0;
    for (const p of prompts) {
      const { logits, cache } = model.prefill(p.contextIds.slice(0, -1));
      logits.dispose();
      const c = await strategy.compress(cache);
      bytes += c.byteSize();
      const T = p.contextIds.length - 1;
      for (let l = 0; l < layout.nLayers; l++) {
        const kh = c.keys(l);
        const vh = c.values(l);
        const s = keyErrorSums(cache.keys[l].dataSync() as Float32Array, kh.dataSync() as Float32Array, T, layout.nKvHeads, layout.headDim);
        k.num += s.num;
        k.den += s.den;
        const v0 = cache.values[l].dataSync();
        const v1 = vh.dataSync();
        for (let i = 0; i < v0.length; i++) {
          v.num += (v0[i] - v1[i]) ** 2;
          v.den += v0[i] ** 2;
        }
        tf.dispose([kh, vh]);
      }
      c.dispose();
      disposeKVCache(cache);
    }
    expect(xkv.bytes).toBe(bytes);
    expect(xkv.keyError).toBeGreaterThan(0.01);
    expect(xkv.keyError!).toBeCloseTo(Math.sqrt(k.num / k.den), 5);
    expect(xkv.valueError!).toBeCloseTo(Math.sqrt(v.num / v.den), 5);
    expect(xkv.paperRatio).not.toBeNull();
    expect(xkv.agreement).toBe(xkv.perPrompt.reduce((a, p) => a + p.agreementMatches, 0) / 12);
  });

  it('eviction: errors N/A, StreamingLLM ratio = prefill tokens / budget, queries only for snapkv', () => {
    const [, , , sl, snap] = run.results;
    for (const r of [sl, snap]) {
      expect(r.keyError).toBeNull();
      expect(r.valueError).toBeNull();
      expect(Number.isFinite(r.deltaNll)).toBe(true);
    }
    expect(sl.ratio).toBeCloseTo((35 + 25) / 24, 12); // fp16 kept tokens, positions implied
    expect(snap.ratio).toBeGreaterThan(1); // kept tokens + their stored positions
    expect(snap.ratio).toBeLessThan(sl.ratio);
    expect(snap.observationWindow).toBe(4);
    expect(sl.observationWindow).toBeNull();
  });

  it('token-weighted NLL and pooled agreement over prompts', () => {
    const r = run.results[2];
    const [a, b] = r.perPrompt;
    expect(r.nll).toBeCloseTo((a.nll * 8 + b.nll * 10) / 18, 12);
    expect(r.nllReference).toBeCloseTo((a.nllReference * 8 + b.nllReference * 10) / 18, 12);
    expect(r.deltaNll).toBeCloseTo(r.nll - r.nllReference, 12);
    expect(r.compressMs).toBeGreaterThan(0);
    expect(a.compressMs).toHaveLength(2);
  });

  it('records a setting that throws a KvpackError and goes on', async () => {
    const c = resolveConfig({ model: 'toy', prompts: [{ ids: [1, 2, 3] }], strategies: [{ name: 'xkv', options: { layersPerGroup: 1, rankK: 17, rankV: 2 } }, { name: 'dense' }] }, '/tmp');
    const r = await runBench(model, prompts.slice(0, 1), c.settings, { decodeTokens: 0, repeats: 1 });
    expect(r.results[0].error).toMatch(/rank/);
    expect(r.results[1].error).toBeUndefined();
    expect(r.results[1].agreement).toBeNull();
  });

  it('rejects prompts longer than the model context', async () => {
    const long: BenchPrompt[] = [{ name: 'long', contextIds: new Array(250).fill(1), continuationIds: new Array(10).fill(2) }];
    await expect(runBench(model, long, cfg().settings.slice(0, 1), { decodeTokens: 0, repeats: 1 })).rejects.toThrow(/exceed the model's 256-token context/);
  });
});
