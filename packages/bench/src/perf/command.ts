import { backendOption, runEnvironment } from '../environment.js';
import { mkdirSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { join, resolve } from 'node:path';
import cliProgress from 'cli-progress';
import * as tf from '@tensorflow/tfjs-core';
import type { Command } from 'commander';
import { KvpackError, describeBackend, selectBackend } from '@kvpack/core';
import { progressBarEnabled } from '../progress.js';
import { perfMarkdown, type PerfReport } from './report.js';
import { parseTokenList, selectSettings, PERF_STRATEGY_NAMES } from './settings.js';
import { cacheStructure, structureTable, type CacheStructure } from './structure.js';
import { REAL_MODELS, defaultModelsDir, realModelCache, realModelPresent } from './real.js';
import { runPerfSuite, type PerfHooks, type PerfSuiteOptions } from './suite.js';
import { syntheticLlamaCache } from './synthetic.js';

/** Where the perf commands write: `out` for results (stdout), `err` for logs (stderr). */
export interface PerfIO {
  out(text: string): void;
  err(text: string): void;
}

const stdio: PerfIO = {
  out: (t) => void process.stdout.write(t.endsWith('\n') ? t : `${t}\n`),
  err: (t) => void process.stderr.write(t.endsWith('\n') ? t : `${t}\n`),
};


/** Options of `kvpack bench perf`. */
export interface PerfCommandOptions {
  backend?: string;
  /** Comma-separated T list, e.g. "4096,8192" or "4K,32K". */
  tokens?: string;
  /** Comma-separated strategy names. */
  strategies?: string;
  reps?: string | number;
  warmup?: string | number;
  layers?: string | number;
  quick?: boolean;
  out?: string;
  dump?: string;
  seed?: string | number;
  sparseBudget?: string | number;
  /** commander's --no-checks sets this false. */
  checks?: boolean;
}

function int(v: string | number | undefined, name: string): number | undefined {
  if (v === undefined) return undefined;
  const n = typeof v === 'number' ? v : Number(v);
  if (!Number.isInteger(n)) throw new KvpackError('config', `${name} must be an integer, got "${v}"`);
  return n;
}

/**
 * Progress on stderr: a cli-progress bar on a TTY outside CI (as the quality bench), else one line
 * per finished step.
 */
export function perfProgress(io: PerfIO, stream: NodeJS.WriteStream = process.stderr, env: NodeJS.ProcessEnv = process.env): PerfHooks & { stop(): void } {
  if (!progressBarEnabled(stream, env)) {
    return { onStep: (d, t, label) => io.err(`[${d}/${t}] ${label}`), log: (l) => io.err(l), stop() {} };
  }
  const bar = new cliProgress.SingleBar(
    { stream, format: ' {bar} {value}/{total} | {label}', hideCursor: true, clearOnComplete: true, etaBuffer: 10 },
    cliProgress.Presets.shades_classic,
  );
  let started = false;
  return {
    onStart(total) {
      bar.start(total, 0, { label: 'starting' });
      started = true;
    },
    onStep(done, _total, label) {
      bar.update(done, { label });
    },
    log(line) {
      // cli-progress redraws on its own line; print the log above it.
      if (started) stream.write('\r\x1b[K');
      io.err(line);
    },
    stop() {
      if (started) bar.stop();
    },
  };
}

/** Environment block of a perf report. */
export function perfEnvironment(backend: string, backendLine: string, quick: boolean): PerfReport['environment'] {
  return { ...runEnvironment(backend, backendLine, quick), cpuModel: cpus()[0]?.model };
}

/**
 * `kvpack bench perf`: runs {@link runPerfSuite}, prints the Markdown report on stdout and writes
 * OUT/perf.json and OUT/perf.md. --quick: T = 4K, 8K (unless --tokens) and 2 timed runs (unless
 * --reps). Layers default to 4 on wasm/cpu (one xKV group; 32 × 32K tokens do not fit a wasm heap)
 * and 32 elsewhere.
 * @returns exit code 0; throws KvpackError on bad options.
 */
export async function perfCommand(
  opts: PerfCommandOptions,
  io: PerfIO = stdio,
  extra: Partial<PerfSuiteOptions> = {},
): Promise<{ code: number; report: PerfReport; markdown: string }> {
  await import('@kvpack/xkv');
  await import('@kvpack/baselines');
  const settings = selectSettings(opts.strategies);
  const tokens = opts.tokens ? parseTokenList(opts.tokens) : opts.quick ? [4096, 8192] : [4096, 8192, 16384, 32768];
  const reps = int(opts.reps, '--reps') ?? (opts.quick ? 2 : 3);
  const warmup = int(opts.warmup, '--warmup') ?? 1;
  const layers = int(opts.layers, '--layers');
  const seed = int(opts.seed, '--seed') ?? 0;
  const sparseBudget = int(opts.sparseBudget, '--sparse-budget') ?? 2048;
  const choice = await selectBackend(opts.backend ?? (process.env.KVPACK_BACKEND || 'auto'));
  const backendLine = describeBackend(choice);
  io.err(backendLine);
  const progress = perfProgress(io);
  let result;
  try {
    result = await runPerfSuite(
      { tokens, settings, reps, warmup, layers, seed, sparseBudget, dump: opts.dump, checks: opts.checks !== false, ...extra },
      progress,
    );
  } finally {
    progress.stop();
  }
  const report: PerfReport = { format: 'kvpack-perf/1', environment: perfEnvironment(choice.name, backendLine, Boolean(opts.quick)), ...result };
  const md = perfMarkdown(report);
  io.out(md);
  if (opts.out) {
    const dir = resolve(opts.out);
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, 'perf.json'), `${JSON.stringify(report, null, 2)}\n`);
    writeFileSync(join(dir, 'perf.md'), `${md}\n`);
    io.err(`wrote ${join(dir, 'perf.json')} and perf.md`);
  }
  return { code: 0, report, markdown: md };
}

/** Options of `kvpack bench structure`. */
export interface StructureCommandOptions {
  backend?: string;
  /** T of the synthetic cache (default 4096). */
  tokens?: string | number;
  /** Layers of the synthetic cache (default 8). */
  layers?: string | number;
  /** Longest real prompt, tokens (default 1024). */
  maxTokens?: string | number;
  /** Models folder (default KVPACK_MODELS_DIR or ../shared/models). */
  models?: string;
  seed?: string | number;
  out?: string;
}

/**
 * `kvpack bench structure`: measures {@link cacheStructure} on the real prefill caches of the bundled
 * models (stories260K, rulermini-19m; skipped with a note when absent) and on the synthetic
 * generator, and prints the comparison table (also OUT/structure.json and .md with --out).
 */
export async function structureCommand(opts: StructureCommandOptions, io: PerfIO = stdio): Promise<{ code: number; rows: CacheStructure[] }> {
  const choice = await selectBackend(opts.backend ?? (process.env.KVPACK_BACKEND || 'auto'));
  io.err(describeBackend(choice));
  const dir = opts.models ? resolve(opts.models) : defaultModelsDir();
  const maxTokens = int(opts.maxTokens, '--max-tokens') ?? 1024;
  const T = int(opts.tokens, '--tokens') ?? 4096;
  const layers = int(opts.layers, '--layers') ?? 8;
  const seed = int(opts.seed, '--seed') ?? 0;
  const rows: CacheStructure[] = [];
  for (const spec of REAL_MODELS) {
    if (!realModelPresent(spec, dir)) {
      io.err(`skipping ${spec.name}: ${join(dir, spec.checkpoint)} not found (set KVPACK_MODELS_DIR or --models)`);
      continue;
    }
    const { cache } = await realModelCache(spec, dir, maxTokens);
    try {
      rows.push(await cacheStructure(cache, spec.name));
    } finally {
      tf.dispose([...cache.keys, ...cache.values]);
    }
    io.err(`measured ${spec.name}`);
  }
  const syn = await syntheticLlamaCache({ T, layers, seed });
  try {
    rows.push(await cacheStructure(syn, 'synthetic (Llama-3.1-8B shape)'));
  } finally {
    tf.dispose([...syn.keys, ...syn.values]);
  }
  const md = structureTable(rows);
  io.out(md);
  if (opts.out) {
    const out = resolve(opts.out);
    mkdirSync(out, { recursive: true });
    writeFileSync(join(out, 'structure.json'), `${JSON.stringify({ format: 'kvpack-structure/1', date: new Date().toISOString(), backend: choice.name, rows }, null, 2)}\n`);
    writeFileSync(join(out, 'structure.md'), `${md}\n`);
  }
  return { code: 0, rows };
}

/**
 * Adds `perf` and `structure` subcommands to the `bench` command. Each action stores its exit code
 * through `setCode` (the CLI's state), as the quality bench does.
 */
export function registerPerfCommands(bench: Command, setCode: (code: number) => void = (c) => void (process.exitCode = c), io: PerfIO = stdio): void {
  bench
    .command('perf')
    .description('performance suite on Llama-3.1-8B-shaped caches: compress, reconstruct and decode times, bytes, peak memory, target checks')
    .addOption(backendOption())
    .option('--tokens <list>', 'prefill lengths, e.g. 4096,8192,16384,32768 or 4K,32K (default all four; --quick: 4K,8K)')
    .option('--strategies <list>', `strategies (default all): ${PERF_STRATEGY_NAMES.join(',')}`)
    .option('--reps <n>', 'timed runs per figure, median reported (default 3; --quick: 2)')
    .option('--warmup <n>', 'warm-up runs before the timed ones (default 1)')
    .option('--layers <n>', 'layers per cache (default 32; 4 on wasm/cpu)')
    .option('--quick', 'T = 4K and 8K, 2 timed runs')
    .option('--out <dir>', 'write perf.json and perf.md here')
    .option('--dump <file>', 'read the cache from a KV dump (safetensors, see @kvpack/models readKVDump) instead of the generator')
    .option('--seed <n>', 'seed of the synthetic caches (default 0)')
    .option('--sparse-budget <n>', "token budget of xkv's sparse decode mode (default 2048)")
    .option('--no-checks', "skip the target checks (compress vs matmul floor, sparse step vs dense attention)")
    .action(async (_opts: PerfCommandOptions, cmd: Command) => {
      // optsWithGlobals: `bench` itself takes --quick too, and commander gives it to the parent.
      setCode((await perfCommand(cmd.optsWithGlobals<PerfCommandOptions>(), io)).code);
    });
  bench
    .command('structure')
    .description('compare the synthetic generator with real models: singular-value decay, cross-layer subspace alignment, per-token cosine, outlier channels')
    .addOption(backendOption())
    .option('--tokens <n>', 'T of the synthetic cache (default 4096)')
    .option('--layers <n>', 'layers of the synthetic cache (default 8)')
    .option('--max-tokens <n>', 'longest real prompt (default 1024)')
    .option('--models <dir>', 'models folder (default KVPACK_MODELS_DIR or ../shared/models)')
    .option('--seed <n>', 'seed of the synthetic cache (default 0)')
    .option('--out <dir>', 'write structure.json and structure.md here')
    .action(async (_opts: StructureCommandOptions, cmd: Command) => {
      setCode((await structureCommand(cmd.optsWithGlobals<StructureCommandOptions>(), io)).code);
    });
}

