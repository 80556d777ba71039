import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { runCli } from './program.js';
import type { CommandIO } from './commands.js';

function capture(): CommandIO & { stdout: string; stderr: string } {
  const io = { stdout: '', stderr: '', out: (t: string) => void (io.stdout += `${t}\n`), err: (t: string) => void (io.stderr += `${t}\n`) };
  return io;
}

describe('kvpack CLI', () => {
  const dir = mkdtempSync(join(tmpdir(), 'kvpack-cli-'));

  it('lists strategies with descriptions and options', async () => {
    const io = capture();
    expect(await runCli(['strategies'], io)).toBe(0);
    expect(io.stdout).toMatch(/^xkv — xKV: cross-layer SVD/m);
    expect(io.stdout).toMatch(/^ {4}layersPerGroup +integer, > 0, ≤ 1024, default 4/m);
    // Upper bounds are shown, inside unions and nested option objects too.
    expect(io.stdout).toMatch(/^ {4}powerIters +number, ≥ 0, ≤ 16, default 1/m);
    expect(io.stdout).toMatch(/^ {4}oversample +"auto" \| integer, ≥ 0, ≤ 4096, default "auto"/m);
    expect(io.stdout).toMatch(/^ {4}sparse\.budget +integer, > 0, ≤ 1048576, default 2048/m);
    expect(io.stdout).toMatch(/^ {4}factorQuantization\.quantGroupSize +integer, > 0, ≤ 65536, default 32/m);
    expect(io.stdout).toMatch(/^ {4}budget +integer, > 0, ≤ 1048576 — .*\(default 256; excludes targetRatio\)/m);
    // A target ratio in either form, and the knob it resolves.
    expect(io.stdout).toMatch(/^ {4}target ratio: targetRatio .* or compressionRatio .* resolves budget at compress/m);
    expect(io.stdout).toMatch(/^ {4}compressionRatio +number, ≥ 0, < 1 — kvpress's compression_ratio/m);
    expect(io.stdout).toMatch(/^stacked — /m);
    expect(io.stdout).toMatch(/^dense — /m);
    expect(io.stdout).toMatch(/^svd — /m);
  });

  it('bad config: exit 2 and one error line naming the key, no stack trace', async () => {
    const f = join(dir, 'bad.yaml');
    writeFileSync(f, 'model: m.bin\nprompts: [{ text: hi }]\nstrategies: [{ name: xkv, options: { rank: 4 } }]\n');
    const io = capture();
    expect(await runCli(['bench', f], io)).toBe(2);
    expect(io.stderr).toMatch(/^kvpack: error: .*setting "xkv": invalid options for strategy "xkv"/);
    expect(io.stderr).toMatch(/rank/);
    expect(io.stderr).not.toMatch(/\n\s+at /);
  });

  it('missing config or model: exit 2 with the instructions on stderr, nothing on stdout', async () => {
    const io = capture();
    expect(await runCli(['bench', join(dir, 'nope.yaml')], io)).toBe(2);
    expect(io.stderr).toMatch(/nope\.yaml does not exist/);

    const f = join(dir, 'nomodel.yaml');
    writeFileSync(f, 'model: absent/model.bin\ntokenizer: absent/tok.bin\nmodelSource: get it from example.org\nprompts: [{ text: hi }]\nstrategies: [{ name: dense }]\n');
    for (const args of [[], ['--require-model']]) {
      const a = capture();
      expect(await runCli(['bench', f, ...args], a)).toBe(2);
      expect(a.stdout).toBe('');
      expect(a.stderr).toMatch(/^kvpack: error: model files not found: .*absent\/model\.bin/);
      expect(a.stderr).toMatch(/get it from example\.org/);
      expect(a.stderr).toMatch(/KVPACK_MODELS_DIR/);
      expect(a.stderr).toMatch(/kvpack bench .*nomodel\.yaml --model FILE --tokenizer FILE/);
      expect(a.stderr).not.toMatch(/Nothing was run/);
    }
  });

  it('usage errors exit 2; --help exits 0; bench perf is a subcommand hook', async () => {
    expect(await runCli(['bench'], capture())).toBe(2);
    expect(await runCli(['bench', 'x.yaml', '--backend', 'tpu'], capture())).toBe(2);
    expect(await runCli(['frobnicate'], capture())).toBe(2);
    const h = capture();
    expect(await runCli(['--help'], h)).toBe(0);
    expect(h.stdout).toMatch(/bench/);
    const p = capture();
    expect(await runCli(['bench', 'perf', '--strategies', 'nope'], p)).toBe(2);
    expect(p.stderr).toMatch(/unknown perf strategy "nope"/);
    expect(await runCli(['bench', 'x.yaml', '--write-baseline'], capture())).toBe(2);
    expect(await runCli(['bench', 'x.yaml', '--tolerance', 'foo=1'], capture())).toBe(2);
  });
});
