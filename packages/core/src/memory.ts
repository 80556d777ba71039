import type { ModelLayout } from './types.js';

/**
 * Bytes of an uncompressed fp16 KV cache: 2 (K and V) × L × T × H_kv × d × 2 bytes.
 * This is the denominator of every compression ratio kvpack reports.
 */
export function denseCacheBytes(layout: ModelLayout, tokens: number, bytesPerElement = 2): number {
  return 2 * layout.nLayers * tokens * layout.nKvHeads * layout.headDim * bytesPerElement;
}

/** Measured compression ratio: fp16 dense bytes / bytes the compressed cache holds. */
export function compressionRatio(layout: ModelLayout, tokens: number, compressedBytes: number): number {
  return denseCacheBytes(layout, tokens) / compressedBytes;
}
