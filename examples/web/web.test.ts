// The browser example in a real browser: Debian's headless Chromium, driven by playwright-core, opens
// the page built by Vite (served on loopback, cross-origin isolated), generates over the dense and the
// xKV cache on the embedded stories260K, and checks the greedy ids against the same run under Node;
// saves the compressed cache in IndexedDB, reloads, restores it and checks the continuation; checks
// that bad input is a visible error. Skips only where no Chromium binary is installed (CI installs it).
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import { tmpdir } from 'node:os';
import { extname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { selectBackend } from '@kvpack/core';
import '@kvpack/xkv';
import { LlamaModel, Session, loadModel, type Tokenizer } from '@kvpack/models';
import { tinyCheckpoint, writeHfDir } from '../../packages/models/src/hf/testutil.js';
import type { Browser, Page } from 'playwright-core';

const here = fileURLToPath(new URL('.', import.meta.url));
const repo = resolve(here, '../..');
const chromium = [process.env.KVPACK_CHROMIUM, '/usr/bin/chromium', '/usr/bin/chromium-browser'].find((p): p is string => !!p && existsSync(p));
if (!chromium) console.warn('SKIPPED: chromium is not installed (apt-get install chromium): the browser example was not tested');
const artifacts = resolve(process.env.KVPACK_TEST_ARTIFACTS ?? join(repo, 'test-artifacts'));

const TOKENS = 16;
const DENSE = { name: 'dense', options: { storage: 'float32' } };
const XKV = { name: 'xkv', options: { layersPerGroup: 2, rankK: 4, rankV: 6 } };

interface RunResult {
  strategy: string;
  ids: number[];
  bytes: number;
  resident: number;
  compressMs: number;
  decodeTokensPerS: number;
}
interface PageData {
  backend: string;
  backendReason: string;
  model: string;
  promptIds: number[];
  runs: Record<'dense' | 'strategy', RunResult>;
  continued: number[][];
  saved?: { bytes: number; storage: string; tokens: number };
  restored?: { position: number; storage: string };
}

const MIME: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript',
  '.css': 'text/css',
  '.wasm': 'application/wasm',
  '.json': 'application/json',
};

/** A static server for the built page on loopback, cross-origin isolated (wasm threads need it). */
function serve(dir: string): Promise<{ server: Server; url: string }> {
  const server = createServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url ?? '/', 'http://x').pathname);
    const file = resolve(dir, `.${path.endsWith('/') ? `${path}index.html` : path}`);
    if (!file.startsWith(dir) || !existsSync(file) || !statSync(file).isFile()) {
      res.writeHead(404).end('not found');
      return;
    }
    res.writeHead(200, {
      'Content-Type': MIME[extname(file)] ?? 'application/octet-stream',
      'Cross-Origin-Opener-Policy': 'same-origin',
      'Cross-Origin-Embedder-Policy': 'require-corp',
    });
    res.end(readFileSync(file));
  });
  return new Promise((ok) => server.listen(0, '127.0.0.1', () => ok({ server, url: `http://127.0.0.1:${(server.address() as { port: number }).port}/` })));
}

describe.skipIf(!chromium)('the browser example (examples/web) in headless Chromium', () => {
  const out = mkdtempSync(join(tmpdir(), 'kvpack-web-'));
  let server: Server | undefined;
  let url = '';
  let browser: Browser | undefined;
  let page: Page;
  const pageErrors: string[] = [];
  let model: LlamaModel;
  let tokenizer: Tokenizer;

  const state = () => page.evaluate(() => document.body.dataset.state);
  const pageData = async (): Promise<PageData> => JSON.parse((await page.textContent('#run-data')) ?? '{}') as PageData;
  /** Clicks a button and waits for the page's action to end (done or error). */
  async function act(selector: string): Promise<string> {
    await page.click(selector);
    await page.waitForFunction(() => document.body.dataset.state === 'done' || document.body.dataset.state === 'error', undefined, { timeout: 120_000 });
    return (await state())!;
  }
  async function open(): Promise<void> {
    await page.goto(`${url}index.html?tokens=${TOKENS}`);
    await page.waitForFunction(() => ['ready', 'error'].includes(document.body.dataset.state ?? ''), undefined, { timeout: 120_000 });
    expect(await state(), (await page.textContent('#error')) ?? '').toBe('ready');
  }

  /** Greedy ids under Node: prefill, compress, `n` tokens, then `more` tokens. */
  async function nodeRun(cfg: object, promptIds: number[], n: number, more = 0): Promise<{ first: number[]; next: number[] }> {
    const s = await Session.start(model, { strategy: cfg as never });
    try {
      await s.prefill(promptIds);
      await s.compress();
      const first = (await s.greedy(n)).ids;
      const next = more ? (await s.greedy(more)).ids : [];
      return { first, next };
    } finally {
      s.dispose();
    }
  }

  beforeAll(async () => {
    // One build of the page, with the example's own Vite config.
    const { build } = await import('vite');
    await build({ configFile: join(here, 'vite.config.ts'), logLevel: 'warn', build: { outDir: out, emptyOutDir: true } });
    ({ server, url } = await serve(out));
    const { chromium: launcher } = await import('playwright-core');
    browser = await launcher.launch({ executablePath: chromium, headless: true, args: ['--no-sandbox'] });
    page = await browser.newPage({ viewport: { width: 1100, height: 1300 } });
    page.on('pageerror', (e) => pageErrors.push(e.message));
    await selectBackend('wasm');
    const loaded = await loadModel(join(repo, 'models/stories260K/stories260K_q80.bin'), { tokenizer: join(repo, 'models/stories260K/tok512.bin') });
    model = new LlamaModel(loaded.weights);
    tokenizer = loaded.tokenizer!;
  });

  afterAll(async () => {
    await browser?.close();
    await new Promise((ok) => (server ? server.close(ok) : ok(undefined)));
    model?.dispose();
    rmSync(out, { recursive: true, force: true });
  });

  it('generates over the dense and the xKV cache with the greedy ids of the same run under Node; a saved cache continues after a reload', async () => {
    const tensors = tf.memory().numTensors;
    await open();
    const start = await pageData();
    expect(start.backend).toBe('wasm');
    expect(await page.textContent('#backend')).toMatch(/backend wasm \(skipped tensorflow: tfjs-node runs only under Node.*webgpu: .+\); wasm with(out)? SIMD/);

    // The page's default strategy is the xKV preset; the prompt is the page's own.
    await page.fill('#strategy', `name: xkv\noptions: ${JSON.stringify(XKV.options)}\n`);
    expect(await act('#run'), (await page.textContent('#error')) ?? '').toBe('done');
    const d = await pageData();
    const promptIds = tokenizer.encode(await page.inputValue('#prompt'), { bos: true });
    expect(d.promptIds).toEqual(promptIds);

    const dense = await nodeRun(DENSE, promptIds, TOKENS);
    const xkv = await nodeRun(XKV, promptIds, TOKENS, TOKENS);
    expect(d.runs.dense.ids).toEqual(dense.first);
    expect(d.runs.strategy.ids).toEqual(xkv.first);
    expect(d.runs.strategy.strategy).toBe('xkv');
    // The streamed text is the decoded ids.
    expect(await page.textContent('#output-strategy')).toBe(tokenizer.decode([...promptIds, ...xkv.first]));

    // Measured in the page: the compressed cache is smaller and its tensors really resident on the backend.
    const { dense: rd, strategy: rs } = d.runs;
    expect(rs.bytes).toBeLessThan(rd.bytes);
    for (const r of [rd, rs]) {
      expect(r.resident).toBeGreaterThan(0);
      expect(r.resident / r.bytes).toBeGreaterThan(0.9);
      expect(r.resident / r.bytes).toBeLessThan(1.1);
      expect(r.decodeTokensPerS).toBeGreaterThan(0);
    }
    expect(await page.locator('#metrics tbody tr').count()).toBe(2);
    mkdirSync(artifacts, { recursive: true });
    const shot = join(artifacts, 'browser-example.png');
    await page.screenshot({ path: shot, fullPage: true });
    expect(statSync(shot).size).toBeGreaterThan(10_000);
    console.log(`screenshot of the page: ${shot}`);
    console.log(
      `browser example, headless Chromium, ${d.backendReason}\n` +
        `  ${'cache'.padEnd(8)} ${'bytes'.padStart(8)} ${'resident'.padStart(9)} ${'compress ms'.padStart(12)} ${'decode tok/s'.padStart(13)}\n` +
        [rd, rs]
          .map((r) => `  ${r.strategy.padEnd(8)} ${String(r.bytes).padStart(8)} ${String(r.resident).padStart(9)} ${r.compressMs.toFixed(2).padStart(12)} ${r.decodeTokensPerS.toFixed(1).padStart(13)}`)
          .join('\n') +
        `\n  xkv vs dense: ${(rd.bytes / rs.bytes).toFixed(2)}× smaller, compress ${(rs.compressMs / Math.max(rd.compressMs, 1e-3)).toFixed(2)}× dense's time, decode ${(rs.decodeTokensPerS / rd.decodeTokensPerS).toFixed(2)}× dense's tokens/s`,
    );

    // Save in IndexedDB, continue in memory; reload, restore, continue: the same tokens, and Node's.
    expect(await act('#save')).toBe('done');
    expect((await pageData()).saved).toMatchObject({ storage: 'indexeddb', tokens: promptIds.length + TOKENS - 1 });
    expect(await act('#continue')).toBe('done');
    const inMemory = (await pageData()).continued[0];
    expect(inMemory).toEqual(xkv.next);

    await page.reload();
    await page.waitForFunction(() => ['ready', 'error'].includes(document.body.dataset.state ?? ''), undefined, { timeout: 120_000 });
    expect(await state()).toBe('ready');
    expect(await act('#restore'), (await page.textContent('#error')) ?? '').toBe('done');
    const restored = await pageData();
    expect(restored.restored).toEqual({ position: promptIds.length + TOKENS, storage: 'indexeddb' });
    expect(await page.textContent('#save-status')).toMatch(/without prefilling/);
    expect(await act('#continue')).toBe('done');
    expect((await pageData()).continued[0]).toEqual(inMemory);

    await page.screenshot({ path: join(artifacts, 'browser-example-restored.png'), fullPage: true });

    // The same round trip through the origin private file system, without a reload.
    await page.selectOption('#storage', 'opfs');
    expect(await act('#save')).toBe('done');
    expect((await pageData()).saved?.storage).toBe('opfs');
    expect(await act('#continue')).toBe('done');
    const afterSave = (await pageData()).continued[1];
    expect(await act('#restore')).toBe('done');
    expect(await act('#continue')).toBe('done');
    expect((await pageData()).continued[2]).toEqual(afterSave);
    await page.selectOption('#storage', 'indexeddb');
    expect(pageErrors).toEqual([]);
    expect(tf.memory().numTensors).toBe(tensors);
  });

  it('shows bad input as a visible, clear error: a YAML typo, a rank too large, a corrupt model file', async () => {
    // A YAML typo: shown under the text box as it is typed, and again when generating.
    await page.fill('#strategy', 'name: xkv\noptions: {layersPerGroup: 2, rankK: 4\n');
    await expect.poll(() => page.isVisible('#strategy-error')).toBe(true);
    expect(await page.textContent('#strategy-error')).toMatch(/the strategy text is not valid YAML.*\[config\]/s);
    expect(await act('#run')).toBe('error');
    expect(await page.isVisible('#error')).toBe(true);
    expect(await page.textContent('#error')).toMatch(/not valid YAML/);

    // A rank larger than the prompt and the features allow.
    await page.fill('#strategy', 'name: xkv\noptions: {layersPerGroup: 2, rankK: 999, rankV: 6}\n');
    const rankError = (await page.isVisible('#strategy-error')) ? await page.textContent('#strategy-error') : '';
    const state = await act('#run');
    expect(state).toBe('error');
    const shown = `${rankError} ${await page.textContent('#error')}`;
    expect(shown).toMatch(/rank/i);
    expect(shown).toMatch(/999/);

    // A corrupt GGUF file dropped on the page: the loader's error names the file; the embedded model stays.
    const bad = new Uint8Array(64);
    bad.set(new TextEncoder().encode('GGUF'));
    new DataView(bad.buffer).setUint32(4, 3, true);
    new DataView(bad.buffer).setBigUint64(8, 1n << 40n, true); // 2^40 tensors in a 64-byte file
    await page.setInputFiles('#model-files', { name: 'broken.gguf', mimeType: 'application/octet-stream', buffer: Buffer.from(bad) });
    await page.waitForFunction(() => document.body.dataset.state === 'error', undefined, { timeout: 60_000 });
    expect(await page.isVisible('#error')).toBe(true);
    expect(await page.textContent('#error')).toMatch(/broken\.gguf.*\[(truncated|corrupt)\]/s);
    expect(await page.textContent('#model-status')).toMatch(/stories260K/);
    // A Hugging Face model (config.json, tokenizer.json, two safetensors shards) dropped on the page, then by URL.
    const hf = join(out, 'tiny-hf');
    writeHfDir(hf, tinyCheckpoint({ dim: 32, hiddenDim: 48, nLayers: 2, nHeads: 4, nKvHeads: 2, vocabSize: 4 }, 3), { shards: 2, dtype: 'BF16' });
    const words = ['<unk>', '<s>', '</s>', 'hi'];
    writeFileSync(
      join(hf, 'tokenizer.json'),
      JSON.stringify({ version: '1.0', added_tokens: [], normalizer: null, pre_tokenizer: { type: 'WhitespaceSplit' }, post_processor: null, decoder: null, model: { type: 'WordLevel', vocab: Object.fromEntries(words.map((w, i) => [w, i])), unk_token: '<unk>' } }),
    );
    const hfFiles = readdirSync(hf).map((name) => ({ name, mimeType: 'application/octet-stream', buffer: readFileSync(join(hf, name)) }));
    await page.setInputFiles('#model-files', hfFiles);
    await page.waitForFunction(() => ['done', 'error'].includes(document.body.dataset.state ?? ''), undefined, { timeout: 60_000 });
    expect(await page.textContent('#model-status'), (await page.textContent('#error')) ?? '').toMatch(/: hf, 2 layers, 2 KV heads, head_dim 8, vocabulary 4$/);
    await page.fill('#model-url', `${url}tiny-hf/`);
    expect(await act('#load-url')).toBe('done');
    expect(await page.textContent('#model-status')).toBe(`${url}tiny-hf/: hf, 2 layers, 2 KV heads, head_dim 8, vocabulary 4`);
    expect(await act('#load-embedded')).toBe('done');
    expect(await page.textContent('#model-status')).toMatch(/^stories260K \(embedded\): llama2c/);

    // Not a llama2.c, GGUF or safetensors model at all.
    await page.setInputFiles('#model-files', { name: 'notes.txt', mimeType: 'text/plain', buffer: Buffer.from('just text') });
    await page.waitForFunction(() => /unknown model format/.test(document.getElementById('error')?.textContent ?? ''), undefined, { timeout: 60_000 });
    expect(pageErrors).toEqual([]);
  });
});
