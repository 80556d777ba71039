import * as tf from '@tensorflow/tfjs-core';
import { disposeKVCache, gaussian } from '@kvpack/core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  KvpackError,
  attention,
  createStrategy,
  decodeHalf,
  deserializeCache,
  headerBytes,
  ropeInverseFrequencies,
  selectBackend,
  type KVCache,
  type RopeConfig,
} from '@kvpack/core';
import { GroupSvdCache } from '@kvpack/strategy-utils';
import { attendWith, buildSparseIndex, decodeStepTimes, sparseGeometry, sparseSelection, valuePathFlops } from '@kvpack/strategy-utils/internal';
import './index.js'; // registers xkv
import { relMax, syntheticCache } from './test-utils.js';

// Small GQA layout: 4 query heads share 2 KV heads (g = 2), head_dim 8, H_kv·d = 16.
const layout = { nLayers: 4, nHeads: 4, nKvHeads: 2, headDim: 8 };
const F = layout.nKvHeads * layout.headDim;
const d = layout.headDim;
const T = 48;
let syn: ReturnType<typeof syntheticCache>;

beforeAll(async () => {
  await selectBackend('wasm');
  syn = syntheticCache(layout, T, 5, 3); // startPosition 3
});
afterAll(() => disposeKVCache(syn.cache));

async function compress(options: Record<string, unknown>, cache: KVCache = syn.cache): Promise<GroupSvdCache> {
  return (await createStrategy({ name: 'xkv', options }).compress(cache)) as GroupSvdCache;
}

function host(t: tf.Tensor): Float64Array {
  const out = Float64Array.from(t.dataSync() as Float32Array);
  t.dispose();
  return out;
}

/** Plain float64 RoPE of x [N, H, d] (row-major) at positions start…start+N−1. */
function rope64(x: ArrayLike<number>, N: number, H: number, rope: RopeConfig, start: number): Float64Array {
  const inv = ropeInverseFrequencies(rope, d);
  const out = new Float64Array(N * H * d);
  for (let t = 0; t < N; t++)
    for (let h = 0; h < H; h++)
      for (let i = 0; i < d / 2; i++) {
        const [ia, ib] = rope.layout === 'interleaved' ? [2 * i, 2 * i + 1] : [i, i + d / 2];
        const o = (t * H + h) * d;
        const a = x[o + ia];
        const b = x[o + ib];
        const ang = (start + t) * inv[i];
        out[o + ia] = a * Math.cos(ang) - b * Math.sin(ang);
        out[o + ib] = b * Math.cos(ang) + a * Math.sin(ang);
      }
  return out;
}

/** Plain float64 product of row-major A [m, k] and B [k, n]. */
function mm64(A: ArrayLike<number>, B: ArrayLike<number>, m: number, k: number, n: number): Float64Array {
  const out = new Float64Array(m * n);
  for (let i = 0; i < m; i++)
    for (let p = 0; p < k; p++) {
      const a = A[i * k + p];
      for (let j = 0; j < n; j++) out[i * n + j] += a * B[p * n + j];
    }
  return out;
}


function randomQueries(n: number, seed: number): tf.Tensor3D {
  const g = gaussian(seed);
  return tf.tensor3d(Float32Array.from({ length: n * layout.nHeads * d }, g), [n, layout.nHeads, d]);
}

function appendRandom(c: GroupSvdCache, layer: number, n: number, seed: number): void {
  const g = gaussian(seed);
  const k = tf.tensor3d(Float32Array.from({ length: n * F }, g), [n, layout.nKvHeads, d]);
  const v = tf.tensor3d(Float32Array.from({ length: n * F }, g), [n, layout.nKvHeads, d]);
  c.append(layer, k, v);
  tf.dispose([k, v]);
}

describe('fused RoPE reconstruction', () => {
  // R ≤ d takes U·(B·P); R > d takes (U·B)·P. Both layouts of the RoPE pairs.
  for (const layoutName of ['interleaved', 'half'] as const) {
    for (const rankK of [2, 6]) {
      it(`keys(l) = RoPE(U·B) in float64 (${layoutName} pairs, group rank ${rankK * 2} ${rankK * 2 <= d ? '≤' : '>'} d)`, async () => {
        const rope: RopeConfig = { theta: 500, layout: layoutName };
        const c = await compress({ layersPerGroup: 2, rankK, rankV: 3, storage: 'float32' }, { ...syn.cache, rope });
        for (const l of [0, 3]) {
          const g = c.groups.find((x) => x.layers.includes(l))!.index;
          const R = c.groupRank('k', g);
          const U = host(c.basis('k', g));
          const B = host(c.factor('k', l));
          const ref = rope64(mm64(U, B, T, R, F), T, layout.nKvHeads, rope, 3);
          const got = host(c.keys(l));
          expect(relMax(got, ref)).toBeLessThan(2e-6);
        }
        c.dispose();
      });
    }
  }
});

describe('full-mode attend (compressed-domain values)', () => {
  let c: GroupSvdCache;
  beforeAll(async () => {
    c = await compress({ layersPerGroup: 2, rankK: 5, rankV: 6, storage: 'float32' });
  });
  afterAll(() => c.dispose());

  async function check(layer: number, q: tf.Tensor3D, tail: number, values: 'auto' | 'compressed' | 'reconstruct') {
    const got = attendWith(c, layer, q, { causalTail: tail, values });
    const k = c.keys(layer);
    const v = c.values(layer);
    const ref = attention(q, k, v, tail);
    expect(got.shape).toEqual(q.shape);
    const e = relMax(host(got), host(ref));
    tf.dispose([k, v]);
    return e;
  }

  it('equals core attention(q, keys(l), values(l)) within 1e-4: one decode token, both value paths', async () => {
    appendRandom(c, 1, 1, 11);
    const q = randomQueries(1, 12);
    for (const path of ['auto', 'compressed', 'reconstruct'] as const) expect(await check(1, q, 1, path)).toBeLessThan(1e-4);
    // Without residual tokens (layer 2 has none).
    expect(await check(2, q, 0, 'compressed')).toBeLessThan(1e-4);
    q.dispose();
  });

  it('equals core attention with several decode tokens, causal among themselves (teacher forcing)', async () => {
    appendRandom(c, 0, 4, 13);
    const q = randomQueries(3, 14);
    for (const path of ['compressed', 'reconstruct'] as const) expect(await check(0, q, 3, path)).toBeLessThan(1e-4);
    // causalTail beyond the decode tokens: the queries' own tokens reach into the prefill.
    expect(await check(3, q, 3, 'compressed')).toBeLessThan(1e-4);
    q.dispose();
  });

  it('chooses the value path by multiply–accumulate count', () => {
    // n·H·T·R_v + n·H·R_v·F vs T·R_v·F + n·H·T·d: Llama-3.1-8B shapes (H = 32, F = 1024, d = 128, R_v = 768).
    expect(valuePathFlops(1, 32, 32768, 768, 1024, 128)).toEqual({ compressed: 32 * 32768 * 768 + 32 * 768 * 1024, reconstruct: 32768 * 768 * 1024 + 32 * 32768 * 128 });
    // Break-even n = T·R_v·F / (H·(T·R_v + R_v·F − T·d)) ≈ 37 query tokens here.
    const at = (n: number) => valuePathFlops(n, 32, 32768, 768, 1024, 128);
    expect(at(30).compressed).toBeLessThan(at(30).reconstruct);
    expect(at(45).compressed).toBeGreaterThan(at(45).reconstruct);
  });

  it('the model-facing attend() uses the same path; bad queries are a shape error', () => {
    const q = randomQueries(1, 15);
    const a = c.attend(2, q);
    const b = attendWith(c, 2, q, { values: 'compressed' });
    expect(relMax(host(a), host(b))).toBeLessThan(1e-6);
    const bad = tf.zeros([1, 3, d]) as tf.Tensor3D;
    expect(() => c.attend(2, bad)).toThrow(KvpackError);
    expect(() => c.attend(2, bad)).toThrow(/queries must be float32 \[n, 4, 8\]/);
    expect(() => c.attend(2, q, { causalTail: T + 99 })).toThrow(/causalTail/);
    tf.dispose([q, bad]);
  });
});

/** Float64 chunk landmarks, outlier scores and post-RoPE keys of one layer from the exact prefill keys. */
function exactSparse(layer: number, c: number, C: number, rope: RopeConfig, start: number) {
  const H = layout.nKvHeads;
  const K = rope64(syn.keys[layer], T, H, rope, start);
  const lm = new Float64Array(C * F);
  const minCos = new Float64Array(H * C);
  for (let ch = 0; ch < C; ch++)
    for (let h = 0; h < H; h++) {
      for (let j = 0; j < c; j++) for (let e = 0; e < d; e++) lm[ch * F + h * d + e] += K[((ch * c + j) * H + h) * d + e] / c;
      let lowest = Infinity;
      for (let j = 0; j < c; j++) {
        let dot = 0;
        let nk = 0;
        let nl = 0;
        for (let e = 0; e < d; e++) {
          const k = K[((ch * c + j) * H + h) * d + e];
          const m = lm[ch * F + h * d + e];
          dot += k * m;
          nk += k * k;
          nl += m * m;
        }
        lowest = Math.min(lowest, dot / Math.sqrt(nk * nl));
      }
      minCos[h * C + ch] = lowest;
    }
  return { K, lm, minCos };
}

describe('sparse decode (xKV-SR)', () => {
  const sparse = { budget: 16, chunkSize: 4, outlierChunks: 2, localTokens: 6 };
  // T = 48, local 6 → C = ⌊42 / 4⌋ = 10 chunks (tokens 0–39), exact local tokens 40–47 (8 ≥ 6).
  let c: GroupSvdCache;
  beforeAll(async () => {
    c = await compress({ layersPerGroup: 2, rankK: 3, rankV: 4, decode: 'sparse', sparse });
  });
  afterAll(() => c.dispose());

  it('geometry: chunks, outliers and local tokens (a last partial chunk stays exact)', () => {
    expect(sparseGeometry(48, { ...sparse })).toEqual({ chunks: 10, outliers: 2, local: 8 });
    expect(sparseGeometry(45, { ...sparse, localTokens: 4 })).toEqual({ chunks: 10, outliers: 2, local: 5 });
    expect(sparseGeometry(5, { ...sparse, localTokens: 0 })).toEqual({ chunks: 1, outliers: 1, local: 1 });
    expect(c.sparseIndex).toMatchObject({ chunks: 10, outliers: 2, local: 8, chunkSize: 4 });
  });

  it('landmarks are the chunk means of the exact post-RoPE keys; outliers have the lowest min-cosine; exact rows are 16-bit exact keys', () => {
    const ix = c.sparseIndex!;
    for (let l = 0; l < layout.nLayers; l++) {
      const { K, lm, minCos } = exactSparse(l, 4, 10, syn.cache.rope, 3);
      const got = decodeHalf(ix.layers[l].landmarks);
      for (let i = 0; i < lm.length; i++) expect(Math.abs(got[i] - lm[i])).toBeLessThanOrEqual(Math.abs(lm[i]) * 2 ** -11 + 1e-7);
      for (let h = 0; h < layout.nKvHeads; h++) {
        const order = Array.from({ length: 10 }, (_, i) => i).sort((a, b) => minCos[h * 10 + a] - minCos[h * 10 + b]);
        expect(minCos[h * 10 + order[2]] - minCos[h * 10 + order[1]]).toBeGreaterThan(1e-6); // no near-tie at the cut
        expect(Array.from(ix.layers[l].outlierChunks.subarray(h * 2, h * 2 + 2))).toEqual(order.slice(0, 2).sort((a, b) => a - b));
        // Exact outlier keys, [H_kv, O·c, d].
        const ok = decodeHalf(ix.layers[l].outlierK);
        for (let k = 0; k < 2; k++)
          for (let j = 0; j < 4; j++) {
            const t = ix.layers[l].outlierChunks[h * 2 + k] * 4 + j;
            for (let e = 0; e < d; e++) {
              const ref = K[(t * layout.nKvHeads + h) * d + e];
              expect(Math.abs(ok[((h * 2 + k) * 4 + j) * d + e] - ref)).toBeLessThanOrEqual(Math.abs(ref) * 2 ** -11 + 1e-7);
            }
          }
      }
      const lk = decodeHalf(ix.layers[l].localK);
      for (let i = 0; i < 8 * F; i++) expect(Math.abs(lk[i] - K[40 * F + i])).toBeLessThanOrEqual(Math.abs(K[40 * F + i]) * 2 ** -11 + 1e-7);
    }
  });

  it('the device-side index build (GPU default) equals the host float64 build up to float32 rounding', async () => {
    const o = { ...sparse, budget: 16 };
    for (const [TT, opts] of [[48, o], [45, { ...o, localTokens: 4 }], [48, { ...o, outlierChunks: 0 }]] as const) {
      const cache: KVCache = TT === T ? syn.cache : { ...syn.cache, keys: syn.cache.keys.map((k) => k.slice([0, 0, 0], [TT, -1, -1])), values: syn.cache.values.map((v) => v.slice([0, 0, 0], [TT, -1, -1])) };
      const a = await buildSparseIndex(cache, TT, opts, 'host');
      const n0 = tf.memory().numTensors;
      const b = await buildSparseIndex(cache, TT, opts, 'device');
      expect(tf.memory().numTensors).toBe(n0);
      expect([b.chunks, b.outliers, b.local]).toEqual([a.chunks, a.outliers, a.local]);
      for (let l = 0; l < layout.nLayers; l++) {
        const A = a.layers[l];
        const B = b.layers[l];
        expect(Array.from(B.outlierChunks)).toEqual(Array.from(A.outlierChunks));
        for (const key of ['landmarks', 'outlierK', 'outlierV', 'localK', 'localV'] as const) {
          const x = decodeHalf(A[key]);
          const y = decodeHalf(B[key]);
          expect(y.length, key).toBe(x.length);
          // At most one float16 ulp apart (float32 vs float64 arithmetic before the rounding).
          for (let i = 0; i < x.length; i++) expect(Math.abs(y[i] - x[i]), `${key}[${i}]`).toBeLessThanOrEqual(Math.abs(x[i]) * 2 ** -10 + 1e-6);
        }
      }
      if (cache !== syn.cache) tf.dispose([...cache.keys, ...cache.values]);
    }
  });

  it('selects the top chunks by q·landmark as a float64 computation does (softmax per query, sum over queries, max over the GQA group)', () => {
    const ix = c.sparseIndex!;
    const n = 2;
    const g = layout.nHeads / layout.nKvHeads;
    for (const [l, seed] of [[0, 21], [3, 22]]) {
      const q = randomQueries(n, seed);
      const qh = Float64Array.from(q.dataSync());
      const lm = decodeHalf(ix.layers[l].landmarks);
      const got = sparseSelection(c, l, q);
      for (let h = 0; h < layout.nKvHeads; h++) {
        const outl = new Set(ix.layers[l].outlierChunks.subarray(h * 2, h * 2 + 2));
        const cand = Array.from({ length: 10 }, (_, i) => i).filter((i) => !outl.has(i));
        const score = new Map<number, number>();
        for (let ii = 0; ii < g; ii++) {
          const head = h * g + ii;
          const sum = new Map<number, number>(cand.map((ch) => [ch, 0]));
          for (let j = 0; j < n; j++) {
            const logits = cand.map((ch) => {
              let s = 0;
              for (let e = 0; e < d; e++) s += qh[(j * layout.nHeads + head) * d + e] * lm[ch * F + h * d + e];
              return s / Math.sqrt(d);
            });
            const mx = Math.max(...logits);
            const z = logits.reduce((a, x) => a + Math.exp(x - mx), 0);
            cand.forEach((ch, i) => sum.set(ch, sum.get(ch)! + Math.exp(logits[i] - mx) / z));
          }
          for (const ch of cand) score.set(ch, Math.max(score.get(ch) ?? -Infinity, sum.get(ch)!));
        }
        const ranked = [...cand].sort((a, b) => score.get(b)! - score.get(a)!);
        expect(score.get(ranked[3])! - score.get(ranked[4])!).toBeGreaterThan(1e-5); // budget 16 / c 4 = 4 chunks; no near-tie
        expect(got[h]).toEqual(ranked.slice(0, 4).sort((a, b) => a - b));
      }
      q.dispose();
    }
  });

  it('with a budget covering every chunk it equals attention over keys()/values() (exact outlier and local rows in place), both gather paths', async () => {
    appendRandom(c, 2, 2, 31);
    for (const [l, n] of [[2, 1], [2, 2], [1, 1]] as const) {
      const q = randomQueries(n, 40 + l + n);
      const k = c.keys(l);
      const v = c.values(l);
      const ref = host(attention(q, k, v, n));
      for (const [heads, gather] of [['loop', 'host'], ['loop', 'device'], ['batched', 'device']] as const) {
        for (const values of ['compressed', 'reconstruct'] as const) {
          const got = attendWith(c, l, q, { causalTail: n, budget: 64, gather, values, heads });
          expect(relMax(host(got), ref), `${heads} ${gather} ${values}`).toBeLessThan(1e-4);
        }
      }
      tf.dispose([q, k, v]);
    }
  });

  it('the batched path (all KV heads in one kernel sequence, the GPU default) equals the per-head loop at a partial budget', () => {
    // Layer 2 holds 2 residual decode tokens (appended above); n = 2 queries with a causal tail of 1.
    for (const [l, n, tail, budget] of [[0, 1, 0, 16], [2, 1, 1, 8], [2, 2, 1, 24], [3, 2, 0, 4]] as const) {
      const q = randomQueries(n, 90 + l + n + budget);
      const loop = host(attendWith(c, l, q, { causalTail: tail, budget, heads: 'loop' }));
      const batched = host(attendWith(c, l, q, { causalTail: tail, budget, heads: 'batched' }));
      expect(relMax(batched, loop), `layer ${l} n ${n} budget ${budget}`).toBeLessThan(1e-5);
      // The selection matters: the same queries at the full budget give a different result.
      if (budget < 40) expect(relMax(host(attendWith(c, l, q, { causalTail: tail, budget: 40, heads: 'batched' })), loop)).toBeGreaterThan(1e-4);
      q.dispose();
    }
    const q = randomQueries(1, 99);
    expect(() => attendWith(c, 0, q, { heads: 'batched', gather: 'host' })).toThrow(/batched path gathers on the device/);
    expect(() => attendWith(c, 0, q, { heads: 'both' as never })).toThrow(/heads must be/);
    // The WGSL kernels (sparse-webgpu.test.ts) need the webgpu backend and name what is missing.
    expect(() => attendWith(c, 0, q, { heads: 'batched', kernels: 'wgsl' })).toThrow(/WGSL kernels need the webgpu backend \(now wasm\)/);
    expect(() => attendWith(c, 0, q, { heads: 'batched', kernels: 'cuda' as never })).toThrow(/kernels must be 'auto', 'tfjs' or 'wgsl'/);
    expect(() => attendWith(c, 0, q, { heads: 'loop', kernels: 'wgsl' })).toThrow(/kernels: 'wgsl' is a batched path/);
    expect(() => attendWith(c, 0, q, { kernels: 'wgsl', values: 'reconstruct' })).toThrow(/values: 'reconstruct' needs kernels: 'tfjs'/);
    q.dispose();
  });

  it('keys()/values() are the low-rank reconstruction with the exact 16-bit outlier and local rows', async () => {
    const full = await compress({ layersPerGroup: 2, rankK: 3, rankV: 4 });
    const a = host(c.keys(3));
    const b = host(full.keys(3));
    const ix = c.sparseIndex!;
    const lk = decodeHalf(ix.layers[3].localK);
    const ok = decodeHalf(ix.layers[3].outlierK);
    const H = layout.nKvHeads;
    for (let t = 0; t < T; t++)
      for (let h = 0; h < H; h++) {
        const oc = Array.from(ix.layers[3].outlierChunks.subarray(h * 2, h * 2 + 2));
        const k = oc.indexOf(Math.floor(t / 4));
        for (let e = 0; e < d; e++) {
          const i = (t * H + h) * d + e;
          const want = t >= 40 ? lk[(t - 40) * F + h * d + e] : k >= 0 && t < 40 ? ok[((h * 2 + k) * 4 + (t % 4)) * d + e] : b[i];
          expect(a[i]).toBe(want);
        }
      }
    full.dispose();
  });

  it('at a small budget it differs from full attention, and attend() uses the configured budget', () => {
    const q = randomQueries(1, 51);
    const small = host(c.attend(0, q));
    const same = host(c.attendSparse!(0, q, { budget: 16 }));
    expect(relMax(small, same)).toBeLessThan(1e-6);
    const all = host(c.attendSparse!(0, q, { budget: 64 }));
    expect(relMax(small, all)).toBeGreaterThan(1e-4);
    expect(() => c.attendSparse!(0, q, { budget: 6 })).toThrow(/multiple of chunkSize 4/);
    q.dispose();
  });

  it('without outliers and local tokens, and a full budget, it equals full-mode attend of the same factors', async () => {
    const o = { layersPerGroup: 2, rankK: 3, rankV: 4, storage: 'float32' };
    const s = await compress({ ...o, decode: 'sparse', sparse: { budget: 48, chunkSize: 8, outlierChunks: 0, localTokens: 0 } });
    const f = await compress(o);
    const q = randomQueries(1, 61);
    for (const l of [0, 2]) expect(relMax(host(s.attend(l, q)), host(f.attend(l, q)))).toBeLessThan(1e-4);
    q.dispose();
    s.dispose();
    f.dispose();
  });

  it('T not a multiple of the chunk size: the last partial chunk is exact and a full budget equals attention over keys()/values()', async () => {
    const cache: KVCache = { ...syn.cache, keys: syn.cache.keys.map((k) => k.slice([0, 0, 0], [45, -1, -1])), values: syn.cache.values.map((v) => v.slice([0, 0, 0], [45, -1, -1])) };
    const s = await compress({ layersPerGroup: 4, rankK: 3, rankV: 4, decode: 'sparse', sparse: { budget: 64, chunkSize: 8, outlierChunks: 1, localTokens: 0 } }, cache);
    expect(s.sparseIndex).toMatchObject({ chunks: 5, outliers: 1, local: 5 });
    const q = randomQueries(1, 71);
    const k = s.keys(1);
    const v = s.values(1);
    expect(relMax(host(s.attend(1, q)), host(attention(q, k, v, 1)))).toBeLessThan(1e-4);
    tf.dispose([q, k, v, ...cache.keys, ...cache.values]);
    s.dispose();
  });

  it('measured bytes count the 16-bit landmarks, exact rows and int32 chunk indices, and equal the serialized payload', async () => {
    const full = await compress({ layersPerGroup: 2, rankK: 3, rankV: 4 });
    const H = layout.nKvHeads;
    const perLayer = 10 * F * 2 + H * 2 * 4 + 2 * (H * 2 * 4 * d * 2) + 2 * (8 * F * 2);
    expect(c.byteSize() - full.byteSize() - (c.residualTokens(2) * F * 4 * 2)).toBe(layout.nLayers * perLayer);
    const bytes = c.serialize();
    expect(c.byteSize()).toBe(bytes.length - headerBytes(bytes));
    const r = deserializeCache(bytes) as GroupSvdCache;
    expect(r.byteSize()).toBe(c.byteSize());
    const q = randomQueries(1, 81);
    expect(Array.from(host(r.attend(2, q)))).toEqual(Array.from(host(c.attend(2, q))));
    q.dispose();
    r.dispose();
    full.dispose();
  });

  it('a serialization whose sparse index does not match the options is a clear error', async () => {
    const bytes = c.serialize();
    const other = createStrategy({ name: 'xkv', options: { layersPerGroup: 2, rankK: 3, rankV: 4, decode: 'sparse', sparse: { ...sparse, outlierChunks: 3 } } });
    expect(() => other.deserialize(bytes)).toThrow(/sparse index/);
  });
});

describe('decode options', () => {
  it('rejects bad sparse options with a config error', () => {
    for (const bad of [
      { decode: 'sparse', sparse: { budget: 12, chunkSize: 8 } },
      { decode: 'sparse', sparse: { outlierChunks: -1 } },
      { decode: 'sparse', sparse: { chunkSize: 0 } },
      { sparse: { budget: 64 } },
      { decode: 'dense' },
    ]) {
      let err: unknown;
      try {
        createStrategy({ name: 'xkv', options: bad });
      } catch (e) {
        err = e;
      }
      expect(err, JSON.stringify(bad)).toBeInstanceOf(KvpackError);
      expect((err as KvpackError).code).toBe('config');
    }
    expect(() => createStrategy({ name: 'xkv', options: { sparse: { budget: 64 } } })).toThrow(/sparse options need decode: 'sparse'/);
  });

  it('decode: sparse with no sparse block takes the defaults (budget 2048, chunk 8, 48 outliers, 32 local tokens)', async () => {
    const c = await compress({ layersPerGroup: 4, rankK: 2, rankV: 2, decode: 'sparse' });
    expect(c.sparseIndex!.options).toEqual({ budget: 2048, chunkSize: 8, outlierChunks: 48, localTokens: 32 });
    expect(c.sparseIndex).toMatchObject({ chunks: 2, outliers: 2, local: 32 });
    c.dispose();
  });
});

describe('decode memory and timing hook', () => {
  it('tf.memory().numTensors returns to its start after compress, attend (both modes), reconstruct, round trip and dispose (×3)', async () => {
    const start = tf.memory().numTensors;
    for (let i = 0; i < 3; i++) {
      for (const decode of ['full', 'sparse'] as const) {
        const c = await compress({ layersPerGroup: 2, rankK: 3, rankV: 4, decode, ...(decode === 'sparse' ? { sparse: { budget: 8, chunkSize: 4, outlierChunks: 1, localTokens: 4 } } : {}) });
        appendRandom(c, 0, 2, 90 + i);
        const q = randomQueries(2, 91);
        for (let l = 0; l < layout.nLayers; l++) tf.dispose([c.attend(l, q), c.keys(l), c.values(l)]);
        if (decode === 'sparse') tf.dispose([attendWith(c, 0, q, { gather: 'device' }), attendWith(c, 2, q, { heads: 'batched' }), attendWith(c, 1, q, { mode: 'full' })]);
        const r = deserializeCache(c.serialize());
        tf.dispose([r.attend!(0, q), r.keys(3)]);
        r.dispose();
        q.dispose();
        c.dispose();
        c.dispose();
        expect(tf.memory().numTensors).toBe(start);
      }
    }
  });

  it('decodeStepTimes returns finite medians for keys, values and one attend step (no timing assertion)', async () => {
    const c = await compress({ layersPerGroup: 2, rankK: 3, rankV: 4, decode: 'sparse', sparse: { budget: 8, chunkSize: 4, outlierChunks: 1, localTokens: 4 } });
    const q = randomQueries(1, 95);
    const t = await decodeStepTimes(c, q, { layer: 1, repeats: 2 });
    for (const v of Object.values(t)) expect(Number.isFinite(v) && v >= 0).toBe(true);
    q.dispose();
    c.dispose();
  });
});
