// The WGSL kernels of sparse decode (sparse-wgsl.ts) on the webgpu backend. Any WebGPU adapter runs
// them, a software one too: on a machine without a GPU, Mesa's lavapipe (Debian: mesa-vulkan-drivers
// ≥ 24, e.g. from bookworm-backports) is enough. Without an adapter the suite is skipped and says why.
import * as tf from '@tensorflow/tfjs-core';
import { HalfTensor, disposeKVCache, gaussian } from '@kvpack/core';
import { afterAll, describe, expect, it } from 'vitest';
import { attention, createStrategy, selectBackend, wgslValidationErrors, wgslWorkgroupStorageLimit } from '@kvpack/core';
import type { KVCache, ModelLayout } from '@kvpack/core';
import './index.js'; // registers xkv
import type { GroupSvdCache } from '@kvpack/strategy-utils';
import { attendWith, keyRowsFits, keyRowsWgsl, selectChunkTokens } from '@kvpack/strategy-utils/internal';
import { relMax, syntheticCache } from './test-utils.js';

const unavailable = await selectBackend('webgpu').then(
  () => null,
  (e: Error) => e.message.split('\n')[0],
);
const title = unavailable ? `sparse decode WGSL kernels (SKIPPED: no WebGPU adapter: ${unavailable})` : 'sparse decode WGSL kernels (webgpu)';
if (unavailable) console.warn(`[kvpack] ${title}`);

async function host(t: tf.Tensor): Promise<Float64Array> {
  const out = Float64Array.from((await t.data()) as Float32Array);
  t.dispose();
  return out;
}


// Software adapters compile each new shader slowly (tens of seconds the first time on a 2-core machine).
describe.skipIf(unavailable !== null)(title, { timeout: 600_000 }, () => {
  const caches: KVCache[] = [];
  afterAll(async () => {
    caches.forEach(disposeKVCache);
    // Every shader and binding dispatched by these tests passed WebGPU validation.
    expect(await wgslValidationErrors()).toEqual([]);
  });

  it('chunk selection equals a float64 ranking of the landmark scores (softmax per query row, max over the GQA group)', async () => {
    // C = 600 chunks: more than one per invocation of the 256-wide workgroup.
    const [H, G, d, C, k, c] = [2, 3, 16, 600, 50, 4];
    const g = gaussian(3);
    const q = Float32Array.from({ length: H * G * d }, () => 0.5 * g());
    const lt = Float32Array.from({ length: H * d * C }, g);
    // 20 outlier chunks per head (their logits get −1e30); the queries are scaled by the kernel.
    const scale = 0.7;
    const mask = new Float32Array(H * C);
    const oc = new Int32Array(H * 20);
    for (let h = 0; h < H; h++)
      for (let j = 0; j < 20; j++) {
        oc[h * 20 + j] = (j * 37 + h * 11) % C;
        mask[h * C + oc[h * 20 + j]] = -1e30;
      }
    const qt = tf.tensor3d(q, [H, G, d]);
    const ltt = tf.tensor3d(lt, [H, d, C]);
    const ot = tf.tensor2d(oc, [H, 20], 'int32');
    const tok = Int32Array.from(await selectChunkTokens(qt, ltt, ot, k, c, scale).data());
    tf.dispose([qt, ltt, ot]);
    for (let h = 0; h < H; h++) {
      const score = new Float64Array(C);
      for (let r = 0; r < G; r++) {
        const a = Array.from({ length: C }, (_, ch) => {
          let s = 0;
          for (let e = 0; e < d; e++) s += Math.fround(q[(h * G + r) * d + e] * Math.fround(scale)) * lt[(h * d + e) * C + ch];
          return s + mask[h * C + ch];
        });
        const m = Math.max(...a);
        const z = a.reduce((acc, x) => acc + Math.exp(x - m), 0);
        a.forEach((x, ch) => (score[ch] = Math.max(score[ch], Math.exp(x - m) / z)));
      }
      const chunks = new Set<number>();
      for (let i = 0; i < k; i++) {
        const ch = tok[(h * k + i) * c] / c;
        expect(Number.isInteger(ch)).toBe(true);
        for (let u = 0; u < c; u++) expect(tok[(h * k + i) * c + u]).toBe(ch * c + u);
        chunks.add(ch);
      }
      expect(chunks.size).toBe(k);
      const ranked = Array.from({ length: C }, (_, i) => i)
        .filter((ch) => mask[h * C + ch] === 0)
        .sort((a, b) => score[b] - score[a]);
      const kth = score[ranked[k - 1]];
      const tol = 1e-5 * score[ranked[0]];
      for (const ch of chunks) {
        expect(mask[h * C + ch]).toBe(0);
        expect(score[ch]).toBeGreaterThanOrEqual(kth - tol);
      }
      for (const ch of ranked.slice(k)) if (!chunks.has(ch)) expect(score[ch]).toBeLessThanOrEqual(kth + tol);
    }
  });

  it('chunk selection under ties (every score equal) still returns k distinct non-outlier chunks', async () => {
    // The shapes of the test above (one shader: compiling one takes tens of seconds on lavapipe).
    const [H, G, d, C, k, c] = [2, 3, 16, 600, 50, 4];
    const qt = tf.zeros([H, G, d]) as tf.Tensor3D;
    const ltt = tf.ones([H, d, C]) as tf.Tensor3D;
    // Every third chunk of the flattened [H, C] grid is an outlier: C / 3 per head.
    const oc = Int32Array.from({ length: H * (C / 3) }, (_, i) => {
      const h = Math.floor(i / (C / 3));
      const first = (3 - ((h * C) % 3)) % 3;
      return first + 3 * (i % (C / 3));
    });
    const ot = tf.tensor2d(oc, [H, C / 3], 'int32');
    const tok = Int32Array.from(await selectChunkTokens(qt, ltt, ot, k, c).data());
    tf.dispose([qt, ltt, ot]);
    for (let h = 0; h < H; h++) {
      // Ties go to the lowest chunk indices (as tf.topk): the first k chunks that are not outliers.
      const eligible = Array.from({ length: C }, (_, ch) => ch).filter((ch) => (h * C + ch) % 3 !== 0);
      expect(Array.from({ length: k }, (_, i) => tok[(h * k + i) * c] / c), `head ${h}`).toEqual(eligible.slice(0, k));
    }
  });

  it('the selected keys product U_k[tokens]·B_k per KV head equals float64, factors float16-packed or float32, ragged tiles', async () => {
    // d = 40: a partial last column group; S and R_k not multiples of the tile (64 rows, 16 rank columns).
    for (const [H, S, T, Rk, d, half] of [
      [2, 100, 300, 37, 40, true],
      [3, 64, 90, 16, 128, false],
    ] as const) {
      const g = gaussian(H * 100 + S);
      const u = Float32Array.from({ length: T * Rk }, g);
      const b = Float32Array.from({ length: Rk * H * d }, g);
      const tok = Int32Array.from({ length: H * S }, (_, i) => (i * 7919 + 13) % T);
      const before = tf.memory().numTensors;
      const U = tf.tensor2d(u, [T, Rk]);
      const Bt = tf.tensor2d(b, [Rk, H * d]);
      const Uh = half ? await HalfTensor.fromTensor(U) : null;
      const Bh = half ? await HalfTensor.fromTensor(Bt) : null;
      // Oracle over the values the kernel reads (float16-rounded when packed).
      const uq = Uh ? await host(Uh.unpack()) : Float64Array.from(u);
      const bq = Bh ? await host(Bh.unpack()) : Float64Array.from(b);
      const tt = tf.tensor2d(tok, [H, S], 'int32');
      const got = await host(keyRowsWgsl(tt, Uh ?? U, Bh ?? Bt, d));
      let worst = 0;
      for (let h = 0; h < H; h++)
        for (let s = 0; s < S; s++)
          for (let e = 0; e < d; e++) {
            let want = 0;
            let mag = 0;
            for (let r = 0; r < Rk; r++) {
              const x = uq[tok[h * S + s] * Rk + r] * bq[r * H * d + h * d + e];
              want += x;
              mag += Math.abs(x);
            }
            worst = Math.max(worst, Math.abs(got[(h * S + s) * d + e] - want) / Math.max(mag, 1e-30));
          }
      expect(worst, `H ${H} S ${S} Rk ${Rk} d ${d}`).toBeLessThan(1e-6);
      tf.dispose([U, Bt, tt]);
      Uh?.dispose();
      Bh?.dispose();
      expect(tf.memory().numTensors).toBe(before);
    }
    expect(keyRowsFits(16)).toBe(true);
    expect(keyRowsFits(256)).toBe(false);
  });

  it('falls back to the tfjs kernels where the WGSL arrays do not fit the device (32 query heads on one KV head)', async () => {
    const layout: ModelLayout = { nLayers: 2, nHeads: 32, nKvHeads: 1, headDim: 16 };
    const syn = syntheticCache(layout, 300, 9);
    caches.push(syn.cache);
    const sparse = { budget: 40, chunkSize: 4, outlierChunks: 3, localTokens: 8 };
    const c = (await createStrategy({ name: 'xkv', options: { layersPerGroup: 2, rankK: 4, rankV: 6, decode: 'sparse', sparse } }).compress(syn.cache)) as GroupSvdCache;
    const q = tf.tensor3d(Float32Array.from({ length: 32 * 16 }, gaussian(4)), [1, 32, 16]);
    // The value partials need 4·(32·256 + 256) = 33,792 bytes of workgroup memory: more than 16 KiB or 32 KiB.
    const auto = await host(c.attendSparse!(1, q));
    const ref = await host(attendWith(c, 1, q, { kernels: 'tfjs', values: 'compressed' }));
    const loop = await host(attendWith(c, 1, q, { heads: 'loop' }));
    expect(relMax(auto, loop)).toBeLessThan(1e-5);
    if (wgslWorkgroupStorageLimit() < 33792) {
      expect(() => attendWith(c, 1, q, { kernels: 'wgsl' })).toThrow(/WGSL kernels need .*they do not/);
      expect(relMax(auto, ref)).toBe(0); // auto took the tfjs kernels
    } else {
      expect(relMax(await host(attendWith(c, 1, q, { kernels: 'wgsl' })), ref)).toBeLessThan(1e-5);
    }
    q.dispose();
    c.dispose();
  });

  for (const ropeLayout of ['interleaved', 'half'] as const) {
    it(`a one-token step equals the tfjs formulation at a partial budget and core attention at a full one (${ropeLayout} RoPE, residual tokens, GQA)`, async () => {
      // C = (700 − 4) / 2 = 348 chunks; budget 80 = 40 chunks; 5 outlier chunks per KV head.
      const layout: ModelLayout = { nLayers: 2, nHeads: 8, nKvHeads: 2, headDim: 16 };
      const T = 700;
      const syn = syntheticCache(layout, T, 7, 5);
      syn.cache.rope = { ...syn.cache.rope, layout: ropeLayout };
      caches.push(syn.cache);
      const sparse = { budget: 80, chunkSize: 2, outlierChunks: 5, localTokens: 4 };
      const c = (await createStrategy({ name: 'xkv', options: { layersPerGroup: 2, rankK: 6, rankV: 8, decode: 'sparse', sparse } }).compress(syn.cache)) as GroupSvdCache;
      const g = gaussian(11);
      const F = layout.nKvHeads * layout.headDim;
      const query = (seed: number) => tf.tensor3d(Float32Array.from({ length: layout.nHeads * layout.headDim }, gaussian(seed)), [1, layout.nHeads, layout.headDim]);
      for (const nDec of [0, 3]) {
        if (nDec > 0) {
          const kk = tf.tensor3d(Float32Array.from({ length: nDec * F }, g), [nDec, layout.nKvHeads, layout.headDim]);
          const vv = tf.tensor3d(Float32Array.from({ length: nDec * F }, g), [nDec, layout.nKvHeads, layout.headDim]);
          c.append(1, kk, vv);
          tf.dispose([kk, vv]);
        }
        const q = query(20 + nDec);
        const wgsl = await host(attendWith(c, 1, q, { kernels: 'wgsl' }));
        const ref = await host(attendWith(c, 1, q, { kernels: 'tfjs', heads: 'batched', values: 'compressed' }));
        expect(relMax(wgsl, ref), `nDec ${nDec}`).toBeLessThan(1e-5);
        // The selection matters: the full budget gives a different result …
        const full = await host(attendWith(c, 1, q, { kernels: 'wgsl', budget: 700 }));
        expect(relMax(full, ref)).toBeGreaterThan(1e-4);
        // … which is attention over keys()/values() (the exact outlier and local rows in place).
        const k = c.keys(1);
        const v = c.values(1);
        const exact = await host(attention(q, k, v, 1));
        tf.dispose([k, v]);
        expect(relMax(full, exact), `full budget, nDec ${nDec}`).toBeLessThan(1e-4);
        // Repeated steps leave no tensors behind (the first ones built the cache's long-lived decode tensors).
        const before = tf.memory().numTensors;
        for (let i = 0; i < 3; i++) tf.dispose(attendWith(c, 1, q, { kernels: 'wgsl' }));
        expect(tf.memory().numTensors).toBe(before);
        q.dispose();
      }
      const q2 = tf.zeros([2, layout.nHeads, layout.headDim]) as tf.Tensor3D;
      expect(() => attendWith(c, 1, q2, { kernels: 'wgsl' })).toThrow(/WGSL kernels need .* one query token \(got 2\)/);
      q2.dispose();
      c.dispose();
    });
  }
});
