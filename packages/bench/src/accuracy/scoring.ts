/**
 * Exact-match scoring of greedy answers, per task — RULER's needle-in-a-haystack scoring
 * (Hsieh et al. 2024, NVIDIA/RULER `scripts/eval/synthetic/constants.py`: a prediction scores on the
 * needle it reproduces) in its strictest form, as rulermini-19m's PROVENANCE.md defines it: an
 * example is correct when the greedy continuation equals `answer_ids` token for token.
 */

/** True when the predicted token ids equal the answer's exactly (same length, same ids). */
export function exactMatch(predicted: readonly number[], answer: readonly number[]): boolean {
  if (predicted.length !== answer.length) return false;
  for (let i = 0; i < answer.length; i++) if (predicted[i] !== answer[i]) return false;
  return true;
}

/** Accuracy on one task. */
export interface TaskAccuracy {
  task: string;
  /** Examples answered exactly. */
  correct: number;
  /** Examples scored. */
  total: number;
  /** correct / total (NaN when total is 0). */
  accuracy: number;
}

/** Per-task exact-match accuracy and their macro average. */
export interface AccuracySummary {
  /** One entry per task, in order of first appearance (or the order given). */
  tasks: TaskAccuracy[];
  /** Mean of the per-task accuracies (RULER averages tasks, not examples). NaN when no task. */
  mean: number;
  /** Examples answered exactly over all tasks. */
  correct: number;
  /** Examples scored over all tasks. */
  total: number;
}

/**
 * Aggregates scored examples per task.
 * @param records one `{ task, correct }` per example
 * @param taskOrder tasks to list first, in this order (tasks with no record get total 0 and NaN accuracy)
 */
export function summarizeAccuracy(records: readonly { task: string; correct: boolean }[], taskOrder: readonly string[] = []): AccuracySummary {
  const by = new Map<string, { correct: number; total: number }>();
  for (const t of taskOrder) by.set(t, { correct: 0, total: 0 });
  for (const r of records) {
    const e = by.get(r.task) ?? { correct: 0, total: 0 };
    e.total++;
    if (r.correct) e.correct++;
    by.set(r.task, e);
  }
  const tasks = [...by.entries()].map(([task, e]) => ({ task, correct: e.correct, total: e.total, accuracy: e.total ? e.correct / e.total : NaN }));
  const scored = tasks.filter((t) => t.total > 0);
  return {
    tasks,
    mean: scored.length ? scored.reduce((a, t) => a + t.accuracy, 0) / scored.length : NaN,
    correct: tasks.reduce((a, t) => a + t.correct, 0),
    total: tasks.reduce((a, t) => a + t.total, 0),
  };
}
