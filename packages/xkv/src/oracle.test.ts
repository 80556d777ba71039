import * as tf from '@tensorflow/tfjs-core';
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStrategy, selectBackend, type KVCache } from '@kvpack/core';
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
    const c = (await createStrategy({ name: 'xkv', options: { ...options, groupSize: G, rankK: r, rankV: r } }).compress(cache)) as GroupSvdCache;
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

  it('reports compress time for the default xKV-4 setting (informational)', async () => {
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
    expect(st.totalBytes).toBe(c.byteSize());
    c.dispose();
  });
});
