import * as tf from '@tensorflow/tfjs-core';
import { applyRope, type CompressedCache, type KVCache } from '@kvpack/core';

/** Host float64 NLLs of targets under logits rows: the decode session's (see @kvpack/models). */
export { tokenNlls } from '@kvpack/models';

/** Mean of an array (NaN when empty). */
export function mean(xs: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < xs.length; i++) s += xs[i];
  return s / xs.length;
}

/** Median of a list (mean of the two middle values for even length; NaN when empty). */
export function median(xs: readonly number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** Index of the largest value of row `row` of a row-major [n, V] array (first one on ties). */
export function argmaxRow(logits: ArrayLike<number>, vocab: number, row: number): number {
  let best = 0;
  let bv = -Infinity;
  for (let j = 0; j < vocab; j++) {
    const v = logits[row * vocab + j];
    if (v > bv) {
      bv = v;
      best = j;
    }
  }
  return best;
}

/** Greedy-decode agreement of a run with the reference tokens. */
export interface Agreement {
  /** Positions with the same token. */
  matches: number;
  /** Positions compared (the reference length). */
  total: number;
  /** matches / total (1 when total is 0). */
  fraction: number;
  /** First index where the tokens differ, or null when they never do. */
  firstDivergence: number | null;
}

/** Compares two greedy token sequences position by position (free-running: each run feeds its own tokens). */
export function greedyAgreement(reference: number[], tokens: number[]): Agreement {
  const total = reference.length;
  let matches = 0;
  let firstDivergence: number | null = null;
  for (let i = 0; i < total; i++) {
    if (tokens[i] === reference[i]) matches++;
    else if (firstDivergence === null) firstDivergence = i;
  }
  return { matches, total, fraction: total ? matches / total : 1, firstDivergence };
}

/** Sums of squares for a relative Frobenius error aggregated as sqrt(Σ num / Σ den). */
export interface ErrorSums {
  /** Σ ‖X − X̂‖²_F */
  num: number;
  /** Σ ‖X‖²_F */
  den: number;
}

/** sqrt(num / den), the aggregated relative Frobenius error. */
export function relativeError(s: ErrorSums): number {
  return Math.sqrt(s.num / s.den);
}

async function sums(x: tf.Tensor, xhat: tf.Tensor): Promise<ErrorSums> {
  const r = tf.tidy(() => tf.stack([tf.sum(tf.square(tf.sub(x, xhat))), tf.sum(tf.square(x))]));
  const [num, den] = await r.data();
  r.dispose();
  return { num, den };
}

/** Reconstruction error sums of one compressed cache, or null when tokens were evicted or merged away. */
export interface ReconstructionSums {
  keys: ErrorSums;
  values: ErrorSums;
  /** Per layer relative errors (keys, values). */
  perLayer: { keys: number; values: number }[];
}

/**
 * Reconstruction error of a freshly compressed cache against the prefill cache it came from:
 * keys **post-RoPE** (`compressed.keys(l)` against `applyRope(original.keys[l])` at the prefill
 * positions) and values, summed over layers. Returns null when any layer holds a different number
 * of tokens than the prefill (eviction strategies: the error over a subset is not comparable).
 * Call it before appending decode tokens.
 */
export async function reconstructionSums(original: KVCache, compressed: CompressedCache): Promise<ReconstructionSums | null> {
  const L = original.layout.nLayers;
  const T = original.keys[0].shape[0];
  for (let l = 0; l < L; l++) if (compressed.tokenCount(l) !== T) return null;
  const keys: ErrorSums = { num: 0, den: 0 };
  const values: ErrorSums = { num: 0, den: 0 };
  const perLayer: { keys: number; values: number }[] = [];
  for (let l = 0; l < L; l++) {
    const kRef = applyRope(original.keys[l], original.rope, { start: original.startPosition ?? 0, count: T });
    const kHat = compressed.keys(l);
    const vHat = compressed.values(l);
    const ks = await sums(kRef, kHat);
    const vs = await sums(original.values[l], vHat);
    tf.dispose([kRef, kHat, vHat]);
    keys.num += ks.num;
    keys.den += ks.den;
    values.num += vs.num;
    values.den += vs.den;
    perLayer.push({ keys: relativeError(ks), values: relativeError(vs) });
  }
  return { keys, values, perLayer };
}
