import { defineStrategy, denseCacheBytes, type ModelLayout } from '@kvpack/core';
import { z } from 'zod';
import {
  RaggedKeptCache,
  TokenScorerSchema,
  adaKvSelect,
  budgetAboveScorerWindow,
  budgetOption,
  budgetOrTarget,
  checkScorer,
  raggedKeptBytes,
  resolveBudgetByTarget,
  resolveBudgetOption,
  restoredBudget,
  scoreTokens,
  scorerQueryWindow,
  scorerWindow,
  targetRatioOption,
} from '@kvpack/strategy-utils';

/** Budget when neither budget nor targetRatio is given. */
const DEFAULT_BUDGET = 256;

/** Options of the `adakv` strategy. */
export const AdaKvOptionsSchema = z
  .strictObject({
    /** Average prefill tokens kept per KV head and layer (B), the scorer's window included; the layer keeps B·H_kv in all. */
    budget: budgetOption('Average prefill tokens kept per KV head and layer (B; default 256; excludes targetRatio); each layer keeps B·H_kv tokens over its heads, split by score.'),
    /**
     * Target ratio (dense fp16 bytes ÷ bytes held, positions and per-head counts included) instead of
     * a budget: the largest B whose measured ratio is ≥ the target at the actual T. Excludes budget;
     * `compressionRatio` (kvpress's fraction removed) is accepted for it.
     */
    targetRatio: targetRatioOption(),
    /** Safeguard α: each head keeps at least ⌊α·B⌋ of its own highest-scoring tokens (Ada-KV §4.2; kvpress alpha_safeguard). */
    alphaSafeguard: z.number().min(0).max(1).default(0.2).describe('Safeguard fraction α in [0, 1]: each KV head keeps at least ⌊α·B⌋ tokens.'),
    /** The scorer the budget is allocated over. */
    scorer: TokenScorerSchema.prefault({ name: 'snapkv' }),
  })
  .refine(...budgetOrTarget)
  .refine(...budgetAboveScorerWindow(DEFAULT_BUDGET));
export type AdaKvOptions = z.output<typeof AdaKvOptionsSchema>;

/**
 * The options with the budget B fixed for a prefill of T tokens: as given (256 by default), or — with
 * a targetRatio ρ — the largest B (above the scorer's window) whose bytes right after compress,
 * `raggedKeptBytes(layout, L·H_kv·min(T, B))`, times ρ are ≤ the dense fp16 bytes. The result
 * records the budget, not the target.
 * @throws KvpackError('config') when even window + 1 tokens stay below ρ, naming the reachable range.
 */
export function resolveAdaKvOptions(o: AdaKvOptions, layout: ModelLayout, T: number): AdaKvOptions & { budget: number } {
  const { nLayers: L, nKvHeads: H } = layout;
  return resolveBudgetOption(o, DEFAULT_BUDGET, (target) =>
    resolveBudgetByTarget({
      strategy: 'adakv',
      target,
      tokens: T,
      denseBytes: denseCacheBytes(layout, T),
      least: scorerWindow(o.scorer) + 1,
      bytesOf: (B) => raggedKeptBytes(layout, L * H * Math.min(T, B)),
    }),
  );
}

/**
 * The `adakv` strategy (Feng et al. 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
 * Allocation", arXiv 2407.11550; as NVIDIA kvpress's `AdaKVPress`): head-wise adaptive budgets over a
 * token scorer (SnapKV's by default, Expected Attention's too). Per layer the scorer gives scores
 * [H_kv, T]; the layer's total budget B·H_kv goes to the highest scores over all KV heads jointly,
 * after each head's own ⌊α·B⌋ best are secured ({@link adaKvSelect}), so heads keep different counts.
 * The cache stores exactly the kept rows, ragged per head ({@link RaggedKeptCache}: float16 keys and
 * values [N, d], N = B·H_kv, positions int32 [N], counts int32 [H_kv]); its `attend` masks each head's
 * padding. When T ≤ B nothing is evicted. A `targetRatio` resolves B per T ({@link resolveAdaKvOptions}).
 *
 * `compress` throws KvpackError('config') when the scorer needs queries the cache lacks (SnapKV:
 * `KVCache.queries` of at least `window` tokens) or a target ratio is out of reach,
 * KvpackError('layout' | 'shape' | 'dtype' | 'nonfinite') on a bad cache.
 */
export const adaKvDefinition = defineStrategy({
  name: 'adakv',
  description: 'AdaKV: head-wise adaptive budgets over a token scorer, the layer budget spent on the top scores of all heads (Feng et al. 2024)',
  schema: AdaKvOptionsSchema,
  capabilities: {
    queryWindow: (o) => scorerQueryWindow(o.scorer),
    ratioTarget: (o) => (o.targetRatio === undefined ? null : { target: o.targetRatio, knob: 'budget' }),
  },
  async compress(cache, given, T) {
    checkScorer(cache, given.scorer, 'adakv');
    const o = resolveAdaKvOptions(given, cache.layout, T);
    return RaggedKeptCache.fromSelection('adakv', o, cache, T, (l, postKeys) => {
      if (T <= o.budget) return null;
      const scores = scoreTokens(cache, l, o.scorer, postKeys);
      try {
        return adaKvSelect(scores, o.budget, o.alphaSafeguard);
      } finally {
        scores.dispose();
      }
    });
  },
  restore: (reader, given) => {
    const { layout, prefillLength: T } = reader.header;
    const o = restoredBudget('adakv', T, () => resolveAdaKvOptions(given, layout, T));
    return RaggedKeptCache.restore(reader, 'adakv', o, () => layout.nKvHeads * Math.min(T, o.budget));
  },
});
