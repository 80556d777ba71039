import * as tf from '@tensorflow/tfjs-core';
import { applyRope, createStrategy, selectBackend, type KVCache, type ModelLayout } from '@kvpack/core';
import { runStrategyConformance } from '@kvpack/core/conformance';
import { expectedAttentionScores, type ExpectedAttentionScorerOptions, type KeptTokensCache, type RaggedKeptCache } from '@kvpack/strategy-utils';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import './index.js'; // registers the strategy
import '../adakv/index.js';
import { randomCache, type RandomCache } from '../testing/testkit.js';

runStrategyConformance('expected-attention', {
  compressing: { budget: 24, nFuturePositions: 32 },
  lossless: { budget: 64 },
  badOptions: [{ budget: 0 }, { epsilon: -1 }, { statistics: 'values' }, { nFuturePositions: 0 }],
});

/** RoPE rotation matrix at position p (interleaved pairs, θ = 10000: the test cache's), d × d float64. */
function rotation(p: number, d: number): number[][] {
  const R = Array.from({ length: d }, () => new Array(d).fill(0));
  for (let i = 0; i < d / 2; i++) {
    const a = p * Math.pow(10000, (-2 * i) / d);
    R[2 * i][2 * i] = Math.cos(a);
    R[2 * i][2 * i + 1] = -Math.sin(a);
    R[2 * i + 1][2 * i] = Math.sin(a);
    R[2 * i + 1][2 * i + 1] = Math.cos(a);
  }
  return R;
}
const matVec = (M: number[][], x: number[]) => M.map((r) => r.reduce((a, m, j) => a + m * x[j], 0));
const matMul = (A: number[][], B: number[][]) => A.map((r) => B[0].map((_, j) => r.reduce((a, x, k) => a + x * B[k][j], 0)));
const tr = (A: number[][]) => A[0].map((_, j) => A.map((r) => r[j]));

/**
 * Float64 Expected Attention scores of one layer [H_kv][T], from the method's description: the
 * Gaussian statistics of the samples (pre-RoPE queries of tokens ≥ nSink, per query head; or pre-RoPE
 * keys of tokens ≥ nSink, per KV head), moved by the mean of the RoPE rotation matrices of positions
 * T … T + n − 1; the expected logit exp-argument of each post-RoPE key; softmax over the tokens after
 * the sinks, mean over the group, times ‖v‖; sinks +∞.
 */
function refScores(
  samples: number[][][], // [S][n][d] pre-RoPE
  postKeys: Float32Array,
  values: Float32Array,
  T: number,
  layout: ModelLayout,
  o: { nFuture: number; nSink: number; cov: boolean; vnorm: boolean; eps: number },
): number[][] {
  const { nKvHeads: H, headDim: d } = layout;
  const S = samples.length;
  const g = S / H;
  const Rbar = Array.from({ length: d }, () => new Array(d).fill(0));
  for (let p = T; p < T + o.nFuture; p++) {
    const R = rotation(p, d);
    for (let i = 0; i < d; i++) for (let j = 0; j < d; j++) Rbar[i][j] += R[i][j] / o.nFuture;
  }
  const stats = samples.map((xs) => {
    const mu = new Array(d).fill(0);
    for (const x of xs) for (let c = 0; c < d; c++) mu[c] += x[c] / xs.length;
    const cov = Array.from({ length: d }, (_, i) => Array.from({ length: d }, (_, j) => xs.reduce((a, x) => a + (x[i] - mu[i]) * (x[j] - mu[j]), 0) / xs.length));
    return { mu: matVec(Rbar, mu), cov: matMul(matMul(Rbar, cov), tr(Rbar)) };
  });
  const out: number[][] = [];
  for (let h = 0; h < H; h++) {
    const avg = new Array(T - o.nSink).fill(0);
    for (let a = h * g; a < (h + 1) * g; a++) {
      const z = [];
      for (let t = o.nSink; t < T; t++) {
        const k = Array.from({ length: d }, (_, c) => postKeys[(t * H + h) * d + c]);
        let e = k.reduce((s, x, c) => s + x * stats[a].mu[c], 0) / Math.sqrt(d);
        if (o.cov) e += matVec(stats[a].cov, k).reduce((s, x, c) => s + x * k[c], 0) / (2 * d);
        z.push(e);
      }
      const m = Math.max(...z);
      const zs = z.reduce((s, x) => s + Math.exp(x - m), 0);
      z.forEach((x, i) => (avg[i] += Math.exp(x - m) / zs / g));
    }
    const row = avg.map((p, i) => {
      const t = o.nSink + i;
      const vn = Math.sqrt(Array.from({ length: d }, (_, c) => values[(t * H + h) * d + c] ** 2).reduce((a, b) => a + b, 0));
      return o.vnorm ? (p + o.eps) * vn : p;
    });
    out.push([...new Array(o.nSink).fill(Infinity), ...row]);
  }
  return out;
}

/** Un-rotates post-RoPE rows of one head at position p in float64 (Rᵀ·x). */
function unrotate(x: number[], p: number): number[] {
  return matVec(tr(rotation(p, x.length)), x);
}

describe('expected attention: scores against a direct float64 computation', () => {
  const layout: ModelLayout = { nLayers: 2, nHeads: 4, nKvHeads: 2, headDim: 16 };
  const { nKvHeads: H, nHeads: Hq, headDim: d } = layout;
  const T = 48;
  const tObs = 12;
  let rc: RandomCache;
  beforeAll(async () => {
    await selectBackend('wasm');
    rc = randomCache(T, layout, 31, tObs);
  });
  afterAll(() => rc.dispose());

  const querySamples = (l: number, nSink: number, window = tObs) =>
    Array.from({ length: Hq }, (_, qh) =>
      Array.from({ length: tObs }, (_, i) => i)
        .filter((i) => T - tObs + i >= nSink && i >= tObs - window)
        .map((i) => unrotate(Array.from(rc.queries[l].subarray((i * Hq + qh) * d, (i * Hq + qh + 1) * d)), T - tObs + i)),
    );
  const keySamples = (l: number, nSink: number, scale: number) =>
    Array.from({ length: H }, (_, h) => Array.from({ length: T - nSink }, (_, i) => Array.from(rc.keys[l].subarray(((nSink + i) * H + h) * d, ((nSink + i) * H + h + 1) * d), (x) => Math.fround(x * scale))));

  const cases: [string, Partial<ExpectedAttentionScorerOptions>, 'queries' | 'keys'][] = [
    ['queries, covariance, value norm', { nFuturePositions: 64, nSink: 4, epsilon: 0.01 }, 'queries'],
    ['queries, mean only, no value norm', { nFuturePositions: 7, nSink: 0, useCovariance: false, useValueNorm: false }, 'queries'],
    ['the last 5 queries only', { nFuturePositions: 20, nSink: 0, queryWindow: 5 }, 'queries'],
    ['keys (no queries), covariance', { nFuturePositions: 100, nSink: 2, statistics: 'auto' }, 'keys'],
  ];
  for (const [what, over, source] of cases)
    it(what, () => {
      const o: ExpectedAttentionScorerOptions = { name: 'expected-attention', nFuturePositions: 512, nSink: 4, useCovariance: true, useValueNorm: true, epsilon: 0, statistics: 'auto', queryWindow: 64, ...over };
      const n0 = tf.memory().numTensors;
      // The keys' own statistics are wider than the queries' (per-channel scales up to 4.5): scaled by
      // 1/4 there, so that the expected attention is not one-hot and every term shows in the scores.
      const scale = source === 'keys' ? 0.25 : 1;
      const keys = rc.cache.keys.map((k) => tf.mul(k, scale) as tf.Tensor3D);
      const cache: KVCache = source === 'keys' ? { ...rc.cache, keys, queries: undefined } : rc.cache;
      for (let l = 0; l < layout.nLayers; l++) {
        const post = applyRope(cache.keys[l], rc.cache.rope, { start: 0, count: T });
        const postHost = Float32Array.from(post.dataSync());
        const s = expectedAttentionScores(cache, l, o, post);
        const got = s.dataSync();
        tf.dispose([s, post]);
        const samples = source === 'queries' ? querySamples(l, o.nSink, o.queryWindow) : keySamples(l, o.nSink, scale);
        const want = refScores(samples, postHost, rc.values[l], T, layout, { nFuture: o.nFuturePositions, nSink: o.nSink, cov: o.useCovariance, vnorm: o.useValueNorm, eps: o.epsilon }).flat();
        const top = Math.max(...want.filter(Number.isFinite));
        expect(top, 'the scores are spread, not one-hot').toBeLessThan(0.5 * want.filter(Number.isFinite).reduce((a, b) => a + b, 0));
        for (let i = 0; i < want.length; i++) {
          if (want[i] === Infinity) expect(got[i]).toBe(Infinity);
          else expect(Math.abs(got[i] - want[i]), `layer ${l} score ${i}`).toBeLessThan(2e-5 * top);
        }
      }
      tf.dispose(keys);
      expect(tf.memory().numTensors).toBe(n0);
    });

  it('the strategy keeps per head the sinks and the top scores; AdaKV runs over the same scorer', async () => {
    const o = { budget: 16, nFuturePositions: 64, nSink: 4 };
    const c = (await createStrategy({ name: 'expected-attention', options: o }).compress(rc.cache)) as KeptTokensCache;
    const a = (await createStrategy({ name: 'adakv', options: { budget: 16, scorer: { name: 'expected-attention', nFuturePositions: 64, nSink: 4 } } }).compress(rc.cache)) as RaggedKeptCache;
    for (let l = 0; l < layout.nLayers; l++) {
      const want = refScores(querySamples(l, 4), rc.postKeys[l], rc.values[l], T, layout, { nFuture: 64, nSink: 4, cov: true, vnorm: true, eps: 0 });
      const pos = c.keptPositions(l);
      const flat = want.flat();
      const kthAll = [...flat].sort((x, y) => y - x)[16 * H - 1];
      for (let h = 0; h < H; h++) {
        const kept = Array.from({ length: 16 }, (_, j) => pos[j * H + h]);
        expect(kept.slice(0, 4)).toEqual([0, 1, 2, 3]);
        const kth = [...want[h]].sort((x, y) => y - x)[15];
        const keptA = Array.from(a.keptPositions(l, h));
        for (let t = 4; t < T; t++) {
          const tol = 1e-5 * kth;
          if (kept.includes(t)) expect(want[h][t]).toBeGreaterThanOrEqual(kth - tol);
          else expect(want[h][t]).toBeLessThanOrEqual(kth + tol);
          // AdaKV: the layer's 16·H_kv best over both heads, after the ⌊0.2·16⌋ = 3 safeguard (the sinks already +∞).
          if (keptA.includes(t)) expect(want[h][t]).toBeGreaterThanOrEqual(kthAll - 1e-5 * kthAll);
          else expect(want[h][t]).toBeLessThanOrEqual(kthAll + 1e-5 * kthAll);
        }
      }
    }
    c.dispose();
    a.dispose();
  });
});
