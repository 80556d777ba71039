import * as tf from '@tensorflow/tfjs-core';
import { check, type KVCache } from '@kvpack/core';
import { syntheticLlamaCache } from './synthetic.js';

/** Query window of the synthetic caches (for query-aware strategies). */
const OBS_WINDOW = 32;

/** Loads the cache for one T: a slice of the dump, or a synthetic Llama-3.1-8B-shaped cache. */
export async function loadCache(T: number, layers: number, seed: number, dump: KVCache | null): Promise<KVCache> {
  if (!dump) return syntheticLlamaCache({ T, layers, seed, observationWindow: OBS_WINDOW });
  const Td = dump.keys[0].shape[0];
  check(T <= Td, 'config', `--tokens ${T} exceeds the dump's ${Td} tokens`);
  const L = Math.min(layers, dump.layout.nLayers);
  const sl = (x: tf.Tensor3D) => tf.slice(x, [0, 0, 0], [T, -1, -1]) as tf.Tensor3D;
  const queries = dump.queries && T === Td ? dump.queries.slice(0, L).map((x) => tf.clone(x)) : undefined;
  return {
    layout: { ...dump.layout, nLayers: L },
    rope: dump.rope,
    startPosition: dump.startPosition,
    keys: dump.keys.slice(0, L).map(sl),
    values: dump.values.slice(0, L).map(sl),
    ...(queries ? { queries } : {}),
  };
}
