import * as tf from '@tensorflow/tfjs-core';
import { disposeKVCache } from '@kvpack/core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStrategy, selectBackend } from '@kvpack/core';
import type { GroupSvdCache } from '@kvpack/strategy-utils';
import './index.js'; // registers xkv
import { hconcat, singularValues, syntheticCache } from './test-utils.js';

/**
 * Where the singular values go. xKV stores U·√Σ as the shared basis and √Σ·Vᵀ as the per-layer
 * factors (the authors' `fake_svd`): for an exact SVD, column j of the stored basis U' and row j of
 * the group's stored factors B' = [B'_l₁ … B'_l_n] both have norm √σ_j, and U'ᵀU' = B'B'ᵀ = Σ.
 * Putting Σ wholly in one side (U·Σ and Vᵀ, or U and Σ·Vᵀ) reconstructs the same cache, so only
 * this test sees it. σ_j comes from an independent float64 SVD (ml-matrix) of the group's
 * [T, n·H_kv·d] matrix; the norms are taken in float64 from the stored float32 values.
 */
const layout = { nLayers: 4, nHeads: 4, nKvHeads: 2, headDim: 8 };
const F = layout.nKvHeads * layout.headDim;
const T = 40;
let syn: ReturnType<typeof syntheticCache>;

beforeAll(async () => {
  await selectBackend('wasm');
  syn = syntheticCache(layout, T, 5);
});
afterAll(() => disposeKVCache(syn.cache));

function host(t: tf.Tensor): Float32Array {
  const d = Float32Array.from(t.dataSync() as Float32Array);
  t.dispose();
  return d;
}

describe('xkv (and svd, G = 1): Σ is split evenly between basis and factors', () => {
  it.each([
    ['xkv', { layersPerGroup: 2, rankK: 3, rankV: 4 }],
    ['xkv', { layersPerGroup: 4, rankK: 2, rankV: 2 }],
    ['xkv', { layersPerGroup: 1, rankK: 4, rankV: 5 }], // G = 1: what the per-layer svd baseline runs
  ] as const)('%s %o, exact float32: ‖U\'[:,j]‖ = ‖B\'[j,:]‖ = √σ_j (float64 SVD), U\'ᵀU\' = B\'B\'ᵀ = diag(σ)', async (name, opts) => {
    const c = (await createStrategy({ name, options: { ...opts, exact: true, storage: 'float32' } }).compress(syn.cache)) as GroupSvdCache;
    let checked = 0;
    for (const g of c.groups) {
      const n = g.layers.length;
      for (const kind of ['k', 'v'] as const) {
        const R = c.groupRank(kind, g.index);
        const src = kind === 'k' ? syn.keys : syn.values;
        const sigma = singularValues(hconcat(g.layers.map((l) => src[l]), T, F), T, n * F);
        const U = host(c.basis(kind, g.index)); // [T, R]
        const B = g.layers.map((l) => host(c.factor(kind, l))); // n × [R, F]
        // Gram matrices in float64: (U'ᵀU')_ij and (B'B'ᵀ)_ij over all the group's layers.
        const gu = (i: number, j: number) => {
          let s = 0;
          for (let t = 0; t < T; t++) s += U[t * R + i] * U[t * R + j];
          return s;
        };
        const gb = (i: number, j: number) => {
          let s = 0;
          for (const b of B) for (let f = 0; f < F; f++) s += b[i * F + f] * b[j * F + f];
          return s;
        };
        const what = `${name} group ${g.index} ${kind}`;
        for (let j = 0; j < R; j++) {
          const colNorm = Math.sqrt(gu(j, j));
          const rowNorm = Math.sqrt(gb(j, j));
          const root = Math.sqrt(sigma[j]);
          expect(Math.abs(colNorm - rowNorm) / root, `${what} j=${j}: ‖U'[:,j]‖ = ${colNorm} vs ‖B'[j,:]‖ = ${rowNorm}`).toBeLessThan(1e-4);
          expect(Math.abs(colNorm - root) / root, `${what} j=${j}: ‖U'[:,j]‖ = ${colNorm} vs √σ_j = ${root} (σ_j = ${sigma[j]})`).toBeLessThan(1e-4);
          expect(Math.abs(rowNorm - root) / root, `${what} j=${j}: ‖B'[j,:]‖ = ${rowNorm} vs √σ_j = ${root}`).toBeLessThan(1e-4);
          for (let i = 0; i < j; i++) {
            expect(Math.abs(gu(i, j)) / sigma[0], `${what}: (U'ᵀU')_${i}${j}`).toBeLessThan(1e-5);
            expect(Math.abs(gb(i, j)) / sigma[0], `${what}: (B'B'ᵀ)_${i}${j}`).toBeLessThan(1e-5);
          }
          checked++;
        }
      }
    }
    expect(checked).toBe(c.groups.reduce((a, g) => a + c.groupRank('k', g.index) + c.groupRank('v', g.index), 0));
    c.dispose();
  });
});
