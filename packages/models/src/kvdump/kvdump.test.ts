import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KvpackError, disposeKVCache, selectBackend, type KVCache, type RopeConfig } from '@kvpack/core';
import { SafetensorsFile, writeSafetensors, type SafetensorsTensorInput } from '../hf/safetensors.js';
import { rng } from '../hf/testutil.js';
import { readKVDump, writeKVDump } from './kvdump.js';

let dir: string;
beforeAll(async () => {
  await selectBackend('wasm');
  dir = mkdtempSync(join(tmpdir(), 'kvpack-kvdump-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const L = 3;
const T = 10;
const H = 4;
const HKV = 2;
const D = 8;
const layout = { nLayers: L, nHeads: H, nKvHeads: HKV, headDim: D };

function randn(n: number, r: () => number): Float64Array {
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) out[i] = Math.sqrt(-2 * Math.log(r() + 1e-12)) * Math.cos(2 * Math.PI * r());
  return out;
}

/**
 * Float64 RoPE of x [T, H, d] at positions start + t, written plainly: `half` pairs (i, i + d/2),
 * `interleaved` pairs (2i, 2i + 1); frequency i is theta^(−2i/d), divided by the linear factor.
 */
function rope64(x: Float64Array, heads: number, rope: RopeConfig, start: number): Float64Array {
  const out = new Float64Array(x.length);
  const half = D / 2;
  const factor = rope.scaling?.type === 'linear' ? rope.scaling.factor : 1;
  for (let t = 0; t < x.length / (heads * D); t++)
    for (let h = 0; h < heads; h++)
      for (let i = 0; i < half; i++) {
        const ang = ((start + t) * Math.pow(rope.theta, (-2 * i) / D)) / factor;
        const [a, b] = rope.layout === 'half' ? [i, i + half] : [2 * i, 2 * i + 1];
        const base = (t * heads + h) * D;
        out[base + a] = x[base + a] * Math.cos(ang) - x[base + b] * Math.sin(ang);
        out[base + b] = x[base + b] * Math.cos(ang) + x[base + a] * Math.sin(ang);
      }
  return out;
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}


async function kvErr(p: Promise<unknown>): Promise<KvpackError> {
  const e = await p.then(
    () => null,
    (x: unknown) => x,
  );
  expect(e).toBeInstanceOf(KvpackError);
  return e as KvpackError;
}

describe('KV dumps', () => {
  it('round-trips a cache with queries (F32 exact, BF16 within bfloat16 rounding)', async () => {
    const r = rng(1);
    const mk = (rows: number, heads: number) => tf.tensor3d(Float32Array.from(randn(rows * heads * D, r)), [rows, heads, D]);
    const cache: KVCache = {
      layout,
      rope: { theta: 10000, layout: 'half', scaling: { type: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 } },
      keys: Array.from({ length: L }, () => mk(T, HKV)),
      values: Array.from({ length: L }, () => mk(T, HKV)),
      queries: Array.from({ length: L }, () => mk(3, H)),
      startPosition: 7,
    };
    const start = tf.memory().numTensors;
    const file = join(dir, 'rt.safetensors');
    for (let rep = 0; rep < 2; rep++) {
      await writeKVDump(file, cache);
      const back = await readKVDump(file);
      expect(back.layout).toEqual(layout);
      expect(back.rope).toEqual(cache.rope);
      expect(back.startPosition).toBe(7);
      for (let l = 0; l < L; l++) {
        expect(Array.from(back.keys[l].dataSync())).toEqual(Array.from(cache.keys[l].dataSync()));
        expect(Array.from(back.values[l].dataSync())).toEqual(Array.from(cache.values[l].dataSync()));
        expect(Array.from(back.queries![l].dataSync())).toEqual(Array.from(cache.queries![l].dataSync()));
      }
      disposeKVCache(back);
    }
    await writeKVDump(file, cache, { dtype: 'BF16', keys: 'both' });
    const bf = await readKVDump(file);
    for (let l = 0; l < L; l++) {
      const a = cache.values[l].dataSync();
      const b = bf.values[l].dataSync();
      for (let i = 0; i < a.length; i++) expect(Math.abs(a[i] - b[i])).toBeLessThanOrEqual(Math.abs(a[i]) * 2 ** -8);
    }
    disposeKVCache(bf);
    expect(tf.memory().numTensors).toBe(start);
    disposeKVCache(cache);
  });

  for (const rope of [
    { theta: 10000, layout: 'half', scaling: { type: 'linear', factor: 2 } },
    { theta: 500, layout: 'interleaved', scaling: null },
  ] as RopeConfig[]) {
    it(`un-rotates a post-RoPE-only dump (${rope.layout}) to the float64 pre-RoPE keys`, async () => {
      const r = rng(rope.theta);
      const start = 5;
      const tensors: SafetensorsTensorInput[] = [];
      const pre: Float64Array[] = [];
      for (let l = 0; l < L; l++) {
        const k = randn(T * HKV * D, r);
        pre.push(k);
        tensors.push({ name: `layers.${l}.keys_post_rope`, shape: [T, HKV, D], data: Float32Array.from(rope64(k, HKV, rope, start)) });
        tensors.push({ name: `layers.${l}.values`, shape: [T, HKV, D], data: Float32Array.from(randn(T * HKV * D, r)) });
      }
      const file = join(dir, `post-${rope.layout}.safetensors`);
      // HF-style rope_scaling in the metadata, as the README's Python snippet writes it.
      const scaling = rope.scaling ? { rope_type: 'linear', factor: 2 } : null;
      await writeSafetensors(file, tensors, {
        rope: JSON.stringify({ theta: rope.theta, layout: rope.layout, scaling }),
        layout: JSON.stringify(layout),
        start_position: String(start),
      });
      const n0 = tf.memory().numTensors;
      const c = await readKVDump(file);
      expect(c.rope).toEqual(rope);
      for (let l = 0; l < L; l++) expect(maxAbsDiff(c.keys[l].dataSync(), pre[l])).toBeLessThan(2e-5);
      // Negative control: treating them as pre-RoPE would be far off.
      expect(maxAbsDiff(tensors[0].data, pre[0])).toBeGreaterThan(0.1);
      disposeKVCache(c);
      expect(tf.memory().numTensors).toBe(n0);

      // keys_post_rope exported by writeKVDump equal the float64 rotation too.
      const c2 = await readKVDump(file);
      const out = join(dir, `post2-${rope.layout}.safetensors`);
      await writeKVDump(out, c2, { keys: 'post' });
      const f = await SafetensorsFile.open(out);
      expect(f.has('layers.0.keys_pre_rope')).toBe(false);
      const k0 = await f.readFloat32('layers.1.keys_post_rope');
      await f.close();
      expect(maxAbsDiff(k0.data, rope64(pre[1], HKV, rope, start))).toBeLessThan(2e-5);
      disposeKVCache(c2);
    });
  }

  it('rejects missing values, shape mismatches, missing metadata and inconsistent pre/post keys', async () => {
    const r = rng(9);
    const t = (name: string, shape: number[]): SafetensorsTensorInput => ({ name, shape, data: Float32Array.from(randn(shape.reduce((a, b) => a * b, 1), r)) });
    const meta = { rope: JSON.stringify({ theta: 10000, layout: 'half', scaling: null }), layout: JSON.stringify({ ...layout, nLayers: 2 }) };
    const n0 = tf.memory().numTensors;
    const cases: [string, SafetensorsTensorInput[], Record<string, string>, string, RegExp][] = [
      ['novalues', [t('layers.0.keys_pre_rope', [T, HKV, D]), t('layers.0.values', [T, HKV, D]), t('layers.1.keys_pre_rope', [T, HKV, D])], meta, 'corrupt', /novalues\.safetensors: missing tensor "layers\.1\.values"/],
      ['shape', [t('layers.0.keys_pre_rope', [T, HKV, D]), t('layers.0.values', [T, HKV, D]), t('layers.1.keys_pre_rope', [T, HKV, D]), t('layers.1.values', [T - 1, HKV, D])], meta, 'shape', /shape\.safetensors: tensor "layers\.1\.values" has shape \[9,2,8\], expected \[10,2,8\]/],
      ['norope', [t('layers.0.keys_pre_rope', [T, HKV, D]), t('layers.0.values', [T, HKV, D])], { layout: meta.layout }, 'corrupt', /norope\.safetensors: __metadata__ has no "rope" entry/],
      ['qheads', [t('layers.0.keys_pre_rope', [T, HKV, D]), t('layers.0.values', [T, HKV, D]), t('layers.0.queries', [2, 3, D])], { rope: meta.rope, layout: JSON.stringify({ ...layout, nLayers: 1 }) }, 'shape', /tensor "layers\.0\.queries" has shape \[2,3,8\], expected \[T_q,4,8\]/],
      ['noheads', [t('layers.0.keys_pre_rope', [T, HKV, D]), t('layers.0.values', [T, HKV, D])], { rope: meta.rope }, 'corrupt', /number of query heads is unknown/],
      ['mismatch', [t('layers.0.keys_pre_rope', [T, HKV, D]), t('layers.0.keys_post_rope', [T, HKV, D]), t('layers.0.values', [T, HKV, D])], { rope: meta.rope, layout: JSON.stringify({ ...layout, nLayers: 1 }) }, 'corrupt', /layer 0 keys_post_rope disagree with keys_pre_rope/],
    ];
    for (const [name, tensors, md, code, re] of cases) {
      const file = join(dir, `${name}.safetensors`);
      await writeSafetensors(file, tensors, md);
      const e = await kvErr(readKVDump(file));
      expect(e.code, name).toBe(code);
      expect(e.message, name).toMatch(re);
    }
    expect(tf.memory().numTensors).toBe(n0);
  });
});
