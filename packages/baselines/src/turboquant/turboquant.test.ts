import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, createStrategy, selectBackend, type ModelLayout } from '@kvpack/core';
import { runStrategyConformance } from '@kvpack/core/conformance';
import { fwht, lloydMaxCodebook, qjlMatrix, rotationInnerProducts, type RotationCodes, type RotationSetup } from '@kvpack/strategy-utils';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import './index.js'; // registers the strategy
import type { TurboQuantCache } from './index.js';
import { attend64 } from '../testing/eviction-oracle.js';
import { f16, randomCache, take, type RandomCache } from '../testing/testkit.js';

runStrategyConformance('turboquant', {
  compressing: { keyBits: 2, valueBits: 2, seed: 5 },
  noLosslessReason: 'a quantizer: every setting rounds the rotated coordinates to a codebook',
  badOptions: [{ keyBits: 3 }, { valueBits: 8 }, { seed: -1 }, { qjl: 'yes' }],
});

/** Sylvester's Hadamard matrix entry (−1)^popcount(i & j). */
const had = (i: number, j: number) => {
  let x = i & j;
  let p = 0;
  while (x) {
    p ^= x & 1;
    x >>= 1;
  }
  return p ? -1 : 1;
};

/** Γ via Lanczos (float64), for the closed form of E|y|. */
function gamma(z: number): number {
  const g = 7;
  const c = [0.99999999999980993, 676.5203681218851, -1259.1392167224028, 771.32342877765313, -176.61502916214059, 12.507343278686905, -0.13857109526572012, 9.9843695780195716e-6, 1.5056327351493116e-7];
  if (z < 0.5) return Math.PI / (Math.sin(Math.PI * z) * gamma(1 - z));
  z -= 1;
  let x = c[0];
  for (let i = 1; i < g + 2; i++) x += c[i] / (z + i);
  const t = z + g + 0.5;
  return Math.sqrt(2 * Math.PI) * Math.pow(t, z + 0.5) * Math.exp(-t) * x;
}

describe('rotation quantizer parts against float64', () => {
  beforeAll(() => selectBackend('wasm'));

  it('the fast Walsh–Hadamard transform equals the product with Sylvester\'s matrix', () => {
    const d = 32;
    const x = Float32Array.from({ length: 3 * d }, (_, i) => Math.sin(i * 1.3) * 2);
    const t = tf.tensor2d(x, [3, d]);
    const got = take(fwht(t as tf.Tensor2D));
    t.dispose();
    for (let r = 0; r < 3; r++)
      for (let j = 0; j < d; j++) {
        let s = 0;
        for (let i = 0; i < d; i++) s += x[r * d + i] * had(i, j);
        expect(Math.abs(got[r * d + j] - s)).toBeLessThan(1e-5);
      }
  });

  it('the codebook meets the Lloyd–Max conditions for the sphere coordinate density (independent integration), and 1 bit gives ±E|y| in closed form', () => {
    for (const d of [16, 64]) {
      const cb1 = lloydMaxCodebook(d, 1);
      const mean = gamma(d / 2) / (Math.sqrt(Math.PI) * gamma((d + 1) / 2));
      expect(Math.abs(cb1.centroids[1] - mean)).toBeLessThan(1e-6);
      expect(Math.abs(cb1.centroids[0] + mean)).toBeLessThan(1e-6);
      for (const bits of [2, 4] as const) {
        const { centroids: c, thresholds: t } = lloydMaxCodebook(d, bits);
        // Density (1 − y²)^((d−3)/2) integrated by Simpson's rule in y over each cell.
        const f = (y: number) => Math.pow(Math.max(0, 1 - y * y), (d - 3) / 2);
        const integ = (a: number, b: number, g: (y: number) => number) => {
          const n = 4000;
          const h = (b - a) / n;
          let s = g(a) + g(b);
          for (let i = 1; i < n; i++) s += (i % 2 ? 4 : 2) * g(a + i * h);
          return (s * h) / 3;
        };
        const edges = [-1, ...t, 1];
        for (let k = 0; k < c.length; k++) {
          const m = integ(edges[k], edges[k + 1], (y) => y * f(y)) / integ(edges[k], edges[k + 1], f);
          expect(Math.abs(m - c[k]), `d ${d} bits ${bits} centroid ${k}`).toBeLessThan(1e-5);
          expect(Math.abs(c[k] + c[c.length - 1 - k])).toBeLessThan(1e-9); // symmetric
        }
        for (let k = 0; k < t.length; k++) expect(t[k]).toBeCloseTo((c[k] + c[k + 1]) / 2, 15);
      }
    }
  });

  it('the QJL estimator ‖r‖·√(π/2)/m·⟨S·q, sign(S·r)⟩ is unbiased over S (400 seeds, within 4 standard errors)', () => {
    const d = 16;
    const q = Array.from({ length: d }, (_, i) => Math.cos(i * 0.7) + 0.3);
    const r = q.map((x, i) => 0.5 * x + 0.2 * Math.sin(i * 1.1));
    const rn = Math.sqrt(r.reduce((a, x) => a + x * x, 0));
    const truth = q.reduce((a, x, i) => a + x * r[i], 0);
    const est: number[] = [];
    for (let seed = 1; seed <= 400; seed++) {
      const S = qjlMatrix(seed, d, d);
      let dot = 0;
      for (let i = 0; i < d; i++) {
        let sq = 0;
        let sr = 0;
        for (let j = 0; j < d; j++) {
          sq += S[i * d + j] * q[j];
          sr += S[i * d + j] * r[j];
        }
        dot += sq * (sr >= 0 ? 1 : -1);
      }
      est.push((rn * Math.sqrt(Math.PI / 2) * dot) / d);
    }
    const mean = est.reduce((a, b) => a + b, 0) / est.length;
    const sd = Math.sqrt(est.reduce((a, x) => a + (x - mean) ** 2, 0) / (est.length - 1));
    expect(Math.abs(mean - truth)).toBeLessThan((4 * sd) / Math.sqrt(est.length));
    // A wrong scale (√(2/π) for √(π/2)) would miss by far more than that.
    expect(Math.abs(mean * (2 / Math.PI) - truth)).toBeGreaterThan((4 * sd) / Math.sqrt(est.length));
  });
});

describe('turboquant: stored codes, reconstruction and the attention estimator against float64', () => {
  const layout: ModelLayout = { nLayers: 2, nHeads: 4, nKvHeads: 2, headDim: 16 };
  const { nKvHeads: H, nHeads: Hq, headDim: d } = layout;
  const T = 24;
  let rc: RandomCache;
  beforeAll(async () => {
    await selectBackend('wasm');
    rc = randomCache(T, layout, 41, 8);
  });
  afterAll(() => rc.dispose());

  /** Checks one set of quantized rows against float64; returns the float64 reconstruction (with the QJL term when there is one). */
  function check64(x: Float32Array, q: RotationCodes, setup: RotationSetup, what: string): number[][] {
    const N = q.rows;
    const codes = take(q.codes.unpack());
    const norms = take(q.norms.unpack());
    const signs = q.signs ? take(q.signs.unpack()) : null;
    const rnorms = q.residualNorms ? take(q.residualNorms.unpack()) : null;
    const { centroids: c, thresholds: t } = setup.codebook;
    const out: number[][] = [];
    for (let i = 0; i < N; i++) {
      const row = Array.from(x.subarray(i * d, (i + 1) * d));
      const n = Math.sqrt(row.reduce((a, v) => a + v * v, 0));
      expect(Math.abs(norms[i] - f16(n)), `${what} row ${i} norm`).toBeLessThanOrEqual(Math.abs(f16(n)) * 2 ** -10);
      // y = Π·x/‖x‖ with Π = H·D/√d.
      const y = Array.from({ length: d }, (_, j) => row.reduce((a, v, k) => a + had(j, k) * setup.signs[k] * v, 0) / Math.sqrt(d) / n);
      for (let j = 0; j < d; j++) {
        const want = t.filter((th) => th < y[j]).length;
        const nearTie = t.some((th) => Math.abs(th - y[j]) < 1e-5);
        if (!nearTie) expect(codes[i * d + j], `${what} row ${i} coordinate ${j} code`).toBe(want);
      }
      // x̂ = ‖x‖·Πᵀ·c[code] from the stored parts.
      const yq = Array.from({ length: d }, (_, j) => c[codes[i * d + j]]);
      const xh = Array.from({ length: d }, (_, k) => (norms[i] * setup.signs[k] * yq.reduce((a, v, j) => a + had(k, j) * v, 0)) / Math.sqrt(d));
      if (signs && rnorms && setup.qjl) {
        const r = row.map((v, k) => v - xh[k]);
        const rn = Math.sqrt(r.reduce((a, v) => a + v * v, 0));
        expect(Math.abs(rnorms[i] - f16(rn)), `${what} row ${i} residual norm`).toBeLessThanOrEqual(f16(rn) * 2 ** -9 + 1e-7);
        const { S, m } = setup.qjl;
        const z: number[] = [];
        for (let p = 0; p < m; p++) {
          let s = 0;
          for (let k = 0; k < d; k++) s += S[p * d + k] * r[k];
          if (Math.abs(s) > 1e-4 * rn) expect(signs[i * m + p], `${what} row ${i} sign ${p}`).toBe(s >= 0 ? 1 : 0);
          z.push(signs[i * m + p] ? 1 : -1);
        }
        out.push(xh.map((v, k) => v + (rnorms[i] * Math.sqrt(Math.PI / 2) * z.reduce((a, zz, p) => a + zz * S[p * d + k], 0)) / m));
      } else out.push(xh);
    }
    return out;
  }

  for (const o of [{ keyBits: 2, valueBits: 4, qjl: true, seed: 3 }, { keyBits: 1, valueBits: 1, qjl: false, seed: 9 }] as const)
    it(`keys ${o.keyBits} bits${o.qjl ? ' + QJL' : ''}, values ${o.valueBits} bits: codes, norms, sketch, reconstruction, logits and attention; bytes as counted`, async () => {
      const n0 = tf.memory().numTensors;
      const c = (await createStrategy({ name: 'turboquant', options: o }).compress(rc.cache)) as TurboQuantCache;
      for (let l = 0; l < layout.nLayers; l++) {
        const { keys: kq, values: vq, setup } = c.quantized(l);
        const k64 = check64(rc.postKeys[l], kq, setup.key, `layer ${l} keys`);
        const v64 = check64(rc.values[l], vq, setup.value, `layer ${l} values`);
        const kk = take(c.keys(l));
        const vv = take(c.values(l));
        for (let i = 0; i < T * H; i++)
          for (let j = 0; j < d; j++) {
            expect(Math.abs(kk[i * d + j] - k64[i][j])).toBeLessThan(2e-5 * (1 + Math.abs(k64[i][j])));
            expect(Math.abs(vv[i * d + j] - v64[i][j])).toBeLessThan(2e-5 * (1 + Math.abs(v64[i][j])));
          }
        // Logits of query head 0 over the rows of KV head 0 (rows t·H): the estimator on the backend vs float64.
        const qh = Array.from({ length: 3 }, (_, r) => Array.from({ length: d }, (_, j) => Math.sin(r * 5 + j)));
        const qt = tf.tensor2d(qh.flat(), [3, d]);
        const logits = take(rotationInnerProducts(qt as tf.Tensor2D, kq, setup.key)); // [3, T·H]
        qt.dispose();
        for (let r = 0; r < 3; r++) for (let i = 0; i < T * H; i++) expect(Math.abs(logits[r * T * H + i] - qh[r].reduce((a, x, j) => a + x * k64[i][j], 0))).toBeLessThan(1e-4);
        // Attention of one decode query over the whole prefill.
        const q = Float32Array.from({ length: Hq * d }, (_, i) => Math.cos(i * 0.37));
        const qq = tf.tensor3d(q, [1, Hq, d]);
        const got = take(c.attend(l, qq, { causalTail: 0 }));
        qq.dispose();
        for (let a = 0; a < Hq; a++) {
          const h = Math.floor(a / (Hq / H));
          const rows = Array.from({ length: T }, (_, t) => t * H + h);
          const want = attend64(q.subarray(a * d, (a + 1) * d), rows.map((i) => k64[i]), rows.map((i) => v64[i]));
          for (let j = 0; j < d; j++) expect(Math.abs(got[a * d + j] - want[j])).toBeLessThan(1e-4);
        }
      }
      const N = T * H;
      const perLayer = Math.ceil((N * d * o.keyBits) / 8) + 2 * N + (o.qjl ? Math.ceil((N * d) / 8) + 2 * N : 0) + Math.ceil((N * d * o.valueBits) / 8) + 2 * N;
      expect(c.byteSize()).toBe(layout.nLayers * perLayer);
      c.dispose();
      expect(tf.memory().numTensors).toBe(n0);
    });

  it('refuses a head_dim that is not a power of two, leaving nothing allocated', async () => {
    const odd = randomCache(8, { nLayers: 1, nHeads: 2, nKvHeads: 1, headDim: 12 }, 3, 2);
    const n0 = tf.memory().numTensors;
    const err = await createStrategy({ name: 'turboquant', options: {} })
      .compress(odd.cache)
      .then(() => null, (e: unknown) => e);
    expect(err).toBeInstanceOf(KvpackError);
    expect((err as KvpackError).message).toMatch(/head_dim 12 is not a power of two/);
    expect(tf.memory().numTensors).toBe(n0);
    odd.dispose();
  });
});
