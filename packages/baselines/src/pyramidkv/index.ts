import { MAX_TOKENS, check, defineStrategy, denseCacheBytes, type ModelLayout } from '@kvpack/core';
import { z } from 'zod';
import {
  KeptTokensCache,
  TokenScorerSchema,
  budgetAboveScorerWindow,
  budgetOption,
  budgetOrTarget,
  checkScorer,
  keptTokensBytes,
  pyramidBudgets,
  resolveBudgetByTarget,
  resolveBudgetOption,
  restoredBudget,
  scoreTokens,
  scorerQueryWindow,
  scorerWindow,
  targetRatioOption,
  topKPositions,
} from '@kvpack/strategy-utils';

/** Budget when neither budget nor targetRatio is given. */
const DEFAULT_BUDGET = 256;

/** Options of the `pyramidkv` strategy. */
export const PyramidKvOptionsSchema = z
  .strictObject({
    /** Average prefill tokens kept per KV head and layer, the scorer's window included: the total equals a uniform budget's. */
    budget: budgetOption('Average prefill tokens kept per KV head and layer, the window included (the total of a uniform budget; default 256; excludes targetRatio).'),
    /**
     * Target ratio (dense fp16 bytes ÷ bytes held, kept positions included) instead of a budget: the
     * largest average budget whose measured ratio is ≥ the target at the actual T. Excludes budget;
     * `compressionRatio` (kvpress's fraction removed) is accepted for it.
     */
    targetRatio: targetRatioOption('Target ratio (dense fp16 bytes ÷ bytes held) instead of a budget: the largest average budget reaching it at the actual T.'),
    /** β ≥ 1: the top layer keeps S/β prefix tokens, the bottom one 2S − S/β (S = budget − window); PyramidKV's default 20. */
    beta: z.number().min(1).max(MAX_TOKENS).default(20).describe('Pyramid steepness β ≥ 1: the top layer keeps S/β prefix tokens, the bottom 2S − S/β (S = budget − window).'),
    /** The scorer the tokens of each layer are chosen by. */
    scorer: TokenScorerSchema.prefault({ name: 'snapkv' }),
  })
  .refine(...budgetOrTarget)
  .refine(...budgetAboveScorerWindow(DEFAULT_BUDGET));
export type PyramidKvOptions = z.output<typeof PyramidKvOptionsSchema>;

/** Tokens per KV head each layer of an L-layer cache of T tokens keeps at these options' budget (256 when unset), bottom layer first. */
export function pyramidLayerTokens(o: PyramidKvOptions, L: number, T: number): number[] {
  const w = scorerWindow(o.scorer);
  return pyramidBudgets(L, T, o.budget ?? DEFAULT_BUDGET, w, o.beta).map((b) => Math.min(T, b + w));
}

/**
 * The options with the average budget fixed for a prefill of T tokens: as given (256 by default), or
 * — with a targetRatio ρ — the largest budget (above the scorer's window) whose bytes right after
 * compress, Σ_l keptTokensBytes of the layer's {@link pyramidLayerTokens} (positions stored), times ρ
 * are ≤ the dense fp16 bytes. The result records the budget, not the target.
 * @throws KvpackError('config') when even window + 1 tokens stay below ρ, naming the reachable range.
 */
export function resolvePyramidKvOptions(o: PyramidKvOptions, layout: ModelLayout, T: number): PyramidKvOptions & { budget: number } {
  const perLayer = { ...layout, nLayers: 1 };
  return resolveBudgetOption(o, DEFAULT_BUDGET, (target, rest) =>
    resolveBudgetByTarget({
      strategy: 'pyramidkv',
      target,
      tokens: T,
      denseBytes: denseCacheBytes(layout, T),
      least: scorerWindow(o.scorer) + 1,
      bytesOf: (b) => pyramidLayerTokens({ ...rest, budget: b }, layout.nLayers, T).reduce((a, n) => a + keptTokensBytes(perLayer, n, true), 0),
    }),
  );
}

/**
 * The `pyramidkv` strategy (Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on
 * Pyramidal Information Funneling", arXiv 2406.02069; as NVIDIA kvpress's `PyramidKVPress`): layer
 * budgets decreasing arithmetically from the bottom layer to the top ({@link pyramidBudgets}: the
 * paper's formula with β), their total that of a uniform budget; within a layer each KV head keeps
 * its own top tokens of a scorer (SnapKV's by default), the same count per head, so the cache is the
 * shared eviction cache ({@link KeptTokensCache}: float16 [n_l, H_kv, d] and int32 positions
 * [n_l, H_kv] per layer). When T ≤ budget nothing is evicted. A `targetRatio` resolves the budget per
 * T ({@link resolvePyramidKvOptions}).
 *
 * `compress` throws KvpackError('config') when the scorer needs queries the cache lacks or a target
 * ratio is out of reach,
 * KvpackError('layout' | 'shape' | 'dtype' | 'nonfinite') on a bad cache.
 */
export const pyramidKvDefinition = defineStrategy({
  name: 'pyramidkv',
  description: 'PyramidKV: layer budgets decreasing arithmetically from the bottom layer to the top, over a token scorer (Cai et al. 2024)',
  schema: PyramidKvOptionsSchema,
  capabilities: {
    queryWindow: (o) => scorerQueryWindow(o.scorer),
    ratioTarget: (o) => (o.targetRatio === undefined ? null : { target: o.targetRatio, knob: 'budget' }),
  },
  async compress(cache, given, T) {
    checkScorer(cache, given.scorer, 'pyramidkv');
    const o = resolvePyramidKvOptions(given, cache.layout, T);
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
  restore: (reader, given) => {
    const { layout, prefillLength: T } = reader.header;
    const o = restoredBudget('pyramidkv', T, () => resolvePyramidKvOptions(given, layout, T));
    const c = KeptTokensCache.restore(reader, 'pyramidkv', o);
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
