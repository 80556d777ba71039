// A stored xKV prefix, restored from the filesystem and from Redis, decodes exactly the tokens that
// the same compressed cache decodes in-process (stories260K, and rulermini-19m where present); a
// shorter prefix cut from a longer stored one decodes exactly as that cache cut in-process.
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStrategy, cutCachePrefix, selectBackend, type CompressedCache, type Strategy } from '@kvpack/core';
import '@kvpack/xkv';
import { LlamaModel, Session, disposeLlamaWeights, loadModel } from '@kvpack/models';
import { FileBackend, PrefixStore, RedisBackend, type StoreBackend } from './index.js';
import { rng } from './testing/payload.js';
import { SKIP_MESSAGE, findBinary, startServer, type TestServer } from './testing/servers.js';

const MODELS_DIR = process.env.KVPACK_MODELS_DIR ?? resolve(fileURLToPath(new URL('../../../', import.meta.url)), '..', 'shared', 'models');
const MODELS = [
  { name: 'stories260K', path: process.env.KVPACK_MODELS_DIR ? join(MODELS_DIR, 'stories260K', 'stories260K_q80.bin') : resolve(fileURLToPath(new URL('../../../', import.meta.url)), 'models', 'stories260K', 'stories260K_q80.bin'), layersPerGroup: 4, rankK: 8, rankV: 12, cut: true },
  { name: 'rulermini-19m', path: join(MODELS_DIR, 'rulermini-19m'), layersPerGroup: 4, rankK: 8, rankV: 12, cut: false },
];
const REDIS = findBinary('redis-server') ?? findBinary('valkey-server');
if (!REDIS) console.log(SKIP_MESSAGE('redis-server (or valkey-server)') + ' (Redis half of the restore test)');
for (const m of MODELS) if (!existsSync(m.path)) console.log(`SKIPPED: ${m.name} is not in ${MODELS_DIR}; its store restore test did not run`);

const C = 32;
const PREFIX = 4 * C;
const TAIL = 5;
const NEW = 12;

let dir: string;
let server: TestServer | undefined;
beforeAll(async () => {
  await selectBackend('wasm');
  dir = mkdtempSync(join(tmpdir(), 'kvpack-restore-'));
  if (REDIS) server = await startServer(REDIS);
});
afterAll(async () => {
  await server?.stop();
  rmSync(dir, { recursive: true, force: true });
});

/** Greedy tokens streamed by a session. */
async function take(s: Session, n: number): Promise<number[]> {
  const out: number[] = [];
  for await (const t of s.generate({ maxTokens: n, sampling: 'greedy' })) out.push(t);
  return out;
}

/**
 * A session resumed over `cache` (which it takes over) at the `covered` tokens it holds: the tail is
 * fed in one step (its logits rows read back), then NEW greedy tokens are generated.
 */
async function continueFrom(model: LlamaModel, cache: CompressedCache, covered: number[], tail: number[]) {
  const s = await Session.resume(model, cache, { tokens: covered });
  try {
    expect(s.position).toBe(covered.length);
    const step = await s.step(tail);
    return { logits: step.data, ids: await take(s, NEW) };
  } finally {
    s.dispose();
  }
}

/** The model's prefill of `prompt`, compressed with `strategy` by a session; the caller disposes the cache. */
async function compressPrompt(model: LlamaModel, strategy: Strategy, prompt: number[]): Promise<CompressedCache> {
  const s = await Session.start(model, { strategy });
  await s.prefill(prompt);
  await s.compress();
  return s.detach();
}

function openStores(name: string, fingerprint: string, strategy: Strategy): [string, PrefixStore][] {
  const backends: [string, StoreBackend][] = [['file', new FileBackend(join(dir, name), { durable: false })]];
  if (server) backends.push(['redis', new RedisBackend({ nodes: [{ host: '127.0.0.1', port: server.port }], keyPrefix: `kvpack-${name}` })]);
  return backends.map(([b, backend]) => [b, new PrefixStore({ backend, model: fingerprint, strategy, chunkTokens: C })]);
}

const same = (a: Float32Array, b: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));

for (const m of MODELS) {
  describe.skipIf(!existsSync(m.path))(`restoring a stored xKV prefix: ${m.name}`, () => {
    let model: LlamaModel;
    let weights: Awaited<ReturnType<typeof loadModel>>['weights'];
    let start: number;
    beforeAll(async () => {
      weights = (await loadModel(m.path)).weights;
      model = new LlamaModel(weights);
      await model.fingerprint();
      start = tf.memory().numTensors;
    });
    afterAll(() => {
      expect(tf.memory().numTensors).toBe(start);
      disposeLlamaWeights(weights);
    });

    it('decodes exactly the tokens of the same compressed cache held in-process (file and Redis backends)', async () => {
      const r = rng(7);
      const ids = Array.from({ length: PREFIX + TAIL }, () => 1 + Math.floor(r() * (model.config.vocabSize - 1)));
      const strategy = createStrategy({ name: 'xkv', options: { layersPerGroup: m.layersPerGroup, rankK: m.rankK, rankV: m.rankV } });
      const held = await compressPrompt(model, strategy, ids.slice(0, PREFIX));
      const stores = openStores(`${m.name}-exact`, await model.fingerprint(), strategy);
      for (const [, s] of stores) await s.put(ids.slice(0, PREFIX), held); // before the in-process decode appends to it
      const want = await continueFrom(model, held, ids.slice(0, PREFIX), ids.slice(PREFIX));
      for (const [name, s] of stores) {
        // The whole sequence is asked for, less one token to prefill: the 4-chunk prefix is found.
        const got = await s.restore(ids, { maxTokens: ids.length - 1 });
        expect(got?.tokens, name).toBe(PREFIX);
        expect(got!.cutFrom, name).toBeUndefined();
        expect(got!.cache.strategy).toBe('xkv');
        const have = await continueFrom(model, got!.cache, ids.slice(0, PREFIX), ids.slice(PREFIX));
        expect(have.ids, name).toEqual(want.ids);
        // Not only the argmax: the logits are the same numbers (the stored bits are the held bits).
        expect(same(have.logits, want.logits), name).toBe(true);
        await s.backend.close();
      }
    });

    it.skipIf(!m.cut)('serves a shorter prefix cut from a longer stored one, decoding exactly as that cache cut in-process (file and Redis)', async () => {
      const r = rng(11);
      const draw = (n: number) => Array.from({ length: n }, () => 1 + Math.floor(r() * (model.config.vocabSize - 1)));
      const ids = draw(PREFIX + TAIL);
      const strategy = createStrategy({ name: 'xkv', options: { layersPerGroup: m.layersPerGroup, rankK: m.rankK, rankV: m.rankV } });
      const held = await compressPrompt(model, strategy, ids.slice(0, PREFIX));
      const stores = openStores(`${m.name}-cut`, await model.fingerprint(), strategy);
      for (const [name, s] of stores) {
        const put = await s.put(ids.slice(0, PREFIX), held);
        expect(put.links, name).toBe(3); // boundaries 1, 2 and 3 chunks link to the 4-chunk record
      }
      // Two queries with no record of their own: one that leaves the stored sequence after 2 chunks,
      // and the stored sequence itself with room for only 3 chunks.
      const queries = [
        { tokens: [...ids.slice(0, 2 * C), ...draw(C + TAIL)], maxTokens: undefined, cut: 2 * C },
        { tokens: ids, maxTokens: 3 * C + TAIL, cut: 3 * C },
      ];
      try {
        for (const q of queries) {
          const cut = await cutCachePrefix(held, q.cut);
          const want = await continueFrom(model, cut, q.tokens.slice(0, q.cut), q.tokens.slice(q.cut, q.cut + TAIL));
          for (const [name, s] of stores) {
            const got = await s.restore(q.tokens, q.maxTokens === undefined ? {} : { maxTokens: q.maxTokens });
            expect(got?.tokens, name).toBe(q.cut);
            expect(got!.cutFrom, name).toBe(PREFIX);
            expect(got!.cache.prefillLength).toBe(q.cut);
            const have = await continueFrom(model, got!.cache, q.tokens.slice(0, q.cut), q.tokens.slice(q.cut, q.cut + TAIL));
            expect(have.ids, `${name} ${q.cut}`).toEqual(want.ids);
            expect(same(have.logits, want.logits), `${name} ${q.cut}`).toBe(true);
            // Without cutting, the same query finds nothing (no record is stored at these boundaries).
            expect(await s.restore(q.tokens, { ...(q.maxTokens === undefined ? {} : { maxTokens: q.maxTokens }), cut: false }), name).toBeNull();
          }
        }
        for (const [name, s] of stores) expect(s.stats(), name).toMatchObject({ cutHits: 2, hits: 2, rejected: 0, links: 3 });
      } finally {
        held.dispose();
        for (const [, s] of stores) await s.backend.close();
      }
    });
  });
}
