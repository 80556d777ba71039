import * as tf from '@tensorflow/tfjs-core';
import { check } from './errors.js';
import { isHostBackend } from './backend.js';

/**
 * Additive causal mask [n, N]: query row i (the i-th of the last `tail` cached tokens, n = q rows)
 * sees cached tokens 0 … N − tail + i. Rows are the n newest tokens. With a sliding `window` W
 * (tokens), row i sees only the W tokens ending at its own, N − tail + i − W + 1 … N − tail + i
 * (transformers' sliding-window rule: key position > query position − W), which assumes the cached
 * tokens sit at consecutive positions.
 */
export function causalTailMask(n: number, N: number, tail = n, window?: number): tf.Tensor2D {
  const m = new Float32Array(n * N);
  for (let i = 0; i < n; i++) {
    const last = N - tail + i; // inclusive
    for (let j = last + 1; j < N; j++) m[i * N + j] = -1e30;
    if (window !== undefined) for (let j = 0; j <= last - window; j++) m[i * N + j] = -1e30;
  }
  return tf.tensor2d(m, [n, N]);
}

/**
 * Scaled dot-product attention with GQA: softmax(q·Kᵀ/√d + mask)·V.
 * @param q post-RoPE queries [n, H, d]
 * @param k post-RoPE keys [N, H_kv, d]
 * @param v values [N, H_kv, d]
 * @param causalTail the last `causalTail` cached tokens are the queries' own (causal among them); 0 = no mask
 * @param window sliding-window size W in tokens (Mistral, Qwen2/3 and Gemma-style windowed layers):
 *   each query sees only the W cached tokens ending at its own position (consecutive positions
 *   assumed); absent = the whole cache
 * @returns [n, H, d]
 * @throws KvpackError('shape') when heads or head_dim disagree, or the window is not a positive integer.
 */
export function attention(q: tf.Tensor3D, k: tf.Tensor3D, v: tf.Tensor3D, causalTail = q.shape[0], window?: number): tf.Tensor3D {
  const [n, H, d] = q.shape;
  const [N, Hkv] = k.shape;
  check(k.shape[2] === d && v.shape[2] === d && v.shape[0] === N && v.shape[1] === Hkv, 'shape', `attention: q [${q.shape}], k [${k.shape}], v [${v.shape}] disagree`);
  check(H % Hkv === 0, 'shape', `attention: ${H} query heads are not a multiple of ${Hkv} KV heads`);
  check(window === undefined || (Number.isInteger(window) && window > 0), 'shape', `attention: sliding window ${window} must be a positive integer`);
  const g = H / Hkv;
  const tail = causalTail > 0 ? causalTail : n;
  // The window cuts something only when the newest query's own token is W or more tokens into the cache.
  const win = window !== undefined && N - tail + n - 1 - window >= 0 ? window : undefined;
  const masked = (causalTail > 0 && (n > 1 || causalTail < n)) || win !== undefined;
  if (isHostBackend()) {
    // On wasm/cpu a batched matMul is several times slower than one 2-D matMul per batch (measured
    // on wasm: 1,015 tokens, 2 KV heads × 3 query heads, d = 64: 1.26 s batched vs 0.16 s per head),
    // and transposed operands are slower still; so loop over KV heads with plain 2-D products.
    return tf.tidy(() => {
      const mask = masked ? causalTailMask(n, N, tail, win).reshape([n, 1, N]) : null;
      // unstack, not slice: wasm's slice copies the whole input to JS for every head.
      const qs = tf.unstack(q.reshape([n, Hkv, g, d]), 1); // Hkv × [n, g, d]
      const kts = tf.unstack(k.transpose([1, 2, 0]), 0); // Hkv × [d, N]
      const vs = tf.unstack(v.transpose([1, 0, 2]), 0); // Hkv × [N, d]
      const outs: tf.Tensor3D[] = [];
      for (let h = 0; h < Hkv; h++) {
        const qq = qs[h].reshape([n * g, d]) as tf.Tensor2D;
        let s = tf.matMul(qq, kts[h] as tf.Tensor2D).mul(1 / Math.sqrt(d)).reshape([n, g, N]);
        if (mask) s = s.add(mask);
        const p = tf.softmax(s, -1).reshape([n * g, N]) as tf.Tensor2D;
        outs.push(tf.matMul(p, vs[h] as tf.Tensor2D).reshape([n, g, d]));
      }
      return (Hkv === 1 ? outs[0] : tf.stack(outs, 1)).reshape([n, H, d]) as tf.Tensor3D;
    });
  }
  return tf.tidy(() => {
    const qh = q.reshape([n, Hkv, g, d]).transpose([1, 0, 2, 3]).reshape([Hkv, n * g, d]);
    const kh = k.transpose([1, 0, 2]);
    const vh = v.transpose([1, 0, 2]);
    let s = tf.matMul(qh, kh, false, true).mul(1 / Math.sqrt(d)).reshape([Hkv, n, g, N]);
    if (masked) s = s.add(causalTailMask(n, N, tail, win).reshape([1, n, 1, N]));
    const p = tf.softmax(s, -1).reshape([Hkv, n * g, N]);
    const o = tf.matMul(p, vh).reshape([Hkv, n, g, d]).transpose([1, 0, 2, 3]);
    return o.reshape([n, H, d]) as tf.Tensor3D;
  });
}
