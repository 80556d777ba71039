import { readFileSync } from 'node:fs';
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KvpackError, applyRope, createStrategy, denseCacheBytes, denseStrategy, deserializeCache, disposeKVCache, selectBackend, type CompressedCache } from '@kvpack/core';
import { loadLlama2cCheckpoint, parseLlama2cCheckpoint } from '../llama2c/index.js';
import type { LlamaWeights } from '../types.js';
import { Session, LlamaModel, createSampler } from './index.js';
import {
  HAVE_STORIES,
  SKIP_STORIES,
  STORIES_BIN,
  maxAbsDiff,
  randomModel,
  readOracle,
  readStoriesRef,
  refForward,
  refMeanNll,
  writeLlama2c,
  type Oracle,
  type RefModel,
} from './reference.testutil.js';

beforeAll(async () => {
  await selectBackend('wasm');
});

const data = (t: tf.Tensor) => t.dataSync() as Float32Array;
const disposeKV = disposeKVCache;
const exact = () => denseStrategy({ storage: 'float32' });

function expectKvpack(fn: () => unknown, code: string, fragment: string) {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(KvpackError);
  expect((err as KvpackError).code).toBe(code);
  expect((err as Error).message).toContain(fragment);
}

async function expectKvpackAsync(p: Promise<unknown>, code: string, fragment: string) {
  const err = await p.then(
    () => undefined,
    (e) => e,
  );
  expect(err).toBeInstanceOf(KvpackError);
  expect((err as KvpackError).code).toBe(code);
  expect((err as Error).message).toContain(fragment);
}

/** Copies a float64 reference vector list [T][n] into one flat array. */
const flat = (rows: Float64Array[]) => Float64Array.from(rows.flatMap((r) => Array.from(r)));

describe.skipIf(!HAVE_STORIES)(`stories260K against oracle.json${SKIP_STORIES}`, () => {
  let model: LlamaModel;
  let oracle: Oracle;
  let ref: RefModel;
  beforeAll(async () => {
    model = new LlamaModel(await loadLlama2cCheckpoint(STORIES_BIN));
    oracle = readOracle();
    ref = readStoriesRef(readFileSync(STORIES_BIN));
  });
  afterAll(() => model?.dispose());

  it('greedy decoding from BOS reproduces the oracle up to its first near-tie', async () => {
    const r = await model.generate([1], { maxNewTokens: 256 });
    expect(r.ids).toHaveLength(256);
    expect(r.stopReason).toBe('maxNewTokens');
    // Compare ids up to the first step whose oracle top-2 margin is under 1e-2 (float32 may flip there).
    const firstTie = oracle.top2_logit_margin.findIndex((m) => m < 1e-2);
    expect(firstTie).toBe(132);
    expect(r.ids.slice(0, firstTie)).toEqual(oracle.greedy_ids.slice(1, firstTie + 1));
    expect(maxAbsDiff(r.margins.slice(0, firstTie), oracle.top2_logit_margin.slice(0, firstTie))).toBeLessThan(1e-3);
    // Exact float32 cache: 2 × L × T × H_kv × d × 4 bytes for the one-token prompt, ratio 0.5 vs fp16.
    expect(r.cache.prefillByteSize).toBe(2 * 5 * 1 * 4 * 8 * 4);
    expect(r.cache.compressionRatio).toBe(0.5);
    expect(r.cache.byteSize).toBe(2 * 5 * 256 * 4 * 8 * 4); // prompt + 255 decoded tokens
  });

  it('teacher-forced mean NLL matches the oracle, through meanNll and through decode', async () => {
    const ids = oracle.greedy_ids; // BOS + 256 tokens: 256 predictions from positions 0..255
    expect(oracle.kv_shape).toEqual([5, 256, 4, 8]);
    const full = await model.meanNll(ids);
    expect(Math.abs(full - oracle.mean_nll_greedy_seq)).toBeLessThan(1e-3);
    const viaDecode = await model.nll([1], ids.slice(1));
    expect(Math.abs(viaDecode - full)).toBeLessThan(1e-5);
    // Split elsewhere: a 100-token prompt, 157 continuation tokens — same sequence, same mean over the continuation.
    const s = await model.scoreContinuation(ids.slice(0, 100), ids.slice(100));
    expect(s.tokenNll).toHaveLength(157);
    const { logits } = await model.prefill(ids.slice(0, -1));
    const all = new Float64Array(256);
    const lg = data(logits);
    for (let t = 0; t < 256; t++) {
      const row = lg.subarray(t * 512, (t + 1) * 512);
      const mx = Math.max(...row);
      const z = row.reduce((a, v) => a + Math.exp(v - mx), 0);
      all[t] = -(row[ids[t + 1]] - mx - Math.log(z));
    }
    logits.dispose();
    expect(maxAbsDiff(s.tokenNll, all.subarray(99))).toBeLessThan(1e-4);
  });

  it('prefill logits, pre-RoPE keys, values and queries match a float64 forward of the dequantized weights', async () => {
    const ids = oracle.greedy_ids.slice(0, 24);
    const T = ids.length;
    const want = refForward(ref, ids);
    const { logits, cache } = await model.prefill(ids, { observationWindow: 5 });
    expect(logits.shape).toEqual([T, 512]);
    expect(maxAbsDiff(data(logits), flat(want.logits))).toBeLessThan(2e-4);
    expect(cache.layout).toEqual({ nLayers: 5, nHeads: 8, nKvHeads: 4, headDim: 8 });
    expect(cache.rope).toMatchObject({ theta: 10000, layout: 'interleaved' });
    expect(cache.startPosition).toBe(0);
    expect(cache.queries).toHaveLength(5);
    for (let l = 0; l < 5; l++) {
      expect(cache.keys[l].shape).toEqual([T, 4, 8]);
      expect(cache.queries![l].shape).toEqual([5, 8, 8]);
      expect(maxAbsDiff(data(cache.keys[l]), flat(want.keys[l]))).toBeLessThan(2e-4);
      expect(maxAbsDiff(data(cache.values[l]), flat(want.values[l]))).toBeLessThan(2e-4);
      expect(maxAbsDiff(data(cache.queries![l]), flat(want.queries[l].slice(T - 5)))).toBeLessThan(2e-4);
    }
    disposeKV(cache);
    logits.dispose();
  });

  it('layer-0 keys: rmsnorm(x)·Wk by hand in float64, rotated, equal the cache keys after applyRope', async () => {
    const ids = [1, 403, 407, 261, 378, 432, 383, 286];
    const D = 64;
    const L0 = ref.layers[0];
    const handPre: number[] = [];
    const handPost: number[] = [];
    ids.forEach((id, p) => {
      const x = ref.emb.subarray(id * D, (id + 1) * D);
      let ss = 0;
      for (const v of x) ss += v * v;
      const h = Array.from(x, (v, i) => (v / Math.sqrt(ss / D + 1e-5)) * L0.attnNorm[i]);
      const k = new Float64Array(32);
      for (let o = 0; o < 32; o++) for (let i = 0; i < D; i++) k[o] += L0.wk[o * D + i] * h[i];
      handPre.push(...k);
      for (let j = 0; j < 32; j += 2) {
        const a = p * Math.pow(10000, -(j % 8) / 8); // llama2.c: freq = 10000^(-(i mod head_size)/head_size)
        handPost.push(k[j] * Math.cos(a) - k[j + 1] * Math.sin(a), k[j] * Math.sin(a) + k[j + 1] * Math.cos(a));
      }
    });
    const { logits, cache } = await model.prefill(ids);
    expect(maxAbsDiff(data(cache.keys[0]), handPre)).toBeLessThan(1e-5);
    const post = applyRope(cache.keys[0], cache.rope, { start: 0, count: ids.length });
    expect(maxAbsDiff(data(post), handPost)).toBeLessThan(1e-5);
    // The keys the model attends with are these: the dense cache hands them back post-RoPE.
    const dense = await exact().compress(cache);
    const k0 = dense.keys(0);
    expect(maxAbsDiff(data(k0), handPost)).toBeLessThan(1e-5);
    tf.dispose([post, k0, logits]);
    dense.dispose();
    disposeKV(cache);
  });

  it('decode through a compressed cache agrees with prefill (n = 1 and n > 1, with and without attend)', async () => {
    const ids = oracle.greedy_ids.slice(0, 40);
    const { logits: full, cache: c0 } = await model.prefill(ids);
    disposeKV(c0);
    const fullRows = data(full);
    full.dispose();
    const { logits: pl, cache } = await model.prefill(ids.slice(0, 30), { logits: 'last' });
    expect(pl.shape).toEqual([1, 512]);
    expect(maxAbsDiff(data(pl), fullRows.subarray(29 * 512, 30 * 512))).toBeLessThan(1e-4);
    pl.dispose();
    for (const withAttend of [true, false]) {
      const dense = await exact().compress(cache);
      // A view of the cache without the optional attend(): the model must fall back to keys()/values().
      const c: CompressedCache = withAttend
        ? dense
        : { ...Object.fromEntries(['strategy', 'layout', 'rope', 'prefillLength'].map((k) => [k, (dense as never)[k]])), tokenCount: (l: number) => dense.tokenCount(l), keys: (l: number) => dense.keys(l), values: (l: number) => dense.values(l), append: (l: number, k: tf.Tensor3D, v: tf.Tensor3D) => dense.append(l, k, v), byteSize: () => dense.byteSize(), serialize: () => dense.serialize(), dispose: () => dense.dispose() } as CompressedCache;
      const one = model.decode([ids[30]], c, 30);
      expect(one.shape).toEqual([1, 512]);
      expect(maxAbsDiff(data(one), fullRows.subarray(30 * 512, 31 * 512))).toBeLessThan(1e-4);
      const many = model.decode(ids.slice(31, 40), c, 31);
      expect(many.shape).toEqual([9, 512]);
      expect(maxAbsDiff(data(many), fullRows.subarray(31 * 512, 40 * 512))).toBeLessThan(1e-4);
      expect(dense.tokenCount(0)).toBe(40);
      tf.dispose([one, many]);
      dense.dispose();
    }
    disposeKV(cache);
  });

  it('a float16 dense cache measures ratio 1.0 and stays close to exact', async () => {
    const ids = oracle.greedy_ids.slice(0, 64);
    const s = await model.scoreContinuation(ids.slice(0, 48), ids.slice(48), denseStrategy({ storage: 'float16' }));
    expect(s.cache.strategy).toBe('dense');
    expect(s.cache.prefillByteSize).toBe(denseCacheBytes(model.layout, 48));
    expect(s.cache.compressionRatio).toBe(1);
    expect(s.cache.byteSize).toBe(denseCacheBytes(model.layout, 48) + 2 * 5 * 15 * 32 * 4);
    const e = await model.scoreContinuation(ids.slice(0, 48), ids.slice(48));
    expect(Math.abs(s.meanNll - e.meanNll)).toBeLessThan(1e-2);
  });

  it('seeded sampling is deterministic; a tiny topP is greedy', async () => {
    const a = await model.generate([1], { maxNewTokens: 20, sampling: { temperature: 1, seed: 7 } });
    const b = await model.generate([1], { maxNewTokens: 20, sampling: { temperature: 1, seed: 7 } });
    expect(b.ids).toEqual(a.ids);
    const g = await model.generate([1], { maxNewTokens: 20, sampling: { temperature: 1.5, topP: 1e-9, seed: 3 } });
    expect(g.ids).toEqual(oracle.greedy_ids.slice(1, 21));
    const stop = await model.generate([1], { maxNewTokens: 50, stopIds: [oracle.greedy_ids[6]] });
    expect(stop.stopReason).toBe('stopId');
    expect(stop.ids).toEqual(oracle.greedy_ids.slice(1, oracle.greedy_ids.indexOf(oracle.greedy_ids[6], 1) + 1));
  });

  it('rejects bad token ids and sequences longer than max_seq_len', async () => {
    await expectKvpackAsync(model.prefill([1, 512]), 'shape', 'token id 512 at index 1');
    await expectKvpackAsync(model.prefill([1, -1]), 'shape', 'token id -1');
    await expectKvpackAsync(model.prefill([1, 2.5]), 'shape', 'token id 2.5');
    await expectKvpackAsync(model.prefill([]), 'shape', 'no token ids');
    await expectKvpackAsync(model.prefill(new Array(513).fill(5)), 'shape', "exceed the model's max_seq_len 512");
    await expectKvpackAsync(model.prefill([1, 2], { observationWindow: 3 }), 'shape', 'observationWindow 3');
    await expectKvpackAsync(model.meanNll([1]), 'shape', 'at least 2');
    await expectKvpackAsync(model.nll([1], [NaN]), 'shape', 'token id NaN');
    await expectKvpackAsync(model.generate([1], { maxNewTokens: -1 }), 'config', 'maxNewTokens');
    await expectKvpackAsync(model.generate([1], { maxNewTokens: 2, sampling: { topP: 0 } }), 'config', 'topP');
    const { logits, cache } = await model.prefill([1, 5]);
    const dense = await exact().compress(cache);
    expectKvpack(() => model.decode([600], dense, 2), 'shape', 'token id 600');
    expectKvpack(() => model.decode([5], dense, 512), 'shape', 'positions 512..512');
    expectKvpack(() => model.decode([5], dense, -1), 'shape', 'position -1');
    tf.dispose([logits]);
    disposeKV(cache);
    dense.dispose();
  });

  it('tensor count returns to its start value after repeated prefill / decode / generate / nll', async () => {
    const ids = oracle.greedy_ids.slice(0, 20);
    const start = tf.memory().numTensors;
    for (let rep = 0; rep < 3; rep++) {
      const { logits, cache } = await model.prefill(ids, { observationWindow: 4 });
      const dense = await exact().compress(cache);
      disposeKV(cache);
      logits.dispose();
      model.decode([7], dense, 20).dispose();
      model.decode([8, 9, 10], dense, 21).dispose();
      dense.dispose();
      await model.generate(ids, { maxNewTokens: 5 });
      await model.nll(ids.slice(0, 10), ids.slice(10));
      await model.meanNll(ids);
      expect(tf.memory().numTensors).toBe(start);
    }
  });
});

describe('LlamaModel on random weights (GQA, both RoPE layouts, q/k/v biases)', () => {
  const spec = { dim: 16, hidden: 24, nLayers: 2, nHeads: 4, nKvHeads: 2, vocab: 40, maxSeqLen: 8, shared: true, groupSize: 8, seed: 5 };

  /** Loads the random model through a version-1 file, optionally switching RoPE layout and adding biases. */
  function build(layout: 'interleaved' | 'half', bias: boolean): { model: LlamaModel; ref: RefModel } {
    const { ref, tables } = randomModel(spec);
    const w: LlamaWeights = parseLlama2cCheckpoint(writeLlama2c(ref, tables, 1, spec.groupSize), 'rand.bin');
    ref.ropeLayout = layout;
    w.config.rope = { ...w.config.rope, layout };
    if (bias) {
      w.config.qkvBias = true;
      let s = 1;
      const rnd = () => ((s = (s * 48271) % 2147483647) / 2147483647 - 0.5) * 0.5;
      w.layers.forEach((l, i) => {
        const bq = Float64Array.from({ length: 16 }, () => Math.fround(rnd()));
        const bk = Float64Array.from({ length: 8 }, () => Math.fround(rnd()));
        const bv = Float64Array.from({ length: 8 }, () => Math.fround(rnd()));
        Object.assign(ref.layers[i], { bq, bk, bv });
        Object.assign(l, { bq: tf.tensor1d(Float32Array.from(bq)), bk: tf.tensor1d(Float32Array.from(bk)), bv: tf.tensor1d(Float32Array.from(bv)) });
      });
    }
    return { model: new LlamaModel(w), ref };
  }

  for (const [layout, bias] of [
    ['interleaved', false],
    ['half', true],
  ] as const) {
    it(`prefill and decode match a float64 forward (${layout} RoPE${bias ? ', q/k/v biases' : ''})`, async () => {
      const { model, ref } = build(layout, bias);
      const ids = [1, 9, 33, 2, 17, 17, 30, 4];
      const want = refForward(ref, ids);
      const { logits, cache } = await model.prefill(ids.slice(0, 5));
      expect(maxAbsDiff(data(logits), flat(want.logits.slice(0, 5)))).toBeLessThan(1e-4);
      expect(maxAbsDiff(data(cache.keys[1]), flat(want.keys[1].slice(0, 5)))).toBeLessThan(1e-4);
      const dense = await exact().compress(cache);
      const d1 = model.decode(ids.slice(5, 8), dense, 5);
      expect(maxAbsDiff(data(d1), flat(want.logits.slice(5, 8)))).toBeLessThan(1e-4);
      const nll = await model.meanNll(ids);
      expect(Math.abs(nll - refMeanNll(want.logits, ids.slice(1)))).toBeLessThan(1e-5);
      tf.dispose([logits, d1]);
      disposeKV(cache);
      dense.dispose();
      model.dispose();
    });
  }

  it('a decode session generates what generate does and scores like the float64 reference', async () => {
    const { model, ref } = build('half', true);
    const prompt = [1, 9, 33];
    const g = await model.generate(prompt, { maxNewTokens: 4 });
    const { logits, cache } = await model.prefill(prompt, { logits: 'last' });
    const dense = await exact().compress(cache);
    const session = new Session(model, dense, prompt.length, data(logits));
    const s = await session.greedy(4);
    expect(s.ids).toEqual(g.ids);
    expect(maxAbsDiff(s.margins, g.margins)).toBeLessThan(1e-6);
    expect(session.position).toBe(prompt.length + 3);
    // Teacher-forced NLL of ids[3..7] through a fresh session fed ids[2] (the last prompt token) first.
    const ids = [1, 9, 33, 2, 17, 17, 30, 4];
    const want = refForward(ref, ids);
    const { logits: l2, cache: c2 } = await model.prefill(ids.slice(0, 2));
    const d2 = await exact().compress(c2);
    const score = await new Session(model, d2, 2).teacherForcedNll(ids.slice(3), { first: ids[2] });
    expect(Math.abs(score.meanNll - refMeanNll(want.logits.slice(2), ids.slice(3)))).toBeLessThan(1e-5);
    expect(score.argmax).toHaveLength(5);
    tf.dispose([logits, l2]);
    disposeKV(cache);
    disposeKV(c2);
    for (const x of [dense, d2, model]) x.dispose();
  });

  it('generation stops at max_seq_len', async () => {
    const { model } = build('interleaved', false);
    const r = await model.generate([1, 2, 3, 4, 5], { maxNewTokens: 10 });
    // positions 5, 6, 7 are decoded; the 4th token comes from position 7's logits, a 5th would need position 8.
    expect(r.ids).toHaveLength(4);
    expect(r.stopReason).toBe('maxSeqLen');
    expect(r.margins).toHaveLength(4);
    model.dispose();
  });

  it('rejects weights that disagree with their config, and caches of another model', async () => {
    const { ref, tables } = randomModel(spec);
    const w = parseLlama2cCheckpoint(writeLlama2c(ref, tables, 1, spec.groupSize), 'rand.bin');
    const wk = w.layers[1].wk;
    w.layers[1].wk = tf.zeros([16, 12]) as tf.Tensor2D;
    expectKvpack(() => new LlamaModel(w), 'shape', 'weight layers.1.wk has shape [16,12], expected [16,8]');
    w.layers[1].wk.dispose();
    w.layers[1].wk = wk;
    w.config.qkvBias = true;
    expectKvpack(() => new LlamaModel(w), 'shape', 'weight layers.0.bq is missing');
    w.config.qkvBias = false;
    const model = new LlamaModel(w);
    const other = { ...model.layout, nKvHeads: 4 };
    const fake = { layout: other, rope: model.config.rope } as unknown as CompressedCache;
    expectKvpack(() => model.decode([1], fake, 0), 'layout', "is not the model's");
    model.dispose();
  });

  it('fingerprints its weights: prefill caches carry it through serialization, and another model refuses them', async () => {
    const a = build('interleaved', false).model;
    const same = build('interleaved', false).model;
    const { ref, tables } = randomModel({ ...spec, seed: 6 });
    const b = new LlamaModel(parseLlama2cCheckpoint(writeLlama2c(ref, tables, 1, spec.groupSize), 'rand.bin'));
    const fa = await a.fingerprint();
    expect(fa).toMatch(/^sha256:[0-9a-f]{64}$/);
    expect(await same.fingerprint()).toBe(fa);
    expect(await b.fingerprint()).not.toBe(fa);
    // One changed weight changes the fingerprint (an independent model object over edited weights).
    const w = parseLlama2cCheckpoint(writeLlama2c(ref, tables, 1, spec.groupSize), 'rand.bin');
    const edited = w.layers[1].w2.dataSync().slice();
    edited[3] += 1;
    w.layers[1].w2.dispose();
    w.layers[1].w2 = tf.tensor2d(edited, w.layers[1].w2.shape);
    const b2 = new LlamaModel(w);
    expect(await b2.fingerprint()).not.toBe(await b.fingerprint());

    const { logits, cache } = await a.prefill([1, 9, 33]);
    expect(cache.model).toBe(fa);
    const compressed = await createStrategy({ name: 'dense', options: { storage: 'float32' } }).compress(cache);
    expect(compressed.model).toBe(fa);
    const bytes = compressed.serialize();
    const restored = deserializeCache(bytes, { model: fa });
    expect(restored.model).toBe(fa);
    const fb = await b.fingerprint();
    expectKvpack(() => deserializeCache(bytes, { model: fb }), 'model', `made from model ${fa}`);
    // decode checks the cache's fingerprint even on a model that has not computed its own yet.
    const fresh = build('interleaved', false).model;
    const fresh2 = new LlamaModel(parseLlama2cCheckpoint(writeLlama2c(ref, tables, 1, spec.groupSize), 'rand.bin'));
    const d = fresh.decode([4], restored, 3);
    expectKvpack(() => fresh2.decode([4], restored, 4), 'model', 'not from this model');
    tf.dispose([logits, d]);
    disposeKV(cache);
    for (const x of [compressed, restored, a, same, b, b2, fresh, fresh2]) x.dispose();
  });
});

describe('createSampler', () => {
  it('greedy is argmax; temperature sampling follows the softmax distribution', () => {
    expect(createSampler()([0.1, 3, -2, 3])).toBe(1);
    const s = createSampler({ temperature: 1, seed: 42 });
    const logits = [Math.log(0.6), Math.log(0.3), Math.log(0.1)];
    const counts = [0, 0, 0];
    for (let i = 0; i < 20000; i++) counts[s(logits)]++;
    expect(counts[0] / 20000).toBeCloseTo(0.6, 1);
    expect(counts[1] / 20000).toBeCloseTo(0.3, 1);
    expect(counts[2] / 20000).toBeCloseTo(0.1, 1);
    // topP 0.8 keeps {0.6, 0.3}: renormalized 2/3, 1/3; token 2 never drawn.
    const p = createSampler({ temperature: 1, topP: 0.8, seed: 1 });
    const c2 = [0, 0, 0];
    for (let i = 0; i < 20000; i++) c2[p(logits)]++;
    expect(c2[2]).toBe(0);
    expect(c2[0] / 20000).toBeCloseTo(2 / 3, 1);
  });
});
