import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { KvpackError, SPARSE_SIGN_NONZEROS, relativeFrobeniusError, selectBackend, sparseSignDense, sparseSignMatrix, sparseSignProductWgsl, sparseSignRowsProductWgsl, truncatedSvd, truncatedSvdBatch } from './index.js';

describe('sparse sign test matrix', () => {
  it('has min(8, k) entries ±1 in distinct columns per row, columns sorted by row, the same for a seed, dense form equal', () => {
    for (const [n, k] of [
      [300, 40],
      [50, 5],
    ] as const) {
      const s = sparseSignMatrix(n, k, 7);
      const z = Math.min(SPARSE_SIGN_NONZEROS, k);
      expect(s.ptr[k]).toBe(n * z);
      const perRow = new Int32Array(n);
      let plus = 0;
      for (let j = 0; j < k; j++) {
        let prev = -1;
        for (let e = s.ptr[j]; e < s.ptr[j + 1]; e++) {
          const f = s.entries[e] >= 0 ? s.entries[e] : ~s.entries[e];
          expect(f).toBeGreaterThan(prev); // sorted, so no column holds a row twice
          prev = f;
          perRow[f]++;
          if (s.entries[e] >= 0) plus++;
        }
      }
      expect(perRow.every((c) => c === z)).toBe(true);
      // Signs are fair coins: within 5 standard deviations of half.
      expect(Math.abs(plus - (n * z) / 2)).toBeLessThan(5 * Math.sqrt(n * z) / 2);
      const d = sparseSignDense(s);
      for (let f = 0; f < n; f++) {
        const row = Array.from(d.subarray(f * k, (f + 1) * k));
        expect(row.filter((v) => v !== 0).length).toBe(z);
        expect(row.every((v) => v === 0 || v === 1 || v === -1)).toBe(true);
      }
      const again = sparseSignMatrix(n, k, 7);
      expect(Array.from(again.entries)).toEqual(Array.from(s.entries));
      expect(Array.from(sparseSignMatrix(n, k, 8).entries)).not.toEqual(Array.from(s.entries));
    }
  });

  it('truncatedSvd with the sparse sign sketch matches the Gaussian one in error on a decaying spectrum (cpu), and refuses another sketch name', async () => {
    await selectBackend('cpu');
    const T = 200, F = 120, r = 10;
    const U = tf.randomNormal([T, 40], 0, 1, 'float32', 1);
    const V = tf.randomNormal([40, F], 0, 1, 'float32', 2);
    const w = tf.tensor1d(Float32Array.from({ length: 40 }, (_, j) => 1 / (j + 1)));
    const X = tf.tidy(() => tf.add(tf.matMul(tf.mul(U, w), V), tf.randomNormal([T, F], 0, 0.01, 'float32', 3))) as tf.Tensor2D;
    tf.dispose([U, V, w]);
    const before = tf.memory().numTensors;
    const err = async (sketch: 'gaussian' | 'sparse-sign', exact = false) => {
      const f = await truncatedSvd(X, { rank: r, oversample: 0, powerIters: 1, seed: 4, sketch, exact });
      const A = tf.matMul(f.basis, f.coeffs);
      const e = await relativeFrobeniusError(X, A);
      tf.dispose([A, f.basis, f.coeffs]);
      return e;
    };
    const opt = await err('gaussian', true);
    const g = await err('gaussian');
    const s = await err('sparse-sign');
    console.log(`sparse sign vs gaussian error ratios: ${(s / opt).toFixed(4)} ${(g / opt).toFixed(4)}`);
    expect(g / opt).toBeLessThan(1.2);
    expect(s / opt).toBeLessThan(1.2);
    expect(s).not.toBe(g);
    const bad = await truncatedSvd(X, { rank: r, sketch: 'srht' as never }).then(() => null, (e: unknown) => e);
    expect(bad).toBeInstanceOf(KvpackError);
    expect((bad as KvpackError).message).toMatch(/sketch must be 'gaussian' or 'sparse-sign'/);
    expect(tf.memory().numTensors).toBe(before);
    X.dispose();
  });
});

describe('truncatedSvdBatch (lockstep range finders)', () => {
  it('gives each item bit for bit its truncatedSvd (q = 0, 0.5, 1, 1.5; both sketches; an exact item among sketched ones), and frees the finished results when an item fails', async () => {
    await selectBackend('cpu');
    const mk = (seed: number, T: number, F: number) => tf.randomNormal([T, F], 0, 1, 'float32', seed) as tf.Tensor2D;
    const items = [[mk(1, 60, 20), mk(2, 60, 12)], [mk(3, 60, 32)], [mk(4, 60, 5)]];
    const before = tf.memory().numTensors;
    for (const powerIters of [0, 0.5, 1, 1.5])
      for (const sketch of ['gaussian', 'sparse-sign'] as const) {
        // Rank 5 of the [60, 5] item covers min(T, F): that item is decomposed exactly; the others
        // at ranks 5 and 7 (oversample auto: sketch widths 13 and 15).
        const ranks = [5, 7, 5];
        const opts = { oversample: 'auto' as const, powerIters, seed: 9, sketch };
        const both = await truncatedSvdBatch(items.map((blocks, i) => ({ blocks, rank: ranks[i] })), opts);
        for (const [i, X] of items.entries()) {
          const one = await truncatedSvd(X, { ...opts, rank: ranks[i] });
          expect(Array.from(await both[i].basis.data()), `q ${powerIters} ${sketch} item ${i}`).toEqual(Array.from(await one.basis.data()));
          for (const [b, c] of one.coeffs.entries()) expect(Array.from(await both[i].coeffs[b].data())).toEqual(Array.from(await c.data()));
          tf.dispose([one.basis, ...one.coeffs, both[i].basis, ...both[i].coeffs]);
        }
      }
    expect(tf.memory().numTensors).toBe(before);
    // A range finder product that fails, at each of its calls in turn: nothing is left behind (the
    // exact item's finished factors and the range finder's tensors in flight are freed).
    // Every product in turn, until a run makes fewer products than the failing one (and succeeds).
    for (const [powerIters, oversample, orthogonalization] of [
      [1, 0, 'host'],
      [1.5, 0, 'host'],
      [1, 3, 'host'],
      [1, 0, 'device'],
    ] as const)
      for (let failAt = 1, failed = true; failed; failAt++) {
          let calls = 0;
          const failing = (a: tf.Tensor2D, b: tf.Tensor2D, tA: boolean, tB: boolean) => {
            if (++calls === failAt) throw new KvpackError('unsupported', 'planted failure');
            return tf.matMul(a, b, tA, tB) as tf.Tensor2D;
          };
          const n0 = tf.memory().numTensors;
          const got = await truncatedSvdBatch([items[2], items[1], items[0]].map((blocks) => ({ blocks, rank: 5 })), { oversample, powerIters, orthogonalization, matmul: failing }).then(
            (fs) => (fs.forEach((f) => tf.dispose([f.basis, ...f.coeffs])), null),
            (e: Error) => e,
          );
          failed = got !== null;
          if (got) expect(got.message).toMatch(/planted failure/);
          expect(tf.memory().numTensors, `q ${powerIters} p ${oversample} ${orthogonalization}, failing product ${failAt}`).toBe(n0);
        }
    tf.dispose(items.flat());
  });

  it('sparseSignMatrix and its product refuse bad shapes, seeds and dtypes with a KvpackError', () => {
    expect(() => sparseSignMatrix(0, 4, 1)).toThrow(/positive integers/);
    expect(() => sparseSignMatrix(5, 2.5, 1)).toThrow(/positive integers/);
    expect(() => sparseSignMatrix(5, 4, 2 ** 31)).toThrow(/int32/);
    // Operands are checked before any kernel runs (on every backend).
    const s = sparseSignMatrix(5, 4, 1);
    const ptr = tf.tensor1d(s.ptr, 'int32');
    const ent = tf.tensor1d(s.entries, 'int32');
    const ints = tf.zeros([3, 5], 'int32') as tf.Tensor2D;
    const wrong = tf.zeros([3, 6]) as tf.Tensor2D;
    expect(() => sparseSignProductWgsl(ints, s, ptr, ent)).toThrow(/float32 matrix/);
    expect(() => sparseSignProductWgsl(wrong, s, ptr, ent)).toThrow(/test matrix is \[5, 4\]/);
    expect(() => sparseSignRowsProductWgsl(wrong, s, ptr, ent)).toThrow(/test matrix is \[5, 4\]/);
    tf.dispose([ptr, ent, ints, wrong]);
  });
});
