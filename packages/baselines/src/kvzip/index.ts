import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, MAX_TOKENS, atMost, check, defineStrategy, denseCacheBytes, type KVCache, type ModelLayout } from '@kvpack/core';
import { z } from 'zod';
import {
  RaggedKeptCache,
  adaKvSelect,
  budgetOption,
  budgetOrTarget,
  globalTopKSelect,
  raggedKeptBytes,
  resolveBudgetByTarget,
  resolveBudgetOption,
  restoredBudget,
  targetRatioOption,
} from '@kvpack/strategy-utils';

/** Budget when neither budget nor targetRatio is given. */
const DEFAULT_BUDGET = 256;

/** Options of the `kvzip` strategy. */
export const KvzipOptionsSchema = z
  .strictObject({
    /** Average prefill tokens kept per KV head and layer (B); the cache keeps L·H_kv·B in all. */
    budget: budgetOption('Average prefill tokens kept per KV head and layer (B; default 256; excludes targetRatio); L·H_kv·B tokens in all, split by score.'),
    /**
     * Target ratio (dense fp16 bytes ÷ bytes held, positions and per-head counts included) instead of a
     * budget: the largest B whose measured ratio is ≥ the target at the actual T. Excludes budget;
     * `compressionRatio` (kvpress's fraction removed) is accepted for it.
     */
    targetRatio: targetRatioOption(),
    /** First tokens always kept (attention sinks; KVzip's n_sink). */
    nSink: z.int().nonnegative().max(MAX_TOKENS, { error: atMost(MAX_TOKENS, 'tokens') }).default(4).describe('First tokens always kept (attention sinks).'),
    /** false: one budget over all layers and heads (KVzip's default); true: B·H_kv per layer, over its heads. */
    layerwise: z.boolean().default(false).describe('false: the L·H_kv·B best over all layers and heads (KVzip default); true: B·H_kv per layer over its heads.'),
    /** The instruction the model reads before re-reading its context. */
    prompt: z.string().max(4096).default('Repeat the previous context:').describe('Instruction read before the context in the reconstruction pass.'),
    /** Context tokens per reconstruction chunk. */
    chunkSize: z.int().positive().max(MAX_TOKENS, { error: atMost(MAX_TOKENS, 'tokens') }).default(2048).describe('Context tokens re-read per reconstruction chunk (tokens).'),
  })
  .refine(...budgetOrTarget);
export type KvzipOptions = z.output<typeof KvzipOptionsSchema>;

/**
 * The options with the budget B fixed for a prefill of T tokens: as given (256 by default), or — with
 * a targetRatio ρ — the largest B ≥ 1 whose bytes right after compress,
 * `raggedKeptBytes(layout, L·H_kv·min(T, B))` (the same total in both allocations), times ρ are ≤ the
 * dense fp16 bytes. The result records the budget, not the target.
 * @throws KvpackError('config') when even one token per KV head and layer stays below ρ, naming the reachable range.
 */
export function resolveKvzipOptions(o: KvzipOptions, layout: ModelLayout, T: number): KvzipOptions & { budget: number } {
  const { nLayers: L, nKvHeads: H } = layout;
  return resolveBudgetOption(o, DEFAULT_BUDGET, (target) =>
    resolveBudgetByTarget({
      strategy: 'kvzip',
      target,
      tokens: T,
      denseBytes: denseCacheBytes(layout, T),
      least: 1,
      bytesOf: (B) => raggedKeptBytes(layout, L * H * Math.min(T, B)),
    }),
  );
}

/** Checks the reconstruction scores a runner provided: per layer float32 [T, H_kv]. */
function checkScores(cache: KVCache, T: number): tf.Tensor2D[] {
  const { nLayers: L, nKvHeads: H } = cache.layout;
  const s = cache.reconstructionScores;
  if (!s)
    throw new KvpackError(
      'config',
      'kvzip needs the scores of a context-reconstruction pass (KVCache.reconstructionScores, [T, H_kv] per layer); ' +
        'the runner provides them (withReconstructionScores from @kvpack/models, which runs LlamaModel.reconstructionScores)',
    );
  check(Array.isArray(s) && s.length === L, 'layout', `kvzip: KVCache.reconstructionScores has ${Array.isArray(s) ? s.length : 'no'} layers but the model has ${L}`);
  s.forEach((t, l) =>
    check(
      t instanceof tf.Tensor && t.dtype === 'float32' && t.rank === 2 && t.shape[0] === T && t.shape[1] === H,
      'shape',
      `kvzip: KVCache.reconstructionScores layer ${l} must be float32 [T=${T}, H_kv=${H}], got ${t instanceof tf.Tensor ? `${t.dtype} [${t.shape}]` : typeof t}`,
    ),
  );
  return s;
}

/**
 * The `kvzip` strategy (Kim et al. 2025, "KVzip: Query-Agnostic KV Cache Compression with Context
 * Reconstruction", arXiv 2505.23416; as NVIDIA kvpress's `KVzipPress`): query-agnostic eviction by
 * how much each KV pair serves the model when it re-reads its own context. The runner runs the
 * reconstruction pass the capability `reconstruction` asks for (prompt, then the context again,
 * through the prefilled cache; `LlamaModel.reconstructionScores`) and hands its attention maxima
 * [T, H_kv] per layer to `compress` (`KVCache.reconstructionScores`). The first `nSink` tokens are
 * always kept; of the rest, the L·H_kv·B highest scores over all layers and heads (or, `layerwise`,
 * B·H_kv per layer over its heads) — so heads and layers keep different counts, stored ragged
 * ({@link RaggedKeptCache}). When T ≤ B nothing is evicted. A `targetRatio` resolves B per T
 * ({@link resolveKvzipOptions}).
 *
 * `compress` throws KvpackError('config') without reconstruction scores or when a target ratio is out of reach, KvpackError('shape' |
 * 'layout') when they disagree with the cache, KvpackError('layout' | 'shape' | 'dtype' | 'nonfinite')
 * on a bad cache.
 */
export const kvzipDefinition = defineStrategy({
  name: 'kvzip',
  description: 'KVzip: query-agnostic eviction by context reconstruction, the largest attention each KV pair gets when the model re-reads its context (Kim et al. 2025)',
  schema: KvzipOptionsSchema,
  capabilities: {
    reconstruction: (o) => ({ prompt: o.prompt, chunkSize: o.chunkSize, nSink: o.nSink }),
    ratioTarget: (o) => (o.targetRatio === undefined ? null : { target: o.targetRatio, knob: 'budget' }),
  },
  async compress(cache, options, T) {
    const given = checkScores(cache, T);
    const o = resolveKvzipOptions(options, cache.layout, T);
    const B = Math.min(T, o.budget);
    let picked: tf.Tensor1D[] | null = null;
    if (T > o.budget) {
      // [H_kv, T] per layer, the sinks at +∞.
      const scores = given.map((s) =>
        tf.tidy(() => {
          const t = tf.transpose(s) as tf.Tensor2D;
          const sink = Math.min(o.nSink, T);
          if (sink === 0) return t;
          const isSink = tf.less(tf.range(0, T, 1, 'int32'), tf.scalar(sink, 'int32'));
          return tf.where(tf.reshape(isSink, [1, T]), tf.fill(t.shape, Infinity), t) as tf.Tensor2D;
        }),
      );
      try {
        picked = o.layerwise ? scores.map((s) => adaKvSelect(s, B, 0)) : await globalTopKSelect(scores, B);
      } finally {
        tf.dispose(scores);
      }
    }
    try {
      return await RaggedKeptCache.fromSelection('kvzip', o, cache, T, (l) => {
        if (!picked) return null;
        const p = picked[l];
        picked[l] = null as unknown as tf.Tensor1D; // handed over
        return p;
      });
    } finally {
      if (picked) tf.dispose(picked.filter((p) => p && !p.isDisposed));
    }
  },
  restore: (reader, options) => {
    const { layout, prefillLength: T } = reader.header;
    const o = restoredBudget('kvzip', T, () => resolveKvzipOptions(options, layout, T));
    const H = layout.nKvHeads;
    const B = Math.min(T, o.budget);
    const c = RaggedKeptCache.restore(reader, 'kvzip', o, o.layerwise ? () => H * B : undefined);
    let total = 0;
    for (let l = 0; l < layout.nLayers; l++) total += c.headCounts(l).reduce((a, b) => a + b, 0);
    if (total !== layout.nLayers * H * B) {
      c.dispose();
      throw new KvpackError('corrupt', `serialized kvzip cache is corrupt: it keeps ${total} tokens, its options imply ${layout.nLayers * H * B}`);
    }
    return c;
  },
});
