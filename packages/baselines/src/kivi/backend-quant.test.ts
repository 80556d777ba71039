// The backend KIVI quantizer (strategy-utils holdMinMaxOnBackend: tf ops, no host round trip) against
// the host float64 quantizer (./host-oracle.ts) bit for bit: codes, float16 scale and minimum, on
// random blocks and on groups built to sit exactly on, or one float32 ulp beside, every rounding
// boundary (half-integer codes, float16 midpoints of the scale), where float32 arithmetic alone would
// round the wrong way.
import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { fromHalfBits, selectBackend } from '@kvpack/core';
import { holdMinMaxOnBackend, packCodes, unpackCodes, type MinMaxGrouping } from '@kvpack/strategy-utils';
import { quantizeKeysPerChannel, quantizeValuesPerToken } from './host-oracle.js';
import { prng } from '../testing/testkit.js';

/** The float32 neighbour of x one ulp up (dir 1) or down (dir −1). */
function ulpStep(x: number, dir: 1 | -1): number {
  const f = new Float32Array([x]);
  const i = new Int32Array(f.buffer);
  if (x === 0) return dir * 2 ** -149;
  i[0] += (x > 0 ? 1 : -1) * dir;
  return f[0];
}

/** Groups of g values built on rounding boundaries (g ≥ 2^b + 1), for 2^b − 1 = maxq. */
function boundaryGroups(bits: 2 | 4, g: number, rnd: () => number): number[][] {
  const maxq = 2 ** bits - 1;
  const out: number[][] = [];
  const fill = (lo: number, hi: number, inner: number[]) => {
    const vals = [lo, hi, ...inner];
    while (vals.length < g) vals.push(lo + (hi - lo) * rnd());
    return vals.slice(0, g).map((v) => Math.fround(v));
  };
  // Codes at exact half-integers (x − mn)/s = k + ½ and one ulp either side; mn and s exact float16.
  for (const [lo, s] of [[0, 2 ** -3], [-1.25, 2 ** -2], [3.5, 2 ** -6], [-0.0078125, 2 ** -12]]) {
    const ks = Array.from({ length: maxq }, (_, k) => lo + (k + 0.5) * s);
    for (const dir of [0, 1, -1] as const) out.push(fill(lo, lo + maxq * s, ks.map((v) => (dir === 0 ? v : ulpStep(Math.fround(v), dir)))));
  }
  // Scales at float16 midpoints: (hi − lo)/maxq = M exactly, and hi one ulp either side.
  for (const a of [1, 1 + 2 ** -10, 1.5, 0.0625 + 3 * 2 ** -14, 2 ** -14, 3 * 2 ** -24, 1000]) {
    const ulp16 = a >= 2 ** -14 ? 2 ** (Math.floor(Math.log2(a)) - 10) : 2 ** -24;
    const M = a + ulp16 / 2;
    for (const lo of [0, 0.25, -2]) {
      const hi = Math.fround(lo + maxq * M);
      for (const h of [hi, ulpStep(hi, 1), ulpStep(hi, -1)]) out.push(fill(lo, h, []));
    }
  }
  // Constant groups (scale 0), ranges whose scale underflows float16, minima far from their float16 rounding.
  out.push(fill(0.3, 0.3, []), fill(-7, -7, []), fill(1, 1 + 1e-7, []), fill(1000.3, 1000.31, []), fill(-1e-6, 2e-6, []));
  return out;
}

function groupValues(x: Float32Array, along: MinMaxGrouping, n: number, H: number, d: number, g: number, gi: number): number[] {
  if (along === 'channels') return Array.from(x.subarray(gi * g, gi * g + g));
  const Hd = H * d;
  const t0 = Math.floor(gi / Hd) * g;
  return Array.from({ length: g }, (_, i) => x[(t0 + i) * Hd + (gi % Hd)]);
}

function check(x: Float32Array, along: MinMaxGrouping, n: number, H: number, d: number, g: number, bits: 2 | 4) {
  const want = along === 'tokens' ? quantizeKeysPerChannel(x, n, H, d, g, bits) : quantizeValuesPerToken(x, n, H, d, g, bits);
  const xt = tf.tensor3d(x, [n, H, d]);
  const got = holdMinMaxOnBackend({ along, n, H, d, g, bits }, xt);
  xt.dispose();
  try {
    expect(got.nonFinite.dataSync()[0]).toBe(0);
    const scale = got.scale.bitsSync();
    const min = got.min.bitsSync();
    // On a mismatch, name the first group that differs (its values, and both results).
    const bad = Array.from(scale).findIndex((s, i) => s !== want.scale[i] || min[i] !== want.min[i]);
    expect(bad === -1 ? null : { group: bad, values: groupValues(x, along, n, H, d, g, bad), got: [fromHalfBits(scale[bad]), fromHalfBits(min[bad])], want: [fromHalfBits(want.scale[bad]), fromHalfBits(want.min[bad])] }).toBeNull();
    const codes = unpackCodes(got.codes.bytesSync(), bits, n * H * d);
    const at = codes.findIndex((c, i) => c !== want.codes[i]);
    expect(at === -1 ? null : { at, x: x[at], got: codes[at], want: want.codes[at] }).toBeNull();
    expect(Buffer.from(got.codes.bytesSync()).equals(Buffer.from(packCodes(want.codes, bits)))).toBe(true);
  } finally {
    got.codes.dispose();
    got.scale.dispose();
    got.min.dispose();
    got.nonFinite.dispose();
  }
}

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
        check(flat, 'channels', groups.length, 1, g, g, bits);
        // keys: one channel, groups of g consecutive tokens, [groups·g, 1, 1]
        check(flat, 'tokens', groups.length * g, 1, 1, g, bits);
        // the same groups spread over channels: group c of key block is channel c over g tokens
        const C = groups.length;
        const keys = new Float32Array(g * C);
        for (let t = 0; t < g; t++) for (let c = 0; c < C; c++) keys[t * C + c] = groups[c][t];
        check(keys, 'tokens', g, 1, C, g, bits);
        expect(tf.memory().numTensors).toBe(start);
      });

      it(`${bits}-bit random blocks of several scales (chunked: more than 2^20 elements)`, async () => {
        await selectBackend(backend);
        const rnd = prng(11 + bits);
        const [H, d, g] = [4, 64, 32];
        for (const [n, amp] of [[96, 1e-3], [64, 1], [32, 300], [4160, 2]] as const) {
          if ((backend === 'cpu' || bits === 4) && n > 1000) continue; // the chunked size once (the host oracle is slow)
          const x = Float32Array.from({ length: n * H * d }, () => (rnd() + rnd() + rnd() - 1.5) * amp);
          check(x, 'tokens', n, H, d, g, bits);
          check(x, 'channels', n, H, d, g, bits);
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
