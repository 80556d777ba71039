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
import { readLeaderboardRun, summarizeLeaderboardDir } from './leaderboard.js';

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

describe.skipIf(!present)('rulermini-19m: context and question, both query modes, leaderboard layout (one prompt)', () => {
  const dir = mkdtempSync(join(tmpdir(), 'kvpack-acc-lb-'));
  const config = join(dir, 'lb.yaml');
  let io: ReturnType<typeof capture>;
  let code: number;
  let report: AccuracyReport;
  const vocab: Record<string, number> = present ? (JSON.parse(readFileSync(join(modelDir, 'tokenizer.json'), 'utf8')) as { model: { vocab: Record<string, number> } }).model.vocab : {};
  const rows = () =>
    readFileSync(evalFile, 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as { task: string; input: string; input_ids: number[]; answer_ids: number[]; answer: string })
      .filter((r) => r.task === 'niah_single')
      .slice(0, 1);

  beforeAll(async () => {
    writeFileSync(
      config,
      JSON.stringify({
        modelsDir,
        model: 'rulermini-19m',
        eval: 'rulermini-19m/eval_1024.jsonl',
        tasks: ['niah_single'],
        limit: 1,
        attentionQueries: 0,
        question: { separator: 'what is' },
        leaderboard: { dir: 'lb' },
        strategies: [
          { name: 'dense', options: { storage: 'float32' } },
          { name: 'streamingllm', options: { sinks: 4, budget: 64 } },
        ],
      }),
    );
    io = capture();
    code = await runCli(['bench', 'accuracy', config, '--out', join(dir, 'out'), '--backend', 'wasm', '--no-plot'], io);
    report = JSON.parse(readFileSync(join(dir, 'out', 'lb.json'), 'utf8'));
  }, 400_000);

  it('query-agnostic compresses the context up to the last "what is"; the exact cache answers as the uncompressed model', () => {
    expect(code, io.stderr).toBe(0);
    expect(report.run.queryModes).toEqual(['agnostic', 'aware']);
    const [denseAgnostic, , denseAware] = report.results;
    expect(denseAgnostic.label).toBe('dense · query-agnostic');
    expect(denseAware.label).toBe('dense · query-aware');
    for (const [i, r] of rows().entries()) {
      // WordLevel: one token per word; the context ends before the last "what".
      const words = r.input.split(/\s+/).filter(Boolean);
      expect(words).toHaveLength(r.input_ids.length);
      expect(denseAgnostic.examples[i].tokens).toBe(words.lastIndexOf('what'));
      expect(denseAware.examples[i].tokens).toBe(r.input_ids.length - 1);
      expect(denseAgnostic.examples[i].predicted).toEqual(r.answer_ids);
      expect(denseAware.examples[i].predicted).toEqual(r.answer_ids);
    }
  });

  it('writes one folder per run in kvpress layout; they read back to the report', () => {
    const root = join(dir, 'out', 'lb');
    const summary = summarizeLeaderboardDir(root);
    expect(summary.rows).toHaveLength(6);
    for (const r of report.results) {
      const aware = r.queryMode === 'aware';
      const row = summary.rows.find((x) => x.queryAware === aware && x.method === r.name)!;
      expect(row.folder).toBe(`ruler__1024__rulermini-19m__${r.name}__${(1 - r.bytes / r.denseBytes).toFixed(2)}${aware ? '__query_aware' : ''}`);
      const back = readLeaderboardRun(join(root, row.folder));
      expect(back.config.kvpack.ratio).toBe(r.ratio);
      expect(back.metrics.niah_single.exact_match).toBe(r.accuracy.mean * 100);
      // Prediction text: the predicted ids through the tokenizer's vocabulary (WordLevel, one word per id).
      expect(back.predictions.map((p) => p.predicted_answer.split(' ').map((w) => vocab[w]))).toEqual(r.examples.map((e) => e.predicted));
      expect(back.predictions.map((p) => p.correct === 'True')).toEqual(r.examples.map((e) => e.correct));
      expect(back.predictions.map((p) => p.answer)).toEqual(rows().map((x) => x.answer));
    }
  });
});
