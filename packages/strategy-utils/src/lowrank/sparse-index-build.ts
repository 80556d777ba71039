import { isHostBackend, type KVCache } from '@kvpack/core';
import { buildSparseIndexOnDevice } from './sparse-index-device.js';
import { buildSparseIndexOnHost } from './sparse-index-host.js';
import type { SparseIndex } from './sparse-index.js';
import type { SparseOptions } from './sparse-options.js';

/**
 * Builds the sparse index of a prefill cache (compress time): on the host in float64
 * ({@link buildSparseIndexOnHost}) on wasm/cpu, on the tfjs backend ({@link buildSparseIndexOnDevice})
 * elsewhere; `where` forces one (tests compare the two).
 */
export async function buildSparseIndex(cache: KVCache, T: number, o: SparseOptions, where: 'auto' | 'host' | 'device' = 'auto'): Promise<SparseIndex> {
  if (where === 'device' || (where === 'auto' && !isHostBackend())) return buildSparseIndexOnDevice(cache, T, o);
  return buildSparseIndexOnHost(cache, T, o);
}
