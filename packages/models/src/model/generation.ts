import { check, denseCacheBytes, mlaDenseBytes, type CompressedCache, type MlaLayout, type ModelLayout, type Strategy } from '@kvpack/core';
import type { SamplingOptions } from './sampling.js';
import { Session, cachePosition, type SessionCache, type SessionModel } from './session.js';

/**
 * What {@link generate} and {@link scoreContinuation} drive: a session model (LlamaModel over per-head
 * KV caches, DeepseekModel over MLA latent caches) with its fingerprint, layout and id checks.
 */
export interface GenerationModel<C extends SessionCache = CompressedCache> extends SessionModel<C> {
  readonly layout: ModelLayout | MlaLayout;
  fingerprint(): Promise<string>;
  checkIds(ids: readonly number[], what: string): void;
  checkPositions(start: number, count: number, what: string): void;
}

/** fp16 dense bytes of T tokens of a layout (per-head keys and values, or MLA latents and RoPE keys). */
function denseBytes(layout: ModelLayout | MlaLayout, tokens: number): number {
  return 'kvLoraRank' in layout ? mlaDenseBytes(layout, tokens) : denseCacheBytes(layout, tokens);
}

/** Options of {@link LlamaModel.generate}. */
export interface GenerateOptions<C extends SessionCache = CompressedCache> {
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
  /** Passed to {@link LlamaModel.prefill} for query-aware strategies (default: the window the strategy's capabilities declare). */
  observationWindow?: number;
  /**
   * A compressed cache of a prefix (e.g. restored with `deserializeCache`): `promptIds` are then the
   * tokens **after** it, fed in one decode call right after the prefix (appended exactly), and
   * `strategy` is not used. The cache grows by what is fed; the caller keeps owning it.
   * @see Session.resume
   */
  cache?: C;
  /**
   * Return the cache generation ends with as `result.compressedCache` (the caller disposes it; with
   * `cache` it is that same object) instead of disposing it. Default false.
   */
  returnCache?: boolean;
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
export interface GenerateResult<C extends SessionCache = CompressedCache> {
  /** Generated token ids (the prompt excluded). */
  ids: number[];
  /** Gap between the two largest logits at each generation step (same length as `ids`). */
  margins: number[];
  /** Why generation ended. */
  stopReason: 'maxNewTokens' | 'eos' | 'stopId' | 'maxSeqLen';
  cache: CacheStats;
  /**
   * With `returnCache`: the compressed cache generation ends with. It covers the prompt and every
   * generated token but the last (which a continuation feeds first, e.g. as `remainingTokens[0]` of
   * `Session.resume`).
   */
  compressedCache?: C;
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

/** A session positioned after the prompt (compressed, or the cache's prefix plus the prompt fed), and its byte accounting. */
async function promptSession<C extends SessionCache>(model: GenerationModel<C>, promptIds: number[], strategy: Strategy | undefined, obs: number | undefined, cache: C | undefined) {
  let session: Session<C>;
  let prefillTokens: number;
  let prefillByteSize = 0;
  if (cache) {
    const fp = await model.fingerprint();
    check(cache.model === fp, 'model', `generate: the ${cache.strategy} cache was made from ${cache.model ? `model ${cache.model}` : 'a cache without a model fingerprint'}, not from this model (${fp})`);
    model.checkIds(promptIds, 'prompt');
    session = new Session<C>(model, cache, cachePosition(cache));
    prefillTokens = cache.prefillLength;
    prefillByteSize = cache.byteSize();
    await session.prefill(promptIds);
  } else {
    session = (await Session.start(model as SessionModel<SessionCache>, { ...(strategy ? { strategy } : {}), ...(obs !== undefined ? { observationWindow: obs } : {}) })) as unknown as Session<C>;
    try {
      await session.prefill(promptIds);
      await session.compress();
    } catch (e) {
      session.dispose();
      throw e;
    }
    prefillTokens = promptIds.length;
    prefillByteSize = session.cache.byteSize();
  }
  const c = session.cache;
  const stats = (): CacheStats => ({
    strategy: c.strategy,
    prefillTokens,
    prefillByteSize,
    byteSize: c.byteSize(),
    compressionRatio: denseBytes(model.layout, prefillTokens) / prefillByteSize,
  });
  return { session, stats };
}

/** {@link LlamaModel.generate}. */
export async function generate<C extends SessionCache>(model: GenerationModel<C>, promptIds: number[], options: GenerateOptions<C>): Promise<GenerateResult<C>> {
  const maxNew = options.maxNewTokens;
  check(Number.isInteger(maxNew) && maxNew >= 0, 'config', `generate: maxNewTokens must be an integer ≥ 0, got ${maxNew}`);
  const eos = model.config.eosId;
  const { session, stats } = await promptSession(model, promptIds, options.strategy, options.observationWindow, options.cache);
  let keep = false;
  try {
    const g = await session.sample(maxNew, options.sampling, { stopIds: [...(options.stopIds ?? []), ...(options.stopAtEos && eos !== undefined ? [eos] : [])] });
    const stopReason: GenerateResult['stopReason'] = g.stopReason === 'stopId' && options.stopAtEos && g.ids[g.ids.length - 1] === eos ? 'eos' : g.stopReason;
    const result: GenerateResult<C> = { ids: g.ids, margins: g.margins, stopReason, cache: stats() };
    if (options.returnCache) {
      result.compressedCache = options.cache ?? session.detach();
      keep = true;
    }
    return result;
  } finally {
    if (!keep) session.dispose();
  }
}

/** {@link LlamaModel.scoreContinuation}. */
export async function scoreContinuation<C extends SessionCache>(
  model: GenerationModel<C>,
  promptIds: number[],
  continuationIds: number[],
  strategy?: Strategy,
  options: ScoreOptions = {},
): Promise<ContinuationScore> {
  model.checkIds(promptIds, 'prompt');
  model.checkIds(continuationIds, 'continuation');
  model.checkPositions(0, promptIds.length + continuationIds.length - 1, 'prompt + continuation');
  const { session, stats } = await promptSession(model, promptIds, strategy, options.observationWindow, undefined);
  try {
    const { tokenNll, meanNll } = await session.teacherForcedNll(continuationIds);
    return { meanNll, tokenNll, cache: stats() };
  } finally {
    session.dispose();
  }
}
