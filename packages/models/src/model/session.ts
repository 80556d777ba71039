import type * as tf from '@tensorflow/tfjs-core';
import { check, type CompressedCache } from '@kvpack/core';
import { argmax, createSampler, top2Margin, type SamplingOptions } from './sampling.js';

/**
 * What a decode session drives: decode steps over a (compressed) cache. `LlamaModel` satisfies it,
 * and so does any model that appends the new tokens' keys and values to the cache and returns their
 * logits [n, V].
 */
export interface DecodeModel {
  readonly config: { readonly vocabSize: number; readonly maxSeqLen: number };
  /** Decodes `ids` at positions position … position + n − 1 over `cache`, appending to it. @returns logits [n, V] */
  decode(ids: number[], cache: CompressedCache, position: number): Promise<tf.Tensor2D> | tf.Tensor2D;
}

/** Logits of one decode step, read back to the host. */
export interface StepLogits {
  /** Row-major [rows, vocab]; row i predicts the token after the step's ids[i]. */
  data: Float32Array;
  vocab: number;
  rows: number;
}

/** Options of {@link DecodeSession.sample} / {@link DecodeSession.greedy}. */
export interface SessionGenerateOptions {
  /** Ids that end generation (the stop id is included in the result). */
  stopIds?: Iterable<number>;
}

/** Tokens a session generated. */
export interface SessionGeneration {
  ids: number[];
  /** Top-2 logit gap of the row each token was chosen from (same length as `ids`). */
  margins: number[];
  /** Why generation ended: the token budget, a stop id, or the model's context (the next position would pass maxSeqLen). */
  stopReason: 'maxNewTokens' | 'stopId' | 'maxSeqLen';
}

/** Teacher-forced score of a continuation. */
export interface TeacherForcedScore {
  /** −log p(continuation[i] | everything before it), nats, float64 on the host. */
  tokenNll: Float64Array;
  /** Mean of `tokenNll`, nats per token. */
  meanNll: number;
  /** Argmax of the logits row that predicted each continuation token. */
  argmax: number[];
}

/**
 * Negative log-likelihoods (nats) of `targets` under logits rows, computed in float64 on the host:
 * nll_i = logsumexp(logits[i]) − logits[i, targets[i]].
 * @param logits row-major [n, V]
 * @throws KvpackError('shape') when the row count differs from the number of targets or an id is out of range.
 */
export function tokenNlls(logits: ArrayLike<number>, vocab: number, targets: readonly number[]): Float64Array {
  const n = targets.length;
  check(logits.length === n * vocab, 'shape', `tokenNlls: ${logits.length} logits for ${n} targets × vocab ${vocab}`);
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const t = targets[i];
    check(Number.isInteger(t) && t >= 0 && t < vocab, 'shape', `tokenNlls: target id ${t} is outside the vocabulary [0, ${vocab})`);
    let m = -Infinity;
    for (let j = 0; j < vocab; j++) m = Math.max(m, logits[i * vocab + j]);
    let s = 0;
    for (let j = 0; j < vocab; j++) s += Math.exp(logits[i * vocab + j] - m);
    out[i] = m + Math.log(s) - logits[i * vocab + t];
  }
  return out;
}

/**
 * One decode over a model and a compressed cache: it tracks the position of the next token and the
 * logits row that predicts it, so that greedy or sampled generation and teacher-forced scoring are
 * written once. The session appends to the cache but does not own it (the caller disposes it).
 */
export class DecodeSession {
  private pos: number;
  private next: Float32Array | undefined;

  /**
   * @param position position of the next token fed (the tokens already in the cache, evicted ones included)
   * @param nextLogits the logits row [V] that predicts the token at `position` (e.g. the prefill's last
   *   row), when known; otherwise the first call must feed a token ({@link step}, or `first` of
   *   {@link teacherForcedNll}).
   */
  constructor(
    readonly model: DecodeModel,
    readonly cache: CompressedCache,
    position: number,
    nextLogits?: ArrayLike<number>,
  ) {
    check(Number.isInteger(position) && position >= 0, 'shape', `decode session: position ${position} must be an integer ≥ 0`);
    this.pos = position;
    this.next = nextLogits ? Float32Array.from(nextLogits) : undefined;
  }

  /** Position of the next token fed. */
  get position(): number {
    return this.pos;
  }

  /** The logits row that predicts the token at {@link position}, when known. */
  get nextLogits(): Float32Array | undefined {
    return this.next;
  }

  /** Feeds `ids` at the current position (one decode call, causal among them) and reads their logits back. */
  async step(ids: number[]): Promise<StepLogits> {
    const t = await this.model.decode(ids, this.cache, this.pos);
    let data: Float32Array;
    try {
      data = (await t.data()) as Float32Array;
    } finally {
      t.dispose();
    }
    const vocab = t.shape[1];
    const rows = t.shape[0];
    this.pos += ids.length;
    this.next = data.slice((rows - 1) * vocab);
    return { data, vocab, rows };
  }

  /**
   * Generates up to `n` tokens with `sampling` (greedy at temperature 0; seeded otherwise): each
   * token is chosen from the pending logits row, then fed (except the last). Stops at a stop id, or
   * when the next token's position would pass the model's maxSeqLen.
   * @throws KvpackError('config') when no logits row is pending or n is not an integer ≥ 0.
   */
  async sample(n: number, sampling: SamplingOptions = {}, options: SessionGenerateOptions = {}): Promise<SessionGeneration> {
    check(Number.isInteger(n) && n >= 0, 'config', `decode session: the token count must be an integer ≥ 0, got ${n}`);
    const pick = createSampler(sampling);
    const stops = new Set(options.stopIds ?? []);
    const ids: number[] = [];
    const margins: number[] = [];
    for (let i = 0; i < n; i++) {
      check(this.next, 'config', 'decode session: no pending logits; feed a token first (step)');
      margins.push(top2Margin(this.next));
      const tok = pick(this.next);
      ids.push(tok);
      if (stops.has(tok)) return { ids, margins, stopReason: 'stopId' };
      if (i === n - 1) break;
      if (this.pos >= this.model.config.maxSeqLen) return { ids, margins, stopReason: 'maxSeqLen' };
      await this.step([tok]);
    }
    return { ids, margins, stopReason: 'maxNewTokens' };
  }

  /** Greedy (argmax) generation of up to `n` tokens; see {@link sample}. */
  greedy(n: number, options: SessionGenerateOptions = {}): Promise<SessionGeneration> {
    return this.sample(n, {}, options);
  }

  /**
   * Scores `continuation` teacher-forced, in one decode call. With `first` (the token before the
   * continuation, not yet fed), [first, continuation[0..m−2]] are decoded and every row is scored;
   * without it, the pending logits row predicts continuation[0] and continuation[0..m−2] are decoded.
   * NLLs are float64 on the host ({@link tokenNlls}).
   * @throws KvpackError('shape') for an empty continuation; KvpackError('config') when neither `first`
   *   nor a pending row is there.
   */
  async teacherForcedNll(continuation: readonly number[], options: { first?: number } = {}): Promise<TeacherForcedScore> {
    const m = continuation.length;
    check(m >= 1, 'shape', 'decode session: the continuation is empty');
    const tokenNll = new Float64Array(m);
    const best: number[] = [];
    let fed: number[];
    let offset = 0;
    if (options.first !== undefined) fed = [options.first, ...continuation.slice(0, -1)];
    else {
      const row = this.next;
      check(row, 'config', 'decode session: no pending logits to predict the first continuation token; pass `first`');
      tokenNll.set(tokenNlls(row, row.length, [continuation[0]]), 0);
      best.push(argmax(row));
      fed = continuation.slice(0, -1);
      offset = 1;
    }
    if (fed.length > 0) {
      const { data, vocab, rows } = await this.step(fed);
      tokenNll.set(tokenNlls(data, vocab, continuation.slice(offset)), offset);
      for (let i = 0; i < rows; i++) best.push(argmax(data.subarray(i * vocab, (i + 1) * vocab)));
    }
    return { tokenNll, meanNll: tokenNll.reduce((a, b) => a + b, 0) / m, argmax: best };
  }
}
