import { existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { KvpackError } from '@kvpack/core';
import { parse as parseYaml, stringify as stringifyYaml } from 'yaml';
import { z } from 'zod';
import type { PlotPanel } from '../plot.js';
import { markdownTable } from '../report.js';
import { parseCsvRecords, stringifyCsv } from './csv.js';
import type { EvalExample } from './dataset.js';
import type { AccuracyReference, AccuracySettingResult, QueryMode } from './runner.js';

// Results in the layout of kvpress's leaderboard (NVIDIA/kvpress evaluation/): one folder per run,
// `<dataset>__<data_dir>__<model>__<press_name>__<compression_ratio:.2f>[__query_aware]/` holding
// config.yaml, metrics.json (per task: { string_match } in percent) and predictions.csv, where
// compression_ratio is the fraction of the cache removed (0.5 = 2×, 0.875 = 8×). Here it is the
// measured one: 1 − bytes held ÷ dense fp16 bytes, Σ over the examples.

/** The compression ratios (×) of the summary's columns. */
export const LEADERBOARD_RATIOS = [2, 4, 8, 16, 32] as const;

/** kvpress's compression_ratio (fraction removed) of a ratio × (dense ÷ held): 2× → 0.5, 8× → 0.875. */
export function removedFraction(ratio: number): number {
  return 1 - 1 / ratio;
}

/** The ratio × of kvpress's compression_ratio: 0.5 → 2×, 0.875 → 8×. @throws KvpackError('config') outside [0, 1). */
export function ratioOfRemovedFraction(cr: number): number {
  if (!(cr >= 0 && cr < 1)) throw new KvpackError('config', `compression_ratio (fraction removed) must be in [0, 1), got ${cr}`);
  return 1 / (1 - cr);
}

/** A folder-name component: the setting's series with anything but [A-Za-z0-9._=+-] made `-`. */
export function methodName(series: string): string {
  return series.trim().replace(/\s+/g, '_').replace(/[^A-Za-z0-9._=+-]/g, '-') || 'method';
}

/** `config.yaml` of one run: kvpress's EvaluationConfig fields, then kvpack's own under `kvpack`. */
export const RunConfigSchema = z.object({
  dataset: z.string(),
  data_dir: z.string(),
  model: z.string(),
  press_name: z.string(),
  /** Measured fraction removed, 1 − bytes ÷ dense fp16 bytes (kvpress's convention). */
  compression_ratio: z.number(),
  query_aware: z.boolean(),
  fraction: z.number(),
  max_new_tokens: z.number().int().nullable(),
  kvpack: z.object({
    label: z.string(),
    strategy: z.object({ name: z.string(), options: z.record(z.string(), z.unknown()) }).nullable(),
    /** Measured ratio ×: dense fp16 bytes ÷ bytes held. */
    ratio: z.number(),
    bytes: z.number().int(),
    dense_bytes: z.number().int(),
    examples: z.number().int(),
    eval: z.string(),
    backend: z.string(),
    /** The config's knob for the ratio, when the setting has one (targetRatio, budget, rank …). */
    options: z.record(z.string(), z.unknown()),
  }),
});
export type RunConfig = z.infer<typeof RunConfigSchema>;

/** `metrics.json`: per task, kvpress's RULER string_match (percent) and kvpack's exact match (percent). */
export const RunMetricsSchema = z.record(z.string(), z.object({ string_match: z.number(), exact_match: z.number() }));
export type RunMetrics = z.infer<typeof RunMetricsSchema>;

/** One row of `predictions.csv`, as read back. */
export const PredictionRowSchema = z.object({
  example: z.string(),
  task: z.string(),
  question: z.string(),
  answer: z.string(),
  predicted_answer: z.string(),
  correct: z.enum(['True', 'False']),
  compression_ratio: z.coerce.number(),
  context_length: z.coerce.number().int(),
  bytes: z.coerce.number().int(),
});
export type PredictionRow = z.infer<typeof PredictionRowSchema>;

const PREDICTION_COLUMNS = Object.keys(PredictionRowSchema.shape) as (keyof PredictionRow)[];

/** One run's results, as {@link writeLeaderboard} takes them. */
export interface LeaderboardMode {
  queryMode: QueryMode;
  reference: AccuracyReference;
  results: AccuracySettingResult[];
}

/** What {@link writeLeaderboard} needs besides the results. */
export interface LeaderboardInput {
  /** kvpress `dataset`, e.g. `ruler`. */
  dataset: string;
  /** kvpress `data_dir`: the context length, e.g. `1024`. */
  dataDir: string;
  /** Model name (slashes become `--`, as kvpress writes them). */
  model: string;
  /** The eval examples (every run saw all of them, in this order). */
  examples: EvalExample[];
  /** Examples in the file, for kvpress's `fraction`. */
  available: number;
  /** Token ids → text (the answers' and predictions' text); ids joined by spaces when absent. */
  decode?: (ids: number[]) => string;
  evalPath: string;
  backend: string;
  modes: LeaderboardMode[];
}

/** One row of the summary: a run folder and its scores. */
export interface LeaderboardRow {
  folder: string;
  method: string;
  label: string;
  queryAware: boolean;
  /** Measured ratio × (dense fp16 ÷ held); 1 for the uncompressed reference. */
  ratio: number;
  /** Measured fraction removed. */
  compressionRatio: number;
  /** Mean over tasks of string_match (percent), kvpress's average score. */
  score: number;
  tasks: RunMetrics;
  /** The summary column (2×, 4×, … 32×) the measured ratio falls on (within 2^±0.25), or null. */
  column: number | null;
}

/** The summary {@link writeLeaderboard} writes as leaderboard.json. */
export interface LeaderboardSummary {
  format: 'kvpack-leaderboard/1';
  dataset: string;
  dataDir: string;
  model: string;
  ratios: number[];
  rows: LeaderboardRow[];
  /** Per query mode and column: the best run there (highest score, then highest measured ratio). */
  best: { queryAware: boolean; ratio: number; folder: string; method: string; score: number; measuredRatio: number }[];
}

/** The column of a measured ratio: the nearest of 2×…32× within a factor 2^0.25, else null. */
export function ratioColumn(ratio: number): number | null {
  for (const r of LEADERBOARD_RATIOS) if (Math.abs(Math.log2(ratio / r)) <= 0.25) return r;
  return null;
}

/** kvpress's RULER string_match_all for one reference: percent of predictions containing it (case-insensitive, control characters removed). */
function stringMatch(preds: string[], refs: string[]): number {
  if (!preds.length) return NaN;
  const clean = (s: string) => s.replace(/[\x00-\x1f]/g, '').trim().toLowerCase();
  const hits = preds.filter((p, i) => clean(p).includes(refs[i].trim().toLowerCase())).length;
  return Math.round((hits / preds.length) * 100 * 100) / 100;
}

function round(x: number, d: number): number {
  const f = 10 ** d;
  return Math.round(x * f) / f;
}

/** Folder of a run: kvpress's name; when it exists already, a numbered folder inside it (as kvpress does). */
function runFolder(root: string, parts: string[]): string {
  let dir = join(root, parts.filter(Boolean).join('__'));
  if (existsSync(dir)) {
    let i = 1;
    while (existsSync(join(dir, `${i}`))) i++;
    dir = join(dir, `${i}`);
  }
  mkdirSync(dir, { recursive: true });
  return dir;
}

interface RunOutcome {
  label: string;
  method: string;
  strategy: { name: string; options: Record<string, unknown> } | null;
  options: Record<string, unknown>;
  bytes: number;
  denseBytes: number;
  examples: { example: string; task: string; predicted: number[]; correct: boolean; bytes: number; denseBytes: number; tokens: number }[];
}

/**
 * Writes one folder per (query mode, setting) — and one `no_press` folder per query mode for the
 * uncompressed reference — under `root`, then `leaderboard.json` and `leaderboard.md` (average
 * score per method against the measured ratio at 2×, 4×, 8×, 16×, 32×, per query mode, with the
 * best run of each column). Settings that failed are skipped.
 * @returns the summary (its folders relative to `root`).
 */
export function writeLeaderboard(root: string, input: LeaderboardInput): LeaderboardSummary {
  mkdirSync(root, { recursive: true });
  const decode = input.decode ?? ((ids: number[]) => ids.join(' '));
  const byId = new Map(input.examples.map((e) => [e.id, e]));
  const model = input.model.replace(/\//g, '--');
  const rows: LeaderboardRow[] = [];
  for (const mode of input.modes) {
    const aware = mode.queryMode === 'aware';
    const runs: RunOutcome[] = [];
    // The uncompressed reference (dense float32 in memory; kvpress's no_press, compression_ratio 0).
    runs.push({
      label: 'uncompressed',
      method: 'no_press',
      strategy: null,
      options: {},
      bytes: 0,
      denseBytes: 0,
      examples: mode.reference.examples.map((e) => ({ ...e, bytes: 0, denseBytes: 0, tokens: byId.get(e.example)?.contextTokens ?? 0 })),
    });
    for (const r of mode.results) {
      if (r.error !== undefined || !r.examples.length) continue;
      runs.push({
        label: r.label,
        method: methodName(r.series),
        strategy: { name: r.name, options: r.resolvedOptions },
        options: r.options,
        bytes: r.bytes,
        denseBytes: r.denseBytes,
        examples: r.examples,
      });
    }
    for (const run of runs) {
      const ratio = run.bytes > 0 ? run.denseBytes / run.bytes : 1;
      const cr = run.bytes > 0 ? 1 - run.bytes / run.denseBytes : 0;
      const dir = runFolder(root, [input.dataset, input.dataDir, model, run.method, cr.toFixed(2), aware ? 'query_aware' : '']);
      const preds = run.examples.map((o) => {
        const ex = byId.get(o.example);
        if (!ex) throw new KvpackError('config', `leaderboard: example ${o.example} is not among the eval examples`);
        const split = ex.contextTokens ?? ex.inputIds.length;
        return {
          example: o.example,
          task: o.task,
          question: decode(ex.inputIds.slice(split)),
          answer: ex.answer ?? decode(ex.answerIds),
          predicted_answer: decode(o.predicted),
          correct: o.correct ? 'True' : 'False',
          compression_ratio: o.bytes > 0 ? 1 - o.bytes / o.denseBytes : 0,
          context_length: o.tokens,
          bytes: o.bytes,
        } satisfies Record<keyof PredictionRow, unknown>;
      });
      const tasks = [...new Set(preds.map((p) => p.task))];
      const metrics: RunMetrics = Object.fromEntries(
        tasks.map((t) => {
          const of = preds.filter((p) => p.task === t);
          return [
            t,
            {
              string_match: stringMatch(
                of.map((p) => p.predicted_answer),
                of.map((p) => p.answer),
              ),
              exact_match: round((of.filter((p) => p.correct === 'True').length / of.length) * 100, 2),
            },
          ];
        }),
      );
      const config: RunConfig = {
        dataset: input.dataset,
        data_dir: input.dataDir,
        model: input.model,
        press_name: run.method,
        compression_ratio: cr,
        query_aware: aware,
        fraction: preds.length / Math.max(input.available, preds.length),
        max_new_tokens: null,
        kvpack: {
          label: run.label,
          strategy: run.strategy,
          ratio,
          bytes: run.bytes,
          dense_bytes: run.denseBytes,
          examples: preds.length,
          eval: input.evalPath,
          backend: input.backend,
          options: run.options,
        },
      };
      writeFileSync(join(dir, 'config.yaml'), stringifyYaml(config));
      writeFileSync(join(dir, 'metrics.json'), `${JSON.stringify(metrics, null, 4)}\n`);
      writeFileSync(join(dir, 'predictions.csv'), stringifyCsv([PREDICTION_COLUMNS, ...preds.map((p) => PREDICTION_COLUMNS.map((c) => p[c]))]));
      const scores = Object.values(metrics).map((m) => m.string_match);
      rows.push({
        folder: dir.slice(root.length + 1),
        method: run.method,
        label: run.label,
        queryAware: aware,
        ratio,
        compressionRatio: cr,
        score: scores.reduce((a, b) => a + b, 0) / scores.length,
        tasks: metrics,
        column: run.bytes > 0 ? ratioColumn(ratio) : null,
      });
    }
  }
  return summarizeLeaderboard(root, rows, input);
}

/**
 * The summary of `rows`: the best run per query mode and column, written as leaderboard.json and
 * leaderboard.md under `root`.
 */
export function summarizeLeaderboard(root: string, rows: LeaderboardRow[], id: { dataset: string; dataDir: string; model: string }): LeaderboardSummary {
  const best: LeaderboardSummary['best'] = [];
  for (const aware of [false, true])
    for (const col of LEADERBOARD_RATIOS) {
      const at = rows.filter((r) => r.queryAware === aware && r.column === col);
      if (!at.length) continue;
      const b = at.reduce((x, y) => (y.score > x.score || (y.score === x.score && y.ratio > x.ratio) ? y : x));
      best.push({ queryAware: aware, ratio: col, folder: b.folder, method: b.method, score: b.score, measuredRatio: b.ratio });
    }
  const summary: LeaderboardSummary = { format: 'kvpack-leaderboard/1', dataset: id.dataset, dataDir: id.dataDir, model: id.model, ratios: [...LEADERBOARD_RATIOS], rows, best };
  writeFileSync(join(root, 'leaderboard.json'), `${JSON.stringify(summary, null, 2)}\n`);
  writeFileSync(join(root, 'leaderboard.md'), `${leaderboardMarkdown(summary)}\n`);
  return summary;
}

/** The summary row of a run folder read back. */
export function leaderboardRow(folder: string, run: LeaderboardRun): LeaderboardRow {
  const scores = Object.values(run.metrics).map((m) => m.string_match);
  const compressed = run.config.kvpack.bytes > 0;
  return {
    folder,
    method: run.config.press_name,
    label: run.config.kvpack.label,
    queryAware: run.config.query_aware,
    ratio: run.config.kvpack.ratio,
    compressionRatio: run.config.compression_ratio,
    score: scores.reduce((a, b) => a + b, 0) / scores.length,
    tasks: run.metrics,
    column: compressed ? ratioColumn(run.config.kvpack.ratio) : null,
  };
}

/**
 * Summarizes the run folders under `root` (e.g. written by several runs: one per query mode or per
 * method): every folder holding a config.yaml, or for a folder rerun in place its latest numbered
 * run. Runs of another dataset, data_dir or model than the first one found are an error.
 * @throws KvpackError('config') when there is no run folder or the runs disagree; read errors as {@link readLeaderboardRun}.
 */
export function summarizeLeaderboardDir(root: string): LeaderboardSummary {
  const rows: LeaderboardRow[] = [];
  let id: { dataset: string; dataDir: string; model: string } | undefined;
  for (const name of readdirSync(root).sort()) {
    const dir = join(root, name);
    if (!statSync(dir).isDirectory() || !existsSync(join(dir, 'config.yaml'))) continue;
    const reruns = readdirSync(dir).filter((n) => /^\d+$/.test(n) && existsSync(join(dir, n, 'config.yaml')));
    const latest = reruns.length ? join(name, String(Math.max(...reruns.map(Number)))) : name;
    const run = readLeaderboardRun(join(root, latest));
    const c = run.config;
    id ??= { dataset: c.dataset, dataDir: c.data_dir, model: c.model };
    if (c.dataset !== id.dataset || c.data_dir !== id.dataDir || c.model !== id.model)
      throw new KvpackError('config', `${latest}: a run of ${c.dataset} ${c.data_dir} ${c.model}, the others are of ${id.dataset} ${id.dataDir} ${id.model}`);
    rows.push(leaderboardRow(latest, run));
  }
  if (!id) throw new KvpackError('config', `${root} holds no leaderboard run folder (a folder with config.yaml, metrics.json and predictions.csv)`);
  return summarizeLeaderboard(root, rows, id);
}

/**
 * The summary table: per query mode, one row per method (its label's series), one column per ratio
 * (2× … 32×) holding the average score and the measured ratio, then a row of the best per column.
 */
export function leaderboardMarkdown(s: LeaderboardSummary): string {
  const out: string[] = [
    `## ${s.dataset} ${s.dataDir} · ${s.model}: average score (string_match, %) against the measured compression ratio`,
    '',
    'Columns: kvpack ratio × (dense fp16 bytes ÷ bytes held) and kvpress compression_ratio (fraction removed). ' +
      'A cell holds the score and the measured ratio of the run whose ratio is within 2^±0.25 of the column (the best one when several are).',
  ];
  for (const aware of [false, true]) {
    const rows = s.rows.filter((r) => r.queryAware === aware);
    if (!rows.length) continue;
    const ref = rows.find((r) => r.method === 'no_press');
    out.push('', `### ${aware ? 'query-aware (question compressed with the context)' : 'query-agnostic (context compressed alone, question read through the cache)'}`, '');
    if (ref) out.push(`uncompressed: ${ref.score.toFixed(2)}`, '');
    const methods = [...new Set(rows.filter((r) => r.method !== 'no_press').map((r) => r.method))];
    const head = ['method', ...s.ratios.map((r) => `${r}× (${removedFraction(r).toFixed(3).replace(/0+$/, '')})`), 'other ratios'];
    const cell = (rs: LeaderboardRow[]) => {
      if (!rs.length) return '–';
      const b = rs.reduce((x, y) => (y.score > x.score ? y : x));
      return `${b.score.toFixed(1)} (${b.ratio.toFixed(1)}×)`;
    };
    const body = methods.map((m) => {
      const of = rows.filter((r) => r.method === m);
      return [
        m,
        ...s.ratios.map((c) => cell(of.filter((r) => r.column === c))),
        of
          .filter((r) => r.column === null)
          .map((r) => `${r.score.toFixed(1)} (${r.ratio.toFixed(1)}×)`)
          .join(', ') || '–',
      ];
    });
    body.push([
      '**best**',
      ...s.ratios.map((c) => {
        const b = s.best.find((x) => x.queryAware === aware && x.ratio === c);
        return b ? `${b.method} ${b.score.toFixed(1)} (${b.measuredRatio.toFixed(1)}×)` : '–';
      }),
      '',
    ]);
    out.push(markdownTable(head, body, ['l', ...s.ratios.map(() => 'r' as const), 'l']));
  }
  return out.join('\n');
}

/** A run folder read back and validated. */
export interface LeaderboardRun {
  config: RunConfig;
  metrics: RunMetrics;
  predictions: PredictionRow[];
}

/**
 * Reads one run folder (config.yaml with `yaml`, metrics.json and predictions.csv) and validates it.
 * @throws KvpackError('io') for a missing file; KvpackError('corrupt') for content that does not match the layout.
 */
export function readLeaderboardRun(dir: string): LeaderboardRun {
  const read = (f: string) => {
    try {
      return readFileSync(join(dir, f), 'utf8');
    } catch (e) {
      throw new KvpackError('io', `leaderboard run ${dir}: cannot read ${f}: ${(e as Error).message}`, { cause: e });
    }
  };
  const parsed = <T>(schema: z.ZodType<T>, value: unknown, f: string): T => {
    const r = schema.safeParse(value);
    if (!r.success) throw new KvpackError('corrupt', `leaderboard run ${dir}: ${f}: ${r.error.issues.map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`).join('; ')}`);
    return r.data;
  };
  const config = parsed(RunConfigSchema, parseYaml(read('config.yaml')), 'config.yaml');
  let metricsRaw: unknown;
  try {
    metricsRaw = JSON.parse(read('metrics.json'));
  } catch (e) {
    if (e instanceof KvpackError) throw e;
    throw new KvpackError('corrupt', `leaderboard run ${dir}: metrics.json is not JSON: ${(e as Error).message}`, { cause: e });
  }
  const metrics = parsed(RunMetricsSchema, metricsRaw, 'metrics.json');
  const predictions = parseCsvRecords(read('predictions.csv')).map((r, i) => parsed(PredictionRowSchema, r, `predictions.csv row ${i + 2}`));
  return { config, metrics, predictions };
}

/** Plot panels for {@link renderRatioPlot}: average score against the measured ratio, one panel per query mode, one line per method. */
export function leaderboardPanels(s: LeaderboardSummary): PlotPanel[] {
  const panels: PlotPanel[] = [];
  for (const aware of [false, true]) {
    const rows = s.rows.filter((r) => r.queryAware === aware);
    if (!rows.length) continue;
    const ref = rows.find((r) => r.method === 'no_press');
    panels.push({
      title: `${aware ? 'query-aware' : 'query-agnostic'}${ref ? ` (uncompressed ${ref.score.toFixed(1)})` : ''}`,
      yTitle: 'average score (string_match, %)',
      points: rows.filter((r) => r.method !== 'no_press').map((r) => ({ ratio: r.ratio, value: r.score, series: r.method, label: r.label })),
    });
  }
  return panels;
}
