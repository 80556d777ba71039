import * as tf from '@tensorflow/tfjs-core';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { HalfTensor, encodeHalf, selectBackend } from '@kvpack/core';
import { CodesTensor, dequantizeOnBackend } from './codes-tensor.js';
import { concatHalfRows, dropHalfRows } from './half-rows.js';
import { packCodes } from './packing.js';
import { dequantizeMatrix, quantizeMatrix } from './quantize.js';

for (const backend of ['wasm', 'cpu'] as const) {
  describe(`codes on the ${backend} backend`, () => {
    it('unpacks 2-, 4- and 8-bit codes as uploaded (any count)', async () => {
      await selectBackend(backend);
      fc.assert(
        fc.property(fc.constantFrom(1 as const, 2 as const, 4 as const, 8 as const), fc.array(fc.nat(255), { minLength: 1, maxLength: 70 }), (bits, raw) => {
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

    it('packs codes computed on the backend as the host packs them, and joins packed codes at any boundary', async () => {
      await selectBackend(backend);
      const start = tf.memory().numTensors;
      fc.assert(
        fc.property(fc.constantFrom(1 as const, 2 as const, 4 as const, 8 as const), fc.array(fc.nat(255), { maxLength: 90 }), fc.array(fc.nat(255), { maxLength: 40 }), (bits, ra, rb) => {
          const mask = (1 << bits) - 1;
          const [a, b] = [ra.map((c) => c & mask), rb.map((c) => c & mask)];
          const [xa, xb] = [tf.tensor1d(a), tf.tensor2d(b, [1, b.length], 'int32')];
          const ta = CodesTensor.pack(xa, bits);
          const tb = CodesTensor.pack(xb, bits);
          expect(Array.from(ta.bytesSync())).toEqual(Array.from(packCodes(a, bits)));
          const j = CodesTensor.concat(ta, tb);
          expect([j.count, Array.from(j.bytesSync())]).toEqual([a.length + b.length, Array.from(packCodes([...a, ...b], bits))]);
          expect(j.residentBytes).toBe(Math.max(4, Math.ceil(Math.ceil((j.count * bits) / 8) / 4) * 4));
          [ta, tb, j, xa, xb].forEach((t) => t.dispose());
        }),
        { seed: 5, numRuns: 60 },
      );
      expect(tf.memory().numTensors).toBe(start);
    });

    it('joins and drops float16 rows in their packed form (even and odd row sizes), as the host bits', async () => {
      await selectBackend(backend);
      const start = tf.memory().numTensors;
      for (const w of [4, 3]) {
        const xs = Float32Array.from({ length: 7 * w }, (_, i) => Math.sin(i + 1) * 100);
        const bits = encodeHalf(xs);
        const a = HalfTensor.fromBits(bits.subarray(0, 5 * w), [5, w]);
        const b = HalfTensor.fromBits(bits.subarray(5 * w), [2, w]);
        const j = concatHalfRows(a, b);
        expect([j.shape, Array.from(j.bitsSync())]).toEqual([[7, w], Array.from(bits)]);
        for (const drop of [0, 1, 2, 7]) {
          const r = dropHalfRows(j, drop);
          expect([r.shape, Array.from(r.bitsSync())]).toEqual([[7 - drop, w], Array.from(bits.subarray(drop * w))]);
          expect(r.residentBytes).toBe(Math.ceil(((7 - drop) * w) / 2) * 4);
          r.dispose();
        }
        [a, b, j].forEach((t) => t.dispose());
      }
      expect(tf.memory().numTensors).toBe(start);
    });
  });
}
