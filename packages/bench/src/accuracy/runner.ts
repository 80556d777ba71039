import * as tf from '@tensorflow/tfjs-core';
import { performance } from 'node:perf_hooks';
import { KvpackError, check, compressionRatioOf, createStrategy, denseCacheBytes, disposeKVCache, type CompressedCache, type KVCache, type ModelLayout } from '@kvpack/core';
import type { ResolvedSetting } from '../config.js';
import { relativeError, type ErrorSums } from '../metrics.js';
import type { BenchModel } from '../model.js';
import { settingQueryWindow } from '../query-window.js';
import { emptySummary, type SettingSummary } from '../results.js';
import { buildStrategy } from '../strategy.js';
import { withReconstructionScores } from '@kvpack/models';
import { measurePeakMemory } from '../perf/stats.js';
import { greedyFrom, type GreedyStart } from '../prepare.js';
import { attentionOutputError } from './attention-error.js';
import type { EvalExample } from './dataset.js';
import { exactMatch, summarizeAccuracy, type AccuracySummary } from './scoring.js';

/** A model the accuracy runner can drive: the bench's model plus an optional EOS id. */
export type AccuracyModel = BenchModel & { readonly config: BenchModel['config'] & { eosId?: number } };

/** Options of {@link runAccuracy}. */
export interface AccuracyRunOptions {
  /** See the config's `lastToken`. Default 'decode'. */
  lastToken?: 'decode' | 'prefill';
  /** Text → token ids (no BOS), for the instruction of a context-reconstruction pass; without it the context alone is re-read. */
  encode?: (text: string) => number[];
  /** End an answer at the model's EOS. Default true. */
  stopAtEos?: boolean;
  /** Other ids that end an answer. */
  stopIds?: number[];
  /** Cap on generated tokens (default: each example's len(answer_ids)). */
  maxNewTokens?: number;
  /** Query rows for the attention-output error (0 = skip). Default 8. */
  attentionQueries?: number;
  /** Task order of the summaries (default: order of first appearance). */
  tasks?: string[];
  /**
   * What is compressed (kvpress's two protocols):
   * - `aware` (default): the whole prompt, question included (see `lastToken`), so query-aware
   *   strategies (SnapKV) see the question in their observation window;
   * - `agnostic`: only the context (`EvalExample.contextTokens` tokens; needs a question split); the
   *   question is then prefilled on top of the compressed cache in one decode call and the answer
   *   is decoded greedily after it. `lastToken` does not apply.
   */
  queryMode?: QueryMode;
}

/** Whether the question is seen at compression time ({@link AccuracyRunOptions.queryMode}). */
export type QueryMode = 'agnostic' | 'aware';

/** Outcome of one setting on one example. */
export interface ExampleOutcome {
  /** `file:line` of the example. */
  example: string;
  task: string;
  /** Greedy prediction (stop token included when one ended it). */
  predicted: number[];
  /** Prediction equals answer_ids exactly. */
  correct: boolean;
  /** Prediction equals the uncompressed model's prediction. */
  agrees: boolean;
  /** Prefill tokens compressed. */
  tokens: number;
  /** Bytes the compressed prefill cache holds (`byteSize()` right after compress). */
  bytes: number;
  /** fp16 dense bytes of the same tokens. */
  denseBytes: number;
  /** Attention-output error sums over layers (null when skipped). */
  attention: { sums: ErrorSums; perLayerSums: ErrorSums[] } | null;
  compressMs: number;
  /**
   * Tensor bytes the compressed cache held on the backend (tf.memory()), each over `byteSize()` at
   * that moment: right after compress, at the peak of answering (the cache plus the decode steps'
   * transient working set), and after answering.
   */
  resident: { afterCompress: number; peakDecode: number; afterDecode: number };
}

/** Results of one setting over every example. */
export interface AccuracySettingResult extends SettingSummary {
  /** Exact-match accuracy per task and their mean. */
  accuracy: AccuracySummary;
  /** Fraction of examples whose prediction equals the uncompressed model's. */
  agreement: number;
  /** Attention-output error pooled over layers and examples, sqrt(Σ num / Σ den); null when skipped. */
  attentionError: number | null;
  /** Per layer, pooled over examples; null when skipped. */
  attentionErrorPerLayer: number[] | null;
  /** Mean compress time, ms. */
  compressMs: number;
  /** Largest resident ÷ stored over the examples, after compress / at the decode peak / after decoding. */
  resident: { afterCompress: number; peakDecode: number; afterDecode: number } | null;
  examples: ExampleOutcome[];
  /** Set when the strategy rejected the input (KvpackError); metrics are then NaN / empty. */
  error?: string;
  /** The query mode it ran in (set by the command when it runs several). */
  queryMode?: QueryMode;
}

/** The uncompressed model's answers (dense float32 cache, the same decode path). */
export interface AccuracyReference {
  accuracy: AccuracySummary;
  examples: { example: string; task: string; predicted: number[]; correct: boolean; answer: number[] }[];
}

/** Everything {@link runAccuracy} produced. */
export interface AccuracyRunResult {
  layout: ModelLayout;
  /** Prefill tokens per example (the compressed cache's length), in example order. */
  prefillTokens: number[];
  /** Query rows used by the attention-output error (0 = skipped). */
  attentionQueries: number;
  reference: AccuracyReference;
  results: AccuracySettingResult[];
}

/** Progress callbacks of {@link runAccuracy}. */
export interface AccuracyHooks {
  /** Before the first example; `total` = examples × (settings + 1). */
  onStart?(total: number): void;
  /** After each (example, setting) pair, the uncompressed reference included. */
  onStep?(done: number, total: number, label: string): void;
  /** After every setting ran on one example: whether each answered exactly (reference first). */
  onExampleDone?(example: EvalExample, index: number, total: number, outcomes: { label: string; correct: boolean | null }[]): void;
}

function stopSet(model: AccuracyModel, opts: AccuracyRunOptions): Set<number> {
  const s = new Set(opts.stopIds ?? []);
  if ((opts.stopAtEos ?? true) && model.config.eosId !== undefined) s.add(model.config.eosId);
  return s;
}

async function rowOf(x: tf.Tensor2D, row: number): Promise<Float32Array> {
  const r = tf.slice(x, [row, 0], [1, -1]);
  const d = (await r.data()) as Float32Array;
  r.dispose();
  return d;
}

/**
 * Greedy answer through a compressed cache ({@link greedyFrom}): in `decode` mode it feeds the
 * prompt's last token at `position`; in `prefill` mode the exact prefill's last logits row predicts
 * the first token. Stops after `maxNew` tokens or at a stop id.
 */
async function greedyAnswer(model: AccuracyModel, cache: CompressedCache, start: GreedyStart, maxNew: number, stops: Set<number>): Promise<number[]> {
  return (await greedyFrom(model, cache, start, maxNew, stops)).ids;
}

/** The prompt's prefill (shared by every setting) and how decoding starts. */
interface Prepared {
  cache: KVCache;
  /** Decode mode: feed the prompt's last token at `position`; prefill mode: the prefill's last logits row predicts the answer. */
  start: GreedyStart;
  maxNew: number;
}

async function prepare(model: AccuracyModel, ex: EvalExample, window: number, opts: AccuracyRunOptions): Promise<Prepared> {
  const ids = ex.inputIds;
  const V = model.config.vocabSize;
  for (const [field, arr] of [['input_ids', ids], ['answer_ids', ex.answerIds]] as const) {
    const bad = arr.findIndex((t) => t >= V);
    check(bad < 0, 'config', () => `${ex.id}: ${field}[${bad}] = ${arr[bad]} is outside the model's vocabulary [0, ${V})`);
  }
  const agnostic = opts.queryMode === 'agnostic';
  if (agnostic) {
    check(ex.contextTokens !== undefined, 'config', `${ex.id}: query-agnostic runs need a context/question split (the config's "question": a field or a separator)`);
    check(ex.contextTokens >= 1 && ex.contextTokens < ids.length, 'config', `${ex.id}: the context/question split at ${ex.contextTokens} leaves no context or no question in ${ids.length} tokens`);
  }
  const decodeLast = agnostic || (opts.lastToken ?? 'decode') === 'decode';
  const maxNew = Math.min(ex.answerIds.length, opts.maxNewTokens ?? Infinity);
  const T = agnostic ? ex.contextTokens! : decodeLast ? ids.length - 1 : ids.length;
  check(T >= 1, 'config', `${ex.id}: the prompt needs at least ${decodeLast ? 2 : 1} tokens (lastToken: ${opts.lastToken ?? 'decode'})`);
  check(
    ids.length + maxNew - 1 <= model.config.maxSeqLen,
    'config',
    `${ex.id}: ${ids.length} prompt + ${maxNew} answer tokens exceed the model's ${model.config.maxSeqLen}-token context`,
  );
  const w = Math.min(window, T);
  const r = await model.prefill(ids.slice(0, T), w > 0 ? { observationWindow: w } : undefined);
  try {
    if (agnostic) return { cache: r.cache, start: { feed: ids.slice(T), position: T }, maxNew };
    if (decodeLast) return { cache: r.cache, start: { feed: ids[T], position: T }, maxNew };
    return { cache: r.cache, start: { lastRow: await rowOf(r.logits, r.logits.shape[0] - 1), position: T }, maxNew };
  } finally {
    r.logits.dispose();
  }
}

/** The prefill cache with or without its queries (strategies that do not read them get none). */
function viewFor(cache: KVCache, withQueries: boolean): KVCache {
  if (withQueries || !cache.queries) return cache;
  const { queries: _q, ...rest } = cache;
  return rest;
}

function emptySetting(s: ResolvedSetting, window: number | null): AccuracySettingResult {
  return {
    ...emptySummary(s, window),
    accuracy: { tasks: [], mean: NaN, correct: 0, total: 0 },
    agreement: NaN,
    attentionError: null,
    attentionErrorPerLayer: null,
    resident: null,
    compressMs: NaN,
    examples: [],
  };
}

/** Fills a setting's aggregates from its per-example outcomes. */
export function aggregateSetting(r: AccuracySettingResult, tasks: string[]): AccuracySettingResult {
  const ex = r.examples;
  const sum = (f: (o: ExampleOutcome) => number) => ex.reduce((a, o) => a + f(o), 0);
  r.tokens = sum((o) => o.tokens);
  r.bytes = sum((o) => o.bytes);
  r.denseBytes = sum((o) => o.denseBytes);
  r.ratio = r.denseBytes / r.bytes;
  r.compressionRatio = compressionRatioOf(r.ratio);
  r.accuracy = summarizeAccuracy(ex, tasks);
  r.agreement = ex.length ? sum((o) => (o.agrees ? 1 : 0)) / ex.length : NaN;
  r.compressMs = ex.length ? sum((o) => o.compressMs) / ex.length : NaN;
  const most = (f: (o: ExampleOutcome) => number) => Math.max(...ex.map(f));
  r.resident = ex.length ? { afterCompress: most((o) => o.resident.afterCompress), peakDecode: most((o) => o.resident.peakDecode), afterDecode: most((o) => o.resident.afterDecode) } : null;
  if (ex.length && ex.every((o) => o.attention !== null)) {
    const L = ex[0].attention!.perLayerSums.length;
    const per = Array.from({ length: L }, (_, l) => {
      const num = sum((o) => o.attention!.perLayerSums[l].num);
      const den = sum((o) => o.attention!.perLayerSums[l].den);
      return relativeError({ num, den });
    });
    r.attentionErrorPerLayer = per;
    r.attentionError = relativeError({ num: sum((o) => o.attention!.sums.num), den: sum((o) => o.attention!.sums.den) });
  } else {
    r.attentionError = null;
    r.attentionErrorPerLayer = null;
  }
  return r;
}

/**
 * Runs a RULER-style accuracy evaluation. Per example, **one** uncompressed prefill is made (the
 * expensive part), carrying the post-RoPE queries of the prompt's last tokens when a query-aware
 * strategy (SnapKV) or the attention-output error needs them; then the uncompressed reference
 * (dense float32 cache) and every setting in turn: compress the shared prefill cache, measure its
 * bytes and its attention-output error ({@link attentionOutputError}), decode greedily up to
 * len(answer_ids) tokens (or a stop id) through it, score exact match, dispose it. Decode tokens are
 * appended to the compressed cache as the strategy keeps them.
 *
 * A setting whose strategy throws a KvpackError (e.g. a rank the model cannot take) is recorded with
 * `error` and skipped for the remaining examples; the run goes on.
 * @throws KvpackError('config') for an example that does not fit the model (vocabulary, context).
 */
export async function runAccuracy(
  model: AccuracyModel,
  examples: EvalExample[],
  settings: ResolvedSetting[],
  opts: AccuracyRunOptions = {},
  hooks: AccuracyHooks = {},
): Promise<AccuracyRunResult> {
  check(examples.length > 0, 'config', 'no eval examples to run');
  const tasks = opts.tasks ?? [...new Set(examples.map((e) => e.task))];
  const stops = stopSet(model, opts);
  const nq = opts.attentionQueries ?? 8;
  check(Number.isInteger(nq) && nq >= 0, 'config', `attentionQueries must be an integer ≥ 0, got ${nq}`);
  const windows = settings.map(settingQueryWindow);
  const prefillWindow = Math.max(nq, ...windows.map((w) => w ?? 0));
  const results = settings.map((s, i) => emptySetting(s, windows[i]));
  const reference: AccuracyReference = { accuracy: summarizeAccuracy([], tasks), examples: [] };
  const prefillTokens: number[] = [];
  let layout: ModelLayout | undefined;
  const total = examples.length * (settings.length + 1);
  let done = 0;
  hooks.onStart?.(total);
  const dense = createStrategy({ name: 'dense', options: { storage: 'float32' } });

  for (const [ei, ex] of examples.entries()) {
    const p = await prepare(model, ex, prefillWindow, opts);
    try {
      const T = p.cache.keys[0].shape[0];
      layout ??= p.cache.layout;
      prefillTokens.push(T);
      const attnCount = Math.min(nq, T);
      const base = viewFor(p.cache, false);
      // Uncompressed reference: the same decode path through an exact float32 copy of the cache.
      const ref = await dense.compress(base);
      let refPred: number[];
      try {
        refPred = await greedyAnswer(model, ref, p.start, p.maxNew, stops);
      } finally {
        ref.dispose();
      }
      reference.examples.push({ example: ex.id, task: ex.task, predicted: refPred, correct: exactMatch(refPred, ex.answerIds), answer: ex.answerIds });
      hooks.onStep?.(++done, total, 'uncompressed');
      const marks: { label: string; correct: boolean | null }[] = [{ label: 'uncompressed', correct: exactMatch(refPred, ex.answerIds) }];

      for (const [si, s] of settings.entries()) {
        const res = results[si];
        if (res.error !== undefined) {
          marks.push({ label: s.label, correct: null });
          hooks.onStep?.(++done, total, s.label);
          continue;
        }
        let c: CompressedCache | undefined;
        try {
          const strategy = buildStrategy(s);
          const base = tf.memory().numBytes;
          const t0 = performance.now();
          // A strategy that scores by context reconstruction gets the pass here (counted in its compress time).
          const view = await withReconstructionScores(model, strategy, viewFor(p.cache, windows[si] !== null), ex.inputIds.slice(0, T), opts.encode);
          try {
            c = await strategy.compress(view.cache);
          } finally {
            view.dispose();
          }
          const compressMs = performance.now() - t0;
          const bytes = c.byteSize();
          check(bytes > 0, 'unsupported', `${s.label}: compressed cache reports ${bytes} bytes`);
          const residentAfterCompress = (tf.memory().numBytes - base) / bytes;
          const attn = attnCount > 0 ? await attentionOutputError(p.cache, c, { count: attnCount }) : null;
          const cc = c;
          let predicted: number[] = [];
          const answering = await measurePeakMemory(async () => {
            predicted = await greedyAnswer(model, cc, p.start, p.maxNew, stops);
          });
          const held = c.byteSize();
          const resident = {
            afterCompress: residentAfterCompress,
            peakDecode: (tf.memory().numBytes - answering.retainedBytes + answering.peakBytes - base) / held,
            afterDecode: (tf.memory().numBytes - base) / held,
          };
          const correct = exactMatch(predicted, ex.answerIds);
          res.examples.push({
            example: ex.id,
            task: ex.task,
            predicted,
            correct,
            agrees: exactMatch(predicted, refPred),
            tokens: T,
            bytes,
            denseBytes: denseCacheBytes(p.cache.layout, T),
            attention: attn
              ? { sums: attn.perLayerSums.reduce((a, x) => ({ num: a.num + x.num, den: a.den + x.den }), { num: 0, den: 0 }), perLayerSums: attn.perLayerSums }
              : null,
            compressMs,
            resident,
          });
          marks.push({ label: s.label, correct });
        } catch (e) {
          if (!(e instanceof KvpackError)) throw e;
          res.error = `${ex.id}: ${e.message}`;
          marks.push({ label: s.label, correct: null });
        } finally {
          c?.dispose();
        }
        hooks.onStep?.(++done, total, s.label);
      }
      hooks.onExampleDone?.(ex, ei, examples.length, marks);
    } finally {
      disposeKVCache(p.cache);
    }
  }
  reference.accuracy = summarizeAccuracy(reference.examples, tasks);
  for (const r of results) if (r.error === undefined) aggregateSetting(r, tasks);
  return { layout: layout!, prefillTokens, attentionQueries: Math.min(nq, ...prefillTokens), reference, results };
}
