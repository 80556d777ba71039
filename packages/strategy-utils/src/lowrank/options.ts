import { MAX_FEATURES, MAX_OVERSAMPLE, MAX_POWER_ITERS, MAX_SEED, MIN_SEED, atMost } from '@kvpack/core';
import { z } from 'zod';

/**
 * Options of `factorQuantization`: group-wise int8/int4 quantization of the stored factors, after
 * the xKV authors' follow-up (abdelfattah-lab/xKV `xKV/customized_cache/quant.py`; their runs use
 * `--kv_bits 4 --group_size 32`, asymmetric by default, applied to the token basis).
 */
const FactorQuantizationSchema = z.strictObject({
  /** Bits per code. */
  bits: z.union([z.literal(4), z.literal(8)]).describe('Bits per code (4 or 8).'),
  /**
   * Elements per quantization group along each row's last axis (default 32, as the authors run it);
   * at most 2^16 (MAX_FEATURES: a group spans at most one factor row).
   */
  quantGroupSize: z.int().positive().max(MAX_FEATURES, { error: atMost(MAX_FEATURES, 'a group spans at most one factor row') }).default(32).describe('Elements per quantization group along each factor row (default 32; at most 2^16).'),
  /** Symmetric (16-bit scale) or asymmetric (16-bit scale + uint8 zero point) per group; default asymmetric. */
  symmetric: z.boolean().default(false).describe('Symmetric (16-bit scale) or asymmetric (16-bit scale + uint8 zero point) groups; default asymmetric.'),
  /** Quantize the token bases, the per-layer factors, or both (default both). */
  apply: z.enum(['basis', 'factors', 'both']).default('both').describe('Quantize the token bases, the per-layer factors, or both.'),
});

/**
 * Options of a grouped low-rank strategy on MLA latent caches (DeepSeek-V2/V3): the latents c_KV of a
 * group of n layers, X_g = [T, n·d_c], are factored at rank `rank` · n; the shared RoPE keys k_R are
 * kept exact or factored separately (their own cross-layer SVD over [T, n·d_R] at `ropeRank` · n).
 * With `targetRatio` / `rankFraction` the ranks are resolved per prompt length instead, `rank` :
 * `ropeRank` as the proportion.
 */
export const MlaLowRankOptionsSchema = z.strictObject({
  /** Per-layer latent rank r_c (group rank r_c × layers); compress bounds it by min(T, d_c). Default 64 (1/8 of DeepSeek-V2's d_c = 512). */
  rank: z.int().positive().max(MAX_FEATURES, { error: atMost(MAX_FEATURES, 'a rank is at most the d_c features of a layer') }).default(64).describe('Per-layer latent rank r_c (group rank = r_c × layers in the group); compress bounds it by min(T, d_c).'),
  /** The shared RoPE keys: `exact` (stored at the factors' storage precision, default) or `svd` (their own cross-layer SVD). */
  ropeKeys: z.enum(['exact', 'svd']).default('exact').describe('RoPE keys kept exact (default) or compressed by their own cross-layer SVD (svd).'),
  /** Per-layer RoPE key rank with ropeKeys: 'svd' (group rank × layers); bounded by min(T, d_R). Default 16. */
  ropeRank: z.int().positive().max(MAX_FEATURES, { error: atMost(MAX_FEATURES, 'a rank is at most the d_R features of a layer') }).default(16).describe("Per-layer RoPE key rank with ropeKeys: 'svd' (group rank = rank × layers); compress bounds it by min(T, d_R)."),
});
export type MlaLowRankOptions = z.output<typeof MlaLowRankOptionsSchema>;

/**
 * Options shared by `xkv` and the per-layer `svd` baseline (everything but the group size).
 * Default per-layer ranks 16 (keys) and 24 (values) keep the paper's K:V = 2:3 and fit every
 * bundled model (stories260K: H_kv·d = 32; rulermini-19m: 128, where they are 1/8 and 3/16 of the
 * features, near the paper's 128/192 of 1024 on Llama-3.1-8B).
 */
export const lowRankOptionShape = {
  /**
   * Per-layer key rank r_K (group rank = r_K × layers in the group; with targetRatio, the key share of
   * the ranks; unused with rankFraction); at most 2^16 (MAX_FEATURES:
   * compress also bounds it by min(T, H_kv·d), and H_kv·d ≤ 16,384 in released models).
   */
  rankK: z.int().positive().max(MAX_FEATURES, { error: atMost(MAX_FEATURES, 'a rank is at most the H_kv·d features of a layer') }).default(16).describe('Per-layer key rank r_K (group rank = r_K × layers in the group); compress bounds it by min(T, H_kv·d).'),
  /** Per-layer value rank r_V (group rank = r_V × layers in the group; with targetRatio, the value share); at most 2^16, as rankK. */
  rankV: z.int().positive().max(MAX_FEATURES, { error: atMost(MAX_FEATURES, 'a rank is at most the H_kv·d features of a layer') }).default(24).describe('Per-layer value rank r_V (group rank = r_V × layers in the group); compress bounds it by min(T, H_kv·d).'),
  /**
   * Target compression ratio instead of absolute ranks: at compress time, the largest group ranks in
   * the proportion rankK : rankV whose cache (`byteSize()` right after compress) is at most dense fp16
   * bytes ÷ targetRatio (ranks round down, so the measured ratio is ≥ the target). Excludes rankFraction.
   * The ranks each group got are in `stats().groups` and the serialization.
   */
  targetRatio: z.number().min(1).max(1e9).optional().describe('Target compression ratio against dense fp16 bytes, instead of absolute ranks: the largest ranks (in the rankK : rankV proportion) whose measured bytes reach it.'),
  /**
   * Fraction f ∈ (0, 1] of each group's full rank instead of absolute ranks: R_g = max(1, ⌊f · min(T,
   * n·H_kv·d)⌋) for keys and for values. Excludes targetRatio.
   */
  rankFraction: z.number().gt(0).max(1).optional().describe('Rank as a fraction of min(T, features) per group, instead of absolute ranks.'),
  /**
   * Randomized SVD oversampling p, or `auto` (default: 8 when the group rank is ≤ 128, else 0 — core
   * `autoOversample`; the README's "SVD defaults" has the measured error/time trade-off). At most
   * 4,096 (core MAX_OVERSAMPLE: the k×k host work grows as (rank + p)³; Halko et al. use 5–10).
   */
  oversample: z
    .union([z.literal('auto'), z.int().nonnegative().max(MAX_OVERSAMPLE, { error: atMost(MAX_OVERSAMPLE, 'the k×k host work grows as (rank + oversample)³') })], {
      error: (iss) => (iss.code === 'invalid_union' ? `oversample must be 'auto' or an integer in [0, ${MAX_OVERSAMPLE}]` : undefined),
    })
    .default('auto').describe('Randomized SVD oversampling p, or auto (8 when the group rank is ≤ 128, else 0).'),
  /**
   * Randomized SVD power iterations q, a multiple of 0.5 (2q + 2 products with the [T, G·H_kv·d]
   * matrix; default 1); at most 16 (core MAX_POWER_ITERS: Halko et al. use 1–3, and beyond ~10
   * float32 rounding, not the spectrum, limits the error).
   */
  powerIters: z
    .number()
    .nonnegative()
    .multipleOf(0.5)
    .max(MAX_POWER_ITERS, { error: atMost(MAX_POWER_ITERS, 'each iteration is two more products with the whole group matrix') })
    .default(1).describe('Randomized SVD power iterations q, a multiple of 0.5 (2q + 2 products with the group matrix).'),
  /**
   * Where the randomized SVD's k×k orthonormalizations run: `host` (float64 Cholesky), `device`
   * (on the tfjs backend, no host round-trip: a blocked WGSL Cholesky on webgpu, Newton–Schulz
   * elsewhere) or `auto` (default: host on wasm/cpu, device on webgpu/webgl/tensorflow).
   */
  orthogonalization: z.enum(['auto', 'host', 'device']).default('auto').describe('Where the k×k orthonormalizations run: host (float64 Cholesky), device (WGSL Cholesky on webgpu, Newton–Schulz elsewhere) or auto (host on wasm/cpu).'),
  /**
   * The randomized SVD's test matrix: `gaussian` (default) or `sparse-sign` (8 entries ±1 per row, the
   * same error in practice; on webgpu the first sketch is then a gather instead of a product with
   * the whole group matrix — core `Sketch`).
   */
  sketch: z.enum(['gaussian', 'sparse-sign']).default('gaussian').describe("The randomized SVD's test matrix: gaussian, or sparse-sign (8 signs per row; on webgpu the first sketch becomes a cheap gather)."),
  /** Seed of the randomized SVD's test matrix, an int32 (the generator folds seeds to 32 bits). */
  seed: z.int().min(MIN_SEED).max(MAX_SEED, { error: atMost(MAX_SEED, 'seeds are int32; larger ones alias smaller ones') }).default(0).describe("Seed of the randomized SVD's test matrix (int32)."),
  /** Exact truncated SVD (slower) instead of the randomized one. */
  exact: z.boolean().default(false).describe('Exact truncated SVD (slower) instead of the randomized one.'),
  /** Storage of unquantized factors: float16 (default) or float32. */
  storage: z.enum(['float16', 'float32']).default('float16').describe('Storage of unquantized factors.'),
  /** Optional int8/int4 quantization of the factors. */
  factorQuantization: FactorQuantizationSchema.optional().describe('Optional group-wise int8/int4 quantization of the factors.'),
  /** How MLA latent caches are compressed (ranks, RoPE keys); defaults apply when absent. Unused on per-head KV caches. */
  mla: MlaLowRankOptionsSchema.optional().describe('MLA latent caches (DeepSeek-V2/V3): latent rank, RoPE keys exact or svd, RoPE key rank.'),
};

/** The refinement every low-rank schema adds: targetRatio and rankFraction exclude each other. */
export function refineRankTarget(o: { targetRatio?: number; rankFraction?: number }, ctx: z.RefinementCtx): void {
  if (o.targetRatio !== undefined && o.rankFraction !== undefined)
    ctx.addIssue({ code: 'custom', path: ['rankFraction'], message: 'give targetRatio or rankFraction, not both' });
}
