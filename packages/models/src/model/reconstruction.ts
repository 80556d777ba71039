import * as tf from '@tensorflow/tfjs-core';
import { applyRope, attention, causalTailMask, check, getStrategyDefinition, type KVCache, type ReconstructionRequest, type Strategy } from '@kvpack/core';
import type { LlamaWeights } from '../types.js';
import { embed, finishLayer, projectQkv, rmsNorm } from './blocks.js';

/** Tokens of the chunk before that a later reconstruction chunk repeats first (as KVzip's reference code). */
export const RECONSTRUCTION_OVERLAP = 8;

/**
 * KVzip's context-reconstruction scores (Kim et al. 2025, "KVzip: Query-Agnostic KV Cache
 * Compression with Context Reconstruction", arXiv 2505.23416, §3.2; as NVIDIA kvpress's
 * `KVzipPress.score_kvzip`): the context is cut in chunks of `chunkSize` tokens; for each chunk
 * [s, e) the model reads R = prompt ++ (for s > 0, the last 8 tokens before s) ++ context[s, e) at
 * positions start + T … through the prefilled cache (every layer attends over the whole context and
 * causally over R, exactly as decoding would), and at each layer the softmax attention of R's
 * queries over the keys [first min(nSink, s) tokens, the chunk, R] (causal among R) is read on the
 * chunk's keys; a KV pair's score is its largest weight over R's tokens and the query heads of its
 * GQA group. Runs on the backend in float32.
 * @param weights the model's weights (its layers, norms, RoPE)
 * @param cache the context's prefill cache (pre-RoPE keys and values [T, H_kv, d] per layer)
 * @returns per layer the scores [T, H_kv], float32, owned by the caller
 * @throws KvpackError('shape') when the cache's layer count or T disagree with the ids, or R runs past max_seq_len
 */
export function reconstructionScores(
  weights: LlamaWeights,
  cache: KVCache,
  contextIds: readonly number[],
  promptIds: readonly number[],
  request: Pick<ReconstructionRequest, 'chunkSize' | 'nSink'>,
): tf.Tensor2D[] {
  const cfg = weights.config;
  const { nLayers: L, nKvHeads: H, nHeads: Hq } = cfg;
  const T = contextIds.length;
  const start = cache.startPosition ?? 0;
  check(cache.keys.length === L && cache.values.length === L, 'shape', `reconstruction scores: the cache has ${cache.keys.length} layers, the model ${L}`);
  check(T >= 1 && cache.keys[0].shape[0] === T, 'shape', `reconstruction scores: ${T} context ids for a cache of ${cache.keys[0].shape[0]} tokens`);
  check(Number.isInteger(request.chunkSize) && request.chunkSize >= 1, 'shape', `reconstruction scores: chunkSize ${request.chunkSize} must be a positive integer`);
  const d = cache.keys[0].shape[2];
  const g = Hq / H;
  const rope = cache.rope;
  const parts: tf.Tensor2D[][] = Array.from({ length: L }, () => []);
  try {
    for (let s = 0; s < T; s += request.chunkSize) {
      const e = Math.min(T, s + request.chunkSize);
      const rep = [...promptIds, ...(s > 0 ? contextIds.slice(Math.max(0, s - RECONSTRUCTION_OVERLAP), s) : []), ...contextIds.slice(s, e)];
      const n = rep.length;
      check(start + T + n <= cfg.maxSeqLen, 'shape', `reconstruction scores: ${T} context + ${n} repeated tokens exceed the model's max_seq_len ${cfg.maxSeqLen}; lower chunkSize`);
      const sink = Math.min(request.nSink, s);
      const c = e - s;
      const scores = tf.tidy(() => {
        let x = embed(weights, rep);
        const out: tf.Tensor2D[] = [];
        for (let l = 0; l < L; l++) {
          const p = projectQkv(weights, l, rmsNorm(x, weights.layers[l].attnNorm, cfg.normEps));
          const qr = applyRope(p.q, rope, { start: start + T, count: n });
          const kr = applyRope(p.k, rope, { start: start + T, count: n });
          const kc = applyRope(cache.keys[l], rope, { start, count: T });
          // Keys scored: the sinks, the chunk, the repeated tokens.
          const keyParts = [...(sink > 0 ? [tf.slice(kc, [0, 0, 0], [sink, H, d])] : []), tf.slice(kc, [s, 0, 0], [c, H, d]), kr];
          const ks = tf.concat(keyParts, 0);
          const S = sink + c + n;
          const qh = tf.reshape(tf.transpose(tf.reshape(qr, [n, H, g, d]), [1, 2, 0, 3]), [H, g * n, d]);
          const logits = tf.reshape(tf.mul(tf.matMul(qh, tf.transpose(ks, [1, 2, 0])), 1 / Math.sqrt(d)), [H, g, n, S]);
          const probs = tf.softmax(tf.add(logits, tf.reshape(causalTailMask(n, S, n), [1, 1, n, S])), -1);
          out.push(tf.max(tf.slice(probs, [0, 0, 0, sink], [H, g, n, c]), [1, 2]) as tf.Tensor2D); // [H_kv, c]
          if (l < L - 1) {
            const o = attention(qr, tf.concat([kc, kr], 0) as tf.Tensor3D, tf.concat([cache.values[l], p.v], 0) as tf.Tensor3D, n);
            x = finishLayer(weights, l, x, o);
          }
        }
        return out;
      });
      scores.forEach((t, l) => parts[l].push(t));
    }
    return parts.map((ps) => tf.tidy(() => tf.transpose(ps.length === 1 ? ps[0] : tf.concat(ps, 1)) as tf.Tensor2D));
  } finally {
    tf.dispose(parts.flat());
  }
}

/** A model that can run a reconstruction pass (`LlamaModel`). */
export interface ReconstructingModel {
  reconstructionScores(cache: KVCache, contextIds: readonly number[], promptIds: readonly number[], request: Pick<ReconstructionRequest, 'chunkSize' | 'nSink'>): Promise<tf.Tensor2D[]> | tf.Tensor2D[];
}

/**
 * The runners' hook: when the strategy's capabilities ask for a reconstruction pass
 * (`reconstruction`), runs it on `model` and returns the cache with `reconstructionScores` set (and a
 * `dispose` that frees those scores only); otherwise the cache as it is. The instruction is encoded
 * with `encode` when given (no BOS), else the context alone is re-read.
 * @throws KvpackError('unsupported') when the strategy needs the pass and the model cannot run it.
 */
export async function withReconstructionScores(
  model: Partial<ReconstructingModel>,
  strategy: Pick<Strategy, 'name' | 'options'>,
  cache: KVCache,
  contextIds: readonly number[],
  encode?: (text: string) => number[],
): Promise<{ cache: KVCache; dispose(): void }> {
  let req: ReconstructionRequest | null | undefined;
  try {
    req = getStrategyDefinition(strategy.name).capabilities?.reconstruction?.(strategy.options);
  } catch {
    req = null; // a strategy built outside the registry declares no capabilities
  }
  if (!req) return { cache, dispose: () => {} };
  check(typeof model.reconstructionScores === 'function', 'unsupported', `${strategy.name} needs a context-reconstruction pass, which this model cannot run (it has no reconstructionScores)`);
  const scores = await model.reconstructionScores(cache, contextIds, encode ? encode(req.prompt) : [], req);
  return { cache: { ...cache, reconstructionScores: scores }, dispose: () => tf.dispose(scores) };
}
