import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStrategy, headerBytes, selectBackend, type MlaKVCache } from '@kvpack/core';
import { disposeMlaCache, syntheticMlaCache } from '@kvpack/core/conformance';
import { kiviMlaCacheBytes, KiviOptionsSchema } from './index.js';
import { f16 } from '../testing/testkit.js';

/** KIVI on MLA latent caches: bytes counted directly, and every dequantized value within its group's step. */
const T = 40;
let cache: MlaKVCache;
beforeAll(async () => {
  await selectBackend('wasm');
  cache = syntheticMlaCache(T, { nLayers: 2, kvLoraRank: 20, qkRopeHeadDim: 6 }, 4, { theta: 10000, layout: 'interleaved' }, 2);
});
afterAll(() => disposeMlaCache(cache));

describe('kivi on MLA latent caches', () => {
  it('quantizes latents per channel in groups of g tokens (error ≤ half a step) and keeps T mod R tokens in float16; bytes counted directly', async () => {
    const options = KiviOptionsSchema.parse({ bits: 2, quantGroupSize: 8, residualLength: 16 });
    const c = await createStrategy({ name: 'kivi', options }).compress(cache);
    const n = 32; // T − T mod R
    const part = (d: number) => (n * d * 2) / 8 + 2 * 2 * (n / 8) * d + 2 * (T - n) * d;
    expect(c.byteSize()).toBe(2 * (part(20) + part(6)));
    expect(c.byteSize()).toBe(kiviMlaCacheBytes(cache.layout, T, options));
    const bytes = c.serialize();
    expect(c.byteSize()).toBe(bytes.length - headerBytes(bytes));
    for (let l = 0; l < 2; l++) {
      const x = Float64Array.from(cache.latents[l].dataSync());
      const got = c.latents(l);
      const y = got.dataSync();
      got.dispose();
      for (let ch = 0; ch < 20; ch++) {
        for (let g0 = 0; g0 < n; g0 += 8) {
          let lo = Infinity;
          let hi = -Infinity;
          for (let t = g0; t < g0 + 8; t++) [lo, hi] = [Math.min(lo, x[t * 20 + ch]), Math.max(hi, x[t * 20 + ch])];
          const step = (hi - lo) / 3;
          for (let t = g0; t < g0 + 8; t++) {
            // Half a step, plus the float16 rounding of the group's scale and minimum.
            expect(Math.abs(y[t * 20 + ch] - x[t * 20 + ch])).toBeLessThanOrEqual(step / 2 + 4e-3 * (Math.abs(lo) + Math.abs(hi)) + 1e-6);
          }
        }
        for (let t = n; t < T; t++) expect(y[t * 20 + ch]).toBe(f16(x[t * 20 + ch])); // the float16 window
      }
    }
    c.dispose();
  });
});
