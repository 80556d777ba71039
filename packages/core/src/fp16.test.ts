import { describe, expect, it } from 'vitest';
import { encodeHalf, roundHalf, toHalfBits } from './fp16.js';

/**
 * float32 → float16 ties: the exact midpoint between two adjacent float16 values goes to the one
 * with an even significand (IEEE-754 round-to-nearest-even, as torch's .half() does). The two
 * neighbours and the midpoint are written from the binary16 closed form in float64 (not from
 * fp16.ts), and the midpoint is exact in float32 (12 significant bits).
 */

/** Value of the non-negative finite float16 pattern h (h < 0x7c00), by the binary16 closed form. */
function halfValue(h: number): number {
  const e = h >> 10;
  const m = h & 1023;
  return e === 0 ? m * 2 ** -24 : (1024 + m) * 2 ** (e - 25);
}

/** Patterns h (non-negative, finite) whose midpoint with h + 1 is tested: every subnormal and a stride of normals, with every exponent boundary. */
function patterns(): number[] {
  const hs = new Set<number>();
  for (let h = 0; h < 0x400; h++) hs.add(h); // subnormals, and the subnormal → normal boundary (0x3ff / 0x400)
  for (let h = 0x400; h < 0x7bff; h += 5) hs.add(h);
  for (let e = 1; e < 31; e++) {
    hs.add((e << 10) - 1); // 0x…3ff: odd significand, the tie carries into the next exponent
    hs.add(e << 10);
  }
  hs.add(0x7bfe);
  hs.add(0x7bff); // the midpoint of 65504 and 2^16 = 65520: to even → overflows to +Inf (0x7c00)
  return [...hs].sort((a, b) => a - b);
}

describe('float16 rounding: ties go to the even neighbour', () => {
  it('toHalfBits and encodeHalf: the midpoint of h and h + 1 gives whichever is even, for both signs', () => {
    let checked = 0;
    let downs = 0;
    for (const h of patterns()) {
      const mid = (halfValue(h) + (h + 1 === 0x7c00 ? 2 ** 16 : halfValue(h + 1))) / 2;
      expect(Math.fround(mid), `midpoint of 0x${h.toString(16)} is a float32`).toBe(mid);
      const want = h % 2 === 0 ? h : h + 1;
      if (want === h) downs++;
      expect(toHalfBits(mid), `+midpoint of 0x${h.toString(16)} and 0x${(h + 1).toString(16)} (${mid})`).toBe(want);
      expect(toHalfBits(-mid), `−midpoint of 0x${h.toString(16)}`).toBe(0x8000 | want);
      expect(encodeHalf([mid, -mid])).toEqual(Uint16Array.from([want, 0x8000 | want]));
      checked++;
    }
    // Half of the ties round down (towards the even lower neighbour): a rule of "ties up" fails those.
    expect(downs).toBeGreaterThan(checked / 3);
  });

  it('roundHalf: the midpoint rounds to the value of the even neighbour (±Inf past 65504)', () => {
    const hs = patterns();
    const mids = hs.map((h) => (halfValue(h) + (h + 1 === 0x7c00 ? 2 ** 16 : halfValue(h + 1))) / 2);
    const got = roundHalf(Float32Array.from([...mids, ...mids.map((m) => -m)]));
    const want = hs.map((h) => (h % 2 === 0 ? halfValue(h) : h + 1 === 0x7c00 ? Infinity : halfValue(h + 1)));
    expect(Array.from(got)).toEqual([...want, ...want.map((w) => -w)]);
  });

  it('one float32 ulp either side of a tie rounds to the nearer neighbour, not the even one', () => {
    for (const h of [0x0001, 0x0002, 0x03fe, 0x3c00, 0x3c01, 0x3bff, 0x5555, 0x7bfe]) {
      const lo = halfValue(h);
      const hi = halfValue(h + 1);
      const mid = (lo + hi) / 2;
      const ulp32 = 2 ** (Math.floor(Math.log2(mid)) - 23);
      expect(toHalfBits(mid - ulp32), `below the midpoint of 0x${h.toString(16)}`).toBe(h);
      expect(toHalfBits(mid + ulp32), `above the midpoint of 0x${h.toString(16)}`).toBe(h + 1);
    }
  });
});
