// KIVI on a WebGPU adapter (a software one such as Mesa's lavapipe is enough; see
// scripts/webgpu-software.sh): compression and decode steps run on the device (quantization, packing,
// the float16 windows and their flushes), with no synchronous readback. Checked against the host
// float64 quantizer, against the same run on wasm, and against attention recomputed in float64 from
// the dequantized cache. Without an adapter the suite is skipped and says why.
import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { countWebGpuDispatches, createStrategy, deserializeCache, selectBackend, wgslValidationErrors, type KVCache, type ModelLayout } from '@kvpack/core';
import { holdMinMaxOnBackend } from '@kvpack/strategy-utils';
import { residentRatios } from '@kvpack/core/conformance';
import './index.js';
import type { KiviCache, KiviOptions } from './index.js';
import { TEST_ROPE, prng, randomCache } from '../testing/testkit.js';
import { boundaryGroups, expectBackendMatchesHost } from './quant-cases.js';

const unavailable = await selectBackend('webgpu').then(
  () => null,
  (e: Error) => e.message.split('\n')[0],
);
const title = unavailable ? `kivi on webgpu (SKIPPED: no WebGPU adapter: ${unavailable})` : 'kivi on webgpu';
if (unavailable) console.warn(`[kvpack] ${title}`);

const layout: ModelLayout = { nLayers: 2, nHeads: 4, nKvHeads: 2, headDim: 16 };
const { nKvHeads: H, headDim: d, nHeads: Hq } = layout;
const T = 70;
// R = 16: 64 prefill keys quantized + a 6-token window (flushed at the 11th append), 54 values + 16.
const options: KiviOptions = { bits: 2, quantGroupSize: 8, residualLength: 16 };
const STEPS = 13;

/** Host data of the run: the prefill cache and, per step and layer, the appended key, value and query. */
function inputs() {
  const rnd = prng(31);
  const tok = () => Float32Array.from({ length: H * d }, () => rnd() * 4 - 2);
  const steps = Array.from({ length: STEPS }, () => Array.from({ length: layout.nLayers }, () => ({ k: tok(), v: tok(), q: Float32Array.from({ length: Hq * d }, () => rnd() * 2 - 1) })));
  return { steps };
}

interface Run {
  /** Attention output [1, H, d] per step and layer. */
  out: Float32Array[][];
  /** Dequantized keys and values per layer after the last step. */
  keys: Float32Array[];
  values: Float32Array[];
  quantizedKeys: number;
  quantizedValues: number;
  serialized: Uint8Array;
}

async function run(backend: 'webgpu' | 'wasm', prefill: { keys: Float32Array[]; values: Float32Array[] }, steps: ReturnType<typeof inputs>['steps']): Promise<Run> {
  await selectBackend(backend);
  const start = tf.memory().numTensors;
  const cache: KVCache = {
    layout,
    rope: TEST_ROPE,
    keys: prefill.keys.map((k) => tf.tensor3d(k, [T, H, d])),
    values: prefill.values.map((v) => tf.tensor3d(v, [T, H, d])),
  };
  const c = (await createStrategy({ name: 'kivi', options }).compress(cache)) as KiviCache;
  const out: Float32Array[][] = [];
  for (const step of steps) {
    const row: Float32Array[] = [];
    for (let l = 0; l < layout.nLayers; l++) {
      const k = tf.tensor3d(step[l].k, [1, H, d]);
      const v = tf.tensor3d(step[l].v, [1, H, d]);
      c.append(l, k, v);
      const q = tf.tensor3d(step[l].q, [1, Hq, d]);
      const o = c.attend(l, q);
      row.push((await o.data()) as Float32Array);
      tf.dispose([k, v, q, o]);
    }
    out.push(row);
  }
  const read = async (x: tf.Tensor) => {
    const a = (await x.data()) as Float32Array;
    x.dispose();
    return a;
  };
  const keys: Float32Array[] = [];
  const values: Float32Array[] = [];
  for (let l = 0; l < layout.nLayers; l++) {
    keys.push(await read(c.keys(l)));
    values.push(await read(c.values(l)));
  }
  const r: Run = { out, keys, values, quantizedKeys: c.quantizedKeyTokens(1), quantizedValues: c.quantizedValueTokens(1), serialized: await c.serializeAsync() };
  // The restored cache reads the same values on this backend.
  const back = deserializeCache(r.serialized) as KiviCache;
  for (let l = 0; l < layout.nLayers; l++) expect(Array.from(await read(back.keys(l)))).toEqual(Array.from(keys[l]));
  back.dispose();
  c.dispose();
  tf.dispose([...cache.keys, ...cache.values]);
  expect(tf.memory().numTensors).toBe(start);
  return r;
}

/** Attention of one query [H, d] over keys and values [N, H_kv, d], in float64 (GQA: query head h reads KV head ⌊h·H_kv/H⌋). */
function attention64(q: Float32Array, k: Float32Array, v: Float32Array): Float64Array {
  const N = k.length / (H * d);
  const out = new Float64Array(Hq * d);
  for (let h = 0; h < Hq; h++) {
    const kv = Math.floor((h * H) / Hq);
    const s = Float64Array.from({ length: N }, (_, t) => {
      let dot = 0;
      for (let c = 0; c < d; c++) dot += q[h * d + c] * k[(t * H + kv) * d + c];
      return dot / Math.sqrt(d);
    });
    const m = Math.max(...s);
    const p = s.map((x) => Math.exp(x - m));
    const z = p.reduce((a, b) => a + b, 0);
    for (let t = 0; t < N; t++) for (let c = 0; c < d; c++) out[h * d + c] += (p[t] / z) * v[(t * H + kv) * d + c];
  }
  return out;
}

describe.skipIf(unavailable !== null)(title, { timeout: 600_000 }, () => {
  it('quantizes on the device bit-identically to the host float64 quantizer (rounding boundaries, random blocks)', async () => {
    await selectBackend('webgpu');
    const start = tf.memory().numTensors;
    for (const bits of [2, 4] as const) {
      const g = 24;
      const groups = boundaryGroups(bits, g, prng(5 + bits));
      const flat = Float32Array.from(groups.flat());
      await expectBackendMatchesHost(flat, 'channels', groups.length, 1, g, g, bits);
      await expectBackendMatchesHost(flat, 'tokens', groups.length * g, 1, 1, g, bits);
      const rnd = prng(40 + bits);
      const x = Float32Array.from({ length: 64 * 4 * 32 }, () => (rnd() + rnd() + rnd() - 1.5) * 3);
      await expectBackendMatchesHost(x, 'tokens', 64, 4, 32, 32, bits);
      await expectBackendMatchesHost(x, 'channels', 64, 4, 32, 32, bits);
    }
    expect(tf.memory().numTensors).toBe(start);
    expect(await wgslValidationErrors()).toEqual([]);
  });

  it('quantizes a block in six kernels and flags a group beyond the float16 range (one group of many, anywhere)', async () => {
    await selectBackend('webgpu');
    const start = tf.memory().numTensors;
    // n = 8192 tokens: 4,096 groups, more than one workgroup of the flag's reduction.
    for (const [n, at, big, flag] of [[64, 77, 3, 0], [64, 77, 1e6, 1], [8192, 8192 * 16 - 3, 1e6, 1], [8192, 5000, -1e6, 1], [8192, 5000, 3, 0]] as const) {
      const x = tf.tensor3d(Float32Array.from({ length: n * 2 * 8 }, (_, i) => (i === at ? big : (i % 7) / 3)), [n, 2, 8]);
      const { result: h, dispatches } = await countWebGpuDispatches(() => holdMinMaxOnBackend({ along: 'tokens', n, H: 2, d: 8, g: 32, bits: 2 }, x));
      expect(dispatches).toBe(6); // group stats, codes, scale, minimum, the flag's two reductions
      expect((await h.nonFinite.data())[0]).toBe(flag);
      tf.dispose([x, h.nonFinite]);
      h.codes.dispose();
      h.scale.dispose();
      h.min.dispose();
    }
    expect(tf.memory().numTensors).toBe(start);
  });
  it(`decodes ${STEPS} steps across a key flush and value slides: the same cache as wasm, attention as float64 over it`, async () => {
    await selectBackend('wasm');
    const rc = randomCache(T, layout, 21);
    const prefill = { keys: rc.keys, values: rc.values };
    rc.dispose();
    const { steps } = inputs();
    const gpu = await run('webgpu', prefill, steps);
    const cpu = await run('wasm', prefill, steps);
    // The 11th append flushed the 16-token key window; values slid one token per append past R + 1.
    expect(gpu.quantizedKeys).toBe(80);
    expect(gpu.quantizedValues).toBe(54 + STEPS - 1);
    expect([cpu.quantizedKeys, cpu.quantizedValues]).toEqual([gpu.quantizedKeys, gpu.quantizedValues]);
    // The dequantized cache and its serialization are bit-identical on both backends.
    for (let l = 0; l < layout.nLayers; l++) {
      expect(Array.from(gpu.keys[l])).toEqual(Array.from(cpu.keys[l]));
      expect(Array.from(gpu.values[l])).toEqual(Array.from(cpu.values[l]));
    }
    expect(Buffer.from(gpu.serialized).equals(Buffer.from(cpu.serialized))).toBe(true);
    // Attention after the last step, against float64 over the dequantized cache; every step against wasm.
    const last = steps[STEPS - 1];
    for (let l = 0; l < layout.nLayers; l++) {
      const want = attention64(last[l].q, gpu.keys[l], gpu.values[l]);
      let err = 0;
      for (let i = 0; i < want.length; i++) err = Math.max(err, Math.abs(gpu.out[STEPS - 1][l][i] - want[i]));
      expect(err).toBeLessThan(1e-5);
    }
    let diff = 0;
    gpu.out.forEach((row, s) => row.forEach((o, l) => o.forEach((x, i) => (diff = Math.max(diff, Math.abs(x - cpu.out[s][l][i]))))));
    expect(diff).toBeLessThan(1e-5);
    expect(await wgslValidationErrors()).toEqual([]);
  });

  it('holds its stored form on the device: resident ÷ stored after compress, decode steps and restore', async () => {
    await selectBackend('wasm');
    const rc = randomCache(T, layout, 22);
    const prefill = { keys: rc.keys, values: rc.values };
    rc.dispose();
    await selectBackend('webgpu');
    const cache: KVCache = { layout, rope: TEST_ROPE, keys: prefill.keys.map((k) => tf.tensor3d(k, [T, H, d])), values: prefill.values.map((v) => tf.tensor3d(v, [T, H, d])) };
    const r = await residentRatios(createStrategy({ name: 'kivi', options }), cache, 12);
    console.log(`webgpu kivi resident ÷ stored: ${r.afterCompress.toFixed(3)} after compress, ${r.afterDecode.toFixed(3)} after 12 decode steps, ${r.afterRestore.toFixed(3)} after restore`);
    for (const x of [r.afterCompress, r.afterDecode, r.afterRestore]) expect(x).toBeLessThanOrEqual(1.01);
    tf.dispose([...cache.keys, ...cache.values]);
  });
});
