import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { HalfTensor, encodeHalf, fromHalfBits, selectBackend, toHalfBits } from './index.js';

/** Every class of float16 value: ±0, subnormals, normals across the binades, the largest finite, ±Inf. */
function halfCases(): Float32Array {
  const bits = [0x0000, 0x8000, 0x0001, 0x03ff, 0x0400, 0x3c00, 0x3c01, 0x7bff, 0xfbff, 0x7c00, 0xfc00, 0x1234, 0xabcd, 0x5555];
  for (let h = 0; h < 0x7c00; h += 997) bits.push(h, h | 0x8000);
  return Float32Array.from(bits, (h) => fromHalfBits(h));
}

for (const backend of ['wasm', 'cpu'] as const) {
  describe(`HalfTensor on ${backend}`, () => {
    it('unpackRows gathers packed rows and unpacks only them (even widths), odd widths through a full unpack', async () => {
      await selectBackend(backend);
      const start = tf.memory().numTensors;
      const vals = halfCases();
      for (const [n, w] of [[9, 4], [7, 3], [5, 2]] as const) {
        const want = Float32Array.from({ length: n * w }, (_, i) => vals[(i * 7) % vals.length]);
        const h = HalfTensor.fromBits(encodeHalf(want), [n, w]);
        const rows = tf.tensor1d([n - 1, 0, 2, 2], 'int32');
        const got = h.unpackRows(rows);
        expect(got.shape).toEqual([4, w]);
        const exp = [n - 1, 0, 2, 2].flatMap((r) => Array.from(want.subarray(r * w, (r + 1) * w)));
        expect(Array.from(got.dataSync()).map(toHalfBits)).toEqual(exp.map(toHalfBits));
        tf.dispose([rows, got]);
        h.dispose();
      }
      expect(tf.memory().numTensors).toBe(start);
    });

    it('packs two float16 values per int32 and unpacks them bit-exactly, odd counts included', async () => {
      await selectBackend(backend);
      const start = tf.memory().numTensors;
      for (const n of [1, 2, 7, 64]) {
        const want = halfCases().subarray(0, n);
        const x = tf.tensor(want, [n]);
        const h = await HalfTensor.fromTensor(x);
        expect(h.packed.dtype).toBe('int32');
        expect(h.residentBytes).toBe(Math.ceil(n / 2) * 4);
        // The host bits equal the host encoding, the unpacked values the float16 values themselves.
        expect(Array.from(h.bitsSync())).toEqual(Array.from(encodeHalf(want)));
        const u = h.unpack();
        expect(Array.from(u.dataSync()).map(toHalfBits)).toEqual(Array.from(want).map(toHalfBits));
        const again = HalfTensor.fromBits(h.bitsSync(), [n]);
        expect(Array.from(again.packed.dataSync())).toEqual(Array.from(h.packed.dataSync()));
        tf.dispose([x, u]);
        h.dispose();
        again.dispose();
      }
      expect(tf.memory().numTensors).toBe(start);
    });

    it('rounds float32 values half to even on the way in', async () => {
      await selectBackend(backend);
      // 1 + 2⁻¹¹ is the midpoint of 1 and 1 + 2⁻¹⁰: it rounds to the even 1; 1 + 3·2⁻¹¹ rounds up to 1 + 2⁻⁹.
      const x = tf.tensor([1 + 2 ** -11, 1 + 3 * 2 ** -11, 70000]);
      const h = await HalfTensor.fromTensor(x);
      expect(Array.from(h.bitsSync())).toEqual([0x3c00, 0x3c02, 0x7c00]);
      x.dispose();
      h.dispose();
    });

    it('refuses bits that do not match the shape', () => {
      expect(() => HalfTensor.fromBits(new Uint16Array(5), [2, 3])).toThrow(/5 values, but shape \[2,3\] needs 6/);
    });
  });
}
