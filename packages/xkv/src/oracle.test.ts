import * as tf from '@tensorflow/tfjs-core';
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStrategy, headerBytes, selectBackend, type KVCache } from '@kvpack/core';
import { LlamaModel, loadLlama2cCheckpoint } from '@kvpack/models';
import './index.js';
import type { GroupSvdCache } from '@kvpack/strategy-utils';
import { groupError, storiesPaths } from './test-utils.js';

/**
 * xKV against stories260K's oracle.json: the exact truncated-SVD relative Frobenius error of every
 * layer group's pre-RoPE keys and values (float64, independent of this code), for G ∈ {1, 2, 4, 5}
 * and per-layer rank r ∈ {4, 8, 16, 24}, on the pre-RoPE KV cache of the oracle's greedy sequence
 * (its first T = 256 positions) as computed by @kvpack/models.
 */
const S = storiesPaths();

interface SvdOracle {
  key_pre_rope: Record<string, number[]>;
  value: Record<string, number[]>;
}

describe.skipIf(!S.have)(`xkv vs stories260K oracle.json${S.skip}`, () => {
  let cache: KVCache;
  let keys: Float32Array[];
  let values: Float32Array[];
  let oracle: SvdOracle;

  beforeAll(async () => {
    await selectBackend('wasm');
    const o = JSON.parse(readFileSync(S.oracle, 'utf8'));
    oracle = o.svd_relative_frobenius_error;
    const model = new LlamaModel(await loadLlama2cCheckpoint(S.bin));
    const r = await model.prefill(o.greedy_ids.slice(0, 256), { logits: 'last' });
    r.logits.dispose();
    model.dispose();
    cache = r.cache;
    expect([cache.layout.nLayers, cache.keys[0].shape[0], cache.layout.nKvHeads, cache.layout.headDim]).toEqual(o.kv_shape);
    keys = cache.keys.map((k) => Float32Array.from(k.dataSync()));
    values = cache.values.map((v) => Float32Array.from(v.dataSync()));
  });
  afterAll(() => tf.dispose([...(cache?.keys ?? []), ...(cache?.values ?? [])]));

  const host = (t: tf.Tensor) => {
    const d = Float32Array.from(t.dataSync() as Float32Array);
    t.dispose();
    return d;
  };

  async function check(options: Record<string, unknown>, G: number, r: number, tol: number): Promise<number> {
    const c = (await createStrategy({ name: 'xkv', options: { ...options, layersPerGroup: G, rankK: r, rankV: r } }).compress(cache)) as GroupSvdCache;
    expect(c.groups.length).toBe(oracle.key_pre_rope[`G${G}_r${r}`].length);
    let worst = 0;
    for (const g of c.groups) {
      const errK = groupError(g.layers.map((l) => keys[l]), g.layers.map((l) => host(c.preRopeKeys(l))));
      const errV = groupError(g.layers.map((l) => values[l]), g.layers.map((l) => host(c.values(l))));
      const refK = oracle.key_pre_rope[`G${G}_r${r}`][g.index];
      const refV = oracle.value[`G${G}_r${r}`][g.index];
      expect(Math.abs(errK - refK) / refK, `keys G=${G} r=${r} group ${g.index}: ${errK} vs ${refK}`).toBeLessThan(tol);
      expect(Math.abs(errV - refV) / refV, `values G=${G} r=${r} group ${g.index}: ${errV} vs ${refV}`).toBeLessThan(tol);
      worst = Math.max(worst, Math.abs(errK - refK) / refK, Math.abs(errV - refV) / refV);
    }
    c.dispose();
    return worst;
  }

  const cases = [1, 2, 4, 5].flatMap((G) => [4, 8, 16, 24].map((r) => [G, r] as const));

  it.each(cases)('exact mode, float32 storage, G=%i r=%i: within 1% of the oracle for every group', async (G, r) => {
    await check({ exact: true, storage: 'float32' }, G, r, 0.01);
  });

  it.each(cases)('default randomized mode, float16 storage, G=%i r=%i: within 10% of the oracle', async (G, r) => {
    await check({}, G, r, 0.1);
  });

  it('reports compress time for the default xKV-4 setting; its bytes match the closed form', async () => {
    const s = createStrategy({ name: 'xkv', options: {} });
    (await s.compress(cache)).dispose(); // warm-up
    const t0 = performance.now();
    const runs = 5;
    for (let i = 0; i < runs; i++) (await s.compress(cache)).dispose();
    const c = (await s.compress(cache)) as GroupSvdCache;
    const st = c.stats();
    console.log(
      `stories260K T=256, xkv defaults (G=4, r_K=16, r_V=24, fp16): compress ${((performance.now() - t0) / runs).toFixed(1)} ms/run, ` +
        `measured ratio ${st.measuredRatio.toFixed(3)}, paper formula ${st.paperRatio.toFixed(3)}`,
    );
    // Bytes by closed form, not from byteSize(): per group of n layers and per keys / values at
    // per-layer rank r, the basis T·(r·n) and the n factors n·(r·n)·H_kv·d float16 elements (2 bytes);
    // no decode tokens yet. Groups of G = 4 from layer 0, the last one shorter.
    const { nLayers: L, nKvHeads, headDim } = cache.layout;
    const T = 256;
    const F = nKvHeads * headDim;
    let basis = 0;
    let factors = 0;
    for (let s0 = 0; s0 < L; s0 += 4) {
      const n = Math.min(4, L - s0);
      for (const r of [16, 24]) {
        basis += T * r * n * 2;
        factors += n * (r * n) * F * 2;
      }
    }
    expect(st.groups.map((g) => [g.layers.length, g.rankK, g.rankV])).toEqual(
      Array.from({ length: Math.ceil(L / 4) }, (_, i) => Math.min(4, L - 4 * i)).map((n) => [n, 16 * n, 24 * n]),
    );
    expect(st.basisBytes).toBe(basis);
    expect(st.factorBytes).toBe(factors);
    expect(st.residualBytes).toBe(0);
    expect(st.totalBytes).toBe(basis + factors);
    expect(c.byteSize()).toBe(basis + factors);
    const bytes = c.serialize();
    expect(bytes.length - headerBytes(bytes)).toBe(basis + factors);
    // Dense fp16 prefill: keys and values of every layer, T·H_kv·d elements at 2 bytes.
    expect(st.denseBytes).toBe(2 * L * T * F * 2);
    expect(st.measuredRatio).toBe((2 * L * T * F * 2) / (basis + factors));
    // The authors' count (scripts/calc_kv_comp_rate.py): every group, the shorter last one too, is
    // charged G·r: ⌈L/G⌉·T·(R_K + R_V) + L·H_kv·d·(R_K + R_V) elements against 2·L·T·H_kv·d, both 16-bit.
    const paperElems = Math.ceil(L / 4) * T * (4 * 16 + 4 * 24) + L * F * (4 * 16 + 4 * 24);
    expect(st.paperRatio).toBe((2 * L * T * F) / paperElems);
    if (L % 4 !== 0) expect(st.paperRatio).toBeLessThan(st.measuredRatio);
    c.dispose();
  });
});
