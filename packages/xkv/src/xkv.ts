import { MAX_LAYERS, atMost, registerStrategy, type CompressedCache, type KVCache, type Strategy } from '@kvpack/core';
import { GroupSvdCache, SparseOptionsSchema, compressGroupSvd, groupFactoredShapes, lowRankOptionShape, paperCompressionRatio } from '@kvpack/strategy-utils';
import { z } from 'zod';

/** Options of the `xkv` strategy. */
export const XkvOptionsSchema = z
  .strictObject({
    /** Layers per group G (default 4, the paper's xKV-4); consecutive from layer 0; at most 1,024 (core MAX_LAYERS). */
    groupSize: z.int().positive().max(MAX_LAYERS, { error: atMost(MAX_LAYERS, 'layers per group; models have far fewer layers') }).default(4),
    ...lowRankOptionShape,
    /**
     * Decode mode of `attend`: `full` (when absent) rebuilds every key (fused RoPE) and forms values in
     * the compressed domain when cheaper; `sparse` (xKV-SR, after ShadowKV) stores chunk landmarks and
     * exact outlier/local tokens at compress time and rebuilds only the selected chunks' tokens.
     */
    decode: z.enum(['full', 'sparse']).optional(),
    /** Sparse-decode settings (only with decode: 'sparse'); defaults budget 2048, chunkSize 8, outlierChunks 48, localTokens 32. */
    sparse: SparseOptionsSchema.optional(),
  })
  .superRefine((o, ctx) => {
    if (o.sparse && o.decode !== 'sparse') ctx.addIssue({ code: 'custom', path: ['sparse'], message: "sparse options need decode: 'sparse'" });
  });
export type XkvOptions = z.output<typeof XkvOptionsSchema>;

/**
 * Builds the `xkv` strategy: cross-layer SVD of pre-RoPE keys and of values over groups of
 * `groupSize` consecutive layers (Chang et al. 2025, arXiv 2503.18893, §3).
 * `compress` throws KvpackError('rank' | 'layout' | 'shape' | 'dtype' | 'nonfinite') on bad input.
 */
export function xkvStrategy(options: XkvOptions): Strategy<XkvOptions> {
  const config = { ...options, sparse: options.decode === 'sparse' ? (options.sparse ?? SparseOptionsSchema.parse({})) : undefined };
  return {
    name: 'xkv',
    options,
    compress: (cache: KVCache): Promise<CompressedCache> => compressGroupSvd(cache, 'xkv', options, config),
    deserialize: (bytes) => GroupSvdCache.fromBytes(bytes, 'xkv', options, config),
  };
}

registerStrategy({
  name: 'xkv',
  description: 'xKV: cross-layer SVD of pre-RoPE keys and values over groups of layers (Chang et al. 2025)',
  schema: XkvOptionsSchema,
  create: xkvStrategy,
  capabilities: {
    paperRatio: (o, layout, tokens) => paperCompressionRatio({ layout, tokens, groupSize: o.groupSize, rankK: o.rankK, rankV: o.rankV }),
    factoredShapes: (o, layout, layers) => groupFactoredShapes(layout, layers, o.groupSize, o.rankK, o.rankV),
  },
});
