import * as tf from '@tensorflow/tfjs-core';
import { applyRope, check, type KVCache } from '@kvpack/core';
import { encodeSparseLayer, sparseGeometry, type SparseIndex, type SparseLayer } from './sparse-index.js';
import type { SparseOptions } from './sparse-options.js';

/**
 * {@link buildSparseIndexOnHost} on the tfjs backend (the default off wasm/cpu, where reading the whole cache
 * back would dominate the compression): keys rotated by core `applyRope`, chunk means, min-cosine
 * outlier scores and the exact rows computed in float32 on the device; only the landmarks [C, H_kv, d],
 * the outlier chunk indices and the exact rows come back to the host (about 1/8 of the keys). The same
 * rules as the host build; results agree with it up to float32 rounding (tested).
 */
export async function buildSparseIndexOnDevice(cache: KVCache, T: number, o: SparseOptions): Promise<SparseIndex> {
  const { nKvHeads: H, headDim: d, nLayers } = cache.layout;
  const F = H * d;
  const c = o.chunkSize;
  const { chunks: C, outliers: O, local } = sparseGeometry(T, o);
  const start = cache.startPosition ?? 0;
  const layers: SparseLayer[] = [];
  for (let l = 0; l < nLayers; l++) {
    const parts = tf.tidy(() => {
      const K = applyRope(cache.keys[l], cache.rope, { start, count: T }); // [T, H, d]
      const V = cache.values[l];
      const out: tf.Tensor[] = [];
      if (C > 0) {
        const Kc = tf.reshape(tf.slice(K, [0, 0, 0], [C * c, H, d]), [C, c, H, d]);
        const lm = tf.mean(Kc, 1); // [C, H, d]
        out.push(lm);
        if (O > 0) {
          const dot = tf.sum(tf.mul(Kc, tf.reshape(lm, [C, 1, H, d])), 3); // [C, c, H]
          const den = tf.maximum(tf.mul(tf.norm(Kc, 'euclidean', 3), tf.reshape(tf.norm(lm, 'euclidean', 2), [C, 1, H])), 1e-8);
          const score = tf.transpose(tf.min(tf.div(dot, den), 1)); // [H, C]: lowest cosine of each chunk
          const outl = tf.topk(tf.neg(score), O).indices; // [H, O], lowest scores
          // Exact rows of every head's outlier chunks: rows t·H + h of K, V viewed as [T·H, d].
          const tok = tf.add(tf.reshape(tf.mul(outl, tf.scalar(c, 'int32')), [H, O, 1]), tf.reshape(tf.range(0, c, 1, 'int32'), [1, 1, c]));
          const rows = tf.reshape(tf.add(tf.mul(tok, tf.scalar(H, 'int32')), tf.reshape(tf.range(0, H, 1, 'int32'), [H, 1, 1])), [-1]);
          out.push(outl, tf.gather(tf.reshape(K, [T * H, d]), rows), tf.gather(tf.reshape(V, [T * H, d]), rows));
        }
      }
      out.push(tf.slice(K, [C * c, 0, 0], [local, H, d]), tf.slice(V, [C * c, 0, 0], [local, H, d]));
      return out;
    });
    let data: Awaited<ReturnType<tf.Tensor['data']>>[];
    try {
      data = await Promise.all(parts.map((t) => t.data()));
    } finally {
      tf.dispose(parts);
    }
    let i = 0;
    const lm = C > 0 ? (data[i++] as Float32Array) : new Float32Array(0);
    let outl = new Int32Array(0);
    let oK: Float32Array = new Float32Array(0);
    let oV: Float32Array = new Float32Array(0);
    if (C > 0 && O > 0) {
      const raw = data[i++] as Int32Array;
      const k = data[i++] as Float32Array;
      const v = data[i++] as Float32Array;
      // Ascending chunk order per head, rows reordered to match ([H, O·c, d]).
      outl = new Int32Array(H * O);
      oK = new Float32Array(H * O * c * d);
      oV = new Float32Array(H * O * c * d);
      for (let h = 0; h < H; h++) {
        const order = Array.from({ length: O }, (_, j) => j).sort((a, b) => raw[h * O + a] - raw[h * O + b]);
        order.forEach((j, dst) => {
          outl[h * O + dst] = raw[h * O + j];
          oK.set(k.subarray((h * O + j) * c * d, (h * O + j + 1) * c * d), (h * O + dst) * c * d);
          oV.set(v.subarray((h * O + j) * c * d, (h * O + j + 1) * c * d), (h * O + dst) * c * d);
        });
      }
    }
    const lK = data[i++] as Float32Array;
    const lV = data[i++] as Float32Array;
    check(lm.length === C * F && lK.length === local * F && lV.length === local * F, 'shape', 'buildSparseIndex: unexpected tensor sizes');
    layers.push(encodeSparseLayer(lm, outl, oK, oV, lK, lV));
  }
  return { options: o, chunkSize: c, chunks: C, outliers: O, local, layers };
}
