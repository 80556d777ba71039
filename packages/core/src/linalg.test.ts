import * as tf from '@tensorflow/tfjs-core';
import { Matrix, QrDecomposition, SingularValueDecomposition } from 'ml-matrix';
import { beforeAll, describe, expect, it } from 'vitest';
import {
  selectBackend,
  truncatedSvd,
  relativeFrobeniusError,
  KvpackError,
  orthonormalize,
  orthonormalizeDevice,
  resolveOrthogonalization,
  gaussianMatrix,
  MAX_ORTHONORMALIZE_PASSES,
  MAX_OVERSAMPLE,
  MAX_POWER_ITERS,
  MAX_SEED,
} from './index.js';

beforeAll(async () => {
  await selectBackend('wasm');
});

/** Low-rank-plus-noise test matrix with a decaying spectrum, drawn from a fixed seed. */
function testMatrix(T: number, F: number, seed: number): Float32Array {
  const U = tf.randomNormal([T, 24], 0, 1, 'float32', seed);
  const V = tf.randomNormal([24, F], 0, 1, 'float32', seed + 1);
  const s = tf.tensor1d(Array.from({ length: 24 }, (_, i) => Math.pow(0.8, i))).reshape([24, 1]);
  const X = tf.tidy(() => tf.matMul(U, V.mul(s)).add(tf.randomNormal([T, F], 0, 0.01, 'float32', seed + 2)));
  const out = X.dataSync() as Float32Array;
  tf.dispose([U, V, s, X]);
  return out;
}

/** Exact float64 truncated-SVD error from ml-matrix's SVD: sqrt(Σ_{i>r} σ_i²)/‖X‖_F. */
function exactError(data: Float32Array, T: number, F: number, r: number): number {
  const rows = Array.from({ length: T }, (_, i) => Array.from(data.subarray(i * F, (i + 1) * F)));
  const sv = new SingularValueDecomposition(new Matrix(rows), { computeLeftSingularVectors: false, computeRightSingularVectors: false }).diagonal;
  const tot = sv.reduce((a, s) => a + s * s, 0);
  const tail = sv.slice(r).reduce((a, s) => a + s * s, 0);
  return Math.sqrt(tail / tot);
}

describe('truncatedSvd', () => {
  it.each([
    [96, 40, 6],
    [40, 96, 6],
    [64, 64, 12],
  ])('exact mode matches a float64 SVD on [%i, %i] at rank %i', async (T, F, r) => {
    const data = testMatrix(T, F, 7);
    const X = tf.tensor2d(data, [T, F]);
    const { basis, coeffs, singularValues } = await truncatedSvd(X, { rank: r, exact: true });
    expect(basis.shape).toEqual([T, r]);
    expect(coeffs.shape).toEqual([r, F]);
    const A = tf.matMul(basis, coeffs);
    const err = await relativeFrobeniusError(X, A);
    const ref = exactError(data, T, F, r);
    expect(Math.abs(err - ref) / ref).toBeLessThan(0.01);
    expect(singularValues![0]).toBeGreaterThan(singularValues![r - 1]);
    tf.dispose([X, basis, coeffs, A]);
  });

  it('randomized mode is within 10% of the exact error and deterministic under a seed', async () => {
    const T = 200, F = 120, r = 10;
    const data = testMatrix(T, F, 3);
    const X = tf.tensor2d(data, [T, F]);
    const a = await truncatedSvd(X, { rank: r, seed: 5 });
    const b = await truncatedSvd(X, { rank: r, seed: 5 });
    const A = tf.matMul(a.basis, a.coeffs);
    const err = await relativeFrobeniusError(X, A);
    expect(Math.abs(err - exactError(data, T, F, r)) / exactError(data, T, F, r)).toBeLessThan(0.1);
    expect(Array.from(a.coeffs.dataSync())).toEqual(Array.from(b.coeffs.dataSync()));
    tf.dispose([X, A, a.basis, a.coeffs, b.basis, b.coeffs]);
  });

  it('column blocks [X_1 … X_G] give the factors of the concatenated X, blockwise, without concatenating (every path)', async () => {
    const T = 90, widths = [16, 24, 16], F = 56;
    const data = testMatrix(T, F, 11);
    const X = tf.tensor2d(data, [T, F]);
    const blocks = tf.split(X, widths, 1) as tf.Tensor2D[];
    const cases = [
      { rank: 6, powerIters: 1, orthogonalization: 'host' as const },
      { rank: 6, powerIters: 1.5, oversample: 4, orthogonalization: 'host' as const },
      { rank: 6, powerIters: 0, orthogonalization: 'device' as const },
      { rank: 6, powerIters: 2, orthogonalization: 'device' as const },
      { rank: 5, exact: true },
    ];
    const n0 = tf.memory().numTensors;
    for (const o of cases) {
      const whole = await truncatedSvd(X, { ...o, seed: 3 });
      const parts = await truncatedSvd(blocks, { ...o, seed: 3 });
      expect(parts.coeffs.map((c) => c.shape)).toEqual(widths.map((w) => [o.rank, w]));
      const joined = tf.concat(parts.coeffs, 1);
      // Same Ω, same arithmetic up to summation order: the same rank-r approximation.
      const A = tf.matMul(whole.basis, whole.coeffs);
      const B = tf.matMul(parts.basis, joined);
      expect(await relativeFrobeniusError(A, B), JSON.stringify(o)).toBeLessThan(1e-4);
      tf.dispose([whole.basis, whole.coeffs, parts.basis, ...parts.coeffs, joined, A, B]);
    }
    expect(tf.memory().numTensors).toBe(n0);
    await expect(truncatedSvd([X, tf.zeros([3, 2]) as tf.Tensor2D], { rank: 2 })).rejects.toThrow(/equal row counts/);
    tf.dispose([X, ...blocks]);
  });

  it('rejects rank 0 and rank above min(T, F) by name, and leaks no tensors', async () => {
    const X = tf.zeros([10, 4]) as tf.Tensor2D;
    const before = tf.memory().numTensors;
    await expect(truncatedSvd(X, { rank: 0 })).rejects.toThrow(/rank 0 is out of range/);
    await expect(truncatedSvd(X, { rank: 5 })).rejects.toBeInstanceOf(KvpackError);
    const X2 = tf.randomNormal([30, 20], 0, 1, 'float32', 1) as tf.Tensor2D;
    for (let i = 0; i < 3; i++) {
      const f = await truncatedSvd(X2, { rank: 4 });
      tf.dispose([f.basis, f.coeffs]);
    }
    expect(tf.memory().numTensors).toBe(before + 1);
    tf.dispose([X, X2]);
  });

  /** A [T, F] matrix with singular values σ_i = ratio^(i/(n−1)) (i < n) and orthonormal factors, plus its σ. */
  function conditioned(T: number, F: number, n: number, ratio: number, seed: number): { data: Float32Array; sigma: number[] } {
    const U = new Matrix(Array.from({ length: T }, (_, i) => Array.from({ length: n }, (_, j) => Math.sin(seed + 1.3 * i * (j + 1) + 0.7 * j * j) + Math.cos(seed * (i + 2) + j))));
    const V = new Matrix(Array.from({ length: F }, (_, i) => Array.from({ length: n }, (_, j) => Math.cos(seed + 0.9 * i * (j + 2) + 0.3 * j) + Math.sin(2 * seed + i * j * 0.11))));
    const Uq = new QrDecomposition(U).orthogonalMatrix.subMatrix(0, T - 1, 0, n - 1);
    const Vq = new QrDecomposition(V).orthogonalMatrix.subMatrix(0, F - 1, 0, n - 1);
    const sigma = Array.from({ length: n }, (_, i) => Math.pow(ratio, i / (n - 1)));
    const X = Uq.mmul(Matrix.diag(sigma)).mmul(Vq.transpose());
    return { data: Float32Array.from(X.to1DArray()), sigma };
  }

  /** max |QᵀQ − I| in float64 from Q's float32 values. */
  function orthogonalityError(q: Float32Array, m: number, k: number): number {
    let worst = 0;
    for (let i = 0; i < k; i++)
      for (let j = 0; j <= i; j++) {
        let s = 0;
        for (let t = 0; t < m; t++) s += q[t * k + i] * q[t * k + j];
        worst = Math.max(worst, Math.abs(s - (i === j ? 1 : 0)));
      }
    return worst;
  }

  it.each(['host', 'device'] as const)('orthonormalize (%s) of an ill-conditioned Y (σ from 1 to 1e-3) gives an orthonormal basis of its range', async (orth) => {
    const m = 300, k = 24;
    const { data } = conditioned(m, k, k, 1e-3, 3);
    const Y = tf.tensor2d(data, [m, k]);
    const Q = orth === 'host' ? await orthonormalize(Y, 2) : orthonormalizeDevice(Y, 2);
    expect(Q.shape).toEqual([m, k]);
    const q = (await Q.data()) as Float32Array;
    expect(orthogonalityError(q, m, k)).toBeLessThan(1e-4);
    // Range: every column of Y is reproduced by Q·Qᵀ·y (float64 here).
    let res = 0, tot = 0;
    for (let j = 0; j < k; j++) {
      const c = new Float64Array(k);
      for (let a = 0; a < k; a++) for (let t = 0; t < m; t++) c[a] += q[t * k + a] * data[t * k + j];
      for (let t = 0; t < m; t++) {
        let p = 0;
        for (let a = 0; a < k; a++) p += q[t * k + a] * c[a];
        res += (data[t * k + j] - p) ** 2;
        tot += data[t * k + j] ** 2;
      }
    }
    expect(Math.sqrt(res / tot)).toBeLessThan(1e-4);
    tf.dispose([Y, Q]);
  });

  it.each([
    ['host', 8, 1],
    ['host', 0, 1],
    ['device', 0, 1],
    ['device', 8, 0.5],
    ['host', 0, 1.5],
    ['device', 0, 2],
  ] as const)('randomized (%s, oversample %i, powerIters %s) is within a tenth of the float64 optimum, with an orthonormal basis', async (orth, p, q) => {
    const T = 240, F = 160, r = 12;
    const data = testMatrix(T, F, 11);
    const X = tf.tensor2d(data, [T, F]);
    const f = await truncatedSvd(X, { rank: r, oversample: p, powerIters: q, orthogonalization: orth, seed: 2 });
    expect(f.basis.shape).toEqual([T, r]);
    expect(f.coeffs.shape).toEqual([r, F]);
    expect(f.singularValues === undefined).toBe(p === 0);
    expect(orthogonalityError((await f.basis.data()) as Float32Array, T, r)).toBeLessThan(1e-4);
    const A = tf.matMul(f.basis, f.coeffs);
    const err = await relativeFrobeniusError(X, A);
    const ref = exactError(data, T, F, r);
    expect(err).toBeGreaterThanOrEqual(ref * (1 - 1e-4));
    expect(err / ref - 1).toBeLessThan(0.1);
    tf.dispose([X, A, f.basis, f.coeffs]);
  });

  it('device and host orthogonalization agree to float32 accuracy on a matrix with a wide spectrum', async () => {
    const T = 200, F = 120, r = 16;
    const { data, sigma } = conditioned(T, F, 40, 1e-4, 5);
    const X = tf.tensor2d(data, [T, F]);
    const errs: number[] = [];
    for (const orth of ['host', 'device'] as const) {
      const f = await truncatedSvd(X, { rank: r, oversample: 0, powerIters: 1, orthogonalization: orth, seed: 4 });
      const A = tf.matMul(f.basis, f.coeffs);
      errs.push(await relativeFrobeniusError(X, A));
      tf.dispose([A, f.basis, f.coeffs]);
    }
    const tot = sigma.reduce((a, s) => a + s * s, 0);
    const opt = Math.sqrt(sigma.slice(r).reduce((a, s) => a + s * s, 0) / tot);
    for (const e of errs) expect(e / opt - 1).toBeLessThan(0.1);
    expect(Math.abs(errs[0] - errs[1]) / opt).toBeLessThan(0.01);
    X.dispose();
  });

  it('a rank-deficient X (rank 5 < k) keeps finite factors and reconstructs X on both paths', async () => {
    const T = 120, F = 80;
    const { data } = conditioned(T, F, 5, 0.1, 7);
    const X = tf.tensor2d(data, [T, F]);
    for (const orth of ['host', 'device'] as const) {
      const f = await truncatedSvd(X, { rank: 10, oversample: 0, powerIters: 1, orthogonalization: orth });
      const A = tf.matMul(f.basis, f.coeffs);
      expect(f.basis.shape).toEqual([T, 10]);
      expect(Array.from((await A.data()) as Float32Array).every(Number.isFinite)).toBe(true);
      expect(await relativeFrobeniusError(X, A)).toBeLessThan(1e-3);
      tf.dispose([A, f.basis, f.coeffs]);
    }
    X.dispose();
  });

  it('rejects bad oversample, powerIters and orthogonalization by name', async () => {
    const X = tf.ones([20, 10]) as tf.Tensor2D;
    await expect(truncatedSvd(X, { rank: 2, oversample: -1 })).rejects.toThrow(/oversample must be a non-negative integer or 'auto'/);
    await expect(truncatedSvd(X, { rank: 2, powerIters: 0.3 })).rejects.toThrow(/powerIters must be a non-negative multiple of 0.5/);
    await expect(truncatedSvd(X, { rank: 2, orthogonalization: 'gpu' as never })).rejects.toThrow(/orthogonalization must be/);
    X.dispose();
  });

  it('bounds powerIters (≤ 16), oversample (≤ 4096), the seed (int32) and orthonormalization passes (≤ 8): a config error naming the bound, accepted at it, nothing allocated', async () => {
    const X = tf.randomNormal([20, 10], 0, 1, 'float32', 1) as tf.Tensor2D;
    const before = tf.memory().numTensors;
    const rejects = async (p: Promise<unknown>, text: string) => {
      const err = await p.then(() => null, (e: unknown) => e);
      expect(err).toBeInstanceOf(KvpackError);
      expect((err as KvpackError).code).toBe('config');
      expect((err as KvpackError).message).toContain(text);
    };
    await rejects(truncatedSvd(X, { rank: 2, powerIters: 1e7 }), `at most ${MAX_POWER_ITERS}`);
    await rejects(truncatedSvd(X, { rank: 2, powerIters: MAX_POWER_ITERS + 0.5 }), `at most ${MAX_POWER_ITERS}`);
    await rejects(truncatedSvd(X, { rank: 2, oversample: MAX_OVERSAMPLE + 1 }), `at most ${MAX_OVERSAMPLE}`);
    await rejects(truncatedSvd(X, { rank: 2, seed: MAX_SEED + 1 }), `${MAX_SEED}]`);
    await rejects(orthonormalize(X, MAX_ORTHONORMALIZE_PASSES + 1), `[0, ${MAX_ORTHONORMALIZE_PASSES}]`);
    expect(() => orthonormalizeDevice(X, 1e9)).toThrow(`[0, ${MAX_ORTHONORMALIZE_PASSES}]`);
    expect(tf.memory().numTensors).toBe(before);
    for (const o of [{ powerIters: MAX_POWER_ITERS }, { oversample: MAX_OVERSAMPLE }, { seed: MAX_SEED }]) {
      const f = await truncatedSvd(X, { rank: 2, ...o });
      expect(f.basis.shape).toEqual([20, 2]);
      tf.dispose([f.basis, f.coeffs]);
    }
    X.dispose();
  });

  it("'auto' orthogonalization is host on wasm; the test matrix is seeded and memoized", () => {
    expect(resolveOrthogonalization('auto')).toBe('host');
    const a = gaussianMatrix(7, 5, 3), b = gaussianMatrix(7, 5, 3), c = gaussianMatrix(7, 5, 4);
    expect(Array.from(a.dataSync())).toEqual(Array.from(b.dataSync()));
    expect(Array.from(a.dataSync())).not.toEqual(Array.from(c.dataSync()));
    tf.dispose([a, b, c]);
  });

  it('leaks no tensors on the device path', async () => {
    const X = tf.randomNormal([60, 40], 0, 1, 'float32', 3) as tf.Tensor2D;
    const before = tf.memory().numTensors;
    for (const q of [0, 0.5, 1, 2]) {
      const f = await truncatedSvd(X, { rank: 6, oversample: 2, powerIters: q, orthogonalization: 'device' });
      tf.dispose([f.basis, f.coeffs]);
    }
    expect(tf.memory().numTensors).toBe(before);
    X.dispose();
  });
});
