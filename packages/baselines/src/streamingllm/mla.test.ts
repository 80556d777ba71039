import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStrategy, headerBytes, mlaDenseBytes, selectBackend, type MlaKVCache } from '@kvpack/core';
import { disposeMlaCache, syntheticMlaCache } from '@kvpack/core/conformance';
import './index.js';
import { f16 } from '../testing/testkit.js';

const T = 30;
const START = 5;
let cache: MlaKVCache;
beforeAll(async () => {
  await selectBackend('wasm');
  cache = syntheticMlaCache(T, { nLayers: 2, kvLoraRank: 12, qkRopeHeadDim: 4 }, 9, { theta: 10000, layout: 'interleaved' }, START);
});
afterAll(() => disposeMlaCache(cache));

describe('streamingllm on MLA latent caches', () => {
  it('keeps the sinks and the recent tokens’ latents and RoPE keys (rotated at their original positions), positions implied, not stored', async () => {
    const c = await createStrategy({ name: 'streamingllm', options: { sinks: 2, budget: 10 } }).compress(cache);
    const kept = [0, 1, 22, 23, 24, 25, 26, 27, 28, 29];
    expect(c.byteSize()).toBe(2 * 10 * (12 + 4) * 2); // float16 rows only
    expect(mlaDenseBytes(cache.layout, T) / c.byteSize()).toBeCloseTo(3, 12);
    const bytes = c.serialize();
    expect(c.byteSize()).toBe(bytes.length - headerBytes(bytes));
    for (let l = 0; l < 2; l++) {
      const x = cache.latents[l].dataSync();
      const k = cache.ropeKeys[l].dataSync();
      const a = c.latents(l);
      const b = c.ropeKeys(l);
      const ya = a.dataSync();
      const yb = b.dataSync();
      tf.dispose([a, b]);
      kept.forEach((p, j) => {
        for (let i = 0; i < 12; i++) expect(ya[j * 12 + i]).toBe(f16(x[p * 12 + i]));
        for (let i = 0; i < 2; i++) {
          const ang = (START + p) * Math.pow(10000, -i / 2);
          const [x0, x1] = [k[p * 4 + 2 * i], k[p * 4 + 2 * i + 1]];
          expect(yb[j * 4 + 2 * i]).toBeCloseTo(x0 * Math.cos(ang) - x1 * Math.sin(ang), 2);
          expect(yb[j * 4 + 2 * i + 1]).toBeCloseTo(x0 * Math.sin(ang) + x1 * Math.cos(ang), 2);
        }
      });
    }
    c.dispose();
  });
});
