import * as tf from '@tensorflow/tfjs-core';
import { beforeAll, describe, expect, it } from 'vitest';
import {
  KvpackError,
  applyRope,
  createStrategy,
  deserializeCache,
  deserializeMlaCache,
  headerBytes,
  isMlaCache,
  mlaDenseBytes,
  ropeInverseFrequencies,
  ropeTableData64,
  selectBackend,
  validateMlaCache,
  yarnAttentionFactor,
  compressesMla,
  registerStrategy,
  unregisterStrategy,
  type CompressedMlaCache,
  type MlaKVCache,
  type RopeConfig,
} from './index.js';
import './dense/index.js';
import { z } from 'zod';
import { syntheticMlaCache, disposeMlaCache } from './conformance.js';

beforeAll(async () => {
  await selectBackend('wasm');
});

describe('MLA latent caches', () => {
  it('dense keeps latents and pre-RoPE keys at float16, rotates keys at their true positions, and round-trips', async () => {
    const cache = syntheticMlaCache(24, {}, 3, { theta: 10000, layout: 'interleaved' }, 5);
    expect(isMlaCache(cache)).toBe(true);
    const start = tf.memory().numTensors;
    const c = (await createStrategy({ name: 'dense' }).compress(cache)) as CompressedMlaCache;
    expect(c.kind).toBe('mla');
    expect(c.byteSize()).toBe(mlaDenseBytes(cache.layout, 24));
    const { nLayers, kvLoraRank: dc, qkRopeHeadDim: dr } = cache.layout;
    // Direct count: L · T · (d_c + d_R) halves.
    expect(c.byteSize()).toBe(nLayers * 24 * (dc + dr) * 2);
    for (let l = 0; l < nLayers; l++) {
      const lat = c.latents(l);
      const kr = c.ropeKeys(l);
      const want = tf.tidy(() => applyRope(cache.ropeKeys[l].reshape([24, 1, dr]) as tf.Tensor3D, cache.rope, { start: 5, count: 24 }).reshape([24, dr]));
      const e1 = tf.tidy(() => tf.max(tf.abs(tf.sub(lat, cache.latents[l]))).dataSync()[0]);
      const e2 = tf.tidy(() => tf.max(tf.abs(tf.sub(kr, want))).dataSync()[0]);
      expect(e1).toBeLessThan(4e-3);
      expect(e1).toBeGreaterThan(0); // float16 storage rounds
      expect(e2).toBeLessThan(4e-3);
      tf.dispose([lat, kr, want]);
    }
    const bytes = c.serialize();
    expect(c.byteSize()).toBe(bytes.length - headerBytes(bytes));
    expect(() => deserializeCache(bytes)).toThrow(/MLA latent cache.*deserializeMlaCache/);
    const r = deserializeMlaCache(bytes);
    const a = c.latents(1);
    const b = r.latents(1);
    expect(Array.from(await b.data())).toEqual(Array.from(await a.data()));
    tf.dispose([a, b]);
    r.dispose();
    c.dispose();
    expect(tf.memory().numTensors).toBe(start);
    disposeMlaCache(cache);
  });

  it('records YaRN RoPE scaling in the serialization and rotates with it after a restore', async () => {
    const rope: RopeConfig = {
      theta: 10000,
      layout: 'interleaved',
      scaling: { type: 'yarn', factor: 40, originalMaxPositionEmbeddings: 4096, betaFast: 32, betaSlow: 1, mscale: 0.707, mscaleAllDim: 0.707 },
    };
    const cache = syntheticMlaCache(12, { nLayers: 2 }, 8, rope, 100);
    const c = (await createStrategy({ name: 'dense', options: { storage: 'float32' } }).compress(cache)) as CompressedMlaCache;
    const r = deserializeMlaCache(c.serialize());
    expect(r.rope).toEqual(rope);
    const a = r.ropeKeys(1);
    const want = tf.tidy(() => applyRope(cache.ropeKeys[1].reshape([12, 1, 8]) as tf.Tensor3D, rope, { start: 100, count: 12 }).reshape([12, 8]));
    expect(Array.from(await a.data())).toEqual(Array.from(await want.data()));
    // With YaRN at factor 40 the slow frequencies are interpolated: the rotation differs from unscaled RoPE.
    const plain = tf.tidy(() => applyRope(cache.ropeKeys[1].reshape([12, 1, 8]) as tf.Tensor3D, { theta: 10000, layout: 'interleaved' }, { start: 100, count: 12 }).reshape([12, 8]));
    expect(tf.tidy(() => tf.max(tf.abs(tf.sub(a, plain))).dataSync()[0])).toBeGreaterThan(1e-3);
    tf.dispose([a, want, plain]);
    r.dispose();
    c.dispose();
    disposeMlaCache(cache);
  });

  it('validation names the layer and tensor at fault', async () => {
    const cache = syntheticMlaCache(8);
    const bad = tf.tensor2d(new Float32Array(8 * cache.layout.kvLoraRank).fill(NaN), [8, cache.layout.kvLoraRank]);
    await expect(validateMlaCache({ ...cache, latents: cache.latents.map((x, l) => (l === 2 ? bad : x)) })).rejects.toThrow(/layer 2 latents contain NaN or Inf/);
    await expect(validateMlaCache({ ...cache, ropeKeys: cache.ropeKeys.slice(1) })).rejects.toThrow(/RoPE key layers but the model has/);
    const wide = tf.zeros([8, cache.layout.qkRopeHeadDim + 2]) as tf.Tensor2D;
    await expect(validateMlaCache({ ...cache, ropeKeys: cache.ropeKeys.map((x, l) => (l === 1 ? wide : x)) })).rejects.toThrow(/layer 1 RoPE keys: shape must be \[8, d_R=/);
    await expect(validateMlaCache({ ...cache, layout: { ...cache.layout, qkRopeHeadDim: 3 } })).rejects.toThrow(KvpackError);
    tf.dispose([bad, wide]);
    disposeMlaCache(cache);
  });
});

describe('strategies without MLA support', () => {
  it('refuse MLA caches with a KvpackError naming the strategy, also when not built by defineStrategy; compressesMla reads the definition', async () => {
    const cache = syntheticMlaCache(8);
    const dense = createStrategy({ name: 'dense' });
    // A hand-written strategy that only knows per-head caches (no mla capability on its definition).
    registerStrategy({
      name: 'mla-test-plain',
      description: 'test: per-head only',
      schema: z.strictObject({}),
      create: (options) => ({ ...dense, name: 'mla-test-plain', options }),
    });
    try {
      const before = tf.memory().numTensors;
      let err: unknown;
      try {
        await createStrategy({ name: 'mla-test-plain' }).compress(cache);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(KvpackError);
      expect((err as KvpackError).code).toBe('unsupported');
      expect((err as Error).message).toMatch(/^strategy "mla-test-plain" does not compress MLA latent caches/);
      expect(tf.memory().numTensors).toBe(before);
      expect(compressesMla('mla-test-plain', {})).toMatch(/declares no MLA support/);
      expect(compressesMla('dense', { storage: 'float16' })).toBe(true);
    } finally {
      unregisterStrategy('mla-test-plain');
      disposeMlaCache(cache);
    }
  });
});

describe('YaRN RoPE scaling', () => {
  it('matches DeepSeek-V2’s yarn frequencies and cos/sin magnitude, recomputed here', () => {
    const rope: RopeConfig = {
      theta: 10000,
      layout: 'interleaved',
      scaling: { type: 'yarn', factor: 40, originalMaxPositionEmbeddings: 4096, betaFast: 32, betaSlow: 1, mscale: 1, mscaleAllDim: 0.5 },
    };
    const d = 64;
    const inv = ropeInverseFrequencies(rope, d);
    // Independent recomputation of DeepSeek's yarn_find_correction_range / yarn_linear_ramp_mask.
    const cd = (r: number) => (d * Math.log(4096 / (r * 2 * Math.PI))) / (2 * Math.log(10000));
    const lo = Math.max(0, Math.floor(cd(32)));
    const hi = Math.min(d - 1, Math.ceil(cd(1)));
    for (let i = 0; i < d / 2; i++) {
      const extra = 1 / 10000 ** ((2 * i) / d);
      const inter = extra / 40;
      const mask = 1 - Math.min(1, Math.max(0, (i - lo) / (hi - lo)));
      expect(inv[i]).toBeCloseTo(inter * (1 - mask) + extra * mask, 15);
    }
    expect(inv[0]).toBeCloseTo(1, 15); // fast dims extrapolate
    expect(inv[d / 2 - 1]).toBeCloseTo(1 / 10000 ** ((d - 2) / d) / 40, 18); // slow dims interpolate
    const m = (0.1 * Math.log(40) + 1) / (0.05 * Math.log(40) + 1);
    expect(yarnAttentionFactor(rope)).toBeCloseTo(m, 14);
    const t = ropeTableData64(rope, d, [7]);
    expect(t.cos[3]).toBeCloseTo(m * Math.cos(7 * inv[3]), 14);
    expect(t.sin[5]).toBeCloseTo(m * Math.sin(7 * inv[5]), 14);
  });
});

export type { MlaKVCache };
