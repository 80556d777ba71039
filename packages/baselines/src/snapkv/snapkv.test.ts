import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, MAX_TOKENS, applyRope, createStrategy, selectBackend, type ModelLayout } from '@kvpack/core';
import './index.js'; // registers the strategy
import { runStrategyConformance, expectOptionBounds } from '@kvpack/core/conformance';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { KeptTokensCache } from '@kvpack/strategy-utils';
import { pool1d, snapkvVotes, type SnapKvOptions } from './index.js';
import { pool1dHost } from './oracle.js';
import { f16, randomCache, take, type RandomCache } from '../testing/testkit.js';

runStrategyConformance('snapkv', {
  compressing: { budget: 24, window: 8, kernelSize: 5 },
  lossless: { budget: 64, window: 8 },
  // The synthetic MLA cache carries absorbed-form queries of its last 8 tokens.
  mla: { lossless: { budget: 64, window: 8 } },
  badOptions: [{ budget: 8, window: 8 }, { kernelSize: 4 }, { pooling: 'sum' }, { window: 0 }],
  // The synthetic cache's queries cover its last 8 tokens.
  failingCompress: [{ budget: 24, window: 16 }],
});

/**
 * Float64 SnapKV scores of one layer, written from the paper's description: for each KV head, the
 * softmax attention of each window query (causal within the window) over all T keys, the weights of
 * the T − w prefix keys summed over the window queries and averaged over the GQA group's query heads,
 * then pooled (avg: zero-padded mean over the kernel; max: over the valid neighbours).
 */
function refScores(q: Float32Array, k: Float32Array, T: number, w: number, layout: ModelLayout, kernel: number, pooling: 'avg' | 'max'): number[][] {
  const { nHeads: Hq, nKvHeads: H, headDim: d } = layout;
  const g = Hq / H;
  const out: number[][] = [];
  for (let h = 0; h < H; h++) {
    const vote = new Array(T - w).fill(0);
    for (let qh = h * g; qh < (h + 1) * g; qh++) {
      for (let i = 0; i < w; i++) {
        const visible = T - w + i + 1;
        const logits: number[] = [];
        for (let j = 0; j < visible; j++) {
          let s = 0;
          for (let c = 0; c < d; c++) s += q[((T - w + i - (T - 8)) * Hq + qh) * d + c] * k[(j * H + h) * d + c];
          logits.push(s / Math.sqrt(d));
        }
        const m = Math.max(...logits);
        const z = logits.reduce((a, x) => a + Math.exp(x - m), 0);
        for (let j = 0; j < T - w; j++) vote[j] += Math.exp(logits[j] - m) / z / g;
      }
    }
    const r = (kernel - 1) / 2;
    out.push(
      vote.map((_, i) => {
        const nb = vote.slice(Math.max(0, i - r), Math.min(T - w, i + r + 1));
        return pooling === 'avg' ? nb.reduce((a, x) => a + x, 0) / kernel : Math.max(...nb);
      }),
    );
  }
  return out;
}

describe('snapkv: kept tokens against a direct float64 computation', () => {
  const layout: ModelLayout = { nLayers: 2, nHeads: 4, nKvHeads: 2, headDim: 16 };
  const { nKvHeads: H, headDim: d } = layout;
  const T = 64;
  let rc: RandomCache;
  beforeAll(async () => {
    await selectBackend('wasm');
    rc = randomCache(T, layout, 13, 8); // queries of the last 8 prompt tokens
  });
  afterAll(() => rc.dispose());

  for (const [pooling, w] of [['avg', 8], ['max', 6]] as const) {
    it(`${pooling} pooling, window ${w}: per-head top-k of the votes plus the window`, async () => {
      const o = { budget: 20, window: w, kernelSize: 7, pooling } satisfies SnapKvOptions;
      const c = (await createStrategy({ name: 'snapkv', options: o }).compress(rc.cache)) as KeptTokensCache;
      const k = o.budget - w;
      let differ = false;
      for (let l = 0; l < layout.nLayers; l++) {
        expect(c.tokenCount(l)).toBe(o.budget);
        const pos = c.keptPositions(l);
        const keys = take(c.keys(l));
        const values = take(c.values(l));
        const scores = refScores(rc.queries[l], rc.postKeys[l], T, w, layout, 7, pooling);
        for (let h = 0; h < H; h++) {
          const mine = Array.from({ length: o.budget }, (_, j) => pos[j * H + h]);
          expect(mine.slice(k)).toEqual(Array.from({ length: w }, (_, i) => T - w + i)); // the window
          const chosen = mine.slice(0, k);
          expect([...chosen].sort((a, b) => a - b)).toEqual(chosen);
          expect(new Set(chosen).size).toBe(k);
          // top-k of the float64 scores (up to float32 noise at near-ties)
          const kth = [...scores[h]].sort((a, b) => b - a)[k - 1];
          for (let p = 0; p < T - w; p++) {
            if (chosen.includes(p)) expect(scores[h][p]).toBeGreaterThanOrEqual(kth - 1e-6);
            else expect(scores[h][p]).toBeLessThanOrEqual(kth + 1e-6);
          }
          // rows hold float16 post-RoPE keys and values of the head's own tokens
          mine.forEach((p, j) => {
            for (let ch = 0; ch < d; ch++) {
              expect(keys[(j * H + h) * d + ch]).toBe(Math.fround(f16(rc.postKeys[l][(p * H + h) * d + ch])));
              expect(values[(j * H + h) * d + ch]).toBe(Math.fround(f16(rc.values[l][(p * H + h) * d + ch])));
            }
          });
        }
        if (Array.from({ length: k }, (_, j) => pos[j * H] !== pos[j * H + 1]).some(Boolean)) differ = true;
      }
      expect(differ).toBe(true); // KV heads really keep different tokens
      expect(c.byteSize()).toBe(layout.nLayers * (2 * o.budget * H * d * 2 + o.budget * H * 4));
      c.dispose();
    });
  }

  it('votes and pooled scores (on the backend) equal the float64 computation', async () => {
    const w = 6;
    const n0 = tf.memory().numTensors;
    for (let l = 0; l < layout.nLayers; l++) {
      const q = rc.cache.queries![l].slice([8 - w, 0, 0], [w, layout.nHeads, d]);
      const k = applyRope(rc.cache.keys[l], rc.cache.rope, { start: 0, count: T });
      const votes = snapkvVotes(q, k);
      tf.dispose([q, k]);
      for (const pooling of ['avg', 'max'] as const) {
        const pooled = pool1d(votes, 5, pooling);
        const got = await pooled.data();
        pooled.dispose();
        const ref = refScores(rc.queries[l], rc.postKeys[l], T, w, layout, 5, pooling).flat();
        expect(got.length).toBe(ref.length);
        const scale = Math.max(...ref);
        for (let i = 0; i < ref.length; i++) expect(Math.abs(got[i] - ref[i])).toBeLessThan(1e-5 * scale);
      }
      votes.dispose();
    }
    expect(tf.memory().numTensors).toBe(n0);
  });

  for (const backend of ['wasm', 'cpu'])
    it(`${backend}: backend pooling equals the float64 host pooling, kernels wider than the row included`, async () => {
      await selectBackend(backend);
      const rows = 3;
      const n = 11;
      // Values with ties and negatives; exact in float32 and in every partial sum.
      const x = Float32Array.from({ length: rows * n }, (_, i) => ((i * 7) % 5) - 2 + (i % 3) * 0.25);
      const xt = tf.tensor2d(x, [rows, n]);
      for (const kernel of [1, 3, 7, 23])
        for (const mode of ['avg', 'max'] as const) {
          const p = pool1d(xt, kernel, mode);
          const got = await p.data();
          p.dispose();
          const want = pool1dHost(x, rows, n, kernel, mode);
          for (let i = 0; i < want.length; i++) expect(Math.abs(got[i] - want[i]), `${mode} ${kernel} [${i}]`).toBeLessThanOrEqual(Math.abs(want[i]) * 2 ** -22);
        }
      xt.dispose();
      await selectBackend('wasm');
    });

  it('needs the observation-window queries', async () => {
    const s = createStrategy({ name: 'snapkv', options: { budget: 20, window: 8 } });
    const noQ = { ...rc.cache, queries: undefined };
    await expect(s.compress(noQ)).rejects.toThrow(KvpackError);
    await expect(s.compress(noQ)).rejects.toThrow(/model runner must provide them.*observationWindow/);
    const wide = createStrategy({ name: 'snapkv', options: { budget: 40, window: 16 } });
    await expect(wide.compress(rc.cache)).rejects.toThrow(/covers 8 prompt tokens but the observation window is 16/);
  });
});

describe('snapkv option bounds', () => {
  it('budget ≤ 2^20 tokens, window and kernelSize ≤ 2^20 − 1: accepted at the bound, a config error naming it past it', () => {
    expectOptionBounds('snapkv', [
      { option: 'budget', bound: MAX_TOKENS, at: (v) => ({ budget: v }) },
      { option: 'window', bound: MAX_TOKENS - 1, at: (v) => ({ budget: MAX_TOKENS, window: v }) },
      { option: 'kernelSize', bound: MAX_TOKENS - 1, at: (v) => ({ kernelSize: v }) },
    ]);
  });
});
