import { MAX_LAYERS, atMost, defineStrategy, type Strategy } from '@kvpack/core';
import { GroupSvdCache, groupSvdPrefixCut, mlaGroupSvdCompressor, SparseOptionsSchema, compressGroupSvd, groupFactoredShapes, groupRanksPaperRatio, hasRankTarget, lowRankOptionShape, paperCompressionRatio, refineRankTarget, targetGroupRanks } from '@kvpack/strategy-utils';
import { z } from 'zod';

/** Options of the `xkv` strategy. */
export const XkvOptionsSchema = z
  .strictObject({
    /** Layers per group G (default 4, the paper's xKV-4); consecutive from layer 0; at most 1,024 (core MAX_LAYERS). */
    layersPerGroup: z.int().positive().max(MAX_LAYERS, { error: atMost(MAX_LAYERS, 'layers per group; models have far fewer layers') }).default(4).describe("Layers per group G (consecutive from layer 0; 4 is the paper's xKV-4)."),
    ...lowRankOptionShape,
    /**
     * Decode mode of `attend`: `full` (when absent) rebuilds every key (fused RoPE) and forms values in
     * the compressed domain when cheaper; `sparse` (xKV-SR, after ShadowKV) stores chunk landmarks and
     * exact outlier/local tokens at compress time and rebuilds only the selected chunks' tokens.
     */
    decode: z.enum(['full', 'sparse']).optional().describe('Decode mode of attend: full (rebuild every key) when absent, or sparse (xKV-SR: rebuild only selected chunks).'),
    /** Sparse-decode settings (only with decode: 'sparse'); defaults budget 2048, chunkSize 8, outlierChunks 48, localTokens 32. */
    sparse: SparseOptionsSchema.optional().describe('Sparse-decode settings (only with decode: sparse).'),
  })
  .superRefine((o, ctx) => {
    refineRankTarget(o, ctx);
    if (o.sparse && o.decode !== 'sparse') ctx.addIssue({ code: 'custom', path: ['sparse'], message: "sparse options need decode: 'sparse'" });
  });
export type XkvOptions = z.output<typeof XkvOptionsSchema>;

/**
 * The `xkv` strategy: cross-layer SVD of pre-RoPE keys and of values over groups of `layersPerGroup`
 * consecutive layers (Chang et al. 2025, arXiv 2503.18893, §3).
 * Ranks: absolute per-layer `rankK` / `rankV`, or a `targetRatio` / `rankFraction` resolved per
 * prompt length at compress time (the ranks each group got: `stats().groups`).
 * `compress` throws KvpackError('rank' | 'layout' | 'shape' | 'dtype' | 'nonfinite') on bad input
 * ('rank' also for a target ratio out of reach).
 * On MLA latent caches (DeepSeek-V2/V3) it factors each group's latents [T, G·d_c] (the paper's MLA
 * experiment, which compresses the non-RoPE latents across layers); the RoPE keys are kept exact or
 * factored by their own cross-layer SVD (`mla` options), and the measured bytes count them.
 */
export const xkvDefinition = defineStrategy({
  name: 'xkv',
  description: 'xKV: cross-layer SVD of pre-RoPE keys and values over groups of layers (Chang et al. 2025)',
  schema: XkvOptionsSchema,
  compress: (cache, options, T) => compressGroupSvd(cache, 'xkv', options, groupConfig(options), T),
  restore: (r, options) => GroupSvdCache.restore(r, 'xkv', options, groupConfig(options)),
  capabilities: {
    paperRatio: (o, layout, tokens) =>
      hasRankTarget(o)
        ? groupRanksPaperRatio(layout, tokens, o.layersPerGroup, targetGroupRanks('xkv', groupConfig(o), layout, tokens))
        : paperCompressionRatio({ layout, tokens, layersPerGroup: o.layersPerGroup, rankK: o.rankK, rankV: o.rankV }),
    // With a rank target the ranks depend on T, which this capability is not given: no shapes.
    factoredShapes: (o, layout, layers) => (hasRankTarget(o) ? [] : groupFactoredShapes(layout, layers, o.layersPerGroup, o.rankK, o.rankV)),
    // A token-basis row belongs to one token: any prefix keeps its rows and the same factors.
    cutPrefix: (o) => groupSvdPrefixCut('xkv', o),
    ratioTarget: (o) => (o.targetRatio === undefined ? null : { target: o.targetRatio, knob: 'ranks' }),
    // MLA latent caches: cross-layer SVD of the latents c_KV over the same groups; the shared RoPE keys
    // exact or factored separately (options.mla). Sparse decode needs per-head keys.
    mla: (o) =>
      o.decode === 'sparse' ? "decode: 'sparse' selects per-head key chunks, which an MLA latent cache does not have" : mlaGroupSvdCompressor('xkv', o, groupConfig(o)),
  },
  renamedOptions: { groupSize: 'layersPerGroup', 'factorQuantization.groupSize': 'factorQuantization.quantGroupSize' },
});

/** The grouped low-rank settings of xkv options (the sparse defaults filled in for decode: 'sparse'). */
function groupConfig(options: XkvOptions) {
  return { ...options, sparse: options.decode === 'sparse' ? (options.sparse ?? SparseOptionsSchema.parse({})) : undefined };
}

/** The `xkv` strategy at resolved options (no registry lookup). */
export function xkvStrategy(options: XkvOptions): Strategy<XkvOptions> {
  return xkvDefinition.create(options) as Strategy<XkvOptions>;
}
