import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, MAX_TOKENS, atMost, check, defineStrategy, type KVCache } from '@kvpack/core';
import { z } from 'zod';
import { RaggedKeptCache, adaKvSelect, globalTopKSelect } from '@kvpack/strategy-utils';

/** Options of the `kvzip` strategy. */
export const KvzipOptionsSchema = z.strictObject({
  /** Average prefill tokens kept per KV head and layer (B); the cache keeps L·H_kv·B in all. */
  budget: z.int().positive().max(MAX_TOKENS, { error: atMost(MAX_TOKENS, 'tokens') }).default(256).describe('Average prefill tokens kept per KV head and layer (B); L·H_kv·B tokens in all, split by score.'),
  /** First tokens always kept (attention sinks; KVzip's n_sink). */
  nSink: z.int().nonnegative().max(MAX_TOKENS, { error: atMost(MAX_TOKENS, 'tokens') }).default(4).describe('First tokens always kept (attention sinks).'),
  /** false: one budget over all layers and heads (KVzip's default); true: B·H_kv per layer, over its heads. */
  layerwise: z.boolean().default(false).describe('false: the L·H_kv·B best over all layers and heads (KVzip default); true: B·H_kv per layer over its heads.'),
  /** The instruction the model reads before re-reading its context. */
  prompt: z.string().max(4096).default('Repeat the previous context:').describe('Instruction read before the context in the reconstruction pass.'),
  /** Context tokens per reconstruction chunk. */
  chunkSize: z.int().positive().max(MAX_TOKENS, { error: atMost(MAX_TOKENS, 'tokens') }).default(2048).describe('Context tokens re-read per reconstruction chunk (tokens).'),
});
export type KvzipOptions = z.output<typeof KvzipOptionsSchema>;

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
 * ({@link RaggedKeptCache}). When T ≤ B nothing is evicted.
 *
 * `compress` throws KvpackError('config') without reconstruction scores, KvpackError('shape' |
 * 'layout') when they disagree with the cache, KvpackError('layout' | 'shape' | 'dtype' | 'nonfinite')
 * on a bad cache.
 */
export const kvzipDefinition = defineStrategy({
  name: 'kvzip',
  description: 'KVzip: query-agnostic eviction by context reconstruction, the largest attention each KV pair gets when the model re-reads its context (Kim et al. 2025)',
  schema: KvzipOptionsSchema,
  capabilities: { reconstruction: (o) => ({ prompt: o.prompt, chunkSize: o.chunkSize, nSink: o.nSink }) },
  async compress(cache, o, T) {
    const given = checkScores(cache, T);
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
  restore: (reader, o) => {
    const { layout, prefillLength: T } = reader.header;
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
