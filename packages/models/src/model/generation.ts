import { check, denseCacheBytes, denseStrategy, disposeKVCache, type CompressedCache, type Strategy } from '@kvpack/core';
import type { LlamaModel } from './llama.js';
import type { SamplingOptions } from './sampling.js';
import { DecodeSession } from './session.js';

/** Options of {@link LlamaModel.generate}. */
export interface GenerateOptions {
  /** Tokens to generate (at most). */
  maxNewTokens: number;
  /** Compression applied to the prompt's cache after prefill. Default: `dense` with float32 storage (exact). */
  strategy?: Strategy;
  /** Default greedy (temperature 0). */
  sampling?: SamplingOptions;
  /** Stop after generating the model's EOS id (it is included in `ids`). Default false. */
  stopAtEos?: boolean;
  /** Other ids that end generation (included in `ids`), e.g. BOS for llama2.c story models. */
  stopIds?: number[];
  /** Passed to {@link LlamaModel.prefill} for query-aware strategies. */
  observationWindow?: number;
}

/** Byte accounting of the compressed cache used by {@link LlamaModel.generate} / {@link LlamaModel.scoreContinuation}. */
export interface CacheStats {
  strategy: string;
  /** Prompt tokens that were compressed, T. */
  prefillTokens: number;
  /** Bytes the compressed cache held right after compressing the prompt (`byteSize()`). */
  prefillByteSize: number;
  /** Bytes held at the end, including the exact float32 decode tokens. */
  byteSize: number;
  /** Compression ratio of the prompt: fp16 dense bytes of T tokens / prefillByteSize. */
  compressionRatio: number;
}

/** Result of {@link LlamaModel.generate}. */
export interface GenerateResult {
  /** Generated token ids (the prompt excluded). */
  ids: number[];
  /** Gap between the two largest logits at each generation step (same length as `ids`). */
  margins: number[];
  /** Why generation ended. */
  stopReason: 'maxNewTokens' | 'eos' | 'stopId' | 'maxSeqLen';
  cache: CacheStats;
}

/** Result of {@link LlamaModel.scoreContinuation}. */
export interface ContinuationScore {
  /** Mean negative log-likelihood of the continuation, nats per token. */
  meanNll: number;
  /** Negative log-likelihood of each continuation token, nats. */
  tokenNll: Float64Array;
  cache: CacheStats;
}

/** Options of {@link LlamaModel.nll} / {@link LlamaModel.scoreContinuation}. */
export interface ScoreOptions {
  /** Passed to {@link LlamaModel.prefill} for query-aware strategies. */
  observationWindow?: number;
}

/** A prompt prefilled and compressed, ready to decode: a session positioned after the prompt, with the last prompt row pending. */
async function compressedPrompt(model: LlamaModel, promptIds: number[], strategy: Strategy | undefined, obs: number | undefined) {
  const { logits, cache } = await model.prefill(promptIds, { logits: 'last', observationWindow: obs });
  let compressed: CompressedCache | undefined;
  let last: Float32Array;
  try {
    compressed = await (strategy ?? denseStrategy({ storage: 'float32' })).compress(cache);
    last = (await logits.data()) as Float32Array;
  } catch (e) {
    compressed?.dispose();
    throw e;
  } finally {
    logits.dispose();
    disposeKVCache(cache);
  }
  const c = compressed;
  const T = promptIds.length;
  const prefillByteSize = c.byteSize();
  const stats = (): CacheStats => ({
    strategy: c.strategy,
    prefillTokens: T,
    prefillByteSize,
    byteSize: c.byteSize(),
    compressionRatio: denseCacheBytes(model.layout, T) / prefillByteSize,
  });
  return { session: new DecodeSession(model, c, T, last), compressed: c, stats };
}

/** {@link LlamaModel.generate}. */
export async function generate(model: LlamaModel, promptIds: number[], options: GenerateOptions): Promise<GenerateResult> {
  const maxNew = options.maxNewTokens;
  check(Number.isInteger(maxNew) && maxNew >= 0, 'config', `generate: maxNewTokens must be an integer ≥ 0, got ${maxNew}`);
  const eos = model.config.eosId;
  const stops = new Set(options.stopIds ?? []);
  if (options.stopAtEos && eos !== undefined) stops.add(eos);
  const { session, compressed, stats } = await compressedPrompt(model, promptIds, options.strategy, options.observationWindow);
  try {
    const g = await session.sample(maxNew, options.sampling, { stopIds: stops });
    const stopReason: GenerateResult['stopReason'] = g.stopReason === 'stopId' && options.stopAtEos && g.ids[g.ids.length - 1] === eos ? 'eos' : g.stopReason;
    return { ids: g.ids, margins: g.margins, stopReason, cache: stats() };
  } finally {
    compressed.dispose();
  }
}

/** {@link LlamaModel.scoreContinuation}. */
export async function scoreContinuation(
  model: LlamaModel,
  promptIds: number[],
  continuationIds: number[],
  strategy?: Strategy,
  options: ScoreOptions = {},
): Promise<ContinuationScore> {
  model.checkIds(promptIds, 'prompt');
  model.checkIds(continuationIds, 'continuation');
  model.checkPositions(0, promptIds.length + continuationIds.length - 1, 'prompt + continuation');
  const { session, compressed, stats } = await compressedPrompt(model, promptIds, strategy, options.observationWindow);
  try {
    const { tokenNll, meanNll } = await session.teacherForcedNll(continuationIds);
    return { meanNll, tokenNll, cache: stats() };
  } finally {
    compressed.dispose();
  }
}
