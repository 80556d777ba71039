import * as tf from '@tensorflow/tfjs-core';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { HalfTensor, selectBackend } from '@kvpack/core';
import { CodesTensor, dequantizeOnBackend } from './codes-tensor.js';
import { packCodes } from './packing.js';
import { dequantizeMatrix, quantizeMatrix } from './quantize.js';

for (const backend of ['wasm', 'cpu'] as const) {
  describe(`codes on the ${backend} backend`, () => {
    it('unpacks 2-, 4- and 8-bit codes as uploaded (any count)', async () => {
      await selectBackend(backend);
      fc.assert(
        fc.property(fc.constantFrom(2 as const, 4 as const, 8 as const), fc.array(fc.nat(255), { minLength: 1, maxLength: 70 }), (bits, raw) => {
          const codes = raw.map((c) => c & ((1 << bits) - 1));
          const t = CodesTensor.fromBytes(packCodes(codes, bits), bits, codes.length);
          const u = t.unpack();
          expect(Array.from(u.dataSync())).toEqual(codes);
          expect(Array.from(t.bytesSync())).toEqual(Array.from(packCodes(codes, bits)));
          expect(t.residentBytes).toBe(Math.max(4, Math.ceil(Math.ceil((codes.length * bits) / 8) / 4) * 4));
          u.dispose();
          t.dispose();
        }),
        { seed: 3, numRuns: 60 },
      );
    });

    it('dequantizes on the backend bit-identically to the host dequantizer (ragged last group, both modes)', async () => {
      await selectBackend(backend);
      const start = tf.memory().numTensors;
      let s = 1;
      const rnd = () => ((s = (s * 48271) % 2147483647) / 2147483647 - 0.5) * 6;
      for (const [bits, symmetric, cols, gs] of [[4, false, 45, 16], [8, true, 32, 32], [4, true, 9, 4]] as const) {
        const rows = 5;
        const q = quantizeMatrix(Float32Array.from({ length: rows * cols }, rnd), rows, cols, { bits, quantGroupSize: gs, symmetric });
        const codes = CodesTensor.fromBytes(q.codes, bits, rows * cols);
        const scales = HalfTensor.fromBits(q.scales, [q.scales.length]);
        const zeros = q.zeros ? CodesTensor.fromBytes(q.zeros, 8, q.zeros.length) : null;
        const x = dequantizeOnBackend({ rows, cols, bits, quantGroupSize: gs, symmetric }, codes, scales, zeros);
        expect(Array.from(x.dataSync())).toEqual(Array.from(dequantizeMatrix(q)));
        tf.dispose(x);
        [codes, scales, zeros].forEach((t) => t?.dispose());
      }
      expect(tf.memory().numTensors).toBe(start);
    });
  });
}
