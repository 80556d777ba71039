import { describe, expect, it } from 'vitest';
import { exactMatch, summarizeAccuracy } from './scoring.js';

describe('exact-match scoring', () => {
  it('is true only for the same ids in the same order and length', () => {
    expect(exactMatch([3, 10, 6], [3, 10, 6])).toBe(true);
    expect(exactMatch([3, 10, 7], [3, 10, 6])).toBe(false);
    expect(exactMatch([3, 10], [3, 10, 6])).toBe(false); // stopped early (EOS)
    expect(exactMatch([3, 10, 6, 2], [3, 10, 6])).toBe(false);
    expect(exactMatch([10, 3, 6], [3, 10, 6])).toBe(false);
    expect(exactMatch([], [])).toBe(true);
  });

  it('aggregates per task and macro-averages over tasks (hand-computed)', () => {
    const records = [
      { task: 'niah_single', correct: true },
      { task: 'vt', correct: false },
      { task: 'niah_single', correct: true },
      { task: 'niah_single', correct: false },
      { task: 'vt', correct: true },
      { task: 'niah_single', correct: true },
    ];
    const s = summarizeAccuracy(records);
    // niah_single: 3 of 4; vt: 1 of 2; mean over tasks (0.75 + 0.5) / 2 = 0.625 (the example mean would be 4/6).
    expect(s.tasks).toEqual([
      { task: 'niah_single', correct: 3, total: 4, accuracy: 0.75 },
      { task: 'vt', correct: 1, total: 2, accuracy: 0.5 },
    ]);
    expect(s.mean).toBe(0.625);
    expect(s.correct).toBe(4);
    expect(s.total).toBe(6);
  });

  it('follows a given task order; a task without examples has NaN accuracy and does not enter the mean', () => {
    const s = summarizeAccuracy([{ task: 'b', correct: true }], ['a', 'b']);
    expect(s.tasks.map((t) => t.task)).toEqual(['a', 'b']);
    expect(s.tasks[0]).toMatchObject({ total: 0, correct: 0 });
    expect(Number.isNaN(s.tasks[0].accuracy)).toBe(true);
    expect(s.mean).toBe(1);
    expect(Number.isNaN(summarizeAccuracy([]).mean)).toBe(true);
  });
});
