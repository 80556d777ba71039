import { registerStrategy, type CompressedCache, type KVCache, type Strategy } from '@kvpack/core';
import { z } from 'zod';
import { GroupSvdCache, compressGroupSvd } from './group-svd.js';
import { SparseOptionsSchema } from './sparse.js';

/**
 * Options of `factorQuantization`: group-wise int8/int4 quantization of the stored factors, after
 * the xKV authors' follow-up (abdelfattah-lab/xKV `xKV/customized_cache/quant.py`; their runs use
 * `--kv_bits 4 --group_size 32`, asymmetric by default, applied to the token basis).
 */
export const FactorQuantizationSchema = z.strictObject({
  /** Bits per code. */
  bits: z.union([z.literal(4), z.literal(8)]),
  /** Elements per quantization group along each row's last axis (default 32, as the authors run it). */
  groupSize: z.int().positive().default(32),
  /** Symmetric (16-bit scale) or asymmetric (16-bit scale + uint8 zero point) per group; default asymmetric. */
  symmetric: z.boolean().default(false),
  /** Quantize the token bases, the per-layer factors, or both (default both). */
  apply: z.enum(['basis', 'factors', 'both']).default('both'),
});

/**
 * Options shared by `xkv` and the per-layer `svd` baseline (everything but the group size).
 * Default per-layer ranks 16 (keys) and 24 (values) keep the paper's K:V = 2:3 and fit every
 * bundled model (stories260K: H_kv·d = 32; rulermini-19m: 128, where they are 1/8 and 3/16 of the
 * features, near the paper's 128/192 of 1024 on Llama-3.1-8B).
 */
export const lowRankOptionShape = {
  /** Per-layer key rank r_K (group rank = r_K × layers in the group). */
  rankK: z.int().nonnegative().default(16),
  /** Per-layer value rank r_V (group rank = r_V × layers in the group). */
  rankV: z.int().nonnegative().default(24),
  /**
   * Randomized SVD oversampling p, or `auto` (default: 8 when the group rank is ≤ 128, else 0 — core
   * `autoOversample`; the README's "SVD defaults" has the measured error/time trade-off).
   */
  oversample: z.union([z.literal('auto'), z.int().nonnegative()]).default('auto'),
  /** Randomized SVD power iterations q, a multiple of 0.5 (2q + 2 products with the [T, G·H_kv·d] matrix; default 1). */
  powerIters: z.number().nonnegative().multipleOf(0.5).default(1),
  /**
   * Where the randomized SVD's k×k orthonormalizations run: `host` (float64 Cholesky), `device`
   * (Newton–Schulz on the tfjs backend, no host round-trip) or `auto` (default: host on wasm/cpu,
   * device on webgpu/webgl/tensorflow).
   */
  orthogonalization: z.enum(['auto', 'host', 'device']).default('auto'),
  /** Seed of the randomized SVD's test matrix. */
  seed: z.int().default(0),
  /** Exact truncated SVD (slower) instead of the randomized one. */
  exact: z.boolean().default(false),
  /** Storage of unquantized factors: float16 (default) or float32. */
  storage: z.enum(['float16', 'float32']).default('float16'),
  /** Optional int8/int4 quantization of the factors. */
  factorQuantization: FactorQuantizationSchema.optional(),
};

/** Options of the `xkv` strategy. */
export const XkvOptionsSchema = z
  .strictObject({
    /** Layers per group G (default 4, the paper's xKV-4); consecutive from layer 0. */
    groupSize: z.int().positive().default(4),
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
});
