// The batched sparse-index build on a WebGPU adapter (float16 packed on the device, one readback),
// against the float64 host build. Without an adapter the suite is skipped and says why.
import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { decodeHalf, disposeKVCache, selectBackend } from '@kvpack/core';
import { syntheticCache } from '@kvpack/core/conformance';
import { buildSparseIndex } from './sparse-index-build.js';
import { buildSparseIndexOnDevice } from './sparse-index-device.js';

const unavailable = await selectBackend('webgpu').then(
  () => null,
  (e: Error) => e.message.split('\n')[0],
);
const title = unavailable ? `sparse index on webgpu (SKIPPED: no WebGPU adapter: ${unavailable})` : 'sparse index on webgpu';
if (unavailable) console.warn(`[kvpack] ${title}`);

describe.skipIf(unavailable !== null)(title, { timeout: 600_000 }, () => {
  it('the batched device build (the webgpu default) matches the float64 host build; batches agree bit for bit', async () => {
    const T = 77;
    const o = { budget: 16, chunkSize: 4, outlierChunks: 5, localTokens: 6 };
    const cache = { ...syntheticCache(T, { nLayers: 5, nHeads: 4, nKvHeads: 2, headDim: 16 }, 4), startPosition: 2 };
    const host = await buildSparseIndex(cache, T, o, 'host');
    const n0 = tf.memory().numTensors;
    const auto = await buildSparseIndex(cache, T, o);
    const split = await buildSparseIndexOnDevice(cache, T, o, 2);
    expect(tf.memory().numTensors).toBe(n0);
    expect(split).toEqual(auto);
    for (let l = 0; l < 5; l++) {
      expect(Array.from(auto.layers[l].outlierChunks)).toEqual(Array.from(host.layers[l].outlierChunks));
      for (const key of ['landmarks', 'outlierK', 'outlierV', 'localK', 'localV'] as const) {
        const x = decodeHalf(host.layers[l][key]);
        const y = decodeHalf(auto.layers[l][key]);
        expect(y.length).toBe(x.length);
        for (let i = 0; i < x.length; i++) expect(Math.abs(y[i] - x[i]), `layer ${l} ${key}[${i}]`).toBeLessThanOrEqual(Math.max(Math.abs(x[i]) * 2 ** -10, 2 ** -24));
      }
    }
    disposeKVCache(cache);
  });
});
