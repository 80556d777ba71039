import { KvpackError, MAX_TOKENS, atMost } from '@kvpack/core';
import { z } from 'zod';
import { scorerWindow, type TokenScorerOptions } from '../eviction/scorers.js';

/**
 * The `budget` option of a token-eviction strategy: tokens kept per KV head and layer, a positive
 * integer of at most 2^20 (core MAX_TOKENS), optional (it excludes `targetRatio`).
 * @param describe the option's help text
 * @param error the message past MAX_TOKENS
 */
export function budgetOption(describe: string, error: string = atMost(MAX_TOKENS, 'tokens')) {
  return z.int().positive().max(MAX_TOKENS, { error }).optional().describe(describe);
}

/**
 * The `targetRatio` option of a token-eviction strategy: dense fp16 bytes ÷ bytes held, in [1, 1e9],
 * optional (it excludes `budget`).
 */
export function targetRatioOption(describe = 'Target ratio (dense fp16 bytes ÷ bytes held) instead of a budget: the largest budget reaching it at the actual T.') {
  return z.number().min(1).max(1e9).optional().describe(describe);
}

/** Arguments of the schema refinement that `budget` and `targetRatio` exclude each other: `.refine(...budgetOrTarget)`. */
export const budgetOrTarget: [(o: { budget?: number; targetRatio?: number }) => boolean, { message: string; path: string[] }] = [
  (o) => o.budget === undefined || o.targetRatio === undefined,
  { message: 'give budget or targetRatio, not both', path: ['targetRatio'] },
];

/**
 * Arguments of the schema refinement that the budget (`fallback` when unset) exceeds the scorer's
 * window, which it includes: `.refine(...budgetAboveScorerWindow(256))`.
 */
export function budgetAboveScorerWindow(fallback: number): [(o: { budget?: number; scorer: TokenScorerOptions }) => boolean, { message: string; path: string[] }] {
  return [(o) => (o.budget ?? fallback) > scorerWindow(o.scorer), { message: "budget must exceed the scorer's window (the budget includes the window)", path: ['budget'] }];
}

/**
 * Options with the budget fixed: as given (`fallback` when unset) without a target ratio, else the
 * budget `byTarget` resolves from ρ and the other options; the result records the budget, not the
 * target.
 * @throws whatever `byTarget` throws (KvpackError('config') when ρ is out of reach).
 */
export function resolveBudgetOption<O extends { budget?: number; targetRatio?: number }>(
  o: O,
  fallback: number,
  byTarget: (target: number, rest: Omit<O, 'targetRatio'>) => number,
): O & { budget: number } {
  if (o.targetRatio === undefined) return { ...o, budget: o.budget ?? fallback };
  const { targetRatio, ...rest } = o;
  return { ...rest, budget: byTarget(targetRatio, rest) } as O & { budget: number };
}

/**
 * Resolves a restored cache's options at its prefill length T; an options set that gives no budget
 * at T means the file is corrupt.
 * @throws KvpackError('corrupt') naming the strategy, T and the resolver's message.
 */
export function restoredBudget<R>(strategy: string, T: number, resolve: () => R): R {
  try {
    return resolve();
  } catch (e) {
    throw new KvpackError('corrupt', `serialized ${strategy} cache is corrupt: its options give no budget at T = ${T} (${(e as Error).message})`);
  }
}
