import * as tf from '@tensorflow/tfjs-core';
import { applyRope, attention, type CompressedCache, type KVCache, type ModelLayout, type RopeConfig } from '@kvpack/core';
import type { BenchModel } from '../model.js';

/**
 * A small random causal transformer (attention-only, residual, tanh squashing) implementing
 * {@link BenchModel}, for tests of the runner without a real checkpoint. Its prefill attends with
 * core `attention`; its decode appends post-RoPE keys to the compressed cache and reads it back
 * through `cache.attend`, so prefill and decode agree up to float32 rounding.
 */
export class ToyModel implements BenchModel {
  readonly config: ModelLayout & { vocabSize: number; maxSeqLen: number };
  readonly rope: RopeConfig = { theta: 10000, layout: 'interleaved' };
  private readonly emb: tf.Tensor2D;
  private readonly wq: tf.Tensor2D[] = [];
  private readonly wk: tf.Tensor2D[] = [];
  private readonly wv: tf.Tensor2D[] = [];
  private readonly wo: tf.Tensor2D[] = [];
  private readonly out: tf.Tensor2D;

  constructor(layout: ModelLayout, vocabSize = 48, maxSeqLen = 256, seed = 1) {
    this.config = { ...layout, vocabSize, maxSeqLen };
    const { nLayers: L, nHeads: H, nKvHeads: Hkv, headDim: d } = layout;
    const D = H * d;
    let s = seed;
    const rnd = (shape: [number, number], scale: number) => tf.randomNormal(shape, 0, scale, 'float32', s++) as tf.Tensor2D;
    this.emb = rnd([vocabSize, D], 1);
    for (let l = 0; l < L; l++) {
      this.wq.push(rnd([D, H * d], 1 / Math.sqrt(D)));
      this.wk.push(rnd([D, Hkv * d], 1 / Math.sqrt(D)));
      this.wv.push(rnd([D, Hkv * d], 1 / Math.sqrt(D)));
      this.wo.push(rnd([H * d, D], 1 / Math.sqrt(D)));
    }
    this.out = rnd([D, vocabSize], 2 / Math.sqrt(D));
  }

  /**
   * Forward pass; `layer` gets post-RoPE queries, pre-RoPE keys and values of each layer and returns
   * the attention output [n, H, d]. It runs outside any tf.tidy (so caches may keep tensors).
   */
  private run(ids: number[], start: number, layer: (l: number, q: tf.Tensor3D, k: tf.Tensor3D, v: tf.Tensor3D) => tf.Tensor3D): tf.Tensor2D {
    const { nLayers: L, nHeads: H, nKvHeads: Hkv, headDim: d } = this.config;
    const n = ids.length;
    let x = tf.tidy(() => tf.gather(this.emb, tf.tensor1d(ids, 'int32')) as tf.Tensor2D);
    for (let l = 0; l < L; l++) {
      const [q, k, v] = tf.tidy(() => [
        applyRope(tf.reshape(tf.matMul(x, this.wq[l]), [n, H, d]) as tf.Tensor3D, this.rope, { start, count: n }),
        tf.reshape(tf.matMul(x, this.wk[l]), [n, Hkv, d]) as tf.Tensor3D,
        tf.reshape(tf.matMul(x, this.wv[l]), [n, Hkv, d]) as tf.Tensor3D,
      ]);
      const o = layer(l, q, k, v);
      const next = tf.tidy(() => tf.tanh(tf.add(x, tf.matMul(tf.reshape(o, [n, H * d]), this.wo[l]))) as tf.Tensor2D);
      tf.dispose([x, q, k, v, o]);
      x = next;
    }
    const logits = tf.matMul(x, this.out) as tf.Tensor2D;
    x.dispose();
    return logits;
  }

  prefill(ids: number[], options?: { observationWindow?: number }): { logits: tf.Tensor2D; cache: KVCache } {
    const keys: tf.Tensor3D[] = [];
    const values: tf.Tensor3D[] = [];
    const queries: tf.Tensor3D[] = [];
    const w = options?.observationWindow ?? 0;
    const n = ids.length;
    const logits = this.run(ids, 0, (_l, q, k, v) => {
      keys.push(tf.clone(k));
      values.push(tf.clone(v));
      if (w > 0) queries.push(tf.slice(q, [n - w, 0, 0], [w, -1, -1]));
      return tf.tidy(() => attention(q, applyRope(k, this.rope, { start: 0, count: n }), v, n));
    });
    const { nLayers, nHeads, nKvHeads, headDim } = this.config;
    const cache: KVCache = { layout: { nLayers, nHeads, nKvHeads, headDim }, rope: this.rope, keys, values, startPosition: 0 };
    if (w > 0) cache.queries = queries;
    return { logits, cache };
  }

  decode(ids: number[], cache: CompressedCache, position: number): tf.Tensor2D {
    return this.run(ids, position, (l, q, k, v) => {
      const kr = applyRope(k, this.rope, { start: position, count: ids.length });
      cache.append(l, kr, v);
      kr.dispose();
      return cache.attend ? cache.attend(l, q, { causalTail: ids.length }) : tf.tidy(() => attention(q, cache.keys(l), cache.values(l), ids.length));
    });
  }

  dispose(): void {
    tf.dispose([this.emb, this.out, ...this.wq, ...this.wk, ...this.wv, ...this.wo]);
  }
}
