import { defineStrategy } from '@kvpack/core';
import { GroupSvdCache, compressGroupSvd, groupFactoredShapes, lowRankOptionShape, paperCompressionRatio } from '@kvpack/strategy-utils';
import { z } from 'zod';

/**
 * Options of the `svd` baseline: the same ranks, SVD, storage and factor-quantization options as
 * `xkv`, without a group size (it is always 1).
 */
export const SvdOptionsSchema = z.strictObject({ ...lowRankOptionShape });
export type SvdOptions = z.output<typeof SvdOptionsSchema>;

/**
 * The per-layer `svd` baseline — the xKV paper's "Single SVD" (Chang et al. 2025, §4): each layer's
 * pre-RoPE keys, and its values, X = [T, H_kv·d] with all KV heads side by side, are factored alone
 * at rank `rankK` / `rankV`. It is the grouped low-rank machinery with groups of one layer.
 * `compress` throws KvpackError('rank' | 'layout' | 'shape' | 'dtype' | 'nonfinite') on bad input.
 */
export const svdDefinition = defineStrategy({
  name: 'svd',
  description: 'per-layer truncated SVD of pre-RoPE keys and values ("Single SVD" in the xKV paper)',
  schema: SvdOptionsSchema,
  compress: (cache, options, T) => compressGroupSvd(cache, 'svd', options, { ...options, layersPerGroup: 1 }, T),
  restore: (r, options) => GroupSvdCache.restore(r, 'svd', options, { ...options, layersPerGroup: 1 }),
  capabilities: {
    paperRatio: (o, layout, tokens) => paperCompressionRatio({ layout, tokens, layersPerGroup: 1, rankK: o.rankK, rankV: o.rankV }),
    factoredShapes: (o, layout, layers) => groupFactoredShapes(layout, layers, 1, o.rankK, o.rankV),
  },
  renamedOptions: { 'factorQuantization.groupSize': 'factorQuantization.quantGroupSize' },
});
