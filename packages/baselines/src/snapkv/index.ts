import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, MAX_TOKENS, atMost, check, isWebGpuBackend, type KVCache, type MlaKVCache } from '@kvpack/core';
import { z } from 'zod';
import { budgetOption, budgetOrTarget, checkWindowQueries, defineEvictionStrategy, pool1d, targetRatioOption, snapkvVotes, type ScoreContext } from '@kvpack/strategy-utils';
import { snapkvScoresWgsl } from './scores-wgsl.js';

// The votes and the pooling are shared with the head- and layer-budget strategies (AdaKV, PyramidKV).
export { pool1d, snapkvVotes } from '@kvpack/strategy-utils';

const tokens = atMost(MAX_TOKENS, "tokens; 2^20 tokens of one layer's keys already fill the wasm heap");

/** Budget when neither budget nor targetRatio is given (SnapKV's max_capacity_prompt in its examples is larger; 256 fits small models). */
const DEFAULT_BUDGET = 256;

/** Options of the `snapkv` strategy. Token counts are at most 2^20 (core MAX_TOKENS). */
export const SnapKvOptionsSchema = z
  .strictObject({
    /** Prefill tokens kept per KV head and layer, the observation window included (SnapKV's max_capacity_prompt); at most 2^20. */
    budget: budgetOption('Prefill tokens kept per KV head and layer, the observation window included (default 256; excludes targetRatio).', tokens),
    /**
     * Target ratio (dense fp16 bytes ÷ bytes held, kept positions included) instead of a budget: the
     * largest budget whose measured ratio is ≥ the target at the actual T (core `evictionBudget` rule
     * in @kvpack/strategy-utils). Excludes budget; `compressionRatio` (kvpress's fraction removed) is accepted for it.
     */
    targetRatio: targetRatioOption(),
    /** Observation window w: the last w prompt tokens, whose queries vote and which are always kept; below budget, so at most 2^20 − 1. */
    window: z.int().positive().max(MAX_TOKENS - 1, { error: atMost(MAX_TOKENS - 1, 'the window is smaller than the budget, itself at most 2^20 tokens') }).default(32).describe('Observation window w in tokens: the last w prompt tokens vote and are always kept.'),
    /** 1-D pooling kernel over token positions (odd, so the pooled scores keep their length); at most 2^20 − 1, the largest odd token count. */
    kernelSize: z.int().positive().max(MAX_TOKENS - 1, { error: atMost(MAX_TOKENS - 1, 'the largest odd token count within 2^20') }).default(7).describe('1-D pooling kernel over token positions (odd).'),
    /** Pooling of the votes: avg (SnapKV's default) or max. */
    pooling: z.enum(['avg', 'max']).default('avg').describe('Pooling of the votes: avg (SnapKV default) or max.'),
  })
  .refine(...budgetOrTarget)
  .refine((o) => (o.budget ?? DEFAULT_BUDGET) > o.window, { message: 'budget must exceed window (the budget includes the observation window)', path: ['budget'] })
  .refine((o) => o.kernelSize % 2 === 1, { message: 'kernelSize must be odd', path: ['kernelSize'] });
export type SnapKvOptions = z.output<typeof SnapKvOptionsSchema>;

/**
 * SnapKV's score of each prefill token, [H_kv, T] on the backend: the pooled votes of the
 * observation window for the T − w prefix tokens, +Infinity for the w window tokens (always kept).
 * The keys are the eviction layer's post-RoPE keys (rotated once, shared with the gather). On webgpu
 * the window logits (a tiled GEMM reading the queries and keys in place), softmax statistics, votes
 * and pooling are four WGSL kernels (scores-wgsl.ts, logits-wgsl.ts).
 */
function snapkvScores(cache: KVCache, layer: number, o: SnapKvOptions, { postKeys }: ScoreContext): tf.Tensor2D {
  const T = postKeys.shape[0];
  const { nHeads: Hq, nKvHeads: Hkv, headDim: d } = cache.layout;
  const w = o.window;
  const q = cache.queries![layer];
  if (isWebGpuBackend()) return snapkvScoresWgsl(q, w, postKeys, o.kernelSize, o.pooling);
  return tf.tidy(() => {
    const win = tf.slice(q, [q.shape[0] - w, 0, 0], [w, Hq, d]);
    const pooled = pool1d(snapkvVotes(win, postKeys), o.kernelSize, o.pooling);
    return tf.concat([pooled, tf.fill([Hkv, w], Infinity)], 1) as tf.Tensor2D;
  });
}

/** Checks that the cache carries the observation-window queries SnapKV needs. */
function checkQueries(cache: KVCache, o: SnapKvOptions): void {
  checkWindowQueries(cache, o.window, 'snapkv');
}

/**
 * SnapKV's score of each prefill token of an MLA layer, [1, T]: the absorbed-form window queries
 * (MlaKVCache.queries, [T_obs, H, d_c + d_R], softmax scale already in them) vote over the keys
 * [c_KV ; RoPE(k_R)] [T, d_c + d_R] — one "KV head" shared by all H query heads, whose votes are
 * averaged — pooled as on per-head caches; the window tokens score +Infinity.
 */
function snapkvMlaScores(cache: MlaKVCache, layer: number, o: SnapKvOptions, postRopeKeys: tf.Tensor2D): tf.Tensor2D {
  const T = postRopeKeys.shape[0];
  const { nHeads: H, kvLoraRank: dc, qkRopeHeadDim: dr } = cache.layout;
  const w = o.window;
  const q = cache.queries![layer];
  return tf.tidy(() => {
    const win = tf.slice(q, [q.shape[0] - w, 0, 0], [w, H, dc + dr]);
    const keys = tf.reshape(tf.concat([cache.latents[layer], postRopeKeys], 1), [T, 1, dc + dr]) as tf.Tensor3D;
    const pooled = pool1d(snapkvVotes(win, keys, 1), o.kernelSize, o.pooling);
    return tf.concat([pooled, tf.fill([1, w], Infinity)], 1) as tf.Tensor2D;
  });
}

/** Checks that an MLA cache carries the absorbed-form observation-window queries SnapKV needs. */
function checkMlaQueries(cache: MlaKVCache, o: SnapKvOptions): void {
  const w = o.window;
  const q = cache.queries;
  if (!q)
    throw new KvpackError(
      'config',
      'snapkv on an MLA latent cache needs the absorbed-form observation-window queries (MlaKVCache.queries, [T_obs, H, d_c + d_R] per layer: ' +
        'W_UKᵀ·q_nope and the post-RoPE q_R, softmax scale included); the model runner must provide them, or use a query-agnostic strategy (streamingllm)',
    );
  // Shapes were validated with the cache; the window must fit.
  for (let l = 0; l < q.length; l++)
    check(q[l].shape[0] >= w, 'config', `snapkv: MlaKVCache.queries layer ${l} covers ${q[l].shape[0]} prompt tokens but the observation window is ${w}; lower the window option`);
}

/**
 * The `snapkv` strategy (SnapKV, Li et al. 2024, arXiv 2404.14469) as a token scorer: per layer and
 * KV head, keep the budget − w prefix tokens with the highest pooled votes of the observation window
 * ({@link snapkvVotes}, {@link pool1d}; ties to the lower position) plus the window itself. Different
 * KV heads keep different tokens, the same count each, so `keys(layer)` is [budget, H_kv, d] (each
 * head gathered on its own, ascending positions); kept keys keep their original RoPE positions; the
 * kept positions are stored (int32 [budget, H_kv], counted in the bytes). When T ≤ budget nothing is
 * evicted.
 *
 * Needs `cache.queries`: the post-RoPE queries of at least the last `window` prompt tokens per layer
 * ([T_obs, H, d], T_obs ≥ window; the last `window` rows are used).
 * On MLA latent caches one set of tokens is kept per layer (the latent is shared by every head),
 * scored by the absorbed-form queries (`MlaKVCache.queries`); without them it refuses.
 * `compress` throws KvpackError('config') when the queries are missing or cover fewer than `window`
 * tokens; KvpackError('shape') when their shape disagrees with the layout;
 * KvpackError('layout' | 'shape' | 'dtype' | 'nonfinite') on a bad cache.
 */
export const snapKvDefinition = defineEvictionStrategy({
  name: 'snapkv',
  description: 'SnapKV: keep per KV head the prefix tokens the observation window attends to most, plus the window (Li et al. 2024)',
  schema: SnapKvOptionsSchema,
  scorer: { budget: (o) => o.budget ?? DEFAULT_BUDGET, targetRatio: (o) => o.targetRatio, minBudget: (o) => o.window + 1, check: checkQueries, score: snapkvScores, mlaCheck: checkMlaQueries, mlaScore: snapkvMlaScores },
  capabilities: { queryWindow: (o) => o.window },
});
