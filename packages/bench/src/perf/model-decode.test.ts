import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { HalfTensor, decodeHalf, encodeHalf, releaseSharedRopeTables, selectBackend } from '@kvpack/core';
import '@kvpack/xkv';
import '@kvpack/baselines';
import { halfMatMul } from './half-matmul.js';
import { MODEL_DECODE_SETTINGS, runModelDecodeBench, type ModelShape } from './model-decode.js';

/** x · W in float64 on the host, W given as float16 bits [K, N]. */
function hostProduct(x: Float32Array, bits: Uint16Array, B: number, K: number, N: number): Float64Array {
  const w = decodeHalf(bits);
  const out = new Float64Array(B * N);
  for (let b = 0; b < B; b++) for (let k = 0; k < K; k++) for (let n = 0; n < N; n++) out[b * N + n] += x[b * K + k] * w[k * N + n];
  return out;
}

async function checkProduct(B: number, K: number, N: number): Promise<void> {
  const start = tf.memory().numTensors;
  const xs = Float32Array.from({ length: B * K }, (_, i) => Math.sin(i * 0.37) + 0.1);
  const bits = encodeHalf(Float32Array.from({ length: K * N }, (_, i) => Math.cos(i * 0.11) / Math.sqrt(K)));
  const x = tf.tensor2d(xs, [B, K]);
  const w = HalfTensor.fromBits(bits, [K, N]);
  const y = halfMatMul(x, w);
  const got = await y.data();
  const want = hostProduct(xs, bits, B, K, N);
  let err = 0;
  let norm = 0;
  for (let i = 0; i < want.length; i++) (err += (got[i] - want[i]) ** 2), (norm += want[i] ** 2);
  expect(Math.sqrt(err / norm)).toBeLessThan(1e-5); // float32 accumulation of K terms
  tf.dispose([x, y]);
  w.dispose();
  expect(tf.memory().numTensors).toBe(start);
}

const TINY: ModelShape = { nLayers: 4, nHeads: 4, nKvHeads: 2, headDim: 16, hidden: 64, ffn: 96, vocab: 50 };

describe('whole-model decode benchmark (wasm)', () => {
  it('halfMatMul equals a float64 product of the float16 weights; bad shapes are named', async () => {
    await selectBackend('wasm');
    await checkProduct(3, 300, 10);
    const x = tf.zeros([2, 5]) as tf.Tensor2D;
    const w = HalfTensor.fromBits(new Uint16Array(12), [4, 3]);
    expect(() => halfMatMul(x, w)).toThrow(/inner sizes differ/);
    tf.dispose(x);
    w.dispose();
  });

  it('counts resident bytes per sequence, the weights and the sequences that fit', async () => {
    await selectBackend('wasm');
    releaseSharedRopeTables();
    const start = tf.memory().numTensors;
    const settings = [
      MODEL_DECODE_SETTINGS[0],
      { ...MODEL_DECODE_SETTINGS[1], options: { layersPerGroup: 4, rankK: 4, rankV: 6 } },
      { ...MODEL_DECODE_SETTINGS[2], options: { layersPerGroup: 4, rankK: 4, rankV: 6, decode: 'sparse', sparse: { budget: 32, chunkSize: 8, outlierChunks: 1, localTokens: 8 } } },
    ];
    const r = await runModelDecodeBench({ shape: TINY, tokens: 96, batches: [1, 2], settings, reps: 1, warmup: 1, budgetBytes: 2 ** 20 });
    releaseSharedRopeTables(); // kept by design for every cache of the process
    expect(tf.memory().numTensors).toBe(start);
    expect(r.rows.map((x) => [x.setting, x.batch])).toEqual(settings.flatMap((s) => [[s.label, 1], [s.label, 2]]));
    // Dense fp16 holds 2 (K, V) · L · T · H_kv · d halves per sequence, packed two to a 4-byte word.
    const dense = r.rows[0];
    expect(dense.cacheBytesPerSequence).toBe(2 * 4 * 96 * 2 * 16 * 2);
    for (const x of r.rows) {
      expect(x.sequencesInBudget).toBe(Math.floor(2 ** 20 / x.cacheBytesPerSequence));
      expect(x.sequencesBesideWeights).toBe(Math.max(0, Math.floor((2 ** 20 - r.weightBytes) / x.cacheBytesPerSequence)));
      expect(x.tokensPerSecond).toBeCloseTo((1000 * x.batch) / x.stepMs, 9);
    }
    // The xKV caches hold less than dense per sequence.
    expect(r.rows[2].cacheBytesPerSequence).toBeLessThan(dense.cacheBytesPerSequence);
    // Weights: per layer D·(H+2H_kv)d + H·d·D + D·2F + F·D halves, plus the vocabulary product, plus float32 norms.
    const { hidden: D, nHeads: H, nKvHeads: Hkv, headDim: d, ffn: F, vocab: V, nLayers: L } = TINY;
    expect(r.weightBytes).toBe(2 * (L * (D * (H + 2 * Hkv) * d + H * d * D + D * 2 * F + F * D) + D * V) + (2 * L + 1) * D * 4);
  });
});

const unavailable = await selectBackend('webgpu').then(
  () => null,
  (e: Error) => e.message.split('\n')[0],
);
const title = unavailable ? `halfMatMul on webgpu (SKIPPED: no WebGPU adapter: ${unavailable})` : 'halfMatMul on webgpu';
if (unavailable) console.warn(`[kvpack] ${title}`);

describe.skipIf(unavailable !== null)(title, () => {
  it('the WGSL product equals a float64 product, K not a multiple of the slice, batch 1 and 5', async () => {
    await selectBackend('webgpu');
    await checkProduct(1, 600, 8);
    await checkProduct(5, 300, 6);
  });
});
