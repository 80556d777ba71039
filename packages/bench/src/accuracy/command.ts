import { existsSync } from 'node:fs';
import { basename, extname, resolve } from 'node:path';
import type { Command } from 'commander';
import { KvpackError, describeBackend, selectBackend } from '@kvpack/core';
import { EXIT, failedSettingsExit, processIO, writeBenchOutputs, type CommandIO } from '../commands.js';
import { backendOption, runEnvironment } from '../environment.js';
import { loadBenchModel } from '../load.js';
import { loadConfigPlugins } from '../plugins.js';
import { renderRatioPlot } from '../plot.js';
import { createProgress, progressBarEnabled } from '../progress.js';
import { loadAccuracyConfig, type AccuracyConfig } from './config.js';
import { readEvalSet } from './dataset.js';
import { accuracyMarkdown, accuracyPanels, automaticNotes, type AccuracyReport } from './report.js';
import { runAccuracy, type AccuracyModel } from './runner.js';

/** Options of `kvpack bench accuracy CONFIG`. */
export interface AccuracyCommandOptions {
  /** Output folder (default `bench-out`). */
  out?: string;
  backend?: string;
  /** Examples per task, instead of the config's `limit`. */
  limit?: string | number;
  /** Comma-separated tasks, instead of the config's `tasks`. */
  tasks?: string;
  /** Model / eval file / tokenizer instead of the config's (relative to the working directory). */
  model?: string;
  eval?: string;
  tokenizer?: string;
  /** Accepted for older scripts: absent files always exit 2. */
  requireModel?: boolean;
  /** Skip the SVG plot. */
  plot?: boolean;
}


/** Lines explaining what is missing when the model or eval files are absent, and where to get them. */
export function missingAccuracyFilesMessage(cfg: AccuracyConfig, missing: string[]): string {
  return [
    `files not found: ${missing.join(', ')}`,
    ...(cfg.data.modelSource ? cfg.data.modelSource.trim().split('\n').map((l) => `  ${l}`) : []),
    `  Set KVPACK_MODELS_DIR to the folder holding "${cfg.data.model}" and "${cfg.data.eval}", edit ${cfg.source},`,
    `  or pass the files: kvpack bench accuracy ${cfg.source} --model DIR --eval FILE${cfg.data.tokenizer ? ' --tokenizer FILE' : ''}`,
  ].join('\n');
}

function parseLimit(v: string | number | undefined): number | undefined {
  if (v === undefined) return undefined;
  const n = typeof v === 'number' ? v : Number(v);
  if (!Number.isInteger(n) || n < 1) throw new KvpackError('config', `--limit must be a positive integer, got "${v}"`);
  return n;
}

/**
 * `kvpack bench accuracy CONFIG`: RULER-style exact-match accuracy against compression ratio.
 * Prints the Markdown table on stdout and writes OUT/<config>.json, .md and .svg.
 * @returns 0, or 2 when a setting failed; throws KvpackError on bad input and absent files.
 */
export async function accuracyCommand(configPath: string, opts: AccuracyCommandOptions, io: CommandIO = processIO): Promise<number> {
  await import('@kvpack/xkv');
  await import('@kvpack/baselines');
  const limit = parseLimit(opts.limit);
  await loadConfigPlugins(configPath);
  const cfg = loadAccuracyConfig(configPath);
  if (opts.model) cfg.modelPath = resolve(opts.model);
  if (opts.eval) cfg.evalPath = resolve(opts.eval);
  if (opts.tokenizer) cfg.tokenizerPath = resolve(opts.tokenizer);
  const tasks = opts.tasks
    ? opts.tasks
        .split(',')
        .map((t) => t.trim())
        .filter(Boolean)
    : cfg.data.tasks;
  if (opts.tasks && !tasks?.length) throw new KvpackError('config', `--tasks names no task: "${opts.tasks}"`);
  const missing = [cfg.modelPath, cfg.evalPath, ...(cfg.tokenizerPath ? [cfg.tokenizerPath] : [])].filter((p) => !existsSync(p));
  if (missing.length) throw new KvpackError('io', missingAccuracyFilesMessage(cfg, missing));
  const choice = await selectBackend(opts.backend ?? (process.env.KVPACK_BACKEND || 'auto'));
  const backendLine = describeBackend(choice);
  io.err(backendLine);

  const loaded = await loadBenchModel(cfg.modelPath, cfg.tokenizerPath);
  let report: AccuracyReport;
  try {
    const evalSet = readEvalSet(cfg.evalPath, { tokenizer: loaded.tokenizer, bos: cfg.data.bos, tasks, limit: limit ?? cfg.data.limit });
    io.err(
      `model ${cfg.modelPath} (${loaded.format}); eval ${cfg.evalPath}: ${evalSet.examples.length} example(s) of ${evalSet.tasks.join(', ')}; ` +
        `${cfg.settings.length} setting(s) + the uncompressed reference`,
    );
    const bar = createProgress(process.stderr, process.env, (l) => io.err(l));
    const lines = !progressBarEnabled(process.stderr, process.env);
    let result;
    try {
      result = await runAccuracy(
        loaded.model as AccuracyModel,
        evalSet.examples,
        cfg.settings,
        {
          lastToken: cfg.data.lastToken,
          ...(loaded.tokenizer ? { encode: (text: string) => loaded.tokenizer!.encode(text, { bos: false }) } : {}),
          stopAtEos: cfg.data.stopAtEos,
          stopIds: cfg.data.stopIds,
          maxNewTokens: cfg.data.maxNewTokens,
          attentionQueries: cfg.data.attentionQueries,
          tasks: evalSet.tasks,
        },
        {
          onStart: (n) => bar.onStart?.(n),
          onStep: (d, n, label) => bar.onStep?.(d, n, label),
          onExampleDone: (ex, i, n, marks) => {
            if (!lines) return;
            const ok = marks.filter((m) => m.correct === true).length;
            const wrong = marks.filter((m) => m.correct === false).map((m) => m.label);
            io.err(
              `[${i + 1}/${n}] ${ex.id} (${ex.task}): ${ok}/${marks.length} exact` + (wrong.length ? `; wrong: ${wrong.join(', ')}` : ''),
            );
          },
        },
      );
    } finally {
      bar.stop();
    }
    const pt = result.prefillTokens;
    report = {
      format: 'kvpack-accuracy/1',
      ...(cfg.data.title ? { title: cfg.data.title } : {}),
      environment: runEnvironment(choice.name, backendLine, false),
      config: { source: cfg.source, data: cfg.data },
      model: { path: cfg.modelPath, ...(cfg.tokenizerPath ? { tokenizer: cfg.tokenizerPath } : {}), layout: result.layout },
      eval: { path: cfg.evalPath, tasks: evalSet.tasks, examples: evalSet.examples.length, available: evalSet.available },
      run: {
        lastToken: cfg.data.lastToken,
        attentionQueries: result.attentionQueries,
        prefillTokens: { min: Math.min(...pt), max: Math.max(...pt), mean: pt.reduce((a, b) => a + b, 0) / pt.length },
      },
      reference: result.reference,
      results: result.results,
      notes: [...(cfg.data.notes ?? []), ...automaticNotes(result.results, result.layout.nLayers)],
    };
  } finally {
    loaded.model.dispose();
  }

  const md = accuracyMarkdown(report);
  io.out(md);
  const name = basename(configPath, extname(configPath));
  await writeBenchOutputs(io, opts, name, report, md, () =>
    renderRatioPlot(accuracyPanels(report), { title: report.title ?? `kvpack bench accuracy: ${name}` }),
  );
  return failedSettingsExit(report.results, io) ?? EXIT.ok;
}

/**
 * Adds `accuracy` under the `bench` command: `kvpack bench accuracy CONFIG [--limit N] [--tasks a,b]
 * [--out DIR] [--backend …] [--model DIR] [--eval FILE] [--tokenizer FILE] [--require-model] [--no-plot]`.
 * The action stores its exit code in `state.code`.
 */
export function registerAccuracyCommand(bench: Command, io: CommandIO, state: { code: number }): void {
  bench
    .command('accuracy')
    .description('RULER-style retrieval accuracy (exact match per task) against compression ratio, with the attention-output error')
    .argument('<config>', 'accuracy config file (.yaml, .yml or .json)')
    .option('--limit <n>', "examples per task, instead of the config's limit")
    .option('--tasks <list>', "comma-separated tasks, instead of the config's tasks")
    .option('--out <dir>', 'folder for the JSON, Markdown and SVG outputs', 'bench-out')
    .addOption(backendOption())
    .option('--model <path>', "model folder or file, instead of the config's")
    .option('--eval <file>', "JSONL eval set, instead of the config's")
    .option('--tokenizer <file>', "tokenizer file, instead of the config's")
    .option('--require-model', 'fail (exit 2) when the model or eval files are absent; the default, kept for scripts')
    .option('--no-plot', 'skip the SVG plot')
    .action(async (config: string, _opts: AccuracyCommandOptions, cmd: Command) => {
      // `bench` declares --out, --backend, --model, --tokenizer, --require-model and --no-plot too and
      // (commander's default) consumes them wherever they appear: read the merged values.
      state.code = await accuracyCommand(config, cmd.optsWithGlobals<AccuracyCommandOptions>(), io);
    });
}
