import * as tf from '@tensorflow/tfjs-core';
import { selectBackend } from '@kvpack/core';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { keepTopScores, repeatPerHead, topKPositions } from './scorer.js';

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

describe('topKPositions (on the backend) against the host rule', () => {
  for (const backend of ['wasm', 'cpu'])
    it(`${backend}: the same positions as keepTopScores, ties (many), ±Infinity, ±float32 max and NaN included; no tensor left`, async () => {
      await selectBackend(backend);
      const n0 = tf.memory().numTensors;
      fc.assert(
        fc.property(fc.integer({ min: 1, max: 4 }), fc.integer({ min: 1, max: 40 }), fc.nat(), fc.array(fc.integer({ min: -4, max: 5 }), { minLength: 160, maxLength: 160 }), (H, T, kSeed, raw) => {
          const k = kSeed % (T + 1);
          const MAX = 3.4028234663852886e38; // the float32 extremes tie-break against ±∞ exactly like any other value
          const code = (v: number) => (v === 3 ? Infinity : v === 4 ? NaN : v === -3 ? -Infinity : v === 5 ? MAX : v === -4 ? -MAX : v / 2);
          const scores = Float32Array.from({ length: H * T }, (_, i) => code(raw[i % raw.length]));
          const want = keepTopScores(scores, H, T, k); // [k, H]
          const t = tf.tensor2d(scores, [H, T]);
          const p = topKPositions(t, k);
          const got = p.dataSync();
          expect(p.shape).toEqual([H, k]);
          expect(p.dtype).toBe('int32');
          tf.dispose([t, p]);
          for (let h = 0; h < H; h++) expect(Array.from(got.subarray(h * k, (h + 1) * k))).toEqual(Array.from({ length: k }, (_, j) => want[j * H + h]));
        }),
        { seed: 11, numRuns: 150 },
      );
      expect(tf.memory().numTensors).toBe(n0);
      const z = tf.zeros([2, 3]) as tf.Tensor2D;
      expect(() => topKPositions(z, 4)).toThrow(/k = 4 is not a count of the T = 3 positions/);
      z.dispose();
      await selectBackend('wasm');
    });
});
