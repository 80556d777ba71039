import * as tf from '@tensorflow/tfjs-core';
import { Matrix, SingularValueDecomposition } from 'ml-matrix';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStrategy, deserializeMlaCache, headerBytes, mlaDenseBytes, selectBackend, type MlaKVCache } from '@kvpack/core';
import { disposeMlaCache, syntheticMlaCache } from '@kvpack/core/conformance';
import type { MlaGroupSvdCache } from '@kvpack/strategy-utils';
import './index.js';

/**
 * xKV on MLA latent caches: the cross-layer SVD of each group's stacked latents [T, G·d_c] against an
 * independent float64 SVD (ml-matrix), bytes counted directly (RoPE keys included), and the RoPE keys
 * rotated at their true positions (float64 rotation written here).
 */
const T = 48;
const START = 7;
let cache: MlaKVCache;
let latents: Float64Array[];
let ropeKeys: Float64Array[];

beforeAll(async () => {
  await selectBackend('wasm');
  cache = syntheticMlaCache(T, { nLayers: 5, kvLoraRank: 24, qkRopeHeadDim: 8 }, 11, { theta: 10000, layout: 'interleaved' }, START);
  latents = cache.latents.map((x) => Float64Array.from(x.dataSync()));
  ropeKeys = cache.ropeKeys.map((x) => Float64Array.from(x.dataSync()));
});
afterAll(() => disposeMlaCache(cache));

/** Rows [T, Σ d] of the layers' matrices side by side, as an ml-matrix. */
function stacked(parts: Float64Array[], d: number): Matrix {
  const m = new Matrix(T, parts.length * d);
  parts.forEach((p, j) => {
    for (let t = 0; t < T; t++) for (let c = 0; c < d; c++) m.set(t, j * d + c, p[t * d + c]);
  });
  return m;
}

/** Relative Frobenius error of the best rank-R approximation (Eckart–Young), float64. */
function svdTailError(m: Matrix, R: number): number {
  const s = new SingularValueDecomposition(m, { computeLeftSingularVectors: false, computeRightSingularVectors: false }).diagonal;
  const all = s.reduce((a, x) => a + x * x, 0);
  const tail = s.slice(R).reduce((a, x) => a + x * x, 0);
  return Math.sqrt(tail / all);
}

/** Relative Frobenius error of reconstructed layers against the originals, float64. */
function relError(orig: Float64Array[], got: Float32Array[]): number {
  let num = 0;
  let den = 0;
  orig.forEach((o, j) => {
    for (let i = 0; i < o.length; i++) {
      num += (o[i] - got[j][i]) ** 2;
      den += o[i] ** 2;
    }
  });
  return Math.sqrt(num / den);
}

const host = (x: tf.Tensor) => {
  const d = Float32Array.from(x.dataSync() as Float32Array);
  x.dispose();
  return d;
};

describe('xkv on MLA latent caches', () => {
  for (const storage of ['float32', 'float16'] as const) {
    it(`reproduces the float64 truncated-SVD error of every group's stacked latents within 1% (exact, ${storage})`, async () => {
      const G = 2;
      const r = 5;
      const c = (await createStrategy({ name: 'xkv', options: { layersPerGroup: G, exact: true, storage, mla: { rank: r } } }).compress(cache)) as MlaGroupSvdCache;
      expect(c.kind).toBe('mla');
      expect(c.groups.map((g) => g.layers)).toEqual([[0, 1], [2, 3], [4]]);
      for (const g of c.groups) {
        const R = r * g.layers.length;
        const want = svdTailError(stacked(g.layers.map((l) => latents[l]), 24), R);
        const got = relError(g.layers.map((l) => latents[l]), g.layers.map((l) => host(c.latents(l))));
        expect(want).toBeGreaterThan(0.01); // a truncation that loses something
        expect(Math.abs(got - want) / want, `group ${g.index}: ${got} vs float64 ${want}`).toBeLessThan(0.01);
        console.log(`xkv MLA exact ${storage}: group ${g.index} latent error ${got.toFixed(6)} vs float64 SVD ${want.toFixed(6)} (${((100 * Math.abs(got - want)) / want).toFixed(3)}% apart)`);
      }
      c.dispose();
    });
  }

  it('counts every stored byte, the exact RoPE keys included, and bytes = serialized payload', async () => {
    const G = 2;
    const r = 5;
    const c = await createStrategy({ name: 'xkv', options: { layersPerGroup: G, mla: { rank: r } } }).compress(cache);
    // Direct count at float16: per group U_g [T, R] and n factors [R, d_c]; per layer k_R [T, d_R].
    const groups = [2, 2, 1];
    const latentBytes = groups.reduce((a, n) => a + (T * r * n + n * r * n * 24) * 2, 0);
    const ropeBytes = 5 * T * 8 * 2;
    expect(c.byteSize()).toBe(latentBytes + ropeBytes);
    const bytes = c.serialize();
    expect(c.byteSize()).toBe(bytes.length - headerBytes(bytes));
    const ratio = mlaDenseBytes(cache.layout, T) / c.byteSize();
    expect(ratio).toBeCloseTo((5 * T * (24 + 8) * 2) / (latentBytes + ropeBytes), 12);
    expect(ratio).toBeLessThan((5 * T * (24 + 8) * 2) / latentBytes); // the RoPE keys are not free
    c.dispose();
  });

  it('keeps the RoPE keys exact (float16) and rotates them at their true positions', async () => {
    const c = await createStrategy({ name: 'xkv', options: { layersPerGroup: 2, mla: { rank: 5 } } }).compress(cache);
    const d = 8;
    for (let l = 0; l < 5; l++) {
      const got = host(c.ropeKeys(l));
      const k = ropeKeys[l];
      let worst = 0;
      for (let t = 0; t < T; t++) {
        for (let i = 0; i < d / 2; i++) {
          const a = (START + t) * Math.pow(10000, (-2 * i) / d);
          const x0 = k[t * d + 2 * i];
          const x1 = k[t * d + 2 * i + 1];
          worst = Math.max(worst, Math.abs(got[t * d + 2 * i] - (x0 * Math.cos(a) - x1 * Math.sin(a))), Math.abs(got[t * d + 2 * i + 1] - (x0 * Math.sin(a) + x1 * Math.cos(a))));
        }
      }
      expect(worst, `layer ${l}`).toBeLessThan(1e-2); // float16 storage of values of size ~3
    }
    c.dispose();
  });

  it("compresses the RoPE keys by their own cross-layer SVD with ropeKeys: 'svd' (float64 error, bytes counted)", async () => {
    const c = (await createStrategy({ name: 'xkv', options: { layersPerGroup: 2, exact: true, storage: 'float32', mla: { rank: 5, ropeKeys: 'svd', ropeRank: 3 } } }).compress(cache)) as MlaGroupSvdCache;
    const d = 8;
    for (const g of c.groups) {
      const n = g.layers.length;
      const want = svdTailError(stacked(g.layers.map((l) => ropeKeys[l]), d), 3 * n);
      // Undo the rotation in float64 to compare the pre-RoPE reconstruction.
      const pre = g.layers.map((l) => {
        const post = host(c.ropeKeys(l));
        const out = new Float32Array(post.length);
        for (let t = 0; t < T; t++)
          for (let i = 0; i < d / 2; i++) {
            const a = (START + t) * Math.pow(10000, (-2 * i) / d);
            const y0 = post[t * d + 2 * i];
            const y1 = post[t * d + 2 * i + 1];
            out[t * d + 2 * i] = y0 * Math.cos(a) + y1 * Math.sin(a);
            out[t * d + 2 * i + 1] = -y0 * Math.sin(a) + y1 * Math.cos(a);
          }
        return out;
      });
      const got = relError(g.layers.map((l) => ropeKeys[l]), pre);
      expect(Math.abs(got - want) / want, `group ${g.index}: ${got} vs ${want}`).toBeLessThan(0.01);
    }
    const groups = [2, 2, 1];
    const direct = groups.reduce((a, n) => a + (T * 5 * n + n * 5 * n * 24) * 4 + (T * 3 * n + n * 3 * n * 8) * 4, 0);
    expect(c.byteSize()).toBe(direct);
    c.dispose();
  });

  it('round-trips through deserializeMlaCache bit for bit, decode tokens included, and leaks nothing', async () => {
    const start = tf.memory().numTensors;
    const c = await createStrategy({ name: 'xkv', options: { layersPerGroup: 3, mla: { rank: 4, ropeKeys: 'svd', ropeRank: 2 }, factorQuantization: { bits: 4 } } }).compress(cache);
    const lat = tf.randomNormal([2, 24], 0, 1, 'float32', 3) as tf.Tensor2D;
    const kr = tf.randomNormal([2, 8], 0, 1, 'float32', 4) as tf.Tensor2D;
    c.append(4, lat, kr);
    expect(c.tokenCount(4)).toBe(T + 2);
    const bytes = c.serialize();
    expect(c.byteSize()).toBe(bytes.length - headerBytes(bytes));
    const r = deserializeMlaCache(bytes);
    for (const l of [0, 4]) {
      expect(Array.from(host(r.latents(l)))).toEqual(Array.from(host(c.latents(l))));
      expect(Array.from(host(r.ropeKeys(l)))).toEqual(Array.from(host(c.ropeKeys(l))));
    }
    const tail = host(tf.tidy(() => r.latents(4).slice([T, 0], [2, 24])));
    expect(Array.from(tail)).toEqual(Array.from(lat.dataSync()));
    tf.dispose([lat, kr]);
    r.dispose();
    c.dispose();
    expect(tf.memory().numTensors).toBe(start);
  });

  it('refuses a latent rank above min(T, G·d_c) and sparse decode, naming the problem', async () => {
    await expect(createStrategy({ name: 'xkv', options: { layersPerGroup: 1, mla: { rank: 25 } } }).compress(cache)).rejects.toThrow(/latent rank 25 is out of range \[1, min\(T=48, features=24\) = 24\]/);
    await expect(createStrategy({ name: 'xkv', options: { layersPerGroup: 2, mla: { rank: 2, ropeKeys: 'svd', ropeRank: 9 } } }).compress(cache)).rejects.toThrow(/RoPE key rank 18/);
    await expect(createStrategy({ name: 'xkv', options: { decode: 'sparse' } }).compress(cache)).rejects.toThrow(/strategy "xkv" does not compress MLA latent caches: decode: 'sparse'/);
  });

  it('meets a target ratio measured with the RoPE keys counted', async () => {
    for (const targetRatio of [2, 3]) {
      const c = await createStrategy({ name: 'xkv', options: { layersPerGroup: 2, targetRatio } }).compress(cache);
      const ratio = mlaDenseBytes(cache.layout, T) / c.byteSize();
      expect(ratio).toBeGreaterThanOrEqual(targetRatio);
      expect(ratio).toBeLessThan(targetRatio * 1.5);
      c.dispose();
    }
  });
});
