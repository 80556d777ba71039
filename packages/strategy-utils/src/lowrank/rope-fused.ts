import * as tf from '@tensorflow/tfjs-core';
import { SHARED_ROPE_MIN_TOKENS, isHostBackend, matmul, ropeTableData, sharedRopeTensors, type RopeConfig } from '@kvpack/core';

/*
 * Fused RoPE of a low-rank product: RoPE(x) = x∘cos + (x·P)∘sin with full-width tables expanded from
 * core's one RoPE table (`ropeTableData`) and the signed pair swap P, so keys rebuilt from the factors
 * are rotated without a separate applyRope pass.
 */

/** Host memo of recent full-width tables (key rope|d|start|count); the decode code rebuilds its device tables from it per call. */
const fullMemo: { key: string; cos: Float32Array; sin: Float32Array }[] = [];
const FULL_MEMO_ENTRIES = 4;
/** Ranges shorter than this are expanded every time (as core's host table memo). */
const FULL_MEMO_MIN = 256;

/**
 * Full-width RoPE tables for the fused rotation, [count, d] float32 each: for channel j of a head,
 * cos[t, j] = cos(p_t·θ_i) and sin[t, j] = sin(p_t·θ_i) with i the frequency of j's rotation pair
 * (i = ⌊j/2⌋ for the `interleaved` layout, i = j mod d/2 for `half`), p_t = start + t. Expanded from
 * core `ropeTableData` (float64 trig, long ranges cached on the host), so the values equal `ropeTables`'.
 * The last few long ranges are kept on the host (the same arrays are returned again: do not modify them).
 */
export function fullWidthRopeTables(rope: RopeConfig, headDim: number, start: number, count: number): { cos: Float32Array; sin: Float32Array } {
  const key = count >= FULL_MEMO_MIN ? `${JSON.stringify(rope)}|${headDim}|${start}|${count}` : null;
  const hit = key ? fullMemo.find((e) => e.key === key) : undefined;
  if (hit) return hit;
  const half = headDim / 2;
  const t = ropeTableData(rope, headDim, { start, count }); // [count, d/2], float64-computed
  const cos = new Float32Array(count * headDim);
  const sin = new Float32Array(count * headDim);
  for (let p = 0; p < count; p++) {
    const o = p * headDim;
    for (let i = 0; i < half; i++) {
      const c = t.cos[p * half + i];
      const s = t.sin[p * half + i];
      const j0 = rope.layout === 'interleaved' ? 2 * i : i;
      const j1 = rope.layout === 'interleaved' ? 2 * i + 1 : i + half;
      cos[o + j0] = c;
      cos[o + j1] = c;
      sin[o + j0] = s;
      sin[o + j1] = s;
    }
  }
  if (key) {
    fullMemo.push({ key, cos, sin });
    if (fullMemo.length > FULL_MEMO_ENTRIES) fullMemo.shift();
  }
  return { cos, sin };
}

/**
 * {@link fullWidthRopeTables} as tensors [count, d] each, for use inside the caller's tf.tidy. On the
 * device backends (webgpu, webgl, tensorflow), ranges of at least core's `SHARED_ROPE_MIN_TOKENS`
 * come from core's shared device table cache (`sharedRopeTensors`: uploaded once per (rope, d, start,
 * count) and shared by every cache and layer, never part of a cache; never dispose them); wasm and cpu,
 * and short ranges, get transient tensors uploaded from the host memo per call.
 */
export function fullWidthRopeTensors(rope: RopeConfig, headDim: number, start: number, count: number): { cos: tf.Tensor2D; sin: tf.Tensor2D } {
  const upload = () => {
    const { cos, sin } = fullWidthRopeTables(rope, headDim, start, count);
    // The cpu backend keeps the array it is given: give it a copy of the shared host table.
    const own = (a: Float32Array) => (tf.getBackend() === 'cpu' ? a.slice() : a);
    return [tf.tensor2d(own(cos), [count, headDim]), tf.tensor2d(own(sin), [count, headDim])] as [tf.Tensor2D, tf.Tensor2D];
  };
  if (isHostBackend() || count < SHARED_ROPE_MIN_TOKENS) {
    const [cos, sin] = upload();
    return { cos, sin };
  }
  const [cos, sin] = sharedRopeTensors(`full|${JSON.stringify(rope)}|${headDim}|${start}|${count}`, upload);
  return { cos, sin };
}

/** Host memo of pair swaps by layout and head_dim (a few KiB each). */
const swapMemo = new Map<string, Float32Array>();

/**
 * The signed pair swap P [d, d] of a RoPE layout: RoPE(x) = x∘cos + (x·P)∘sin with the full-width
 * tables of {@link fullWidthRopeTables}. For `interleaved`, (x·P)[2i] = −x[2i+1] and
 * (x·P)[2i+1] = x[2i]; for `half`, (x·P)[i] = −x[i + d/2] and (x·P)[i + d/2] = x[i]
 * (Hugging Face `rotate_half`). Returned row-major as float32 (memoized on the host: do not modify it).
 */
export function signedPairSwap(layout: RopeConfig['layout'], headDim: number): Float32Array {
  const key = `${layout}|${headDim}`;
  const hit = swapMemo.get(key);
  if (hit) return hit;
  const d = headDim;
  const half = d / 2;
  const P = new Float32Array(d * d);
  for (let i = 0; i < half; i++) {
    const a = layout === 'interleaved' ? 2 * i : i;
    const b = layout === 'interleaved' ? 2 * i + 1 : i + half;
    P[b * d + a] = -1; // (xP)[a] = −x[b]
    P[a * d + b] = 1; // (xP)[b] = x[a]
  }
  swapMemo.set(key, P);
  return P;
}

/**
 * Fused RoPE of a low-rank product: keys = (U·B)∘cos + (U·B)·P∘sin, [N, H_kv, d] from U [N, R],
 * B [R, H_kv·d] and the tables [N, d]. The rotated copy (U·B)·P is one more matrix product; it is
 * formed as U·B′ with B′ = B·P precomputed when R ≤ d (N·R·F flops), else as (U·B)·P on the
 * [N·H_kv, d] rows (N·F·d flops). Either way the multiply by P only permutes and negates, so the
 * result equals core `applyRope(U·B)` up to float32 rounding of the product.
 */
export function fusedRopeProduct(
  U: tf.Tensor2D,
  B: tf.Tensor2D,
  Bswapped: tf.Tensor2D | null,
  P: tf.Tensor2D,
  cos: tf.Tensor2D,
  sin: tf.Tensor2D,
  nKvHeads: number,
): tf.Tensor3D {
  const N = U.shape[0];
  const d = P.shape[0];
  return tf.tidy(() => {
    const Y = matmul(U, B);
    const YP = Bswapped ? matmul(U, Bswapped) : matmul(tf.reshape(Y, [N * nKvHeads, d]) as tf.Tensor2D, P);
    const c = tf.reshape(cos, [N, 1, d]);
    const s = tf.reshape(sin, [N, 1, d]);
    return tf.add(tf.mul(tf.reshape(Y, [N, nKvHeads, d]), c), tf.mul(tf.reshape(YP, [N, nKvHeads, d]), s)) as tf.Tensor3D;
  });
}
