import * as tf from '@tensorflow/tfjs-core';
import type { LlamaWeights } from '../types.js';

/** The pieces of a Llama-family layer, as functions of the weights (callers run them inside tidy scopes). */

/** RMSNorm: x / sqrt(mean(x²) + eps) · w, per row. */
export function rmsNorm(x: tf.Tensor2D, w: tf.Tensor1D, eps: number): tf.Tensor2D {
  return tf.mul(tf.mul(x, tf.rsqrt(tf.add(tf.mean(tf.square(x), 1, true), eps))), w);
}

/** Embedding rows of `ids`, [n, D]. */
export function embed(w: LlamaWeights, ids: readonly number[]): tf.Tensor2D {
  return tf.tidy(() => tf.gather(w.embedding, tf.tensor1d(ids as number[], 'int32')) as tf.Tensor2D);
}

/** q [n, H, d], k, v [n, H_kv, d] (pre-RoPE) of one layer for the normed input h [n, D]. */
export function projectQkv(w: LlamaWeights, layer: number, h: tf.Tensor2D): { q: tf.Tensor3D; k: tf.Tensor3D; v: tf.Tensor3D } {
  const lw = w.layers[layer];
  const { nHeads: H, nKvHeads: Hkv, headDim: d } = w.config;
  const n = h.shape[0];
  const proj = (m: tf.Tensor2D, b: tf.Tensor1D | undefined, heads: number) => {
    const y = tf.matMul(h, m);
    return (b ? tf.add(y, b) : y).reshape([n, heads, d]) as tf.Tensor3D;
  };
  let q = proj(lw.wq, lw.bq, H);
  let k = proj(lw.wk, lw.bk, Hkv);
  if (lw.qNorm && lw.kNorm) {
    // Qwen3: RMSNorm over each head's d channels, before RoPE (keys are cached after it).
    q = headRmsNorm(q, lw.qNorm, w.config.normEps);
    k = headRmsNorm(k, lw.kNorm, w.config.normEps);
  }
  return { q, k, v: proj(lw.wv, lw.bv, Hkv) };
}

/** RMSNorm of each head's d channels: x [n, heads, d] / sqrt(mean over d of x² + eps) · w [d]. */
export function headRmsNorm(x: tf.Tensor3D, w: tf.Tensor1D, eps: number): tf.Tensor3D {
  return tf.mul(tf.mul(x, tf.rsqrt(tf.add(tf.mean(tf.square(x), 2, true), eps))), w) as tf.Tensor3D;
}

/** Output projection + residual, then the SwiGLU block + residual. o: attention output [n, H, d]. */
export function finishLayer(w: LlamaWeights, layer: number, x: tf.Tensor2D, o: tf.Tensor3D): tf.Tensor2D {
  const lw = w.layers[layer];
  const c = w.config;
  const n = x.shape[0];
  const x1 = tf.add(x, tf.matMul(o.reshape([n, c.nHeads * c.headDim]), lw.wo)) as tf.Tensor2D;
  const h = rmsNorm(x1, lw.ffnNorm, c.normEps);
  const g = tf.matMul(h, lw.w1);
  const u = tf.matMul(h, lw.w3);
  return tf.add(x1, tf.matMul(tf.mul(tf.mul(g, tf.sigmoid(g)), u), lw.w2)) as tf.Tensor2D;
}

/** Final RMSNorm and classifier: logits [n, V]. */
export function classify(w: LlamaWeights, x: tf.Tensor2D): tf.Tensor2D {
  return tf.matMul(rmsNorm(x, w.finalNorm, w.config.normEps), w.classifier);
}
