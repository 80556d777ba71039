// Test helpers: the backend KIVI quantizer (strategy-utils holdMinMaxOnBackend) against the host
// float64 quantizer (./host-oracle.ts), and groups built on its rounding boundaries.
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'vitest';
import { fromHalfBits } from '@kvpack/core';
import { holdMinMaxOnBackend, packCodes, unpackCodes, type MinMaxGrouping } from '@kvpack/strategy-utils';
import { quantizeKeysPerChannel, quantizeValuesPerToken } from './host-oracle.js';

/** The float32 neighbour of x one ulp up (dir 1) or down (dir −1). */
function ulpStep(x: number, dir: 1 | -1): number {
  const f = new Float32Array([x]);
  const i = new Int32Array(f.buffer);
  if (x === 0) return dir * 2 ** -149;
  i[0] += (x > 0 ? 1 : -1) * dir;
  return f[0];
}

/** Groups of g values built on rounding boundaries (g ≥ 2^b + 1), for 2^b − 1 = maxq. */
export function boundaryGroups(bits: 2 | 4, g: number, rnd: () => number): number[][] {
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

export async function expectBackendMatchesHost(x: Float32Array, along: MinMaxGrouping, n: number, H: number, d: number, g: number, bits: 2 | 4) {
  const want = along === 'tokens' ? quantizeKeysPerChannel(x, n, H, d, g, bits) : quantizeValuesPerToken(x, n, H, d, g, bits);
  const xt = tf.tensor3d(x, [n, H, d]);
  const got = holdMinMaxOnBackend({ along, n, H, d, g, bits }, xt);
  xt.dispose();
  try {
    expect((await got.nonFinite.data())[0]).toBe(0);
    const scale = await got.scale.bits();
    const min = await got.min.bits();
    // On a mismatch, name the first group that differs (its values, and both results).
    const bad = Array.from(scale).findIndex((s, i) => s !== want.scale[i] || min[i] !== want.min[i]);
    expect(bad === -1 ? null : { group: bad, values: groupValues(x, along, n, H, d, g, bad), got: [fromHalfBits(scale[bad]), fromHalfBits(min[bad])], want: [fromHalfBits(want.scale[bad]), fromHalfBits(want.min[bad])] }).toBeNull();
    const bytes = new Uint8Array(Int32Array.from((await got.codes.packed.data()) as Int32Array).buffer, 0, got.codes.byteLength);
    const codes = unpackCodes(bytes, bits, n * H * d);
    const at = codes.findIndex((c, i) => c !== want.codes[i]);
    expect(at === -1 ? null : { at, x: x[at], got: codes[at], want: want.codes[at] }).toBeNull();
    expect(Buffer.from(bytes).equals(Buffer.from(packCodes(want.codes, bits)))).toBe(true);
  } finally {
    got.codes.dispose();
    got.scale.dispose();
    got.min.dispose();
    got.nonFinite.dispose();
  }
}

