import { z } from 'zod';
import { ExpectedAttentionScorerSchema, budgetOption, budgetOrTarget, checkScorer, targetRatioOption, defineEvictionStrategy, expectedAttentionScores } from '@kvpack/strategy-utils';

/** Options of the `expected-attention` strategy: a budget and the scorer's options (kvpress `ExpectedAttentionPress` defaults). */
export const ExpectedAttentionOptionsSchema = ExpectedAttentionScorerSchema.omit({ name: true })
  .extend({
    /** Prefill tokens kept per KV head and layer, the sinks included; at most 2^20. */
    budget: budgetOption('Prefill tokens kept per KV head and layer, the sinks included (default 256; excludes targetRatio).'),
    /**
     * Target ratio (dense fp16 bytes ÷ bytes held, kept positions included) instead of a budget: the
     * largest budget whose measured ratio is ≥ the target at the actual T (the `evictionBudget` rule
     * of @kvpack/strategy-utils). Excludes budget; `compressionRatio` (kvpress's fraction removed) is accepted for it.
     */
    targetRatio: targetRatioOption(),
  })
  .refine(...budgetOrTarget);
export type ExpectedAttentionOptions = z.output<typeof ExpectedAttentionOptionsSchema>;

/**
 * The `expected-attention` strategy (NVIDIA kvpress `ExpectedAttentionPress`, 2025): query-agnostic
 * token eviction by the closed-form attention that future queries are expected to pay each key
 * ({@link expectedAttentionScores}: Gaussian future queries from the statistics of the observed
 * pre-RoPE queries, or of the keys when the cache has none, moved by the RoPE rotation averaged over
 * the next `nFuturePositions` positions; scores softmax(μ̂ᵀk/√d + kᵀΣ̂k/(2d)) times ‖v‖). Per layer and
 * KV head the `budget` best tokens are kept, the first `nSink` always ({@link KeptTokensCache}:
 * float16 [budget, H_kv, d] and int32 positions [budget, H_kv]). When T ≤ budget nothing is evicted.
 * A `targetRatio` resolves the budget per T (`evictionBudget`).
 *
 * `compress` throws KvpackError('config') when `statistics: 'queries'` and the cache has no queries
 * or a target ratio is out of reach,
 * KvpackError('layout' | 'shape' | 'dtype' | 'nonfinite') on a bad cache.
 */
export const expectedAttentionDefinition = defineEvictionStrategy({
  name: 'expected-attention',
  description: 'Expected Attention: query-agnostic eviction by the closed-form expected attention of future queries (NVIDIA kvpress 2025)',
  schema: ExpectedAttentionOptionsSchema,
  capabilities: { queryWindow: (o) => (o.statistics === 'keys' ? 0 : o.queryWindow) },
  scorer: {
    budget: (o) => o.budget ?? 256,
    targetRatio: (o) => o.targetRatio,
    check: (cache, o) => checkScorer(cache, { ...o, name: 'expected-attention' }, 'expected-attention'),
    score: (cache, layer, o, { postKeys }) => expectedAttentionScores(cache, layer, { ...o, name: 'expected-attention' }, postKeys),
  },
});
