import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { selectBackend } from '@kvpack/core';
import { LlamaModel, loadModel } from '@kvpack/models';
import type { CommandIO } from '../commands.js';
import { runCli } from '../program.js';
import type { AccuracyReport } from './report.js';

// rulermini-19m (PROVENANCE.md): niah_single at 1,024 tokens is solved (1.00); correct = the greedy
// continuation equals answer_ids exactly.
const repoRoot = resolve(fileURLToPath(new URL('.', import.meta.url)), '../../../..');
const modelsDir = process.env.KVPACK_MODELS_DIR ? resolve(process.env.KVPACK_MODELS_DIR) : resolve(repoRoot, '..', 'shared', 'models');
const modelDir = join(modelsDir, 'rulermini-19m');
const evalFile = join(modelDir, 'eval_1024.jsonl');
const present = existsSync(join(modelDir, 'config.json')) && existsSync(evalFile);
if (!present) console.warn(`skipping the rulermini-19m accuracy end-to-end test: ${modelDir} not found (set KVPACK_MODELS_DIR)`);

function capture(): CommandIO & { stdout: string; stderr: string } {
  const io = { stdout: '', stderr: '', out: (t: string) => void (io.stdout += `${t}\n`), err: (t: string) => void (io.stderr += `${t}\n`) };
  return io;
}

describe.skipIf(!present)('kvpack bench accuracy on rulermini-19m (end to end, --limit 2)', () => {
  const dir = mkdtempSync(join(tmpdir(), 'kvpack-acc-e2e-'));
  const config = join(dir, 'acc.yaml');
  let io: ReturnType<typeof capture>;
  let code: number;
  let report: AccuracyReport;

  beforeAll(async () => {
    writeFileSync(
      config,
      JSON.stringify({
        modelsDir,
        model: 'rulermini-19m',
        eval: 'rulermini-19m/eval_1024.jsonl',
        tasks: ['vt'],
        limit: 5,
        strategies: [
          { name: 'dense', options: { storage: 'float32' } },
          { name: 'streamingllm', options: { sinks: 4, budget: 128 } },
        ],
      }),
    );
    io = capture();
    // --tasks and --limit override the config's; options after the subcommand reach it.
    code = await runCli(['bench', 'accuracy', config, '--tasks', 'niah_single', '--limit', '2', '--out', join(dir, 'out'), '--backend', 'wasm'], io);
    report = JSON.parse(readFileSync(join(dir, 'out', 'acc.json'), 'utf8'));
  });

  it('prints the table and writes JSON, Markdown and the SVG plot', () => {
    expect(code, io.stderr).toBe(0);
    expect(io.stdout).toMatch(/^\| setting +\| +ratio \| +cr \| +niah_single \| +agree \| attn err \| compress ms \| +resident ÷ stored \|$/m);
    expect(io.stdout).toMatch(/^\| uncompressed \(float32\) +\| +– \| +1\.00 \(2\/2\) \|/m);
    expect(io.stdout).toMatch(/^\| streamingllm +\| +[0-9.]+× \|/m);
    expect(report.eval).toMatchObject({ tasks: ['niah_single'], examples: 2 });
    const svg = readFileSync(join(dir, 'out', 'acc.svg'), 'utf8');
    expect(svg.startsWith('<svg')).toBe(true);
    expect(svg).toContain('niah_single: exact-match accuracy');
    expect(existsSync(join(dir, 'out', 'acc.md'))).toBe(true);
  });

  it('the uncompressed model answers both prompts exactly (≥ 0.95); dense float32 scores the same', () => {
    expect(report.reference.accuracy.tasks).toEqual([{ task: 'niah_single', correct: 2, total: 2, accuracy: 1 }]);
    const dense = report.results[0];
    expect(dense.label).toBe('dense');
    expect(dense.examples.map((e) => e.predicted)).toEqual(report.reference.examples.map((e) => e.predicted));
    expect(dense.accuracy).toEqual(report.reference.accuracy);
    expect(dense.attentionError).toBeLessThan(1e-6);
    expect(dense.ratio).toBe(0.5);
    const ev = report.results[1];
    expect(ev.ratio).toBeGreaterThan(7);
    expect(ev.attentionError).toBeGreaterThan(0.01);
  });

  describe('against the model itself', () => {
    let lm: LlamaModel;
    beforeAll(async () => {
      await selectBackend('wasm');
      lm = new LlamaModel((await loadModel(modelDir)).weights);
    });
    afterAll(() => lm?.dispose());

    it("dense float32's answers equal LlamaModel.generate's uncompressed greedy answers (full prefill path)", async () => {
      const rows = readFileSync(evalFile, 'utf8')
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l) as { task: string; input_ids: number[]; answer_ids: number[] })
        .filter((r) => r.task === 'niah_single')
        .slice(0, 2);
      for (const [i, r] of rows.entries()) {
        const g = await lm.generate(r.input_ids, { maxNewTokens: r.answer_ids.length, stopAtEos: true });
        expect(report.results[0].examples[i].predicted).toEqual(g.ids);
        expect(g.ids).toEqual(r.answer_ids);
      }
    });
  });
});
