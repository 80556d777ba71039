import { MAX_TOKENS, atMost, defineStrategy } from '@kvpack/core';
import { z } from 'zod';
import { RaggedKeptCache, TokenScorerSchema, adaKvSelect, checkScorer, scoreTokens, scorerQueryWindow, scorerWindow } from '@kvpack/strategy-utils';

/** Options of the `adakv` strategy. */
export const AdaKvOptionsSchema = z
  .strictObject({
    /** Average prefill tokens kept per KV head and layer (B), the scorer's window included; the layer keeps B·H_kv in all. */
    budget: z.int().positive().max(MAX_TOKENS, { error: atMost(MAX_TOKENS, 'tokens') }).default(256).describe('Average prefill tokens kept per KV head and layer (B); each layer keeps B·H_kv tokens over its heads, split by score.'),
    /** Safeguard α: each head keeps at least ⌊α·B⌋ of its own highest-scoring tokens (Ada-KV §4.2; kvpress alpha_safeguard). */
    alphaSafeguard: z.number().min(0).max(1).default(0.2).describe('Safeguard fraction α in [0, 1]: each KV head keeps at least ⌊α·B⌋ tokens.'),
    /** The scorer the budget is allocated over. */
    scorer: TokenScorerSchema.prefault({ name: 'snapkv' }),
  })
  .refine((o) => o.budget > scorerWindow(o.scorer), { message: 'budget must exceed the scorer\'s window (the budget includes the window)', path: ['budget'] });
export type AdaKvOptions = z.output<typeof AdaKvOptionsSchema>;

/**
 * The `adakv` strategy (Feng et al. 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
 * Allocation", arXiv 2407.11550; as NVIDIA kvpress's `AdaKVPress`): head-wise adaptive budgets over a
 * token scorer (SnapKV's by default, Expected Attention's too). Per layer the scorer gives scores
 * [H_kv, T]; the layer's total budget B·H_kv goes to the highest scores over all KV heads jointly,
 * after each head's own ⌊α·B⌋ best are secured ({@link adaKvSelect}), so heads keep different counts.
 * The cache stores exactly the kept rows, ragged per head ({@link RaggedKeptCache}: float16 keys and
 * values [N, d], N = B·H_kv, positions int32 [N], counts int32 [H_kv]); its `attend` masks each head's
 * padding. When T ≤ B nothing is evicted.
 *
 * `compress` throws KvpackError('config') when the scorer needs queries the cache lacks (SnapKV:
 * `KVCache.queries` of at least `window` tokens), KvpackError('layout' | 'shape' | 'dtype' |
 * 'nonfinite') on a bad cache.
 */
export const adaKvDefinition = defineStrategy({
  name: 'adakv',
  description: 'AdaKV: head-wise adaptive budgets over a token scorer, the layer budget spent on the top scores of all heads (Feng et al. 2024)',
  schema: AdaKvOptionsSchema,
  capabilities: { queryWindow: (o) => scorerQueryWindow(o.scorer) },
  async compress(cache, o, T) {
    checkScorer(cache, o.scorer, 'adakv');
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
  restore: (reader, o) => RaggedKeptCache.restore(reader, 'adakv', o, () => reader.header.layout.nKvHeads * Math.min(reader.header.prefillLength, o.budget)),
});

