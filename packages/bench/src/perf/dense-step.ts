import * as tf from '@tensorflow/tfjs-core';
import { check, isHostBackend } from '@kvpack/core';

/**
 * One layer's uncompressed cache stored the way a decode engine keeps it for attention: per KV
 * head, keys transposed [d, N] and values [N, d] (post-RoPE keys), so a decode step needs no
 * transpose. On wasm/cpu the heads are separate 2-D tensors (a batched matMul is several times
 * slower there); elsewhere one batched tensor each.
 */
export interface AttentionReadyLayer {
  nKvHeads: number;
  headDim: number;
  tokens: number;
  /** Per head [d, N] (wasm/cpu), or one [H_kv, d, N]. */
  kt: tf.Tensor[];
  /** Per head [N, d] (wasm/cpu), or one [H_kv, N, d]. */
  v: tf.Tensor[];
}

/** Lays out one layer's post-RoPE keys and values [N, H_kv, d] for {@link denseDecodeStep}. Caller disposes with {@link disposeAttentionReady}. */
export function attentionReadyLayer(keys: tf.Tensor3D, values: tf.Tensor3D): AttentionReadyLayer {
  const [N, H, d] = keys.shape;
  check(values.shape.join() === keys.shape.join(), 'shape', `attentionReadyLayer: keys [${keys.shape}] and values [${values.shape}] differ`);
  return tf.tidy(() => {
    const kt = tf.transpose(keys, [1, 2, 0]); // [H, d, N]
    const vh = tf.transpose(values, [1, 0, 2]); // [H, N, d]
    if (isHostBackend()) {
      const kts = tf.unstack(kt, 0);
      const vs = tf.unstack(vh, 0);
      return { nKvHeads: H, headDim: d, tokens: N, kt: kts.map((t) => tf.keep(t)), v: vs.map((t) => tf.keep(t)) };
    }
    return { nKvHeads: H, headDim: d, tokens: N, kt: [tf.keep(kt)], v: [tf.keep(vh)] };
  });
}

/** Frees an {@link AttentionReadyLayer}. */
export function disposeAttentionReady(a: AttentionReadyLayer): void {
  tf.dispose([...a.kt, ...a.v]);
}

/**
 * Dense attention of decode queries q [n, H, d] (post-RoPE, no mask: every cached token is visible)
 * over an {@link AttentionReadyLayer}: softmax(q·Kᵀ/√d)·V per GQA group, two matrix products and a
 * softmax per KV head, no transposes. Returns [n, H, d].
 * @throws KvpackError('shape') when heads or head_dim disagree.
 */
export function denseDecodeStep(q: tf.Tensor3D, a: AttentionReadyLayer): tf.Tensor3D {
  const [n, H, d] = q.shape;
  const Hkv = a.nKvHeads;
  check(d === a.headDim && H % Hkv === 0, 'shape', `denseDecodeStep: q [${q.shape}] does not fit ${Hkv} KV heads × ${a.headDim}`);
  const g = H / Hkv;
  const scale = 1 / Math.sqrt(d);
  return tf.tidy(() => {
    const qh = tf.transpose(tf.reshape(q, [n, Hkv, g, d]), [1, 0, 2, 3]); // [Hkv, n, g, d] (tiny)
    if (a.kt[0].rank === 2) {
      const outs: tf.Tensor[] = [];
      for (let h = 0; h < Hkv; h++) {
        const qq = tf.reshape(tf.slice(qh, [h, 0, 0, 0], [1, n, g, d]), [n * g, d]) as tf.Tensor2D;
        const p = tf.softmax(tf.mul(tf.matMul(qq, a.kt[h] as tf.Tensor2D), scale), -1) as tf.Tensor2D;
        outs.push(tf.reshape(tf.matMul(p, a.v[h] as tf.Tensor2D), [n, g, d]));
      }
      return tf.reshape(tf.stack(outs, 1), [n, H, d]) as tf.Tensor3D;
    }
    const q3 = tf.reshape(qh, [Hkv, n * g, d]);
    const p = tf.softmax(tf.mul(tf.matMul(q3, a.kt[0] as tf.Tensor3D), scale), -1);
    const o = tf.matMul(p, a.v[0] as tf.Tensor3D); // [Hkv, n·g, d]
    return tf.reshape(tf.transpose(tf.reshape(o, [Hkv, n, g, d]), [1, 0, 2, 3]), [n, H, d]) as tf.Tensor3D;
  });
}
