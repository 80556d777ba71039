// Test support (not exported): a tally of loader fuzz trials. Each trial must end in a result or a
// KvpackError, never another error type, and leave tfjs's live tensor count where it was.
import * as tf from '@tensorflow/tfjs-core';
import { KvpackError } from '@kvpack/core';
import type { LlamaWeights } from './types.js';
import { disposeLlamaWeights } from './hf/weights.js';

export class FuzzTally {
  trials = 0;
  loaded = 0;
  named = 0;
  other = 0;
  leaks = 0;
  /** Hostile cases that aborted V8 (out of memory) before the loaders were hardened; run here by name. */
  hostile = 0;
  slowestMs = 0;
  readonly codes = new Map<string, number>();
  readonly otherErrors: string[] = [];

  constructor(readonly loader: string) {}

  /**
   * Runs one trial: `run` loads something; `release` frees a successful result. Returns the error
   * thrown (KvpackError or other), or null on success. Counts leaks (tensors alive after the trial
   * that were not alive before it) for successful and failed loads alike.
   */
  async trial<T>(run: () => Promise<T> | T, release: (r: T) => void = () => {}, opts: { hostile?: boolean } = {}): Promise<unknown> {
    this.trials++;
    if (opts.hostile) this.hostile++;
    const before = tf.memory().numTensors;
    const t0 = performance.now();
    let err: unknown = null;
    try {
      release(await run());
      this.loaded++;
    } catch (e) {
      err = e;
      if (e instanceof KvpackError) {
        this.named++;
        this.codes.set(e.code, (this.codes.get(e.code) ?? 0) + 1);
      } else {
        this.other++;
        if (this.otherErrors.length < 5) this.otherErrors.push(`${(e as Error)?.name}: ${(e as Error)?.message}`);
      }
    }
    this.slowestMs = Math.max(this.slowestMs, performance.now() - t0);
    const after = tf.memory().numTensors;
    if (after !== before) this.leaks++;
    return err;
  }

  /** One line of figures, printed by the tests. */
  line(): string {
    const codes = [...this.codes].sort((a, b) => b[1] - a[1]).map(([c, n]) => `${c} ${n}`).join(', ');
    return (
      `fuzz ${this.loader}: ${this.trials} trials, ${this.loaded} loaded, ${this.named} named errors (KvpackError: ${codes || 'none'}), ` +
      `${this.other} other errors, ${this.leaks} leaks; the process survived all ${this.trials} trials, ${this.hostile} of them size-field flips that claim more than the file holds (no abort); slowest trial ${this.slowestMs.toFixed(0)} ms`
    );
  }
}

/** Frees weights a successful trial loaded. */
export const releaseWeights = (w: LlamaWeights): void => disposeLlamaWeights(w);

/** Bit positions of a non-negative integer field of `width` bits that, flipped, make its value larger. */
export function growingBits(value: number | bigint, width: number): number[] {
  const v = BigInt(value);
  const out: number[] = [];
  for (let b = 0; b < width; b++) if (((v >> BigInt(b)) & 1n) === 0n) out.push(b);
  return out;
}
