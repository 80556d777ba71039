import './chained.js';
/**
 * The strategy conformance suite (after livekit/agents-js's plugin test suites): every registered
 * strategy runs it with one line,
 *
 * ```ts
 * runStrategyConformance('xkv', { compressing: { rankK: 4, rankV: 6 }, lossless: { rankK: 16, rankV: 16, exact: true } });
 * ```
 *
 * It checks reconstruction shapes and dtypes; measured bytes = serialized payload (`serialize` and
 * `serializeAsync` alike) and a bit-identical serialize → deserialize → reconstruct; ratio > 1 when compressing and exact reconstruction at a
 * "no compression" setting; determinism; decode-time append; that dispose frees every tensor; and that
 * bad options and bad caches are clear errors. Import from `@kvpack/core/conformance` (needs vitest).
 */
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { selectBackend } from './backend.js';
import { KvpackError } from './errors.js';
import { denseCacheBytes } from './memory.js';
import { compressesMla, createStrategy, deserializeCache, deserializeMlaCache, parseStrategyOptions } from './registry.js';
import { applyRope, sharedRopeTableBytes } from './rope.js';
import { headerBytes, splitContainer, writeContainer } from './serialize.js';
import { cacheSnapshot, fuzzRestore, mlaCacheSnapshot } from './restore-fuzz.js';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { disposeKVCache } from './validate.js';
import { disposeMlaCache, mlaDenseBytes, ropeSharedKeys, type CompressedMlaCache, type MlaKVCache, type MlaLayout } from './mla.js';
export { disposeKVCache, disposeMlaCache };
import type { CompressedCache, KVCache, ModelLayout, RopeConfig, Strategy } from './types.js';

/** Settings a strategy is held to. */
export interface ConformanceCases {
  /** Options at which the strategy must compress (measured ratio > 1). */
  compressing: Record<string, unknown>;
  /**
   * Options at which reconstruction must equal the input (full rank, 16 bits, no eviction…), within
   * `losslessTolerance` relative Frobenius error (default 2e-3: float16 storage rounding).
   * Omit only for strategies with no lossless setting, and say why in `noLosslessReason`.
   */
  lossless?: Record<string, unknown>;
  losslessTolerance?: number;
  noLosslessReason?: string;
  /** Invalid options: each must throw KvpackError('config'). */
  badOptions: Record<string, unknown>[];
  /** Decode tokens appended are returned exactly (default true; KIVI-style strategies may quantize). */
  exactDecode?: boolean;
  /** Set false only for the uncompressed reference (`dense`), whose ratio is 1 by design. */
  ratioAboveOne?: boolean;
  /**
   * Largest resident ÷ stored bytes allowed (tensor bytes the cache holds on the backend, measured
   * with tf.memory(), over `byteSize()`), after compression and after decode steps. Default 1.1.
   */
  maxResidentRatio?: number;
  /** Seeded restore-fuzz trials (default 150; `KVPACK_FUZZ_TRIALS` and `KVPACK_FUZZ_SEED` override for longer runs). */
  fuzzTrials?: number;
  /**
   * Options that pass the schema but must fail at compress on the synthetic cache (a rank above
   * min(T, features), a window longer than the queries, a start layer past the last pair…): each
   * must reject with a KvpackError and leave no tensor allocated. Omit when no such setting exists.
   */
  failingCompress?: Record<string, unknown>[];
  /**
   * Adds what a runner would hand the strategy besides keys, values and queries (e.g. the scores of a
   * context-reconstruction pass, `KVCache.reconstructionScores`) to the synthetic cache.
   */
  augment?: (cache: KVCache) => KVCache;
  /** Synthetic cache size (defaults: T = 64, L = 4, H = 4, H_kv = 2, d = 16). */
  tokens?: number;
  layout?: Partial<ModelLayout>;
  /**
   * MLA latent caches, for a strategy whose definition declares the `mla` capability (read from the
   * definition at `mla.compressing`, default `compressing`): the suite runs the MLA checks on
   * {@link syntheticMlaCache}. A strategy without the capability is checked to refuse MLA caches.
   */
  mla?: MlaConformanceCases;
}

/** Settings an MLA-compressing strategy is held to (see {@link ConformanceCases.mla}). */
export interface MlaConformanceCases {
  /** Options at which the strategy compresses an MLA cache (default: the per-head `compressing`). */
  compressing?: Record<string, unknown>;
  /** Options at which latents and RoPE keys are reconstructed exactly (within `losslessTolerance`, default 2e-3). */
  lossless?: Record<string, unknown>;
  losslessTolerance?: number;
  /** Decode tokens appended are returned exactly (default true). */
  exactDecode?: boolean;
  /** Set false only for the uncompressed reference (`dense`). */
  ratioAboveOne?: boolean;
  /** Synthetic MLA cache layout (defaults: L = 4, H = 4, d_c = 24, d_R = 8). */
  layout?: Partial<MlaLayout>;
}

/** Test layout and RoPE used by the suite. */
export const CONFORMANCE_ROPE: RopeConfig = { theta: 10000, layout: 'interleaved' };

/**
 * A deterministic synthetic prefill cache with low-rank structure shared across layers (like real
 * caches, so low-rank strategies compress it meaningfully), plus post-RoPE queries of the last 8
 * tokens for query-aware strategies. Caller disposes with {@link disposeKVCache}.
 */
export function syntheticCache(T = 64, layoutOver: Partial<ModelLayout> = {}, seed = 1, rope: RopeConfig = CONFORMANCE_ROPE): KVCache {
  const layout: ModelLayout = { nLayers: 4, nHeads: 4, nKvHeads: 2, headDim: 16, ...layoutOver };
  const F = layout.nKvHeads * layout.headDim;
  const obs = Math.min(8, T);
  let out!: KVCache;
  tf.tidy(() => {
    const shared = tf.randomNormal([T, 6], 0, 1, 'float32', seed);
    const keys: tf.Tensor3D[] = [];
    const values: tf.Tensor3D[] = [];
    const queries: tf.Tensor3D[] = [];
    for (let l = 0; l < layout.nLayers; l++) {
      const own = tf.randomNormal([T, 2], 0, 1, 'float32', seed + 10 * l + 1);
      const basis = tf.concat([shared, own], 1);
      const mk = (s: number) =>
        tf
          .matMul(basis, tf.randomNormal([8, F], 0, 1, 'float32', s))
          .add(tf.randomNormal([T, F], 0, 0.05, 'float32', s + 1))
          .reshape([T, layout.nKvHeads, layout.headDim]) as tf.Tensor3D;
      keys.push(tf.keep(mk(seed + 10 * l + 2)));
      values.push(tf.keep(mk(seed + 10 * l + 4)));
      const q = tf.randomNormal([obs, layout.nHeads, layout.headDim], 0, 1, 'float32', seed + 10 * l + 6) as tf.Tensor3D;
      queries.push(tf.keep(applyRope(q, rope, { start: T - obs, count: obs })));
    }
    out = { layout, rope, keys, values, queries };
  });
  return out;
}

/**
 * A deterministic synthetic MLA prefill cache (defaults: T tokens, L = 4, H = 4, d_c = 24, d_R = 8):
 * latents with low-rank structure shared across layers, pre-RoPE shared keys, and absorbed-form
 * queries [8, H, d_c + d_R] of the last tokens (see {@link MlaKVCache.queries}). Caller disposes with
 * {@link disposeMlaCache}.
 */
export function syntheticMlaCache(T = 64, layoutOver: Partial<MlaLayout> = {}, seed = 1, rope: RopeConfig = CONFORMANCE_ROPE, startPosition = 0): MlaKVCache {
  const layout: MlaLayout = { nLayers: 4, nHeads: 4, kvLoraRank: 24, qkRopeHeadDim: 8, qkNopeHeadDim: 8, vHeadDim: 8, ...layoutOver };
  const { kvLoraRank: dc, qkRopeHeadDim: dr, nHeads: H } = layout;
  const obs = Math.min(8, T);
  let out!: MlaKVCache;
  tf.tidy(() => {
    const shared = tf.randomNormal([T, 6], 0, 1, 'float32', seed);
    const latents: tf.Tensor2D[] = [];
    const ropeKeys: tf.Tensor2D[] = [];
    const queries: tf.Tensor3D[] = [];
    for (let l = 0; l < layout.nLayers; l++) {
      const own = tf.randomNormal([T, 2], 0, 1, 'float32', seed + 10 * l + 1);
      const basis = tf.concat([shared, own], 1);
      const mk = (s: number, F: number) =>
        tf.matMul(basis, tf.randomNormal([8, F], 0, 1, 'float32', s)).add(tf.randomNormal([T, F], 0, 0.05, 'float32', s + 1)) as tf.Tensor2D;
      latents.push(tf.keep(mk(seed + 10 * l + 2, dc)));
      ropeKeys.push(tf.keep(mk(seed + 10 * l + 4, dr)));
      queries.push(tf.keep(tf.randomNormal([obs, H, dc + dr], 0, 1 / Math.sqrt(dc + dr), 'float32', seed + 10 * l + 6) as tf.Tensor3D));
    }
    out = { kind: 'mla', layout, rope, latents, ropeKeys, queries, startPosition };
  });
  return out;
}

async function relErr(a: tf.Tensor, b: tf.Tensor): Promise<number> {
  const r = tf.tidy(() => tf.stack([tf.sum(tf.square(tf.sub(a, b))), tf.sum(tf.square(b))]));
  const [n, d] = await r.data();
  r.dispose();
  return Math.sqrt(n / d);
}

/**
 * A serialization with its last prefill tensor reshaped (flattened, or a row added to a vector): the
 * table stays valid (same element count), so a restore meets it only after restoring everything
 * before it.
 */
function lastStoredReshaped(bytes: Uint8Array): Uint8Array {
  const { header, payload } = splitContainer(bytes);
  const h = JSON.parse(header) as { tensors: { name: string; shape: number[] }[] };
  const victim = h.tensors.filter((t) => !t.name.startsWith('residual.') && t.shape.length >= 1).pop();
  expect(victim, 'a stored tensor with a shape').toBeDefined();
  const n = victim!.shape.reduce((a, b) => a * b, 1);
  victim!.shape = victim!.shape.length >= 2 ? [n] : [1, n];
  return writeContainer(JSON.stringify(h), payload);
}

async function snapshot(c: CompressedCache): Promise<Float32Array[]> {
  const out: Float32Array[] = [];
  for (let l = 0; l < c.layout.nLayers; l++) {
    const k = c.keys(l);
    const v = c.values(l);
    out.push((await k.data()) as Float32Array, (await v.data()) as Float32Array);
    tf.dispose([k, v]);
  }
  return out;
}

/** Registers the conformance tests of one strategy with vitest. */
export function runStrategyConformance(name: string, cases: ConformanceCases): void {
  const T = cases.tokens ?? 64;
  describe(`conformance: ${name}`, () => {
    let cache: KVCache;
    beforeAll(async () => {
      await selectBackend(process.env.KVPACK_BACKEND ?? 'wasm');
      cache = syntheticCache(T, cases.layout);
      if (cases.augment) cache = cases.augment(cache);
    });

    it('reconstructs [N, H_kv, d] float32 keys and values for every layer', async () => {
      const c = await createStrategy({ name, options: cases.compressing }).compress(cache);
      try {
        expect(c.strategy).toBe(name);
        expect(c.prefillLength).toBe(T);
        for (let l = 0; l < cache.layout.nLayers; l++) {
          const k = c.keys(l);
          const v = c.values(l);
          const n = c.tokenCount(l);
          expect(n).toBeGreaterThan(0);
          expect(n).toBeLessThanOrEqual(T);
          expect(k.shape).toEqual([n, cache.layout.nKvHeads, cache.layout.headDim]);
          expect(v.shape).toEqual([n, cache.layout.nKvHeads, cache.layout.headDim]);
          expect(k.dtype).toBe('float32');
          expect(v.dtype).toBe('float32');
          const finite = tf.tidy(() => tf.sum(tf.add(k.mul(0), v.mul(0))).dataSync()[0]);
          expect(Number.isFinite(finite)).toBe(true);
          tf.dispose([k, v]);
        }
      } finally {
        c.dispose();
      }
    });

    it('measures bytes equal to the serialized payload, and round-trips bit-identically', async () => {
      const c = await createStrategy({ name, options: cases.compressing }).compress(cache);
      const bytes = c.serialize();
      expect(c.byteSize()).toBe(bytes.length - headerBytes(bytes));
      // serializeAsync (the form for backends without a synchronous readback) writes the same bytes.
      expect(Buffer.from(await c.serializeAsync()).equals(Buffer.from(bytes))).toBe(true);
      const restored = deserializeCache(bytes);
      expect(restored.strategy).toBe(name);
      expect(restored.byteSize()).toBe(c.byteSize());
      const a = await snapshot(c);
      const b = await snapshot(restored);
      expect(b.length).toBe(a.length);
      a.forEach((x, i) => expect(Buffer.from(b[i].buffer).equals(Buffer.from(x.buffer))).toBe(true));
      c.dispose();
      restored.dispose();
    });

    it('restores bit-identically from a real file, a Buffer at any offset and a SharedArrayBuffer', async () => {
      const c = await createStrategy({ name, options: cases.compressing }).compress(cache);
      const n = 2;
      const shape: [number, number, number] = [n, cache.layout.nKvHeads, cache.layout.headDim];
      const k = tf.randomNormal(shape, 0, 1, 'float32', 7) as tf.Tensor3D;
      const v = tf.randomNormal(shape, 0, 1, 'float32', 8) as tf.Tensor3D;
      c.append(1, k, v);
      tf.dispose([k, v]);
      const bytes = c.serialize();
      const want = await cacheSnapshot(c);
      const dir = mkdtempSync(join(tmpdir(), 'kvpack-conformance-'));
      try {
        writeFileSync(join(dir, 'cache.kvpk'), bytes);
        const fromFile = readFileSync(join(dir, 'cache.kvpk'));
        const views: [string, Uint8Array][] = [['readFileSync Buffer', fromFile]];
        for (const offset of [1, 3, 8, 13]) {
          const b = Buffer.alloc(bytes.length + offset + 5, 0xee);
          b.set(bytes, offset);
          views.push([`Buffer at offset ${offset}`, b.subarray(offset, offset + bytes.length)]);
        }
        const shared = new Uint8Array(new SharedArrayBuffer(bytes.length + 6), 6, bytes.length);
        shared.set(bytes);
        views.push(['SharedArrayBuffer at offset 6', shared]);
        const start = tf.memory().numTensors;
        for (const [what, view] of views) {
          const r = deserializeCache(view);
          const got = await cacheSnapshot(r);
          expect(got.length, what).toBe(want.length);
          got.forEach((x, i) => expect(Buffer.from(x.buffer).equals(Buffer.from(want[i].buffer)), `${what}: array ${i}`).toBe(true));
          expect(Buffer.from(r.serialize()).equals(Buffer.from(bytes)), `${what}: re-serialized bytes`).toBe(true);
          r.dispose();
          expect(tf.memory().numTensors, what).toBe(start);
        }
      } finally {
        rmSync(dir, { recursive: true, force: true });
        c.dispose();
      }
    });

    it('frees what a restore built before it met a tensor of the wrong shape late in the file', async () => {
      const c = await createStrategy({ name, options: cases.compressing }).compress(cache);
      const bytes = c.serialize();
      c.dispose();
      const edited = lastStoredReshaped(bytes);
      const start = tf.memory().numTensors;
      expect(() => deserializeCache(edited)).toThrow(KvpackError);
      expect(tf.memory().numTensors).toBe(start);
    });

    it('ends every truncated, flipped or edited restore in the saved cache or a named error, leaking nothing (seeded fuzz)', async () => {
      const c = await createStrategy({ name, options: cases.compressing }).compress(cache);
      const k = tf.randomNormal([1, cache.layout.nKvHeads, cache.layout.headDim], 0, 1, 'float32', 9) as tf.Tensor3D;
      c.append(0, k, k);
      k.dispose();
      const bytes = c.serialize();
      const reference = await cacheSnapshot(c);
      c.dispose();
      const f = await fuzzRestore(bytes, reference, Number(process.env.KVPACK_FUZZ_TRIALS ?? 0) || (cases.fuzzTrials ?? 150), Number(process.env.KVPACK_FUZZ_SEED ?? 0x5eed));
      console.log(
        `restore fuzz ${name} ${JSON.stringify(cases.compressing)}: ${f.trials} trials, ${f.correct} correct, ${f.namedErrors} named errors, ` +
          `${f.otherErrors} other errors, ${f.silentlyDifferent} silently different, ${f.differentAfterRechecksum} different after re-checksummed header edits, ` +
          `${f.leaks} leaks; the process survived all ${f.trials} trials (no abort)`,
      );
      expect(f.examples).toEqual([]);
      expect(f.otherErrors).toBe(0);
      expect(f.silentlyDifferent).toBe(0);
      expect(f.leaks).toBe(0);
      expect(f.namedErrors).toBeGreaterThan(f.trials / 2);
    });

    it('compresses: measured ratio > 1 at its compressing setting', async () => {
      const c = await createStrategy({ name, options: cases.compressing }).compress(cache);
      const ratio = denseCacheBytes(cache.layout, T) / c.byteSize();
      if (cases.ratioAboveOne ?? true) expect(ratio).toBeGreaterThan(1);
      else expect(ratio).toBeCloseTo(1, 12);
      c.dispose();
    });

    if (cases.lossless) {
      it('is exact at its no-compression setting', async () => {
        const c = await createStrategy({ name, options: cases.lossless }).compress(cache);
        const tol = cases.losslessTolerance ?? 2e-3;
        for (let l = 0; l < cache.layout.nLayers; l++) {
          expect(c.tokenCount(l)).toBe(T);
          const k = c.keys(l);
          const v = c.values(l);
          const ref = applyRope(cache.keys[l], cache.rope, { start: 0, count: T });
          expect(await relErr(k, ref)).toBeLessThan(tol);
          expect(await relErr(v, cache.values[l])).toBeLessThan(tol);
          tf.dispose([k, v, ref]);
        }
        c.dispose();
      });
    } else {
      it.skip(`has no lossless setting: ${cases.noLosslessReason ?? 'reason not given'}`, () => {});
    }

    it('is deterministic: the same options give the same bytes', async () => {
      const a = await createStrategy({ name, options: cases.compressing }).compress(cache);
      const b = await createStrategy({ name, options: cases.compressing }).compress(cache);
      expect(Buffer.from(a.serialize()).equals(Buffer.from(b.serialize()))).toBe(true);
      a.dispose();
      b.dispose();
    });

    it('holds on the backend only what it stores: resident ÷ stored bytes after compress, between decode steps and after restore', async () => {
      const limit = cases.maxResidentRatio ?? 1.1;
      const r = await residentRatios(createStrategy({ name, options: cases.compressing }), cache);
      console.log(`resident ÷ stored ${name} ${JSON.stringify(cases.compressing)}: ${r.afterCompress.toFixed(3)} after compress, ${r.afterDecode.toFixed(3)} after 4 decode steps, ${r.afterRestore.toFixed(3)} after restore`);
      expect(r.afterCompress).toBeLessThanOrEqual(limit);
      expect(r.afterDecode).toBeLessThanOrEqual(limit);
      expect(r.afterRestore).toBeLessThanOrEqual(limit);
    });

    it('appends decode-time tokens to every layer', async () => {
      const c = await createStrategy({ name, options: cases.compressing }).compress(cache);
      const n = 3;
      const shape: [number, number, number] = [n, cache.layout.nKvHeads, cache.layout.headDim];
      for (let l = 0; l < cache.layout.nLayers; l++) {
        const before = c.tokenCount(l);
        const k = tf.randomNormal(shape, 0, 1, 'float32', 100 + l) as tf.Tensor3D;
        const v = tf.randomNormal(shape, 0, 1, 'float32', 200 + l) as tf.Tensor3D;
        c.append(l, k, v);
        expect(c.tokenCount(l)).toBe(before + n);
        const kk = c.keys(l);
        const vv = c.values(l);
        expect(kk.shape[0]).toBe(before + n);
        if (cases.exactDecode ?? true) {
          const kt = kk.slice([before, 0, 0], shape);
          const vt = vv.slice([before, 0, 0], shape);
          expect(Array.from(await kt.data())).toEqual(Array.from(await k.data()));
          expect(Array.from(await vt.data())).toEqual(Array.from(await v.data()));
          tf.dispose([kt, vt]);
        } else {
          const kt = kk.slice([before, 0, 0], shape);
          expect(await relErr(kt, k)).toBeLessThan(0.5);
          kt.dispose();
        }
        tf.dispose([k, v, kk, vv]);
      }
      const bytes = c.serialize();
      expect(c.byteSize()).toBe(bytes.length - headerBytes(bytes));
      const r = deserializeCache(bytes);
      expect(r.tokenCount(0)).toBe(c.tokenCount(0));
      const a = await snapshot(c);
      const b = await snapshot(r);
      a.forEach((x, i) => expect(Buffer.from(b[i].buffer).equals(Buffer.from(x.buffer))).toBe(true));
      c.dispose();
      r.dispose();
    });

    it('frees every tensor on dispose (repeated compress / reconstruct / dispose)', async () => {
      const start = tf.memory().numTensors;
      for (let i = 0; i < 3; i++) {
        const c = await createStrategy({ name, options: cases.compressing }).compress(cache);
        for (let l = 0; l < cache.layout.nLayers; l++) tf.dispose([c.keys(l), c.values(l)]);
        c.dispose();
        c.dispose();
        expect(tf.memory().numTensors).toBe(start);
      }
      const c = await createStrategy({ name, options: cases.compressing }).compress(cache);
      c.dispose();
      expect(() => c.keys(0)).toThrow(KvpackError);
    });

    it('rejects bad options with a KvpackError naming the problem', () => {
      expect(() => createStrategy({ name, options: { notAnOption: 1, ...cases.compressing } })).toThrow(/notAnOption|unrecognized/i);
      for (const bad of cases.badOptions) {
        let err: unknown;
        try {
          createStrategy({ name, options: bad });
        } catch (e) {
          err = e;
        }
        expect(err, `options ${JSON.stringify(bad)} should be rejected`).toBeInstanceOf(KvpackError);
      }
    });

    it('rejects NaN/Inf and a layer count that does not match the layout', async () => {
      const s = createStrategy({ name, options: cases.compressing });
      const data = Float32Array.from(cache.keys[1].dataSync());
      data[5] = NaN;
      const poisoned = tf.tensor3d(data, cache.keys[1].shape);
      const bad: KVCache = { ...cache, keys: cache.keys.map((k, l) => (l === 1 ? poisoned : k)) };
      await expect(s.compress(bad)).rejects.toThrow(/NaN or Inf/);
      poisoned.dispose();
      const short: KVCache = { ...cache, keys: cache.keys.slice(1), values: cache.values.slice(1) };
      await expect(s.compress(short)).rejects.toThrow(/layers/);
    });

    it('leaves no tensor allocated when compress throws (bad caches, settings that fail at compress)', async () => {
      const s = createStrategy({ name, options: cases.compressing });
      const data = Float32Array.from(cache.values[2].dataSync());
      data[data.length - 1] = Infinity;
      const poisoned = tf.tensor3d(data, cache.values[2].shape);
      const rejections: [string, () => Promise<unknown>][] = [
        ['an Inf in layer 2', () => s.compress({ ...cache, values: cache.values.map((v, l) => (l === 2 ? poisoned : v)) })],
        ['a layer count that does not match the layout', () => s.compress({ ...cache, keys: cache.keys.slice(1), values: cache.values.slice(1) })],
        ...(cases.failingCompress ?? []).map((o): [string, () => Promise<unknown>] => {
          // These options must pass the schema: the failure under test is the compress.
          const failing = createStrategy({ name, options: o });
          return [`options ${JSON.stringify(o)}`, () => failing.compress(cache)];
        }),
      ];
      try {
        for (const [what, run] of rejections) {
          const before = tf.memory().numTensors;
          let err: unknown;
          try {
            const c = (await run()) as CompressedCache;
            c.dispose();
          } catch (e) {
            err = e;
          }
          expect(err, `${what} should be rejected with a KvpackError`).toBeInstanceOf(KvpackError);
          expect(tf.memory().numTensors, `tensors left allocated after rejecting ${what}`).toBe(before);
        }
      } finally {
        poisoned.dispose();
      }
    });
  });
  runMlaConformance(name, cases);
}

async function mlaSnapshot(c: CompressedMlaCache): Promise<Float32Array[]> {
  const out: Float32Array[] = [];
  for (let l = 0; l < c.layout.nLayers; l++) {
    const a = c.latents(l);
    const b = c.ropeKeys(l);
    out.push(Float32Array.from((await a.data()) as Float32Array), Float32Array.from((await b.data()) as Float32Array));
    tf.dispose([a, b]);
  }
  return out;
}

/**
 * The MLA part of the suite: the checks of per-head caches on {@link syntheticMlaCache} when the
 * strategy's definition declares the `mla` capability at its MLA options, else the refusal.
 */
function runMlaConformance(name: string, cases: ConformanceCases): void {
  const m = cases.mla ?? {};
  const options = m.compressing ?? cases.compressing;
  const T = 64;
  describe(`conformance: ${name} on MLA latent caches`, () => {
    let cache: MlaKVCache;
    let supported: true | string = 'not resolved';
    beforeAll(async () => {
      await selectBackend(process.env.KVPACK_BACKEND ?? 'wasm');
      cache = syntheticMlaCache(T, m.layout, 5, CONFORMANCE_ROPE, 3);
      supported = compressesMla(name, parseStrategyOptions(name, options));
    });
    const mk = () => createStrategy({ name, options }).compress(cache);

    it('compresses MLA caches when its definition declares it, and otherwise refuses them naming itself, leaking nothing', async () => {
      if (supported === true) return;
      const before = tf.memory().numTensors;
      let err: unknown;
      try {
        (await mk()).dispose();
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(KvpackError);
      expect((err as KvpackError).code).toBe('unsupported');
      expect((err as Error).message).toContain(`strategy "${name}" does not compress MLA latent caches`);
      expect(tf.memory().numTensors).toBe(before);
    });

    // A strategy registered by the time the suite is collected is asked then: the MLA checks are not
    // registered at all for one that refuses MLA caches (its refusal is checked above).
    let declared: true | string | undefined;
    try {
      declared = compressesMla(name, parseStrategyOptions(name, options));
    } catch {
      declared = undefined; // not registered yet: decided in beforeAll
    }
    const mlaIt = (what: string, fn: () => Promise<void>) => {
      if (declared !== undefined && declared !== true) return;
      it(what, async (ctx) => {
        if (supported !== true) ctx.skip();
        await fn();
      });
    };

    mlaIt('reconstructs [N, d_c] latents and [N, d_R] RoPE keys, float32 and finite, for every layer', async () => {
      const c = await mk();
      try {
        expect(c.kind).toBe('mla');
        expect(c.strategy).toBe(name);
        expect(c.prefillLength).toBe(T);
        for (let l = 0; l < cache.layout.nLayers; l++) {
          const a = c.latents(l);
          const b = c.ropeKeys(l);
          const n = c.tokenCount(l);
          expect(n).toBeGreaterThan(0);
          expect(n).toBeLessThanOrEqual(T);
          expect(a.shape).toEqual([n, cache.layout.kvLoraRank]);
          expect(b.shape).toEqual([n, cache.layout.qkRopeHeadDim]);
          expect([a.dtype, b.dtype]).toEqual(['float32', 'float32']);
          expect(Number.isFinite(tf.tidy(() => tf.sum(tf.add(tf.sum(a.mul(0)), tf.sum(b.mul(0)))).dataSync()[0]))).toBe(true);
          tf.dispose([a, b]);
        }
      } finally {
        c.dispose();
      }
    });

    mlaIt('measures bytes equal to the serialized payload, RoPE keys included, and round-trips bit-identically', async () => {
      const c = await mk();
      const bytes = c.serialize();
      expect(c.byteSize()).toBe(bytes.length - headerBytes(bytes));
      expect(Buffer.from(await c.serializeAsync()).equals(Buffer.from(bytes))).toBe(true);
      expect(() => deserializeCache(bytes)).toThrow(/MLA latent cache/);
      const r = deserializeMlaCache(bytes);
      expect(r.strategy).toBe(name);
      expect(r.byteSize()).toBe(c.byteSize());
      const a = await mlaSnapshot(c);
      const b = await mlaSnapshot(r);
      expect(b.length).toBe(a.length);
      a.forEach((x, i) => expect(Buffer.from(b[i].buffer).equals(Buffer.from(x.buffer)), `array ${i}`).toBe(true));
      c.dispose();
      r.dispose();
    });

    mlaIt('frees what a restore built before it met a tensor of the wrong shape late in the file', async () => {
      const c = await mk();
      const bytes = c.serialize();
      c.dispose();
      const edited = lastStoredReshaped(bytes);
      const start = tf.memory().numTensors;
      expect(() => deserializeMlaCache(edited)).toThrow(KvpackError);
      expect(tf.memory().numTensors).toBe(start);
    });

    mlaIt('ends every truncated, flipped or edited restore in the saved cache or a named error, leaking nothing (seeded fuzz)', async () => {
      const c = await mk();
      const a = tf.randomNormal([1, cache.layout.kvLoraRank], 0, 1, 'float32', 9) as tf.Tensor2D;
      const b = tf.randomNormal([1, cache.layout.qkRopeHeadDim], 0, 1, 'float32', 10) as tf.Tensor2D;
      c.append(0, a, b);
      tf.dispose([a, b]);
      const bytes = c.serialize();
      const reference = await mlaCacheSnapshot(c);
      c.dispose();
      const trials = Number(process.env.KVPACK_FUZZ_TRIALS ?? 0) || Math.min(100, cases.fuzzTrials ?? 100);
      const f = await fuzzRestore(bytes, reference, trials, Number(process.env.KVPACK_FUZZ_SEED ?? 0x5eed), { restore: deserializeMlaCache, snapshot: mlaCacheSnapshot });
      console.log(
        `restore fuzz ${name} MLA ${JSON.stringify(options)}: ${f.trials} trials, ${f.correct} correct, ${f.namedErrors} named errors, ${f.otherErrors} other errors, ` +
          `${f.silentlyDifferent} silently different, ${f.differentAfterRechecksum} different after re-checksummed header edits, ${f.leaks} leaks`,
      );
      expect(f.examples).toEqual([]);
      expect(f.otherErrors).toBe(0);
      expect(f.silentlyDifferent).toBe(0);
      expect(f.leaks).toBe(0);
      expect(f.namedErrors).toBeGreaterThan(f.trials / 2);
    });

    mlaIt('compresses: measured ratio against dense fp16 latents and RoPE keys > 1', async () => {
      const c = await mk();
      const ratio = mlaDenseBytes(cache.layout, T) / c.byteSize();
      if (m.ratioAboveOne ?? cases.ratioAboveOne ?? true) expect(ratio).toBeGreaterThan(1);
      else expect(ratio).toBeCloseTo(1, 12);
      c.dispose();
    });

    if (m.lossless) {
      mlaIt('is exact at its no-compression setting (RoPE keys rotated at their true positions)', async () => {
        const c = await createStrategy({ name, options: m.lossless }).compress(cache);
        const tol = m.losslessTolerance ?? 2e-3;
        for (let l = 0; l < cache.layout.nLayers; l++) {
          expect(c.tokenCount(l)).toBe(T);
          const a = c.latents(l);
          const b = c.ropeKeys(l);
          const ref = ropeSharedKeys(cache.ropeKeys[l], cache.rope, cache.startPosition ?? 0);
          expect(await relErr(a, cache.latents[l])).toBeLessThan(tol);
          expect(await relErr(b, ref)).toBeLessThan(tol);
          tf.dispose([a, b, ref]);
        }
        c.dispose();
      });
    }

    mlaIt('holds on the backend only what it stores: resident ÷ stored ≤ 1.1 after compress, decode steps and restore', async () => {
      const limit = cases.maxResidentRatio ?? 1.1;
      const { afterCompress, afterDecode, afterRestore } = await mlaResidentRatios(createStrategy({ name, options }), cache);
      console.log(`resident ÷ stored ${name} MLA ${JSON.stringify(options)}: ${afterCompress.toFixed(3)} after compress, ${afterDecode.toFixed(3)} after 4 decode steps, ${afterRestore.toFixed(3)} after restore`);
      expect(afterCompress).toBeLessThanOrEqual(limit);
      expect(afterDecode).toBeLessThanOrEqual(limit);
      expect(afterRestore).toBeLessThanOrEqual(limit);
    });

    mlaIt('appends decode-time latents and post-RoPE keys to every layer, and serializes them', async () => {
      const c = await mk();
      const n = 3;
      const { kvLoraRank: dc, qkRopeHeadDim: dr } = cache.layout;
      for (let l = 0; l < cache.layout.nLayers; l++) {
        const before = c.tokenCount(l);
        const a = tf.randomNormal([n, dc], 0, 1, 'float32', 100 + l) as tf.Tensor2D;
        const b = tf.randomNormal([n, dr], 0, 1, 'float32', 200 + l) as tf.Tensor2D;
        c.append(l, a, b);
        expect(c.tokenCount(l)).toBe(before + n);
        const aa = c.latents(l);
        const bb = c.ropeKeys(l);
        expect(aa.shape[0]).toBe(before + n);
        const at = aa.slice([before, 0], [n, dc]);
        const bt = bb.slice([before, 0], [n, dr]);
        if (m.exactDecode ?? true) {
          expect(Array.from(await at.data())).toEqual(Array.from(await a.data()));
          expect(Array.from(await bt.data())).toEqual(Array.from(await b.data()));
        } else {
          expect(await relErr(at, a)).toBeLessThan(0.5);
        }
        tf.dispose([a, b, aa, bb, at, bt]);
      }
      const bytes = c.serialize();
      expect(c.byteSize()).toBe(bytes.length - headerBytes(bytes));
      const r = deserializeMlaCache(bytes);
      expect(r.tokenCount(0)).toBe(c.tokenCount(0));
      const x = await mlaSnapshot(c);
      const y = await mlaSnapshot(r);
      x.forEach((v, i) => expect(Buffer.from(y[i].buffer).equals(Buffer.from(v.buffer))).toBe(true));
      c.dispose();
      r.dispose();
    });

    mlaIt('frees every tensor on dispose (repeated compress / reconstruct / dispose)', async () => {
      const start = tf.memory().numTensors;
      for (let i = 0; i < 2; i++) {
        const c = await mk();
        for (let l = 0; l < cache.layout.nLayers; l++) tf.dispose([c.latents(l), c.ropeKeys(l)]);
        c.dispose();
        c.dispose();
        expect(tf.memory().numTensors).toBe(start);
      }
      const c = await mk();
      c.dispose();
      expect(() => c.latents(0)).toThrow(KvpackError);
    });

    mlaIt('rejects NaN/Inf, wrong widths and a layer count that does not match the layout, leaking nothing', async () => {
      const s = createStrategy({ name, options });
      const data = Float32Array.from(cache.latents[1].dataSync());
      data[5] = NaN;
      const poisoned = tf.tensor2d(data, cache.latents[1].shape);
      const wide = tf.zeros([T, cache.layout.qkRopeHeadDim + 2]) as tf.Tensor2D;
      const rejections: [string, RegExp, () => Promise<unknown>][] = [
        ['a NaN in layer 1 latents', /layer 1 latents contain NaN or Inf/, () => s.compress({ ...cache, latents: cache.latents.map((x, l) => (l === 1 ? poisoned : x)) })],
        ['RoPE keys of the wrong width', /layer 2 RoPE keys: shape must be/, () => s.compress({ ...cache, ropeKeys: cache.ropeKeys.map((x, l) => (l === 2 ? wide : x)) })],
        ['a layer count that does not match the layout', /layers/, () => s.compress({ ...cache, latents: cache.latents.slice(1), ropeKeys: cache.ropeKeys.slice(1) })],
      ];
      try {
        for (const [what, msg, run] of rejections) {
          const before = tf.memory().numTensors;
          await expect(run(), what).rejects.toThrow(msg);
          expect(tf.memory().numTensors, `tensors left allocated after rejecting ${what}`).toBe(before);
        }
      } finally {
        tf.dispose([poisoned, wide]);
      }
    });

    afterAll(() => {
      if (cache) disposeMlaCache(cache);
    });
  });
}

/**
 * {@link residentRatios} for an MLA latent cache: resident ÷ stored bytes after compression, after
 * `decodeSteps` decode steps per layer (append one latent and RoPE key, read both back), and after a
 * serializeAsync → deserializeMlaCache round trip; the shared RoPE tables' growth is subtracted.
 */
export async function mlaResidentRatios(strategy: Strategy, cache: MlaKVCache, decodeSteps = 4): Promise<{ afterCompress: number; afterDecode: number; afterRestore: number }> {
  const base = tf.memory().numBytes;
  const sharedBase = sharedRopeTableBytes();
  const held = () => tf.memory().numBytes - base - (sharedRopeTableBytes() - sharedBase);
  const c = await strategy.compress(cache);
  try {
    const afterCompress = held() / c.byteSize();
    for (let step = 0; step < decodeSteps; step++) {
      for (let l = 0; l < cache.layout.nLayers; l++) {
        const a = tf.randomNormal([1, cache.layout.kvLoraRank], 0, 1, 'float32', 300 + step) as tf.Tensor2D;
        const b = tf.randomNormal([1, cache.layout.qkRopeHeadDim], 0, 1, 'float32', 350 + step) as tf.Tensor2D;
        c.append(l, a, b);
        tf.dispose([a, b, c.latents(l), c.ropeKeys(l)]);
      }
    }
    const afterDecode = held() / c.byteSize();
    const bytes = await c.serializeAsync();
    const stored = c.byteSize();
    c.dispose();
    const restored = deserializeMlaCache(bytes);
    const afterRestore = held() / stored;
    restored.dispose();
    return { afterCompress, afterDecode, afterRestore };
  } finally {
    c.dispose();
  }
}

/**
 * Resident ÷ stored bytes of a strategy's cache: the tensor bytes the compressed cache holds on the
 * backend (the change of `tf.memory().numBytes` it causes, with every returned tensor disposed) over
 * its `byteSize()` — after compression, after `decodeSteps` (default 4) decode steps per layer (append
 * one token, read keys and values, attend), and after a serializeAsync → deserialize round trip.
 * The growth of core's shared device RoPE tables (`sharedRopeTableBytes`, rope.ts) in that time is
 * not the cache's: those tables are a process-wide working set, like the model's weights, held once
 * for every cache and layer decoding over the same positions, so it is subtracted.
 */
export async function residentRatios(strategy: Strategy, cache: KVCache, decodeSteps = 4): Promise<{ afterCompress: number; afterDecode: number; afterRestore: number }> {
  const base = tf.memory().numBytes;
  const sharedBase = sharedRopeTableBytes();
  /** Backend bytes the cache added: tensor bytes since `base`, less the shared RoPE tables' growth. */
  const held = () => tf.memory().numBytes - base - (sharedRopeTableBytes() - sharedBase);
  const c = await strategy.compress(cache);
  try {
    const afterCompress = held() / c.byteSize();
    const { nKvHeads: H, headDim: d, nHeads } = cache.layout;
    for (let step = 0; step < decodeSteps; step++) {
      for (let l = 0; l < cache.layout.nLayers; l++) {
        const k = tf.randomNormal([1, H, d], 0, 1, 'float32', 300 + step) as tf.Tensor3D;
        c.append(l, k, k);
        k.dispose();
        const q = tf.randomNormal([1, nHeads, d], 0, 1, 'float32', 400 + step) as tf.Tensor3D;
        tf.dispose([c.keys(l), c.values(l), ...(c.attend ? [c.attend(l, q)] : []), q]);
      }
    }
    const afterDecode = held() / c.byteSize();
    const bytes = await c.serializeAsync();
    const stored = c.byteSize();
    c.dispose();
    const restored = deserializeCache(bytes);
    const afterRestore = held() / stored;
    restored.dispose();
    return { afterCompress, afterDecode, afterRestore };
  } finally {
    c.dispose();
  }
}

/** One bounded numeric option: its name as the error shows it, its bound, and options that set it to a value. */
export interface OptionBound {
  option: string;
  /** The bound: accepted at it, rejected one past it. */
  bound: number;
  /** 'max' (default): `bound + 1` is rejected; 'min': `bound − 1` is. */
  side?: 'max' | 'min';
  /** Options with the bounded option set to `v` (other options chosen so that `bound` is valid). */
  at: (v: number) => Record<string, unknown>;
}

/**
 * For each bound: the options at the bound are accepted by `createStrategy`, and one past it is a
 * KvpackError('config') whose message names the option and contains the bound.
 */
export function expectOptionBounds(name: string, bounds: OptionBound[]): void {
  for (const b of bounds) {
    expect(() => createStrategy({ name, options: b.at(b.bound) }), `${name}: ${b.option} = ${b.bound} should be accepted`).not.toThrow();
    let err: unknown;
    try {
      createStrategy({ name, options: b.at(b.side === 'min' ? b.bound - 1 : b.bound + 1) });
    } catch (e) {
      err = e;
    }
    expect(err, `${name}: ${b.option} past ${b.bound} should be rejected`).toBeInstanceOf(KvpackError);
    const e = err as KvpackError;
    expect(e.code).toBe('config');
    expect(e.message).toContain(String(b.bound));
    expect(e.message).toContain(b.option);
  }
}
