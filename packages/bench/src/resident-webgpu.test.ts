// Resident ÷ stored bytes of every strategy on a WebGPU adapter (a software one such as Mesa's
// lavapipe is enough; see scripts/webgpu-software.sh): what the caches hold on the device between
// decode steps is their stored form. Without an adapter the suite is skipped and says why.
import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { createStrategy, selectBackend, wgslValidationErrors } from '@kvpack/core';
import { disposeKVCache, disposeMlaCache, mlaResidentRatios, residentRatios, syntheticCache, syntheticMlaCache } from '@kvpack/core/conformance';
import '@kvpack/xkv';
import '@kvpack/baselines';

const unavailable = await selectBackend('webgpu').then(
  () => null,
  (e: Error) => e.message.split('\n')[0],
);
const title = unavailable ? `resident ÷ stored on webgpu (SKIPPED: no WebGPU adapter: ${unavailable})` : 'resident ÷ stored on webgpu';
if (unavailable) console.warn(`[kvpack] ${title}`);

/** Each strategy at a compressing setting of the conformance suite's synthetic cache (T = 64, L = 4, H_kv = 2, d = 16). */
const SETTINGS: [string, Record<string, unknown>][] = [
  ['dense', { storage: 'float16' }],
  ['xkv', { rankK: 2, rankV: 3 }],
  ['xkv', { layersPerGroup: 2, rankK: 4, rankV: 6, factorQuantization: { bits: 4, quantGroupSize: 16 } }],
  ['xkv', { rankK: 2, rankV: 3, decode: 'sparse', sparse: { budget: 16, chunkSize: 8, outlierChunks: 1, localTokens: 8 } }],
  ['svd', { rankK: 4, rankV: 6 }],
  ['quant', { bits: 4, mode: 'asymmetric' }],
  ['kivi', { bits: 2, quantGroupSize: 8, residualLength: 16 }],
  ['minicache', {}],
  ['streamingllm', { sinks: 4, budget: 24 }],
  ['snapkv', { budget: 24, window: 8, kernelSize: 5 }],
  ['adakv', { budget: 24, scorer: { name: 'snapkv', window: 8, kernelSize: 5 } }],
  ['pyramidkv', { budget: 24, beta: 4, scorer: { name: 'snapkv', window: 8, kernelSize: 5 } }],
  ['expected-attention', { budget: 24, nFuturePositions: 32 }],
  ['turboquant', { keyBits: 2, valueBits: 2 }],
];

describe.skipIf(unavailable !== null)(title, { timeout: 600_000 }, () => {
  for (const [name, options] of SETTINGS) {
    it(`${name} ${JSON.stringify(options)} holds at most 1.1× its stored bytes`, async () => {
      const cache = syntheticCache(64);
      const start = tf.memory().numTensors;
      const steps = 4;
      const r = await residentRatios(createStrategy({ name, options }), cache, steps);
      console.log(`webgpu resident ÷ stored ${name} ${JSON.stringify(options)}: ${r.afterCompress.toFixed(3)} after compress, ${r.afterDecode.toFixed(3)} after ${steps} decode steps, ${r.afterRestore.toFixed(3)} after restore`);
      expect(r.afterCompress).toBeLessThanOrEqual(1.1);
      expect(r.afterDecode).toBeLessThanOrEqual(1.1);
      expect(r.afterRestore).toBeLessThanOrEqual(1.1);
      expect(tf.memory().numTensors).toBe(start);
      disposeKVCache(cache);
    });
  }
  // MLA latent caches (synthetic: T = 64, L = 4, d_c = 24, d_R = 8), for the strategies that compress them.
  const MLA: [string, Record<string, unknown>][] = [
    ['dense', { storage: 'float16' }],
    ['xkv', { mla: { rank: 3 } }],
    ['xkv', { layersPerGroup: 2, mla: { rank: 4, ropeKeys: 'svd', ropeRank: 2 }, factorQuantization: { bits: 4, quantGroupSize: 16 } }],
    ['svd', { mla: { rank: 4 } }],
    ['kivi', { bits: 2, quantGroupSize: 8, residualLength: 16 }],
    ['streamingllm', { sinks: 4, budget: 24 }],
    ['snapkv', { budget: 24, window: 8, kernelSize: 5 }],
  ];
  for (const [name, options] of MLA) {
    it(`${name} ${JSON.stringify(options)} on an MLA latent cache holds at most 1.1× its stored bytes`, async () => {
      const cache = syntheticMlaCache(64);
      const start = tf.memory().numTensors;
      const r = await mlaResidentRatios(createStrategy({ name, options }), cache, 4);
      console.log(`webgpu resident ÷ stored ${name} MLA ${JSON.stringify(options)}: ${r.afterCompress.toFixed(3)} after compress, ${r.afterDecode.toFixed(3)} after 4 decode steps, ${r.afterRestore.toFixed(3)} after restore`);
      expect(r.afterCompress).toBeLessThanOrEqual(1.1);
      expect(r.afterDecode).toBeLessThanOrEqual(1.1);
      expect(r.afterRestore).toBeLessThanOrEqual(1.1);
      expect(tf.memory().numTensors).toBe(start);
      disposeMlaCache(cache);
    });
  }
  it('dispatched only valid WGSL', async () => {
    expect(await wgslValidationErrors()).toEqual([]);
  });
});
