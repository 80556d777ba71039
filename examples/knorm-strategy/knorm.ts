/**
 * A complete kvpack strategy in one page: KNorm (Devoto et al. 2024, "A Simple and Effective L2
 * Norm-Based Strategy for KV Cache Compression"; NVIDIA/kvpress's KnormPress) keeps, per layer and KV
 * head, the `budget` prefill tokens whose keys have the lowest L2 norm. As a token scorer it is a
 * score function; the shared eviction cache does the rest (gather, storage, serialization, decode).
 */
import * as tf from '@tensorflow/tfjs-core';
import { MAX_TOKENS, type KVCache } from '@kvpack/core';
import { defineEvictionStrategy } from '@kvpack/strategy-utils';
import { z } from 'zod';

/** Options of the `knorm` strategy. */
export const KnormOptionsSchema = z.strictObject({
  /** Prefill tokens kept per KV head and layer (at most 2^20). */
  budget: z.int().positive().max(MAX_TOKENS).default(256),
});
export type KnormOptions = z.output<typeof KnormOptionsSchema>;

/**
 * Scores of one layer's tokens, [H_kv, T] row-major: minus each key's L2 norm over head_dim, so the
 * lowest norms score highest. Pre-RoPE keys [T, H_kv, d] give the same norms as rotated ones.
 */
export async function knormScores(cache: KVCache, layer: number): Promise<Float32Array> {
  const scores = tf.tidy(() => tf.neg(tf.transpose(tf.norm(cache.keys[layer], 'euclidean', 2))));
  const out = (await scores.data()) as Float32Array;
  scores.dispose();
  return out;
}

defineEvictionStrategy({
  name: 'knorm',
  description: 'KNorm: keep the keys with the lowest L2 norm (Devoto et al. 2024; kvpress KnormPress)',
  schema: KnormOptionsSchema,
  scorer: { budget: (o) => o.budget, score: knormScores },
});
