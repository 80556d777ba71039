import { MAX_TOKENS, atMost, check, defineStrategy } from '@kvpack/core';
import { z } from 'zod';
import { KeptTokensCache, TokenScorerSchema, checkScorer, pyramidBudgets, scoreTokens, scorerQueryWindow, scorerWindow, topKPositions } from '@kvpack/strategy-utils';

/** Options of the `pyramidkv` strategy. */
export const PyramidKvOptionsSchema = z
  .strictObject({
    /** Average prefill tokens kept per KV head and layer, the scorer's window included: the total equals a uniform budget's. */
    budget: z.int().positive().max(MAX_TOKENS, { error: atMost(MAX_TOKENS, 'tokens') }).default(256).describe('Average prefill tokens kept per KV head and layer, the window included (the total of a uniform budget).'),
    /** β ≥ 1: the top layer keeps S/β prefix tokens, the bottom one 2S − S/β (S = budget − window); PyramidKV's default 20. */
    beta: z.number().min(1).max(MAX_TOKENS).default(20).describe('Pyramid steepness β ≥ 1: the top layer keeps S/β prefix tokens, the bottom 2S − S/β (S = budget − window).'),
    /** The scorer the tokens of each layer are chosen by. */
    scorer: TokenScorerSchema.prefault({ name: 'snapkv' }),
  })
  .refine((o) => o.budget > scorerWindow(o.scorer), { message: 'budget must exceed the scorer\'s window (the budget includes the window)', path: ['budget'] });
export type PyramidKvOptions = z.output<typeof PyramidKvOptionsSchema>;

/** Tokens per KV head each layer of an L-layer cache of T tokens keeps, bottom layer first. */
export function pyramidLayerTokens(o: PyramidKvOptions, L: number, T: number): number[] {
  const w = scorerWindow(o.scorer);
  return pyramidBudgets(L, T, o.budget, w, o.beta).map((b) => Math.min(T, b + w));
}

/**
 * The `pyramidkv` strategy (Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on
 * Pyramidal Information Funneling", arXiv 2406.02069; as NVIDIA kvpress's `PyramidKVPress`): layer
 * budgets decreasing arithmetically from the bottom layer to the top ({@link pyramidBudgets}: the
 * paper's formula with β), their total that of a uniform budget; within a layer each KV head keeps
 * its own top tokens of a scorer (SnapKV's by default), the same count per head, so the cache is the
 * shared eviction cache ({@link KeptTokensCache}: float16 [n_l, H_kv, d] and int32 positions
 * [n_l, H_kv] per layer). When T ≤ budget nothing is evicted.
 *
 * `compress` throws KvpackError('config') when the scorer needs queries the cache lacks,
 * KvpackError('layout' | 'shape' | 'dtype' | 'nonfinite') on a bad cache.
 */
export const pyramidKvDefinition = defineStrategy({
  name: 'pyramidkv',
  description: 'PyramidKV: layer budgets decreasing arithmetically from the bottom layer to the top, over a token scorer (Cai et al. 2024)',
  schema: PyramidKvOptionsSchema,
  capabilities: { queryWindow: (o) => scorerQueryWindow(o.scorer) },
  async compress(cache, o, T) {
    checkScorer(cache, o.scorer, 'pyramidkv');
    const n = pyramidLayerTokens(o, cache.layout.nLayers, T);
    return KeptTokensCache.fromSelection('pyramidkv', o, cache, T, true, (l, postKeys) => {
      if (n[l] >= T) return null;
      const scores = scoreTokens(cache, l, o.scorer, postKeys);
      try {
        return topKPositions(scores, n[l]);
      } finally {
        scores.dispose();
      }
    });
  },
  restore: (reader, o) => {
    const c = KeptTokensCache.restore(reader, 'pyramidkv', o);
    const { layout, prefillLength: T } = reader.header;
    const n = pyramidLayerTokens(o, layout.nLayers, T);
    for (let l = 0; l < layout.nLayers; l++) {
      if (c.tokenCount(l) !== n[l]) {
        c.dispose();
        check(false, 'corrupt', `serialized pyramidkv cache is corrupt: layer ${l} keeps ${c.tokenCount(l)} tokens, its options imply ${n[l]}`);
      }
    }
    return c;
  },
});
