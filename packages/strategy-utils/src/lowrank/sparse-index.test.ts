import * as tf from '@tensorflow/tfjs-core';
import { decodeHalf, disposeKVCache, selectBackend, type KVCache } from '@kvpack/core';
import { syntheticCache } from '@kvpack/core/conformance';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildSparseIndex } from './sparse-index-build.js';
import { buildSparseIndexOnDevice } from './sparse-index-device.js';

const HALVES = ['landmarks', 'outlierK', 'outlierV', 'localK', 'localV'] as const;

describe('sparse index: the batched device build', () => {
  // L = 5, H_kv = 2, d = 8; T = 45, local 4 → C = ⌊41 / 4⌋ = 10 chunks, 5 local tokens.
  const T = 45;
  const o = { budget: 16, chunkSize: 4, outlierChunks: 3, localTokens: 4 };
  let cache: KVCache;
  beforeAll(async () => {
    await selectBackend('wasm');
    cache = { ...syntheticCache(T, { nLayers: 5, nHeads: 4, nKvHeads: 2, headDim: 8 }, 9), startPosition: 3 };
  });
  afterAll(() => disposeKVCache(cache));

  for (const backend of ['wasm', 'cpu'])
    it(`${backend}: any split of the layers into batches gives the same index, which matches the float64 host build`, async () => {
      await selectBackend(backend);
      const host = await buildSparseIndex(cache, T, o, 'host');
      const n0 = tf.memory().numTensors;
      const builds = [];
      for (const per of [1, 2, 5, undefined]) builds.push(await buildSparseIndexOnDevice(cache, T, o, per));
      expect(tf.memory().numTensors).toBe(n0);
      const [first, ...rest] = builds;
      expect([first.chunks, first.outliers, first.local]).toEqual([10, 3, 5]);
      // Batching lays layers side by side along the KV-head axis: no value changes.
      for (const b of rest) expect(b).toEqual(first);
      for (let l = 0; l < 5; l++) {
        const A = host.layers[l];
        const B = first.layers[l];
        expect(Array.from(B.outlierChunks), `layer ${l} outlier chunks`).toEqual(Array.from(A.outlierChunks));
        for (const key of HALVES) {
          const x = decodeHalf(A[key]);
          const y = decodeHalf(B[key]);
          expect(y.length, key).toBe(x.length);
          // One float16 step at most (float32 vs float64 arithmetic before the rounding).
          for (let i = 0; i < x.length; i++) expect(Math.abs(y[i] - x[i]), `layer ${l} ${key}[${i}]`).toBeLessThanOrEqual(Math.max(Math.abs(x[i]) * 2 ** -10, 2 ** -24));
        }
      }
      await selectBackend('wasm');
    });

  it('no chunk (T below the local tokens): only exact local rows, empty landmarks and outliers', async () => {
    const small: KVCache = { ...cache, keys: cache.keys.map((k) => k.slice([0, 0, 0], [3, -1, -1])), values: cache.values.map((v) => v.slice([0, 0, 0], [3, -1, -1])) };
    const ix = await buildSparseIndexOnDevice(small, 3, o, 2);
    expect([ix.chunks, ix.outliers, ix.local]).toEqual([0, 0, 3]);
    for (const L of ix.layers) {
      expect([L.landmarks.length, L.outlierChunks.length, L.outlierK.length, L.localK.length]).toEqual([0, 0, 0, 3 * 2 * 8]);
    }
    tf.dispose([...small.keys, ...small.values]);
  });
});
