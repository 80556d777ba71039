import * as tf from '@tensorflow/tfjs-core';
import { createStrategy, selectBackend, type ModelLayout } from '@kvpack/core';
import { runStrategyConformance } from '@kvpack/core/conformance';
import type { RaggedKeptCache } from '@kvpack/strategy-utils';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import './index.js'; // registers the strategy
import { attend64, snapkvScores64 } from '../testing/eviction-oracle.js';
import { f16, randomCache, take, type RandomCache } from '../testing/testkit.js';

runStrategyConformance('adakv', {
  compressing: { budget: 24, alphaSafeguard: 0.25, scorer: { name: 'snapkv', window: 8, kernelSize: 5 } },
  lossless: { budget: 64, scorer: { name: 'snapkv', window: 8 } },
  badOptions: [{ budget: 8, scorer: { name: 'snapkv', window: 8 } }, { alphaSafeguard: 1.5 }, { scorer: { name: 'h2o' } }, { scorer: { name: 'snapkv', kernelSize: 4 } }],
  // The synthetic cache's queries cover its last 8 tokens.
  failingCompress: [{ budget: 24, scorer: { name: 'snapkv', window: 16 } }],
});

describe('adakv: head-wise budgets against a direct float64 computation', () => {
  const layout: ModelLayout = { nLayers: 2, nHeads: 4, nKvHeads: 2, headDim: 16 };
  const { nKvHeads: H, nHeads: Hq, headDim: d } = layout;
  const T = 64;
  let rc: RandomCache;
  beforeAll(async () => {
    await selectBackend('wasm');
    rc = randomCache(T, layout, 17, 8);
  });
  afterAll(() => rc.dispose());

  for (const alpha of [0, 0.5])
    it(`alpha ${alpha}: the layer keeps its B·H_kv best scores over all heads, each head at least ⌊αB⌋ of its own best; attend equals float64 attention over each head's kept tokens`, async () => {
      const B = 20;
      const w = 2;
      const n0 = tf.memory().numTensors;
      const c = (await createStrategy({ name: 'adakv', options: { budget: B, alphaSafeguard: alpha, scorer: { name: 'snapkv', window: w, kernelSize: 7 } } }).compress(rc.cache)) as RaggedKeptCache;
      let uneven = false;
      for (let l = 0; l < layout.nLayers; l++) {
        const scores = snapkvScores64(rc.queries[l], 8, rc.postKeys[l], T, w, layout, 7, 'avg');
        // The safeguard: each head's own ⌊αB⌋ best (ties to the lower position) become +∞.
        const safe = Math.floor(alpha * B);
        const marked = scores.map((row) => {
          const order = row.map((s, t) => [s, t] as const).sort((a, b) => b[0] - a[0] || a[1] - b[1]);
          const out = [...row];
          for (let i = 0; i < safe; i++) out[order[i][1]] = Infinity;
          return out;
        });
        const flat = marked.flat();
        const kth = [...flat].sort((a, b) => b - a)[B * H - 1];
        const counts = c.headCounts(l);
        expect(counts.reduce((a, b) => a + b, 0)).toBe(B * H);
        if (counts[0] !== counts[1]) uneven = true;
        const keys = take(c.keys(l));
        const values = take(c.values(l));
        expect(c.tokenCount(l)).toBe(Math.max(...counts));
        for (let h = 0; h < H; h++) {
          const kept = Array.from(c.keptPositions(l, h));
          expect(kept.length).toBe(counts[h]);
          expect(kept.length).toBeGreaterThanOrEqual(Math.max(safe, w));
          expect([...kept].sort((a, b) => a - b)).toEqual(kept);
          for (let t = 0; t < T; t++) {
            const s = marked[h][t];
            if (kept.includes(t)) expect(s === Infinity || s >= kth - 1e-6, `layer ${l} head ${h} token ${t} kept below the k-th score`).toBe(true);
            else expect(s <= kth + 1e-6, `layer ${l} head ${h} token ${t} dropped above the k-th score`).toBe(true);
          }
          // Rows: float16 post-RoPE keys and values of the head's own tokens, then zero padding.
          kept.forEach((p, j) => {
            for (let ch = 0; ch < d; ch++) {
              expect(keys[(j * H + h) * d + ch]).toBe(Math.fround(f16(rc.postKeys[l][(p * H + h) * d + ch])));
              expect(values[(j * H + h) * d + ch]).toBe(Math.fround(f16(rc.values[l][(p * H + h) * d + ch])));
            }
          });
          for (let j = kept.length; j < c.tokenCount(l); j++) for (let ch = 0; ch < d; ch++) expect(keys[(j * H + h) * d + ch]).toBe(0);
        }
        // One decode token, then attention of a decode query: each head over its kept tokens and the new one.
        const nk = Float32Array.from({ length: H * d }, (_, i) => Math.sin(i + l));
        const nv = Float32Array.from({ length: H * d }, (_, i) => Math.cos(2 * i + l));
        const kt = tf.tensor3d(nk, [1, H, d]);
        const vt = tf.tensor3d(nv, [1, H, d]);
        c.append(l, kt, vt);
        tf.dispose([kt, vt]);
        const q = Float32Array.from({ length: Hq * d }, (_, i) => Math.sin(3 * i + 1) * 1.5);
        const qt = tf.tensor3d(q, [1, Hq, d]);
        const got = take(c.attend(l, qt, { causalTail: 1 }));
        qt.dispose();
        for (let qh = 0; qh < Hq; qh++) {
          const h = Math.floor(qh / (Hq / H));
          const kept = Array.from(c.keptPositions(l, h));
          const ks = [...kept.map((p) => Array.from({ length: d }, (_, ch) => f16(rc.postKeys[l][(p * H + h) * d + ch]))), Array.from(nk.subarray(h * d, (h + 1) * d))];
          const vs = [...kept.map((p) => Array.from({ length: d }, (_, ch) => f16(rc.values[l][(p * H + h) * d + ch]))), Array.from(nv.subarray(h * d, (h + 1) * d))];
          const want = attend64(q.subarray(qh * d, (qh + 1) * d), ks, vs);
          for (let ch = 0; ch < d; ch++) expect(Math.abs(got[qh * d + ch] - want[ch])).toBeLessThan(1e-5);
        }
      }
      expect(uneven).toBe(true); // heads really keep different counts
      // Bytes: exactly the ragged rows (float16 keys and values), positions and counts, plus the decode tokens.
      expect(c.byteSize()).toBe(layout.nLayers * (2 * B * H * d * 2 + B * H * 4 + H * 4 + 2 * H * d * 4));
      c.dispose();
      expect(tf.memory().numTensors).toBe(n0);
    });
});
