import * as tf from '@tensorflow/tfjs-core';
import { createStrategy, deserializeCache, selectBackend, type ModelLayout } from '@kvpack/core';
import './index.js'; // registers the strategy
import { runStrategyConformance } from '@kvpack/core/conformance';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { quantCacheBytes, type QuantOptions } from './index.js';
import { f16, maxAbsDiff, randomCache, rint, take, unrotate, type RandomCache } from '../testing/testkit.js';

runStrategyConformance('quant', {
  compressing: { bits: 4, mode: 'asymmetric' },
  noLosslessReason: '8 bits is its finest setting; its error is checked against a float64 re-computation in quant.test.ts',
  badOptions: [{ bits: 3 }, { bits: 16 }, { mode: 'nf4' }],
});

/**
 * Float64 per-token quantize → dequantize of x [rows, d], written from the scheme's definition:
 * symmetric: s = f16(max|x| / (2^(b−1) − 1)), q = clamp(rint(x/s), −2^(b−1), 2^(b−1) − 1), x̂ = q·s;
 * asymmetric: s = f16((max − min)/(2^b − 1)), z = clamp(rint(−min/s), 0, 2^b − 1),
 * q = clamp(rint(x/s) + z, 0, 2^b − 1), x̂ = (q − z)·s.
 */
function refQuant(x: Float32Array, rows: number, d: number, o: QuantOptions): { deq: Float64Array; scale: Float64Array } {
  const deq = new Float64Array(rows * d);
  const scale = new Float64Array(rows);
  const b = o.bits ?? 8;
  for (let r = 0; r < rows; r++) {
    const row = Array.from(x.subarray(r * d, (r + 1) * d));
    const lo = Math.min(...row);
    const hi = Math.max(...row);
    if (o.mode === 'symmetric') {
      const qmax = 2 ** (b - 1) - 1;
      const s = f16(Math.max(Math.abs(lo), Math.abs(hi)) / qmax);
      scale[r] = s;
      row.forEach((v, c) => (deq[r * d + c] = Math.min(qmax, Math.max(-qmax - 1, rint(v / s))) * s));
    } else {
      const qmax = 2 ** b - 1;
      const s = f16((hi - lo) / qmax);
      const z = Math.min(qmax, Math.max(0, rint(-lo / s)));
      scale[r] = s;
      row.forEach((v, c) => (deq[r * d + c] = (Math.min(qmax, Math.max(0, rint(v / s) + z)) - z) * s));
    }
  }
  return { deq, scale };
}

describe('quant: per-token int8/int4 against a float64 re-computation', () => {
  const layout: ModelLayout = { nLayers: 3, nHeads: 4, nKvHeads: 2, headDim: 16 };
  const T = 37;
  let rc: RandomCache;
  beforeAll(async () => {
    await selectBackend('wasm');
    rc = randomCache(T, layout, 11);
  });
  afterAll(() => rc.dispose());

  for (const options of [
    { bits: 8, mode: 'symmetric' },
    { bits: 8, mode: 'asymmetric' },
    { bits: 4, mode: 'symmetric' },
    { bits: 4, mode: 'asymmetric' },
  ] as QuantOptions[]) {
    it(`${options.bits}-bit ${options.mode}: dequantized keys and values match, bytes match the formula`, async () => {
      const c = await createStrategy({ name: 'quant', options }).compress(rc.cache);
      const { nKvHeads: H, headDim: d } = layout;
      const rows = T * H;
      let worstRel = 0;
      for (let l = 0; l < layout.nLayers; l++) {
        const v = take(c.values(l));
        const refV = refQuant(rc.values[l], rows, d, options);
        // Same float64 arithmetic up to float32 storage of the result.
        expect(maxAbsDiff(v, refV.deq)).toBeLessThan(1e-6);
        const k = unrotate(c.keys(l));
        const refK = refQuant(rc.keys[l], rows, d, options);
        expect(maxAbsDiff(k, refK.deq)).toBeLessThan(1e-4); // RoPE there and back in float32
        // The error is at most half a step (plus the float16 rounding of the scale at the clamp).
        for (let r = 0; r < rows; r++)
          for (let i = r * d; i < (r + 1) * d; i++) {
            expect(Math.abs(refV.deq[i] - rc.values[l][i])).toBeLessThanOrEqual(refV.scale[r] * 0.5 + Math.abs(rc.values[l][i]) * 2 ** -10 + 1e-7);
            worstRel = Math.max(worstRel, Math.abs(v[i] - rc.values[l][i]) / refV.scale[r]);
          }
      }
      expect(worstRel).toBeGreaterThan(0.3); // quantization really happened
      const expected = 2 * layout.nLayers * (Math.ceil((T * H * d * (options.bits ?? 8)) / 8) + 2 * T * H + (options.mode === 'asymmetric' ? T * H : 0));
      expect(c.byteSize()).toBe(expected);
      expect(quantCacheBytes(layout, T, options)).toBe(expected);
      c.dispose();
    });
  }

  it('leaks no tensors over repeated compress / reconstruct / dispose', async () => {
    const start = tf.memory().numTensors;
    for (let i = 0; i < 3; i++) {
      const c = await createStrategy({ name: 'quant', options: { bits: 4 } }).compress(rc.cache);
      for (let l = 0; l < layout.nLayers; l++) tf.dispose([c.keys(l), c.values(l)]);
      c.dispose();
    }
    expect(tf.memory().numTensors).toBe(start);
  });
});

describe('quant holds on the backend only its stored form', () => {
  const layout: ModelLayout = { nLayers: 2, nHeads: 8, nKvHeads: 4, headDim: 64 };
  const T = 256;
  let rc: RandomCache;
  beforeAll(async () => {
    await selectBackend('wasm');
    rc = randomCache(T, layout, 5);
  });
  afterAll(() => rc.dispose());

  for (const options of [
    { bits: 4, mode: 'asymmetric' },
    { bits: 8, mode: 'symmetric' },
  ] as QuantOptions[]) {
    it(`${options.bits}-bit ${options.mode}, T = ${T}: backend bytes grow by at most 1.1 · byteSize() after compress and after restore`, async () => {
      const base = tf.memory().numBytes;
      const c = await createStrategy({ name: 'quant', options }).compress(rc.cache);
      const stored = c.byteSize();
      // A float32 copy of the keys and values alone would be 8 (int4) or 4 (int8) times the codes.
      expect(tf.memory().numBytes - base).toBeLessThanOrEqual(1.1 * stored);
      for (let l = 0; l < layout.nLayers; l++) tf.dispose([c.keys(l), c.values(l)]);
      expect(tf.memory().numBytes - base).toBeLessThanOrEqual(1.1 * stored);
      const bytes = c.serialize();
      c.dispose();
      expect(tf.memory().numBytes).toBe(base);
      const r = deserializeCache(bytes);
      expect(tf.memory().numBytes - base).toBeLessThanOrEqual(1.1 * stored);
      expect(Buffer.from(r.serialize()).equals(Buffer.from(bytes))).toBe(true);
      r.dispose();
    });
  }
});
