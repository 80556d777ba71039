import { describe, expect, it } from 'vitest';
import { fromHalfBits } from '@kvpack/core';
import { dequantizeMatrix, quantizeMatrix, roundHalfEven, type QuantSpec } from './quantize.js';

/**
 * Ties of the group quantizer: groups built so that x / scale is an exact half-integer, with the
 * scale s = 2^-3 (an exact float16 power of two, pinned by the group's extremes). torch.round rounds
 * a tie k + ½ to its even neighbour; the expected level is written from k alone (no rounding call),
 * so a quantizer that rounds ties up (Math.round) or away from zero fails here.
 */
const S = 2 ** -3;

/** The even one of the two integers around the tie k + ½ (k an integer of either sign). */
const evenNeighbour = (k: number) => (k % 2 === 0 ? k : k + 1);

/** Unpacks codes by hand: 8-bit one per byte; 4-bit two per byte, even element in the low nibble. */
function unpack(codes: Uint8Array, n: number, bits: number): number[] {
  return Array.from({ length: n }, (_, i) => (bits === 8 ? codes[i] : i % 2 === 0 ? codes[i >> 1] & 15 : codes[i >> 1] >> 4));
}

describe('roundHalfEven', () => {
  it('rounds every half-integer in [-20.5, 20.5] to its even neighbour, and non-ties to the nearest integer', () => {
    for (let k = -21; k <= 20; k++) {
      expect(roundHalfEven(k + 0.5), `${k} + 0.5`).toBe(evenNeighbour(k));
      expect(roundHalfEven(k + 0.25)).toBe(k);
      expect(roundHalfEven(k + 0.75)).toBe(k + 1);
    }
  });
});

describe('group quantizer: ties round half to even (torch.round)', () => {
  for (const bits of [4, 8] as const) {
    it(`${bits}-bit asymmetric: codes of x = (k + ½)·s are the even neighbours; the zero point too`, () => {
      const qHi = 2 ** bits - 1;
      // Row 0: min 0, max qHi·s → scale s, zero point 0; every tie k + ½, k = 0 … qHi − 1.
      // Row 1: min −2.5·s, max (qHi − 2.5)·s → scale s, zero point round(2.5) = 2 (ties up would give 3);
      //        ties k + ½ for k = −2 … qHi − 4; the extremes are ties as well (k = −3 and qHi − 3).
      const ks0 = Array.from({ length: qHi }, (_, k) => k);
      const ks1 = Array.from({ length: qHi - 2 }, (_, i) => i - 2);
      const row0 = [0, qHi * S, ...ks0.map((k) => (k + 0.5) * S)];
      const row1 = [-2.5 * S, (qHi - 2.5) * S, ...ks1.map((k) => (k + 0.5) * S)];
      const cols = Math.max(row0.length, row1.length);
      // Pad the shorter row with copies of its minimum (no new extremes, no new ties).
      while (row1.length < cols) row1.push(row1[0]);
      const x = Float32Array.from([...row0, ...row1]);
      const spec: QuantSpec = { bits, quantGroupSize: cols, symmetric: false };
      const q = quantizeMatrix(x, 2, cols, spec);
      expect(Array.from(q.scales, fromHalfBits)).toEqual([S, S]);
      const codes = Array.from(unpack(q.codes, 2 * cols, bits));
      // code = level + zero point.
      const want0 = [0, qHi, ...ks0.map(evenNeighbour)];
      const want1 = [-3, qHi - 3, ...ks1].map((k) => evenNeighbour(k) + 2);
      while (want1.length < cols) want1.push(want1[0]);
      expect(codes.slice(0, cols)).toEqual(want0);
      expect(Array.from(q.zeros!)).toEqual([0, 2]);
      expect(codes.slice(cols)).toEqual(want1);
      // Dequantized: (code − zero)·s, exact in float32.
      const deq = Array.from(dequantizeMatrix(q));
      expect(deq.slice(0, cols)).toEqual(want0.map((c) => c * S));
      expect(deq.slice(cols)).toEqual(want1.map((c) => (c - 2) * S));
    });

    it(`${bits}-bit symmetric: codes of x = ±(k + ½)·s are the even neighbours`, () => {
      const qHi = 2 ** (bits - 1) - 1;
      const qLo = -(2 ** (bits - 1));
      // max |x| = qHi·s → scale s; ties k + ½ for k = −qHi … qHi − 1 (both signs).
      const ks = Array.from({ length: 2 * qHi }, (_, i) => i - qHi);
      const row = [qHi * S, -qHi * S, ...ks.map((k) => (k + 0.5) * S)];
      const x = Float32Array.from(row);
      const q = quantizeMatrix(x, 1, row.length, { bits, quantGroupSize: row.length, symmetric: true });
      expect(fromHalfBits(q.scales[0])).toBe(S);
      const levels = [qHi, -qHi, ...ks.map(evenNeighbour)];
      expect(Array.from(unpack(q.codes, row.length, bits))).toEqual(levels.map((l) => l - qLo));
      expect(Array.from(dequantizeMatrix(q))).toEqual(levels.map((l) => l * S));
    });
  }
});
