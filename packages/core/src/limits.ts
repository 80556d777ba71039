/**
 * Upper bounds on the options that size work or memory (strategy option schemas, core
 * `truncatedSvd`, the bench configs). Each is far above real use and far below the values that
 * would run for hours or fail deep inside with a RangeError; errors name the bound.
 */

/**
 * Token counts (budgets, windows, chunk sizes, sinks, residual windows, decode lengths): 2^20 =
 * 1,048,576 tokens. One layer's keys at 2^20 tokens and H_kv·d = 1,024 features are 4 GiB of
 * float32 — the whole wasm heap of tfjs — so a larger count can never be met by a cache kvpack holds,
 * while the longest contexts served today (1M tokens) still fit.
 */
export const MAX_TOKENS = 2 ** 20;

/**
 * Feature-wise sizes (per-layer ranks, quantization groups along a row): 2^16 = 65,536. Ranks are
 * bounded by H_kv·d per layer, at most 16,384 in released models (GPT-3's 96 heads × 128); a
 * quantization group spans at most one row of a factor.
 */
export const MAX_FEATURES = 2 ** 16;

/** Layer counts and indices (layer group sizes, start layers): 2^10 = 1,024, about 8× the deepest released models (126 layers). */
export const MAX_LAYERS = 2 ** 10;

/**
 * Randomized SVD power iterations q: 16. Each iteration is two more products with the [T, F]
 * matrix; Halko, Martinsson & Tropp (2011, §4.5) use q = 1–3, and beyond ~10 float32 rounding,
 * not the spectrum, limits the error.
 */
export const MAX_POWER_ITERS = 16;

/**
 * Randomized SVD oversampling p: 4,096. The sketch is k = r + p columns and the k×k host
 * eigen-decomposition costs O(k³) (minutes at k ≈ 4,096 in JS); Halko et al. (2011, §4.2)
 * recommend p = 5–10, kvpack's `auto` uses 8.
 */
export const MAX_OVERSAMPLE = 4096;

/** Orthonormalization passes: 8 (two passes give float32 orthogonality, Cholesky-QR2). */
export const MAX_ORTHONORMALIZE_PASSES = 8;

/** Seeds: the int32 range, since the generator folds a seed to 32 bits (larger seeds would alias smaller ones). */
export const MIN_SEED = -(2 ** 31);
export const MAX_SEED = 2 ** 31 - 1;

/** Bench repetitions (compress timing repeats): 1,000; the median of more does not move. */
export const MAX_REPEATS = 1000;

/** Bench item counts (prompts, eval examples per task): 2^20. */
export const MAX_ITEMS = 2 ** 20;

/** Message for a value above `max` (used by the option schemas): "at most N (reason)". */
export function atMost(max: number, reason: string): string {
  return `must be at most ${max} (${reason})`;
}
