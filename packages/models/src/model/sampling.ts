import { check, mulberry32 } from '@kvpack/core';

/** Token sampling settings. */
export interface SamplingOptions {
  /** Softmax temperature; 0 (default) = greedy argmax. */
  temperature?: number;
  /** Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches topP. Default 1 (off). */
  topP?: number;
  /** Seed of the PRNG; the same seed gives the same tokens. Default 0. */
  seed?: number;
}

export { mulberry32 } from '@kvpack/core';

/** Index of the largest value (the first one on ties). */
export function argmax(x: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;
  return best;
}

/** Gap between the largest and second-largest value (0 for fewer than two values). */
export function top2Margin(x: ArrayLike<number>): number {
  let a = -Infinity;
  let b = -Infinity;
  for (let i = 0; i < x.length; i++) {
    const v = x[i];
    if (v > a) {
      b = a;
      a = v;
    } else if (v > b) b = v;
  }
  return Number.isFinite(b) ? a - b : 0;
}

/**
 * A sampler over one row of logits [V]: greedy argmax at temperature 0, otherwise softmax(logits /
 * temperature) in float64, optionally restricted to the top-p nucleus (as run.c `sample_topp`,
 * without its cutoff shortcut), sampled with a seeded {@link mulberry32}.
 * @throws KvpackError('config') for a negative or non-finite temperature or topP outside (0, 1].
 */
export function createSampler(options: SamplingOptions = {}): (logits: ArrayLike<number>) => number {
  const temperature = options.temperature ?? 0;
  const topP = options.topP ?? 1;
  check(Number.isFinite(temperature) && temperature >= 0, 'config', `sampling temperature must be a finite number ≥ 0, got ${temperature}`);
  check(Number.isFinite(topP) && topP > 0 && topP <= 1, 'config', `sampling topP must be in (0, 1], got ${topP}`);
  if (temperature === 0) return argmax;
  const rng = mulberry32(options.seed ?? 0);
  return (logits) => {
    const V = logits.length;
    const max = logits[argmax(logits)];
    const p = new Float64Array(V);
    let sum = 0;
    for (let i = 0; i < V; i++) sum += p[i] = Math.exp((logits[i] - max) / temperature);
    const r = rng();
    if (topP >= 1) {
      let c = 0;
      for (let i = 0; i < V; i++) {
        c += p[i] / sum;
        if (r < c) return i;
      }
      return V - 1;
    }
    const order = Array.from({ length: V }, (_, i) => i).sort((a, b) => p[b] - p[a] || a - b);
    let kept = 0;
    let mass = 0;
    while (kept < V && mass / sum < topP) mass += p[order[kept++]];
    let c = 0;
    for (let k = 0; k < kept; k++) {
      c += p[order[k]] / mass;
      if (r < c) return order[k];
    }
    return order[kept - 1];
  };
}
