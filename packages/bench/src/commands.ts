import { mkdirSync, writeFileSync } from 'node:fs';
import { basename, extname, join, resolve } from 'node:path';
import { KvpackError, describeBackend, getStrategyDefinition, listStrategies, parseStrategyOptions, selectBackend } from '@kvpack/core';
import { z } from 'zod';
import { loadConfig, quickOverrides, type BenchConfig } from './config.js';
import { loadBenchModel, modelFilesPresent, tokenizePrompts } from './load.js';
import { benchPanels, renderRatioPlot } from './plot.js';
import { createProgress } from './progress.js';
import { compareToBaseline, parseTolerance, readBaseline, toBaseline, writeBaseline } from './regression.js';
import { ERROR_BASIS, markdownReport, type BenchReport } from './report.js';
import { runBench } from './runner.js';
import { runEnvironment } from './environment.js';
import { loadConfigPlugins } from './plugins.js';
import { withCompressionRatio } from './schemas.js';
import { resolveStrategy, strategyCompressesMla } from './strategy.js';

/** Where commands write: `out` for results (stdout), `err` for logs (stderr). */
export interface CommandIO {
  out(text: string): void;
  err(text: string): void;
  /** Raw output on stdout, no newline added (streamed text); `out` when absent. */
  write?(text: string): void;
}

export const processIO: CommandIO = {
  write: (t) => void process.stdout.write(t),
  out: (t) => void process.stdout.write(t.endsWith('\n') ? t : `${t}\n`),
  err: (t) => void process.stderr.write(t.endsWith('\n') ? t : `${t}\n`),
};

/** Exit codes of the kvpack CLI. */
export const EXIT = { ok: 0, regression: 1, badInput: 2, internal: 3 } as const;

/** Options of `kvpack bench CONFIG`. */
export interface BenchCommandOptions {
  out?: string;
  backend?: string;
  quick?: boolean;
  /** Override the config's model / tokenizer (paths relative to the working directory). */
  model?: string;
  tokenizer?: string;
  /** Accepted for older scripts: an absent model always exits 2. */
  requireModel?: boolean;
  baseline?: string;
  writeBaseline?: boolean;
  tolerance?: string;
  /** Skip the SVG plot. */
  plot?: boolean;
  /** Print the report as JSON on stdout (the baseline check's lines go to stderr). */
  json?: boolean;
}


/**
 * Lines explaining where to get the model when its files are absent: the config's `modelSource`
 * (where the published checkpoints come from), then the ways to point the run at them.
 */
export function missingModelMessage(cfg: BenchConfig, missing: string[]): string {
  const lines = [
    `model files not found: ${missing.join(', ')}`,
    ...(cfg.data.modelSource ? cfg.data.modelSource.trim().split('\n').map((l) => `  ${l}`) : []),
    `  Point the run at a model: set KVPACK_MODELS_DIR to the folder holding "${cfg.data.model}"${cfg.data.tokenizer ? ` and "${cfg.data.tokenizer}"` : ''},`,
    `  edit "model:"${cfg.data.tokenizer ? '/"tokenizer:"' : ''} in ${cfg.source}, or pass the files (any llama2.c checkpoint, Hugging Face Llama folder or GGUF file):`,
    `    kvpack bench ${cfg.source} --model FILE${cfg.data.tokenizer ? ' --tokenizer FILE' : ''}`,
  ];
  return lines.join('\n');
}

function stem(path: string): string {
  return basename(path, extname(path));
}

/**
 * `kvpack bench CONFIG`: runs the config, prints the Markdown table on stdout, writes
 * OUT/<config>.json, .md and .svg, and checks or writes a baseline.
 * @returns the exit code (0 ok, 1 regression); throws KvpackError on bad input, an absent model included.
 */
export async function benchCommand(configPath: string, opts: BenchCommandOptions, io: CommandIO = processIO): Promise<number> {
  await import('@kvpack/xkv');
  await import('@kvpack/baselines');
  if (opts.writeBaseline && !opts.baseline) throw new KvpackError('config', '--write-baseline needs --baseline FILE (where to write it)');
  const tolerance = parseTolerance(opts.tolerance);
  await loadConfigPlugins(configPath);
  const cfg = loadConfig(configPath);
  if (opts.model) cfg.modelPath = resolve(opts.model);
  if (opts.tokenizer) cfg.tokenizerPath = resolve(opts.tokenizer);
  const present = modelFilesPresent(cfg);
  // A missing model is an error (exit 2), so that CI cannot pass without running anything.
  if (!present.ok) throw new KvpackError('io', missingModelMessage(cfg, present.missing));
  const choice = await selectBackend(opts.backend ?? (process.env.KVPACK_BACKEND || 'auto'));
  const backendLine = describeBackend(choice);
  io.err(backendLine);
  const q = quickOverrides(cfg);
  const run = opts.quick
    ? { decodeTokens: q.decodeTokens, repeats: q.repeats, continuationTokens: q.continuationTokens, maxPrompts: q.maxPrompts }
    : { decodeTokens: cfg.data.decodeTokens, repeats: cfg.data.repeats, continuationTokens: cfg.data.continuationTokens, maxPrompts: cfg.prompts.length };

  const loaded = await loadBenchModel(cfg.modelPath, cfg.tokenizerPath);
  const report: BenchReport = await (async () => {
    try {
      const prompts = tokenizePrompts(cfg.prompts, loaded.tokenizer, { bos: cfg.data.bos, continuationTokens: run.continuationTokens, maxPrompts: run.maxPrompts });
      io.err(
        `model ${cfg.modelPath} (${loaded.format}); ${prompts.length} prompt(s), ${cfg.settings.length} setting(s), ` +
          `${run.decodeTokens} greedy tokens, ${run.repeats} compress repeat(s)`,
      );
      const progress = createProgress(process.stderr, process.env, (l) => io.err(l));
      let result;
      try {
        result = await runBench(loaded.model, prompts, cfg.settings, { decodeTokens: run.decodeTokens, repeats: run.repeats }, progress);
      } finally {
        progress.stop();
      }
      return {
        format: 'kvpack-bench/1',
        ...(cfg.data.title ? { title: cfg.data.title } : {}),
        environment: runEnvironment(choice.name, backendLine, Boolean(opts.quick)),
        config: { source: cfg.source, data: cfg.data },
        model: { path: cfg.modelPath, ...(cfg.tokenizerPath ? { tokenizer: cfg.tokenizerPath } : {}), layout: result.layout },
        run: { decodeTokens: run.decodeTokens, repeats: run.repeats, prompts: prompts.length },
        errorBasis: ERROR_BASIS,
        references: result.references,
        results: result.results,
      };
    } finally {
      loaded.model.dispose();
    }
  })();

  for (const r of report.references) {
    if (Math.abs(r.decodePathNllDelta) > 1e-3 || r.greedyForwardAgreement < 1)
      io.err(
        `warning: prompt "${r.prompt}": the model's decode path disagrees with its forward pass (dense float32 ΔNLL ${r.decodePathNllDelta.toExponential(2)}, ` +
          `greedy/forward agreement ${r.greedyForwardAgreement.toFixed(3)}); the numbers below are suspect`,
      );
  }
  const md = markdownReport(report);
  io.out(opts.json ? JSON.stringify(report, null, 2) : md);
  const say = opts.json ? io.err : io.out; // stdout stays one JSON document with --json
  const name = stem(configPath);
  await writeBenchOutputs(io, opts, name, report, md, () =>
    renderRatioPlot(benchPanels(report.results), { title: report.title ?? `kvpack bench: ${name}` }),
  );
  const failedExit = failedSettingsExit(report.results, io);
  if (failedExit !== null) return failedExit;
  if (opts.baseline && opts.writeBaseline) {
    const p = writeBaseline(opts.baseline, toBaseline(report, basename(cfg.source)));
    io.err(`wrote baseline ${p} (${report.results.length} settings)`);
    return EXIT.ok;
  }
  if (opts.baseline) {
    const cmp = compareToBaseline(report.results, readBaseline(opts.baseline), tolerance);
    for (const n of cmp.notes) io.err(`note: ${n}`);
    if (cmp.added.length) io.err(`note: not in the baseline (unchecked): ${cmp.added.join('; ')}`);
    const tolText = `tolerance: errors +${(tolerance.relError * 100).toFixed(1)}% relative, ΔNLL +${tolerance.deltaNll} nats, agreement −${tolerance.agreement}, bytes exact`;
    if (cmp.regressions.length) {
      say(`\nREGRESSION against ${opts.baseline} (${tolText}):`);
      for (const r of cmp.regressions) say(`  - ${r.message}`);
      return EXIT.regression;
    }
    say(`\nbaseline check passed: ${cmp.checked} setting(s) within ${tolText}`);
  }
  return EXIT.ok;
}

/** Type and bounds of a JSON-schema value: `integer, > 0, ≤ 1048576`, `"auto" | integer, ≥ 0, ≤ 4096`. */
function describeType(p: Record<string, unknown>): string[] {
  const parts: string[] = [];
  if ('const' in p) return [JSON.stringify(p.const)];
  if (Array.isArray(p.enum)) parts.push(p.enum.map((x) => JSON.stringify(x)).join(' | '));
  else if (Array.isArray(p.anyOf)) parts.push((p.anyOf as Record<string, unknown>[]).map((a) => describeType(a).join(', ')).join(' | '));
  else if (p.type === 'object') parts.push(`{ ${Object.keys((p.properties as object) ?? {}).join(', ')} }`);
  else if (p.type) parts.push(String(p.type));
  const lo = typeof p.minimum === 'number' && p.minimum > -1e15 ? `≥ ${p.minimum}` : typeof p.exclusiveMinimum === 'number' ? `> ${p.exclusiveMinimum}` : null;
  const hi = typeof p.maximum === 'number' && p.maximum < 1e15 ? `≤ ${p.maximum}` : typeof p.exclusiveMaximum === 'number' ? `< ${p.exclusiveMaximum}` : null;
  if (lo) parts.push(lo);
  if (hi) parts.push(hi);
  return parts;
}

/** Renders a JSON-schema property as a short type description (type, bounds, default, description). */
function describeProp(p: Record<string, unknown>): string {
  const parts = describeType(p);
  if ('default' in p) parts.push(`default ${JSON.stringify(p.default)}`);
  return `${parts.join(', ')}${typeof p.description === 'string' ? ` — ${p.description}` : ''}`;
}

/** Option lines of a JSON-schema object: `name  description`, then `name.sub  description` for each property of a nested object. */
function optionRows(props: Record<string, Record<string, unknown>>, required: Set<string>, prefix = ''): [string, string][] {
  const rows: [string, string][] = [];
  for (const [k, p] of Object.entries(props)) {
    rows.push([prefix + k, `${describeProp(p)}${required.has(k) ? ' (required)' : ''}`]);
    if (p.type === 'object' && p.properties)
      rows.push(...optionRows(p.properties as Record<string, Record<string, unknown>>, new Set((p.required as string[]) ?? []), `${prefix}${k}.`));
  }
  return rows;
}

/** The knob a target ratio resolves for a strategy (capability `ratioTarget` at a 2× target and default options), or null. */
function ratioTargetKnob(name: string): { knob: string } | null {
  const cap = getStrategyDefinition(name).capabilities?.ratioTarget;
  if (!cap) return null;
  try {
    const r = cap(parseStrategyOptions(name, { targetRatio: 2 }));
    return r ? { knob: r.knob } : null;
  } catch {
    return null;
  }
}

/** `kvpack strategies`: registered names, descriptions and options. */
/** Whether a strategy compresses MLA latent caches at its default options (from its definition), or why not. */
function mlaSupport(name: string): true | string {
  try {
    return strategyCompressesMla(resolveStrategy(name, {}));
  } catch (e) {
    return (e as Error).message;
  }
}

/** `kvpack strategies`: registered names, descriptions, whether they compress MLA caches, and options. */
export async function strategiesCommand(io: CommandIO = processIO, opts: { json?: boolean } = {}): Promise<number> {
  await import('@kvpack/xkv');
  await import('@kvpack/baselines');
  if (opts.json) {
    const list = listStrategies().map((name) => {
      const def = getStrategyDefinition(name);
      let options: unknown = null;
      try {
        options = withCompressionRatio(z.toJSONSchema(def.schema, { io: 'input', unrepresentable: 'any' }) as Record<string, unknown>);
      } catch {
        /* a schema JSON Schema cannot express */
      }
      return { name, description: def.description, options, ratioTarget: ratioTargetKnob(name), mla: mlaSupport(name) };
    });
    io.out(JSON.stringify(list, null, 2));
    return EXIT.ok;
  }
  const lines: string[] = [];
  for (const name of listStrategies()) {
    const def = getStrategyDefinition(name);
    lines.push(`${name} — ${def.description}`);
    const knob = ratioTargetKnob(name);
    if (knob)
      lines.push(`    target ratio: targetRatio (× = dense fp16 bytes ÷ bytes held) or compressionRatio (kvpress: fraction removed, 0.875 = 8×) resolves ${knob.knob} at compress so the measured ratio reaches it`);
    const mla = mlaSupport(name);
    lines.push(`    MLA latent caches: ${mla === true ? 'yes' : `no (${mla})`}`);
    let schema: Record<string, unknown> = {};
    try {
      schema = withCompressionRatio(z.toJSONSchema(def.schema, { io: 'input', unrepresentable: 'any' }) as Record<string, unknown>);
    } catch {
      /* a schema JSON Schema cannot express: list no options */
    }
    const rows = optionRows((schema.properties ?? {}) as Record<string, Record<string, unknown>>, new Set((schema.required as string[]) ?? []));
    const w = Math.max(0, ...rows.map(([k]) => k.length));
    for (const [k, text] of rows) lines.push(`    ${k.padEnd(w)}  ${text}`);
    lines.push('');
  }
  io.out(lines.join('\n').trimEnd());
  return EXIT.ok;
}

/**
 * Writes a bench's files into `opts.out` (default `bench-out`): NAME.json (the report), NAME.md and,
 * unless `opts.plot` is false, NAME.svg from `plot()`; names them on stderr. Returns their paths.
 */
export async function writeBenchOutputs(
  io: CommandIO,
  opts: { out?: string; plot?: boolean },
  name: string,
  report: unknown,
  md: string,
  plot: () => Promise<string>,
): Promise<string[]> {
  const outDir = resolve(opts.out ?? 'bench-out');
  mkdirSync(outDir, { recursive: true });
  const written = [join(outDir, `${name}.json`), join(outDir, `${name}.md`)];
  writeFileSync(written[0], `${JSON.stringify(report, null, 2)}\n`);
  writeFileSync(written[1], `${md}\n`);
  if (opts.plot !== false) {
    try {
      const svg = await plot();
      written.push(join(outDir, `${name}.svg`));
      writeFileSync(written[2], svg);
    } catch (e) {
      // vega / vega-lite are optional peers: without them the run still succeeds, minus the plot.
      if (!(e instanceof KvpackError && e.code === 'unsupported')) throw e;
      io.err(`note: no SVG plot: ${e.message}`);
    }
  }
  io.err(`wrote ${written.join(', ')}`);
  return written;
}

/** Names the settings whose run failed (stderr) and returns EXIT.badInput; null when none failed. */
export function failedSettingsExit(results: readonly { label: string; error?: string }[], io: CommandIO): number | null {
  const failed = results.filter((r) => r.error !== undefined);
  if (!failed.length) return null;
  io.err(`kvpack: error: ${failed.length} setting(s) failed: ${failed.map((r) => `${r.label}: ${r.error}`).join('; ')}`);
  return EXIT.badInput;
}
