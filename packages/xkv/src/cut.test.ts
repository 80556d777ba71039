// Cutting a compressed cache to a prefix of its tokens (capability `cutPrefix`): xkv (float16,
// float32, int4 factors) and dense; sparse decode refused.
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KvpackError, createStrategy, cutCachePrefix, deserializeCache, disposeKVCache, selectBackend, type CompressedCache, type ModelLayout } from '@kvpack/core';
import { GroupSvdCache } from '@kvpack/strategy-utils';
import './index.js';
import { syntheticCache } from './test-utils.js';

const layout: ModelLayout = { nLayers: 4, nHeads: 4, nKvHeads: 2, headDim: 8 };
const T = 24;
const F = layout.nKvHeads * layout.headDim;

const host = async (x: tf.Tensor) => {
  const d = Float32Array.from((await x.data()) as Float32Array);
  x.dispose();
  return d;
};

/** U[0:t] · B in float64 on the host, from the cut's own stored basis and factor: the pre-RoPE keys or values [t, F] it must rebuild. */
async function oracle(c: GroupSvdCache, kind: 'k' | 'v', layer: number, group: number): Promise<Float64Array> {
  const U = await host(c.basis(kind, group));
  const B = await host(c.factor(kind, layer));
  const R = B.length / F;
  const t = U.length / R;
  const out = new Float64Array(t * F);
  for (let i = 0; i < t; i++) for (let f = 0; f < F; f++) for (let r = 0; r < R; r++) out[i * F + f] += U[i * R + r] * B[r * F + f];
  return out;
}

let start: number;
beforeAll(async () => {
  await selectBackend('wasm');
  start = tf.memory().numTensors;
});
afterAll(() => expect(tf.memory().numTensors).toBe(start));

describe('cutting a compressed cache to a prefix', () => {
  for (const [label, options] of [
    ['xkv float16', { layersPerGroup: 2, rankK: 3, rankV: 4 }],
    ['xkv float32', { layersPerGroup: 2, rankK: 3, rankV: 4, storage: 'float32' }],
    // One layer per group, rank 3: a 4-bit basis row is 12 bits, so a cut at an odd row repacks the codes.
    ['xkv int4 factors', { layersPerGroup: 1, rankK: 3, rankV: 3, factorQuantization: { bits: 4, quantGroupSize: 2, apply: 'both' } }],
  ] as const) {
    it(`${label}: the basis keeps rows [0, t), the factors stay, decode tokens follow; keys and values are U[0:t]·B`, async () => {
      const { cache } = syntheticCache(layout, T, 3);
      const c = (await createStrategy({ name: 'xkv', options }).compress(cache)) as GroupSvdCache;
      disposeKVCache(cache);
      // Three decode tokens in the exact residual buffer.
      const dk = tf.randomNormal([3, 2, 8], 0, 1, 'float32', 5) as tf.Tensor3D;
      const dv = tf.randomNormal([3, 2, 8], 0, 1, 'float32', 6) as tf.Tensor3D;
      for (let l = 0; l < layout.nLayers; l++) c.append(l, dk, dv);
      for (const t of [1, 11, T]) {
        const cut = (await cutCachePrefix(c, t)) as GroupSvdCache;
        expect(cut).toBeInstanceOf(GroupSvdCache);
        expect(cut.prefillLength).toBe(t);
        expect(cut.tokenCount(0)).toBe(t);
        for (const kind of ['k', 'v'] as const) {
          for (const g of cut.groups) {
            const full = await host(c.basis(kind, g.index));
            const R = c.groupRank(kind, g.index);
            // The stored numbers, bit for bit (dequantized codes included).
            expect(await host(cut.basis(kind, g.index))).toEqual(full.subarray(0, t * R));
            for (const l of g.layers) {
              expect(await host(cut.factor(kind, l))).toEqual(await host(c.factor(kind, l)));
              const want = await oracle(cut, kind, l, g.index);
              const got = await host(kind === 'k' ? cut.preRopeKeys(l) : cut.values(l));
              let err = 0;
              let ref = 0;
              for (let i = 0; i < want.length; i++) {
                err = Math.max(err, Math.abs(got[i] - want[i]));
                ref = Math.max(ref, Math.abs(want[i]));
              }
              expect(err / ref).toBeLessThan(1e-5);
            }
          }
        }
        // Post-RoPE keys: the first t rows of the uncut cache's (same rows, same positions).
        const a = await host(cut.keys(2));
        const b = (await host(c.keys(2))).subarray(0, a.length);
        for (let i = 0; i < a.length; i++) expect(Math.abs(a[i] - b[i])).toBeLessThan(1e-5 * (1 + Math.abs(b[i])));
        // The cut survives its own serialization.
        const back = deserializeCache(cut.serialize());
        expect(await host(back.values(1))).toEqual(await host(cut.values(1)));
        back.dispose();
        cut.dispose();
      }
      // Past the prefill: the first two decode tokens, exact.
      const cut = await cutCachePrefix(c, T + 2);
      expect(cut.prefillLength).toBe(T);
      expect(cut.tokenCount(3)).toBe(T + 2);
      const k = await host(cut.keys(3));
      expect(k.subarray(T * F)).toEqual((await host(dk.clone())).subarray(0, 2 * F));
      const v = await host(cut.values(0));
      expect(v.subarray(T * F)).toEqual((await host(dv.clone())).subarray(0, 2 * F));
      expect(v.subarray(0, T * F)).toEqual((await host(c.values(0))).subarray(0, T * F));
      cut.dispose();
      // The source stays usable; bad lengths are refused.
      expect(c.tokenCount(0)).toBe(T + 3);
      for (const bad of [0, T + 4, 2.5]) await expect(cutCachePrefix(c, bad)).rejects.toThrow(/xkv cut: .* is not an integer in \[1, 27\]/);
      tf.dispose([dk, dv]);
      c.dispose();
      await expect(cutCachePrefix(c, 3)).rejects.toMatchObject({ code: 'disposed' });
    });
  }

  it('dense: the stored rows [0, t), bit for bit', async () => {
    const { cache } = syntheticCache(layout, T, 4);
    for (const storage of ['float16', 'float32'] as const) {
      const c = await createStrategy({ name: 'dense', options: { storage } }).compress(cache);
      const cut = await cutCachePrefix(c, 7);
      expect(cut.prefillLength).toBe(7);
      for (let l = 0; l < layout.nLayers; l++) expect(await host(cut.values(l))).toEqual((await host(c.values(l))).subarray(0, 7 * F));
      const a = await host(cut.keys(1));
      const b = (await host(c.keys(1))).subarray(0, 7 * F);
      for (let i = 0; i < a.length; i++) expect(Math.abs(a[i] - b[i])).toBeLessThan(1e-6 * (1 + Math.abs(b[i])));
      cut.dispose();
      c.dispose();
    }
    disposeKVCache(cache);
  });

  it('refuses a sparse-decode xkv cache, saying why', async () => {
    const { cache } = syntheticCache(layout, T, 5);
    const c: CompressedCache = await createStrategy({
      name: 'xkv',
      options: { layersPerGroup: 2, rankK: 3, rankV: 4, decode: 'sparse', sparse: { budget: 8, chunkSize: 4, outlierChunks: 1, localTokens: 4 } },
    }).compress(cache);
    disposeKVCache(cache);
    const e = await cutCachePrefix(c, 8).catch((x) => x);
    expect(e).toBeInstanceOf(KvpackError);
    expect(e.code).toBe('unsupported');
    expect(e.message).toMatch(/cannot cut a xkv cache to a prefix: .*decode: 'sparse'.*local window/);
    await expect((c as GroupSvdCache).cutPrefix(8)).rejects.toThrow(/decode: 'sparse' cannot be cut/);
    c.dispose();
  });
});
