import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { decodeContainer, encodeContainer } from '@kvpack/core';
import { FileBackend, PrefixStore } from '@kvpack/store';
import type { CommandIO } from './commands.js';
import { runCli } from './program.js';

function capture(): CommandIO & { stdout: string; stderr: string } {
  const io = { stdout: '', stderr: '', out: (t: string) => void (io.stdout += `${t}\n`), err: (t: string) => void (io.stderr += `${t}\n`) };
  return io;
}

const MODEL = 'sha256:' + '12'.repeat(32);
const STRATEGY = { name: 'cli-test', options: { a: 1 } };
const C = 8;
const payload = (tokens: number[]) =>
  encodeContainer({ strategy: STRATEGY.name, options: STRATEGY.options, model: MODEL, meta: {}, tensors: [{ name: 'ids', dtype: 'int32', shape: [tokens.length], data: Int32Array.from(tokens) }] });

let dir: string;
let store: PrefixStore;
const tokens = Array.from({ length: 3 * C }, (_, i) => (i * 37) % 101);
beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'kvpack-store-cli-'));
  store = new PrefixStore({ backend: new FileBackend(join(dir, 's'), { durable: false }), model: MODEL, strategy: STRATEGY, chunkTokens: C });
  await store.put(tokens.slice(0, C), payload(tokens.slice(0, C)));
  await store.put(tokens, payload(tokens));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('kvpack store', () => {
  it('ls, stats, get, rm and gc against a file:// store', async () => {
    const url = `file://${join(dir, 's')}`;
    const keys = store.keys(tokens);
    let io = capture();
    expect(await runCli(['store', 'ls', url], io)).toBe(0);
    expect(io.stdout).toContain(`namespace ${store.namespace.id}  model ${MODEL}  strategy cli-test {"a":1}  chunk 8 tokens`);
    expect(io.stdout).toMatch(new RegExp(`${keys[0]} +8 tokens .* ok`));
    expect(io.stdout).toMatch(new RegExp(`${keys[2]} +24 tokens .* ok`));

    io = capture();
    expect(await runCli(['store', 'stats', url, '--json'], io)).toBe(0);
    const [row] = JSON.parse(io.stdout);
    expect(row).toMatchObject({ namespace: store.namespace.id, strategy: 'cli-test', chunkTokens: 8, prefixes: 2, tokens: 32, unusable: 0 });

    io = capture();
    const out = join(dir, 'cache.kvpk');
    expect(await runCli(['store', 'get', url, keys[2].slice(0, 12), '--out', out], io)).toBe(0);
    expect(JSON.parse(io.stdout)).toMatchObject({ key: keys[2], tokens: 24 });
    expect(Array.from(decodeContainer(readFileSync(out)).get('ids').data)).toEqual(tokens);

    // A flipped byte: ls reports it, gc removes it, get refuses it.
    const f = join(dir, 's', store.namespace.id, keys[0].slice(0, 2), `${keys[0]}.kvr`);
    const b = readFileSync(f);
    b[b.length - 1] ^= 1;
    writeFileSync(f, b);
    io = capture();
    expect(await runCli(['store', 'get', url, keys[0]], io)).toBe(2);
    expect(io.stderr).toMatch(/kvpack: error: store record is corrupt: CRC-32 mismatch/);
    io = capture();
    expect(await runCli(['store', 'ls', url], io)).toBe(0);
    expect(io.stdout).toMatch(new RegExp(`${keys[0]} .* corrupt: store record is corrupt`));
    io = capture();
    expect(await runCli(['store', 'gc', url], io)).toBe(0);
    expect(io.stdout).toMatch(/removed: 0 expired, 1 corrupt, 0 evicted .* kept 1/);

    io = capture();
    expect(await runCli(['store', 'rm', url, keys[2].slice(0, 8)], io)).toBe(0);
    expect(io.stdout).toMatch(/removed 1 prefix$/m);
    expect(await store.lookup(tokens)).toBeNull();
    io = capture();
    expect(await runCli(['store', 'rm', url], io)).toBe(2);
    expect(io.stderr).toMatch(/give prefix keys/);
    io = capture();
    expect(await runCli(['store', 'ls', 'ftp://x'], io)).toBe(2);
    expect(io.stderr).toMatch(/scheme "ftp:" is not supported/);
    io = capture();
    expect(await runCli(['store', 'stats', `${url}-typo`], io)).toBe(2);
    expect(io.stderr).toMatch(/no store at .*-typo: the folder does not exist/);
  });
});

const STORIES = join(process.env.KVPACK_MODELS_DIR ?? join(__dirname, '..', '..', '..', 'models'), 'stories260K', 'stories260K_q80.bin');

describe('kvpack bench store', () => {
  it('refuses a config without a strategy', async () => {
    const f = join(dir, 'bad.yaml');
    writeFileSync(f, 'tokens: 64\nmodels: [{ name: x, path: x }]\n');
    const io = capture();
    expect(await runCli(['bench', 'store', f, '--out', join(dir, 'o')], io)).toBe(2);
    expect(io.stderr).toMatch(/bench store: .*strategy/);
  });

  it.skipIf(!existsSync(STORIES))('measures bytes per token, the restore path against the prefill, and a chat hit rate (stories260K, 128 tokens)', async () => {
    const f = join(dir, 'small.yaml');
    writeFileSync(
      f,
      [
        'strategy: { name: xkv, options: { layersPerGroup: 4, rankK: 8, rankV: 12 } }',
        'raw: { name: dense, options: { storage: float32 } }',
        'tokens: 128',
        'chunkTokens: 64',
        'repeats: 1',
        'chat: { turns: 3, userTokens: [40, 60], replyTokens: [40, 60] }',
        `models: [{ name: stories260K, path: ${JSON.stringify(STORIES)} }]`,
      ].join('\n'),
    );
    const io = capture();
    const code = await runCli(['bench', 'store', f, '--out', join(dir, 'o'), '--backend', 'wasm'], io);
    expect(code, io.stderr).toBe(0);
    const { rows } = JSON.parse(readFileSync(join(dir, 'o', 'store-bench.json'), 'utf8'));
    const r = rows[0];
    // stories260K: 5 layers × 4 KV heads × head_dim 8: dense fp16 = 2 · 5 · 4 · 8 · 2 bytes per token.
    expect(r.denseFp16BytesPerToken).toBe(640);
    expect(r.ratioVsFp16).toBeCloseTo(640 / r.storedBytesPerToken, 10);
    // The raw float32 record holds 2 · 5 · 4 · 8 floats per token plus its headers.
    expect(r.rawBytesPerToken).toBeGreaterThan(1280);
    expect(r.rawBytesPerToken).toBeLessThan(1280 + 4096 / 128);
    expect(r.chat.turns).toBe(3);
    expect(r.chat.hitTokens % 64).toBe(0);
    expect(r.chat.hitTokens).toBeGreaterThan(0);
    expect(io.stdout).toMatch(/\| stories260K \| 128 \|/);
  });

  it('measures Llama-3.1-8B-shaped synthetic caches against the prefill arithmetic, side by side (tiny T)', async () => {
    const f = join(dir, 'synthetic.yaml');
    writeFileSync(
      f,
      [
        'strategy: { name: xkv, options: { layersPerGroup: 2, rankK: 16, rankV: 16 } }',
        'raw: { name: dense, options: { storage: float32 } }',
        'chunkTokens: 32',
        'repeats: 1',
        'synthetic: { tokens: [64, 96], layers: 2, hiddenSize: 128, intermediateSize: 256, tile: 32 }',
      ].join('\n'),
    );
    const io = capture();
    const code = await runCli(['bench', 'store', f, '--out', join(dir, 'o2'), '--backend', 'wasm'], io);
    expect(code, io.stderr).toBe(0);
    const { rows, synthetic } = JSON.parse(readFileSync(join(dir, 'o2', 'store-bench.json'), 'utf8'));
    expect(rows).toEqual([]);
    expect(synthetic.map((r: { tokens: number }) => r.tokens)).toEqual([64, 96]);
    for (const r of synthetic) {
      const T = r.tokens;
      // 2 layers × 8 KV heads × head_dim 128, K and V, 2 bytes.
      expect(r.denseFp16BytesPerToken).toBe(2 * 2 * 8 * 128 * 2);
      // The raw float32 record: 2 · 2 · 1024 floats per token plus its headers (a few KiB over T tokens).
      expect(r.rawBytesPerToken).toBeGreaterThan(16384);
      expect(r.rawBytesPerToken).toBeLessThan(16384 + 8192 / T);
      // xKV-2 at rank 16 per layer (group rank 32): per token 32 basis values per kind, fp16, plus the factors 32 × 2048 per kind.
      expect(r.storedBytesPerToken * T).toBeGreaterThan(2 * (T * 32 + 32 * 2048) * 2);
      expect(r.storedBytesPerToken * T).toBeLessThan(2 * (T * 32 + 32 * 2048) * 2 + 4096);
      expect(r.ratioVsRaw).toBeCloseTo(r.rawBytesPerToken / r.storedBytesPerToken, 10);
      // The arithmetic's counts in closed form: tiles of 32 rows, causal tile pairs n(n+1)/2.
      const n = T / 32;
      expect(r.prefill.rowTiles).toBe(n);
      expect(r.prefill.attentionTilePairs).toBe((n * (n + 1)) / 2);
      expect(r.prefill.projectionFlops).toBe(2 * T * 2 * (128 * 48 * 128 + 4096 * 128 + 2 * 128 * 256 + 256 * 128));
      expect(r.prefill.attentionFlops).toBe(2 * ((n * (n + 1)) / 2) * 2 * 2 * 32 * 32 * 32 * 128);
      expect(r.prefill.totalMs).toBeCloseTo(r.prefill.attentionMs + r.prefill.projectionMs, 10);
      expect(r.speedup).toBeCloseTo(r.prefill.totalMs / r.storedPathMs, 10);
      // The half-length prefix is served by cutting the stored record.
      expect(r.cutTokens).toBe(T === 64 ? 32 : 32);
      expect(r.cutPathMs).toBeGreaterThan(0);
    }
    expect(io.stdout).toMatch(/Llama-3.1-8B-shaped synthetic caches \(2 of 32 layers/);
    expect(io.stdout).toMatch(/\| 96 \| /);
  });
});
