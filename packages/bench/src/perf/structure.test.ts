import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { selectBackend, type KVCache } from '@kvpack/core';
import { cacheStructure, decayExponent, structureTable, subspaceAlignment } from './structure.js';
import { attentionReadyLayer, denseDecodeStep, disposeAttentionReady } from './dense-step.js';

/** Cyclic Jacobi eigen-decomposition of a symmetric n×n matrix (float64): values descending, vectors as columns. */
function jacobiEig(A0: Float64Array, n: number): { values: number[]; vectors: Float64Array } {
  const A = Float64Array.from(A0);
  const V = new Float64Array(n * n);
  for (let i = 0; i < n; i++) V[i * n + i] = 1;
  for (let sweep = 0; sweep < 100; sweep++) {
    let off = 0;
    for (let p = 0; p < n; p++) for (let q = p + 1; q < n; q++) off += A[p * n + q] ** 2;
    if (off < 1e-26) break;
    for (let p = 0; p < n; p++) {
      for (let q = p + 1; q < n; q++) {
        const apq = A[p * n + q];
        if (Math.abs(apq) < 1e-300) continue;
        const theta = (A[q * n + q] - A[p * n + p]) / (2 * apq);
        const t = Math.sign(theta || 1) / (Math.abs(theta) + Math.sqrt(theta * theta + 1));
        const c = 1 / Math.sqrt(t * t + 1);
        const s = t * c;
        for (let k = 0; k < n; k++) {
          const akp = A[k * n + p];
          const akq = A[k * n + q];
          A[k * n + p] = c * akp - s * akq;
          A[k * n + q] = s * akp + c * akq;
        }
        for (let k = 0; k < n; k++) {
          const apk = A[p * n + k];
          const aqk = A[q * n + k];
          A[p * n + k] = c * apk - s * aqk;
          A[q * n + k] = s * apk + c * aqk;
        }
        for (let k = 0; k < n; k++) {
          const vkp = V[k * n + p];
          const vkq = V[k * n + q];
          V[k * n + p] = c * vkp - s * vkq;
          V[k * n + q] = s * vkp + c * vkq;
        }
      }
    }
  }
  const order = Array.from({ length: n }, (_, i) => i).sort((a, b) => A[b * n + b] - A[a * n + a]);
  const vectors = new Float64Array(n * n);
  order.forEach((src, j) => {
    for (let i = 0; i < n; i++) vectors[i * n + j] = V[i * n + src];
  });
  return { values: order.map((i) => A[i * n + i]), vectors };
}

/** Deterministic matrix with a well-separated spectrum: X = Σ_j s_j a_j b_jᵀ + small noise, row-major [T, F]. */
function testMatrix(T: number, F: number, seed: number, shared: Float64Array[] | null): { X: Float64Array; factors: Float64Array[] } {
  let st = seed >>> 0;
  const rnd = () => {
    st = (Math.imul(st, 1664525) + 1013904223) >>> 0;
    return st / 4294967296 - 0.5;
  };
  const X = new Float64Array(T * F);
  const factors: Float64Array[] = [];
  for (let j = 0; j < 4; j++) {
    // token factor: mostly the shared one (adjacent-layer alignment), plus its own part
    const a = new Float64Array(T);
    for (let t = 0; t < T; t++) a[t] = (shared ? 0.9 * shared[j][t] : 0) + rnd();
    factors.push(a);
    const b = Float64Array.from({ length: F }, () => rnd());
    const s = 4 / (j + 1);
    for (let t = 0; t < T; t++) for (let c = 0; c < F; c++) X[t * F + c] += s * a[t] * b[c];
  }
  for (let i = 0; i < X.length; i++) X[i] += 0.01 * rnd();
  for (let t = 0; t < T; t++) X[t * F + 5] *= 3; // an outlier channel
  return { X, factors };
}

const T = 40;
const H = 2;
const d = 6;
const F = H * d;
const L = 3;

let cache: KVCache;
const K: Float64Array[] = [];
const Vv: Float64Array[] = [];

beforeAll(async () => {
  await selectBackend('wasm');
  let prevK: Float64Array[] | null = null;
  let prevV: Float64Array[] | null = null;
  for (let l = 0; l < L; l++) {
    const k = testMatrix(T, F, 11 + l, prevK);
    const v = testMatrix(T, F, 101 + l, prevV);
    prevK = k.factors;
    prevV = v.factors;
    K.push(k.X);
    Vv.push(v.X);
  }
  cache = {
    layout: { nLayers: L, nHeads: 4, nKvHeads: H, headDim: d },
    rope: { theta: 10000, layout: 'half' },
    keys: K.map((x) => tf.tensor3d(Float32Array.from(x), [T, H, d])),
    values: Vv.map((x) => tf.tensor3d(Float32Array.from(x), [T, H, d])),
  };
});
afterAll(() => tf.dispose([...cache.keys, ...cache.values]));

/** The same metrics, in float64 with plain loops. */
function reference(xs: Float64Array[], ranks: number[], k: number) {
  const energy = ranks.map(() => 0);
  let outlier = 0;
  let align = 0;
  let cos = 0;
  let prevU: Float64Array | null = null;
  for (let l = 0; l < L; l++) {
    const X = xs[l];
    // singular values from XᵀX
    const G = new Float64Array(F * F);
    let tot = 0;
    for (let t = 0; t < T; t++)
      for (let i = 0; i < F; i++) {
        tot += X[t * F + i] ** 2;
        for (let j = 0; j < F; j++) G[i * F + j] += X[t * F + i] * X[t * F + j];
      }
    const ev = jacobiEig(G, F).values;
    ranks.forEach((r, i) => (energy[i] += ev.slice(0, r).reduce((a, b) => a + b, 0) / tot / L));
    // left singular vectors from XXᵀ
    const Gt = new Float64Array(T * T);
    for (let a = 0; a < T; a++) for (let b = 0; b < T; b++) for (let c = 0; c < F; c++) Gt[a * T + b] += X[a * F + c] * X[b * F + c];
    const U = jacobiEig(Gt, T).vectors; // columns
    if (prevU) {
      let s = 0;
      for (let i = 0; i < k; i++)
        for (let j = 0; j < k; j++) {
          let dot = 0;
          for (let t = 0; t < T; t++) dot += prevU[t * T + i] * U[t * T + j];
          s += dot * dot;
        }
      align += s / k / (L - 1);
      let cs = 0;
      const P = xs[l - 1];
      for (let t = 0; t < T; t++)
        for (let h = 0; h < H; h++) {
          let dot = 0;
          let na = 0;
          let nb = 0;
          for (let c = 0; c < d; c++) {
            const a = P[t * F + h * d + c];
            const b = X[t * F + h * d + c];
            dot += a * b;
            na += a * a;
            nb += b * b;
          }
          cs += dot / Math.sqrt(na * nb);
        }
      cos += cs / (T * H) / (L - 1);
    }
    prevU = U;
    const rms = Array.from({ length: F }, (_, c) => {
      let s = 0;
      for (let t = 0; t < T; t++) s += X[t * F + c] ** 2;
      return Math.sqrt(s / T);
    }).sort((a, b) => a - b);
    outlier += rms[F - 1] / ((rms[F / 2 - 1] + rms[F / 2]) / 2) / L;
  }
  return { energy, alignment: align, tokenCosine: cos, outlierRatio: outlier };
}

describe('structure metrics against a float64 computation', () => {
  it('energy, alignment, per-token cosine and outlier ratio agree on a small cache', async () => {
    const s = await cacheStructure(cache, 'small', { alignK: 3, energyRanks: [1 / 12, 2 / 12, 4 / 12] });
    expect(s.ranks).toEqual([1, 2, 4]);
    expect(s.alignChance).toBeCloseTo(3 / T, 12);
    for (const [mine, xs] of [
      [s.keys, K],
      [s.values, Vv],
    ] as const) {
      const ref = reference(xs, [1, 2, 4], 3);
      ref.energy.forEach((e, i) => expect(mine.energy[i]).toBeCloseTo(e, 4));
      expect(mine.alignment).toBeCloseTo(ref.alignment, 3);
      expect(mine.tokenCosine).toBeCloseTo(ref.tokenCosine, 4);
      expect(mine.outlierRatio).toBeCloseTo(ref.outlierRatio, 4);
      expect(ref.alignment).toBeGreaterThan(0.3); // the shared factors make it non-trivial
    }
    const md = structureTable([s]);
    expect(md).toMatch(/\| small \| 40 \| 3 \| 12 \| keys \(pre-RoPE\) \|/);
    expect(md.split('\n')).toHaveLength(4);
  });

  it('subspace alignment of two planes at angle θ is (1 + cos²θ)/2; decay of an exact power law', async () => {
    const th = 0.7;
    const A = tf.tensor2d([1, 0, 0, 1, 0, 0, 0, 0], [4, 2]);
    const B = tf.tensor2d([1, 0, 0, Math.cos(th), 0, Math.sin(th), 0, 0], [4, 2]);
    expect(await subspaceAlignment(A, B)).toBeCloseTo((1 + Math.cos(th) ** 2) / 2, 6);
    tf.dispose([A, B]);
    expect(decayExponent(Array.from({ length: 20 }, (_, j) => 3 * (j + 1) ** -0.7))).toBeCloseTo(0.7, 10);
  });
});

describe('dense decode step over an attention-ready layer', () => {
  it('equals softmax(q·Kᵀ/√d)·V per GQA group, computed in float64', async () => {
    const N = 10;
    const Hq = 4;
    const g = Hq / H;
    const kd = Float32Array.from({ length: N * H * d }, (_, i) => Math.sin(i * 0.37));
    const vd = Float32Array.from({ length: N * H * d }, (_, i) => Math.cos(i * 0.11));
    const qd = Float32Array.from({ length: Hq * d }, (_, i) => Math.sin(i * 1.3) * 2);
    const k = tf.tensor3d(kd, [N, H, d]);
    const v = tf.tensor3d(vd, [N, H, d]);
    const q = tf.tensor3d(qd, [1, Hq, d]);
    const ready = attentionReadyLayer(k, v);
    const out = denseDecodeStep(q, ready);
    const got = await out.data();
    for (let h = 0; h < Hq; h++) {
      const kh = Math.floor(h / g);
      const sc = Array.from({ length: N }, (_, t) => {
        let s = 0;
        for (let c = 0; c < d; c++) s += qd[h * d + c] * kd[(t * H + kh) * d + c];
        return s / Math.sqrt(d);
      });
      const m = Math.max(...sc);
      const e = sc.map((x) => Math.exp(x - m));
      const z = e.reduce((a, b) => a + b, 0);
      for (let c = 0; c < d; c++) {
        let o = 0;
        for (let t = 0; t < N; t++) o += (e[t] / z) * vd[(t * H + kh) * d + c];
        expect(got[h * d + c]).toBeCloseTo(o, 5);
      }
    }
    disposeAttentionReady(ready);
    tf.dispose([k, v, q, out]);
  });
});
