import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { runCli } from './program.js';
import type { CommandIO } from './commands.js';

function capture(): CommandIO & { stdout: string; stderr: string } {
  const io = { stdout: '', stderr: '', out: (t: string) => void (io.stdout += `${t}\n`), err: (t: string) => void (io.stderr += `${t}\n`) };
  return io;
}

/** The embedded default model, inside the repository. */
const MODELS = resolve(import.meta.dirname, '../../../models');

describe('kvpack CLI output', () => {
  it('--help lists every command, subcommands of bench included', async () => {
    const h = capture();
    expect(await runCli(['--help'], h)).toBe(0);
    for (const c of ['kvpack bench <config>', 'kvpack bench accuracy <config>', 'kvpack bench needle', 'kvpack bench leaderboard <dir>', 'kvpack bench perf', 'kvpack bench structure', 'kvpack strategies'])
      expect(h.stdout).toContain(c);
  });

  it('strategies: bounds as the schema enforces them (a rank is at least 1); --json gives a JSON Schema per strategy', async () => {
    const t = capture();
    expect(await runCli(['strategies'], t)).toBe(0);
    expect(t.stdout).toMatch(/^ {4}rankK +integer, > 0, ≤ 65536, default 16/m);
    expect(t.stdout).not.toMatch(/rankK +integer, ≥ 0/);
    const j = capture();
    expect(await runCli(['strategies', '--json'], j)).toBe(0);
    const list = JSON.parse(j.stdout) as { name: string; description: string; options: { properties: Record<string, { exclusiveMinimum?: number; default?: unknown }> } }[];
    const xkv = list.find((s) => s.name === 'xkv')!;
    expect(xkv.description).toMatch(/cross-layer SVD/);
    expect(xkv.options.properties.rankK).toMatchObject({ exclusiveMinimum: 0, default: 16 });
    expect(list.map((s) => s.name)).toEqual(expect.arrayContaining(['dense', 'xkv', 'svd', 'kivi', 'quant', 'minicache', 'streamingllm', 'snapkv']));
    // MLA support comes from each definition's capability: a yes, or the definition's reason.
    const mla = Object.fromEntries(list.map((s) => [s.name, (s as unknown as { mla: true | string }).mla]));
    expect(mla).toMatchObject({ dense: true, xkv: true, svd: true, kivi: true, streamingllm: true, snapkv: true });
    expect(mla.quant).toMatch(/kivi/);
    expect(mla.minicache).toMatch(/adjacent layers/);
    expect(t.stdout).toMatch(/^quant — .*\n( {4}target ratio: .*\n)? {4}MLA latent caches: no \(/m);
  });

  it('bench --json prints the report as one JSON document on stdout', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvpack-json-'));
    const cfg = join(dir, 'tiny.yaml');
    writeFileSync(
      cfg,
      [
        `modelsDir: ${JSON.stringify(MODELS)}`,
        'model: stories260K/stories260K_q80.bin',
        'tokenizer: stories260K/tok512.bin',
        'prompts: [{ text: "Once upon a time, there was a little girl named Lily. She loved to play outside.", continuationTokens: 4 }]',
        'decodeTokens: 2',
        'repeats: 1',
        'strategies: [{ name: dense, options: { storage: float32 } }]',
      ].join('\n'),
    );
    const io = capture();
    const prev = process.env.KVPACK_MODELS_DIR;
    delete process.env.KVPACK_MODELS_DIR;
    try {
      expect(await runCli(['bench', cfg, '--json', '--no-plot', '--backend', 'cpu', '--out', join(dir, 'out')], io)).toBe(0);
    } finally {
      if (prev !== undefined) process.env.KVPACK_MODELS_DIR = prev;
    }
    const report = JSON.parse(io.stdout) as { format: string; results: { label: string; deltaNll: number }[] };
    expect(report.format).toBe('kvpack-bench/1');
    expect(report.results.map((r) => r.label)).toEqual(['dense']);
    expect(report.results[0].deltaNll).toBe(0); // float32 dense reproduces the uncompressed run exactly
  });
});
