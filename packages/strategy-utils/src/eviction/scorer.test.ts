import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { keepTopScores, repeatPerHead } from './scorer.js';

describe('keepTopScores', () => {
  it('keeps per head the k highest scores, ties to the lower position, ascending (against a direct selection)', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 4 }), fc.integer({ min: 1, max: 30 }), fc.nat(), fc.array(fc.integer({ min: -3, max: 3 }), { minLength: 120, maxLength: 120 }), (H, T, kSeed, raw) => {
        const k = 1 + (kSeed % T);
        const scores = Float64Array.from({ length: H * T }, (_, i) => (raw[i % raw.length] === 3 ? Infinity : raw[i % raw.length]));
        const got = keepTopScores(scores, H, T, k);
        for (let h = 0; h < H; h++) {
          // Independent selection: repeatedly take the lowest position holding the current maximum.
          const left = new Set(Array.from({ length: T }, (_, t) => t));
          const want: number[] = [];
          for (let j = 0; j < k; j++) {
            let best = -1;
            for (const t of left) if (best < 0 || scores[h * T + t] > scores[h * T + best]) best = t;
            want.push(best);
            left.delete(best);
          }
          want.sort((a, b) => a - b);
          expect(Array.from({ length: k }, (_, j) => got[j * H + h])).toEqual(want);
        }
      }),
      { seed: 7, numRuns: 200 },
    );
  });

  it('repeats shared positions for every head', () => {
    expect(Array.from(repeatPerHead(Int32Array.from([4, 9]), 3))).toEqual([4, 4, 4, 9, 9, 9]);
  });
});

describe('keepTopScores input checks', () => {
  it('ranks NaN lowest and keeps +Infinity, and refuses scores of the wrong length', () => {
    // Head 0: a NaN score never displaces a finite one; +Infinity (a window) is always kept.
    const scores = [NaN, 1, Infinity, 0.5, NaN, 2];
    expect(Array.from(keepTopScores(scores, 1, 6, 3))).toEqual([1, 2, 5]);
    expect(() => keepTopScores([1, 2, 3], 2, 2, 1)).toThrow(/3 values, expected \[H_kv = 2, T = 2\] = 4/);
  });
});
