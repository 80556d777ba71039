// Shorter prefixes served by cutting a longer stored record: link manifests, their checks, eviction and gc.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStrategy, cutCachePrefix, selectBackend, type KVCache } from '@kvpack/core';
import { FileBackend, PrefixStore, collectGarbage, encodeLinkManifest, inspectStore, type StoreWarning } from './index.js';
import { TEST_MODEL, rng } from './testing/payload.js';

const C = 4;
const layout = { nLayers: 2, nHeads: 2, nKvHeads: 1, headDim: 4 };
const F = layout.nKvHeads * layout.headDim;

let dir: string;
let start: number;
beforeAll(async () => {
  await selectBackend('wasm');
  dir = mkdtempSync(join(tmpdir(), 'kvpack-links-'));
  start = tf.memory().numTensors;
});
afterAll(() => {
  expect(tf.memory().numTensors).toBe(start);
  rmSync(dir, { recursive: true, force: true });
});

/** A prefill cache of T tokens whose values are known on the host (value of token t, layer l, channel c = 1000·l + 10·t + c). */
function kv(T: number): KVCache {
  const make = (l: number, off: number) => tf.tensor3d(Float32Array.from({ length: T * F }, (_, i) => off + 1000 * l + 10 * Math.floor(i / F) + (i % F)), [T, 1, F]);
  return {
    layout,
    rope: { theta: 10000, layout: 'interleaved' },
    keys: [0, 1].map((l) => make(l, 0.5)),
    values: [0, 1].map((l) => make(l, 0)),
    model: TEST_MODEL,
  };
}

describe('a prefix cut from a longer stored record', () => {
  it('links shorter boundaries, serves them cut, prefers records and shorter sources, refuses a link to a record that does not cover it', async () => {
    const strategy = createStrategy({ name: 'dense', options: { storage: 'float32' } });
    const warnings: StoreWarning[] = [];
    const store = new PrefixStore({ backend: new FileBackend(join(dir, 'a'), { durable: false }), model: TEST_MODEL, strategy, chunkTokens: C, onWarning: (w) => warnings.push(w) });
    expect(store.cuttable()).toBe(true);
    const r = rng(3);
    const ids = Array.from({ length: 4 * C }, () => Math.floor(r() * 500));
    const other = Array.from({ length: 3 * C }, () => 600 + Math.floor(r() * 500));
    const src = kv(4 * C);
    const c4 = await strategy.compress(src);
    expect((await store.put(ids, c4)).links).toBe(3);
    const keys = store.keys(ids);
    const statuses = new Map<string, string>();
    for await (const e of inspectStore(store.backend)) statuses.set(e.key, `${e.status}:${e.tokens}${e.link ? `→${e.link.slice(0, 8)}` : ''}`);
    expect(keys.map((k) => statuses.get(k))).toEqual([`link:${C}→${keys[3].slice(0, 8)}`, `link:${2 * C}→${keys[3].slice(0, 8)}`, `link:${3 * C}→${keys[3].slice(0, 8)}`, `ok:${4 * C}`]);

    // A query that leaves the sequence in chunk 3: the 2-chunk prefix, cut from the 4-chunk record.
    const q = [...ids.slice(0, 2 * C), ...other.slice(0, C + 1)];
    const hit = await store.restore(q);
    expect(hit).toMatchObject({ tokens: 2 * C, key: keys[1], cutFrom: 4 * C });
    expect(hit!.cache.prefillLength).toBe(2 * C);
    // The values are the stored rows [0, 2C) (float32: exactly the prefill's).
    const v1t = hit!.cache.values(1);
    const v1 = await v1t.data();
    v1t.dispose();
    expect(Array.from(v1)).toEqual(Array.from({ length: 2 * C * F }, (_, i) => 1000 + 10 * Math.floor(i / F) + (i % F)));
    hit!.cache.dispose();
    // lookup() returns bytes: only with cut: true does it hand out a longer record, saying so.
    expect(await store.lookup(q)).toBeNull();
    expect(await store.lookup(q, { cut: true })).toMatchObject({ tokens: 2 * C, source: { key: keys[3], tokens: 4 * C } });

    // A record of exactly 2 chunks replaces the link there and relinks chunk 0 to itself (a shorter
    // source to fetch); a 3-chunk one then writes no link (chunk 0 links to 2 chunks, chunk 1 is a record).
    const half = { ...src, keys: src.keys.map((k) => k.slice(0, 2 * C)), values: src.values.map((v) => v.slice(0, 2 * C)) };
    const c2 = await strategy.compress(half);
    tf.dispose([...half.keys, ...half.values]);
    expect((await store.put(ids.slice(0, 2 * C), c2)).links).toBe(1);
    const exact = await store.restore(q);
    expect(exact).toMatchObject({ tokens: 2 * C });
    expect(exact!.cutFrom).toBeUndefined();
    exact!.cache.dispose();
    const c3 = await cutCachePrefix(c4, 3 * C);
    expect((await store.put(ids.slice(0, 3 * C), c3)).links).toBe(0);
    c3.dispose();
    const one = await store.lookup([...ids.slice(0, C), 9999], { cut: true });
    expect(one?.source).toEqual({ key: keys[1], tokens: 2 * C });

    // A forged link: the boundary of another sequence pointing at this record, which does not cover it.
    const okeys = store.keys(other);
    await store.backend.put(
      store.namespace.id,
      okeys[1],
      'manifest',
      encodeLinkManifest({ v: 2, key: okeys[1], namespace: store.namespace.id, tokens: 2 * C, created: Date.now(), link: { key: keys[3], tokens: 4 * C, bytes: 1, crc: 0 } }),
    );
    expect(await store.restore(other)).toBeNull();
    expect(warnings.map((w) => w.reason)).toEqual(['foreign']);
    expect(warnings[0].message).toMatch(/does not cover prefix/);

    // The 4-chunk record evicted: the links to it are misses, and gc removes them.
    await store.backend.remove(store.namespace.id, keys[3]);
    const own = await store.restore([...ids.slice(0, 3 * C), 1, 2, 3, 4, 5]);
    expect(own).toMatchObject({ tokens: 3 * C }); // its own record
    own!.cache.dispose();
    const gc = await collectGarbage(store.backend);
    expect(gc).toMatchObject({ linksWithoutRecord: 1 }); // the forged link (chunk 0 links to the 2-chunk record)
    for (const c of [c4, c2]) c.dispose();
    (await store.restore(ids))?.cache.dispose();
    for (const t of [...src.keys, ...src.values]) t.dispose();
    expect(store.stats()).toMatchObject({ cutHits: 1, rejected: 1 });
    await store.backend.close();
  });
});
