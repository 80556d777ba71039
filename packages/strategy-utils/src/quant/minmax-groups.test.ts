import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { HalfTensor, KvpackError, fromHalfBits, mulberry32, selectBackend, toHalfBits } from '@kvpack/core';
import { CodesTensor } from './codes-tensor.js';
import { dequantizeMinMaxOnBackend, minMaxGroupShape } from './minmax-groups.js';
import { packCodes } from './packing.js';

for (const backend of ['wasm', 'cpu'] as const) {
  describe(`min–max groups on the ${backend} backend`, () => {
    for (const along of ['tokens', 'channels'] as const) {
      it(`dequantizes ${along}-grouped 2- and 4-bit blocks as the host formula code·scale + min (float32)`, async () => {
        await selectBackend(backend);
        const rnd = mulberry32(7);
        const [n, H, d, g] = [12, 3, 8, 4];
        for (const bits of [2, 4] as const) {
          const codes = Array.from({ length: n * H * d }, () => Math.floor(rnd() * 2 ** bits));
          const gs = minMaxGroupShape(along, n, H, d, g);
          const groups = gs[0] * gs[1] * gs[2];
          const scale = Uint16Array.from({ length: groups }, () => toHalfBits(rnd() * 0.7 + 1e-3));
          const min = Uint16Array.from({ length: groups }, () => toHalfBits(rnd() * 6 - 3));
          const ct = CodesTensor.fromBytes(packCodes(codes, bits), bits, codes.length);
          const st = HalfTensor.fromBits(scale, gs);
          const mt = HalfTensor.fromBits(min, gs);
          const before = tf.memory().numTensors;
          const x = dequantizeMinMaxOnBackend({ along, n, H, d, g }, ct, st, mt);
          expect(tf.memory().numTensors).toBe(before + 1);
          expect(x.shape).toEqual([n, H, d]);
          const want = new Float32Array(n * H * d);
          for (let t = 0; t < n; t++)
            for (let h = 0; h < H; h++)
              for (let c = 0; c < d; c++) {
                const i = (t * H + h) * d + c;
                const gi = along === 'tokens' ? (Math.floor(t / g) * H + h) * d + c : (t * H + h) * (d / g) + Math.floor(c / g);
                want[i] = codes[i] * fromHalfBits(scale[gi]) + fromHalfBits(min[gi]);
              }
          expect(Array.from(x.dataSync())).toEqual(Array.from(want));
          tf.dispose([x]);
          [ct, st, mt].forEach((t) => t.dispose());
        }
      });
    }

    it('rejects codes or groups that do not fit the block', async () => {
      await selectBackend(backend);
      const ct = CodesTensor.fromBytes(new Uint8Array(8), 2, 32);
      const st = HalfTensor.fromBits(new Uint16Array(8), [8]);
      expect(() => dequantizeMinMaxOnBackend({ along: 'tokens', n: 4, H: 1, d: 8, g: 3 }, ct, st, st)).toThrow(KvpackError);
      expect(() => tf.dispose(dequantizeMinMaxOnBackend({ along: 'channels', n: 4, H: 1, d: 8, g: 4 }, ct, st, st))).not.toThrow();
      expect(() => dequantizeMinMaxOnBackend({ along: 'channels', n: 4, H: 1, d: 8, g: 2 }, ct, st, st)).toThrow(KvpackError);
      ct.dispose();
      st.dispose();
    });
  });
}
