import type * as tf from '@tensorflow/tfjs-core';
import type { CompressedCache, KVCache, ModelLayout } from '@kvpack/core';
import type { ReconstructingModel } from '@kvpack/models';

/**
 * What the bench needs from a model: an uncompressed prefill that returns the KV cache, and decode
 * steps that read a (compressed) cache. `@kvpack/models`' `LlamaModel` satisfies it.
 */
export interface BenchModel {
  readonly config: ModelLayout & { vocabSize: number; maxSeqLen: number };
  /**
   * Forward pass over `ids` from position 0 with no cache.
   * @returns logits [T, V] and the prefill KV cache (pre-RoPE keys [T, H_kv, d]); with
   *   `observationWindow` w, the cache also carries the post-RoPE queries of the last w tokens.
   */
  prefill(ids: number[], options?: { observationWindow?: number }): Promise<{ logits: tf.Tensor2D; cache: KVCache }> | { logits: tf.Tensor2D; cache: KVCache };
  /**
   * Decodes `ids` at positions position … position + n − 1 over `cache`, appending their keys and
   * values to it. @returns logits [n, V]
   */
  decode(ids: number[], cache: CompressedCache, position: number): Promise<tf.Tensor2D> | tf.Tensor2D;
  /** The context-reconstruction pass of strategies that ask for it (capability `reconstruction`; `LlamaModel.reconstructionScores`). */
  reconstructionScores?: ReconstructingModel['reconstructionScores'];
}

/** Text → token ids, as the bench needs it. */
export interface BenchTokenizer {
  readonly bosId: number | undefined;
  encode(text: string, options?: { bos?: boolean; eos?: boolean }): number[];
  decode(ids: number[]): string;
}
