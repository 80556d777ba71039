// The device randomized SVD on a WebGPU adapter (a software one such as Mesa's lavapipe is enough;
// see scripts/webgpu-software.sh): the one-dispatch WGSL Cholesky of a Gram matrix and the range
// finder built on it, against float64 oracles. Without an adapter the suite is skipped and says why.
import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { HalfTensor, countWebGpuDispatches, deviceCholesky, encodeHalf, relativeFrobeniusError, selectBackend, sparseSignDense, sparseSignMatrix, sparseSignProductWgsl, sparseSignRowsProductWgsl, truncatedSvd, truncatedSvdBatch, wgslValidationErrors } from './index.js';
import { GRAM_CHOL_SHIFT, gramCholInverseWgsl, gramCholInverseWgslBatch } from './gram-chol-wgsl.js';
import { mulberry32, normalPair } from './random.js';

const unavailable = await selectBackend('webgpu').then(
  () => null,
  (e: Error) => e.message.split('\n')[0],
);
const title = unavailable ? `device truncatedSvd (SKIPPED: no WebGPU adapter: ${unavailable})` : 'device truncatedSvd (webgpu)';
if (unavailable) console.warn(`[kvpack] ${title}`);

function gaussian64(n: number, seed: number): Float64Array {
  const u = mulberry32(seed);
  const out = new Float64Array(n);
  for (let i = 0; i < n; i += 2) {
    const [a, b] = normalPair(1 - u(), u());
    out[i] = a;
    if (i + 1 < n) out[i + 1] = b;
  }
  return out;
}

/** Orthonormal columns [m, n] (row-major) by modified Gram–Schmidt twice, in float64. */
function orthonormal64(m: number, n: number, seed: number): Float64Array {
  const A = gaussian64(m * n, seed);
  for (let pass = 0; pass < 2; pass++)
    for (let j = 0; j < n; j++) {
      for (let i = 0; i < j; i++) {
        let d = 0;
        for (let t = 0; t < m; t++) d += A[t * n + i] * A[t * n + j];
        for (let t = 0; t < m; t++) A[t * n + j] -= d * A[t * n + i];
      }
      let s = 0;
      for (let t = 0; t < m; t++) s += A[t * n + j] ** 2;
      s = Math.sqrt(s);
      for (let t = 0; t < m; t++) A[t * n + j] /= s;
    }
  return A;
}

/**
 * X = U·diag(σ)·Vᵀ [T, F] with a planted spectrum (power law σ_j ∝ (j+1)^(−decay) over an isotropic
 * floor holding the fraction `noise` of the energy, the synthetic caches' model), U, V orthonormal
 * in float64; returns X (float32) and σ (float64), so the exact truncated-SVD error is closed form.
 */
function planted(T: number, F: number, decay: number, noise: number, seed: number): { data: Float32Array; sigma: Float64Array } {
  const n = Math.min(T, F);
  const w = Float64Array.from({ length: n }, (_, j) => (j + 1) ** (-2 * decay));
  const sw = w.reduce((a, b) => a + b, 0);
  const sigma = Float64Array.from(w, (x) => Math.sqrt(((1 - noise) * x) / sw + noise / n));
  const U = orthonormal64(T, n, seed);
  const V = orthonormal64(F, n, seed + 1);
  const data = new Float32Array(T * F);
  for (let t = 0; t < T; t++)
    for (let f = 0; f < F; f++) {
      let s = 0;
      for (let j = 0; j < n; j++) s += U[t * n + j] * sigma[j] * V[f * n + j];
      data[t * F + f] = s;
    }
  return { data, sigma };
}

function exactErrorOf(sigma: Float64Array, r: number): number {
  const tot = sigma.reduce((a, s) => a + s * s, 0);
  return Math.sqrt(sigma.slice(r).reduce((a, s) => a + s * s, 0) / tot);
}

/** max |QᵀQ − I| of Q [m, n] (row-major float32), in float64. */
function orthogonalityError(q: Float32Array, m: number, n: number): number {
  let worst = 0;
  for (let a = 0; a < n; a++)
    for (let b = a; b < n; b++) {
      let d = 0;
      for (let t = 0; t < m; t++) d += q[t * n + a] * q[t * n + b];
      worst = Math.max(worst, Math.abs(d - (a === b ? 1 : 0)));
    }
  return worst;
}

describe.skipIf(unavailable !== null)(title, { timeout: 600_000 }, () => {
  it('the WGSL Gram Cholesky gives W upper triangular with S·W orthonormal, and equals the float64 R⁻¹ of G + s·I (one block, several, padded)', async () => {
    expect(deviceCholesky(64)).toBe(true);
    for (const [m, n, seed] of [
      [40, 1, 1],
      [90, 37, 2],
      [200, 64, 4],
      [300, 130, 3],
    ]) {
      const s = gaussian64(m * n, seed);
      const S = tf.tensor2d(Float32Array.from(s), [m, n]);
      const before = tf.memory().numTensors;
      const G = tf.matMul(S, S, true, false);
      const W = gramCholInverseWgsl(G);
      const w = (await W.data()) as Float32Array;
      tf.dispose([G]);
      // Float64 oracle: G64 = SᵀS + shift·I, Cholesky, R⁻¹ by back substitution.
      const g = new Float64Array(n * n);
      for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) for (let t = 0; t < m; t++) g[i * n + j] += s[t * n + i] * s[t * n + j];
      let maxDiag = 0;
      for (let i = 0; i < n; i++) maxDiag = Math.max(maxDiag, g[i * n + i]);
      for (let i = 0; i < n; i++) g[i * n + i] += GRAM_CHOL_SHIFT * maxDiag;
      const L = new Float64Array(n * n);
      for (let j = 0; j < n; j++) {
        let d = g[j * n + j];
        for (let q = 0; q < j; q++) d -= L[j * n + q] ** 2;
        L[j * n + j] = Math.sqrt(d);
        for (let i = j + 1; i < n; i++) {
          let v = g[i * n + j];
          for (let q = 0; q < j; q++) v -= L[i * n + q] * L[j * n + q];
          L[i * n + j] = v / L[j * n + j];
        }
      }
      // Linv (lower) by forward substitution; W64 = Linvᵀ.
      const Li = new Float64Array(n * n);
      for (let c = 0; c < n; c++)
        for (let i = c; i < n; i++) {
          let v = i === c ? 1 : 0;
          for (let q = c; q < i; q++) v -= L[i * n + q] * Li[q * n + c];
          Li[i * n + c] = v / L[i * n + i];
        }
      let num = 0;
      let den = 0;
      for (let i = 0; i < n; i++)
        for (let j = 0; j < n; j++) {
          const ref = Li[j * n + i];
          if (j < i) expect(w[i * n + j]).toBe(0);
          num += (w[i * n + j] - ref) ** 2;
          den += ref * ref;
        }
      expect(Math.sqrt(num / den)).toBeLessThan(1e-4);
      const Q = tf.matMul(S, W);
      expect(orthogonalityError((await Q.data()) as Float32Array, m, n)).toBeLessThan(1e-3);
      tf.dispose([Q, W]);
      expect(tf.memory().numTensors).toBe(before);
      S.dispose();
    }
    // A singular Gram matrix (rank 3 of 12) stays finite: the shift bounds every pivot.
    const S = tf.matMul(tf.randomNormal([50, 3], 0, 1, 'float32', 4), tf.randomNormal([3, 12], 0, 1, 'float32', 5)) as tf.Tensor2D;
    const G = tf.matMul(S, S, true, false);
    const W = gramCholInverseWgsl(G);
    expect(Array.from((await W.data()) as Float32Array).every(Number.isFinite)).toBe(true);
    tf.dispose([S, G, W]);
    expect(await wgslValidationErrors()).toEqual([]);
  });

  it('factors a batch of Gram matrices, of different sizes, in the same ⌈max k/32⌉ + 1 dispatches, each W bit for bit the one factored alone', async () => {
    const sizes = [70, 70, 40, 1, 33];
    const Ss = sizes.map((n, i) => tf.tensor2d(Float32Array.from(gaussian64(90 * n, 5 + i)), [90, n]));
    const Gs = Ss.map((S) => tf.matMul(S, S, true, false) as tf.Tensor2D);
    const before = tf.memory().numTensors;
    const alone = await Promise.all(Gs.map(async (G) => { const W = gramCholInverseWgsl(G); const d = await W.data(); W.dispose(); return d; }));
    const first = await countWebGpuDispatches(() => gramCholInverseWgslBatch(Gs.slice(0, 3)));
    // One pad (40 → 70), a stack, ⌈70/32⌉ + 1 = 4 steps, one slice per matrix.
    expect(first.dispatches).toBe(1 + 1 + 4 + 3);
    tf.dispose(first.result);
    // Five matrices: a chunk of GRAM_CHOL_BATCH = 4, then one.
    const Ws = gramCholInverseWgslBatch(Gs);
    for (let b = 0; b < sizes.length; b++) {
      expect(Ws[b].shape).toEqual([sizes[b], sizes[b]]);
      expect(Array.from(await Ws[b].data()), `matrix ${b} (k = ${sizes[b]})`).toEqual(Array.from(alone[b]));
    }
    tf.dispose(Ws);
    expect(tf.memory().numTensors).toBe(before);
    expect(() => gramCholInverseWgslBatch([])).toThrow(/no matrices/);
    const wide = tf.zeros([3, 4]) as tf.Tensor2D;
    expect(() => gramCholInverseWgslBatch([Gs[0], wide])).toThrow(/square/);
    tf.dispose([wide, ...Gs, ...Ss]);
    expect(await wgslValidationErrors()).toEqual([]);
  });

  it('the sparse sign product X·Ω gathers exactly the float64 product (rows not a multiple of 4, k below ζ), and the range finder with it stays near the exact SVD', async () => {
    for (const [M, n, k] of [
      [37, 50, 24],
      [9, 30, 5],
    ] as const) {
      const x = gaussian64(M * n, M + n);
      const X = tf.tensor2d(Float32Array.from(x), [M, n]);
      const s = sparseSignMatrix(n, k, 3);
      const ptr = tf.tensor1d(s.ptr, 'int32');
      const ent = tf.tensor1d(s.entries, 'int32');
      const before = tf.memory().numTensors;
      const Y = sparseSignProductWgsl(X, s, ptr, ent);
      expect(Y.shape).toEqual([M, k]);
      const y = await Y.data();
      Y.dispose();
      expect(tf.memory().numTensors).toBe(before);
      const d = sparseSignDense(s);
      let worst = 0;
      for (let t = 0; t < M; t++)
        for (let j = 0; j < k; j++) {
          let ref = 0;
          for (let f = 0; f < n; f++) ref += Math.fround(x[t * n + f]) * d[f * k + j];
          worst = Math.max(worst, Math.abs(y[t * k + j] - ref));
        }
      expect(worst).toBeLessThan(1e-5);
      expect(() => sparseSignProductWgsl(tf.zeros([2, n + 1]) as tf.Tensor2D, s, ptr, ent)).toThrow(/test matrix is/);
      tf.dispose([X, ptr, ent]);
      // Ω'ᵀ·X of the row-space sketch: Ω' [M, k] over X's rows, X [M, n] (n not a multiple of 4).
      const sr = sparseSignMatrix(M, k, 4);
      const ptrR = tf.tensor1d(sr.ptr, 'int32');
      const entR = tf.tensor1d(sr.entries, 'int32');
      const Xr = tf.tensor2d(Float32Array.from(x), [M, n]);
      const Z = sparseSignRowsProductWgsl(Xr, sr, ptrR, entR);
      expect(Z.shape).toEqual([k, n]);
      const z = await Z.data();
      const dr = sparseSignDense(sr);
      let worstR = 0;
      for (let j = 0; j < k; j++)
        for (let f = 0; f < n; f++) {
          let ref = 0;
          for (let t = 0; t < M; t++) ref += dr[t * k + j] * Math.fround(x[t * n + f]);
          worstR = Math.max(worstR, Math.abs(z[j * n + f] - ref));
        }
      expect(worstR).toBeLessThan(1e-5);
      tf.dispose([Z, Xr, ptrR, entR]);
    }
    const T = 384, F = 192, r = 24;
    const { data, sigma } = planted(T, F, 1.0, 0.02, 9);
    const X = tf.tensor2d(data, [T, F]);
    const before = tf.memory().numTensors;
    for (const powerIters of [1, 1.5]) {
      const f = await truncatedSvd(X, { rank: r, oversample: 0, powerIters, orthogonalization: 'device', seed: 3, sketch: 'sparse-sign' });
      const A = tf.matMul(f.basis, f.coeffs);
      const err = await relativeFrobeniusError(X, A);
      tf.dispose([A, f.basis, f.coeffs]);
      expect(tf.memory().numTensors).toBe(before);
      expect(err / exactErrorOf(sigma, r), `q ${powerIters}`).toBeLessThan(1.1);
    }
    X.dispose();
    expect(await wgslValidationErrors()).toEqual([]);
  });

  it('truncatedSvdBatch factors keys-and-values-like pairs (ranks 64 and 96) in lockstep: each result bit for bit its truncatedSvd, fewer dispatches', async () => {
    const T = 256, F = 128, ranks = [64, 96];
    const Xs = [11, 12].map((seed) => tf.tensor2d(planted(T, F, 1.0, 0.02, seed).data, [T, F]));
    const items = Xs.map((X) => tf.split(X, [64, 64], 1) as tf.Tensor2D[]);
    const before = tf.memory().numTensors;
    const opts = { oversample: 0, powerIters: 1, orthogonalization: 'device' as const, seed: 2 };
    const alone = await countWebGpuDispatches(() => Promise.all(items.map((X, i) => truncatedSvd(X, { ...opts, rank: ranks[i] }))));
    const both = await countWebGpuDispatches(() => truncatedSvdBatch(items.map((blocks, i) => ({ blocks, rank: ranks[i] })), opts));
    for (let i = 0; i < 2; i++) {
      expect(Array.from(await both.result[i].basis.data())).toEqual(Array.from(await alone.result[i].basis.data()));
      for (let b = 0; b < 2; b++) expect(Array.from(await both.result[i].coeffs[b].data())).toEqual(Array.from(await alone.result[i].coeffs[b].data()));
    }
    // Four orthonormalizations at q = 1: a batch runs ⌈96/32⌉ + 1 = 4 factorization steps instead of
    // 3 + 4, for a pad and a stack: one dispatch fewer each.
    expect(both.dispatches).toBe(alone.dispatches! - 4);
    for (const f of [...alone.result, ...both.result]) tf.dispose([f.basis, ...f.coeffs]);
    expect(tf.memory().numTensors).toBe(before);
    tf.dispose([...items.flat(), ...Xs]);
    expect(await wgslValidationErrors()).toEqual([]);
  });

  it.each([
    [1, 0, 0.1],
    [2, 16, 0.02],
  ] as const)('device range finder (powerIters %s, oversample %i) on a planted power-law spectrum: orthonormal basis, error within %s of the exact truncated SVD, blocks = whole, no leak', async (q, p, tol) => {
    const T = 384, F = 192, r = 24;
    const { data, sigma } = planted(T, F, 1.0, 0.02, 9);
    const X = tf.tensor2d(data, [T, F]);
    const blocks = tf.split(X, [48, 48, 48, 48], 1) as tf.Tensor2D[];
    const before = tf.memory().numTensors;
    const f = await truncatedSvd(X, { rank: r, oversample: p, powerIters: q, orthogonalization: 'device', seed: 3 });
    const fb = await truncatedSvd(blocks, { rank: r, oversample: p, powerIters: q, orthogonalization: 'device', seed: 3 });
    expect(orthogonalityError((await f.basis.data()) as Float32Array, T, r)).toBeLessThan(1e-4);
    const A = tf.matMul(f.basis, f.coeffs);
    const err = await relativeFrobeniusError(X, A);
    const ref = exactErrorOf(sigma, r);
    expect(err).toBeGreaterThanOrEqual(ref * (1 - 1e-4));
    expect(err / ref - 1).toBeLessThan(tol);
    const Ab = tf.tidy(() => tf.matMul(fb.basis, tf.concat(fb.coeffs, 1)));
    expect(await relativeFrobeniusError(A, Ab)).toBeLessThan(1e-4);
    tf.dispose([A, Ab, f.basis, f.coeffs, fb.basis, ...fb.coeffs]);
    expect(tf.memory().numTensors).toBe(before);
    tf.dispose([X, ...blocks]);
  });

  it('HalfTensor.fromTensor packs on the device in one kernel, bit-identical to the host encoding (ties to even, subnormals, overflow, ±0, ±Inf, NaN)', async () => {
    const vals: number[] = [0, -0, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 65504, 65519.99, 65520, -70000, Infinity, -Infinity, NaN, 2 ** -24, 2 ** -25, 3 * 2 ** -26, 2 ** -25 * 1.0001, -(2 ** -14) * 0.75, 1e-40, -1e-40];
    const u = mulberry32(17);
    for (let i = 0; i < 4001; i++) {
      const e = Math.floor(u() * 50) - 30;
      vals.push((u() - 0.5) * 2 ** e);
    }
    // Exact float16 midpoints in every binade (ties must go to the even neighbour).
    for (let e = -24; e < 16; e++) vals.push((1 + 2 ** -11) * 2 ** e, -(1 + 3 * 2 ** -11) * 2 ** e);
    const want = Float32Array.from(vals);
    const x = tf.tensor1d(want);
    const before = tf.memory().numTensors;
    const h = await HalfTensor.fromTensor(x);
    const words = new Uint32Array(((await h.packed.data()) as Int32Array).buffer.slice(0));
    const got = new Uint16Array(want.length);
    for (let i = 0; i < want.length; i++) got[i] = (words[i >> 1] >>> (16 * (i & 1))) & 0xffff;
    expect(Array.from(got)).toEqual(Array.from(encodeHalf(want)));
    h.dispose();
    expect(tf.memory().numTensors).toBe(before);
    x.dispose();
  });
});
