import * as tf from '@tensorflow/tfjs-core';

/**
 * SnapKV's votes for the prefix tokens of one layer (Li et al. 2024, arXiv 2404.14469, §4.1;
 * FasterDecoding/SnapKV, snapkv_utils.py): attention weights of the w observation-window queries
 * over all T keys (softmax(q·kᵀ/√d), causal inside the window), restricted to the T − w prefix keys,
 * **summed** over the window queries and **averaged** over the query heads of each KV head's GQA
 * group (as NVIDIA/kvpress's SnapKVPress averages per group). Runs on the tfjs backend (the causal
 * mask is built there too), float32.
 * @param queries post-RoPE window queries [w, H, d]
 * @param keys post-RoPE keys [T, H_kv, d]
 * @param scale softmax scale of the logits (default 1/√d; MLA's absorbed queries carry theirs already)
 * @returns votes [H_kv, T − w], transient, owned by the caller
 */
export function snapkvVotes(queries: tf.Tensor3D, keys: tf.Tensor3D, scale?: number): tf.Tensor2D {
  const [w, Hq, d] = queries.shape;
  const [T, Hkv] = keys.shape;
  const g = Hq / Hkv;
  return tf.tidy(() => {
    // Window query i sees keys j ≤ T − w + i; the rest get −1e30 (as core attention: finite, so no backend turns it into NaN).
    const hidden = tf.greater(tf.reshape(tf.range(0, T, 1, 'int32'), [1, T]), tf.reshape(tf.range(T - w, T, 1, 'int32'), [w, 1])); // [w, T]
    const mask = tf.reshape(tf.mul(tf.cast(hidden, 'float32'), -1e30), [1, 1, w, T]);
    const qh = tf.reshape(tf.transpose(tf.reshape(queries, [w, Hkv, g, d]), [1, 2, 0, 3]), [Hkv, g * w, d]);
    const kT = tf.transpose(keys, [1, 2, 0]); // [H_kv, d, T], explicit (transposed matMul is slow on wasm)
    const logits = tf.reshape(tf.mul(tf.matMul(qh, kT), scale ?? 1 / Math.sqrt(d)), [Hkv, g, w, T]);
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
