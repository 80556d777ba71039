import * as tf from '@tensorflow/tfjs-core';
import { HalfTensor, check } from '@kvpack/core';
import { concatWords, lastWords } from './words.js';

/*
 * Row operations on float16 tensors in their packed form (two values per int32 word, see
 * HalfTensor), on the backend without a host round trip: where the rows meet on a word boundary the
 * packed words are sliced or joined as they are; otherwise the rows are unpacked and packed again.
 */

/** Values per row of a float16 tensor [rows, …]. */
function rowSize(h: { shape: number[] }): number {
  return h.shape.slice(1).reduce((a, b) => a * b, 1);
}

/**
 * The rows of `a` then those of `b` (shapes [ra, …] and [rb, …] with the same trailing dimensions), a
 * new float16 tensor; neither input is disposed.
 * @throws KvpackError('shape') when the trailing dimensions differ.
 */
export function concatHalfRows(a: HalfTensor, b: HalfTensor): HalfTensor {
  check(a.shape.length === b.shape.length && a.shape.slice(1).every((s, i) => s === b.shape[i + 1]), 'shape', `float16 rows [${a.shape}] and [${b.shape}] cannot be joined`);
  check(!a.isDisposed && !b.isDisposed, 'disposed', 'float16 tensor was disposed');
  const shape = [a.shape[0] + b.shape[0], ...a.shape.slice(1)];
  if (a.size % 2 === 0) return HalfTensor.fromPacked(concatWords(a.packed, b.packed), shape);
  const joined = tf.tidy(() => tf.concat([tf.reshape(a.unpack(), [-1]), tf.reshape(b.unpack(), [-1])]));
  try {
    return HalfTensor.fromPacked(HalfTensor.fromTensorSync(joined).packed, shape);
  } finally {
    joined.dispose();
  }
}

/**
 * A float16 tensor [rows, …] without its first `drop` rows, a new float16 tensor (the input is not
 * disposed).
 * @throws KvpackError('shape') when `drop` is outside [0, rows].
 */
export function dropHalfRows(h: HalfTensor, drop: number): HalfTensor {
  check(Number.isInteger(drop) && drop >= 0 && drop <= h.shape[0], 'shape', `cannot drop ${drop} of ${h.shape[0]} float16 rows`);
  check(!h.isDisposed, 'disposed', 'float16 tensor was disposed');
  const from = drop * rowSize(h);
  const n = h.size - from;
  const shape = [h.shape[0] - drop, ...h.shape.slice(1)];
  // Whole words from an even start (an odd tail keeps its zero padding half).
  if (from % 2 === 0) return HalfTensor.fromPacked(lastWords(h.packed, Math.ceil(n / 2)), shape);
  const part = tf.tidy(() => tf.slice(tf.reshape(h.unpack(), [-1]), [from], [n]));
  try {
    return HalfTensor.fromPacked(HalfTensor.fromTensorSync(part).packed, shape);
  } finally {
    part.dispose();
  }
}
