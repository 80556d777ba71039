// A stored xKV prefix, restored from the filesystem and from Redis, decodes exactly the tokens that
// the same compressed cache decodes in-process (stories260K, and rulermini-19m where present).
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStrategy, selectBackend, type CompressedCache } from '@kvpack/core';
import '@kvpack/xkv';
import { DecodeSession, LlamaModel, disposeLlamaWeights, loadModel } from '@kvpack/models';
import { FileBackend, PrefixStore, RedisBackend, type StoreBackend } from './index.js';
import { rng } from './testing/payload.js';
import { SKIP_MESSAGE, findBinary, startServer, type TestServer } from './testing/servers.js';

const MODELS_DIR = process.env.KVPACK_MODELS_DIR ?? resolve(fileURLToPath(new URL('../../../', import.meta.url)), '..', 'shared', 'models');
const MODELS = [
  { name: 'stories260K', path: join(MODELS_DIR, 'stories260K', 'stories260K_q80.bin'), layersPerGroup: 4, rankK: 8, rankV: 12 },
  { name: 'rulermini-19m', path: join(MODELS_DIR, 'rulermini-19m'), layersPerGroup: 4, rankK: 8, rankV: 12 },
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

/** Feeds the tail through the cache at PREFIX, then decodes NEW greedy tokens: the first step's logits and the ids. */
async function continueFrom(model: LlamaModel, cache: CompressedCache, tail: number[]) {
  const s = new DecodeSession(model, cache, PREFIX);
  const step = await s.step(tail);
  const gen = await s.greedy(NEW);
  return { logits: step.data, ids: gen.ids };
}

for (const m of MODELS) {
  describe.skipIf(!existsSync(m.path))(`restoring a stored xKV prefix: ${m.name}`, () => {
    it('decodes exactly the tokens of the same compressed cache held in-process (file and Redis backends)', async () => {
      const { weights } = await loadModel(m.path);
      const model = new LlamaModel(weights);
      const start = tf.memory().numTensors;
      const r = rng(7);
      const ids = Array.from({ length: PREFIX + TAIL }, () => 1 + Math.floor(r() * (model.config.vocabSize - 1)));
      const strategy = createStrategy({ name: 'xkv', options: { layersPerGroup: m.layersPerGroup, rankK: m.rankK, rankV: m.rankV } });
      const pre = await model.prefill(ids.slice(0, PREFIX), { logits: 'last' });
      const held = await strategy.compress(pre.cache);
      tf.dispose([pre.logits, ...pre.cache.keys, ...pre.cache.values]);
      const fingerprint = await model.fingerprint();
      const backends: [string, StoreBackend][] = [['file', new FileBackend(join(dir, m.name), { durable: false })]];
      if (server) backends.push(['redis', new RedisBackend({ nodes: [{ host: '127.0.0.1', port: server.port }] })]);
      const stores = backends.map(([name, backend]) => [name, new PrefixStore({ backend, model: fingerprint, strategy, chunkTokens: C })] as const);
      for (const [, s] of stores) await s.put(ids.slice(0, PREFIX), held); // before the in-process decode appends to it
      const want = await continueFrom(model, held, ids.slice(PREFIX));
      held.dispose();
      for (const [name, s] of stores) {
        // The whole sequence is asked for, less one token to prefill: the 4-chunk prefix is found.
        const got = await s.restore(ids, { maxTokens: ids.length - 1 });
        expect(got?.tokens, name).toBe(PREFIX);
        expect(got!.cache.strategy).toBe('xkv');
        const have = await continueFrom(model, got!.cache, ids.slice(PREFIX));
        got!.cache.dispose();
        expect(have.ids, name).toEqual(want.ids);
        // Not only the argmax: the logits are the same numbers (the stored bits are the held bits).
        expect(Buffer.from(have.logits.buffer).equals(Buffer.from(want.logits.buffer)), name).toBe(true);
        await s.backend.close();
      }
      expect(tf.memory().numTensors).toBe(start);
      disposeLlamaWeights(weights);
    });
  });
}
