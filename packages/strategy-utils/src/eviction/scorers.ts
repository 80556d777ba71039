import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, MAX_TOKENS, applyRope, atMost, check, ropeTableData64, type KVCache, type RopeConfig } from '@kvpack/core';
import { z } from 'zod';
import { pool1d, snapkvVotes } from './snapkv-votes.js';

/*
 * Token scorers that budget allocators (head-wise as AdaKV, layer-wise as PyramidKV) run over: each
 * gives one layer's scores [H_kv, T] on the backend, higher kept, +Infinity always kept.
 */

const tokens = (what: string) => atMost(MAX_TOKENS - 1, what);

/** SnapKV's scorer: pooled votes of the observation window's queries; the window itself always kept. */
export const SnapKvScorerSchema = z.strictObject({
  name: z.literal('snapkv').describe('SnapKV (Li et al. 2024): the pooled attention of the observation window.'),
  window: z.int().positive().max(MAX_TOKENS - 1, { error: tokens('the window is below the budget, itself at most 2^20 tokens') }).default(32).describe('Observation window w in tokens: the last w prompt tokens vote and are always kept.'),
  kernelSize: z.int().positive().max(MAX_TOKENS - 1, { error: tokens('the largest odd token count within 2^20') }).default(7).refine((k) => k % 2 === 1, 'kernelSize must be odd').describe('1-D pooling kernel over token positions (odd).'),
  pooling: z.enum(['avg', 'max']).default('avg').describe('Pooling of the votes: avg (SnapKV default) or max.'),
});

/** Expected Attention's scorer (NVIDIA kvpress, 2025): query-agnostic, from the statistics of future queries. */
export const ExpectedAttentionScorerSchema = z.strictObject({
  name: z.literal('expected-attention').describe('Expected Attention (NVIDIA kvpress 2025): the closed-form attention future queries are expected to pay.'),
  nFuturePositions: z.int().positive().max(MAX_TOKENS, { error: atMost(MAX_TOKENS, 'positions') }).default(512).describe('Future positions n whose RoPE rotation is averaged (tokens after the prefill).'),
  nSink: z.int().nonnegative().max(MAX_TOKENS, { error: atMost(MAX_TOKENS, 'tokens') }).default(4).describe('First tokens kept always and left out of the statistics (attention sinks).'),
  useCovariance: z.boolean().default(true).describe('Add the covariance term kᵀΣk/(2d) of the query distribution to the expected logit.'),
  useValueNorm: z.boolean().default(true).describe('Rescale the expected attention by the L2 norm of each value: (score + epsilon)·‖v‖.'),
  epsilon: z.number().nonnegative().max(1).default(0).describe('Added to the expected attention before the value-norm rescaling.'),
  queryWindow: z
    .int()
    .nonnegative()
    .max(MAX_TOKENS, { error: atMost(MAX_TOKENS, 'tokens') })
    .default(64)
    .describe('Observed prompt queries the statistics use (the last ones, post-RoPE, asked of the runner as KVCache.queries); 0: none.'),
  statistics: z
    .enum(['auto', 'queries', 'keys'])
    .default('auto')
    .describe('Where the future queries\' mean and covariance come from: the observed queries (KVCache.queries), the keys, or auto (queries when present, else keys).'),
});

/** A token scorer and its options, chosen by `name`. */
export const TokenScorerSchema = z
  .discriminatedUnion('name', [SnapKvScorerSchema, ExpectedAttentionScorerSchema])
  .describe('The token scorer the budgets are allocated over, by name with its options.');
export type TokenScorerOptions = z.output<typeof TokenScorerSchema>;
export type SnapKvScorerOptions = z.output<typeof SnapKvScorerSchema>;
export type ExpectedAttentionScorerOptions = z.output<typeof ExpectedAttentionScorerSchema>;

/** Tokens the scorer always keeps at the end of the prompt (SnapKV's window; 0 otherwise). */
export function scorerWindow(s: TokenScorerOptions): number {
  return s.name === 'snapkv' ? s.window : 0;
}

/** Post-RoPE queries of the prompt's last tokens a scorer reads (`KVCache.queries`), in tokens; 0 when it needs none. */
export function scorerQueryWindow(s: TokenScorerOptions): number {
  if (s.name === 'snapkv') return s.window;
  return s.statistics === 'keys' ? 0 : s.queryWindow;
}

/**
 * Checks that `cache.queries` holds post-RoPE queries [T_obs, H, d] of at least `window` tokens per layer.
 * @throws KvpackError('config') when they are missing or too short, ('shape' | 'layout') when they disagree with the layout.
 */
export function checkWindowQueries(cache: KVCache, window: number, who: string): void {
  const { nLayers: L, nHeads: Hq, headDim: d } = cache.layout;
  const q = cache.queries;
  if (!q)
    throw new KvpackError(
      'config',
      `${who} needs the observation-window queries (KVCache.queries, post-RoPE [T_obs, H, d] per layer); ` +
        `the model runner must provide them, e.g. LlamaModel.prefill(tokens, { observationWindow: ${window} })`,
    );
  check(Array.isArray(q) && q.length === L, 'layout', `${who}: KVCache.queries has ${Array.isArray(q) ? q.length : 'no'} layers but the model has ${L} layers`);
  const T = cache.keys[0]?.shape[0] ?? 0;
  check(T >= window, 'config', `${who}: the prompt has ${T} tokens, fewer than the ${window}-token observation window: give a smaller window option (at most ${T}) or a longer prompt`);
  for (let l = 0; l < L; l++) {
    check(
      q[l] instanceof tf.Tensor && q[l].dtype === 'float32' && q[l].rank === 3 && q[l].shape[1] === Hq && q[l].shape[2] === d,
      'shape',
      `${who}: KVCache.queries layer ${l} must be float32 [T_obs, H=${Hq}, d=${d}], got ${q[l] instanceof tf.Tensor ? `${q[l].dtype} [${q[l].shape}]` : typeof q[l]}`,
    );
    check(
      q[l].shape[0] >= window,
      'config',
      `${who}: KVCache.queries layer ${l} covers ${q[l].shape[0]} prompt tokens but the observation window is ${window}; prefill with observationWindow ≥ ${window} or lower the window option`,
    );
  }
}

/** Checks what the scorer needs from the cache before any layer is scored. @throws KvpackError */
export function checkScorer(cache: KVCache, s: TokenScorerOptions, who: string): void {
  if (s.name === 'snapkv') checkWindowQueries(cache, s.window, who);
  else if (s.statistics === 'queries') checkWindowQueries(cache, 1, who);
  else if (s.statistics === 'auto' && cache.queries) checkWindowQueries(cache, 0, who);
}

/**
 * One layer's token scores [H_kv, T] (float32, on the backend, transient: owned by the caller) by the
 * chosen scorer: {@link snapkvScoresOf} or {@link expectedAttentionScores}.
 * @param postKeys post-RoPE keys of the layer [T, H_kv, d] (not disposed)
 */
export function scoreTokens(cache: KVCache, layer: number, s: TokenScorerOptions, postKeys: tf.Tensor3D): tf.Tensor2D {
  return s.name === 'snapkv' ? snapkvScoresOf(cache, layer, s, postKeys) : expectedAttentionScores(cache, layer, s, postKeys);
}

/**
 * SnapKV's scores of one layer [H_kv, T]: the pooled votes of the last `window` queries for the T − w
 * prefix tokens ({@link snapkvVotes}, {@link pool1d}), +Infinity for the window (Li et al. 2024, §4.1).
 */
export function snapkvScoresOf(cache: KVCache, layer: number, s: SnapKvScorerOptions, postKeys: tf.Tensor3D): tf.Tensor2D {
  const { nHeads: Hq, nKvHeads: Hkv, headDim: d } = cache.layout;
  const w = s.window;
  const q = cache.queries![layer];
  return tf.tidy(() => {
    const win = tf.slice(q, [q.shape[0] - w, 0, 0], [w, Hq, d]);
    const pooled = pool1d(snapkvVotes(win, postKeys), s.kernelSize, s.pooling);
    return tf.concat([pooled, tf.fill([Hkv, w], Infinity)], 1) as tf.Tensor2D;
  });
}

/**
 * The RoPE rotation averaged over positions [from, from + n), R̄ = (1/n) Σ_p R_p, as a d × d
 * float64 matrix (row-major) such that post-RoPE x = R_p · pre-RoPE x: per frequency i the mean cos
 * c̄_i and sin s̄_i, placed on the pairs (2i, 2i + 1) for the interleaved layout, (i, i + d/2) for the
 * half layout. (Expected Attention, kvpress `apply_avg_rope`.)
 */
export function averagedRopeRotation(rope: RopeConfig, d: number, from: number, n: number): Float64Array {
  const { cos, sin } = ropeTableData64(rope, d, { start: from, count: n });
  const half = d / 2;
  const R = new Float64Array(d * d);
  for (let i = 0; i < half; i++) {
    let c = 0;
    let s = 0;
    for (let p = 0; p < n; p++) {
      c += cos[p * half + i];
      s += sin[p * half + i];
    }
    c /= n;
    s /= n;
    const [a, b] = rope.layout === 'interleaved' ? [2 * i, 2 * i + 1] : [i, i + half];
    R[a * d + a] = c;
    R[a * d + b] = -s;
    R[b * d + a] = s;
    R[b * d + b] = c;
  }
  return R;
}

/**
 * Expected Attention's scores of one layer [H_kv, T] (NVIDIA kvpress `ExpectedAttentionPress`, 2025;
 * "Expected Attention: KV cache compression by estimating attention from future queries
 * distribution"). Future queries are modelled as Gaussian with the mean μ and covariance Σ of the
 * observed pre-RoPE queries of each query head (the last `queryWindow` rows of `KVCache.queries`
 * un-rotated, rows of the first `nSink` tokens left out), or of the pre-RoPE keys of each KV head when the cache has no queries
 * (`statistics: 'auto'`) or when asked (`'keys'`); both are moved by the RoPE rotation averaged over
 * the next `nFuturePositions` positions ({@link averagedRopeRotation}): μ̂ = R̄μ, Σ̂ = R̄ΣR̄ᵀ. Since
 * E[exp(qᵀk/√d)] = exp(μ̂ᵀk/√d + kᵀΣ̂k/(2d)) for q ~ N(μ̂, Σ̂), the expected logit of post-RoPE key k_i
 * is z_i = μ̂ᵀk_i/√d + kᵢᵀΣ̂k_i/(2d) (the second term only with `useCovariance`); the scores are
 * softmax_i(z) over the tokens after the sinks, averaged over the query heads of each KV head's GQA
 * group, then (score + ε)·‖v_i‖₂ with `useValueNorm`. The first `nSink` tokens score +Infinity.
 * Runs on the backend (float32); the d × d statistics and the rotation are the only host arrays.
 * @param postKeys post-RoPE keys [T, H_kv, d] (not disposed)
 * @throws KvpackError('config') when `statistics: 'queries'` and no observed query lies after the sinks.
 */
export function expectedAttentionScores(cache: KVCache, layer: number, s: ExpectedAttentionScorerOptions, postKeys: tf.Tensor3D): tf.Tensor2D {
  const { nHeads: Hq, nKvHeads: Hkv, headDim: d } = cache.layout;
  const T = postKeys.shape[0];
  const start = cache.startPosition ?? 0;
  const sink = Math.min(s.nSink, T);
  if (sink >= T) return tf.fill([Hkv, T], Infinity) as tf.Tensor2D;
  const q = cache.queries?.[layer];
  // The last `queryWindow` observed queries (a runner may hand over more, for other settings).
  const tObs = q ? Math.min(q.shape[0], s.queryWindow) : 0;
  // Observed queries after the sinks (query row i sits at token T − T_obs + i).
  const usable = Math.max(0, tObs - Math.max(0, sink - (T - tObs)));
  const fromQueries = s.statistics === 'queries' || (s.statistics === 'auto' && usable > 0);
  check(!(s.statistics === 'queries' && usable === 0), 'config', `expected attention: statistics 'queries' but no observed query of layer ${layer} lies after the ${sink} sink tokens`);
  const R = averagedRopeRotation(cache.rope, d, start + T, s.nFuturePositions);
  return tf.tidy(() => {
    // Samples [S, n, d] per statistics head: S = H (queries, group g) or H_kv (keys, group 1).
    let samples: tf.Tensor3D;
    if (fromQueries) {
      const pre = applyRope(tf.slice(q!, [q!.shape[0] - tObs, 0, 0], [tObs, Hq, d]), cache.rope, { start: start + T - tObs, count: tObs }, true);
      samples = tf.transpose(tf.slice(pre, [tObs - usable, 0, 0], [usable, Hq, d]), [1, 0, 2]) as tf.Tensor3D;
    } else samples = tf.transpose(tf.slice(cache.keys[layer], [sink, 0, 0], [T - sink, Hkv, d]), [1, 0, 2]) as tf.Tensor3D;
    const S = samples.shape[0];
    const g = S / Hkv;
    const n = samples.shape[1];
    const Rt = tf.tensor2d(Float32Array.from(transpose(R, d)), [d, d]);
    const mu = tf.mean(samples, 1); // [S, d]
    const muHat = tf.matMul(mu, Rt); // μ̂ᵀ = μᵀR̄ᵀ, [S, d]
    const keys = tf.transpose(tf.slice(postKeys, [sink, 0, 0], [T - sink, Hkv, d]), [1, 0, 2]); // [H_kv, T', d]
    const Tp = T - sink;
    // Linear term: k_iᵀ μ̂ for the g query heads of each KV head, [H_kv, T', g].
    let z = tf.mul(tf.matMul(keys, tf.transpose(tf.reshape(muHat, [Hkv, g, d]), [0, 2, 1])), 1 / Math.sqrt(d));
    if (s.useCovariance) {
      const centered = tf.sub(samples, tf.reshape(mu, [S, 1, d]));
      const cov = tf.div(tf.matMul(centered, centered, true, false), n); // Σ [S, d, d]
      // Σ̂ = R̄ΣR̄ᵀ with 2-D products: A = ΣR̄ᵀ, then (R̄A)ᵀ = AᵀR̄ᵀ.
      const A = tf.reshape(tf.matMul(tf.reshape(cov, [S * d, d]), Rt), [S, d, d]);
      const covHat = tf.transpose(tf.reshape(tf.matMul(tf.reshape(tf.transpose(A, [0, 2, 1]), [S * d, d]), Rt), [S, d, d]), [0, 2, 1]);
      // kᵀΣ̂k per head of the group: (K · [Σ̂_1 … Σ̂_g]) ⊙ K summed over d, [H_kv, T', g].
      const sig = tf.reshape(tf.transpose(tf.reshape(covHat, [Hkv, g, d, d]), [0, 2, 1, 3]), [Hkv, d, g * d]);
      const ks = tf.reshape(tf.matMul(keys, sig), [Hkv, Tp, g, d]);
      const quad = tf.sum(tf.mul(ks, tf.reshape(keys, [Hkv, Tp, 1, d])), 3);
      z = tf.add(z, tf.mul(quad, 1 / (2 * d)));
    }
    let score = tf.mean(tf.softmax(tf.transpose(z, [0, 2, 1]), -1), 1); // softmax over tokens, mean over the group: [H_kv, T']
    if (s.useValueNorm) {
      const v = tf.transpose(tf.slice(cache.values[layer], [sink, 0, 0], [Tp, Hkv, d]), [1, 0, 2]);
      score = tf.mul(tf.add(score, s.epsilon), tf.sqrt(tf.sum(tf.square(v), 2)));
    }
    return (sink > 0 ? tf.concat([tf.fill([Hkv, sink], Infinity), score], 1) : score) as tf.Tensor2D;
  });
}

function transpose(M: Float64Array, d: number): Float64Array {
  const out = new Float64Array(d * d);
  for (let i = 0; i < d; i++) for (let j = 0; j < d; j++) out[j * d + i] = M[i * d + j];
  return out;
}
