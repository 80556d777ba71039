import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { extname, join, resolve } from 'node:path';
import type { Command } from 'commander';
import { KvpackError, check, describeBackend, readConfigFile, selectBackend } from '@kvpack/core';
import { EXIT, processIO, type CommandIO } from './commands.js';
import { resolveSettings } from './config.js';
import { backendOption } from './environment.js';
import { defaultModelPaths } from './generate.js';
import { loadBenchModel } from './load.js';
import { methodName } from './accuracy/leaderboard.js';
import type { AccuracyModel } from './accuracy/runner.js';
import { markdownTable } from './report.js';
import { renderNeedleHeatmap, runNeedleSweep, type NeedleSweep } from './needle.js';

/** Options of `kvpack bench needle`. */
export interface NeedleCommandOptions {
  model?: string;
  tokenizer?: string;
  /** Strategy config file (JSON/YAML `{ name, options }`) or a registered name at its defaults. */
  strategy?: string;
  lengths?: string;
  depths?: string;
  samples?: string;
  queryMode?: string;
  seed?: string;
  digits?: string;
  out?: string;
  backend?: string;
  plot?: boolean;
}

function numberList(v: string | undefined, name: string, fallback: number[]): number[] {
  if (v === undefined) return fallback;
  const xs = v
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean)
    .map(Number);
  check(xs.length > 0 && xs.every(Number.isFinite), 'config', `${name} takes comma-separated numbers, got "${v}"`);
  return xs;
}

/** The setting of `--strategy`: a JSON/YAML file `{ name, options, label?, series? }`, else a registered name at its defaults. */
function strategySetting(arg: string) {
  const ext = extname(arg).toLowerCase();
  const isFile = existsSync(arg) || ext === '.json' || ext === '.yaml' || ext === '.yml';
  const entry = isFile ? readConfigFile(resolve(arg)) : { name: arg };
  check(entry !== null && typeof entry === 'object' && !Array.isArray(entry), 'config', `--strategy ${arg}: expected { name, options }`);
  const settings = resolveSettings([entry as never], isFile ? resolve(arg) : '--strategy');
  check(settings.length === 1, 'config', `--strategy ${arg} expands to ${settings.length} settings (${settings.map((s) => s.label).join('; ')}); the needle sweep takes one`);
  return settings[0];
}

/** The sweep as a Markdown table: one row per depth, one column per context length. */
export function needleMarkdown(s: NeedleSweep): string {
  const lengths = [...new Set(s.cells.map((c) => c.length))];
  const depths = [...new Set(s.cells.map((c) => c.depth))];
  const f = (x: number) => (Number.isFinite(x) ? x.toFixed(2) : 'n/a');
  const rows = depths.map((d) => [
    `${Math.round(d * 100)}%`,
    ...lengths.map((l) => {
      const c = s.cells.find((x) => x.length === l && x.depth === d)!;
      return `${f(c.accuracy)} / ${f(c.reference)} / ${f(c.agreement)}`;
    }),
  ]);
  const ratio = s.cells.filter((c) => Number.isFinite(c.ratio)).map((c) => `${c.length}: ${c.ratio.toFixed(2)}×`);
  return [
    `## needle retrieval: ${s.setting} (${s.queryMode === 'aware' ? 'query-aware' : 'query-agnostic'}, ${s.samples} prompt(s) per cell)`,
    '',
    markdownTable(['depth', ...lengths.map((l) => `${l} tokens`)], rows, ['l', ...lengths.map(() => 'r' as const)]),
    '',
    'Cells: exact-match accuracy through the compressed cache / of the uncompressed model / agreement with the uncompressed answer.',
    `Measured ratio (dense fp16 ÷ held) by length: ${[...new Set(ratio)].join(', ') || 'n/a'}.`,
    ...(s.error ? ['', `**failed:** ${s.error}`] : []),
  ].join('\n');
}

/**
 * `kvpack bench needle`: the needle depth × context length sweep of one strategy; prints the table,
 * writes OUT/needle-<method>.json, .md and the heatmaps (accuracy, agreement) as SVG.
 * @returns 0, or 2 when the strategy failed on a prompt.
 */
export async function needleCommand(opts: NeedleCommandOptions, io: CommandIO = processIO): Promise<number> {
  await import('@kvpack/xkv');
  await import('@kvpack/baselines');
  const lengths = numberList(opts.lengths, '--lengths', [256, 512, 1024]);
  const depths = numberList(opts.depths, '--depths', [0, 0.25, 0.5, 0.75, 1]);
  const samples = numberList(opts.samples, '--samples', [1])[0];
  const seed = numberList(opts.seed, '--seed', [0])[0];
  const digits = numberList(opts.digits, '--digits', [7])[0];
  const queryMode = opts.queryMode ?? 'agnostic';
  check(queryMode === 'agnostic' || queryMode === 'aware', 'config', `--query-mode takes agnostic or aware, got "${queryMode}"`);
  const setting = strategySetting(opts.strategy ?? 'dense');
  const defaults = defaultModelPaths();
  const modelPath = opts.model ? resolve(opts.model) : defaults.model;
  const tokenizerPath = opts.tokenizer ? resolve(opts.tokenizer) : opts.model ? undefined : defaults.tokenizer;
  for (const p of [modelPath, ...(tokenizerPath ? [tokenizerPath] : [])])
    check(existsSync(p), 'io', `model file not found: ${p} (pass --model FILE, or set KVPACK_MODELS_DIR to the folder holding stories260K/)`);
  const choice = await selectBackend(opts.backend ?? (process.env.KVPACK_BACKEND || 'auto'));
  io.err(describeBackend(choice));
  const { model, tokenizer } = await loadBenchModel(modelPath, tokenizerPath);
  let sweep: NeedleSweep;
  try {
    if (!tokenizer) throw new KvpackError('config', 'the needle sweep synthesizes text prompts: the model has no tokenizer, pass --tokenizer FILE');
    for (const l of lengths) check(l < model.config.maxSeqLen, 'config', `--lengths: ${l} tokens (plus the answer) exceed the model's ${model.config.maxSeqLen}-token context`);
    io.err(`needle sweep: ${setting.label}, lengths ${lengths.join(', ')}, depths ${depths.join(', ')}, ${samples} prompt(s) per cell, ${queryMode === 'aware' ? 'query-aware' : 'query-agnostic'}`);
    sweep = await runNeedleSweep(model as AccuracyModel, tokenizer, setting, {
      lengths,
      depths,
      samples,
      seed,
      digits,
      queryMode,
      onCell: (d, n) => io.err(`[${d}/${n}] cells`),
    });
  } finally {
    model.dispose();
  }
  const md = needleMarkdown(sweep);
  io.out(md);
  const outDir = resolve(opts.out ?? 'bench-out');
  mkdirSync(outDir, { recursive: true });
  const stem = join(outDir, `needle-${methodName(setting.label)}`);
  const written = [`${stem}.json`, `${stem}.md`];
  writeFileSync(written[0], `${JSON.stringify({ format: 'kvpack-needle/1', model: modelPath, backend: choice.name, strategy: { name: setting.name, options: setting.resolvedOptions }, ...sweep }, null, 2)}\n`);
  writeFileSync(written[1], `${md}\n`);
  if (opts.plot !== false)
    for (const metric of ['accuracy', 'agreement'] as const) {
      const f = `${stem}${metric === 'accuracy' ? '' : '-agreement'}.svg`;
      writeFileSync(f, await renderNeedleHeatmap(sweep, metric));
      written.push(f);
    }
  io.err(`wrote ${written.join(', ')}`);
  if (sweep.error) {
    io.err(`kvpack: error: ${sweep.setting} failed: ${sweep.error}`);
    return EXIT.badInput;
  }
  return EXIT.ok;
}

/**
 * Adds `needle` under the `bench` command: `kvpack bench needle [--model FILE] [--strategy FILE|NAME]
 * [--lengths 256,512,1024] [--depths 0,0.25,0.5,0.75,1] [--samples N] [--query-mode agnostic|aware]
 * [--out DIR] [--backend …] [--no-plot]`.
 */
export function registerNeedleCommand(bench: Command, io: CommandIO, state: { code: number }): void {
  bench
    .command('needle')
    .description('needle-in-a-haystack sweep: retrieval accuracy by needle depth × context length through a compressed cache, as an SVG heatmap')
    .option('--model <file>', 'model checkpoint or folder (default: the embedded stories260K)')
    .option('--tokenizer <file>', 'tokenizer file (default: the one the model carries or sits beside)')
    .option('--strategy <file|name>', 'strategy config file (JSON/YAML { name, options }) or a strategy name at its defaults', 'dense')
    .option('--lengths <list>', 'comma-separated context lengths in tokens', '256,512,1024')
    .option('--depths <list>', 'comma-separated needle depths in [0, 1]', '0,0.25,0.5,0.75,1')
    .option('--samples <n>', 'prompts per cell (different keys, numbers and haystacks)', '1')
    .option('--query-mode <mode>', 'agnostic (the question is read through the compressed cache) or aware (compressed with the context)', 'agnostic')
    .option('--seed <n>', 'seed of the magic numbers', '0')
    .option('--digits <n>', 'digits of each magic number', '7')
    .option('--out <dir>', 'folder for the JSON, Markdown and SVG outputs', 'bench-out')
    .addOption(backendOption())
    .option('--no-plot', 'skip the SVG heatmaps')
    .action(async (_opts: NeedleCommandOptions, cmd: Command) => {
      state.code = await needleCommand(cmd.optsWithGlobals<NeedleCommandOptions>(), io);
    });
}
