import * as tf from '@tensorflow/tfjs-core';
import { existsSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { LlamaModel, loadLlama2cCheckpoint } from '@kvpack/models';
import { runStrategyConformance, syntheticCache, disposeKVCache, expectOptionBounds } from '@kvpack/core/conformance';
import { createStrategy, denseCacheBytes, KvpackError, MAX_FEATURES, MAX_OVERSAMPLE, MAX_POWER_ITERS, MAX_SEED, selectBackend, type KVCache } from '@kvpack/core';
import { paperCompressionRatio, type GroupSvdCache } from '@kvpack/strategy-utils';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { SvdOptionsSchema } from './index.js';

// Synthetic cache: T = 64, L = 4, H_kv = 2, d = 16 (H_kv·d = 32 = full per-layer rank).
runStrategyConformance('svd', {
  compressing: { rankK: 4, rankV: 6 },
  lossless: { rankK: 32, rankV: 32, exact: true },
  mla: { compressing: { mla: { rank: 4 } }, lossless: { exact: true, mla: { rank: 24, ropeKeys: 'svd', ropeRank: 8 } } },
  badOptions: [{ layersPerGroup: 2 }, { rankK: -1 }, { rankV: 0 }, { storage: 'int8' }, { factorQuantization: { bits: 5 } }, { targetRatio: 4, rankFraction: 0.5 }, { rankFraction: 0 }, { targetRatio: 0.9 }],
  // Per-layer ranks above min(T = 64, H_kv·d = 32), and 0.
  failingCompress: [{ rankK: 33 }],
});

describe('svd = xkv with groups of one layer', () => {
  let cache: KVCache;
  beforeAll(async () => {
    await selectBackend('wasm');
    cache = syntheticCache(64);
  });
  afterAll(() => disposeKVCache(cache));

  it('targetRatio and rankFraction resolve per-layer ranks and report them', async () => {
    // G = 1, T = 64, F = 32: ratio = 2·T·F / ((T + F)(R_K + R_V)) = 4096 / (96 (R_K + R_V)); with the
    // default 16 : 24 proportion, ⌊16s⌋ + ⌊24s⌋ ≤ 10.67 first fails at s = 7/24 (4 + 7): ranks 4 and 6.
    const s = (await createStrategy({ name: 'svd', options: { targetRatio: 4 } }).compress(cache)) as GroupSvdCache;
    expect(s.stats().groups.map((g) => [g.rankK, g.rankV])).toEqual([[4, 6], [4, 6], [4, 6], [4, 6]]);
    expect(denseCacheBytes(cache.layout, 64) / s.byteSize()).toBeCloseTo(4096 / 960, 12);
    s.dispose();
    const f = (await createStrategy({ name: 'svd', options: { rankFraction: 0.25 } }).compress(cache)) as GroupSvdCache;
    expect(f.stats().groups.map((g) => [g.rankK, g.rankV])).toEqual([[8, 8], [8, 8], [8, 8], [8, 8]]);
    f.dispose();
  });

  it('has no layersPerGroup option (it is always 1)', () => {
    expect('layersPerGroup' in SvdOptionsSchema.shape).toBe(false);
  });

  it('measured ratio (fp16) equals the paper formula at G = 1: T·F / ((r_K + r_V)(T + F)) · 2', async () => {
    const s = (await createStrategy({ name: 'svd', options: { rankK: 4, rankV: 6 } }).compress(cache)) as GroupSvdCache;
    const T = 64;
    const F = 32;
    const expected = (2 * T * F) / ((4 + 6) * (T + F));
    expect(denseCacheBytes(cache.layout, T) / s.byteSize()).toBeCloseTo(expected, 12);
    expect(s.stats().paperRatio).toBeCloseTo(expected, 12);
    expect(paperCompressionRatio({ layout: cache.layout, tokens: T, layersPerGroup: 1, rankK: 4, rankV: 6 })).toBeCloseTo(expected, 12);
    s.dispose();
  });

  it('a rank above H_kv·d is a rank error naming the layer group and the bound', async () => {
    const p = createStrategy({ name: 'svd', options: { rankK: 33, rankV: 4 } }).compress(cache);
    await expect(p).rejects.toThrow(KvpackError);
    await expect(createStrategy({ name: 'svd', options: { rankK: 33, rankV: 4 } }).compress(cache)).rejects.toThrow(
      /svd: group 0 \(layers 0–0\) key rank 33 .*min\(T=64, features=32\) = 32/,
    );
  });
});

// ---- stories260K oracle: per-layer ("G1") truncated-SVD errors of pre-RoPE keys and values ----
const repoRoot = fileURLToPath(new URL('../../../../', import.meta.url));
const STORIES = process.env.KVPACK_MODELS_DIR ? resolve(process.env.KVPACK_MODELS_DIR, 'stories260K') : resolve(repoRoot, 'models', 'stories260K');
const HAVE = existsSync(resolve(STORIES, 'stories260K_q80.bin')) && existsSync(resolve(STORIES, 'oracle.json'));

describe.skipIf(!HAVE)(`svd vs stories260K oracle.json (G1 entries)${HAVE ? '' : ` (SKIPPED: ${STORIES} not found; set KVPACK_MODELS_DIR)`}`, () => {
  let cache: KVCache;
  let oracle: { key_pre_rope: Record<string, number[]>; value: Record<string, number[]> };
  beforeAll(async () => {
    await selectBackend('wasm');
    const o = JSON.parse(readFileSync(resolve(STORIES, 'oracle.json'), 'utf8'));
    oracle = o.svd_relative_frobenius_error;
    const model = new LlamaModel(await loadLlama2cCheckpoint(resolve(STORIES, 'stories260K_q80.bin')));
    const r = await model.prefill(o.greedy_ids.slice(0, 256), { logits: 'last' });
    r.logits.dispose();
    model.dispose();
    cache = r.cache; // pre-RoPE keys and values of the first 256 positions
  });
  afterAll(() => tf.dispose([...(cache?.keys ?? []), ...(cache?.values ?? [])]));

  /** ‖X − X̂‖_F / ‖X‖_F in float64 on the host. */
  function relErr(x: tf.Tensor, approx: tf.Tensor): number {
    const a = x.dataSync();
    const b = approx.dataSync();
    approx.dispose();
    let num = 0;
    let den = 0;
    for (let i = 0; i < a.length; i++) {
      num += (a[i] - b[i]) ** 2;
      den += a[i] ** 2;
    }
    return Math.sqrt(num / den);
  }

  for (const [label, options, tol] of [
    ['exact mode, float32 storage, within 1%', { exact: true, storage: 'float32' }, 0.01],
    ['default randomized mode, float16 storage, within 10%', {}, 0.1],
  ] as const) {
    it.each([4, 8, 16, 24])(`${label}: rank %i, every layer`, async (r) => {
      const c = (await createStrategy({ name: 'svd', options: { ...options, rankK: r, rankV: r } }).compress(cache)) as GroupSvdCache;
      for (let l = 0; l < cache.layout.nLayers; l++) {
        const ek = relErr(cache.keys[l], c.preRopeKeys(l));
        const ev = relErr(cache.values[l], c.values(l));
        const rk = oracle.key_pre_rope[`G1_r${r}`][l];
        const rv = oracle.value[`G1_r${r}`][l];
        expect(Math.abs(ek - rk) / rk, `layer ${l} keys ${ek} vs ${rk}`).toBeLessThan(tol);
        expect(Math.abs(ev - rv) / rv, `layer ${l} values ${ev} vs ${rv}`).toBeLessThan(tol);
      }
      c.dispose();
    });
  }
});

describe('svd option bounds', () => {
  it('ranks ≤ 2^16, oversample ≤ 4096, powerIters ≤ 16, int32 seed, factor quantization groups ≤ 2^16: accepted at the bound, a config error naming it past it', () => {
    expectOptionBounds('svd', [
      { option: 'rankK', bound: MAX_FEATURES, at: (v) => ({ rankK: v }) },
      { option: 'rankV', bound: MAX_FEATURES, at: (v) => ({ rankV: v }) },
      { option: 'oversample', bound: MAX_OVERSAMPLE, at: (v) => ({ oversample: v }) },
      { option: 'powerIters', bound: MAX_POWER_ITERS, at: (v) => ({ powerIters: v }) },
      { option: 'seed', bound: MAX_SEED, at: (v) => ({ seed: v }) },
      { option: 'factorQuantization.quantGroupSize', bound: MAX_FEATURES, at: (v) => ({ factorQuantization: { bits: 8, quantGroupSize: v } }) },
    ]);
  });
});
