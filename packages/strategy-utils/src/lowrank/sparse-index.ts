import { encodeHalf } from '@kvpack/core';
import type { SparseOptions } from './sparse-options.js';

/*
 * Sparse decode (xKV-SR: the xKV authors' follow-up, after ShadowKV, Sun et al. 2024, arXiv
 * 2410.21465; reference code abdelfattah-lab/xKV `xKV_SR/models/kv_cache_xkv.py`, ShadowKV's
 * `ShadowKVCache`): at compress time, one landmark per chunk of `chunkSize` tokens (the mean of the
 * chunk's exact post-RoPE keys), the chunks whose keys are least like their landmark kept exact
 * ("outliers"), and the last tokens kept exact ("local"). At decode, per KV head, the chunks with the
 * highest landmark attention are selected up to a token budget and only their keys and values are
 * rebuilt from the low-rank factors.
 */

/** Host data of one layer's sparse index (what is stored and serialized). */
export interface SparseLayer {
  /** Landmarks, float16 bits, [C, H_kv, d]. */
  landmarks: Uint16Array;
  /** Outlier chunk indices per KV head, ascending, [H_kv, O]. */
  outlierChunks: Int32Array;
  /** Exact post-RoPE keys / values of the outlier chunks, float16 bits, [H_kv, O·c, d]. */
  outlierK: Uint16Array;
  outlierV: Uint16Array;
  /** Exact post-RoPE keys / values of the local tokens C·c … T − 1, float16 bits, [T − C·c, H_kv, d]. */
  localK: Uint16Array;
  localV: Uint16Array;
}

/** The sparse index of a cache: chunk geometry and the per-layer host data. */
export interface SparseIndex {
  options: SparseOptions;
  /** Tokens per chunk c. */
  chunkSize: number;
  /** Landmark chunks C = ⌊max(0, T − localTokens) / c⌋ (tokens 0 … C·c − 1). */
  chunks: number;
  /** Outlier chunks per KV head O = min(outlierChunks, C). */
  outliers: number;
  /** Exact local tokens T − C·c (≥ localTokens; includes a last partial chunk). */
  local: number;
  layers: SparseLayer[];
}

/** Chunk geometry for T tokens. */
export function sparseGeometry(T: number, o: SparseOptions): { chunks: number; outliers: number; local: number } {
  const chunks = Math.floor(Math.max(0, T - o.localTokens) / o.chunkSize);
  return { chunks, outliers: Math.min(o.outlierChunks, chunks), local: T - chunks * o.chunkSize };
}

/** One layer's stored index from float32 landmarks [C·F], outlier chunks and exact rows (16-bit storage). */
export function encodeSparseLayer(lm: Float32Array, outl: Int32Array, oK: Float32Array, oV: Float32Array, lK: Float32Array, lV: Float32Array): SparseLayer {
  return { landmarks: encodeHalf(lm), outlierChunks: outl, outlierK: encodeHalf(oK), outlierV: encodeHalf(oV), localK: encodeHalf(lK), localV: encodeHalf(lV) };
}
