import type * as tf from '@tensorflow/tfjs-core';
import type { ModelLayout, RopeConfig } from '@kvpack/core';

/**
 * Architecture of a Llama-family decoder (Llama 2/3, Qwen2, Mistral, llama2.c models).
 * Shapes below use D = dim, H = nHeads, H_kv = nKvHeads, d = headDim, F = hiddenDim, V = vocabSize.
 */
export interface LlamaConfig extends ModelLayout {
  /** Model width D. */
  dim: number;
  /** SwiGLU inner width F. */
  hiddenDim: number;
  vocabSize: number;
  /** Longest context the model was trained for, tokens. */
  maxSeqLen: number;
  /** RMSNorm epsilon. */
  normEps: number;
  rope: RopeConfig;
  /** Classifier shares the token embedding. */
  tiedEmbeddings: boolean;
  /** q/k/v projections have biases (Qwen2). */
  qkvBias: boolean;
  /**
   * Per-head RMSNorm of queries and keys before RoPE (Qwen3's q_norm / k_norm, weights [d]); cached
   * keys are taken after it. Default false.
   */
  qkNorm?: boolean;
  /**
   * Sliding-window attention per layer, W tokens (a query sees the W tokens ending at its own
   * position), null for full attention; absent = every layer full. From config.json's
   * `sliding_window` with `layer_types`, `use_sliding_window` / `max_window_layers` (Qwen2/3) or
   * Mistral's all-layer window.
   */
  windows?: (number | null)[];
  bosId?: number;
  eosId?: number;
}

/**
 * One decoder layer's weights, stored **[in, out]** so that y = x·W is a plain matmul
 * (tfjs's transposed matmul kernels are slow on wasm). Loaders transpose PyTorch's [out, in].
 */
export interface LlamaLayerWeights {
  attnNorm: tf.Tensor1D; // [D]
  wq: tf.Tensor2D; // [D, H·d]
  wk: tf.Tensor2D; // [D, H_kv·d]
  wv: tf.Tensor2D; // [D, H_kv·d]
  wo: tf.Tensor2D; // [H·d, D]
  bq?: tf.Tensor1D; // [H·d]
  bk?: tf.Tensor1D; // [H_kv·d]
  bv?: tf.Tensor1D; // [H_kv·d]
  qNorm?: tf.Tensor1D; // [d], Qwen3 per-head query RMSNorm
  kNorm?: tf.Tensor1D; // [d], Qwen3 per-head key RMSNorm
  ffnNorm: tf.Tensor1D; // [D]
  w1: tf.Tensor2D; // gate [D, F]
  w2: tf.Tensor2D; // down [F, D]
  w3: tf.Tensor2D; // up [D, F]
}

/** All weights of a Llama-family model, float32 on the tfjs backend. */
export interface LlamaWeights {
  config: LlamaConfig;
  embedding: tf.Tensor2D; // [V, D]
  layers: LlamaLayerWeights[];
  finalNorm: tf.Tensor1D; // [D]
  /** Output projection [D, V] (for tied embeddings, the embedding transposed once at load). */
  classifier: tf.Tensor2D;
}

/** Text ↔ token ids. */
export interface Tokenizer {
  readonly vocabSize: number;
  readonly bosId: number | undefined;
  readonly eosId: number | undefined;
  /** Encodes text; prepends BOS / appends EOS when asked. */
  encode(text: string, options?: { bos?: boolean; eos?: boolean }): number[];
  /** Decodes ids to text. */
  decode(ids: number[]): string;
}
