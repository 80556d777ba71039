import * as tf from '@tensorflow/tfjs-core';
import { matmul } from '@kvpack/core';
import type { DecodeState } from './decode-state.js';
import { addRowMask, causalParts, ownHeadBlock, queryBlocks, ropeScores } from './query-blocks.js';

/** How `attend` forms the value side: in the compressed domain, by reconstruction, or by flop count. */
export type ValuePath = 'auto' | 'compressed' | 'reconstruct';

/**
 * Multiply–accumulate counts of the two value paths of full-mode attention for q rows n over T
 * prefill tokens (H query heads, value rank R_v, F = H_kv·d, head_dim d): compressed
 * (softmax·U_v)·B_v costs H·n·T·R_v + H·n·R_v·F (the last product is formed for all KV heads at once
 * and each row keeps its head's block); reconstruction V_h = U_v·B_v[:, h] then softmax·V_h per KV
 * head costs T·R_v·F + H·n·T·d.
 */
export function valuePathFlops(n: number, H: number, T: number, Rv: number, F: number, d: number): { compressed: number; reconstruct: number } {
  return { compressed: H * n * T * Rv + H * n * Rv * F, reconstruct: T * Rv * F + H * n * T * d };
}

/**
 * Full-mode attention of post-RoPE queries q [n, H, d] over one layer of a grouped low-rank cache
 * plus its exact residual decode tokens: softmax(q·Kᵀ/√d + causal mask)·V with
 * - keys: per KV head h, the pre-RoPE rows Y_h = U_k·B_k[:, h] and the scores
 *   (Y_h∘cos)·q_hᵀ + (Y_h∘sin)·(P·q_h)ᵀ as tall [T, g·n] products ({@link ropeScores}: the rotation
 *   moves to the queries, the keys are never materialized);
 * - values: in the compressed domain, (softmax·U_v)·B_v, or by reconstruction, chosen by
 *   {@link valuePathFlops} unless `values` forces one;
 * - residual tokens [n_dec, H_kv, d] (exact) attended together with the prefill (one softmax).
 * Returns [n, H, d]. The result equals core `attention(q, keys(l), values(l), tail)` up to float32
 * rounding (tested).
 */
export function attendFull(
  state: DecodeState,
  layer: number,
  q: tf.Tensor3D,
  tail: number,
  residual: { k: tf.Tensor3D; v: tf.Tensor3D } | null,
  values: ValuePath = 'auto',
): tf.Tensor3D {
  const src = state.src;
  const { nKvHeads: Hkv, headDim: d } = src.layout;
  const T = src.prefillLength;
  const F = Hkv * d;
  return tf.tidy(() => {
    const qb = queryBlocks(q, src.layout, state.pairSwap());
    const { n, H } = qb;
    const nDec = residual ? residual.k.shape[0] : 0;
    const masks = causalParts(n, T, nDec, tail);
    const { cos, sin } = state.tables();
    const Uk = state.basis('k', layer);
    const Bh = state.headFactors(state.factor('k', layer));
    // Residual (exact decode) tokens: scores of all heads at once through the block-diagonal queries.
    const Sres =
      residual && nDec > 0
        ? addRowMask(tf.transpose(matmul(tf.reshape(residual.k, [nDec, F]) as tf.Tensor2D, qb.blockDiag)) as tf.Tensor2D, masks.res, n)
        : null;
    const resRows = Sres ? (Hkv === 1 ? [Sres] : (tf.split(Sres, Hkv, 0) as tf.Tensor2D[])) : null;
    const Uv = state.basis('v', layer);
    const Bv = state.factor('v', layer);
    const Rv = Uv.shape[1];
    const fl = valuePathFlops(n, H, T, Rv, F, d);
    const path = values === 'auto' ? (fl.compressed <= fl.reconstruct ? 'compressed' : 'reconstruct') : values;
    const Bvh = path === 'reconstruct' ? state.headFactors(Bv) : null;
    // Per KV head: prefill scores against the un-rotated rows U_k·B_k[:, h] ({@link ropeScores}), one
    // softmax with the head's residual scores.
    const E: tf.Tensor2D[] = [];
    const Er: tf.Tensor2D[] = [];
    const zs: tf.Tensor2D[] = [];
    const outs: tf.Tensor2D[] = [];
    for (let h = 0; h < Hkv; h++) {
      const S = addRowMask(ropeScores(matmul(Uk, Bh[h]), cos, sin, qb, h), masks.pre, n);
      let m = tf.max(S, 1, true);
      if (resRows) m = tf.maximum(m, tf.max(resRows[h], 1, true));
      const e = tf.exp(tf.sub(S, m)) as tf.Tensor2D;
      let z = tf.sum(e, 1, true);
      if (resRows) {
        const er = tf.exp(tf.sub(resRows[h], m)) as tf.Tensor2D;
        z = tf.add(z, tf.sum(er, 1, true));
        Er.push(er);
      }
      zs.push(z as tf.Tensor2D);
      if (Bvh) outs.push(matmul(e, matmul(Uv, Bvh[h]))); // softmax·(U_v·B_v[:, h]), [g·n, d]
      else E.push(e);
    }
    const cat = (xs: tf.Tensor2D[]) => (xs.length === 1 ? xs[0] : (tf.concat(xs, 0) as tf.Tensor2D));
    let out = Bvh
      ? cat(outs)
      : ownHeadBlock(matmul(matmul(cat(E), Uv), Bv), qb, d); // (softmax·U_v)·B_v, own head's block
    if (Er.length) out = tf.add(out, ownHeadBlock(matmul(cat(Er), tf.reshape(residual!.v, [nDec, F]) as tf.Tensor2D), qb, d)) as tf.Tensor2D;
    const z = cat(zs);
    return tf.transpose(tf.reshape(tf.div(out, z), [H, n, d]), [1, 0, 2]) as tf.Tensor3D;
  });
}
