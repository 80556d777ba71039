import * as tf from '@tensorflow/tfjs-core';
import { check, isWebGpuBackend } from '@kvpack/core';
import { plainScores, topKPositionsWgsl } from './top-k-wgsl.js';

/** The largest finite float32. */
const FLOAT32_MAX = 3.4028234663852886e38;

/**
 * Per row, the positions of the `k` highest scores of `scores` [R, T] (float32), ties to the lower
 * position, a NaN score ranking lowest (as −∞), returned in ascending position order, int32 [R, k].
 * Runs on the tfjs backend with no readback: the k-th highest value v_k of each row comes from
 * `tf.topk`'s values (well defined whatever order a backend's top-k gives equal values), every
 * position scoring above v_k is kept, and of those scoring exactly v_k the lowest positions fill the
 * rest (a running count of the ties); a second `tf.topk` over T − position of the kept positions
 * (distinct, exact in float32 below 2^24) lists them ascending. So the result does not depend on how
 * a backend's top-k resolves ties (nor on how it treats ±∞: the top-k sees only finite values). Same rule as the host `keepTopScores`.
 * On webgpu the selection is WGSL kernels with no readback ({@link topKPositionsWgsl}: one dispatch for rows of
 * at most 4,096 scores, five for longer rows, spread over many workgroups). Transient, owned by the caller.
 * @throws KvpackError('shape') when `scores` is not 2-D or k is not in [0, T].
 */
export function topKPositions(scores: tf.Tensor2D, k: number): tf.Tensor2D {
  check(scores.rank === 2, 'shape', `top-k positions: scores must be [rows, T], got [${scores.shape}]`);
  const [R, T] = scores.shape;
  check(Number.isInteger(k) && k >= 0 && k <= T, 'shape', `top-k positions: k = ${k} is not a count of the T = ${T} positions`);
  if (k === 0) return tf.zeros([R, 0], 'int32') as tf.Tensor2D;
  if (k === T) return tf.tidy(() => tf.tile(tf.range(0, T, 1, 'int32').reshape([1, T]), [R, 1]) as tf.Tensor2D);
  if (isWebGpuBackend() && R <= 65535) {
    if (scores.dtype === 'float32') return topKPositionsWgsl(plainScores(scores), R, T, k);
    const f = tf.cast(scores, 'float32');
    try {
      return topKPositionsWgsl(plainScores(f), R, T, k);
    } finally {
      f.dispose();
    }
  }
  return tf.tidy(() => {
    const raw = scores.dtype === 'float32' ? scores : tf.cast(scores, 'float32');
    // NaN ≠ NaN (webgpu has no IsNan kernel): NaN ranks as −∞.
    const s = tf.where(tf.notEqual(raw, raw), tf.fill([R, T], -Infinity), raw);
    // tfjs-cpu's top-k mis-selects around ±∞ (its selection subtracts values), so the k-th value is taken
    // over the scores clamped to the finite range, then corrected where the clamp joined ±∞ to ±max.
    const clamped = tf.clipByValue(s, -FLOAT32_MAX, FLOAT32_MAX);
    const kc = tf.slice(tf.topk(clamped, k).values, [0, k - 1], [R, 1]); // [R, 1]
    const count = (x: tf.Tensor) => tf.sum(tf.cast(x, 'float32'), 1, true);
    const infKth = tf.logicalAnd(tf.greaterEqual(kc, FLOAT32_MAX), tf.greaterEqual(count(tf.equal(s, Infinity)), k));
    const negInfKth = tf.logicalAnd(tf.lessEqual(kc, -FLOAT32_MAX), tf.less(count(tf.greaterEqual(s, -FLOAT32_MAX)), k));
    const kth = tf.where(infKth, tf.fill([R, 1], Infinity), tf.where(negInfKth, tf.fill([R, 1], -Infinity), kc)); // the true k-th value
    const above = tf.greater(s, kth);
    const tie = tf.equal(s, kth);
    const need = tf.sub(tf.scalar(k, 'float32'), tf.sum(tf.cast(above, 'float32'), 1, true)); // [R, 1] ties still to keep
    const tieRank = tf.cumsum(tf.cast(tie, 'float32'), 1); // 1-based rank of each tie, by position
    const keep = tf.logicalOr(above, tf.logicalAnd(tie, tf.lessEqual(tieRank, need)));
    const fromEnd = tf.tile(tf.reshape(tf.range(T, 0, -1, 'float32'), [1, T]), [R, 1]); // T − position
    const key = tf.where(keep, fromEnd, tf.zeros([R, T]));
    return tf.cast(tf.sub(tf.scalar(T, 'float32'), tf.topk(key, k).values), 'int32') as tf.Tensor2D;
  });
}
