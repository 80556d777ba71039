import { createHash } from 'node:crypto';
import { copyFileSync, mkdtempSync, readFileSync, readdirSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KvpackError, createStrategy, selectBackend, type KVCache } from '@kvpack/core';
import { FileBackend, PrefixStore, RedisBackend, chunkKeys, collectGarbage, inspectStore, makeNamespace, openBackend, readStoredCache, type StoreWarning } from './index.js';
import { TEST_MODEL, TEST_STRATEGY, isPayloadOf, loadDocs, prefixPayload, rng } from './testing/payload.js';
import { spawn } from 'node:child_process';
import { bundleLoadWorker } from './testing/bundle-worker.js';

let root: string;
beforeAll(async () => {
  await selectBackend('cpu');
  root = mkdtempSync(join(tmpdir(), 'kvpack-store-'));
});
afterAll(() => rmSync(root, { recursive: true, force: true }));

const C = 16;
const seq = (n: number, seed: number) => {
  const r = rng(seed);
  return Array.from({ length: n }, () => Math.floor(r() * 500));
};
let nDir = 0;
function fileStore(extra: { onWarning?: (w: StoreWarning) => void; ttlSeconds?: number; model?: string; strategy?: { name: string; options: unknown } } = {}) {
  const dir = join(root, `s${nDir++}`);
  const backend = new FileBackend(dir, { durable: false });
  const store = new PrefixStore({ backend, model: extra.model ?? TEST_MODEL, strategy: extra.strategy ?? TEST_STRATEGY, chunkTokens: C, ...extra });
  return { dir, backend, store };
}
function recordFile(dir: string, ns: string, key: string, ext = '.kvr') {
  return join(dir, ns, key.slice(0, 2), key + ext);
}

describe('chunk keys and namespaces', () => {
  it('chains sha256(parent ‖ chunk ids as uint32 LE) from the namespace id', () => {
    const ns = makeNamespace(TEST_MODEL, 'xkv', { rankK: 8, layersPerGroup: 4 }, C);
    const t = seq(3 * C + 5, 1);
    const keys = chunkKeys(ns, t);
    expect(keys).toHaveLength(3);
    let parent = Buffer.from(ns.id, 'hex');
    for (let i = 0; i < 3; i++) {
      const ids = Buffer.alloc(4 * C);
      for (let j = 0; j < C; j++) ids.writeUInt32LE(t[i * C + j], 4 * j);
      parent = createHash('sha256').update(Buffer.concat([parent, ids])).digest();
      expect(keys[i]).toBe(parent.toString('hex'));
    }
    // A prefix shares the keys of its chunks; a change in chunk 1 changes keys 1 and 2 only.
    expect(chunkKeys(ns, t.slice(0, 2 * C))).toEqual(keys.slice(0, 2));
    const u = [...t];
    u[C + 3] += 1;
    const k2 = chunkKeys(ns, u);
    expect(k2[0]).toBe(keys[0]);
    expect(k2[1]).not.toBe(keys[1]);
    expect(k2[2]).not.toBe(keys[2]);
  });

  it('makes the namespace of model + strategy + resolved options (key order free) + chunk size', () => {
    const a = makeNamespace(TEST_MODEL, 'xkv', { rankK: 8, rankV: 12, sub: { a: 1, b: 2 } }, C);
    expect(makeNamespace(TEST_MODEL, 'xkv', { sub: { b: 2, a: 1 }, rankV: 12, rankK: 8 }, C).id).toBe(a.id);
    const others = [
      makeNamespace('sha256:' + 'cd'.repeat(32), 'xkv', { rankK: 8, rankV: 12, sub: { a: 1, b: 2 } }, C),
      makeNamespace(TEST_MODEL, 'svd', { rankK: 8, rankV: 12, sub: { a: 1, b: 2 } }, C),
      makeNamespace(TEST_MODEL, 'xkv', { rankK: 16, rankV: 12, sub: { a: 1, b: 2 } }, C),
      makeNamespace(TEST_MODEL, 'xkv', { rankK: 8, rankV: 12, sub: { a: 1, b: 2 } }, 2 * C),
    ];
    const t = seq(2 * C, 2);
    for (const o of others) {
      expect(o.id).not.toBe(a.id);
      expect(chunkKeys(o, t)[0]).not.toBe(chunkKeys(a, t)[0]);
    }
    expect(() => makeNamespace('', 'xkv', {}, C)).toThrow(KvpackError);
    expect(() => makeNamespace(TEST_MODEL, 'xkv', {}, 0)).toThrow(/chunkTokens/);
    expect(() => chunkKeys(a, [1, -2])).toThrow(/token id -2 at index 1/);
  });
});

describe('PrefixStore on the filesystem', () => {
  it('returns the longest stored prefix, at chunk boundaries, and never another namespace’s', async () => {
    const { store, backend } = fileStore();
    const t = seq(5 * C + 7, 3);
    await store.put(t.slice(0, C), prefixPayload(t.slice(0, C)));
    const put3 = await store.put(t.slice(0, 3 * C), prefixPayload(t.slice(0, 3 * C)));
    expect(put3.recordBytes).toBeGreaterThan(prefixPayload(t.slice(0, 3 * C)).length);
    const hit = await store.lookup(t);
    expect(hit?.tokens).toBe(3 * C);
    expect(isPayloadOf(hit!.cache, t, 3 * C)).toBe(true);
    expect((await store.lookup(t, { maxTokens: 3 * C - 1 }))?.tokens).toBe(C);
    const u = [...t];
    u[2 * C] ^= 1; // chunk 2 differs: only the first chunk's prefix is shared
    const h2 = await store.lookup(u);
    expect(h2?.tokens).toBe(C);
    expect(isPayloadOf(h2!.cache, t, C)).toBe(true);
    expect(await store.lookup(t.slice(0, C - 1))).toBeNull();
    // Another model, another strategy, other options: other keys, so a miss by construction.
    const other = [
      new PrefixStore({ backend, model: 'sha256:' + 'cd'.repeat(32), strategy: TEST_STRATEGY, chunkTokens: C }),
      new PrefixStore({ backend, model: TEST_MODEL, strategy: { name: 'other', options: TEST_STRATEGY.options }, chunkTokens: C }),
      new PrefixStore({ backend, model: TEST_MODEL, strategy: { name: TEST_STRATEGY.name, options: { level: 2 } }, chunkTokens: C }),
    ];
    for (const s of other) expect(await s.lookup(t)).toBeNull();
    expect(store.stats()).toMatchObject({ hits: 3, misses: 1, puts: 2 });
  });

  it('refuses, with a clear error, a cache of another model, strategy or options, and unaligned prefixes', async () => {
    const { store } = fileStore();
    const t = seq(2 * C, 4);
    await expect(store.put(t, prefixPayload(t, 64, 'sha256:' + 'cd'.repeat(32)))).rejects.toThrow(/made from model sha256:cdcd.*namespace is for model/);
    const { store: s2 } = fileStore({ strategy: { name: 'xkv', options: TEST_STRATEGY.options } });
    await expect(s2.put(t, prefixPayload(t))).rejects.toThrow(/prefix-test cache, but this store's namespace is for xkv caches/);
    const { store: s3 } = fileStore({ strategy: { name: TEST_STRATEGY.name, options: { level: 2 } } });
    await expect(s3.put(t, prefixPayload(t))).rejects.toMatchObject({ code: 'model' });
    await expect(store.put(t.slice(0, C + 1), prefixPayload(t.slice(0, C + 1)))).rejects.toThrow(/not a positive multiple of the chunk size 16; store the aligned prefix of 16 tokens/);
    await expect(store.put(t, new Uint8Array(40))).rejects.toThrow(KvpackError);
  });

  it('reports a flipped byte, a truncated, a foreign record and a bad manifest once each, as misses', async () => {
    const warnings: StoreWarning[] = [];
    const { store, dir } = fileStore({ onWarning: (w) => warnings.push(w) });
    const ns = store.namespace.id;
    const t = seq(4 * C, 5);
    const keys = store.keys(t);
    for (let k = 1; k <= 4; k++) await store.put(t.slice(0, k * C), prefixPayload(t.slice(0, k * C)));
    // 4 chunks: flip one byte of the payload (its tensor data: no header check would see it).
    const f4 = recordFile(dir, ns, keys[3]);
    const b = readFileSync(f4);
    b[b.length - 10] ^= 0x40;
    writeFileSync(f4, b);
    for (let i = 0; i < 2; i++) {
      const hit = await store.lookup(t);
      expect(hit?.tokens).toBe(3 * C);
      expect(isPayloadOf(hit!.cache, t, 3 * C)).toBe(true);
    }
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toMatchObject({ reason: 'corrupt', key: keys[3] });
    expect(warnings[0].message).toMatch(/CRC-32 mismatch/);
    // 3 chunks: truncated (length checked against the manifest).
    const f3 = recordFile(dir, ns, keys[2]);
    writeFileSync(f3, readFileSync(f3).subarray(0, 100));
    expect((await store.lookup(t))?.tokens).toBe(2 * C);
    expect(warnings.at(-1)).toMatchObject({ reason: 'truncated', key: keys[2] });
    // 2 chunks: another prefix's record and manifest copied under this key.
    copyFileSync(recordFile(dir, ns, keys[0]), recordFile(dir, ns, keys[1]));
    copyFileSync(recordFile(dir, ns, keys[0], '.json'), recordFile(dir, ns, keys[1], '.json'));
    expect((await store.lookup(t))?.tokens).toBe(C);
    expect(warnings.at(-1)).toMatchObject({ reason: 'foreign', key: keys[1] });
    // 1 chunk: a manifest that is not JSON.
    writeFileSync(recordFile(dir, ns, keys[0], '.json'), '{"v":1,');
    expect(await store.lookup(t)).toBeNull();
    expect(warnings.at(-1)).toMatchObject({ reason: 'corrupt', key: keys[0] });
    expect(warnings).toHaveLength(4);
    await store.lookup(t);
    expect(warnings).toHaveLength(4); // once each
    expect(store.stats().rejected).toBe(1 + 1 + 2 + 3 + 4 + 4); // every lookup counts what it passed over
    // The admin view sees the same four, and gc removes them.
    const seen = [];
    for await (const e of inspectStore(store.backend)) seen.push(e.status);
    expect(seen.sort()).toEqual(['corrupt', 'corrupt', 'corrupt', 'corrupt']);
    const gc = await collectGarbage(store.backend);
    expect(gc).toMatchObject({ corrupt: 4, kept: 0 });
    expect(await store.lookup(t)).toBeNull();
  });

  it('restore() reports a record that checks out but does not restore, and falls back to a shorter prefix', async () => {
    const warnings: StoreWarning[] = [];
    const { store } = fileStore({ onWarning: (w) => warnings.push(w) });
    const t = seq(2 * C, 11);
    await store.put(t, prefixPayload(t)); // a container of an unregistered strategy: it cannot be restored
    expect((await store.lookup(t))?.tokens).toBe(2 * C);
    expect(await store.restore(t)).toBeNull();
    expect(warnings).toHaveLength(1);
    expect(warnings[0].message).toMatch(/prefix-test/);
    expect(store.stats()).toMatchObject({ lookups: 2, hits: 1, misses: 1 });
  });

  it('honours TTLs through the manifest, and gc removes expired prefixes, orphans and temporary files', async () => {
    const { store, dir, backend } = fileStore({ ttlSeconds: 0.05 });
    const t = seq(2 * C, 6);
    await store.put(t.slice(0, C), prefixPayload(t.slice(0, C)));
    expect((await store.lookup(t))?.tokens).toBe(C);
    await new Promise((r) => setTimeout(r, 80));
    expect(await store.lookup(t)).toBeNull();
    expect(store.stats().evicted).toBe(1);
    const { store: live } = fileStore();
    const s2 = new PrefixStore({ backend, model: TEST_MODEL, strategy: TEST_STRATEGY, chunkTokens: C });
    void live;
    await s2.put(t, prefixPayload(t));
    await s2.put(t.slice(0, C).concat(seq(C, 7)), prefixPayload(t.slice(0, C).concat(seq(C, 7))));
    // An evicted record under its manifest, and an old record whose manifest never came.
    const [, k2] = s2.keys(t);
    rmSync(recordFile(dir, s2.namespace.id, k2));
    expect(await s2.lookup(t)).toBeNull(); // the 1-chunk prefix expired, the 2-chunk one lost its record
    const other = s2.keys(t.slice(0, C).concat(seq(C, 7)))[1];
    rmSync(recordFile(dir, s2.namespace.id, other, '.json'));
    const tmp = join(dir, s2.namespace.id, 'namespace.json.tmp-1-abc');
    writeFileSync(tmp, 'partial');
    utimesSync(tmp, new Date(Date.now() - 120_000), new Date(Date.now() - 120_000));
    const young = await collectGarbage(backend);
    expect(young).toMatchObject({ expired: 1, manifestsWithoutRecord: 1, recordsWithoutManifest: 0, temporaryFiles: 1, kept: 1 });
    const old = await collectGarbage(backend, { graceMs: 0 });
    expect(old).toMatchObject({ recordsWithoutManifest: 1, kept: 0 });
    expect(readdirSync(join(dir, s2.namespace.id)).filter((f) => f.includes('.tmp-'))).toEqual([]);
  });

  it('stores and restores a real compressed cache exactly (dense), with readStoredCache for the CLI', async () => {
    const start = tf.memory().numTensors;
    const layout = { nLayers: 2, nHeads: 2, nKvHeads: 1, headDim: 4 };
    const T = 2 * C;
    const r = rng(9);
    const mk = () => tf.tensor3d(Float32Array.from({ length: T * 4 }, () => r() - 0.5), [T, 1, 4]);
    const kv: KVCache = { layout, rope: { theta: 10000, layout: 'interleaved' }, keys: [mk(), mk()], values: [mk(), mk()], model: TEST_MODEL };
    const strategy = createStrategy({ name: 'dense' });
    const cache = await strategy.compress(kv);
    const { store, backend } = fileStore({ strategy });
    const t = seq(T + 3, 10);
    await expect(store.put(t.slice(0, C), cache)).rejects.toThrow(/holds 32 tokens/);
    await store.put(t.slice(0, T), cache);
    const got = await store.restore(t);
    expect(got?.tokens).toBe(T);
    expect(store.stats()).toMatchObject({ lookups: 1, hits: 1, misses: 0, hitTokens: T, lookupTokens: T });
    for (let l = 0; l < 2; l++) {
      const [a, b] = [cache.keys(l), got!.cache.keys(l)];
      expect(Array.from(b.dataSync())).toEqual(Array.from(a.dataSync()));
      tf.dispose([a, b]);
    }
    const stored = await readStoredCache(backend, store.keys(t)[1].slice(0, 10));
    expect(Buffer.from(stored.cache).equals(Buffer.from(cache.serialize()))).toBe(true);
    await expect(readStoredCache(backend, 'zz')).rejects.toThrow(/at least 8 of its 64 hex digits/);
    got!.cache.dispose();
    cache.dispose();
    tf.dispose([...kv.keys, ...kv.values]);
    expect(tf.memory().numTensors).toBe(start);
  });
});

describe('a writer SIGKILLed on the filesystem', () => {
  it('leaves only whole records: every lookup is a right hit or a miss, gc clears the leftovers', async () => {
    const worker = await bundleLoadWorker();
    const dir = join(root, 'killed');
    const p = spawn(process.execPath, [worker.file, `file://${dir}`, '0', '1000000', String(C)], { stdio: 'ignore' });
    // Kill once some prefixes are written (the worker writes until killed).
    const store = new PrefixStore({ backend: new FileBackend(dir), model: TEST_MODEL, strategy: TEST_STRATEGY, chunkTokens: C });
    const docs = loadDocs(C);
    const deadline = Date.now() + 30_000;
    while (Date.now() < deadline) {
      let n = 0;
      for await (const e of inspectStore(store.backend, { verify: false })) if (e.status === 'ok') n++;
      if (n >= 12) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    await new Promise<void>((resolve) => {
      p.once('exit', () => resolve());
      p.kill('SIGKILL');
    });
    worker.remove();
    let hits = 0, misses = 0;
    for (const d of docs)
      for (let k = 1; k <= 8; k++) {
        const q = d.slice(0, k * C).concat([7]);
        const h = await store.lookup(q);
        if (!h) misses++;
        else {
          expect(isPayloadOf(h.cache, q, h.tokens, 4096)).toBe(true);
          hits++;
        }
      }
    expect(hits).toBeGreaterThan(0);
    expect(store.stats().rejected).toBe(0);
    const statuses = new Set<string>();
    for await (const e of inspectStore(store.backend)) statuses.add(e.status);
    expect([...statuses].filter((s) => s !== 'ok' && s !== 'record-without-manifest')).toEqual([]);
    await collectGarbage(store.backend, { graceMs: 0 });
    const left: string[] = [];
    for await (const e of inspectStore(store.backend)) left.push(e.status);
    expect(left.every((s) => s === 'ok')).toBe(true);
    console.log(`filesystem writer SIGKILLed: ${hits} hits, ${misses} misses of ${hits + misses} lookups, 0 wrong; ${left.length} whole prefixes left after gc`);
  });
});

describe('openBackend', () => {
  it('parses file and redis URLs', async () => {
    expect((openBackend(`file://${root}/x`) as FileBackend).root).toBe(join(root, 'x'));
    expect((openBackend('rel/dir') as FileBackend).root).toBe(join(process.cwd(), 'rel/dir'));
    const r = openBackend('redis://user:secret@127.0.0.1:1/3?prefix=kv.test&timeout=200') as RedisBackend;
    expect(r.options).toMatchObject({ nodes: [{ host: '127.0.0.1', port: 1 }], db: 3, username: 'user', password: 'secret', keyPrefix: 'kv.test', commandTimeoutMs: 200, cluster: false });
    expect(r.location).not.toMatch(/secret/);
    r.client.disconnect();
    const c = openBackend('redis+cluster://127.0.0.1:1,127.0.0.1:2') as RedisBackend;
    expect(c.options).toMatchObject({ cluster: true, nodes: [{ port: 1 }, { port: 2 }] });
    c.client.disconnect();
    expect(() => openBackend('s3://bucket/x')).toThrow(/scheme "s3:" is not supported/);
  });
});
