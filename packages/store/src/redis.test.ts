// The store against real servers: redis-server and valkey-server on loopback ports, a three-master
// Redis Cluster, faults (SIGKILL mid-writes, a flipped byte, a stopped cluster node), maxmemory
// eviction, TTLs, and 8 processes of mixed load. Servers start once for the file.
import { spawn } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PrefixStore, RedisBackend, collectGarbage, inspectStore, openBackend, type StoreWarning } from './index.js';
import { TEST_MODEL, TEST_STRATEGY, isPayloadOf, prefixPayload, rng } from './testing/payload.js';
import { bundleLoadWorker } from './testing/bundle-worker.js';
import { SKIP_MESSAGE, findBinary, rawCommand, startCluster, startServer, type TestServer } from './testing/servers.js';

const REDIS = findBinary('redis-server');
const VALKEY = findBinary('valkey-server');
if (!REDIS) console.log(SKIP_MESSAGE('redis-server'));
if (!VALKEY) console.log(SKIP_MESSAGE('valkey-server'));

const C = 16;
const seq = (n: number, seed: number) => {
  const r = rng(seed);
  return Array.from({ length: n }, () => Math.floor(r() * 30000));
};
const servers: TestServer[] = [];
const backends: RedisBackend[] = [];
function storeAt(url: string, extra: { onWarning?: (w: StoreWarning) => void; ttlSeconds?: number } = {}) {
  const backend = openBackend(url) as RedisBackend;
  backends.push(backend);
  return new PrefixStore({ backend, model: TEST_MODEL, strategy: TEST_STRATEGY, chunkTokens: C, onWarning: () => {}, ...extra });
}
afterAll(async () => {
  await Promise.all(backends.map((b) => b.close()));
  await Promise.all(servers.map((s) => s.stop()));
});

/** Looks every prefix of `docs` up and checks each hit against an independent payload: returns [hits, misses]. */
async function checkAll(store: PrefixStore, docs: number[][], pad = 1024): Promise<{ hits: number; misses: number; wrong: number }> {
  let hits = 0, misses = 0, wrong = 0;
  for (const d of docs)
    for (let k = 1; k * C <= d.length; k++) {
      const q = d.slice(0, k * C);
      const hit = await store.lookup(q);
      if (!hit) misses++;
      else if (isPayloadOf(hit.cache, q, hit.tokens, pad)) hits++;
      else wrong++;
    }
  return { hits, misses, wrong };
}

for (const [name, bin] of [['redis-server', REDIS], ['valkey-server', VALKEY]] as const) {
  describe.skipIf(!bin)(`prefix store on ${name}`, () => {
    let server: TestServer;
    beforeAll(async () => {
      server = await startServer(bin!);
      servers.push(server);
    });

    it('finds the longest prefix; a flipped byte is reported once and a miss', async () => {
      const warnings: StoreWarning[] = [];
      const store = storeAt(server.url, { onWarning: (w) => warnings.push(w) });
      const t = seq(4 * C + 3, 1);
      await store.put(t.slice(0, C), prefixPayload(t.slice(0, C)));
      await store.put(t.slice(0, 3 * C), prefixPayload(t.slice(0, 3 * C)));
      const hit = await store.lookup(t);
      expect(hit?.tokens).toBe(3 * C);
      expect(isPayloadOf(hit!.cache, t, 3 * C)).toBe(true);
      // Flip one payload byte of the 3-chunk record in the server (SETRANGE).
      const key = store.keys(t)[2];
      const rk = `kvpack:${store.namespace.id}:{${key}}:r`;
      const client = (store.backend as RedisBackend).client;
      const len = await client.strlen(rk);
      const byte = (await client.getrangeBuffer(rk, len - 7, len - 7))[0];
      await client.setrange(rk, len - 7, Buffer.from([byte ^ 1]));
      for (let i = 0; i < 3; i++) {
        const h = await store.lookup(t);
        expect(h?.tokens).toBe(C);
        expect(isPayloadOf(h!.cache, t, C)).toBe(true);
      }
      expect(warnings).toHaveLength(1);
      expect(warnings[0]).toMatchObject({ reason: 'corrupt', key });
      const statuses: string[] = [];
      for await (const e of inspectStore(store.backend, { namespace: store.namespace.id })) statuses.push(e.status);
      expect(statuses.sort()).toEqual(['corrupt', 'ok']);
      expect(await collectGarbage(store.backend)).toMatchObject({ corrupt: 1, kept: 1 });
      expect(await store.backend.namespaces()).toEqual([store.namespace.id]);
    });

    it('honours TTLs (EX on record and manifest) and maxmemory eviction: hits are right, the rest are misses', async () => {
      const ttl = storeAt(server.url, { ttlSeconds: 1 });
      const t = seq(2 * C, 2);
      await ttl.put(t, prefixPayload(t));
      const client = (ttl.backend as RedisBackend).client;
      const [key] = ttl.keys(t).slice(-1);
      for (const p of ['r', 'm']) expect(await client.pttl(`kvpack:${ttl.namespace.id}:{${key}}:${p}`)).toBeGreaterThan(0);
      expect((await ttl.lookup(t))?.tokens).toBe(2 * C);
      await new Promise((r) => setTimeout(r, 1100));
      expect(await ttl.lookup(t)).toBeNull();

      await client.flushall();
      await client.config('SET', 'maxmemory', '2mb');
      await client.config('SET', 'maxmemory-policy', 'allkeys-random');
      try {
        const store = storeAt(server.url);
        const docs = Array.from({ length: 12 }, (_, i) => seq(12 * C, 100 + i));
        let putErrors = 0;
        for (const d of docs)
          for (let k = 1; k <= 12; k++) {
            const p = d.slice(0, k * C);
            await store.put(p, prefixPayload(p, 16 * 1024)).catch(() => putErrors++);
          }
        let hits = 0, misses = 0, wrong = 0;
        for (const d of docs)
          for (let k = 1; k <= 12; k++) {
            const q = d.slice(0, k * C);
            const h = await store.lookup(q, { maxTokens: k * C });
            if (!h) misses++;
            else if (isPayloadOf(h.cache, q, h.tokens, 16 * 1024)) hits++;
            else wrong++;
          }
        console.log(`${name} maxmemory 2mb allkeys-random: ${docs.length * 12} puts of ~17 KB (${putErrors} refused), lookups: ${hits} hits, ${misses} misses, ${wrong} wrong; evicted under a manifest: ${store.stats().evicted}`);
        expect(wrong).toBe(0);
        expect(misses).toBeGreaterThan(0); // eviction happened
        expect(hits).toBeGreaterThan(0);
        expect(store.stats().rejected).toBe(0);
      } finally {
        await client.config('SET', 'maxmemory', '0');
        await client.flushall();
      }
    });
  });
}

describe.skipIf(!REDIS)('faults and load on redis-server', () => {
  it('SIGKILL in the middle of writes, then a restart: every lookup is a right hit or a miss', async () => {
    const server = await startServer(REDIS!, { persistence: true });
    servers.push(server);
    const store = storeAt(server.url + '?timeout=500');
    const docs = Array.from({ length: 6 }, (_, i) => seq(10 * C, 200 + i));
    let killed: Promise<void> | undefined;
    const writes = (async () => {
      let ok = 0, failed = 0;
      const acknowledged: number[][] = [];
      for (let k = 1; k <= 10; k++)
        for (const d of docs) {
          const p = d.slice(0, k * C);
          // Not awaited: the kill lands while the next writes are in flight.
          if (ok === 8 && !killed) killed = server.kill('SIGKILL');
          await store.put(p, prefixPayload(p, 32 * 1024)).then(() => (ok++, acknowledged.push(p)), () => failed++);
        }
      return { ok, failed, acknowledged };
    })();
    const w = await writes;
    await killed;
    const during = await checkAll(store, docs, 32 * 1024);
    await server.start();
    const client = (store.backend as RedisBackend).client;
    for (let i = 0; i < 100 && client.status !== 'ready'; i++) await new Promise((r) => setTimeout(r, 50)); // ioredis reconnects
    const after = await checkAll(store, docs, 32 * 1024);
    console.log(`SIGKILL mid-writes: ${w.ok} puts acknowledged, ${w.failed} failed; while down ${during.hits} hits/${during.misses} misses; after restart ${after.hits} hits, ${after.misses} misses, ${after.wrong} wrong`);
    expect(during.wrong + after.wrong).toBe(0);
    expect(during.hits).toBe(0);
    expect(w.failed).toBeGreaterThan(0);
    // appendfsync always: whatever was acknowledged before the kill is there after the restart.
    for (const p of w.acknowledged) expect((await store.lookup(p))?.tokens).toBe(p.length);
    expect(store.stats().rejected).toBe(0);
  });

  it('8 processes × 200 mixed puts and lookups of shared prefixes: zero wrong results', async () => {
    const server = await startServer(REDIS!);
    servers.push(server);
    const worker = await bundleLoadWorker();
    const t0 = performance.now();
    const results = await Promise.all(
      Array.from({ length: 8 }, (_, w) =>
        new Promise<Record<string, number>>((resolve, reject) => {
          const p = spawn(process.execPath, [worker.file, server.url, String(w), '200', String(C)], { stdio: ['ignore', 'pipe', 'pipe'] });
          let out = '', err = '';
          p.stdout.on('data', (d) => (out += d));
          p.stderr.on('data', (d) => (err += d));
          p.on('exit', (code) => (code === 0 ? resolve(JSON.parse(out.trim().split('\n').pop()!)) : reject(new Error(`load worker ${w} exited ${code}: ${err}`))));
        }),
      ),
    );
    const wall = performance.now() - t0;
    worker.remove();
    const sum = (k: string) => results.reduce((a, r) => a + r[k], 0);
    const max = (k: string) => Math.max(...results.map((r) => r[k]));
    const ops = sum('ops');
    console.log(
      `load: 8 processes × 200 ops on ${server.url}: ${sum('puts')} puts, ${sum('lookups')} lookups, ${sum('hits')} hits (${(sum('hits') / sum('lookups') * 100).toFixed(1)}%), ` +
        `${sum('wrong')} wrong, ${sum('errors')} errors; wall ${wall.toFixed(0)} ms (process start included), slowest worker ${max('ms').toFixed(0)} ms, ` +
        `${(ops / (max('ms') / 1000)).toFixed(0)} ops/s; p99 put ${max('putP99').toFixed(1)} ms, p99 lookup ${max('lookupP99').toFixed(1)} ms`,
    );
    expect(ops).toBe(1600);
    expect(sum('wrong')).toBe(0);
    expect(sum('errors')).toBe(0);
    expect(sum('warnings')).toBe(0);
    expect(sum('hits')).toBeGreaterThan(0);
    expect(max('ms')).toBeLessThan(60_000);
  });
});

describe.skipIf(!REDIS)('prefix store on a three-master Redis Cluster', () => {
  let nodes: TestServer[];
  beforeAll(async () => {
    nodes = await startCluster(REDIS!);
    servers.push(...nodes);
  });

  it('spreads prefixes over the masters (hash tags keep record and manifest together); one node stopped: right hits or misses', async () => {
    const store = storeAt(`redis+cluster://127.0.0.1:${nodes[0].port}?timeout=500`);
    const docs = Array.from({ length: 8 }, (_, i) => seq(6 * C, 300 + i));
    for (const d of docs) for (let k = 1; k <= 6; k++) await store.put(d.slice(0, k * C), prefixPayload(d.slice(0, k * C)));
    const perNode = await Promise.all(nodes.map(async (n) => Number(/keys=(\d+)/.exec(await rawCommand(n.port, 'INFO keyspace'))?.[1] ?? 0)));
    // 48 prefixes × (record + manifest) + the namespace descriptor, each prefix's two keys on one node.
    expect(perNode.reduce((a, b) => a + b, 0)).toBe(48 * 2 + 1);
    expect(perNode.every((n) => n > 0)).toBe(true);
    const before = await checkAll(store, docs);
    expect(before).toEqual({ hits: 48, misses: 0, wrong: 0 });
    const listed: string[] = [];
    for await (const e of inspectStore(store.backend)) listed.push(e.status);
    expect(listed.filter((s) => s === 'ok')).toHaveLength(48);

    await nodes[1].kill('SIGKILL');
    const t0 = performance.now();
    const after = await checkAll(store, docs);
    const ms = performance.now() - t0;
    console.log(`cluster, node :${nodes[1].port} SIGKILLed: ${after.hits} hits, ${after.misses} misses, ${after.wrong} wrong in ${ms.toFixed(0)} ms (keys per node before: ${perNode.join('/')}); backend errors ${store.stats().backendErrors}`);
    expect(after.wrong).toBe(0);
    expect(after.hits + after.misses).toBe(48);
    expect(after.misses).toBeGreaterThan(0);
    // Two thirds of the slots are still served: a lookup whose prefixes live there still hits.
    expect(after.hits).toBeGreaterThan(0);
  });
});
