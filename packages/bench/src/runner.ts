import * as tf from '@tensorflow/tfjs-core';
import { performance } from 'node:perf_hooks';
import { KvpackError, check, compressionRatio, createStrategy, denseCacheBytes, type CompressedCache, type KVCache, type ModelLayout } from '@kvpack/core';
import type { ResolvedSetting } from './config.js';
import { argmaxRow, greedyAgreement, median, reconstructionSums, relativeError, tokenNlls, type ErrorSums } from './metrics.js';
import { disposeKVCache, type BenchModel } from './model.js';

/** A tokenized prompt: the context (prefilled and compressed) and the held-out continuation. */
export interface BenchPrompt {
  name: string;
  /** Context ids (BOS included when used). Its last token is decoded through the compressed cache. */
  contextIds: number[];
  /** Held-out continuation ids, scored teacher-forced. */
  continuationIds: number[];
}

/** Results of one setting on one prompt. */
export interface PromptResult {
  prompt: string;
  /** Prefill tokens compressed (context length − 1). */
  tokens: number;
  /** Bytes the compressed cache holds (`byteSize()`). */
  bytes: number;
  /** fp16 dense bytes of the same tokens (`denseCacheBytes`). */
  denseBytes: number;
  /** Measured compression ratio denseBytes / bytes. */
  ratio: number;
  /** The strategy's own formula for the ratio (xKV paper), when it reports one. */
  paperRatio: number | null;
  keyErrorSums: ErrorSums | null;
  valueErrorSums: ErrorSums | null;
  /** Relative Frobenius errors per layer (post-RoPE keys, values), null for eviction. */
  perLayer: { keys: number; values: number }[] | null;
  /** Mean NLL (nats/token) of the continuation with the compressed cache. */
  nll: number;
  /** Mean NLL of the continuation from an uncompressed forward pass over context + continuation. */
  nllReference: number;
  continuationTokens: number;
  /** Continuation positions whose argmax (teacher-forced, compressed cache) equals the uncompressed argmax. */
  top1Matches: number;
  /** Greedy tokens decoded with the compressed cache. */
  greedyTokens: number[];
  agreementMatches: number;
  agreementTotal: number;
  firstDivergence: number | null;
  /** Wall-clock time of each `compress` call, ms. */
  compressMs: number[];
  /** Whatever the cache's `stats()` returned, if it has one. */
  strategyStats?: unknown;
}

/** Identity and measured size of one setting's results (shared by the quality and accuracy benches). */
export interface SettingSummary {
  label: string;
  name: string;
  series: string;
  key: string;
  /** Options as written in the config. */
  options: Record<string, unknown>;
  /** Options after the strategy's schema defaults. */
  resolvedOptions: Record<string, unknown>;
  /** Query window the prefill carried (query-aware strategies), else null. */
  observationWindow: number | null;
  /** Σ prefill tokens compressed. */
  tokens: number;
  /** Σ bytes held. */
  bytes: number;
  /** Σ dense fp16 bytes. */
  denseBytes: number;
  /** Measured compression ratio Σ denseBytes / Σ bytes. */
  ratio: number;
}

/** Results of one setting, aggregated over prompts. */
export interface SettingResult extends SettingSummary {
  /** Mean of the strategy's reported formula ratio over prompts, or null. */
  paperRatio: number | null;
  /** Post-RoPE key relative Frobenius error sqrt(Σ‖K − K̂‖² / Σ‖K‖²) over layers and prompts; null for eviction. */
  keyError: number | null;
  /** Value relative Frobenius error, aggregated the same way; null for eviction. */
  valueError: number | null;
  /** Token-weighted mean continuation NLL with the compressed cache, nats. */
  nll: number;
  /** Same for the uncompressed forward pass. */
  nllReference: number;
  /** nll − nllReference, nats. */
  deltaNll: number;
  /**
   * Teacher-forced top-1 agreement over the held-out continuation: the fraction of positions where
   * the compressed cache's argmax equals the uncompressed forward pass's. Unlike the free-running
   * greedy agreement, one flipped near-tie does not decide it.
   */
  top1Agreement: number;
  /** Fraction of greedy tokens equal to the uncompressed run's (null when decodeTokens = 0). */
  agreement: number | null;
  /** Earliest first-divergence index over prompts (null when none diverged or nothing was decoded). */
  firstDivergence: number | null;
  /** Mean over prompts of the median compress time, ms. */
  compressMs: number;
  perPrompt: PromptResult[];
  /** Set when the setting failed (bad input such as a rank the model cannot take); metrics are then NaN/null. */
  error?: string;
}

/** The uncompressed reference of one prompt. */
export interface PromptReference {
  prompt: string;
  contextTokens: number;
  continuationTokens: number;
  /** Mean NLL of the continuation, one uncompressed forward pass over context + continuation. */
  nll: number;
  /** The uncompressed forward pass's argmax at each continuation position (teacher-forced). */
  continuationArgmax: number[];
  /** Greedy tokens from an uncompressed (dense float32) cache. */
  greedyTokens: number[];
  /**
   * Top-2 logit gap at each reference greedy step. A small gap is a near-tie that any perturbation
   * may flip, after which free-running greedy agreement is mostly chance.
   */
  greedyMargins: number[];
  /**
   * Self-check of the decode path: NLL through a dense float32 cache and decode steps minus `nll`
   * (float32 rounding only; large values mean the model's decode disagrees with its prefill).
   */
  decodePathNllDelta: number;
  /** Fraction of the reference greedy tokens that are the argmax of a full forward pass over them. */
  greedyForwardAgreement: number;
}

/** Everything a bench run produced. */
export interface BenchRunResult {
  layout: ModelLayout;
  references: PromptReference[];
  results: SettingResult[];
}

/** Progress callbacks of {@link runBench}. */
export interface RunHooks {
  /** After the uncompressed references and prefills are ready; `total` = settings × prompts. */
  onStart?(total: number): void;
  /** After each (setting, prompt) pair; `total` = settings × prompts. */
  onStep?(done: number, total: number, label: string): void;
  /** After every prompt of a setting ran. */
  onSettingDone?(result: SettingResult, index: number, total: number): void;
}

/** Options of {@link runBench}. */
export interface RunOptions {
  /** Greedy tokens to decode and compare (0 = skip). */
  decodeTokens: number;
  /** Timed `compress` calls per (setting, prompt); the median is reported. */
  repeats: number;
}

/** Default query window (tokens) of query-aware strategies, by strategy name. */
const QUERY_WINDOW_OPTIONS = ['windowSize', 'observationWindow', 'window'];
const QUERY_AWARE = new Set(['snapkv']);

/**
 * The query window a setting's prefill must carry: the config's `observationWindow`, else for a
 * query-aware strategy (SnapKV) its window option; null when the strategy does not read queries.
 */
export function queryWindow(setting: ResolvedSetting): number | null {
  if (setting.observationWindow) return setting.observationWindow;
  if (!QUERY_AWARE.has(setting.name)) return null;
  for (const k of QUERY_WINDOW_OPTIONS) {
    const v = setting.resolvedOptions[k];
    if (typeof v === 'number' && v > 0) return v;
  }
  return 32;
}

async function logitsData(x: tf.Tensor2D): Promise<{ data: Float32Array; vocab: number }> {
  const data = (await x.data()) as Float32Array;
  const vocab = x.shape[1];
  x.dispose();
  return { data, vocab };
}

/** Argmax of every row of [n, V] logits. */
function rowArgmax(data: Float32Array, vocab: number): number[] {
  return Array.from({ length: data.length / vocab }, (_, i) => argmaxRow(data, vocab, i));
}

/**
 * Decodes the last context token + continuation[0..n−2] teacher-forced through `cache` (which it
 * appends to): mean NLL of the continuation, and each row's argmax.
 */
async function decodeNll(
  model: BenchModel,
  cache: CompressedCache,
  lastContextId: number,
  continuation: number[],
  position: number,
): Promise<{ nll: number; argmax: number[] }> {
  const ids = [lastContextId, ...continuation.slice(0, -1)];
  const { data, vocab } = await logitsData(await model.decode(ids, cache, position));
  const nlls = tokenNlls(data, vocab, continuation);
  let s = 0;
  for (const v of nlls) s += v;
  return { nll: s / nlls.length, argmax: rowArgmax(data, vocab) };
}

/** Gap between the largest and second-largest value of a logits row. */
function top2Gap(data: Float32Array): number {
  let a = -Infinity;
  let b = -Infinity;
  for (const v of data) {
    if (v > a) {
      b = a;
      a = v;
    } else if (v > b) b = v;
  }
  return a - b;
}

/**
 * Greedy decoding of `n` tokens through `cache`, starting by feeding `firstId` at `position`.
 * Returns the tokens and each step's top-2 logit gap.
 */
async function greedyDecode(model: BenchModel, cache: CompressedCache, firstId: number, position: number, n: number): Promise<{ tokens: number[]; margins: number[] }> {
  const tokens: number[] = [];
  const margins: number[] = [];
  let id = firstId;
  for (let i = 0; i < n; i++) {
    const { data, vocab } = await logitsData(await model.decode([id], cache, position + i));
    id = argmaxRow(data, vocab, 0);
    tokens.push(id);
    margins.push(top2Gap(data));
  }
  return { tokens, margins };
}

/** Calls `stats()` on a cache when it has such a method (xKV reports its paper formula there). */
function cacheStats(c: CompressedCache): unknown {
  const s = (c as unknown as { stats?: unknown }).stats;
  if (typeof s === 'function') return (s as () => unknown).call(c);
  return s && typeof s === 'object' ? s : undefined;
}

const PAPER_RATIO_KEYS = ['paperCompressionRatio', 'paperRatio', 'formulaCompressionRatio', 'formulaRatio', 'compressionRatioFormula'];

/** The strategy-reported (paper-formula) compression ratio inside `stats`, if any. */
export function paperRatioOf(stats: unknown): number | null {
  if (!stats || typeof stats !== 'object') return null;
  const o = stats as Record<string, unknown>;
  for (const k of PAPER_RATIO_KEYS) if (typeof o[k] === 'number' && Number.isFinite(o[k])) return o[k] as number;
  return null;
}

interface PreparedPrompt {
  prompt: BenchPrompt;
  ref: PromptReference;
  /** Prefill caches of context[:-1], by query window (0 = no queries). */
  caches: Map<number, KVCache>;
}

async function prepare(model: BenchModel, p: BenchPrompt, windows: number[], decodeTokens: number): Promise<PreparedPrompt> {
  const ctx = p.contextIds;
  const cont = p.continuationIds;
  check(ctx.length >= 2, 'config', `prompt "${p.name}": the context needs at least 2 tokens, got ${ctx.length}`);
  check(cont.length >= 1, 'config', `prompt "${p.name}": the held-out continuation is empty`);
  const need = ctx.length + Math.max(cont.length, decodeTokens);
  check(
    need <= model.config.maxSeqLen,
    'config',
    `prompt "${p.name}": ${ctx.length} context + ${Math.max(cont.length, decodeTokens)} continuation/decode tokens exceed the model's ${model.config.maxSeqLen}-token context`,
  );
  const T = ctx.length - 1;
  // Uncompressed reference NLL: one forward pass over context + continuation.
  const full = await model.prefill([...ctx, ...cont]);
  disposeKVCache(full.cache);
  const fullLogits = await logitsData(tf.slice(full.logits, [T, 0], [cont.length, -1]) as tf.Tensor2D);
  full.logits.dispose();
  const refNlls = tokenNlls(fullLogits.data, fullLogits.vocab, cont);
  const continuationArgmax = rowArgmax(fullLogits.data, fullLogits.vocab);
  const nll = refNlls.reduce((a, b) => a + b, 0) / refNlls.length;

  const caches = new Map<number, KVCache>();
  for (const w of windows) {
    check(w === 0 || w <= T, 'config', `prompt "${p.name}": observation window ${w} is longer than the ${T}-token prefill`);
    const r = await model.prefill(ctx.slice(0, -1), w ? { observationWindow: w } : undefined);
    r.logits.dispose();
    caches.set(w, r.cache);
  }
  const base = caches.get(0)!;
  // Reference greedy run and decode-path self-check through a dense float32 cache.
  const dense = createStrategy({ name: 'dense', options: { storage: 'float32' } });
  const d1 = await dense.compress(base);
  const decodeNllDense = (await decodeNll(model, d1, ctx[T], cont, T)).nll;
  d1.dispose();
  let greedyTokens: number[] = [];
  let greedyMargins: number[] = [];
  let greedyForwardAgreement = 1;
  if (decodeTokens > 0) {
    const d2 = await dense.compress(base);
    ({ tokens: greedyTokens, margins: greedyMargins } = await greedyDecode(model, d2, ctx[T], T, decodeTokens));
    d2.dispose();
    const fw = await model.prefill([...ctx, ...greedyTokens.slice(0, -1)]);
    disposeKVCache(fw.cache);
    const rows = await logitsData(tf.slice(fw.logits, [T, 0], [decodeTokens, -1]) as tf.Tensor2D);
    fw.logits.dispose();
    let m = 0;
    for (let i = 0; i < decodeTokens; i++) if (argmaxRow(rows.data, rows.vocab, i) === greedyTokens[i]) m++;
    greedyForwardAgreement = m / decodeTokens;
  }
  return {
    prompt: p,
    caches,
    ref: {
      prompt: p.name,
      contextTokens: ctx.length,
      continuationTokens: cont.length,
      nll,
      greedyTokens,
      greedyMargins,
      continuationArgmax,
      decodePathNllDelta: decodeNllDense - nll,
      greedyForwardAgreement,
    },
  };
}

async function runOne(model: BenchModel, s: ResolvedSetting, pp: PreparedPrompt, opts: RunOptions): Promise<PromptResult> {
  const w = queryWindow(s) ?? 0;
  const cache = pp.caches.get(w)!;
  const { contextIds: ctx, continuationIds: cont } = pp.prompt;
  const T = ctx.length - 1;
  const strategy = createStrategy({ name: s.name, options: s.options });
  const times: number[] = [];
  const made: CompressedCache[] = [];
  try {
    for (let r = 0; r < Math.max(1, opts.repeats); r++) {
      const t0 = performance.now();
      const c = await strategy.compress(cache);
      times.push(performance.now() - t0);
      if (made.length < 2) made.push(c);
      else c.dispose();
    }
    const c = made[0];
    const bytes = c.byteSize();
    check(bytes > 0, 'unsupported', `${s.label}: compressed cache reports ${bytes} bytes`);
    const denseBytes = denseCacheBytes(cache.layout, T);
    const stats = cacheStats(c);
    const rec = await reconstructionSums(cache, c);
    const { nll, argmax } = await decodeNll(model, c, ctx[T], cont, T);
    const top1Matches = argmax.filter((a, i) => a === pp.ref.continuationArgmax[i]).length;
    c.dispose();
    let greedyTokens: number[] = [];
    if (opts.decodeTokens > 0) {
      const c2 = made[1] ?? (await strategy.compress(cache));
      if (!made[1]) made.push(c2);
      greedyTokens = (await greedyDecode(model, c2, ctx[T], T, opts.decodeTokens)).tokens;
    }
    const ag = greedyAgreement(pp.ref.greedyTokens, greedyTokens);
    return {
      prompt: pp.prompt.name,
      tokens: T,
      bytes,
      denseBytes,
      ratio: compressionRatio(cache.layout, T, bytes),
      paperRatio: paperRatioOf(stats),
      keyErrorSums: rec?.keys ?? null,
      valueErrorSums: rec?.values ?? null,
      perLayer: rec?.perLayer ?? null,
      nll,
      nllReference: pp.ref.nll,
      continuationTokens: cont.length,
      top1Matches,
      greedyTokens,
      agreementMatches: ag.matches,
      agreementTotal: ag.total,
      firstDivergence: ag.firstDivergence,
      compressMs: times,
      ...(stats !== undefined ? { strategyStats: stats } : {}),
    };
  } finally {
    for (const c of made) c.dispose();
  }
}

/** Aggregates one setting's per-prompt results (token-weighted NLL, pooled error sums, byte totals). */
export function aggregate(s: ResolvedSetting, window: number | null, per: PromptResult[]): SettingResult {
  const sum = (f: (p: PromptResult) => number) => per.reduce((a, p) => a + f(p), 0);
  const pooled = (f: (p: PromptResult) => ErrorSums | null): number | null => {
    if (per.some((p) => f(p) === null)) return null;
    return relativeError({ num: sum((p) => f(p)!.num), den: sum((p) => f(p)!.den) });
  };
  const contTokens = sum((p) => p.continuationTokens);
  const nll = sum((p) => p.nll * p.continuationTokens) / contTokens;
  const nllReference = sum((p) => p.nllReference * p.continuationTokens) / contTokens;
  const agTotal = sum((p) => p.agreementTotal);
  const divs = per.map((p) => p.firstDivergence).filter((x): x is number => x !== null);
  const papers = per.map((p) => p.paperRatio);
  return {
    ...emptySummary(s, window),
    tokens: sum((p) => p.tokens),
    bytes: sum((p) => p.bytes),
    denseBytes: sum((p) => p.denseBytes),
    ratio: sum((p) => p.denseBytes) / sum((p) => p.bytes),
    paperRatio: papers.every((x) => x !== null) ? (papers as number[]).reduce((a, b) => a + b, 0) / papers.length : null,
    keyError: pooled((p) => p.keyErrorSums),
    valueError: pooled((p) => p.valueErrorSums),
    nll,
    nllReference,
    deltaNll: nll - nllReference,
    top1Agreement: sum((p) => p.top1Matches) / contTokens,
    agreement: agTotal > 0 ? sum((p) => p.agreementMatches) / agTotal : null,
    firstDivergence: divs.length ? Math.min(...divs) : null,
    compressMs: per.reduce((a, p) => a + median(p.compressMs), 0) / per.length,
    perPrompt: per,
  };
}

/** A setting's identity with no tokens measured yet (ratio NaN). */
export function emptySummary(s: ResolvedSetting, window: number | null): SettingSummary {
  return {
    label: s.label,
    name: s.name,
    series: s.series,
    key: s.key,
    options: s.options,
    resolvedOptions: s.resolvedOptions,
    observationWindow: window,
    tokens: 0,
    bytes: 0,
    denseBytes: 0,
    ratio: NaN,
  };
}

/** The result of a setting that threw a KvpackError: metrics NaN / null, `error` set. */
export function failedResult(s: ResolvedSetting, window: number | null, error: string): SettingResult {
  return {
    ...emptySummary(s, window),
    paperRatio: null,
    keyError: null,
    valueError: null,
    nll: NaN,
    nllReference: NaN,
    deltaNll: NaN,
    top1Agreement: NaN,
    agreement: null,
    firstDivergence: null,
    compressMs: NaN,
    perPrompt: [],
    error,
  };
}

/**
 * Runs every setting on every prompt. Per prompt: one uncompressed forward pass over context +
 * continuation gives the reference NLL; one prefill of the context minus its last token gives the
 * KV cache every setting compresses (a second prefill carrying queries is made for each distinct
 * query window, only when a query-aware strategy asks for it); a dense float32 cache gives the
 * reference greedy tokens. Per setting: compress (timed `repeats` times), measure bytes and
 * reconstruction error, decode the last context token + continuation teacher-forced through the
 * compressed cache for the NLL, and greedy-decode `decodeTokens` tokens through a fresh copy.
 * A setting whose strategy throws a KvpackError (e.g. a rank or group size the model cannot take)
 * is recorded with `error` set and the run goes on.
 * @throws KvpackError('config') when a prompt is too short or too long for the model.
 */
export async function runBench(model: BenchModel, prompts: BenchPrompt[], settings: ResolvedSetting[], opts: RunOptions, hooks: RunHooks = {}): Promise<BenchRunResult> {
  if (prompts.length === 0) throw new KvpackError('config', 'no prompts to run');
  const windows = [0, ...new Set(settings.map(queryWindow).filter((w): w is number => w !== null))];
  const prepared: PreparedPrompt[] = [];
  try {
    for (const p of prompts) prepared.push(await prepare(model, p, windows, opts.decodeTokens));
    const total = settings.length * prompts.length;
    hooks.onStart?.(total);
    let done = 0;
    const results: SettingResult[] = [];
    for (const [i, s] of settings.entries()) {
      const per: PromptResult[] = [];
      let error: string | undefined;
      for (const pp of prepared) {
        try {
          if (error === undefined) per.push(await runOne(model, s, pp, opts));
        } catch (e) {
          if (!(e instanceof KvpackError)) throw e;
          error = e.message;
        }
        hooks.onStep?.(++done, total, s.label);
      }
      const r = error === undefined ? aggregate(s, queryWindow(s), per) : failedResult(s, queryWindow(s), error);
      results.push(r);
      hooks.onSettingDone?.(r, i, settings.length);
    }
    return { layout: prepared[0].caches.get(0)!.layout, references: prepared.map((p) => p.ref), results };
  } finally {
    for (const pp of prepared) for (const c of pp.caches.values()) disposeKVCache(c);
  }
}
