// SnapKV's compress on a WebGPU adapter (a software one such as Mesa's lavapipe is enough; see
// scripts/webgpu-software.sh): logits, votes, pooling, top-k and the per-head gather run there; the kept
// tokens equal the wasm compress's. Without an adapter the suite is skipped and says why.
import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { countWebGpuDispatches, createStrategy, selectBackend, validateKVCache, type ModelLayout } from '@kvpack/core';
import fc from 'fast-check';
import { snapkvScoresWgsl } from './scores-wgsl.js';
import { windowLogitsWgsl } from './logits-wgsl.js';
import { pool1dHost } from './oracle.js';
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
  // The logits GEMM tiles g·w rows by 64 (g·w ≤ 64) or 128 and T by 64: the shapes below cover partial
  // tiles in both, head_dim below, at and above the 16-deep slab (not a multiple of it), and query
  // tensors longer than the window (the last w rows vote).
  const scoresMatchOracle = async (Hkv: number, g: number, w: number, T: number, d: number, extra: number, kr: number, max: boolean, seed: number) => {
    const Hq = Hkv * g;
    const kernel = 2 * kr + 1;
    const Tobs = w + extra;
    let s = seed + 1;
    const rnd = () => ((s = (s * 1103515245 + 12345) % 2147483648) / 2147483648 - 0.5) * 4;
    const q = Float32Array.from({ length: Tobs * Hq * d }, rnd);
    const k = Float32Array.from({ length: T * Hkv * d }, rnd);
    const n0 = tf.memory().numTensors;
    const qt = tf.tensor3d(q, [Tobs, Hq, d]);
    const kt = tf.tensor3d(k, [T, Hkv, d]);
    const out = snapkvScoresWgsl(qt, w, kt, kernel, max ? 'max' : 'avg');
    const got = (await out.data()) as Float32Array;
    tf.dispose([qt, kt, out]);
    expect(tf.memory().numTensors).toBe(n0);
    // float64: votes[h, j] = (1/g) Σ_{query head of h, window query i} softmax_i(q·k/√d)[j], j < T − w.
    const P = T - w;
    const votes = new Float64Array(Hkv * P);
    for (let hq = 0; hq < Hq; hq++) {
      const h = Math.floor(hq / g);
      for (let i = 0; i < w; i++) {
        const seen = T - w + i + 1;
        const lg = new Float64Array(seen);
        for (let j = 0; j < seen; j++) {
          let a = 0;
          for (let c = 0; c < d; c++) a += q[((extra + i) * Hq + hq) * d + c] * k[(j * Hkv + h) * d + c];
          lg[j] = a / Math.sqrt(d);
        }
        const m = Math.max(...lg);
        const z = lg.reduce((acc, v) => acc + Math.exp(v - m), 0);
        for (let j = 0; j < P; j++) votes[h * P + j] += Math.exp(lg[j] - m) / z / g;
      }
    }
    const pooled = pool1dHost(votes, Hkv, P, kernel, max ? 'max' : 'avg');
    for (let h = 0; h < Hkv; h++) {
      for (let j = 0; j < T; j++) {
        const v = got[h * T + j];
        if (j >= P) expect(v).toBe(Infinity);
        else expect(Math.abs(v - pooled[h * P + j]), `head ${h} token ${j}`).toBeLessThanOrEqual(1e-5 * pooled[h * P + j] + 1e-9);
      }
    }
  };
  it('the fused scores equal a float64 recomputation (causal softmax over the window, votes summed over it and averaged over the GQA group, avg and max pooling, window at +∞)', async () => {
    await selectBackend('webgpu');
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 3 }),
        fc.integer({ min: 1, max: 3 }),
        fc.integer({ min: 1, max: 12 }),
        fc.integer({ min: 20, max: 700 }),
        fc.constantFrom(8, 16, 20),
        fc.integer({ min: 0, max: 3 }),
        fc.integer({ min: 0, max: 3 }),
        fc.boolean(),
        fc.nat(),
        scoresMatchOracle,
      ),
      { seed: 9, numRuns: 4 },
    );
  });
  it('the fused scores equal the float64 recomputation with more than 64 logit rows per KV head (the 128-row tile, full and partial)', async () => {
    await selectBackend('webgpu');
    await scoresMatchOracle(2, 4, 32, 200, 32, 0, 3, false, 5); // g·w = 128: one whole tile of rows, T a partial key tile
    await scoresMatchOracle(1, 3, 32, 129, 32, 2, 3, true, 6); // g·w = 96: a partial tile of rows (window and head_dim as above: fewer shaders to compile)
  });
  it('the window logits equal float64 products row for row (partial tiles of rows and keys, head_dim not a multiple of the slab), and bad operands are named', async () => {
    await selectBackend('webgpu');
    for (const [Hkv, g, w, T, d, extra] of [
      [2, 3, 30, 129, 24, 2], // g·w = 90: the 128-row tile, partly filled
      [3, 2, 5, 70, 12, 1], // g·w = 10: the 64-row tile
    ]) {
      const Hq = Hkv * g;
      let s = 7 * T + d;
      const rnd = () => ((s = (s * 1103515245 + 12345) % 2147483648) / 2147483648 - 0.5) * 4;
      const q = Float32Array.from({ length: (w + extra) * Hq * d }, rnd);
      const k = Float32Array.from({ length: T * Hkv * d }, rnd);
      const n0 = tf.memory().numTensors;
      const qt = tf.tensor3d(q, [w + extra, Hq, d]);
      const kt = tf.tensor3d(k, [T, Hkv, d]);
      const out = windowLogitsWgsl(qt, w, kt);
      expect(out.shape).toEqual([Hkv, g * w, T]);
      const got = (await out.data()) as Float32Array;
      tf.dispose([qt, kt, out]);
      expect(tf.memory().numTensors).toBe(n0);
      for (let h = 0; h < Hkv; h++)
        for (let r = 0; r < g * w; r++) {
          const hq = h * g + Math.floor(r / w);
          const i = extra + (r % w);
          for (let j = 0; j < T; j++) {
            let a = 0;
            let mag = 0;
            for (let c = 0; c < d; c++) {
              a += q[(i * Hq + hq) * d + c] * k[(j * Hkv + h) * d + c];
              mag += Math.abs(q[(i * Hq + hq) * d + c] * k[(j * Hkv + h) * d + c]);
            }
            expect(Math.abs(got[(h * g * w + r) * T + j] - a), `head ${h} row ${r} key ${j}`).toBeLessThanOrEqual((d + 1) * 2 ** -24 * mag); // float32 summation bound γ_d·Σ|q_c·k_c|
          }
        }
    }
    const qt = tf.zeros([4, 4, 8]) as tf.Tensor3D;
    const kt = tf.zeros([10, 2, 8]) as tf.Tensor3D;
    const ki = tf.zeros([10, 2, 8], 'int32') as tf.Tensor3D;
    const k3 = tf.zeros([10, 3, 8]) as tf.Tensor3D;
    expect(() => windowLogitsWgsl(qt, 5, kt)).toThrow(/window 5 outside 1 … 4/);
    expect(() => windowLogitsWgsl(qt, 2, ki)).toThrow(/must be float32/);
    expect(() => windowLogitsWgsl(qt, 2, k3)).toThrow(/do not fit keys/);
    tf.dispose([qt, kt, ki, k3]);
  });
  it('compresses in a few kernels per layer', async () => {
    const layout: ModelLayout = { nLayers: 2, nHeads: 4, nKvHeads: 2, headDim: 16 };
    await selectBackend('wasm');
    const rc = randomCache(96, layout, 21);
    await selectBackend('webgpu');
    const st = createStrategy({ name: 'snapkv', options: { budget: 30, window: 8, kernelSize: 5 } });
    const validation = (await countWebGpuDispatches(() => validateKVCache(rc.cache))).dispatches!;
    const { result: c, dispatches, readbacks } = await countWebGpuDispatches(() => st.compress(rc.cache));
    c.dispose();
    // Per layer: the key rotation, the window logits (read from the cache layouts: no slice, no
    // transpose), row stats, votes, pooling, top-k, the positions' transpose and two gather+pack
    // kernels; after the last layer, one concat of every layer's positions for the single readback.
    console.log(`snapkv compress of ${layout.nLayers} layers on webgpu: ${dispatches} dispatches (validation ${validation}), ${readbacks} readbacks`);
    expect(dispatches! - validation).toBeLessThanOrEqual(layout.nLayers * 9 + 1);
    expect(readbacks).toBe(2); // the validation's flags, and the kept positions of every layer at once
    await selectBackend('wasm');
    rc.dispose();
  });
});
