import { readFileSync } from 'node:fs';
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KvpackError, denseStrategy, disposeKVCache, selectBackend } from '@kvpack/core';
import { loadLlama2cCheckpoint } from '../llama2c/index.js';
import { LlamaModel, Session, cachePosition } from './index.js';
import { HAVE_STORIES, SKIP_STORIES, STORIES_BIN, maxAbsDiff, readOracle, readStoriesRef, refForward, type RefModel } from './reference.testutil.js';

beforeAll(async () => {
  await selectBackend('wasm');
});

async function codeOf(p: Promise<unknown>): Promise<string> {
  const e = await p.then(
    () => undefined,
    (x) => x,
  );
  expect(e).toBeInstanceOf(KvpackError);
  return (e as KvpackError).code;
}

/** Collects a session's streamed tokens. */
async function take(s: Session, maxTokens: number): Promise<number[]> {
  const out: number[] = [];
  for await (const t of s.generate({ maxTokens, sampling: 'greedy' })) out.push(t);
  return out;
}

describe.skipIf(!HAVE_STORIES)(`generation sessions on stories260K${SKIP_STORIES}`, () => {
  let model: LlamaModel;
  let ref: RefModel;
  let ids: number[];
  let start: number;
  beforeAll(async () => {
    model = new LlamaModel(await loadLlama2cCheckpoint(STORIES_BIN));
    ref = readStoriesRef(readFileSync(STORIES_BIN));
    ids = readOracle().greedy_ids;
    await model.fingerprint();
    start = tf.memory().numTensors;
  });
  afterAll(() => {
    // Every session, cache and error path below freed what it made.
    expect(tf.memory().numTensors).toBe(start);
    model?.dispose();
  });

  it('streams what LlamaModel.generate returns; n then m tokens equal n + m', async () => {
    const prompt = ids.slice(0, 40);
    const want = await model.generate(prompt, { maxNewTokens: 24 });
    const s = await Session.start(model);
    await s.prefill(prompt);
    const a = await take(s, 10);
    const b = await take(s, 14);
    expect([...a, ...b]).toEqual(want.ids);
    // The cache covers the prompt and the fed tokens; the last one chosen is pending.
    expect(s.tokens).toEqual([...prompt, ...want.ids.slice(0, 23)]);
    expect(s.pendingTokens).toEqual([want.ids[23]]);
    expect(s.position).toBe(63);
    expect(cachePosition(s.cache)).toBe(63);
    s.dispose();
  });

  it('save → restore (in-memory bytes) continues with exactly the in-process tokens (dense float32 and float16)', async () => {
    for (const storage of ['float32', 'float16'] as const) {
      const prompt = ids.slice(0, 64);
      const live = await Session.start(model, { strategy: 'dense', options: { storage } });
      await live.prefill(prompt);
      const first = await take(live, 12);
      const bytes = live.cache.serialize();
      const saved = { tokens: [...live.tokens!], pending: [...live.pendingTokens] };
      const inProcess = await take(live, 20);
      live.dispose();

      const restored = await Session.resume(model, bytes, { tokens: saved.tokens, remainingTokens: saved.pending });
      expect(restored.tokens).toEqual([...prompt, ...first]);
      expect(await take(restored, 20)).toEqual(inProcess);
      restored.dispose();
    }
  });

  it('a restored prefix + the remaining tokens gives the float64 forward of the whole sequence (dense float32)', async () => {
    const P = ids.slice(0, 48);
    const R = ids.slice(48, 64);
    const want = refForward(ref, [...P, ...R]).logits; // float64, independent of tfjs
    const s0 = await Session.start(model);
    await s0.prefill(P);
    const bytes = (await s0.compress()).serialize();
    s0.dispose();
    const s = await Session.resume(model, bytes, { tokens: P });
    expect(s.position).toBe(48);
    const { data, rows, vocab } = await s.step(R);
    expect(rows).toBe(16);
    // Same tolerance as the prefill against the float64 forward (llama.test.ts): float32 rounding only.
    expect(maxAbsDiff(data, Float64Array.from(want.slice(48).flatMap((r) => Array.from(r))))).toBeLessThan(2e-4);
    expect(vocab).toBe(512);
    // remainingTokens on resume: the same last row.
    const s2 = await Session.resume(model, bytes, { remainingTokens: R });
    expect(maxAbsDiff(s2.nextLogits!, want[63])).toBeLessThan(2e-4);
    expect(s2.tokens).toBeUndefined();
    s.dispose();
    s2.dispose();
  });

  it('LlamaModel.generate takes a restored prefix and returns the cache it ends with', async () => {
    const P = ids.slice(0, 30);
    const all = ids.slice(0, 40);
    const want = await model.generate(all, { maxNewTokens: 8, returnCache: true });
    const s = await Session.start(model);
    await s.prefill(P);
    const restored = (await Session.resume(model, (await s.compress()).serialize())).detach();
    s.dispose();
    const got = await model.generate(all.slice(30), { maxNewTokens: 8, cache: restored, returnCache: true });
    expect(got.ids).toEqual(want.ids);
    expect(got.compressedCache).toBe(restored);
    expect(cachePosition(restored)).toBe(40 + 7);
    expect(want.compressedCache!.tokenCount(0)).toBe(47);
    restored.dispose();
    want.compressedCache!.dispose();
  });

  it('refuses a cache of another model, token counts that disagree, and generating with nothing pending', async () => {
    const w = await loadLlama2cCheckpoint(STORIES_BIN);
    const old = w.finalNorm;
    w.finalNorm = tf.tidy(() => tf.add(old, 1e-3)) as tf.Tensor1D;
    old.dispose();
    const other = new LlamaModel(w);
    const s = await Session.start(model, { strategy: denseStrategy({ storage: 'float16' }) });
    await s.prefill(ids.slice(0, 20));
    const bytes = (await s.compress()).serialize();
    expect(await codeOf(Session.resume(other, bytes))).toBe('model');
    // A cache object of this model, handed to a session of the other one: refused and freed.
    const c = (await Session.resume(model, bytes)).detach();
    const c2 = (await Session.resume(model, bytes)).detach();
    expect(await codeOf(other.generate([1], { maxNewTokens: 1, cache: c2 }))).toBe('model');
    c2.dispose();
    expect(await codeOf(Session.resume(other, c))).toBe('model');
    expect(await codeOf(Session.resume(model, bytes, { tokens: ids.slice(0, 19) }))).toBe('shape');
    const bare = await Session.resume(model, bytes);
    expect(await codeOf(take(bare, 1))).toBe('config');
    bare.dispose();
    expect(await codeOf(Session.start(model, { strategy: 'no-such-strategy' }))).toBe('unknown-strategy');
    const empty = await Session.start(model);
    expect(await codeOf(empty.compress())).toBe('config');
    expect(() => empty.cache).toThrow(KvpackError);
    empty.dispose();
    expect(await codeOf(s.prefill([512]))).toBe('shape');
    s.dispose();
    other.dispose();
    // Prefill before compress replaces the uncompressed prompt, and disposal frees it.
    const twice = await Session.start(model);
    await twice.prefill(ids.slice(0, 5));
    await twice.prefill(ids.slice(5, 9));
    expect(twice.tokens).toEqual(ids.slice(0, 9));
    const { cache, logits } = await model.prefill(ids.slice(0, 8));
    logits.dispose();
    const exact = await denseStrategy({ storage: 'float32' }).compress(cache);
    disposeKVCache(cache);
    // The same row through an exact cache of 8 tokens and one decode step (float32 rounding apart).
    expect(maxAbsDiff(twice.nextLogits!, (await new Session(model, exact, 8).step([ids[8]])).data)).toBeLessThan(1e-4);
    exact.dispose();
    twice.dispose();
  });
});
