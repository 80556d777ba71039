import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { HalfTensor, mulberry32, selectBackend } from '@kvpack/core';
import { CodesTensor, dequantizeOnBackend } from './codes-tensor.js';
import { dequantizeGroupsOnBackend, unpackCodesFast } from './held-dequantize.js';
import { packCodes } from './packing.js';
import { dequantizeMatrix, quantizeMatrix } from './quantize.js';

for (const backend of ['wasm', 'cpu'] as const) {
  describe(`fast held dequantization on the ${backend} backend`, () => {
    it('unpacks 2-, 4- and 8-bit codes as CodesTensor.unpack does (counts that end mid-word)', async () => {
      await selectBackend(backend);
      const rnd = mulberry32(3);
      for (const bits of [2, 4, 8] as const)
        for (const n of [1, 3, 15, 16, 17, 33, 257]) {
          const codes = Array.from({ length: n }, () => Math.floor(rnd() * 2 ** bits));
          const t = CodesTensor.fromBytes(packCodes(codes, bits), bits, n);
          const fast = unpackCodesFast(t);
          expect(Array.from(fast.dataSync())).toEqual(codes);
          tf.dispose(fast);
          t.dispose();
        }
    });

    it('dequantizes bit-identically to dequantizeOnBackend and the host dequantizeMatrix (whole and partial groups)', async () => {
      await selectBackend(backend);
      const rnd = mulberry32(5);
      for (const [rows, cols, gs] of [
        [7, 32, 16],
        [5, 16, 16],
        [6, 20, 8],
      ])
        for (const bits of [4, 8] as const)
          for (const symmetric of [true, false]) {
            const data = Float32Array.from({ length: rows * cols }, () => (rnd() - 0.3) * 5);
            const q = quantizeMatrix(data, rows, cols, { bits, quantGroupSize: gs, symmetric });
            const codes = CodesTensor.fromBytes(q.codes, bits, rows * cols);
            const scales = HalfTensor.fromBits(q.scales, [q.scales.length]);
            const zeros = q.zeros ? CodesTensor.fromBytes(q.zeros, 8, q.zeros.length) : null;
            const m = { rows, cols, bits, quantGroupSize: gs, symmetric };
            const before = tf.memory().numTensors;
            const fast = dequantizeGroupsOnBackend(m, codes, scales, zeros);
            expect(tf.memory().numTensors).toBe(before + 1);
            const ref = dequantizeOnBackend(m, codes, scales, zeros);
            expect(fast.shape).toEqual([rows, cols]);
            expect(Array.from(fast.dataSync())).toEqual(Array.from(ref.dataSync()));
            expect(Array.from(fast.dataSync())).toEqual(Array.from(dequantizeMatrix(q)));
            tf.dispose([fast, ref]);
            [codes, scales, zeros].forEach((t) => t?.dispose());
          }
    });
  });
}
