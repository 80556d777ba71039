import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, createStrategy, decodeContainer, decodeHalf, denseCacheBytes, headerBytes, selectBackend, type KVCache, type StoredTensor } from '@kvpack/core';
import { disposeKVCache, runStrategyConformance, syntheticCache } from '@kvpack/core/conformance';
import { decodePositions, encodePositions, positionEncoding, type KeptTokensCache, type StackedCache } from '@kvpack/strategy-utils';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import '../index.js'; // registers the baselines, stacked and its eviction stages

const STACK = {
  evict: { strategy: 'snapkv', options: { budget: 32, window: 8, kernelSize: 5 } },
  lowRank: { layersPerGroup: 2, rankK: 4, rankV: 6 },
  quantize: { bits: 4, quantGroupSize: 8 },
};

runStrategyConformance('stacked', {
  compressing: STACK,
  // No eviction, full rank (min(T, H_kv·d) = 32 per layer), exact SVD, float16 factors.
  lossless: { lowRank: { layersPerGroup: 1, rankK: 32, rankV: 32, exact: true } },
  losslessTolerance: 3e-3,
  badOptions: [
    { evict: { strategy: 'quant', options: {} } }, // not an eviction strategy
    { evict: { strategy: 'snapkv', options: { budget: 8, window: 8 } } }, // its own schema refuses it
    { quantize: { bits: 3 } },
    { targetRatio: 8, lowRank: { rankFraction: 0.5 } },
    { lowRank: { targetRatio: 4, compressionRatio: 0.5 } }, // 4× is 0.75
    { targetRatio: 0.5 },
  ],
  failingCompress: [
    { ...STACK, targetRatio: 10000 }, // out of reach
    { ...STACK, evict: { strategy: 'snapkv', options: { budget: 24, window: 16 } } }, // queries cover 8 tokens
  ],
});

/** A tensor's values as nested arrays; the tensor is disposed. */
async function take3(t: tf.Tensor3D): Promise<number[][][]> {
  const a = await t.array();
  t.dispose();
  return a;
}

/** Own float64 dequantization of a stored [rows, cols] matrix: b-bit codes lowest bits first, float16 scale and (asymmetric) uint8 zero per group. */
function dequant64(get: (n: string) => StoredTensor | undefined, name: string, rows: number, cols: number, bits: number, g: number): Float64Array | null {
  const codes = get(`${name}.codes`);
  if (!codes) return null;
  const bytes = codes.data as Uint8Array;
  const scales = decodeHalf(get(`${name}.scales`)!.data as Uint16Array);
  const zeros = get(`${name}.zeros`)?.data as Uint8Array | undefined;
  const gpr = Math.ceil(cols / g);
  const out = new Float64Array(rows * cols);
  for (let i = 0; i < rows * cols; i++) {
    const bit = i * bits;
    const u = (bytes[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1);
    const r = Math.floor(i / cols);
    const gi = r * gpr + Math.floor((i % cols) / g);
    out[i] = (u - (zeros ? zeros[gi] : 2 ** (bits - 1))) * scales[gi];
  }
  return out;
}

/** Own float64 interleaved RoPE of one d-vector at position p (pairs (2i, 2i+1), θ^(−2i/d)). */
function rope64(x: ArrayLike<number>, p: number, theta: number): Float64Array {
  const d = x.length;
  const out = new Float64Array(d);
  for (let i = 0; i < d / 2; i++) {
    const a = p * theta ** (-(2 * i) / d);
    const [c, s] = [Math.cos(a), Math.sin(a)];
    out[2 * i] = x[2 * i] * c - x[2 * i + 1] * s;
    out[2 * i + 1] = x[2 * i] * s + x[2 * i + 1] * c;
  }
  return out;
}

describe('stacked: eviction → xKV over the kept tokens → int4 factors', () => {
  let cache: KVCache;
  let start = 0;
  beforeAll(async () => {
    await selectBackend('cpu');
    start = tf.memory().numTensors;
    cache = { ...syntheticCache(64), startPosition: 5 };
  });
  afterAll(() => {
    disposeKVCache(cache);
    expect(tf.memory().numTensors).toBe(start);
  });

  it('byteSize() is the serialized payload; the bytes are a direct count; the ratio is the product of the stage ratios', async () => {
    const c = (await createStrategy({ name: 'stacked', options: STACK }).compress(cache)) as StackedCache;
    const { nLayers: L, nKvHeads: H, headDim: d } = cache.layout;
    const F = H * d;
    const T = 64;
    const n = 32;
    const bytes = c.serialize();
    expect(c.byteSize()).toBe(bytes.length - headerBytes(bytes));
    const cont = decodeContainer(bytes);
    expect(cont.tensors.reduce((a, t) => a + t.data.byteLength, 0)).toBe(c.byteSize());
    // Direct count: per group of 2 layers, U [n, R] and two B [R, F] per kind, int4 packed + f16 scale + u8 zero per 8 values; int32 positions.
    const q = (rows: number, cols: number) => Math.ceil((rows * cols * 4) / 8) + rows * Math.ceil(cols / 8) * 3;
    const Rk = 4 * 2;
    const Rv = 6 * 2;
    const groups = L / 2;
    const factors = groups * (q(n, Rk) + 2 * q(Rk, F) + q(n, Rv) + 2 * q(Rv, F));
    // Positions: a 64-bit mask per KV head and layer (8 bytes, smaller than 32 uint16 entries).
    const positions = L * H * (T / 8);
    expect(cont.get('pos.0').dtype).toBe('uint8');
    expect(c.byteSize()).toBe(factors + positions);
    const s = c.stats();
    expect(s.kept).toBe(n);
    expect(s.stages.map((x) => x.stage)).toEqual(['evict', 'lowRank', 'quantize']);
    const dense = 2 * L * T * F * 2;
    const afterEvict = L * n * H * d * 2 * 2 + positions;
    const afterLowRank = groups * (n * Rk + 2 * Rk * F + n * Rv + 2 * Rv * F) * 2 + positions;
    expect(s.stages.map((x) => [x.bytesIn, x.bytesOut])).toEqual([
      [dense, afterEvict],
      [afterEvict, afterLowRank],
      [afterLowRank, factors + positions],
    ]);
    const product = s.stages.reduce((a, x) => a * x.ratio, 1);
    expect(product).toBeCloseTo(dense / c.byteSize(), 10);
    expect(s.ratio).toBeCloseTo(dense / c.byteSize(), 12);
    expect(s.compressionRatio).toBeCloseTo(1 - c.byteSize() / dense, 12);
    // Round trip: same bytes, same reconstruction.
    const back = createStrategy({ name: 'stacked', options: STACK }).deserialize(bytes);
    expect(back.serialize()).toEqual(bytes);
    const [k0, k1] = [c.keys(1), back.keys(1)];
    expect(await k1.data()).toEqual(await k0.data());
    tf.dispose([k0, k1]);
    back.dispose();
    c.dispose();
  });

  it('keeps the tokens SnapKV keeps, and rebuilds keys at their true positions (float64 re-computation from the stored bytes)', async () => {
    const c = (await createStrategy({ name: 'stacked', options: STACK }).compress(cache)) as StackedCache;
    const snap = (await createStrategy({ name: 'snapkv', options: STACK.evict.options }).compress(cache)) as KeptTokensCache;
    const { nLayers: L, nKvHeads: H, headDim: d } = cache.layout;
    const F = H * d;
    const n = 32;
    const cont = decodeContainer(c.serialize());
    const get = (name: string) => (cont.has(name) ? cont.get(name) : undefined);
    for (let l = 0; l < L; l++) {
      const pos = c.keptPositions(l);
      expect(pos).toEqual(snap.keptPositions(l));
      // The stored mask, read bit by bit: head h keeps token t when bit t of its row is set.
      const mask = get(`pos.${l}`)!.data as Uint8Array;
      for (let h = 0; h < H; h++) {
        const kept = Array.from({ length: 64 }, (_, t) => t).filter((t) => (mask[h * 8 + (t >> 3)] >> (t & 7)) & 1);
        expect(kept).toEqual(Array.from({ length: n }, (_, j) => pos[j * H + h]));
      }
      const g = Math.floor(l / 2);
      const recon = (kind: 'k' | 'v', R: number) => {
        const U = dequant64(get, `${kind}.basis.${g}`, n, R, 4, 8)!;
        const B = dequant64(get, `${kind}.factor.${l}`, R, F, 4, 8)!;
        const X = new Float64Array(n * F);
        for (let i = 0; i < n; i++) for (let j = 0; j < F; j++) for (let r = 0; r < R; r++) X[i * F + j] += U[i * R + r] * B[r * F + j];
        return X;
      };
      const K = recon('k', 8);
      const V = recon('v', 12);
      const keys = await take3(c.keys(l));
      const values = await take3(c.values(l));
      let worst = 0;
      let scale = 0;
      for (let j = 0; j < n; j++)
        for (let h = 0; h < H; h++) {
          const want = rope64(K.subarray(j * F + h * d, j * F + (h + 1) * d), 5 + pos[j * H + h], 10000);
          for (let ch = 0; ch < d; ch++) {
            worst = Math.max(worst, Math.abs(keys[j][h][ch] - want[ch]), Math.abs(values[j][h][ch] - V[j * F + h * d + ch]));
            scale = Math.max(scale, Math.abs(want[ch]));
          }
        }
      expect(worst).toBeLessThan(1e-5 * Math.max(1, scale));
      // The reconstruction approximates the original kept tokens (it is a compression, not noise).
      const orig = (await cache.values[l].array()) as number[][][];
      let num = 0;
      let den = 0;
      for (let j = 0; j < n; j++)
        for (let h = 0; h < H; h++)
          for (let ch = 0; ch < d; ch++) {
            const o = orig[pos[j * H + h]][h][ch];
            num += (values[j][h][ch] - o) ** 2;
            den += o ** 2;
          }
      expect(Math.sqrt(num / den)).toBeLessThan(0.5);
    }
    snap.dispose();
    c.dispose();
  });

  it('decodes after compression: attention over the rebuilt kept tokens and an appended token equals a float64 softmax', async () => {
    const c = (await createStrategy({ name: 'stacked', options: STACK }).compress(cache)) as StackedCache;
    const { nHeads: Hq, nKvHeads: H, headDim: d } = cache.layout;
    const layer = 2;
    const kNew = tf.randomNormal([1, H, d], 0, 1, 'float32', 3) as tf.Tensor3D;
    const vNew = tf.randomNormal([1, H, d], 0, 1, 'float32', 4) as tf.Tensor3D;
    const q = tf.randomNormal([1, Hq, d], 0, 1, 'float32', 5) as tf.Tensor3D;
    c.append(layer, kNew, vNew);
    const K = await take3(c.keys(layer));
    const V = await take3(c.values(layer));
    expect(K.length).toBe(33);
    expect(K[32]).toEqual((await kNew.array())[0]);
    const out = c.attend(layer, q);
    const got = (await out.array()) as number[][][];
    const qa = (await q.array())[0];
    for (let hq = 0; hq < Hq; hq++) {
      const h = Math.floor(hq / (Hq / H));
      const logits = K.map((row) => row[h].reduce((a, x, ch) => a + x * qa[hq][ch], 0) / Math.sqrt(d));
      const m = Math.max(...logits);
      const w = logits.map((x) => Math.exp(x - m));
      const z = w.reduce((a, b) => a + b, 0);
      for (let ch = 0; ch < d; ch++) expect(got[0][hq][ch]).toBeCloseTo(w.reduce((a, wi, j) => a + wi * V[j][h][ch], 0) / z, 5);
    }
    tf.dispose([kNew, vNew, q, out]);
    c.dispose();
  });

  it('an overall targetRatio (or kvpress compressionRatio) resolves the ranks so the measured ratio reaches it', async () => {
    for (const target of [8, 16]) {
      const a = (await createStrategy({ name: 'stacked', options: { ...STACK, lowRank: { layersPerGroup: 2 }, targetRatio: target } }).compress(cache)) as StackedCache;
      const b = (await createStrategy({ name: 'stacked', options: { ...STACK, lowRank: { layersPerGroup: 2 }, compressionRatio: 1 - 1 / target } }).compress(cache)) as StackedCache;
      const ratio = denseCacheBytes(cache.layout, 64) / a.byteSize();
      expect(ratio).toBeGreaterThanOrEqual(target);
      expect(b.byteSize()).toBe(a.byteSize());
      const s = a.stats();
      expect(s.stages.reduce((x, st) => x * st.ratio, 1)).toBeCloseTo(ratio, 10);
      a.dispose();
      b.dispose();
    }
    expect(() => createStrategy({ name: 'stacked', options: { ...STACK, targetRatio: 8, compressionRatio: 0.5 } })).toThrow(/disagree/);
    const err = await createStrategy({ name: 'stacked', options: { ...STACK, targetRatio: 10000 } })
      .compress(cache)
      .catch((e) => e);
    expect(err).toBeInstanceOf(KvpackError);
    expect((err as KvpackError).code).toBe('config');
    expect((err as KvpackError).message).toMatch(/out of reach at T=64.*reachable: up to \d+\.\d+×/);
  });

  it('streamingllm as the eviction stage: positions implied (not stored), sinks and recent tokens at their true positions', async () => {
    const o = { evict: { strategy: 'streamingllm', options: { sinks: 4, budget: 24 } }, lowRank: { layersPerGroup: 4, rankK: 4, rankV: 4 } };
    const c = (await createStrategy({ name: 'stacked', options: o }).compress(cache)) as StackedCache;
    const { nLayers: L, nKvHeads: H, headDim: d } = cache.layout;
    const want = [0, 1, 2, 3, ...Array.from({ length: 20 }, (_, i) => 44 + i)];
    expect(Array.from(c.keptPositions(0).filter((_, i) => i % H === 0))).toEqual(want);
    const bytes = c.serialize();
    expect(decodeContainer(bytes).tensors.some((t) => t.name.startsWith('pos.'))).toBe(false);
    // float16 U [24, 16] per kind and group, B [16, 32] per layer and kind.
    expect(c.byteSize()).toBe(2 * (24 * 16 + L * 16 * H * d) * 2);
    const back = createStrategy({ name: 'stacked', options: o }).deserialize(bytes) as StackedCache;
    expect(back.keptPositions(3)).toEqual(c.keptPositions(3));
    back.dispose();
    c.dispose();
  });
});

describe('stored kept positions: the smaller of a T-bit mask and a uint16/int32 list per KV head', () => {
  it('chooses by bytes and round-trips; a mask with the wrong count is a corrupt error', () => {
    const H = 2;
    for (const [T, n, enc] of [[64, 32, 'mask'], [64, 4, 'mask'], [1000, 10, 'uint16'], [1000, 100, 'mask'], [100000, 3, 'int32']] as const) {
      expect(positionEncoding(T, n)).toBe(enc);
      const p = new Int32Array(n * H);
      for (let h = 0; h < H; h++) for (let j = 0; j < n; j++) p[j * H + h] = Math.floor(((j + 0.5) * T) / n) - h;
      const data = encodePositions(p, T, H);
      expect(data.byteLength).toBe(enc === 'mask' ? H * Math.ceil(T / 8) : n * H * (enc === 'uint16' ? 2 : 4));
      expect(decodePositions(data, T, n, H, 'stacked', 'pos.0')).toEqual(p);
    }
    const mask = encodePositions(Int32Array.from([0, 1, 5, 6]), 16, 2) as Uint8Array; // 2 bytes per head: a mask
    mask[0] |= 0x80;
    expect(() => decodePositions(mask, 16, 2, 2, 'stacked', 'pos.3')).toThrow(/"pos\.3" marks more than 2 kept tokens for KV head 0/);
  });
});
