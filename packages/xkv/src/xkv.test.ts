import { expectOptionBounds } from '@kvpack/core/conformance';
import * as tf from '@tensorflow/tfjs-core';
import { disposeKVCache } from '@kvpack/core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  KvpackError,
  MAX_FEATURES,
  MAX_LAYERS,
  MAX_OVERSAMPLE,
  MAX_POWER_ITERS,
  MAX_SEED,
  MAX_TOKENS,
  MIN_SEED,
  applyRope,
  createStrategy,
  denseCacheBytes,
  deserializeCache,
  headerBytes,
  selectBackend,
  type CompressedCache,
  type KVCache,
} from '@kvpack/core';
import { GroupSvdCache, lowRankStats, paperCompressionRatio } from '@kvpack/strategy-utils';
import { xkvStrategy, XkvOptionsSchema, type XkvOptions } from './index.js';
import { exactSvdError, groupError, hconcat, syntheticCache } from './test-utils.js';

const layout = { nLayers: 5, nHeads: 4, nKvHeads: 2, headDim: 8 };
const F = layout.nKvHeads * layout.headDim; // 16
const T = 48;
let syn: ReturnType<typeof syntheticCache>;

beforeAll(async () => {
  await selectBackend('wasm');
  syn = syntheticCache(layout, T, 3, 7);
});
afterAll(() => disposeKVCache(syn.cache));

async function compress(options: Record<string, unknown>, cache: KVCache = syn.cache): Promise<GroupSvdCache> {
  return (await createStrategy({ name: 'xkv', options }).compress(cache)) as GroupSvdCache;
}

function host(t: tf.Tensor): Float32Array {
  const d = Float32Array.from(t.dataSync() as Float32Array);
  t.dispose();
  return d;
}

describe('xkv reconstruction error', () => {
  for (const exact of [true, false]) {
    it.each([1, 2, 4, 5])(`${exact ? 'exact' : 'randomized'} mode, G=%i: per-group error matches a float64 truncated SVD`, async (G) => {
      const rankK = 3;
      const rankV = 5;
      const c = await compress({ layersPerGroup: G, rankK, rankV, exact, storage: 'float32' });
      const tol = exact ? 0.01 : 0.1;
      for (const g of c.groups) {
        const n = g.layers.length;
        const errK = groupError(g.layers.map((l) => syn.keys[l]), g.layers.map((l) => host(c.preRopeKeys(l))));
        const errV = groupError(g.layers.map((l) => syn.values[l]), g.layers.map((l) => host(c.values(l))));
        const refK = exactSvdError(hconcat(g.layers.map((l) => syn.keys[l]), T, F), T, n * F, rankK * n);
        const refV = exactSvdError(hconcat(g.layers.map((l) => syn.values[l]), T, F), T, n * F, rankV * n);
        expect(Math.abs(errK - refK) / refK).toBeLessThan(tol);
        expect(Math.abs(errV - refV) / refV).toBeLessThan(tol);
        // A truncated SVD is optimal: no rank-R approximation does better (up to float32 rounding).
        expect(errK).toBeGreaterThan(refK * (1 - 1e-4));
      }
      c.dispose();
    });
  }

  it('groups consecutive layers; the last group is shorter and its rank scales with its layer count', async () => {
    const c = await compress({ layersPerGroup: 2, rankK: 3, rankV: 5 });
    expect(c.groups.map((g) => g.layers)).toEqual([[0, 1], [2, 3], [4]]);
    expect(c.groups.map((g) => [c.groupRank('k', g.index), c.groupRank('v', g.index)])).toEqual([[6, 10], [6, 10], [3, 5]]);
    const U = c.basis('k', 2);
    const B = c.factor('k', 4);
    expect(U.shape).toEqual([T, 3]);
    expect(B.shape).toEqual([3, F]);
    tf.dispose([U, B]);
    c.dispose();
  });
});

describe('xkv keys are rebuilt pre-RoPE and then rotated', () => {
  it('keys(l) = applyRope(U_g·B_l) at positions startPosition…, values(l) = U_g·B_l (float64 check)', async () => {
    const c = await compress({ layersPerGroup: 2, rankK: 4, rankV: 4, exact: true, storage: 'float32' });
    for (const l of [0, 3, 4]) {
      const g = c.groups.find((x) => x.layers.includes(l))!.index;
      for (const kind of ['k', 'v'] as const) {
        const U = host(c.basis(kind, g));
        const B = host(c.factor(kind, l));
        const R = c.groupRank(kind, g);
        const X = new Float64Array(T * F);
        for (let t = 0; t < T; t++)
          for (let f = 0; f < F; f++) {
            let s = 0;
            for (let j = 0; j < R; j++) s += U[t * R + j] * B[j * F + f];
            X[t * F + f] = s;
          }
        const pre = tf.tensor3d(Float32Array.from(X), [T, layout.nKvHeads, layout.headDim]);
        const expected = host(kind === 'k' ? applyRope(pre, syn.cache.rope, { start: 7, count: T }) : tf.clone(pre));
        const got = host(kind === 'k' ? c.keys(l) : c.values(l));
        const scale = Math.max(...expected.map(Math.abs));
        let maxDiff = 0;
        for (let i = 0; i < got.length; i++) maxDiff = Math.max(maxDiff, Math.abs(got[i] - expected[i]));
        expect(maxDiff).toBeLessThan(1e-5 * scale);
        if (kind === 'k') {
          // The rotation really happened: post-RoPE keys differ from the pre-RoPE reconstruction.
          const preData = host(pre);
          let moved = 0;
          for (let i = 0; i < got.length; i++) moved = Math.max(moved, Math.abs(got[i] - preData[i]));
          expect(moved).toBeGreaterThan(0.1 * scale);
        } else pre.dispose();
      }
    }
    c.dispose();
  });
});

describe('xkv bytes and compression ratio', () => {
  /** Closed form: per group and per kind, T·R + n·R·F elements at `item` bytes. */
  function expectedBytes(G: number, rankK: number, rankV: number, item: number): number {
    let total = 0;
    for (let s = 0; s < layout.nLayers; s += G) {
      const n = Math.min(G, layout.nLayers - s);
      for (const r of [rankK, rankV]) total += (T * r * n + n * r * n * F) * item;
    }
    return total;
  }

  it.each([
    [1, 'float16', 2],
    [2, 'float16', 2],
    [5, 'float16', 2],
    [4, 'float32', 4],
  ] as const)('G=%i, %s storage: byteSize = closed form = serialize().length − headerBytes()', async (G, storage, item) => {
    const c = await compress({ layersPerGroup: G, rankK: 3, rankV: 5, storage });
    const bytes = c.serialize();
    expect(c.byteSize()).toBe(expectedBytes(G, 3, 5, item));
    expect(bytes.length - headerBytes(bytes)).toBe(c.byteSize());
    const s = c.stats();
    expect(s.basisBytes + s.factorBytes).toBe(c.byteSize());
    expect(s.measuredRatio).toBeCloseTo(denseCacheBytes(layout, T) / c.byteSize(), 12);
    c.dispose();
  });

  it('the paper formula equals the measured ratio when L mod G = 0 (fp16) and is lower when the last group is shorter', async () => {
    for (const G of [1, 5, 2, 4]) {
      const c = await compress({ layersPerGroup: G, rankK: 3, rankV: 5 });
      const s = c.stats();
      // The authors' element count, written out: ⌈L/G⌉·T·(R_K+R_V) + L·H_kv·d·(R_K+R_V), R = r·G.
      const R = (3 + 5) * G;
      const paper = (2 * layout.nLayers * T * F) / (Math.ceil(layout.nLayers / G) * T * R + layout.nLayers * F * R);
      expect(s.paperRatio).toBeCloseTo(paper, 12);
      if (layout.nLayers % G === 0) expect(s.measuredRatio).toBeCloseTo(s.paperRatio, 12);
      else expect(s.measuredRatio).toBeGreaterThan(s.paperRatio);
      c.dispose();
    }
  });

  it('decode tokens appended exactly are counted in the residual bytes', async () => {
    const c = await compress({ layersPerGroup: 2, rankK: 3, rankV: 5 });
    const before = c.byteSize();
    const k = tf.randomNormal([3, layout.nKvHeads, layout.headDim], 0, 1, 'float32', 1) as tf.Tensor3D;
    c.append(1, k, k);
    c.append(1, k, k);
    k.dispose();
    expect(c.tokenCount(1)).toBe(T + 6);
    expect(c.byteSize() - before).toBe(2 * 6 * F * 4);
    expect(c.stats().residualBytes).toBe(2 * 6 * F * 4);
    const bytes = c.serialize();
    expect(bytes.length - headerBytes(bytes)).toBe(c.byteSize());
    c.dispose();
  });

  it('paperCompressionRatio reproduces the authors calculator on Llama-3.1-8B (G=4, r_K=128, r_V=192, T=65536)', () => {
    // L=32, H_kv=8, d=128: dense 2·32·65536·1024; compressed 8·65536·(512+768) + 32·1024·(512+768).
    const r = paperCompressionRatio({ layout: { nLayers: 32, nHeads: 32, nKvHeads: 8, headDim: 128 }, tokens: 65536, layersPerGroup: 4, rankK: 128, rankV: 192 });
    expect(r).toBeCloseTo((2 * 32 * 65536 * 1024) / (8 * 65536 * 1280 + 32 * 1024 * 1280), 12);
  });
});

describe('xkv serialization', () => {
  async function roundTrip(options: Record<string, unknown>): Promise<void> {
    const c = await compress(options);
    const k = tf.randomNormal([2, layout.nKvHeads, layout.headDim], 0, 1, 'float32', 5) as tf.Tensor3D;
    c.append(3, k, k);
    k.dispose();
    const d = deserializeCache(c.serialize());
    expect(d.strategy).toBe('xkv');
    expect(d.byteSize()).toBe(c.byteSize());
    expect(d.prefillLength).toBe(T);
    for (let l = 0; l < layout.nLayers; l++) {
      expect(d.tokenCount(l)).toBe(c.tokenCount(l));
      expect(host(d.keys(l))).toEqual(host(c.keys(l)));
      expect(host(d.values(l))).toEqual(host(c.values(l)));
    }
    expect((d as GroupSvdCache).stats()).toEqual(c.stats());
    d.dispose();
    c.dispose();
  }

  it('float16: serialize → deserializeCache → identical keys and values', () => roundTrip({ layersPerGroup: 2, rankK: 3, rankV: 5 }));
  it('float32: identical after a round trip', () => roundTrip({ layersPerGroup: 4, rankK: 2, rankV: 3, storage: 'float32' }));
  it('quantized factors: identical after a round trip', () =>
    roundTrip({ layersPerGroup: 2, rankK: 3, rankV: 5, factorQuantization: { bits: 4, quantGroupSize: 5 } }));

  it('a truncated or corrupted serialization gives a clear KvpackError', async () => {
    const c = await compress({ layersPerGroup: 2, rankK: 3, rankV: 5 });
    const bytes = c.serialize();
    c.dispose();
    expect(() => deserializeCache(bytes.subarray(0, bytes.length - 10))).toThrow(KvpackError);
    const bad = Uint8Array.from(bytes);
    bad[bad.length - 1] ^= 0xff;
    expect(() => deserializeCache(bad)).toThrow(/CRC/);
  });
});

describe('xkv bad input', () => {
  async function code(p: Promise<unknown>): Promise<[string, string]> {
    try {
      await p;
    } catch (e) {
      expect(e).toBeInstanceOf(KvpackError);
      return [(e as KvpackError).code, (e as Error).message];
    }
    throw new Error('expected a KvpackError');
  }

  it('NaN or Inf in the cache → nonfinite, naming the layer', async () => {
    for (const [bad, kind] of [[NaN, 'keys'], [Infinity, 'values']] as const) {
      const data = Float32Array.from(syn.values[2]);
      data[17] = bad;
      const t = tf.tensor3d(data, [T, layout.nKvHeads, layout.headDim]);
      const cache: KVCache = { ...syn.cache, [kind]: syn.cache[kind].map((x, l) => (l === 2 ? t : x)) };
      const [c, msg] = await code(compress({}, cache));
      expect(c).toBe('nonfinite');
      expect(msg).toMatch(new RegExp(`layer 2 ${kind}`));
      t.dispose();
    }
  });

  it('rank 0 → config error from the options schema (a rank is at least 1)', async () => {
    const [c, msg] = await code(compress({ layersPerGroup: 2, rankK: 0, rankV: 5 }));
    expect(c).toBe('config');
    expect(msg).toMatch(/rankK/);
  });

  it('rank above min(T, features) → rank error naming the group, rank and bound', async () => {
    // Per-layer value rank 17 > H_kv·d = 16: every group is over; the first named is group 0.
    const [c, msg] = await code(compress({ layersPerGroup: 2, rankK: 3, rankV: 17 }));
    expect(c).toBe('rank');
    expect(msg).toMatch(/group 0 \(layers 0–1\) value rank 34 \(rankV 17 × 2 layers\) is out of range \[1, min\(T=48, features=32\) = 32\]/);
    // Bounded by T: G=5 → features 80, key rank 10·5 = 50 > T = 48.
    const [c2, msg2] = await code(compress({ layersPerGroup: 5, rankK: 10, rankV: 2 }));
    expect(c2).toBe('rank');
    expect(msg2).toMatch(/key rank 50 .*min\(T=48, features=80\) = 48/);
  });

  it('a layer count that does not match the layout → layout error', async () => {
    const cache: KVCache = { ...syn.cache, keys: syn.cache.keys.slice(0, 4) };
    const [c, msg] = await code(compress({}, cache));
    expect(c).toBe('layout');
    expect(msg).toMatch(/4 key layers but the model has 5 layers/);
  });

  it('a wrong shape → shape error', async () => {
    const t = tf.zeros([T, 3, layout.headDim]) as tf.Tensor3D;
    const cache: KVCache = { ...syn.cache, values: syn.cache.values.map((x, l) => (l === 1 ? t : x)) };
    const [c] = await code(compress({}, cache));
    expect(c).toBe('shape');
    t.dispose();
  });

  it('an unknown or ill-typed option → config error listing the allowed options', () => {
    for (const options of [{ rank: 4 }, { rankK: 2.5 }, { layersPerGroup: 0 }, { factorQuantization: { bits: 3 } }, { storage: 'int8' }]) {
      try {
        createStrategy({ name: 'xkv', options });
        throw new Error(`accepted ${JSON.stringify(options)}`);
      } catch (e) {
        expect(e).toBeInstanceOf(KvpackError);
        expect((e as KvpackError).code).toBe('config');
        expect((e as Error).message).toMatch(/allowed options: layersPerGroup, rankK, rankV/);
      }
    }
  });

  it("schema defaults: G=4, r_K=16, r_V=24 (K:V = 2:3), oversample 'auto', 1 power iteration, orthogonalization 'auto', float16", () => {
    expect(XkvOptionsSchema.parse({})).toMatchObject({ layersPerGroup: 4, rankK: 16, rankV: 24, oversample: 'auto', powerIters: 1, orthogonalization: 'auto', seed: 0, exact: false, storage: 'float16' });
    expect(XkvOptionsSchema.parse({ powerIters: 1.5, oversample: 0, orthogonalization: 'device' })).toMatchObject({ powerIters: 1.5, oversample: 0, orthogonalization: 'device' });
    expect(() => XkvOptionsSchema.parse({ powerIters: 0.25 })).toThrow();
    expect(() => XkvOptionsSchema.parse({ orthogonalization: 'gpu' })).toThrow();
  });
});

describe('xkv option bounds', () => {
  function configError(options: Record<string, unknown>): KvpackError {
    let err: unknown;
    try {
      createStrategy({ name: 'xkv', options });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(KvpackError);
    expect((err as KvpackError).code).toBe('config');
    return err as KvpackError;
  }

  it('each option that sizes work or memory is accepted at its bound and rejected past it, naming the bound', () => {
    const sparse = (o: Record<string, unknown>) => ({ decode: 'sparse', sparse: o });
    expectOptionBounds('xkv', [
      { option: 'layersPerGroup', bound: MAX_LAYERS, at: (v) => ({ layersPerGroup: v }) },
      { option: 'rankK', bound: MAX_FEATURES, at: (v) => ({ rankK: v }) },
      { option: 'rankV', bound: MAX_FEATURES, at: (v) => ({ rankV: v }) },
      { option: 'oversample', bound: MAX_OVERSAMPLE, at: (v) => ({ oversample: v }) },
      { option: 'powerIters', bound: MAX_POWER_ITERS, at: (v) => ({ powerIters: v }) },
      { option: 'seed', bound: MAX_SEED, at: (v) => ({ seed: v }) },
      { option: 'seed', bound: MIN_SEED, side: 'min', at: (v) => ({ seed: v }) },
      { option: 'factorQuantization.quantGroupSize', bound: MAX_FEATURES, at: (v) => ({ factorQuantization: { bits: 4, quantGroupSize: v } }) },
      { option: 'sparse.budget', bound: MAX_TOKENS, at: (v) => sparse({ budget: v, chunkSize: 1 }) },
      { option: 'sparse.chunkSize', bound: MAX_TOKENS, at: (v) => sparse({ budget: MAX_TOKENS, chunkSize: v }) },
      { option: 'sparse.outlierChunks', bound: MAX_TOKENS, at: (v) => sparse({ outlierChunks: v }) },
      { option: 'sparse.localTokens', bound: MAX_TOKENS, at: (v) => sparse({ localTokens: v }) },
    ]);
    expect([MAX_LAYERS, MAX_FEATURES, MAX_OVERSAMPLE, MAX_POWER_ITERS, MAX_TOKENS]).toEqual([1024, 65536, 4096, 16, 1048576]);
  });

  it('powerIters: 1e7 (hours of work) is a config error naming the bound 16', () => {
    const e = configError({ powerIters: 1e7 });
    expect(e.message).toMatch(/powerIters/);
    expect(e.message).toContain('at most 16');
  });

  it("sparse: { budget: 1e9, chunkSize: 1e9 } is a config error naming the 2^20 bound of both, not a RangeError", () => {
    const e = configError({ decode: 'sparse', sparse: { budget: 1e9, chunkSize: 1e9 } });
    expect(e.message).toMatch(/sparse\.budget/);
    expect(e.message).toMatch(/sparse\.chunkSize/);
    expect(e.message).toContain(`at most ${MAX_TOKENS}`);
  });

  it("oversample: past its bound names the bound; a wrong type says 'auto' or an integer in [0, 4096]", () => {
    expect(configError({ oversample: 5000 }).message).toContain(`at most ${MAX_OVERSAMPLE}`);
    expect(configError({ oversample: 'many' }).message).toContain(`'auto' or an integer in [0, ${MAX_OVERSAMPLE}]`);
  });

  it('a chunk longer than the prompt (within bounds) compresses: no chunk-sized allocation', async () => {
    const before = tf.memory().numTensors;
    const c = await compress({ layersPerGroup: 1, rankK: 2, rankV: 2, decode: 'sparse', sparse: { budget: MAX_TOKENS, chunkSize: MAX_TOKENS, localTokens: 0 } });
    expect(c.sparseIndex?.chunks).toBe(0);
    expect(c.sparseIndex?.local).toBe(T);
    c.dispose();
    expect(tf.memory().numTensors).toBe(before);
  });
});

describe('xkv memory', () => {
  it('tf.memory().numTensors returns to its start after compress, reconstruct, serialize and dispose (×3)', async () => {
    const strategy = xkvStrategy(XkvOptionsSchema.parse({ layersPerGroup: 2, rankK: 3, rankV: 5, factorQuantization: { bits: 8 } }));
    const start = tf.memory().numTensors;
    for (let i = 0; i < 3; i++) {
      const c: CompressedCache = await strategy.compress(syn.cache);
      for (let l = 0; l < layout.nLayers; l++) tf.dispose([c.keys(l), c.values(l)]);
      const k = tf.ones([1, layout.nKvHeads, layout.headDim]) as tf.Tensor3D;
      c.append(0, k, k);
      k.dispose();
      const q = tf.ones([1, layout.nHeads, layout.headDim]) as tf.Tensor3D;
      tf.dispose([c.attend!(0, q), q]);
      const d = deserializeCache(c.serialize());
      tf.dispose([d.keys(4), d.values(4)]);
      d.dispose();
      c.dispose();
      c.dispose(); // idempotent
      expect(tf.memory().numTensors).toBe(start);
    }
  });
});

describe('xkv deserialization with mismatched options', () => {
  it('restoring with options that give other group ranks is a clear error', async () => {
    const c = await compress({ layersPerGroup: 2, rankK: 3, rankV: 5 });
    const bytes = c.serialize();
    c.dispose();
    const other = xkvStrategy(XkvOptionsSchema.parse({ layersPerGroup: 2, rankK: 4, rankV: 5 }));
    expect(() => other.deserialize(bytes)).toThrow(/group ranks .*\(restore it with deserializeCache\)/);
  });

  it('lowRankStats returns stats for xkv caches and null for others', async () => {
    const c = await compress({ layersPerGroup: 2, rankK: 3, rankV: 5 });
    expect(lowRankStats(c)).toEqual(c.stats());
    const d = await createStrategy({ name: 'dense' }).compress(syn.cache);
    expect(lowRankStats(d)).toBeNull();
    c.dispose();
    d.dispose();
  });
});

describe('renamed options', () => {
  it('accepts the former groupSize names, moved to layersPerGroup and quantGroupSize, with one deprecation warning each', async () => {
    const warnings: string[] = [];
    const onWarning = (w: Error) => warnings.push(w.message);
    process.on('warning', onWarning);
    try {
      const s = createStrategy({ name: 'xkv', options: { groupSize: 2, factorQuantization: { bits: 4, groupSize: 16 } } });
      const o = s.options as XkvOptions;
      expect(o.layersPerGroup).toBe(2);
      expect(o.factorQuantization?.quantGroupSize).toBe(16);
      expect('groupSize' in o).toBe(false);
      createStrategy({ name: 'xkv', options: { groupSize: 3 } });
      await new Promise((r) => setImmediate(r)); // process warnings are emitted on the next tick
    } finally {
      process.off('warning', onWarning);
    }
    expect(warnings.filter((w) => w.includes('"groupSize" of strategy "xkv" is now "layersPerGroup"'))).toHaveLength(1);
    expect(warnings.filter((w) => w.includes('"factorQuantization.groupSize" of strategy "xkv" is now "factorQuantization.quantGroupSize"'))).toHaveLength(1);
  });

  it('refuses both names at once', () => {
    expect(() => createStrategy({ name: 'xkv', options: { groupSize: 2, layersPerGroup: 2 } })).toThrow(/groupSize/);
  });
});
