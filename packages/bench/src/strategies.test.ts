// Relations between strategies of different packages; the strategy packages never import each other,
// so these tests live here, beside the bench that loads them all.
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStrategy, selectBackend, type KVCache } from '@kvpack/core';
import { disposeKVCache, syntheticCache } from '@kvpack/core/conformance';
import type { GroupSvdCache } from '@kvpack/strategy-utils';
import '@kvpack/xkv';
import '@kvpack/baselines';

describe('svd = xkv with groups of one layer', () => {
  let cache: KVCache;
  beforeAll(async () => {
    await selectBackend('wasm');
    cache = syntheticCache(64);
  });
  afterAll(() => disposeKVCache(cache));

  it('svd stores the same factors as xkv at G = 1', async () => {
    const opts = { rankK: 5, rankV: 7, storage: 'float32' };
    const s = (await createStrategy({ name: 'svd', options: opts }).compress(cache)) as GroupSvdCache;
    const x = (await createStrategy({ name: 'xkv', options: { ...opts, layersPerGroup: 1 } }).compress(cache)) as GroupSvdCache;
    expect(s.groups.map((g) => g.layers)).toEqual([[0], [1], [2], [3]]);
    for (let l = 0; l < 4; l++) {
      for (const kind of ['k', 'v'] as const) {
        const [a, b] = [s.basis(kind, l), x.basis(kind, l)];
        expect(Array.from(a.dataSync())).toEqual(Array.from(b.dataSync()));
        tf.dispose([a, b]);
      }
    }
    // Closed form, not one cache against the other (both run the same byte count): per layer, for
    // keys and values at rank r, a basis T·r and a factor r·H_kv·d, float32 (4 bytes).
    const { nLayers: L, nKvHeads, headDim } = cache.layout;
    const T = cache.keys[0].shape[0];
    const closed = L * [5, 7].reduce((a, r) => a + (T * r + r * nKvHeads * headDim) * 4, 0);
    expect(s.byteSize()).toBe(closed);
    expect(x.byteSize()).toBe(closed);
    s.dispose();
    x.dispose();
  });
});
