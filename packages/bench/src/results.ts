import { compressionRatioOf, type ModelLayout } from '@kvpack/core';
import { strategyRatioTarget } from './strategy.js';
import type { ResolvedSetting } from './config.js';
import { median, relativeError, type ErrorSums } from './metrics.js';

// What the quality bench measures, and how one setting's per-prompt results are aggregated.

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
  /** Measured compression ratio denseBytes / bytes (×). */
  ratio: number;
  /** The same in kvpress's form, compression_ratio: the fraction removed, 1 − 1/ratio. */
  compressionRatio: number;
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
  /** Measured compression ratio Σ denseBytes / Σ bytes (×). */
  ratio: number;
  /** The same in kvpress's form, compression_ratio: the fraction removed, 1 − 1/ratio. */
  compressionRatio: number;
  /** The target ratio (×) the options ask for (capability `ratioTarget`), or null when they set the knob directly. */
  targetRatio: number | null;
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
    compressionRatio: compressionRatioOf(sum((p) => p.denseBytes) / sum((p) => p.bytes)),
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
    compressionRatio: NaN,
    targetRatio: strategyRatioTarget(s)?.target ?? null,
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
