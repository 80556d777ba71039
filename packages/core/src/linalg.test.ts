import * as tf from '@tensorflow/tfjs-core';
import { Matrix, SingularValueDecomposition } from 'ml-matrix';
import { beforeAll, describe, expect, it } from 'vitest';
import { selectBackend, truncatedSvd, relativeFrobeniusError, KvpackError } from './index.js';

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
    expect(singularValues[0]).toBeGreaterThan(singularValues[r - 1]);
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
});
