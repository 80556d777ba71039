import { existsSync, writeFileSync } from 'node:fs';
import { basename, extname, join, resolve } from 'node:path';
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
import { leaderboardMarkdown, leaderboardPanels, summarizeLeaderboardDir, writeLeaderboard, type LeaderboardMode } from './leaderboard.js';
import { runAccuracy, type AccuracyModel, type AccuracySettingResult, type QueryMode } from './runner.js';

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
  /** Comma-separated query modes (agnostic, aware), instead of the config's. */
  queryModes?: string;
  /** Write kvpress's leaderboard layout into this folder. */
  leaderboard?: string;
}

/** The query modes of a run: the option's, else the config's, else both with a question split, else aware. */
function queryModesOf(cfg: AccuracyConfig, opt: string | undefined): QueryMode[] {
  if (opt !== undefined) {
    const modes = opt
      .split(',')
      .map((m) => m.trim())
      .filter(Boolean);
    const bad = modes.find((m) => m !== 'agnostic' && m !== 'aware');
    if (bad !== undefined || !modes.length) throw new KvpackError('config', `--query-modes takes agnostic and/or aware, got "${opt}"`);
    if (modes.includes('agnostic') && !cfg.data.question)
      throw new KvpackError('config', `--query-modes agnostic needs the config's "question" (a field or a separator) to split the prompts`);
    return [...new Set(modes)] as QueryMode[];
  }
  return cfg.data.queryModes ?? (cfg.data.question ? ['agnostic', 'aware'] : ['aware']);
}

const MODE_NAME: Record<QueryMode, string> = { agnostic: 'query-agnostic', aware: 'query-aware' };


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
  const modes = queryModesOf(cfg, opts.queryModes);
  const missing = [cfg.modelPath, cfg.evalPath, ...(cfg.tokenizerPath ? [cfg.tokenizerPath] : [])].filter((p) => !existsSync(p));
  if (missing.length) throw new KvpackError('io', missingAccuracyFilesMessage(cfg, missing));
  const choice = await selectBackend(opts.backend ?? (process.env.KVPACK_BACKEND || 'auto'));
  const backendLine = describeBackend(choice);
  io.err(backendLine);

  const loaded = await loadBenchModel(cfg.modelPath, cfg.tokenizerPath);
  let report: AccuracyReport;
  const runs: LeaderboardMode[] = [];
  let evalSet: ReturnType<typeof readEvalSet>;
  try {
    evalSet = readEvalSet(cfg.evalPath, { tokenizer: loaded.tokenizer, bos: cfg.data.bos, tasks, limit: limit ?? cfg.data.limit, question: cfg.data.question });
    io.err(
      `model ${cfg.modelPath} (${loaded.format}); eval ${cfg.evalPath}: ${evalSet.examples.length} example(s) of ${evalSet.tasks.join(', ')}; ` +
        `${cfg.settings.length} setting(s) + the uncompressed reference; ${modes.map((m) => MODE_NAME[m]).join(' and ')}`,
    );
    const lines = !progressBarEnabled(process.stderr, process.env);
    let result!: Awaited<ReturnType<typeof runAccuracy>>;
    const results: AccuracySettingResult[] = [];
    for (const mode of modes) {
    const bar = createProgress(process.stderr, process.env, (l) => io.err(l));
    if (modes.length > 1) io.err(`${MODE_NAME[mode]}:`);
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
          queryMode: mode,
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
    runs.push({ queryMode: mode, reference: result.reference, results: result.results });
    // The report's table and plot name the mode; the leaderboard keeps the settings' own names.
    for (const r of result.results)
      results.push(modes.length > 1 ? { ...r, queryMode: mode, label: `${r.label} · ${MODE_NAME[mode]}`, series: `${r.series} · ${MODE_NAME[mode]}` } : { ...r, queryMode: mode });
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
        queryModes: modes,
        attentionQueries: result.attentionQueries,
        prefillTokens: { min: Math.min(...pt), max: Math.max(...pt), mean: pt.reduce((a, b) => a + b, 0) / pt.length },
      },
      reference: runs[0].reference,
      ...(modes.length > 1 ? { references: Object.fromEntries(runs.map((r) => [r.queryMode, r.reference])) } : {}),
      results,
      notes: [...(cfg.data.notes ?? []), ...automaticNotes(results, result.layout.nLayers)],
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
  const lb = cfg.data.leaderboard;
  if (opts.leaderboard || lb) {
    const root = resolve(opts.leaderboard ?? join(resolve(opts.out ?? 'bench-out'), lb?.dir ?? `${name}-leaderboard`));
    const summary = writeLeaderboard(root, {
      dataset: lb?.dataset ?? 'ruler',
      dataDir: lb?.dataDir ?? /(\d+)/.exec(basename(cfg.evalPath))?.[1] ?? String(report.run.prefillTokens.max),
      model: lb?.model ?? basename(cfg.modelPath.replace(/[\\/]+$/, '')),
      examples: evalSet.examples,
      available: evalSet.tasks.reduce((a, t) => a + (evalSet.available[t] ?? 0), 0),
      ...(loaded.tokenizer ? { decode: (ids: number[]) => loaded.tokenizer!.decode(ids) } : {}),
      evalPath: cfg.evalPath,
      backend: choice.name,
      modes: runs,
    });
    if (opts.plot !== false)
      writeFileSync(join(root, 'leaderboard.svg'), await renderRatioPlot(leaderboardPanels(summary), { title: `${summary.dataset} ${summary.dataDir} · ${summary.model}: average score against the measured ratio` }));
    io.err(`wrote ${summary.rows.length} leaderboard run folder(s), leaderboard.md${opts.plot !== false ? ', leaderboard.svg' : ''} and leaderboard.json under ${root}`);
  }
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
    .option('--query-modes <list>', "agnostic (context compressed alone) and/or aware (question compressed too), instead of the config's")
    .option('--leaderboard <dir>', "write kvpress's leaderboard layout (a folder per run, leaderboard.md/.json/.svg) into DIR")
    .action(async (config: string, _opts: AccuracyCommandOptions, cmd: Command) => {
      // `bench` declares --out, --backend, --model, --tokenizer, --require-model and --no-plot too and
      // (commander's default) consumes them wherever they appear: read the merged values.
      state.code = await accuracyCommand(config, cmd.optsWithGlobals<AccuracyCommandOptions>(), io);
    });
}

/**
 * `kvpack bench leaderboard DIR`: summarizes the run folders under DIR (kvpress's layout, written by
 * `kvpack bench accuracy` runs) into DIR/leaderboard.md, .json and .svg, and prints the table.
 */
export async function leaderboardCommand(dir: string, opts: { plot?: boolean }, io: CommandIO = processIO): Promise<number> {
  const root = resolve(dir);
  if (!existsSync(root)) throw new KvpackError('io', `leaderboard folder ${root} does not exist`);
  const summary = summarizeLeaderboardDir(root);
  io.out(leaderboardMarkdown(summary));
  if (opts.plot !== false)
    writeFileSync(join(root, 'leaderboard.svg'), await renderRatioPlot(leaderboardPanels(summary), { title: `${summary.dataset} ${summary.dataDir} · ${summary.model}: average score against the measured ratio` }));
  io.err(`summarized ${summary.rows.length} run folder(s) into ${join(root, 'leaderboard.md')}, .json${opts.plot !== false ? ' and .svg' : ''}`);
  return EXIT.ok;
}

/** Adds `leaderboard` under the `bench` command: `kvpack bench leaderboard DIR [--no-plot]`. */
export function registerLeaderboardCommand(bench: Command, io: CommandIO, state: { code: number }): void {
  bench
    .command('leaderboard')
    .description("summarize kvpress-layout run folders (ruler__<length>__<model>__<method>__<compression_ratio>/) into a table and plot of average score against ratio")
    .argument('<dir>', 'folder holding the run folders')
    .option('--no-plot', 'skip the SVG plot')
    .action(async (dir: string, _opts: { plot?: boolean }, cmd: Command) => {
      state.code = await leaderboardCommand(dir, cmd.optsWithGlobals<{ plot?: boolean }>(), io);
    });
}
