// The backend KIVI quantizer (strategy-utils holdMinMaxOnBackend: tf ops, no host round trip) against
// the host float64 quantizer (./host-oracle.ts) bit for bit: codes, float16 scale and minimum, on
// random blocks and on groups built to sit exactly on, or one float32 ulp beside, every rounding
// boundary (half-integer codes, float16 midpoints of the scale), where float32 arithmetic alone would
// round the wrong way.
import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { selectBackend } from '@kvpack/core';
import { holdMinMaxOnBackend } from '@kvpack/strategy-utils';
import { prng } from '../testing/testkit.js';
import { boundaryGroups, expectBackendMatchesHost as check } from './quant-cases.js';

for (const backend of ['wasm', 'cpu'] as const) {
  describe(`kivi backend quantizer on ${backend}: bit-identical to the host float64 quantizer`, () => {
    for (const bits of [2, 4] as const) {
      it(`${bits}-bit groups on rounding boundaries, keys (over tokens) and values (over channels)`, async () => {
        await selectBackend(backend);
        const start = tf.memory().numTensors;
        const g = 24;
        const groups = boundaryGroups(bits, g, prng(5 + bits));
        const flat = Float32Array.from(groups.flat());
        // values: one group per token of one head, [groups, 1, g]
        await check(flat, 'channels', groups.length, 1, g, g, bits);
        // keys: one channel, groups of g consecutive tokens, [groups·g, 1, 1]
        await check(flat, 'tokens', groups.length * g, 1, 1, g, bits);
        // the same groups spread over channels: group c of key block is channel c over g tokens
        const C = groups.length;
        const keys = new Float32Array(g * C);
        for (let t = 0; t < g; t++) for (let c = 0; c < C; c++) keys[t * C + c] = groups[c][t];
        await check(keys, 'tokens', g, 1, C, g, bits);
        expect(tf.memory().numTensors).toBe(start);
      });

      it(`${bits}-bit random blocks of several scales (chunked: more than 2^20 elements)`, async () => {
        await selectBackend(backend);
        const rnd = prng(11 + bits);
        const [H, d, g] = [4, 64, 32];
        for (const [n, amp] of [[96, 1e-3], [64, 1], [32, 300], [4160, 2]] as const) {
          if ((backend === 'cpu' || bits === 4) && n > 1000) continue; // the chunked size once (the host oracle is slow)
          const x = Float32Array.from({ length: n * H * d }, () => (rnd() + rnd() + rnd() - 1.5) * amp);
          await check(x, 'tokens', n, H, d, g, bits);
          await check(x, 'channels', n, H, d, g, bits);
        }
      });
    }

    it('flags a group beyond the float16 range of its scale or minimum', async () => {
      await selectBackend(backend);
      // 3·65520: a scale exactly at the float16 overflow threshold (ties to even: +Inf); 3·65519 rounds to 65504.
      for (const [lo, hi, flag] of [[-70000, 0, 1], [0, 1e6, 1], [0, 3 * 65520, 1], [0, 3 * 65519, 0]]) {
        const x = tf.tensor3d([lo, hi, 0, 1], [4, 1, 1]);
        const got = holdMinMaxOnBackend({ along: 'tokens', n: 4, H: 1, d: 1, g: 4, bits: 2 }, x);
        expect(got.nonFinite.dataSync()[0]).toBe(flag);
        tf.dispose([x, got.nonFinite]);
        [got.codes, got.scale, got.min].forEach((t) => t.dispose());
      }
    });
  });
}
