import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KvpackError, mulberry32, selectBackend, type KVCache } from '@kvpack/core';
import { GroupSvdCache, compressGroupSvd, type GroupSvdConfig } from '../index.js';
import { attendWith, sparseSelection } from '../internal.js';

// The tuning switches live on the internal entry; the public attend entry points refuse them by name.
const layout = { nLayers: 2, nHeads: 4, nKvHeads: 2, headDim: 8 };
const T = 32;
const base: GroupSvdConfig = { layersPerGroup: 2, rankK: 3, rankV: 4, oversample: 'auto', powerIters: 1, seed: 0, exact: false, storage: 'float32' };
const sparse: GroupSvdConfig = { ...base, decode: 'sparse', sparse: { budget: 8, chunkSize: 4, outlierChunks: 1, localTokens: 4 } };

let kv: KVCache;
let full: GroupSvdCache;
let sp: GroupSvdCache;

beforeAll(async () => {
  await selectBackend('wasm');
  const u = mulberry32(7);
  const rand = () => tf.tensor3d(Float32Array.from({ length: T * layout.nKvHeads * layout.headDim }, () => u() - 0.5), [T, layout.nKvHeads, layout.headDim]);
  kv = { layout, rope: { theta: 10000, layout: 'half' }, keys: [rand(), rand()], values: [rand(), rand()] };
  full = await compressGroupSvd(kv, 'test', {}, base);
  sp = await compressGroupSvd(kv, 'test', {}, sparse);
});
afterAll(() => {
  full.dispose();
  sp.dispose();
  tf.dispose([...kv.keys, ...kv.values]);
});

const queries = (n: number) => tf.randomNormal([n, layout.nHeads, layout.headDim], 0, 1, 'float32', 3) as tf.Tensor3D;
const diff = (a: tf.Tensor, b: tf.Tensor) => tf.tidy(() => tf.max(tf.abs(tf.sub(a, b))).dataSync()[0]);

describe('tuning switches', () => {
  it('attendWith with no switches equals attend, in both modes', () => {
    const q = queries(1);
    for (const c of [full, sp]) expect(diff(attendWith(c, 1, q), c.attend(1, q))).toBeLessThan(1e-6);
    expect(diff(attendWith(sp, 0, q, { budget: 12 }), sp.attendSparse!(0, q, { budget: 12 }))).toBeLessThan(1e-6);
    q.dispose();
  });

  it('attend and attendSparse refuse the switches by name; attend refuses a budget', () => {
    const q = queries(1);
    for (const key of ['values', 'gather', 'heads', 'kernels', 'mode']) {
      const o = { [key]: 'auto' } as never;
      expect(() => full.attend(0, q, o)).toThrow(KvpackError);
      expect(() => sp.attendSparse!(0, q, o)).toThrow(new RegExp(`"${key}" is a tuning switch`));
    }
    expect(() => sp.attend(0, q, { budget: 8 } as never)).toThrow(/a per-call budget goes to attendSparse/);
    expect(full.attendSparse).toBeUndefined();
    q.dispose();
  });

  it('the internal functions refuse other caches and non-sparse caches', () => {
    const q = queries(1);
    expect(() => attendWith({ strategy: 'other' } as never, 0, q)).toThrow(/not a grouped low-rank/);
    expect(() => sparseSelection(full, 0, q)).toThrow(/needs a cache compressed with decode: 'sparse'/);
    expect(sparseSelection(sp, 0, q).map((h) => h.length)).toEqual([2, 2]);
    q.dispose();
  });
});
