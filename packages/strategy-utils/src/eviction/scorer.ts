import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, check, defineStrategy, denseCacheBytes, type KVCache, type MlaKVCache, type ModelLayout, type StrategyCapabilities, type StrategyDefinition, type TokenSelector } from '@kvpack/core';
import { MlaKeptTokensCache } from './mla-kept-tokens.js';
import type { z } from 'zod';
import { KeptTokensCache } from './kept-tokens.js';
import { restoredBudget } from '../ratio/budget-options.js';
import { topKPositions } from './top-k.js';

export { topKPositions } from './top-k.js';

/** What the eviction layer hands a scorer for one layer: the keys it rotates anyway for the gather. */
export interface ScoreContext {
  /** Post-RoPE keys of the layer [T, H_kv, d] (rotated once at startPosition + i; owned by the caller, do not dispose). */
  postKeys: tf.Tensor3D;
}

/**
 * A token-eviction method as a score function, in the manner of NVIDIA/kvpress's `ScorerPress`: the
 * shared eviction cache keeps, per layer and KV head, the `budget` prefill tokens with the highest
 * scores (ties to the lower position), in ascending position order, with their keys rotated at their
 * original positions. When T ≤ budget nothing is evicted.
 */
export interface TokenScorer<O> {
  /** Prefill tokens kept per KV head and layer, when the options set it (not a target ratio). */
  budget(options: O): number;
  /**
   * The target ratio (dense fp16 bytes ÷ bytes held) the options ask for instead of a budget, or
   * undefined; the budget is then resolved per T ({@link evictionBudget}).
   */
  targetRatio?(options: O): number | undefined;
  /** The smallest budget these options allow (e.g. SnapKV's window + 1); default 1. */
  minBudget?(options: O): number;
  /**
   * Scores of one layer's prefill tokens, [H_kv, T]: higher is kept; +Infinity is always kept (a
   * window that must stay). Either a float32 tensor on the backend (handed over: the eviction layer
   * disposes it; the selection then runs there with no readback) or host values, row-major. Called
   * only when T > budget; required unless `impliedPositions` is given.
   */
  score?(cache: KVCache, layer: number, options: O, context: ScoreContext): Promise<ArrayLike<number> | tf.Tensor> | ArrayLike<number> | tf.Tensor;
  /** Checks what `score` needs (queries, layout) before any layer is scored. @throws KvpackError */
  check?(cache: KVCache, options: O): void;
  /**
   * The kept positions [n] (the same for every KV head) when they depend only on T and the options,
   * not on the cache's values: then they are not stored, which saves their bytes. `score` is not called.
   */
  impliedPositions?(T: number, options: O, budget: number): Int32Array;
  /**
   * Scores of one layer's prefill tokens on an MLA latent cache, [T] (host) or [1, T] / [T] (backend,
   * handed over): one set for the layer, the latent being shared by every head. `postRopeKeys` [T, d_R]
   * are the layer's rotated shared keys (owned by the caller). Called only when T > budget. Without it
   * (and without `impliedPositions`) the strategy refuses MLA caches.
   */
  mlaScore?(cache: MlaKVCache, layer: number, options: O, postRopeKeys: tf.Tensor2D): Promise<ArrayLike<number> | tf.Tensor> | ArrayLike<number> | tf.Tensor;
  /** Checks what `mlaScore` needs before any layer is scored. @throws KvpackError */
  mlaCheck?(cache: MlaKVCache, options: O): void;
}

/**
 * Bytes a {@link KeptTokensCache} holds right after compress when it keeps n tokens per KV head and
 * layer: float16 keys and values, L · n · H_kv · d · 2 · 2, plus the stored positions, L · n · H_kv · 4
 * (int32), unless they are implied.
 */
export function keptTokensBytes(layout: ModelLayout, n: number, storedPositions: boolean): number {
  const { nLayers: L, nKvHeads: H, headDim: d } = layout;
  return L * n * H * (4 * d + (storedPositions ? 4 : 0));
}

/**
 * The budget of a token scorer at T tokens. With a target ratio ρ: the largest n ≤ T with
 * `denseCacheBytes(layout, T) / keptTokensBytes(layout, n, stored) ≥ ρ` (so the measured ratio right
 * after compress is ≥ ρ); else the options' budget.
 * @throws KvpackError('config') when even the smallest budget the options allow (`minBudget`) stays
 *   below ρ, naming the reachable range.
 */
export function evictionBudget<O>(name: string, scorer: TokenScorer<O>, options: O, layout: ModelLayout, T: number): number {
  const rho = scorer.targetRatio?.(options);
  if (rho === undefined) return scorer.budget(options);
  const stored = !scorer.impliedPositions;
  const dense = denseCacheBytes(layout, T);
  const least = Math.max(1, scorer.minBudget?.(options) ?? 1);
  let n = Math.min(T, Math.floor(dense / (rho * keptTokensBytes(layout, 1, stored))));
  while (n > 0 && keptTokensBytes(layout, n, stored) * rho > dense) n--;
  if (n < least) {
    const best = dense / keptTokensBytes(layout, Math.min(least, T), stored);
    const worst = dense / keptTokensBytes(layout, T, stored);
    throw new KvpackError(
      'config',
      `${name}: targetRatio ${rho} (compressionRatio ${(1 - 1 / rho).toFixed(4)}) is out of reach at T=${T}: ` +
        `the fewest tokens these options keep (${least} per KV head and layer) give ${best.toFixed(3)}×; reachable: ${Math.min(worst, best).toFixed(3)}× to ${best.toFixed(3)}×`,
    );
  }
  return n;
}

/**
 * Per KV head, the `k` highest scores of [H, T] row-major scores (ties to the lower position; a NaN
 * score ranks lowest, as −∞), in ascending position order. Returns [k, H] row-major positions.
 * @throws KvpackError('shape') when `scores` does not hold H·T values.
 */
export function keepTopScores(scores: ArrayLike<number>, H: number, T: number, k: number): Int32Array {
  check(scores.length === H * T, 'shape', `token scores: ${scores.length} values, expected [H_kv = ${H}, T = ${T}] = ${H * T}`);
  const out = new Int32Array(k * H);
  const order = new Int32Array(T);
  for (let h = 0; h < H; h++) {
    for (let i = 0; i < T; i++) order[i] = i;
    const s = (i: number) => (Number.isNaN(scores[h * T + i]) ? -Infinity : scores[h * T + i]);
    const top = Array.from(order)
      .sort((a, b) => s(b) - s(a) || a - b) // ∞ − ∞ (NaN) and equal scores fall through to the position
      .slice(0, k)
      .sort((a, b) => a - b);
    for (let j = 0; j < k; j++) out[j * H + h] = top[j];
  }
  return out;
}

/** `p` [n] repeated for each of H KV heads: [n, H] row-major. */
export function repeatPerHead(p: Int32Array, H: number): Int32Array {
  const out = new Int32Array(p.length * H);
  for (let j = 0; j < p.length; j++) out.fill(p[j], j * H, (j + 1) * H);
  return out;
}

/**
 * Kept positions of a scorer's scores: for a tensor [H_kv, T] (disposed here), int32 [H_kv, k] on the
 * backend ({@link topKPositions}); for host values [H_kv, T] row-major, [k, H_kv] row-major on the
 * host ({@link keepTopScores}, the same rule in float64). @throws KvpackError('shape') when the
 * scores are not [H_kv, T].
 */
function scoresTopK(scores: ArrayLike<number> | tf.Tensor, H: number, T: number, k: number): tf.Tensor2D | Int32Array {
  if (!(scores instanceof tf.Tensor)) return keepTopScores(scores, H, T, k);
  try {
    check(scores.rank === 2 && scores.shape[0] === H && scores.shape[1] === T, 'shape', `token scores: shape [${scores.shape}], expected [H_kv = ${H}, T = ${T}]`);
    return topKPositions(scores as tf.Tensor2D, k);
  } finally {
    scores.dispose();
  }
}

/** Host values of handed-over scores (disposed here). */
async function readScores(s: tf.Tensor): Promise<Float32Array> {
  try {
    return Float32Array.from((await s.data()) as Float32Array);
  } finally {
    s.dispose();
  }
}

/** A token-eviction strategy: its name, options schema and scorer (see {@link defineEvictionStrategy}). */
export interface EvictionStrategySpec<S extends z.ZodType> {
  name: string;
  /** One line for `kvpack strategies`, with the method's source. */
  description: string;
  /** Options schema with defaults (z.strictObject). */
  schema: S;
  scorer: TokenScorer<z.output<S>>;
  capabilities?: StrategyCapabilities<z.output<S>>;
}

/**
 * Defines and registers a token-eviction strategy from its scorer: `compress` scores each layer and
 * keeps the top `budget` tokens per KV head in a {@link KeptTokensCache} (positions stored as int32
 * [n, H_kv] unless the scorer implies them); deserialization restores it. `compress` throws
 * KvpackError('layout' | 'shape' | 'dtype' | 'nonfinite') on a bad cache, and whatever the scorer's
 * `check` throws.
 */
export function defineEvictionStrategy<S extends z.ZodType>(spec: EvictionStrategySpec<S>): StrategyDefinition<S> {
  const { name, scorer } = spec;
  check(scorer.score || scorer.impliedPositions, 'config', `${name}: a token scorer needs score() or impliedPositions()`);
  const selector = (options: z.output<S>): TokenSelector => ({
    kept: (layout, T) => Math.min(T, evictionBudget(name, scorer, options, layout, T)),
    ...(scorer.impliedPositions ? { impliedPositions: (T: number, n: number) => scorer.impliedPositions!(T, options, n) } : {}),
    check: scorer.check ? (cache) => scorer.check!(cache, options) : undefined,
    async select(cache, l, postKeys, T, n) {
      const H = cache.layout.nKvHeads;
      if (scorer.impliedPositions) {
        const p = repeatPerHead(scorer.impliedPositions(T, options, n), H);
        check(p.length === n * H && p.every((t) => t >= 0 && t < T), 'shape', `${name}: impliedPositions must give ${n} positions in [0, ${T}), got ${p.length / H}`);
        return p;
      }
      if (T <= n) return null;
      return scoresTopK(await scorer.score!(cache, l, options, { postKeys }), H, T, n);
    },
  });
  const implied = (options: z.output<S>, n: number) =>
    scorer.impliedPositions ? (T: number, H: number) => repeatPerHead(scorer.impliedPositions!(T, options, n), H) : undefined;
  const mla: StrategyCapabilities<z.output<S>>['mla'] =
    scorer.impliedPositions || scorer.mlaScore
      ? (options) => ({
          compress: (cache, T) => {
            scorer.mlaCheck?.(cache, options);
            check(scorer.targetRatio?.(options) === undefined, 'unsupported', `${name}: a target ratio is not resolved on MLA latent caches; give the budget`);
            const budget = scorer.budget(options);
            const fixed = scorer.impliedPositions;
            return MlaKeptTokensCache.fromSelection(name, options, cache, T, !fixed, async (l, post) => {
              if (fixed) {
                const p = fixed(T, options, Math.min(T, budget));
                check(p.length === Math.min(T, budget) && p.every((t) => t >= 0 && t < T), 'shape', `${name}: impliedPositions must give ${Math.min(T, budget)} positions in [0, ${T}), got ${p.length}`);
                return p;
              }
              if (T <= budget) return null;
              const s = await scorer.mlaScore!(cache, l, options, post);
              const host = s instanceof tf.Tensor ? await readScores(s) : s;
              return keepTopScores(host, 1, T, budget);
            });
          },
          restore: (reader) => {
            const p = scorer.impliedPositions;
            const c = MlaKeptTokensCache.restore(reader, name, options, p ? (T) => p(T, options, Math.min(T, scorer.budget(options))) : undefined);
            const T = reader.header.prefillLength;
            const n = Math.min(T, scorer.budget(options));
            for (let l = 0; l < c.layout.nLayers; l++)
              check(c.tokenCount(l) === n, 'corrupt', `serialized ${name} MLA cache is corrupt: layer ${l} keeps ${c.tokenCount(l)} tokens, but T = ${T} at budget ${scorer.budget(options)} keeps ${n}`);
            return c;
          },
        })
      : undefined;
  return defineStrategy({
    name,
    description: spec.description,
    schema: spec.schema,
    capabilities: {
      ...spec.capabilities,
      tokenSelector: selector,
      ...(mla ? { mla } : {}),
      ...(scorer.targetRatio
        ? { ratioTarget: (o: z.output<S>) => (scorer.targetRatio!(o) === undefined ? null : { target: scorer.targetRatio!(o)!, knob: 'budget' }) }
        : {}),
    },
    async compress(cache, options, T) {
      const sel = selector(options);
      sel.check?.(cache);
      const n = sel.kept(cache.layout, T);
      return KeptTokensCache.fromSelection(name, options, cache, T, !sel.impliedPositions, (l, postKeys) => sel.select(cache, l, postKeys, T, n));
    },
    restore: (reader, options) => {
      const T = reader.header.prefillLength;
      const n = restoredBudget(name, T, () => selector(options).kept(reader.header.layout, T));
      const cache = KeptTokensCache.restore(reader, name, options, implied(options, n));
      for (let l = 0; l < cache.layout.nLayers; l++)
        check(cache.tokenCount(l) === n, 'corrupt', `serialized ${name} cache is corrupt: layer ${l} keeps ${cache.tokenCount(l)} tokens, but T = ${T} at these options keeps ${n}`);
      return cache;
    },
  });
}
