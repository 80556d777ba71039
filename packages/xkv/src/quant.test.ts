import * as tf from '@tensorflow/tfjs-core';
import { disposeKVCache, gaussian } from '@kvpack/core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStrategy, fromHalfBits, headerBytes, KvpackError, selectBackend, toHalfBits } from '@kvpack/core';
import { dequantizeMatrix, quantizedBytes, quantizeMatrix, type GroupSvdCache, type QuantSpec } from '@kvpack/strategy-utils';
import './index.js'; // registers xkv
import { syntheticCache } from './test-utils.js';

/**
 * Independent float64 reference of the group quantizer described in quant.ts (after the xKV authors'
 * quant.py): per group of `gs` consecutive elements of a row, a float16 scale, an integer zero point
 * when asymmetric, round-half-to-even, clamping. Returns the signed integer levels and the
 * dequantized values.
 */
function reference(x: ArrayLike<number>, rows: number, cols: number, spec: QuantSpec): { levels: number[]; deq: Float64Array; scales: number[] } {
  const { bits, quantGroupSize: gs, symmetric } = spec;
  const rint = (v: number) => {
    const f = Math.floor(v);
    return v - f < 0.5 ? f : v - f > 0.5 ? f + 1 : f % 2 === 0 ? f : f + 1;
  };
  const half = (v: number) => {
    const h = toHalfBits(v);
    return (h & 0x7fff) === 0 ? 2 ** -24 : fromHalfBits(h);
  };
  const levels: number[] = [];
  const scales: number[] = [];
  const deq = new Float64Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    for (let c0 = 0; c0 < cols; c0 += gs) {
      const idx = Array.from({ length: Math.min(gs, cols - c0) }, (_, i) => r * cols + c0 + i);
      const vals = idx.map((i) => x[i]);
      const mx = Math.max(...vals);
      const mn = Math.min(...vals);
      if (symmetric) {
        const qmax = 2 ** (bits - 1) - 1;
        const s = half(Math.max(Math.abs(mx), Math.abs(mn)) / qmax);
        scales.push(s);
        for (const i of idx) {
          const q = Math.min(qmax, Math.max(-qmax - 1, rint(x[i] / s)));
          levels.push(q);
          deq[i] = q * s;
        }
      } else {
        const qmax = 2 ** bits - 1;
        const s = half((mx - mn) / qmax);
        scales.push(s);
        const z = Math.min(qmax, Math.max(0, rint(-mn / s)));
        for (const i of idx) {
          const q = Math.min(qmax, Math.max(0, rint(x[i] / s) + z));
          levels.push(q - z);
          deq[i] = (q - z) * s;
        }
      }
    }
  }
  return { levels, deq, scales };
}

/** Unpacks codes by hand: 8-bit one per byte; 4-bit two per byte, even element in the low nibble. */
function unpack(codes: Uint8Array, n: number, bits: number): number[] {
  return Array.from({ length: n }, (_, i) => (bits === 8 ? codes[i] : i % 2 === 0 ? codes[Math.floor(i / 2)] & 15 : codes[Math.floor(i / 2)] >> 4));
}

describe('group quantization of factors', () => {
  const g = gaussian(11);
  const rows = 7;
  const cols = 45;
  const x = Float32Array.from({ length: rows * cols }, (_, i) => g() * (1 + (i % 9)) + (i % 5 === 0 ? 3 : 0));

  for (const bits of [8, 4] as const)
    for (const symmetric of [true, false])
      for (const quantGroupSize of [32, 9, 45, 100])
        it(`${bits}-bit ${symmetric ? 'symmetric' : 'asymmetric'}, group ${quantGroupSize}: matches a float64 reference, codes and bytes exact`, () => {
          const spec = { bits, quantGroupSize, symmetric };
          const q = quantizeMatrix(x, rows, cols, spec);
          const ref = reference(x, rows, cols, spec);
          expect(Array.from(dequantizeMatrix(q))).toEqual(Array.from(ref.deq, Math.fround));
          expect(Array.from(q.scales, fromHalfBits)).toEqual(ref.scales);
          const offset = symmetric ? 2 ** (bits - 1) : 0;
          const zeros = q.zeros ? Array.from(q.zeros) : null;
          const gpr = Math.ceil(cols / quantGroupSize);
          const codes = unpack(q.codes, rows * cols, bits);
          const levels = codes.map((u, i) => u - offset - (zeros ? zeros[Math.floor(i / cols) * gpr + Math.floor((i % cols) / quantGroupSize)] : 0));
          expect(levels).toEqual(ref.levels);
          // Bytes: packed codes + 2 per scale (+ 1 per zero point).
          const groups = rows * gpr;
          const expectBytes = Math.ceil((rows * cols * bits) / 8) + 2 * groups + (symmetric ? 0 : groups);
          expect(q.codes.length + q.scales.byteLength + (q.zeros?.length ?? 0)).toBe(expectBytes);
          expect(quantizedBytes(rows, cols, spec)).toBe(expectBytes);
          // Rounding error at most half a step, except where the float16 scale forces a clamp at the top.
          let within = 0;
          const deq = dequantizeMatrix(q);
          for (let i = 0; i < x.length; i++) {
            const s = ref.scales[Math.floor(i / cols) * gpr + Math.floor((i % cols) / quantGroupSize)];
            if (Math.abs(deq[i] - x[i]) <= s / 2 + 1e-6 * s) within++;
          }
          expect(within).toBeGreaterThanOrEqual(x.length - groups);
        });

  it('an all-zero group dequantizes to zeros; NaN input is rejected', () => {
    const z = new Float32Array(16);
    expect(Array.from(dequantizeMatrix(quantizeMatrix(z, 2, 8, { bits: 4, quantGroupSize: 8, symmetric: false })))).toEqual(Array(16).fill(0));
    expect(Array.from(dequantizeMatrix(quantizeMatrix(z, 2, 8, { bits: 8, quantGroupSize: 8, symmetric: true })))).toEqual(Array(16).fill(0));
    z[3] = NaN;
    expect(() => quantizeMatrix(z, 2, 8, { bits: 8, quantGroupSize: 4, symmetric: true })).toThrow(KvpackError);
  });
});

describe('xkv with factorQuantization', () => {
  const layout = { nLayers: 5, nHeads: 4, nKvHeads: 2, headDim: 8 };
  const F = 16;
  const T = 40;
  let syn: ReturnType<typeof syntheticCache>;
  beforeAll(async () => {
    await selectBackend('wasm');
    syn = syntheticCache(layout, T, 9);
  });
  afterAll(() => disposeKVCache(syn.cache));

  const host = (t: tf.Tensor) => {
    const d = Float32Array.from(t.dataSync() as Float32Array);
    t.dispose();
    return d;
  };

  for (const apply of ['both', 'basis', 'factors'] as const)
    it(`apply=${apply}: stored factors equal an independent quantize/dequantize of the unquantized factors; bytes exact`, async () => {
      const base = { layersPerGroup: 2, rankK: 3, rankV: 4, exact: true, storage: 'float32' as const };
      const fq = { bits: 4 as const, quantGroupSize: 5, symmetric: false, apply };
      const plain = (await createStrategy({ name: 'xkv', options: base }).compress(syn.cache)) as GroupSvdCache;
      const quant = (await createStrategy({ name: 'xkv', options: { ...base, factorQuantization: fq } }).compress(syn.cache)) as GroupSvdCache;
      let expectBytes = 0;
      for (const kind of ['k', 'v'] as const) {
        for (const g of plain.groups) {
          const R = plain.groupRank(kind, g.index);
          const parts: [string, Float32Array, Float32Array, number, number][] = [
            ['basis', host(plain.basis(kind, g.index)), host(quant.basis(kind, g.index)), T, R],
            ...g.layers.map((l): [string, Float32Array, Float32Array, number, number] => ['factors', host(plain.factor(kind, l)), host(quant.factor(kind, l)), R, F]),
          ];
          for (const [part, p, q, rows, cols] of parts) {
            if (apply === 'both' || apply === part) {
              expect(Array.from(q)).toEqual(Array.from(reference(p, rows, cols, fq).deq, Math.fround));
              const gr = rows * Math.ceil(cols / 5);
              expectBytes += Math.ceil((rows * cols * 4) / 8) + 3 * gr;
            } else {
              expect(Array.from(q)).toEqual(Array.from(p));
              expectBytes += rows * cols * 4;
            }
          }
        }
      }
      expect(quant.byteSize()).toBe(expectBytes);
      const bytes = quant.serialize();
      expect(bytes.length - headerBytes(bytes)).toBe(expectBytes);
      const s = quant.stats();
      expect(s.basisBytes + s.factorBytes).toBe(expectBytes);
      expect(s.measuredRatio).toBeGreaterThan(plain.stats().measuredRatio);
      plain.dispose();
      quant.dispose();
    });
});
