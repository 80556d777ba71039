import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { CommandIO } from '../commands.js';
import { runCli } from '../program.js';

function capture(): CommandIO & { stdout: string; stderr: string } {
  const io = { stdout: '', stderr: '', out: (t: string) => void (io.stdout += `${t}\n`), err: (t: string) => void (io.stderr += `${t}\n`) };
  return io;
}

describe('kvpack bench accuracy (CLI)', () => {
  const dir = mkdtempSync(join(tmpdir(), 'kvpack-acc-cli-'));
  const cfg = join(dir, 'acc.yaml');
  writeFileSync(cfg, 'model: absent-model\neval: absent-model/eval.jsonl\nmodelSource: get it from example.org\nstrategies: [{ name: dense }]\n');

  it('absent model or eval file: exit 2, the instructions on stderr', async () => {
    for (const args of [['--limit', '2'], ['--require-model']]) {
      const io = capture();
      expect(await runCli(['bench', 'accuracy', cfg, ...args], io)).toBe(2);
      expect(io.stdout).toBe('');
      expect(io.stderr).toMatch(/^kvpack: error: files not found: .*absent-model, .*absent-model\/eval\.jsonl$/m);
      expect(io.stderr).toMatch(/get it from example\.org/);
      expect(io.stderr).toMatch(/KVPACK_MODELS_DIR/);
      expect(io.stderr).toMatch(/--model DIR --eval FILE/);
    }
  });

  it('bad input exits 2 with one error line; --help exits 0 and lists the options', async () => {
    const a = capture();
    expect(await runCli(['bench', 'accuracy', cfg, '--limit', 'ten'], a)).toBe(2);
    expect(a.stderr).toMatch(/^kvpack: error: --limit must be a positive integer, got "ten"/);
    const b = capture();
    expect(await runCli(['bench', 'accuracy', join(dir, 'nope.yaml')], b)).toBe(2);
    expect(b.stderr).toMatch(/nope\.yaml does not exist/);
    const bad = join(dir, 'bad.yaml');
    writeFileSync(bad, 'model: m\neval: e.jsonl\nstrategies: [{ name: snapkv, options: { budget: 8, window: 16 } }]\n');
    const c = capture();
    expect(await runCli(['bench', 'accuracy', bad], c)).toBe(2);
    expect(c.stderr).toMatch(/setting "snapkv": invalid options for strategy "snapkv"/);
    expect(await runCli(['bench', 'accuracy'], capture())).toBe(2);
    const h = capture();
    expect(await runCli(['bench', 'accuracy', '--help'], h)).toBe(0);
    for (const o of ['--limit', '--tasks', '--out', '--backend', '--eval']) expect(h.stdout).toContain(o);
  });
});
