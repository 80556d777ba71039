// One load-test process: mixed puts and lookups of prefixes that share chunks, against a store URL.
// Prints one JSON line of figures. Bundled by bundle-worker.ts; run: node BUNDLE URL WORKER OPS CHUNK
import { PrefixStore } from '../store.js';
import { openBackend } from '../url.js';
import { TEST_MODEL, TEST_STRATEGY, isPayloadOf, loadDocs, prefixPayload, rng } from './payload.js';

const [url, workerArg, opsArg, chunkArg] = process.argv.slice(2);
const worker = Number(workerArg);
const ops = Number(opsArg);
const C = Number(chunkArg);
const DOCS = 4;
const CHUNKS = 8;
/** Pad bytes of each payload (the tests that check a worker's records use the same). */
export const PAD = 4096;

const docs = loadDocs(C, DOCS, CHUNKS);
const r = rng(worker + 1);
const warnings: string[] = [];
const store = new PrefixStore({ backend: openBackend(url), model: TEST_MODEL, strategy: TEST_STRATEGY, chunkTokens: C, onWarning: (w) => warnings.push(w.message) });
const lat = { put: [] as number[], lookup: [] as number[] };
let puts = 0, lookups = 0, hits = 0, hitTokens = 0, wrong = 0, errors = 0;
const t0 = performance.now();
for (let i = 0; i < ops; i++) {
  const doc = docs[Math.floor(r() * DOCS)];
  // A shared document prefix, sometimes followed by this worker's own chunk (a branch).
  let tokens = doc.slice(0, (1 + Math.floor(r() * CHUNKS)) * C);
  if (r() < 0.25) tokens = tokens.concat(Array.from({ length: C }, (_, j) => (worker * 7919 + i * 31 + j) % 32000));
  const s = performance.now();
  try {
    if (r() < 0.4) {
      await store.put(tokens, prefixPayload(tokens, PAD));
      puts++;
      lat.put.push(performance.now() - s);
    } else {
      const query = tokens.concat([1, 2, 3]);
      const hit = await store.lookup(query);
      lookups++;
      lat.lookup.push(performance.now() - s);
      if (hit) {
        hits++;
        hitTokens += hit.tokens;
        if (!isPayloadOf(hit.cache, query, hit.tokens, PAD)) wrong++;
      }
    }
  } catch {
    errors++;
  }
}
const ms = performance.now() - t0;
const q = (a: number[], p: number) => (a.length ? [...a].sort((x, y) => x - y)[Math.min(a.length - 1, Math.floor(p * a.length))] : 0);
await store.backend.close();
console.log(JSON.stringify({ worker, ops, puts, lookups, hits, hitTokens, wrong, errors, warnings: warnings.length, ms, putP50: q(lat.put, 0.5), putP99: q(lat.put, 0.99), lookupP50: q(lat.lookup, 0.5), lookupP99: q(lat.lookup, 0.99) }));
