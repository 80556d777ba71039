import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStrategy, headerBytes, selectBackend, type MlaKVCache } from '@kvpack/core';
import { disposeMlaCache, syntheticMlaCache } from '@kvpack/core/conformance';
import { deserializeMlaCache } from '@kvpack/core';
import { KiviMlaCache, kiviMlaCacheBytes, KiviOptionsSchema } from './index.js';
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
    expect(c.byteSize()).toBe(kiviMlaCacheBytes(cache.layout, T, { ...options, bits: 2 }));
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

  it('quantizes decode tokens R at a time as KIVI quantizes keys, and restores the result bit for bit', async () => {
    const c = (await createStrategy({ name: 'kivi', options: { bits: 4, quantGroupSize: 8, residualLength: 16 } }).compress(cache)) as unknown as KiviMlaCache;
    expect(c.quantizedTokens(1)).toBe(32);
    expect(c.tokenCount(1)).toBe(40);
    const add = tf.randomNormal([8, 20], 0, 1, 'float32', 5) as tf.Tensor2D;
    const addR = tf.randomNormal([8, 6], 0, 1, 'float32', 6) as tf.Tensor2D;
    c.append(1, add, addR); // window 8 + 8 = 16 = R: not yet quantized
    expect([c.quantizedTokens(1), c.tokenCount(1)]).toEqual([32, 48]);
    const one = tf.randomNormal([1, 20], 0, 1, 'float32', 7) as tf.Tensor2D;
    const oneR = tf.randomNormal([1, 6], 0, 1, 'float32', 8) as tf.Tensor2D;
    c.append(1, one, oneR); // the 16 window tokens become one block
    expect([c.quantizedTokens(1), c.tokenCount(1)]).toEqual([48, 49]);
    // The appended tokens 40…47 are now 4-bit codes: within half a step of their group (8 tokens, one channel).
    const x = Float64Array.from(add.dataSync());
    const got = c.latents(1);
    const y = got.slice([40, 0], [8, 20]).dataSync();
    const lastRow = got.slice([48, 0], [1, 20]).dataSync();
    got.dispose();
    for (let ch = 0; ch < 20; ch++) {
      const col = Array.from({ length: 8 }, (_, t) => f16(x[t * 20 + ch])); // rounded to float16 in the window first
      const step = (Math.max(...col) - Math.min(...col)) / 15;
      for (let t = 0; t < 8; t++) expect(Math.abs(y[t * 20 + ch] - col[t])).toBeLessThanOrEqual(step / 2 + 2e-3 * Math.max(...col.map(Math.abs)) + 1e-6);
      expect(lastRow[ch]).toBe(f16(one.dataSync()[ch])); // the newest token: float16 window
    }
    const bytes = c.serialize();
    expect(c.byteSize()).toBe(bytes.length - headerBytes(bytes));
    const r = deserializeMlaCache(bytes);
    expect(r.tokenCount(1)).toBe(49);
    for (const l of [0, 1]) {
      const [a, b] = [c.latents(l), r.latents(l)];
      const [p, q] = [c.ropeKeys(l), r.ropeKeys(l)];
      expect(Array.from(b.dataSync())).toEqual(Array.from(a.dataSync()));
      expect(Array.from(q.dataSync())).toEqual(Array.from(p.dataSync()));
      tf.dispose([a, b, p, q]);
    }
    tf.dispose([add, addR, one, oneR]);
    r.dispose();
    c.dispose();
  });
});
