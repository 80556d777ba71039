// The head-wise, query-agnostic and rotation-quantizing strategies on a WebGPU adapter (a software
// one such as Mesa's lavapipe is enough; see scripts/webgpu-software.sh): selection, ragged gathers,
// scores, Hadamard rotation and bit packing run there; the kept tokens and stored bytes equal the wasm
// compress's (floats to a float16 step). Without an adapter the suite is skipped and says why.
import * as tf from '@tensorflow/tfjs-core';
import { createStrategy, selectBackend, type ModelLayout } from '@kvpack/core';
import { describe, expect, it } from 'vitest';
import './index.js';
import '../expected-attention/index.js';
import '../pyramidkv/index.js';
import '../turboquant/index.js';
import { randomCache } from '../testing/testkit.js';

const unavailable = await selectBackend('webgpu').then(
  () => null,
  (e: Error) => e.message.split('\n')[0],
);
const title = unavailable ? `new methods on webgpu (SKIPPED: no WebGPU adapter: ${unavailable})` : 'new methods on webgpu';
if (unavailable) console.warn(`[kvpack] ${title}`);

describe.skipIf(unavailable !== null)(title, { timeout: 600_000 }, () => {
  const cases: [string, Record<string, unknown>][] = [
    ['adakv', { budget: 20, alphaSafeguard: 0.5, scorer: { name: 'snapkv', window: 4, kernelSize: 5 } }],
    ['adakv', { budget: 20, scorer: { name: 'expected-attention', nFuturePositions: 32 } }],
    ['pyramidkv', { budget: 20, beta: 4, scorer: { name: 'snapkv', window: 4, kernelSize: 5 } }],
    ['expected-attention', { budget: 20, nFuturePositions: 32 }],
    ['turboquant', { keyBits: 2, valueBits: 4, seed: 1 }],
  ];
  for (const [name, options] of cases)
    it(`${name} ${JSON.stringify(options)}: the same cache as on wasm`, async () => {
      const layout: ModelLayout = { nLayers: 2, nHeads: 4, nKvHeads: 2, headDim: 16 };
      await selectBackend('wasm');
      const rc = randomCache(64, layout, 29);
      const runs: { bytes: number; k: Float32Array[]; v: Float32Array[]; pos: string }[] = [];
      for (const backend of ['wasm', 'webgpu']) {
        await selectBackend(backend);
        const n0 = tf.memory().numTensors;
        const c = await createStrategy({ name, options }).compress(rc.cache);
        const run = { bytes: c.byteSize(), k: [] as Float32Array[], v: [] as Float32Array[], pos: '' };
        for (let l = 0; l < layout.nLayers; l++) {
          const k = c.keys(l);
          const v = c.values(l);
          run.k.push(Float32Array.from((await k.data()) as Float32Array));
          run.v.push(Float32Array.from((await v.data()) as Float32Array));
          tf.dispose([k, v]);
        }
        const cc = c as unknown as { keptPositions?: (l: number, h?: number) => Int32Array; headCounts?: (l: number) => Int32Array };
        if (cc.headCounts) run.pos = JSON.stringify(Array.from({ length: layout.nLayers }, (_, l) => Array.from({ length: 2 }, (_, h) => Array.from(cc.keptPositions!(l, h)))));
        else if (cc.keptPositions) run.pos = JSON.stringify(Array.from({ length: layout.nLayers }, (_, l) => Array.from(cc.keptPositions!(l))));
        c.dispose();
        expect(tf.memory().numTensors).toBe(n0);
        runs.push(run);
      }
      const [w, g] = runs;
      expect(g.bytes).toBe(w.bytes);
      expect(g.pos).toBe(w.pos);
      for (let l = 0; l < layout.nLayers; l++)
        for (const [a, b] of [[w.k[l], g.k[l]], [w.v[l], g.v[l]]]) {
          expect(b.length).toBe(a.length);
          for (let i = 0; i < a.length; i++) expect(Math.abs(b[i] - a[i])).toBeLessThanOrEqual(Math.max(Math.abs(a[i]) * 2 ** -9, 1e-3));
        }
      await selectBackend('wasm');
      rc.dispose();
    });
});
