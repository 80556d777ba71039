import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import * as tf from '@tensorflow/tfjs-core';
import { parse as parseYaml } from 'yaml';
import { z } from 'zod';
import { KvpackError, createStrategy, mulberry32, deserializeCache, describeBackend, selectBackend, type CompressedCache, type KVCache, type Strategy, compressionRatioOf } from '@kvpack/core';
import { PrefixStore, openBackend, redact, type StoreBackend } from '@kvpack/store';
import { EXIT, processIO, type CommandIO } from './commands.js';
import { backendOption, runEnvironment } from './environment.js';
import { loadBenchModel } from './load.js';
import { resolveModelPath } from './models-dir.js';
import type { BenchModel } from './model.js';
import { SyntheticStoreSchema, syntheticStoreRows, syntheticStoreTable, type SyntheticStoreRow } from './store-synthetic.js';

const Range = z.tuple([z.int().positive(), z.int().positive()]);
const StrategySpec = z.strictObject({ name: z.string().min(1), options: z.record(z.string(), z.unknown()).optional() });

/** `kvpack bench store` config (YAML or JSON). */
export const StoreBenchConfigSchema = z.strictObject({
  /** The stored strategy, as a strategy config. */
  strategy: StrategySpec,
  /** What a naive store keeps: the uncompressed KV as the model produced it (a strategy config). */
  raw: StrategySpec,
  /** Prefix length in tokens (cut to the model's context, at a chunk boundary). */
  tokens: z.int().positive().default(1024),
  /** Tokens per chunk C. */
  chunkTokens: z.int().positive().default(256),
  /** Timed repeats (the median is reported). */
  repeats: z.int().positive().default(3),
  /** Seed of the synthetic token ids. */
  seed: z.int().default(1),
  /** The multi-turn chat trace: each turn's prompt is the whole history plus the user's tokens. */
  chat: z.strictObject({ turns: z.int().positive().default(8), userTokens: Range.default([40, 160]), replyTokens: Range.default([40, 160]) }).default({ turns: 8, userTokens: [40, 160], replyTokens: [40, 160] }),
  /** Models: a name and a path (relative paths resolve against KVPACK_MODELS_DIR, else <repo>/../shared/models). */
  models: z.array(z.strictObject({ name: z.string().min(1), path: z.string().min(1) })).default([]),
  /** Llama-3.1-8B-shaped synthetic caches (see store-synthetic.ts): prefix lengths, layers, the prefill arithmetic's sizes. */
  synthetic: SyntheticStoreSchema.optional(),
}).refine((c) => c.models.length > 0 || c.synthetic !== undefined, { message: 'give models, a synthetic section, or both', path: ['models'] });
export type StoreBenchConfig = z.output<typeof StoreBenchConfigSchema>;

/** One model's figures. */
export interface StoreBenchRow {
  model: string;
  tokens: number;
  chunkTokens: number;
  /** Record bytes per token (envelope, container header and payload): the stored strategy, the raw KV. */
  storedBytesPerToken: number;
  rawBytesPerToken: number;
  /** 2 (K, V) × layers × H_kv × head_dim × 2 bytes. */
  denseFp16BytesPerToken: number;
  /** dense fp16 ÷ stored, raw ÷ stored. */
  ratioVsFp16: number;
  /** The same in kvpress's form, compression_ratio: the fraction removed, 1 − 1/ratioVsFp16. */
  compressionRatioVsFp16: number;
  ratioVsRaw: number;
  /** Medians, ms: prefill of T + 1 tokens (logits of the last); fetch (lookup + checks), restore (deserialize), the decode of token T over the restored cache. */
  prefillMs: number;
  fetchMs: number;
  restoreMs: number;
  decodeMs: number;
  /** fetch + restore + decode, and the same through the raw store. */
  storedPathMs: number;
  rawPathMs: number;
  /** prefill ÷ stored path (> 1: restoring beats recomputing). */
  speedup: number;
  rawSpeedup: number;
  /** The chat trace: prompt tokens, tokens served from the store (hits), tokens an earlier turn held (the ceiling), turns with a hit. */
  chat: { turns: number; promptTokens: number; hitTokens: number; reusableTokens: number; tokenHitRate: number; ceiling: number; turnsWithHit: number };
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)];

/** The first n tokens of a prefill cache (slices; the caller disposes them). */
function slicePrefix(c: KVCache, n: number): KVCache {
  const cut = (t: tf.Tensor3D) => tf.slice(t, [0, 0, 0], [n, -1, -1]);
  return { layout: c.layout, rope: c.rope, keys: c.keys.map(cut), values: c.values.map(cut), startPosition: 0, ...(c.model ? { model: c.model } : {}) };
}

async function compressPrefix(model: BenchModel, strategy: Strategy, ids: number[]): Promise<CompressedCache> {
  const pre = await model.prefill(ids);
  try {
    return await strategy.compress(pre.cache);
  } finally {
    tf.dispose([pre.logits, ...pre.cache.keys, ...pre.cache.values]);
  }
}

async function timePrefill(model: BenchModel, ids: number[]): Promise<number> {
  const t0 = performance.now();
  const pre = await model.prefill(ids, { logits: 'last' } as never);
  await pre.logits.data();
  const ms = performance.now() - t0;
  tf.dispose([pre.logits, ...pre.cache.keys, ...pre.cache.values]);
  return ms;
}

/** Fetch, restore, and decode token T over the restored cache; the three times in ms. */
async function timeRestorePath(model: BenchModel, store: PrefixStore, ids: number[], T: number, fingerprint: string) {
  const t0 = performance.now();
  const hit = await store.lookup(ids, { maxTokens: T });
  const t1 = performance.now();
  if (!hit || hit.tokens !== T) throw new KvpackError('io', `bench store: the ${T}-token prefix was not found in ${store.backend.location}`);
  const cache = deserializeCache(hit.cache, { model: fingerprint });
  const t2 = performance.now();
  try {
    const logits = await model.decode([ids[T]], cache, T);
    await logits.data();
    logits.dispose();
  } finally {
    cache.dispose();
  }
  const t3 = performance.now();
  return { fetch: t1 - t0, restore: t2 - t1, decode: t3 - t2 };
}

/** A chat in which each turn's prompt extends the last turn's prompt and reply; after each turn the aligned history is stored. */
async function chatTrace(model: BenchModel, strategy: Strategy, store: PrefixStore, cfg: StoreBenchConfig, seed: number) {
  const r = mulberry32(seed);
  const V = model.config.vocabSize;
  const draw = ([lo, hi]: [number, number]) => Array.from({ length: lo + Math.floor(r() * (hi - lo + 1)) }, () => 1 + Math.floor(r() * (V - 1)));
  let history: number[] = [];
  let stored = 0;
  const out = { turns: 0, promptTokens: 0, hitTokens: 0, reusableTokens: 0, tokenHitRate: 0, ceiling: 0, turnsWithHit: 0 };
  for (let turn = 0; turn < cfg.chat.turns; turn++) {
    const prompt = history.concat(draw(cfg.chat.userTokens));
    const reply = draw(cfg.chat.replyTokens);
    if (prompt.length + reply.length > model.config.maxSeqLen) break;
    const hit = await store.lookup(prompt, { maxTokens: prompt.length - 1 });
    out.turns++;
    out.promptTokens += prompt.length;
    out.reusableTokens += history.length;
    out.hitTokens += hit?.tokens ?? 0;
    if (hit) out.turnsWithHit++;
    history = prompt.concat(reply);
    const aligned = store.alignedLength(history.length);
    if (aligned > stored) {
      const c = await compressPrefix(model, strategy, history.slice(0, aligned));
      try {
        await store.put(history.slice(0, aligned), c);
      } finally {
        c.dispose();
      }
      stored = aligned;
    }
  }
  out.tokenHitRate = out.promptTokens ? out.hitTokens / out.promptTokens : 0;
  out.ceiling = out.promptTokens ? out.reusableTokens / out.promptTokens : 0;
  return out;
}

/** Options of `kvpack bench store`. */
export interface StoreBenchOptions {
  out?: string;
  backend?: string;
  /** Store URL (default: a file store in a temporary folder, removed after). */
  store?: string;
  quick?: boolean;
}

/**
 * `kvpack bench store CONFIG`: per model, side by side in one run — bytes stored per token (every
 * header included) against dense fp16 and against the raw KV; the time to fetch, restore and decode
 * the next token from a stored prefix against recomputing its prefill on the same tfjs backend; and
 * the token hit rate of a multi-turn chat trace. Prints Markdown, writes OUT/store-bench.json.
 */
export async function storeBenchCommand(configPath: string, opts: StoreBenchOptions, io: CommandIO = processIO): Promise<number> {
  await import('@kvpack/xkv');
  await import('@kvpack/baselines');
  const file = resolve(configPath);
  if (!existsSync(file)) throw new KvpackError('config', `bench store: config ${configPath} not found`);
  const parsed = StoreBenchConfigSchema.safeParse(parseYaml(readFileSync(file, 'utf8')));
  if (!parsed.success) throw new KvpackError('config', `bench store: ${configPath}: ${parsed.error.issues[0].path.join('.')}: ${parsed.error.issues[0].message}`);
  const cfg = parsed.data;
  if (opts.quick) cfg.repeats = 1;
  const choice = await selectBackend(opts.backend ?? 'wasm');
  io.err(`kvpack bench store: ${describeBackend(choice)}`);
  const strategy = createStrategy(cfg.strategy);
  const raw = createStrategy(cfg.raw);
  const tmp = opts.store ? undefined : mkdtempSync(join(tmpdir(), 'kvpack-store-bench-'));
  const url = opts.store ?? `file://${tmp}`;
  const rows: StoreBenchRow[] = [];
  const skipped: string[] = [];
  let synthetic: SyntheticStoreRow[] = [];
  try {
    for (const m of cfg.models) {
      const path = resolveModelPath(m.path);
      if (!existsSync(path)) {
        const msg = `SKIPPED: ${m.name} is not at ${path} (set KVPACK_MODELS_DIR)`;
        skipped.push(msg);
        io.err(msg);
        continue;
      }
      const { model } = await loadBenchModel(path);
      const backends: StoreBackend[] = [];
      try {
        const fingerprint = await (model as unknown as { fingerprint(): Promise<string> }).fingerprint();
        const mk = (s: Strategy) => {
          const b = openBackend(url);
          backends.push(b);
          return new PrefixStore({ backend: b, model: fingerprint, strategy: s, chunkTokens: cfg.chunkTokens, onWarning: (w) => io.err(`store: ${w.message}`) });
        };
        const sStore = mk(strategy);
        const rStore = mk(raw);
        const T = sStore.alignedLength(Math.min(cfg.tokens, model.config.maxSeqLen - 1));
        if (T === 0) throw new KvpackError('config', `bench store: ${m.name}'s context (${model.config.maxSeqLen}) holds no full chunk of ${cfg.chunkTokens} tokens`);
        const r = mulberry32(cfg.seed);
        const ids = Array.from({ length: T + 1 }, () => 1 + Math.floor(r() * (model.config.vocabSize - 1)));
        io.err(`${m.name}: ${T} tokens, chunk ${cfg.chunkTokens}`);
        const sc = await compressPrefix(model, strategy, ids.slice(0, T));
        const put = await sStore.put(ids.slice(0, T), sc).finally(() => sc.dispose());
        const rc = await compressPrefix(model, raw, ids.slice(0, T));
        const rput = await rStore.put(ids.slice(0, T), rc).finally(() => rc.dispose());
        const L = model.config;
        const fp16 = 2 * L.nLayers * L.nKvHeads * L.headDim * 2;
        const prefill: number[] = [], fetch: number[] = [], restore: number[] = [], decode: number[] = [], rawPath: number[] = [];
        await timePrefill(model, ids); // warm-up of both paths (kernels, wasm heap)
        await timeRestorePath(model, sStore, ids, T, fingerprint);
        for (let i = 0; i < cfg.repeats; i++) {
          prefill.push(await timePrefill(model, ids));
          const t = await timeRestorePath(model, sStore, ids, T, fingerprint);
          fetch.push(t.fetch);
          restore.push(t.restore);
          decode.push(t.decode);
          const rt = await timeRestorePath(model, rStore, ids, T, fingerprint);
          rawPath.push(rt.fetch + rt.restore + rt.decode);
        }
        const chat = await chatTrace(model, strategy, sStore, cfg, cfg.seed + 17);
        const storedPath = median(fetch.map((f, i) => f + restore[i] + decode[i]));
        rows.push({
          model: m.name,
          tokens: T,
          chunkTokens: cfg.chunkTokens,
          storedBytesPerToken: put.recordBytes / T,
          rawBytesPerToken: rput.recordBytes / T,
          denseFp16BytesPerToken: fp16,
          ratioVsFp16: (fp16 * T) / put.recordBytes,
          compressionRatioVsFp16: compressionRatioOf((fp16 * T) / put.recordBytes),
          ratioVsRaw: rput.recordBytes / put.recordBytes,
          prefillMs: median(prefill),
          fetchMs: median(fetch),
          restoreMs: median(restore),
          decodeMs: median(decode),
          storedPathMs: storedPath,
          rawPathMs: median(rawPath),
          speedup: median(prefill) / storedPath,
          rawSpeedup: median(prefill) / median(rawPath),
          chat,
        });
      } finally {
        await Promise.all(backends.map((b) => b.close()));
        model.dispose();
      }
    }
    if (cfg.synthetic)
      synthetic = await syntheticStoreRows(cfg.synthetic, { strategy: cfg.synthetic.strategy ? createStrategy(cfg.synthetic.strategy) : strategy, raw, url, chunkTokens: cfg.chunkTokens, repeats: cfg.repeats, log: (s) => io.err(s) });
  } finally {
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  }
  const f = (x: number, d = 1) => x.toFixed(d);
  const lines = [
    `## kvpack bench store — ${cfg.strategy.name} ${JSON.stringify(cfg.strategy.options ?? {})} vs raw ${cfg.raw.name} ${JSON.stringify(cfg.raw.options ?? {})}, store ${redact(url.startsWith('file://') && tmp ? 'file:// (temporary)' : url)}, ${choice.name}`,
    '',
    '| model | T | stored B/token | dense fp16 B/token | raw B/token | fp16 ÷ stored | raw ÷ stored | prefill ms | fetch ms | restore ms | decode-1 ms | stored path ms | prefill ÷ stored path | raw path ms | prefill ÷ raw path |',
    '|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|',
    ...rows.map(
      (r) =>
        `| ${r.model} | ${r.tokens} | ${f(r.storedBytesPerToken)} | ${r.denseFp16BytesPerToken} | ${f(r.rawBytesPerToken)} | ${f(r.ratioVsFp16, 2)}× (cr ${f(r.compressionRatioVsFp16, 3)}) | ${f(r.ratioVsRaw, 2)}× | ${f(r.prefillMs)} | ${f(r.fetchMs, 2)} | ${f(r.restoreMs, 2)} | ${f(r.decodeMs)} | ${f(r.storedPathMs)} | ${f(r.speedup, 2)}× | ${f(r.rawPathMs)} | ${f(r.rawSpeedup, 2)}× |`,
    ),
    '',
    '| model | chat turns | prompt tokens | tokens from the store | token hit rate | ceiling (history share) | turns with a hit |',
    '|---|--:|--:|--:|--:|--:|--:|',
    ...rows.map((r) => `| ${r.model} | ${r.chat.turns} | ${r.chat.promptTokens} | ${r.chat.hitTokens} | ${f(100 * r.chat.tokenHitRate)}% | ${f(100 * r.chat.ceiling)}% | ${r.chat.turnsWithHit} |`),
    '',
    'stored path = fetch (lookup: manifests, record, CRC checks) + restore (deserializeCache) + decode of token T over the restored cache; prefill = the prefill of T + 1 tokens (logits of the last). Medians of ' +
      `${cfg.repeats} repeats after a warm-up. Record bytes include the record envelope, the container header and the payload. The chat's ceiling is the share of prompt tokens that an earlier turn already held (chunk alignment keeps the hit rate below it).`,
    ...rows.map(
      (r) =>
        `${r.model} at ${r.tokens} tokens: stored bytes (every header) = 1/${f(r.ratioVsFp16, 2)} of dense fp16${r.ratioVsFp16 >= 6 ? ' (≤ 1/6)' : ''}; ` +
        `fetch + restore + decode ${f(r.storedPathMs)} ms vs prefill ${f(r.prefillMs)} ms: ${f(r.speedup, 2)}× ${r.speedup > 1 ? 'faster' : 'slower'} than recomputing on ${choice.name}`,
    ),
    ...skipped,
    ...syntheticStoreTable(synthetic, choice.name),
  ];
  io.out(lines.join('\n'));
  const outDir = resolve(opts.out ?? 'bench-out');
  mkdirSync(outDir, { recursive: true });
  writeFileSync(join(outDir, 'store-bench.json'), JSON.stringify({ environment: runEnvironment(choice.name, describeBackend(choice), !!opts.quick), config: cfg, rows, synthetic, skipped }, null, 2));
  return EXIT.ok;
}

/** Adds `kvpack bench store CONFIG` to the `bench` command. */
export function registerStoreBench(bench: Command, io: CommandIO, state: { code: number }): void {
  bench
    .command('store')
    .description('prefix store: bytes per token vs dense fp16 and raw KV, fetch + restore vs prefill time, chat-trace hit rate')
    .argument('<config>', 'store bench config (.yaml or .json), e.g. examples/store-bench.yaml')
    .option('--store <url>', 'store URL (file://PATH, redis://HOST:PORT); default a temporary file store')
    .option('--out <dir>', 'folder for store-bench.json', 'bench-out')
    .addOption(backendOption())
    .option('--quick', 'one timed repeat')
    .action(async (config: string, _o: StoreBenchOptions, cmd: Command) => {
      state.code = await storeBenchCommand(config, cmd.optsWithGlobals<StoreBenchOptions>(), io);
    });
}
