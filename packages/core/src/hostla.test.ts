import { EigenvalueDecomposition, Matrix, CholeskyDecomposition } from 'ml-matrix';
import { describe, expect, it } from 'vitest';
import { choleskyUpper, invertUpper, symmetricEigHost } from './hostla.js';

function randomSym(n: number, seed: number): Float64Array {
  let s = seed;
  const rnd = () => ((s = (s * 16807) % 2147483647) / 2147483647) - 0.5;
  const a = new Float64Array(n * n);
  for (let i = 0; i < n; i++) for (let j = 0; j <= i; j++) a[i * n + j] = a[j * n + i] = rnd();
  return a;
}

describe('host float64 linear algebra', () => {
  it.each([1, 2, 7, 40, 64])('symmetricEigHost(%i) agrees with ml-matrix and reconstructs A', (n) => {
    const a = randomSym(n, 11 + n);
    const { values, vectors } = symmetricEigHost(a, n);
    const ref = new EigenvalueDecomposition(new Matrix(Array.from({ length: n }, (_, i) => Array.from(a.subarray(i * n, i * n + n)))), { assumeSymmetric: true });
    const refVals = [...ref.realEigenvalues].sort((x, y) => y - x);
    refVals.forEach((v, i) => expect(values[i]).toBeCloseTo(v, 10));
    // A = V diag(λ) Vᵀ and VᵀV = I
    for (let i = 0; i < n; i++)
      for (let j = 0; j < n; j++) {
        let s = 0, o = 0;
        for (let k = 0; k < n; k++) {
          s += vectors[i * n + k] * values[k] * vectors[j * n + k];
          o += vectors[k * n + i] * vectors[k * n + j];
        }
        expect(s).toBeCloseTo(a[i * n + j], 10);
        expect(o).toBeCloseTo(i === j ? 1 : 0, 10);
      }
  });

  it('handles repeated eigenvalues (identity, rank-one)', () => {
    const n = 6;
    const eye = new Float64Array(n * n);
    for (let i = 0; i < n; i++) eye[i * n + i] = 1;
    expect(Array.from(symmetricEigHost(eye, n).values)).toEqual(new Array(n).fill(1));
    const u = [1, 2, 3, 4, 5, 6];
    const r1 = new Float64Array(n * n).map((_, idx) => u[Math.floor(idx / n)] * u[idx % n]);
    const { values } = symmetricEigHost(r1, n);
    expect(values[0]).toBeCloseTo(91, 10);
    for (let i = 1; i < n; i++) expect(Math.abs(values[i])).toBeLessThan(1e-10);
  });

  it('Cholesky and triangular inverse match ml-matrix; indefinite input returns null', () => {
    const n = 30;
    const b = randomSym(n, 5);
    const g = new Float64Array(n * n);
    for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) {
      let s = i === j ? 0.5 : 0;
      for (let k = 0; k < n; k++) s += b[i * n + k] * b[j * n + k];
      g[i * n + j] = s;
    }
    const R = choleskyUpper(g, n)!;
    const L = new CholeskyDecomposition(new Matrix(Array.from({ length: n }, (_, i) => Array.from(g.subarray(i * n, i * n + n))))).lowerTriangularMatrix;
    for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) expect(R[i * n + j]).toBeCloseTo(L.get(j, i), 10);
    const Ri = invertUpper(R, n);
    for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) {
      let s = 0;
      for (let k = 0; k < n; k++) s += R[i * n + k] * Ri[k * n + j];
      expect(s).toBeCloseTo(i === j ? 1 : 0, 10);
    }
    expect(choleskyUpper(b, n)).toBeNull();
  });
});
