// The WGSL paths of the backend-held storage (float16 pack/unpack, code unpacking, dequantization) on a
// WebGPU adapter (a software one such as Mesa's lavapipe is enough; see scripts/webgpu-software.sh),
// against the host encodings. Without an adapter the suite is skipped and says why.
import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { HalfTensor, applyRope, disposeKVCache, encodeHalf, fromHalfBits, selectBackend, toHalfBits, wgslValidationErrors } from '@kvpack/core';
import { syntheticCache } from '@kvpack/core/conformance';
import { KeptTokensCache, gatherPerHeadBits } from '../eviction/kept-tokens.js';
import { CodesTensor, dequantizeOnBackend } from './codes-tensor.js';
import { concatHalfRows, dropHalfRows } from './half-rows.js';
import { concatAllWords, concatWords, lastWords } from './words.js';
import { packCodes } from './packing.js';
import { dequantizeMatrix, quantizeMatrix } from './quantize.js';

const unavailable = await selectBackend('webgpu').then(
  () => null,
  (e: Error) => e.message.split('\n')[0],
);
const title = unavailable ? `held storage on webgpu (SKIPPED: no WebGPU adapter: ${unavailable})` : 'held storage on webgpu';
if (unavailable) console.warn(`[kvpack] ${title}`);

describe.skipIf(unavailable !== null)(title, { timeout: 600_000 }, () => {
  it('packs float32 to float16 on the device bit-identically to the host rounding, and unpacks exactly', async () => {
    // Finite float16 values, their midpoints (ties to even) and values between them, odd count.
    const xs: number[] = [];
    for (let h = 0; h < 0x7bff; h += 331) {
      const a = fromHalfBits(h);
      const b = fromHalfBits(h + 1);
      xs.push(a, -a, (a + b) / 2, a + (b - a) * 0.3);
    }
    xs.push(1);
    const x = tf.tensor(Float32Array.from(xs));
    const h = await HalfTensor.fromTensor(x);
    expect(Array.from(await h.bits())).toEqual(Array.from(encodeHalf(Float32Array.from(xs))));
    const u = h.unpack();
    expect(Array.from(await u.data()).map(toHalfBits)).toEqual(Array.from(encodeHalf(Float32Array.from(xs))));
    tf.dispose([x, u]);
    h.dispose();
  });

  it('unpacks codes and dequantizes on the device as the host does', async () => {
    for (const bits of [2, 4, 8] as const) {
      const codes = Array.from({ length: 301 }, (_, i) => (i * 37 + 11) & ((1 << bits) - 1));
      const t = CodesTensor.fromBytes(packCodes(codes, bits), bits, codes.length);
      const u = t.unpack();
      expect(Array.from(await u.data())).toEqual(codes);
      u.dispose();
      t.dispose();
    }
    let s = 7;
    const rnd = () => ((s = (s * 48271) % 2147483647) / 2147483647 - 0.5) * 6;
    const [rows, cols, gs] = [6, 45, 16];
    const q = quantizeMatrix(Float32Array.from({ length: rows * cols }, rnd), rows, cols, { bits: 4, quantGroupSize: gs, symmetric: false });
    const parts = [CodesTensor.fromBytes(q.codes, 4, rows * cols), HalfTensor.fromBits(q.scales, [q.scales.length]), CodesTensor.fromBytes(q.zeros!, 8, q.zeros!.length)] as const;
    const x = dequantizeOnBackend({ rows, cols, bits: 4, quantGroupSize: gs, symmetric: false }, ...parts);
    expect(Array.from(await x.data())).toEqual(Array.from(dequantizeMatrix(q)));
    x.dispose();
    parts.forEach((p) => p.dispose());
    expect(await wgslValidationErrors()).toEqual([]);
  });

  it('joins and cuts packed words exactly (tfjs-webgpu int32 concat/slice would round them through float32)', async () => {
    const start = tf.memory().numTensors;
    const words = [2147483647, -2147483648, 16777217, -16777217, 123456789, 5, 0x7ff0f0f1, -5];
    // On the device: packed float16 words, whose bit patterns exceed 2^24.
    const x = tf.tensor1d([0.63916015625, 0.826171875, -1.7470703125, 3.14, 100.5, -0.001, 7]);
    const h = await HalfTensor.fromTensor(x);
    x.dispose();
    const dev = Array.from(await h.packed.data());
    const up = tf.tensor1d(words, 'int32');
    const j = concatWords(h.packed, up);
    expect(Array.from(await j.data())).toEqual([...dev, ...words]);
    const all = concatAllWords([up, h.packed, up]);
    expect(Array.from(await all.data())).toEqual([...words, ...dev, ...words]);
    const last = lastWords(j, 10);
    expect(Array.from(await last.data())).toEqual([...dev, ...words].slice(-10));
    tf.dispose([j, all, last, up]);
    h.dispose();
    expect(tf.memory().numTensors).toBe(start);
  });

  it('packs codes on the device as the host packs them, joins them at any boundary, and joins and drops float16 rows', async () => {
    const start = tf.memory().numTensors;
    for (const bits of [2, 4, 8] as const) {
      const a = Array.from({ length: 301 }, (_, i) => (i * 37 + 11) & ((1 << bits) - 1));
      const b = Array.from({ length: 77 }, (_, i) => (i * 13 + 5) & ((1 << bits) - 1));
      const [xa, xb] = [tf.tensor1d(a), tf.tensor1d(b)];
      const ta = CodesTensor.pack(xa, bits);
      const tb = CodesTensor.pack(xb, bits);
      const j = CodesTensor.concat(ta, tb); // 301 codes end inside a word: unpacked and packed again
      const jj = CodesTensor.concat(tb, tb);
      const bytes = async (c: CodesTensor) => Array.from(new Uint8Array(Int32Array.from((await c.packed.data()) as Int32Array).buffer, 0, c.byteLength));
      expect(await bytes(ta)).toEqual(Array.from(packCodes(a, bits)));
      expect(await bytes(j)).toEqual(Array.from(packCodes([...a, ...b], bits)));
      expect(await bytes(jj)).toEqual(Array.from(packCodes([...b, ...b], bits)));
      [ta, tb, j, jj, xa, xb].forEach((t) => t.dispose());
    }
    for (const w of [4, 3]) {
      const xs = Float32Array.from({ length: 7 * w }, (_, i) => Math.sin(i + 1) * 100);
      const bits = encodeHalf(xs);
      const a = HalfTensor.fromBits(bits.subarray(0, 5 * w), [5, w]);
      const b = HalfTensor.fromBits(bits.subarray(5 * w), [2, w]);
      const j = concatHalfRows(a, b);
      expect(Array.from(await j.bits())).toEqual(Array.from(bits));
      for (const drop of [1, 2]) {
        const r = dropHalfRows(j, drop);
        expect([r.shape, Array.from(await r.bits())]).toEqual([[7 - drop, w], Array.from(bits.subarray(drop * w))]);
        r.dispose();
      }
      [a, b, j].forEach((t) => t.dispose());
    }
    expect(tf.memory().numTensors).toBe(start);
    expect(await wgslValidationErrors()).toEqual([]);
  });

  it('gathers kept tokens per KV head on the device, equal to the host gather', async () => {
    const cache = syntheticCache(32, { nLayers: 2 });
    const H = cache.layout.nKvHeads;
    // Per head different rows (as SnapKV keeps), ascending.
    const pos = Int32Array.from({ length: 6 * H }, (_, i) => Math.floor(i / H) * 5 + (i % H));
    const start = tf.memory().numTensors;
    const kept = await KeptTokensCache.fromPositions('test', {}, cache, 32, [pos, pos], true);
    for (let l = 0; l < 2; l++) {
      const post = applyRope(cache.keys[l], cache.rope, { start: 0, count: 32 });
      const want = gatherPerHeadBits((await post.data()) as Float32Array, H, 16, pos);
      post.dispose();
      const got = kept.keys(l);
      expect(Array.from(await got.data()).map(toHalfBits)).toEqual(Array.from(want));
      const wantV = gatherPerHeadBits((await cache.values[l].data()) as Float32Array, H, 16, pos);
      const gotV = kept.values(l);
      expect(Array.from(await gotV.data()).map(toHalfBits)).toEqual(Array.from(wantV));
      tf.dispose([got, gotV]);
    }
    kept.dispose();
    expect(tf.memory().numTensors).toBe(start);
    disposeKVCache(cache);
  });
});
