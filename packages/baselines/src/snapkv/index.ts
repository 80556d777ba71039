import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, MAX_TOKENS, atMost, check, isWebGpuBackend, type KVCache } from '@kvpack/core';
import { z } from 'zod';
import { defineEvictionStrategy, type ScoreContext } from '@kvpack/strategy-utils';
import { snapkvScoresWgsl } from './scores-wgsl.js';

const tokens = atMost(MAX_TOKENS, "tokens; 2^20 tokens of one layer's keys already fill the wasm heap");

/** Options of the `snapkv` strategy. Token counts are at most 2^20 (core MAX_TOKENS). */
export const SnapKvOptionsSchema = z
  .strictObject({
    /** Prefill tokens kept per KV head and layer, the observation window included (SnapKV's max_capacity_prompt); at most 2^20. */
    budget: z.int().positive().max(MAX_TOKENS, { error: tokens }).default(256).describe('Prefill tokens kept per KV head and layer, the observation window included.'),
    /** Observation window w: the last w prompt tokens, whose queries vote and which are always kept; below budget, so at most 2^20 − 1. */
    window: z.int().positive().max(MAX_TOKENS - 1, { error: atMost(MAX_TOKENS - 1, 'the window is smaller than the budget, itself at most 2^20 tokens') }).default(32).describe('Observation window w in tokens: the last w prompt tokens vote and are always kept.'),
    /** 1-D pooling kernel over token positions (odd, so the pooled scores keep their length); at most 2^20 − 1, the largest odd token count. */
    kernelSize: z.int().positive().max(MAX_TOKENS - 1, { error: atMost(MAX_TOKENS - 1, 'the largest odd token count within 2^20') }).default(7).describe('1-D pooling kernel over token positions (odd).'),
    /** Pooling of the votes: avg (SnapKV's default) or max. */
    pooling: z.enum(['avg', 'max']).default('avg').describe('Pooling of the votes: avg (SnapKV default) or max.'),
  })
  .refine((o) => o.budget > o.window, { message: 'budget must exceed window (the budget includes the observation window)', path: ['budget'] })
  .refine((o) => o.kernelSize % 2 === 1, { message: 'kernelSize must be odd', path: ['kernelSize'] });
export type SnapKvOptions = z.output<typeof SnapKvOptionsSchema>;

/**
 * SnapKV's votes for the prefix tokens of one layer (Li et al. 2024, arXiv 2404.14469, §4.1;
 * FasterDecoding/SnapKV, snapkv_utils.py): attention weights of the w observation-window queries
 * over all T keys (softmax(q·kᵀ/√d), causal inside the window), restricted to the T − w prefix keys,
 * **summed** over the window queries and **averaged** over the query heads of each KV head's GQA
 * group (as NVIDIA/kvpress's SnapKVPress averages per group). Runs on the tfjs backend (the causal
 * mask is built there too), float32.
 * @param queries post-RoPE window queries [w, H, d]
 * @param keys post-RoPE keys [T, H_kv, d]
 * @returns votes [H_kv, T − w], transient, owned by the caller
 */
export function snapkvVotes(queries: tf.Tensor3D, keys: tf.Tensor3D): tf.Tensor2D {
  const [w, Hq, d] = queries.shape;
  const [T, Hkv] = keys.shape;
  const g = Hq / Hkv;
  return tf.tidy(() => {
    // Window query i sees keys j ≤ T − w + i; the rest get −1e30 (as core attention: finite, so no backend turns it into NaN).
    const hidden = tf.greater(tf.reshape(tf.range(0, T, 1, 'int32'), [1, T]), tf.reshape(tf.range(T - w, T, 1, 'int32'), [w, 1])); // [w, T]
    const mask = tf.reshape(tf.mul(tf.cast(hidden, 'float32'), -1e30), [1, 1, w, T]);
    const qh = tf.reshape(tf.transpose(tf.reshape(queries, [w, Hkv, g, d]), [1, 2, 0, 3]), [Hkv, g * w, d]);
    const kT = tf.transpose(keys, [1, 2, 0]); // [H_kv, d, T], explicit (transposed matMul is slow on wasm)
    const logits = tf.reshape(tf.mul(tf.matMul(qh, kT), 1 / Math.sqrt(d)), [Hkv, g, w, T]);
    const p = tf.softmax(tf.add(logits, mask), -1);
    return tf.mean(tf.sum(tf.slice(p, [0, 0, 0, 0], [Hkv, g, w, T - w]), 2), 1) as tf.Tensor2D;
  });
}

/**
 * 1-D pooling of each row of `x` [rows, n] on the tfjs backend with a window of `kernel` (odd)
 * positions centered on each position, stride 1, same length: `avg` divides by the kernel (zero
 * padding counted, as torch's avg_pool1d), `max` ignores the padding. Transient, owned by the caller.
 */
export function pool1d(x: tf.Tensor2D, kernel: number, mode: 'avg' | 'max'): tf.Tensor2D {
  const [rows, n] = x.shape;
  const r = Math.floor(kernel / 2);
  return tf.tidy(() => {
    // Explicit padding (zeros for avg, −∞ for max), then a valid pool: every window spans `kernel` values.
    const padded = tf.pad(tf.reshape(x, [rows, 1, n, 1]), [[0, 0], [0, 0], [r, r], [0, 0]], mode === 'avg' ? 0 : -Infinity) as tf.Tensor4D;
    const pooled = mode === 'avg' ? tf.avgPool(padded, [1, kernel], 1, 'valid') : tf.maxPool(padded, [1, kernel], 1, 'valid');
    return tf.reshape(pooled, [rows, n]) as tf.Tensor2D;
  });
}

/**
 * SnapKV's score of each prefill token, [H_kv, T] on the backend: the pooled votes of the
 * observation window for the T − w prefix tokens, +Infinity for the w window tokens (always kept).
 * The keys are the eviction layer's post-RoPE keys (rotated once, shared with the gather). On webgpu
 * the softmax statistics, votes and pooling are fused WGSL kernels around one matMul (scores-wgsl.ts).
 */
function snapkvScores(cache: KVCache, layer: number, o: SnapKvOptions, { postKeys }: ScoreContext): tf.Tensor2D {
  const T = postKeys.shape[0];
  const { nHeads: Hq, nKvHeads: Hkv, headDim: d } = cache.layout;
  const w = o.window;
  const q = cache.queries![layer];
  return tf.tidy(() => {
    const win = tf.slice(q, [q.shape[0] - w, 0, 0], [w, Hq, d]);
    if (isWebGpuBackend()) return snapkvScoresWgsl(win, postKeys, o.kernelSize, o.pooling);
    const pooled = pool1d(snapkvVotes(win, postKeys), o.kernelSize, o.pooling);
    return tf.concat([pooled, tf.fill([Hkv, w], Infinity)], 1) as tf.Tensor2D;
  });
}

/** Checks that the cache carries the observation-window queries SnapKV needs. */
function checkQueries(cache: KVCache, o: SnapKvOptions): void {
  const { nLayers: L, nHeads: Hq, headDim: d } = cache.layout;
  const w = o.window;
  const q = cache.queries;
  if (!q)
    throw new KvpackError(
      'config',
      'snapkv needs the observation-window queries (KVCache.queries, post-RoPE [T_obs, H, d] per layer); ' +
        `the model runner must provide them, e.g. LlamaModel.prefill(tokens, { observationWindow: ${w} })`,
    );
  check(Array.isArray(q) && q.length === L, 'layout', `snapkv: KVCache.queries has ${Array.isArray(q) ? q.length : 'no'} layers but the model has ${L} layers`);
  for (let l = 0; l < L; l++) {
    check(
      q[l] instanceof tf.Tensor && q[l].dtype === 'float32' && q[l].rank === 3 && q[l].shape[1] === Hq && q[l].shape[2] === d,
      'shape',
      `snapkv: KVCache.queries layer ${l} must be float32 [T_obs, H=${Hq}, d=${d}], got ${q[l] instanceof tf.Tensor ? `${q[l].dtype} [${q[l].shape}]` : typeof q[l]}`,
    );
    check(
      q[l].shape[0] >= w,
      'config',
      `snapkv: KVCache.queries layer ${l} covers ${q[l].shape[0]} prompt tokens but the observation window is ${w}; ` +
        `prefill with observationWindow ≥ ${w} or lower the window option`,
    );
  }
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
 * `compress` throws KvpackError('config') when the queries are missing or cover fewer than `window`
 * tokens; KvpackError('shape') when their shape disagrees with the layout;
 * KvpackError('layout' | 'shape' | 'dtype' | 'nonfinite') on a bad cache.
 */
export const snapKvDefinition = defineEvictionStrategy({
  name: 'snapkv',
  description: 'SnapKV: keep per KV head the prefix tokens the observation window attends to most, plus the window (Li et al. 2024)',
  schema: SnapKvOptionsSchema,
  scorer: { budget: (o) => o.budget, check: checkQueries, score: snapkvScores },
  capabilities: { queryWindow: (o) => o.window },
});
