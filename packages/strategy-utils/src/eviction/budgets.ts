import * as tf from '@tensorflow/tfjs-core';
import { check } from '@kvpack/core';
import { topKPositions } from './top-k.js';

/**
 * AdaKV's head-wise selection of one layer (Feng et al. 2024, "Ada-KV", arXiv 2407.11550, §3–4,
 * Algorithm 1 with the safeguard of §4.2; as NVIDIA kvpress's `AdaKVPress`): the layer's total budget
 * B·H_kv is spent on the B·H_kv highest scores over all KV heads jointly, so heads keep different
 * counts; first each head's own ⌊α·B⌋ highest scores are raised to +Infinity (the safeguard floor),
 * so every head keeps at least that many. Ties go to the lower head, then the lower position (the
 * rule of {@link topKPositions} over the flattened [H_kv·T] scores). Runs on the backend.
 * @param scores [H_kv, T] float32 (not disposed); +Infinity is always kept
 * @param budget B, tokens per KV head on average (1 ≤ B ≤ T)
 * @param alpha the safeguard fraction α in [0, 1]
 * @returns flat indices h·T + t of the kept tokens, ascending (grouped by head, positions ascending), int32 [B·H_kv]; transient, owned by the caller
 * @throws KvpackError('shape') when B is not in [1, T], or H_kv·T reaches 2^24 (float32 positions)
 */
export function adaKvSelect(scores: tf.Tensor2D, budget: number, alpha: number): tf.Tensor1D {
  const [H, T] = scores.shape;
  check(Number.isInteger(budget) && budget >= 1 && budget <= T, 'shape', `AdaKV selection: budget ${budget} is not a count of the T = ${T} tokens`);
  check(H * T < 2 ** 24, 'shape', `AdaKV selection: H_kv·T = ${H * T} scores reach 2^24 (positions are ranked in float32)`);
  const nSafe = Math.floor(alpha * budget);
  return tf.tidy(() => {
    let s: tf.Tensor2D = scores;
    if (nSafe > 0) {
      const safe = topKPositions(scores, nSafe); // [H, nSafe]
      const heads = tf.tile(tf.reshape(tf.range(0, H, 1, 'int32'), [H, 1]), [1, nSafe]);
      const idx = tf.reshape(tf.stack([heads, safe], 2), [H * nSafe, 2]);
      const marked = tf.greater(tf.scatterND(idx, tf.ones([H * nSafe], 'int32'), [H, T]), 0);
      s = tf.where(marked, tf.fill([H, T], Infinity), scores);
    }
    return tf.reshape(topKPositions(tf.reshape(s, [1, H * T]) as tf.Tensor2D, H * budget), [H * budget]) as tf.Tensor1D;
  });
}

/**
 * PyramidKV's layer budgets (Cai et al. 2024, "PyramidKV", arXiv 2406.02069, §3.2; the formula of
 * its reference code, KVCache-Factory pyramidkv_utils.py, which NVIDIA kvpress's `PyramidKVPress`
 * follows): with S = budget − window the average prefix budget, the bottom layer gets
 * max = 2S − S/β and the top layer min = S/β, layers between decreasing arithmetically; when max
 * exceeds the T − window prefix tokens, max = T − window and min = 2S − max. The mean stays S, so the
 * total equals the uniform allocation's; the real budgets are rounded to integers by largest
 * remainder (ties to the lower layer), so Σ_l b_l = L·S exactly. A single layer gets S.
 * @param L layers
 * @param T prefill tokens
 * @param budget tokens kept per KV head on average, the window included
 * @param window tokens the scorer always keeps at the end (not part of the pyramid)
 * @param beta β ≥ 1, the pyramid's steepness (20 in the paper's code)
 * @returns prefix tokens kept per layer (add `window` for the tokens kept), bottom layer first
 * @throws KvpackError('config') when budget ≤ window or β < 1
 */
export function pyramidBudgets(L: number, T: number, budget: number, window: number, beta: number): number[] {
  check(budget > window, 'config', `pyramid budgets: budget ${budget} must exceed the window ${window}`);
  check(beta >= 1, 'config', `pyramid budgets: beta ${beta} must be at least 1`);
  const S = budget - window;
  if (L === 1 || T <= budget) return new Array(L).fill(Math.min(S, Math.max(0, T - window)));
  let min = S / beta;
  let max = 2 * S - min;
  if (max > T - window) {
    max = T - window;
    min = 2 * S - max;
  }
  const real = Array.from({ length: L }, (_, l) => max - (l * (max - min)) / (L - 1));
  const out = real.map((x) => Math.floor(x + 1e-9));
  let left = L * S - out.reduce((a, b) => a + b, 0);
  const order = real.map((x, l) => [x - Math.floor(x + 1e-9), l] as const).sort((a, b) => b[0] - a[0] || a[1] - b[1]);
  for (let i = 0; left > 0; i = (i + 1) % L, left--) out[order[i][1]]++;
  return out.map((b) => Math.min(b, T - window));
}

/**
 * KVzip's budget over all layers at once (Kim et al. 2025, arXiv 2505.23416, §3.3 non-uniform
 * head-wise budgets; kvpress `KVzipPress.compress_post` with `layerwise: False`): of the scores of
 * every layer, KV head and token, the L·H_kv·B highest are kept (ties to the lower layer, head, then
 * position), so layers and heads keep different counts. One selection on the backend, one readback
 * of the kept indices to split them by layer.
 * @param scores per layer [H_kv, T] float32 (not disposed); +Infinity is always kept
 * @param budget B, tokens per KV head and layer on average (1 ≤ B ≤ T)
 * @returns per layer the kept flat indices h·T + t ascending, int32 [N_l] (Σ N_l = L·H_kv·B), owned by the caller
 * @throws KvpackError('shape') when B is not in [1, T] or L·H_kv·T reaches 2^24
 */
export async function globalTopKSelect(scores: tf.Tensor2D[], budget: number): Promise<tf.Tensor1D[]> {
  const L = scores.length;
  const [H, T] = scores[0].shape;
  check(Number.isInteger(budget) && budget >= 1 && budget <= T, 'shape', `global selection: budget ${budget} is not a count of the T = ${T} tokens`);
  check(L * H * T < 2 ** 24, 'shape', `global selection: L·H_kv·T = ${L * H * T} scores reach 2^24 (positions are ranked in float32)`);
  const sel = tf.tidy(() => tf.reshape(topKPositions(tf.reshape(tf.concat(scores, 0), [1, L * H * T]) as tf.Tensor2D, L * H * budget), [L * H * budget]));
  let idx: Int32Array;
  try {
    idx = (await sel.data()) as Int32Array;
  } finally {
    sel.dispose();
  }
  // The indices are ascending: layer l's are those in [l·H·T, (l + 1)·H·T).
  const lower = (v: number) => {
    let lo = 0;
    let hi = idx.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (idx[mid] < v) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  };
  return Array.from({ length: L }, (_, l) => {
    const a = lower(l * H * T);
    const b = lower((l + 1) * H * T);
    return tf.tidy(() => tf.sub(tf.tensor1d(idx.subarray(a, b), 'int32'), tf.scalar(l * H * T, 'int32')) as tf.Tensor1D);
  });
}
