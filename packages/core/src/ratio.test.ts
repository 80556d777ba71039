import { describe, expect, it } from 'vitest';
import { KvpackError } from './errors.js';
import { compressionRatioOf, formatRatio, normalizeRatioOptions, ratioForms, ratioOfCompressionRatio, targetRatioOf } from './ratio.js';

describe('ratios both ways: kvpack × and kvpress compression_ratio', () => {
  it('converts as kvpress defines it (fraction removed): 0.5 is 2×, 0.875 is 8×, 0.96875 is 32×', () => {
    for (const [x, c] of [[1, 0], [2, 0.5], [4, 0.75], [8, 0.875], [16, 0.9375], [32, 0.96875]]) {
      expect(compressionRatioOf(x)).toBe(c);
      expect(ratioOfCompressionRatio(c)).toBe(x);
    }
    // A cache that grew (ratio below 1) removed a negative fraction.
    expect(compressionRatioOf(0.8)).toBeCloseTo(-0.25, 15);
    expect(ratioForms(8)).toEqual({ ratio: 8, compressionRatio: 0.875 });
    expect(formatRatio(16)).toBe('16.00× (cr 0.938)');
    expect(formatRatio(Number.NaN)).toBe('N/A');
  });

  it('accepts either form in a config; both must agree; out-of-range values are config errors', () => {
    expect(targetRatioOf({})).toBeUndefined();
    expect(targetRatioOf({ targetRatio: 8 })).toBe(8);
    expect(targetRatioOf({ compressionRatio: 0.875 })).toBe(8);
    expect(targetRatioOf({ targetRatio: 8, compressionRatio: 0.875 })).toBe(8);
    const bad = [{ targetRatio: 8, compressionRatio: 0.5 }, { compressionRatio: 1 }, { compressionRatio: -0.1 }, { targetRatio: 0.5 }, { compressionRatio: '0.5' }];
    for (const b of bad) {
      let err: unknown;
      try {
        targetRatioOf(b, 'here');
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(KvpackError);
      expect((err as KvpackError).code).toBe('config');
      expect((err as KvpackError).message).toMatch(/^here: /);
    }
    expect(normalizeRatioOptions({ budget: 3, compressionRatio: 0.75 }, 'x')).toEqual({ budget: 3, targetRatio: 4 });
    const same = { budget: 3 };
    expect(normalizeRatioOptions(same, 'x')).toBe(same);
  });
});
