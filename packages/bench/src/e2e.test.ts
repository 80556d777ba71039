import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { applyRope, createStrategy, disposeKVCache, relativeFrobeniusError, selectBackend } from '@kvpack/core';
import '@kvpack/xkv';
import '@kvpack/baselines';
import { loadBenchModel, tokenizePrompts } from './load.js';
import { runCli } from './program.js';
import type { BenchReport } from './report.js';
import type { CommandIO } from './commands.js';

const repoRoot = resolve(fileURLToPath(new URL('.', import.meta.url)), '../../..');
const modelsDir = process.env.KVPACK_MODELS_DIR ? resolve(process.env.KVPACK_MODELS_DIR) : resolve(repoRoot, 'models'); // stories260K is embedded
const modelFile = join(modelsDir, 'stories260K', 'stories260K_q80.bin');
const tokFile = join(modelsDir, 'stories260K', 'tok512.bin');
const present = existsSync(modelFile) && existsSync(tokFile);
if (!present) console.warn(`skipping the stories260K end-to-end bench: ${modelFile} not found (set KVPACK_MODELS_DIR)`);

const TEXT =
  'Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her dog, Max. ' +
  'One sunny day, Lily and Max went to the park to play with a big red ball. Lily threw the ball high in the sky ' +
  'and Max ran fast to catch it. Max was very happy and he wagged his tail.';

function capture(): CommandIO & { stdout: string; stderr: string } {
  const io = { stdout: '', stderr: '', out: (t: string) => void (io.stdout += `${t}\n`), err: (t: string) => void (io.stderr += `${t}\n`) };
  return io;
}

describe.skipIf(!present)('kvpack bench on stories260K (end to end)', () => {
  const dir = mkdtempSync(join(tmpdir(), 'kvpack-e2e-'));
  const config = join(dir, 'e2e.yaml');
  let report: BenchReport;
  let io: ReturnType<typeof capture>;
  let code: number;

  beforeAll(async () => {
    writeFileSync(
      config,
      JSON.stringify({
        modelsDir,
        model: 'stories260K/stories260K_q80.bin',
        tokenizer: 'stories260K/tok512.bin',
        prompts: [{ name: 'park', text: TEXT }],
        continuationTokens: 16,
        decodeTokens: 12,
        repeats: 1,
        strategies: [
          { name: 'dense', options: { storage: 'float32' } },
          { name: 'xkv', options: { layersPerGroup: 2, rankK: 4, rankV: 6 } },
          { name: 'streamingllm', options: { sinks: 4, budget: 32 } },
        ],
      }),
    );
    // JSON is valid YAML: the .yaml name exercises the YAML reader.
    io = capture();
    code = await runCli(['bench', config, '--out', join(dir, 'out'), '--backend', 'wasm'], io);
    report = JSON.parse(readFileSync(join(dir, 'out', 'e2e.json'), 'utf8')) as BenchReport;
  });

  it('exits 0, prints the backend line and the table, writes JSON, Markdown and SVG', () => {
    expect(code).toBe(0);
    expect(io.stderr).toMatch(/^backend wasm/m);
    expect(io.stdout).toMatch(/\| setting +\| +ratio \|/);
    expect(existsSync(join(dir, 'out', 'e2e.md'))).toBe(true);
    const svg = readFileSync(join(dir, 'out', 'e2e.svg'), 'utf8');
    expect(svg.startsWith('<svg')).toBe(true);
    expect(report.environment.backend).toBe('wasm');
    expect(report.model.layout).toEqual({ nLayers: 5, nHeads: 8, nKvHeads: 4, headDim: 8 });
    expect(report.results.map((r) => r.label)).toEqual(['dense', 'xkv', 'streamingllm']);
  });

  it('dense float32 reproduces the uncompressed model: ΔNLL 0, greedy agreement 1', () => {
    const d = report.results[0];
    expect(Math.abs(d.deltaNll)).toBeLessThan(1e-4);
    expect(d.agreement).toBe(1);
    expect(d.top1Agreement).toBe(1);
    expect(d.firstDivergence).toBeNull();
    expect(d.keyError).toBeLessThan(1e-6);
    expect(report.references[0].greedyForwardAgreement).toBe(1);
  });

  describe('independent re-computation', () => {
    let loaded: Awaited<ReturnType<typeof loadBenchModel>>;
    beforeAll(async () => {
      await selectBackend('wasm');
      loaded = await loadBenchModel(modelFile, tokFile);
    });
    afterAll(() => loaded?.model.dispose());

    it("xkv's key error equals core relativeFrobeniusError over all layers' post-RoPE keys; ratio equals dense bytes / closed-form bytes", async () => {
      const [p] = tokenizePrompts([{ text: TEXT }], loaded.tokenizer, { bos: true, continuationTokens: 16 });
      const { logits, cache } = await loaded.model.prefill(p.contextIds.slice(0, -1));
      logits.dispose();
      const c = await createStrategy({ name: 'xkv', options: { layersPerGroup: 2, rankK: 4, rankV: 6 } }).compress(cache);
      const T = p.contextIds.length - 1;
      const L = cache.layout.nLayers;
      const ref = tf.concat(cache.keys.map((k) => applyRope(k, cache.rope, { start: 0, count: T })));
      const hat = tf.concat(Array.from({ length: L }, (_, l) => c.keys(l)));
      const vref = tf.concat(cache.values);
      const vhat = tf.concat(Array.from({ length: L }, (_, l) => c.values(l)));
      const keyErr = await relativeFrobeniusError(ref, hat);
      const valErr = await relativeFrobeniusError(vref, vhat);
      const xkv = report.results[1];
      expect(xkv.keyError!).toBeCloseTo(keyErr, 5);
      expect(xkv.valueError!).toBeCloseTo(valErr, 5);
      // Bytes by closed form (not byteSize(), which the report copies): per group of n ≤ 2 layers and
      // per keys / values at rank r·n, a basis T·r·n and n factors r·n·H_kv·d, float16 (2 bytes).
      const F = 4 * 8;
      let bytes = 0;
      for (let s0 = 0; s0 < L; s0 += 2) {
        const n = Math.min(2, L - s0);
        for (const r of [4, 6]) bytes += (T * r * n + n * r * n * F) * 2;
      }
      expect(c.byteSize()).toBe(bytes);
      expect(xkv.bytes).toBe(bytes);
      expect(xkv.ratio).toBe((2 * L * T * F * 2) / bytes);
      tf.dispose([ref, hat, vref, vhat]);
      c.dispose();
      disposeKVCache(cache);
    });
  });

  it('eviction reports N/A errors and the StreamingLLM ratio T / budget', () => {
    const s = report.results[2];
    expect(s.keyError).toBeNull();
    expect(s.ratio).toBeCloseTo(s.tokens / 32, 12);
    expect(io.stdout).toMatch(/\| streamingllm .*N\/A/);
  });

  it('a baseline written from this run passes, and a tightened one fails with exit 1', async () => {
    const bl = join(dir, 'bl.json');
    expect(await runCli(['bench', config, '--out', join(dir, 'out2'), '--baseline', bl, '--write-baseline', '--no-plot'], capture())).toBe(0);
    const pass = capture();
    expect(await runCli(['bench', config, '--out', join(dir, 'out3'), '--baseline', bl, '--no-plot'], pass)).toBe(0);
    expect(pass.stdout).toMatch(/baseline check passed: 3 setting\(s\)/);
    const b = JSON.parse(readFileSync(bl, 'utf8'));
    b.results[1].keyError *= 0.5;
    writeFileSync(bl, JSON.stringify(b));
    const fail = capture();
    expect(await runCli(['bench', config, '--out', join(dir, 'out4'), '--baseline', bl, '--no-plot'], fail)).toBe(1);
    expect(fail.stdout).toMatch(/REGRESSION .*\n {2}- xkv: keyError/);
  });
});
