import { describe, expect, it } from 'vitest';
import { argmaxRow, greedyAgreement, median, tokenNlls } from './metrics.js';

describe('metrics', () => {
  it('tokenNlls is −log softmax at the target (closed forms)', () => {
    // Row 0: uniform over 4 → log 4. Row 1: logits (0, ln 3) over 2 → p(1) = 3/4.
    const V = 4;
    const logits = new Float32Array([5, 5, 5, 5, 0, Math.log(3), -1e9, -1e9]);
    const n = tokenNlls(logits, V, [2, 1]);
    expect(n[0]).toBeCloseTo(Math.log(4), 12);
    expect(n[1]).toBeCloseTo(-Math.log(3 / 4), 6);
    // Large logits stay finite (log-sum-exp is shifted).
    expect(tokenNlls(new Float32Array([1000, 0]), 2, [1])[0]).toBeCloseTo(1000, 6);
    expect(() => tokenNlls(logits, V, [2])).toThrow(/logits for 1 targets/);
    expect(() => tokenNlls(logits, V, [2, 9])).toThrow(/outside the vocabulary/);
  });

  it('greedy agreement counts equal positions and finds the first divergence', () => {
    expect(greedyAgreement([1, 2, 3, 4], [1, 2, 3, 4])).toEqual({ matches: 4, total: 4, fraction: 1, firstDivergence: null });
    expect(greedyAgreement([1, 2, 3, 4], [1, 9, 3, 8])).toEqual({ matches: 2, total: 4, fraction: 0.5, firstDivergence: 1 });
    expect(greedyAgreement([1, 2], [])).toEqual({ matches: 0, total: 2, fraction: 0, firstDivergence: 0 });
    expect(greedyAgreement([], []).fraction).toBe(1);
  });

  it('median and argmax', () => {
    expect(median([3, 1, 2])).toBe(2);
    expect(median([4, 1, 3, 2])).toBe(2.5);
    expect(median([])).toBeNaN();
    expect(argmaxRow([0, 1, 5, 5, 9, 0], 3, 0)).toBe(2);
    expect(argmaxRow([0, 1, 5, 5, 9, 0], 3, 1)).toBe(1);
  });
});
