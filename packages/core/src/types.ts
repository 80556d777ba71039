import type * as tf from '@tensorflow/tfjs-core';
import type { CompressedMlaCache, MlaKVCache } from './mla.js';

/**
 * Attention layout of a decoder-only model.
 * `nHeads` query heads share `nKvHeads` KV heads (GQA when nKvHeads < nHeads), each of `headDim` channels.
 */
export interface ModelLayout {
  /** Number of decoder layers L. */
  nLayers: number;
  /** Number of query heads H. */
  nHeads: number;
  /** Number of KV heads H_kv (H % H_kv == 0). */
  nKvHeads: number;
  /** Channels per head, d. */
  headDim: number;
}

/** RoPE frequency scaling, as in Hugging Face `rope_scaling`. */
export type RopeScaling =
  | { type: 'linear'; factor: number }
  | {
      type: 'llama3';
      factor: number;
      lowFreqFactor: number;
      highFreqFactor: number;
      originalMaxPositionEmbeddings: number;
    }
  /**
   * YaRN (Peng et al. 2023, arXiv 2309.00071) as DeepSeek-V2/V3 configure it (`rope_scaling.type: yarn`):
   * frequencies ramp from interpolated (÷ factor) to extrapolated between the correction dimensions of
   * `betaFast` and `betaSlow` rotations over `originalMaxPositionEmbeddings`; cos and sin are multiplied
   * by {@link yarnAttentionFactor} = m(factor, mscale) / m(factor, mscaleAllDim), m(s, k) = 0.1·k·ln s + 1
   * (1 for s ≤ 1). The softmax scale's own mscale² is the model's business, not RoPE's.
   */
  | {
      type: 'yarn';
      factor: number;
      originalMaxPositionEmbeddings: number;
      /** Default 32 in the reference implementation. */
      betaFast: number;
      /** Default 1. */
      betaSlow: number;
      /** Default 1. */
      mscale: number;
      /** Default 0 (then the cos/sin factor is m(factor, mscale)). */
      mscaleAllDim: number;
    };

/**
 * Rotary position embedding parameters.
 * - `interleaved`: rotate adjacent pairs (x[2i], x[2i+1]) as in llama2.c / Meta's reference.
 * - `half`: rotate (x[i], x[i + d/2]) as in Hugging Face `rotate_half`.
 */
export interface RopeConfig {
  theta: number;
  layout: 'interleaved' | 'half';
  scaling?: RopeScaling | null;
}

/**
 * A model's prefill KV cache. Per layer, keys and values have shape [T, H_kv, d].
 * Keys are **pre-RoPE**; `rope` says how to rotate them. Token i sits at position `startPosition + i`.
 *
 * Ownership: strategies never dispose the tensors of a `KVCache` they are given.
 */
export interface KVCache {
  layout: ModelLayout;
  rope: RopeConfig;
  /** Pre-RoPE keys per layer, [T, H_kv, d] float32. */
  keys: tf.Tensor3D[];
  /** Values per layer, [T, H_kv, d] float32. */
  values: tf.Tensor3D[];
  /** Position of the first token (default 0). */
  startPosition?: number;
  /**
   * Sliding-window attention per layer (Mistral, Qwen2/3 with use_sliding_window, Gemma-style
   * interleaving): `windows[l]` = W tokens when layer l's queries see only the W tokens ending at
   * their own position (key position > query position − W), null for full attention. Absent: every
   * layer is full. Strategies may use it (a windowed layer never reads tokens older than W again);
   * decoding a windowed layer needs the cache to keep its tokens at consecutive positions.
   */
  windows?: (number | null)[];
  /**
   * Optional post-RoPE queries of the last prompt tokens per layer, [T_obs, H, d], used by
   * query-aware strategies (SnapKV). They belong to positions startPosition + T − T_obs … + T − 1.
   */
  queries?: tf.Tensor3D[];
  /**
   * Optional per-layer scores of the prefill tokens from a context-reconstruction pass, [T, H_kv]
   * float32: for each KV pair, the largest attention any query of the model re-reading its own
   * context paid it (KVzip). A runner provides them when the strategy's capabilities ask for them
   * (`StrategyCapabilities.reconstruction`); strategies never dispose them.
   */
  reconstructionScores?: tf.Tensor2D[];
  /**
   * Fingerprint of the model that produced this cache (`LlamaModel.fingerprint()` in @kvpack/models).
   * Compressed caches carry it into their serialization, so that a cache is never restored into
   * another model (`deserializeCache(bytes, { model })`).
   */
  model?: string;
}

/** Options for {@link CompressedCache.attend}. */
export interface AttendOptions {
  /**
   * How many of the cache's last tokens are the query rows' own tokens (they were just appended);
   * query row i may attend to every cached token except the last `n − 1 − i` of those. Default n.
   */
  causalTail?: number;
}

/**
 * A compressed KV cache: the result of {@link Strategy.compress}.
 *
 * Tensors returned by `keys`/`values`/`attend` belong to the caller, who must dispose them.
 */
export interface CompressedCache {
  /** Registered strategy name that produced this cache. */
  readonly strategy: string;
  readonly layout: ModelLayout;
  readonly rope: RopeConfig;
  /** Number of prefill tokens that were compressed (T). */
  readonly prefillLength: number;
  /** Fingerprint of the model whose cache was compressed, when it came from one (see {@link KVCache.model}). */
  readonly model?: string;
  /** Number of tokens `keys(layer)` returns (prefill tokens kept + decode tokens). */
  tokenCount(layer: number): number;
  /** Reconstructed **post-RoPE** keys of one layer, [N, H_kv, d], ready for attention. */
  keys(layer: number): tf.Tensor3D;
  /** Reconstructed values of one layer, [N, H_kv, d]. */
  values(layer: number): tf.Tensor3D;
  /**
   * Appends decode-time tokens to one layer: **post-RoPE** keys and values, [n, H_kv, d].
   * Kept exact (float32) in a residual buffer unless the strategy documents otherwise. The tensors
   * are copied; the caller keeps ownership of its arguments.
   */
  append(layer: number, keys: tf.Tensor3D, values: tf.Tensor3D): void;
  /**
   * Optional fast path: attention output softmax(q·Kᵀ/√d)·V for post-RoPE queries q [n, H, d] of one
   * layer, over all cached tokens. Returns [n, H, d]. When absent, callers reconstruct keys/values.
   */
  attend?(layer: number, queries: tf.Tensor3D, options?: AttendOptions): tf.Tensor3D;
  /** Bytes really held (payload of {@link serialize}), with 16-bit storage counted as 2 bytes. */
  byteSize(): number;
  /** Self-describing binary form; `deserializeCache` (registry) restores it. */
  serialize(): Uint8Array;
  /** {@link serialize} that reads device tensors back asynchronously first: the form to use on webgpu, which has no synchronous readback under Node. */
  serializeAsync(): Promise<Uint8Array>;
  /** Frees every tensor this cache holds. Idempotent. */
  dispose(): void;
}

/** A configured compression method. */
export interface Strategy<Options = unknown> {
  readonly name: string;
  readonly options: Options;
  /**
   * Compresses a whole prefill cache. Does not dispose `cache`. An MLA latent cache
   * ({@link MlaKVCache}, `kind: 'mla'`) gives a {@link CompressedMlaCache}; a strategy whose definition
   * lacks the `mla` capability refuses it.
   * @throws KvpackError('unsupported') for an MLA cache the strategy does not compress.
   */
  compress(cache: KVCache): Promise<CompressedCache>;
  compress(cache: MlaKVCache): Promise<CompressedMlaCache>;
  compress(cache: KVCache | MlaKVCache): Promise<CompressedCache | CompressedMlaCache>;
  /**
   * Restores a cache from the bytes written by its `serialize`, from any byte view (Node Buffer,
   * subarray, SharedArrayBuffer-backed). Strategies built by `createStrategy` check the container,
   * refuse tensors the strategy does not read, and leak no tensor when they throw.
   * @throws KvpackError('corrupt' | 'truncated')
   */
  deserialize(bytes: Uint8Array): CompressedCache;
  /**
   * Restores an MLA latent cache from the bytes its `serialize` wrote (`deserializeMlaCache` in the
   * registry finds the strategy). Absent on strategies that do not compress MLA caches.
   * @throws KvpackError('corrupt' | 'truncated')
   */
  deserializeMla?(bytes: Uint8Array): CompressedMlaCache;
}
