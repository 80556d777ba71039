import { defineStrategy } from '@kvpack/core';
import { GroupSvdCache, groupSvdPrefixCut, mlaGroupSvdCompressor, compressGroupSvd, groupFactoredShapes, groupRanksPaperRatio, hasRankTarget, lowRankOptionShape, paperCompressionRatio, refineRankTarget, targetGroupRanks } from '@kvpack/strategy-utils';
import { z } from 'zod';

/**
 * Options of the `svd` baseline: the same ranks, SVD, storage and factor-quantization options as
 * `xkv`, without a group size (it is always 1).
 */
export const SvdOptionsSchema = z.strictObject({ ...lowRankOptionShape }).superRefine(refineRankTarget);
export type SvdOptions = z.output<typeof SvdOptionsSchema>;

/**
 * The per-layer `svd` baseline — the xKV paper's "Single SVD" (Chang et al. 2025, §4): each layer's
 * pre-RoPE keys, and its values, X = [T, H_kv·d] with all KV heads side by side, are factored alone
 * at rank `rankK` / `rankV`. It is the grouped low-rank machinery with groups of one layer.
 * Ranks: absolute `rankK` / `rankV`, or a `targetRatio` / `rankFraction` resolved per prompt length
 * at compress time (the ranks each layer got: `stats().groups`).
 * `compress` throws KvpackError('rank' | 'layout' | 'shape' | 'dtype' | 'nonfinite') on bad input.
 */
export const svdDefinition = defineStrategy({
  name: 'svd',
  description: 'per-layer truncated SVD of pre-RoPE keys and values ("Single SVD" in the xKV paper)',
  schema: SvdOptionsSchema,
  compress: (cache, options, T) => compressGroupSvd(cache, 'svd', options, { ...options, layersPerGroup: 1 }, T),
  restore: (r, options) => GroupSvdCache.restore(r, 'svd', options, { ...options, layersPerGroup: 1 }),
  capabilities: {
    paperRatio: (o, layout, tokens) =>
      hasRankTarget(o)
        ? groupRanksPaperRatio(layout, tokens, 1, targetGroupRanks('svd', { ...o, layersPerGroup: 1 }, layout, tokens))
        : paperCompressionRatio({ layout, tokens, layersPerGroup: 1, rankK: o.rankK, rankV: o.rankV }),
    // With a rank target the ranks depend on T, which this capability is not given: no shapes.
    factoredShapes: (o, layout, layers) => (hasRankTarget(o) ? [] : groupFactoredShapes(layout, layers, 1, o.rankK, o.rankV)),
    // A token-basis row belongs to one token: any prefix keeps its rows and the same factors.
    cutPrefix: (o) => groupSvdPrefixCut('svd', o),
    ratioTarget: (o) => (o.targetRatio === undefined ? null : { target: o.targetRatio, knob: 'ranks' }),
    // MLA latent caches: each layer's latents [T, d_c] factored alone; RoPE keys exact or factored (options.mla).
    mla: (o) => mlaGroupSvdCompressor('svd', o, { ...o, layersPerGroup: 1 }),
  },
  renamedOptions: { 'factorQuantization.groupSize': 'factorQuantization.quantGroupSize' },
});
