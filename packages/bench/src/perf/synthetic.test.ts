import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { disposeKVCache, selectBackend, type ModelLayout } from '@kvpack/core';
import { cacheStructure, channelOutlierRatio, type CacheStructure } from './structure.js';
import {
  mixingBasis,
  plantedAlignment,
  plantedEnergyFraction,
  plantedOutlierRatio,
  plantedSpectrum,
  syntheticLlamaCache,
  type SyntheticCache,
} from './synthetic.js';

// A small cache with the generator's structure: F = H_kv·d = 64 (a power of 2: Hadamard mixing), T ≫ F.
const layout: ModelLayout = { nLayers: 3, nHeads: 4, nKvHeads: 2, headDim: 32 };
const T = 4096;
const F = 64;
const plain = { outlierPairs: 0, channelSpread: 0 };
const keys = { ...plain, decay: 0.8, noise: 0.05, coupling: 0.9, couplingDecay: 0.05 };
const values = { ...plain, decay: 0.5, noise: 0.1, coupling: 0.8, couplingDecay: 0 };

function dispose(c: SyntheticCache): void {
  disposeKVCache(c);
}

let start = 0;
beforeAll(async () => {
  await selectBackend('wasm');
  start = tf.memory().numTensors;
});
afterAll(() => {
  expect(tf.memory().numTensors).toBe(start);
});

describe('closed forms of the planted structure', () => {
  it('the spectrum has unit energy, descends, and holds `noise` as a floor', () => {
    const s = plantedSpectrum({ decay: 1, noise: 0.1 }, 16);
    let e = 0;
    for (let j = 0; j < 16; j++) e += s[j] ** 2;
    expect(e).toBeCloseTo(1, 12);
    for (let j = 1; j < 16; j++) expect(s[j]).toBeLessThan(s[j - 1]);
    // σ_j² = 0.9·(j+1)^-2 / Σ_i (i+1)^-2 + 0.1/16, written out for j = 0 and 15
    let z = 0;
    for (let i = 1; i <= 16; i++) z += i ** -2;
    expect(s[0] ** 2).toBeCloseTo(0.9 / z + 0.1 / 16, 12);
    expect(s[15] ** 2).toBeCloseTo((0.9 * 16 ** -2) / z + 0.1 / 16, 12);
    expect(plantedEnergyFraction({ decay: 0, noise: 0 }, 10, 3)).toBeCloseTo(0.3, 12); // flat spectrum: r/F
  });
  it('alignment: a² + (1 − a²)·k/T for constant coupling', () => {
    expect(plantedAlignment({ coupling: 0.9, couplingDecay: 0 }, 8, 4096)).toBeCloseTo(0.81 + 0.19 * (8 / 4096), 12);
    expect(plantedAlignment({ coupling: 0, couplingDecay: 0 }, 16, 1024)).toBeCloseTo(16 / 1024, 12);
  });
  it('the mixing basis is orthonormal, Hadamard (±1/√F) for powers of two, DCT otherwise', () => {
    for (const n of [8, 12]) {
      const B = mixingBasis(n);
      for (let i = 0; i < n; i++)
        for (let j = 0; j < n; j++) {
          let dot = 0;
          for (let c = 0; c < n; c++) dot += B[c * n + i] * B[c * n + j];
          expect(dot).toBeCloseTo(i === j ? 1 : 0, 12);
        }
    }
    expect(Array.from(mixingBasis(8)).every((v) => Math.abs(Math.abs(v) - 1 / Math.sqrt(8)) < 1e-15)).toBe(true);
  });
});

describe('syntheticLlamaCache', () => {
  let cache: SyntheticCache;
  let s: CacheStructure;
  beforeAll(async () => {
    cache = await syntheticLlamaCache({ T, layout, seed: 3, keys, values, chunkTokens: 1500 });
    s = await cacheStructure(cache, 'planted', { alignK: 8, energyRanks: [1 / 16, 1 / 8, 1 / 4] });
  });
  afterAll(() => dispose(cache));

  it('has the layout, shapes and finite values asked for', async () => {
    expect(cache.keys).toHaveLength(3);
    expect(cache.keys[0].shape).toEqual([T, 2, 32]);
    expect(cache.values[2].shape).toEqual([T, 2, 32]);
    expect(cache.queries).toBeUndefined();
    const m = tf.tidy(() => tf.stack([tf.max(tf.abs(cache.keys[1])), tf.sqrt(tf.mean(tf.square(cache.keys[1]))), tf.sqrt(tf.mean(tf.square(cache.values[1])))]));
    const [mx, rmsK, rmsV] = await m.data();
    m.dispose();
    expect(Number.isFinite(mx)).toBe(true);
    expect(rmsK).toBeCloseTo(1, 1); // rms option: keys 1, values 0.5 (defaults)
    expect(rmsV).toBeCloseTo(0.5, 1);
  });

  it('captured energy matches Σ_{j<r} σ_j² of the planted spectrum', () => {
    s.ranks.forEach((r, i) => {
      expect(Math.abs(s.keys.energy[i] - plantedEnergyFraction(keys, F, r))).toBeLessThan(0.02);
      expect(Math.abs(s.values.energy[i] - plantedEnergyFraction(values, F, r))).toBeLessThan(0.02);
    });
  });

  it('adjacent layers share their top-k token subspace at the planted alignment, while per-token cosines are ≈ 0', () => {
    expect(Math.abs(s.keys.alignment - plantedAlignment(keys, 8, T))).toBeLessThan(0.04);
    expect(Math.abs(s.values.alignment - plantedAlignment(values, 8, T))).toBeLessThan(0.04);
    expect(s.keys.alignment).toBeGreaterThan(0.6); // far above chance (k/T = 0.002)
    expect(Math.abs(s.keys.tokenCosine)).toBeLessThan(0.1);
    expect(Math.abs(s.values.tokenCosine)).toBeLessThan(0.1);
  });

  it('without outliers every channel has the same RMS (Hadamard mixing)', () => {
    expect(s.keys.outlierRatio).toBeGreaterThan(1);
    expect(s.keys.outlierRatio).toBeLessThan(1.15);
  });

  it('is deterministic in the seed and independent of the chunk size', async () => {
    const a = await syntheticLlamaCache({ T: 300, layout, seed: 9, chunkTokens: 64 });
    const b = await syntheticLlamaCache({ T: 300, layout, seed: 9, chunkTokens: 4096 });
    const c = await syntheticLlamaCache({ T: 300, layout, seed: 10 });
    const diff = (x: tf.Tensor, y: tf.Tensor) => tf.tidy(() => tf.max(tf.abs(tf.sub(x, y))).dataSync()[0]);
    for (let l = 0; l < 3; l++) {
      expect(diff(a.keys[l], b.keys[l])).toBeLessThan(1e-5);
      expect(diff(a.values[l], b.values[l])).toBeLessThan(1e-5);
    }
    expect(diff(a.keys[0], c.keys[0])).toBeGreaterThan(0.1);
    [a, b, c].forEach(dispose);
  });
});

describe('outlier key channels', () => {
  it('outlier channels have RMS outlierGain × the others, on RoPE pairs (c, c + d/2)', async () => {
    const gain = 5;
    const k = { ...keys, outlierPairs: 1, outlierGain: gain };
    const c = await syntheticLlamaCache({ T, layout, seed: 4, keys: k, values, observationWindow: 8 });
    try {
      expect(plantedOutlierRatio(k)).toBe(gain);
      const ratio = await channelOutlierRatio(c.keys[0]);
      expect(Math.abs(ratio / gain - 1)).toBeLessThan(0.08);
      // The two largest channels of each head are one rotate-half pair.
      const rms = tf.tidy(() => tf.sqrt(tf.mean(tf.square(tf.reshape(c.keys[1], [T, F])), 0)).dataSync());
      for (let h = 0; h < 2; h++) {
        const head = Array.from(rms.slice(h * 32, h * 32 + 32));
        const top = head
          .map((v, i) => [v, i] as const)
          .sort((p, q) => q[0] - p[0])
          .slice(0, 2)
          .map((x) => x[1])
          .sort((p, q) => p - q);
        expect(top[1] - top[0]).toBe(16);
      }
      // Queries of the observation window: [w, H, d], post-RoPE.
      expect(c.queries).toHaveLength(3);
      expect(c.queries![0].shape).toEqual([8, 4, 32]);
    } finally {
      dispose(c);
    }
  });

  it('rejects bad parameters with a clear error', async () => {
    await expect(syntheticLlamaCache({ T: 0 })).rejects.toThrow(/T must be a positive integer/);
    await expect(syntheticLlamaCache({ T: 8, layout, keys: { noise: 1 } })).rejects.toThrow(/keys\.noise/);
    await expect(syntheticLlamaCache({ T: 8, layout, observationWindow: 9 })).rejects.toThrow(/observationWindow/);
  });
});
