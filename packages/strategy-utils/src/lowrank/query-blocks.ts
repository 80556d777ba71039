import * as tf from '@tensorflow/tfjs-core';
import { matmul, type ModelLayout } from '@kvpack/core';

/* Query-side helpers shared by the full and sparse attend paths: per-KV-head query blocks, RoPE moved to the queries, causal masks. */

/** Queries of one layer, rearranged once per attend call (all tiny). */
export interface QueryBlocks {
  n: number;
  H: number;
  g: number;
  /** Per KV head h: the g·n rows of its query heads, scaled by 1/√d, [g·n, d]; row ii·n + j = head h·g + ii, query j. */
  rows: tf.Tensor2D[];
  /** The same transposed, [d, g·n] (right operands of the tall score products). */
  cols: tf.Tensor2D[];
  /** P·colsₕ, [d, g·n]: the queries' pair swap, for scores against un-rotated keys ({@link ropeScores}). */
  colsSwapped: tf.Tensor2D[];
  /** Block-diagonal [F, H·n]: column (i, j) holds query j of head i in the rows of its KV head. */
  blockDiag: tf.Tensor2D;
  /** One-hot [H_kv, 1, H_kv, 1] used to keep each KV head's block of an [H·n, F] product. */
  eye: tf.Tensor4D;
}

/**
 * Rearranges post-RoPE queries q [n, H, d] for the per-KV-head products (GQA: query head i uses KV
 * head ⌊i / g⌋, g = H / H_kv, as core `attention`). Global row order of every [H·n, ·] result: row
 * i·n + j = query j of head i. Call inside tf.tidy.
 */
export function queryBlocks(q: tf.Tensor3D, layout: ModelLayout, P: tf.Tensor2D): QueryBlocks {
  const [n, H, d] = q.shape;
  const Hkv = layout.nKvHeads;
  const g = H / Hkv;
  const scaled = tf.mul(tf.transpose(q, [1, 0, 2]), 1 / Math.sqrt(d)); // [H, n, d]
  const perHead = tf.reshape(scaled, [Hkv, g * n, d]);
  const rows = (Hkv === 1 ? [tf.reshape(perHead, [g * n, d])] : tf.unstack(perHead, 0)) as tf.Tensor2D[];
  const colsAll = tf.transpose(perHead, [0, 2, 1]); // [Hkv, d, g·n]
  const cols = (Hkv === 1 ? [tf.reshape(colsAll, [d, g * n])] : tf.unstack(colsAll, 0)) as tf.Tensor2D[];
  const colsSwapped = cols.map((c) => matmul(P, c));
  const eyeData = new Float32Array(Hkv * Hkv);
  for (let h = 0; h < Hkv; h++) eyeData[h * Hkv + h] = 1;
  const eye = tf.tensor4d(eyeData, [Hkv, 1, Hkv, 1]);
  const blockDiag = tf.reshape(tf.mul(tf.reshape(colsAll, [Hkv, d, 1, g * n]), eye), [Hkv * d, H * n]) as tf.Tensor2D;
  return { n, H, g, rows, cols, colsSwapped, blockDiag, eye };
}

/**
 * Attention scores of one KV head's queries against pre-RoPE rows y [N, d] at positions with tables
 * cos, sin [N, d], without rotating the keys: q·RoPE_t(y_t) = (y_t∘cos_t)·q + (y_t∘sin_t)·(P·q)
 * (the sin table is equal within each rotation pair, so P moves from the key to the query).
 * Returns the transposed (small) scores [g·n, N]. Saves the N·d·d product (y·P) per head.
 */
export function ropeScores(y: tf.Tensor2D, cos: tf.Tensor2D, sin: tf.Tensor2D, qb: QueryBlocks, h: number): tf.Tensor2D {
  return tf.transpose(tf.add(matmul(tf.mul(y, cos) as tf.Tensor2D, qb.cols[h]), matmul(tf.mul(y, sin) as tf.Tensor2D, qb.colsSwapped[h]))) as tf.Tensor2D;
}

/** Keeps, from W [H·n, H_kv·d], each row's own KV-head block: [H·n, d]. */
export function ownHeadBlock(W: tf.Tensor2D, qb: QueryBlocks, headDim: number): tf.Tensor2D {
  const Hkv = qb.eye.shape[0];
  const gn = qb.g * qb.n;
  return tf.reshape(tf.sum(tf.mul(tf.reshape(W, [Hkv, gn, Hkv, headDim]), qb.eye), 2), [Hkv * gn, headDim]) as tf.Tensor2D;
}

/**
 * Additive causal masks of the residual (decode) tokens for query rows: with N cached tokens of which
 * the last `tail` are the queries' own, query j sees cached token u iff u ≤ N − tail + j. Returns the
 * masks of the prefill part [n, T] and of the residual part [n, n_dec] (null when nothing is masked).
 */
export function causalParts(n: number, T: number, nDec: number, tail: number): { pre: Float32Array | null; res: Float32Array | null } {
  const N = T + nDec;
  const masked = tail > 0 && (n > 1 || tail < n);
  if (!masked) return { pre: null, res: null };
  let pre: Float32Array | null = null;
  const res = nDec > 0 ? new Float32Array(n * nDec) : null;
  for (let j = 0; j < n; j++) {
    const last = N - tail + j; // inclusive
    for (let u = Math.max(0, last + 1); u < N; u++) {
      if (u < T) {
        pre ??= new Float32Array(n * T);
        pre[j * T + u] = -1e30;
      } else res![j * nDec + (u - T)] = -1e30;
    }
  }
  return { pre, res };
}

/** Adds an [n, M] mask to scores [H·n, M] (rows i·n + j) — broadcast over the H query heads. */
export function addRowMask(S: tf.Tensor2D, mask: Float32Array | null, n: number): tf.Tensor2D {
  if (!mask) return S;
  const [Hn, M] = S.shape;
  return tf.reshape(tf.add(tf.reshape(S, [Hn / n, n, M]), tf.tensor3d(mask, [1, n, M])), [Hn, M]) as tf.Tensor2D;
}
