// SnapKV's compress on a WebGPU adapter (a software one such as Mesa's lavapipe is enough; see
// scripts/webgpu-software.sh): votes, pooling, top-k and the per-head gather run there; the kept
// tokens equal the wasm compress's. Without an adapter the suite is skipped and says why.
import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { createStrategy, selectBackend, type ModelLayout } from '@kvpack/core';
import type { KeptTokensCache } from '@kvpack/strategy-utils';
import './index.js'; // registers the strategy
import { randomCache } from '../testing/testkit.js';

const unavailable = await selectBackend('webgpu').then(
  () => null,
  (e: Error) => e.message.split('\n')[0],
);
const title = unavailable ? `snapkv on webgpu (SKIPPED: no WebGPU adapter: ${unavailable})` : 'snapkv on webgpu';
if (unavailable) console.warn(`[kvpack] ${title}`);

describe.skipIf(unavailable !== null)(title, { timeout: 600_000 }, () => {
  it('keeps the tokens the wasm compress keeps, with the same float16 rows (keys to one float16 step: rotated there)', async () => {
    const layout: ModelLayout = { nLayers: 2, nHeads: 4, nKvHeads: 2, headDim: 16 };
    await selectBackend('wasm');
    const rc = randomCache(96, layout, 21);
    const o = { budget: 30, window: 8, kernelSize: 5 };
    const runs: { pos: Int32Array[]; k: Float32Array[]; v: Float32Array[] }[] = [];
    for (const backend of ['wasm', 'webgpu']) {
      await selectBackend(backend);
      const n0 = tf.memory().numTensors;
      const c = (await createStrategy({ name: 'snapkv', options: o }).compress(rc.cache)) as KeptTokensCache;
      const run = { pos: [] as Int32Array[], k: [] as Float32Array[], v: [] as Float32Array[] };
      for (let l = 0; l < layout.nLayers; l++) {
        run.pos.push(c.keptPositions(l));
        const k = c.keys(l);
        const v = c.values(l);
        run.k.push((await k.data()) as Float32Array);
        run.v.push((await v.data()) as Float32Array);
        tf.dispose([k, v]);
      }
      c.dispose();
      expect(tf.memory().numTensors).toBe(n0);
      runs.push(run);
    }
    const [w, g] = runs;
    for (let l = 0; l < layout.nLayers; l++) {
      expect(Array.from(g.pos[l]), `layer ${l} kept positions`).toEqual(Array.from(w.pos[l]));
      expect(Array.from(g.v[l])).toEqual(Array.from(w.v[l]));
      for (let i = 0; i < w.k[l].length; i++) expect(Math.abs(g.k[l][i] - w.k[l][i])).toBeLessThanOrEqual(Math.max(Math.abs(w.k[l][i]) * 2 ** -10, 2 ** -24));
    }
    await selectBackend('wasm');
    rc.dispose();
  });
});
