import { withReconstructionScores, type ReconstructingModel } from './reconstruction.js';
import type * as tf from '@tensorflow/tfjs-core';
import {
  BaseCompressedCache,
  BaseCompressedMlaCache,
  decodeContainer,
  deserializeMlaCache,
  disposeMlaCache,
  isMlaCache,
  isMlaContainer,
  type CompressedMlaCache,
  type MlaKVCache,
  KvpackError,
  check,
  createStrategy,
  denseStrategy,
  deserializeCache,
  disposeKVCache,
  getStrategyDefinition,
  selectBackend,
  type ByteSource,
  type CompressedCache,
  type KVCache,
  type Strategy,
  type StrategyConfig,
} from '@kvpack/core';
import { argmax, createSampler, top2Margin, type SamplingOptions } from './sampling.js';

/** A compressed cache a session decodes over: per-head KV ({@link CompressedCache}) or MLA latent ({@link CompressedMlaCache}). */
export type SessionCache = CompressedCache | CompressedMlaCache;

/**
 * What a decode session drives: decode steps over a (compressed) cache. `LlamaModel` (per-head KV
 * caches) and `DeepseekModel` (MLA latent caches) satisfy it, and so does any model that appends the
 * new tokens to the cache and returns their logits [n, V].
 */
export interface DecodeModel<C extends SessionCache = CompressedCache> {
  readonly config: { readonly vocabSize: number; readonly maxSeqLen: number; readonly eosId?: number };
  /** Decodes `ids` at positions position … position + n − 1 over `cache`, appending to it. @returns logits [n, V] */
  decode(ids: number[], cache: C, position: number): Promise<tf.Tensor2D> | tf.Tensor2D;
}

/** The compressed cache type a model decodes over. */
export type CacheOf<M> = M extends { decode(ids: number[], cache: infer C, position: number): unknown } ? (C extends SessionCache ? C : CompressedCache) : CompressedCache;

/**
 * What a session started from a prompt drives: an exact prefill from position 0 as well as decode
 * steps. `LlamaModel` satisfies it. With `fingerprint`, restored caches are checked against the model.
 */
export interface SessionModel<C extends SessionCache = CompressedCache> extends DecodeModel<C> {
  /**
   * Exact causal forward over ids at positions 0 … T − 1. @returns logits ([1, V] with `logits:
   * 'last'`) and the prompt's cache: **pre-RoPE** keys and values [T, H_kv, d] per layer, or for an
   * MLA model the latents and pre-RoPE shared keys ({@link MlaKVCache}).
   */
  prefill(
    ids: number[],
    options?: { observationWindow?: number; logits?: 'all' | 'last' },
  ): Promise<{ logits: tf.Tensor2D; cache: KVCache | MlaKVCache }> | { logits: tf.Tensor2D; cache: KVCache | MlaKVCache };
  /** The model's fingerprint (`sha256:…`), as caches record it (`KVCache.model`, `CompressedCache.model`). */
  fingerprint?(): Promise<string>;
  /** The context-reconstruction pass, for strategies whose capabilities ask for it (`LlamaModel.reconstructionScores`). */
  reconstructionScores?: ReconstructingModel['reconstructionScores'];
}

/** Logits of one decode step, read back to the host. */
export interface StepLogits {
  /** Row-major [rows, vocab]; row i predicts the token after the step's ids[i]. */
  data: Float32Array;
  vocab: number;
  rows: number;
}

/** Options of {@link Session.sample} / {@link Session.greedy}. */
export interface SessionGenerateOptions {
  /** Ids that end generation (the stop id is included in the result). */
  stopIds?: Iterable<number>;
}

/** Options of {@link Session.generate}. */
export interface SessionStreamOptions {
  /** Tokens to generate, at most (an integer ≥ 0). */
  maxTokens: number;
  /** `'greedy'` (default) or sampling settings (greedy at temperature 0; seeded and deterministic otherwise). */
  sampling?: 'greedy' | SamplingOptions;
  /** Ids that end generation; the stop id is yielded. */
  stopIds?: Iterable<number>;
  /** Also stop after the model's EOS id (`config.eosId`), yielded. Default false. */
  stopAtEos?: boolean;
}

/** Tokens a session generated. */
export interface SessionGeneration {
  ids: number[];
  /** Top-2 logit gap of the row each token was chosen from (same length as `ids`). */
  margins: number[];
  /** Why generation ended: the token budget, a stop id (EOS included), or the model's context (the next position would pass maxSeqLen). */
  stopReason: 'maxNewTokens' | 'stopId' | 'maxSeqLen';
}

/** Teacher-forced score of a continuation. */
export interface TeacherForcedScore {
  /** −log p(continuation[i] | everything before it), nats, float64 on the host. */
  tokenNll: Float64Array;
  /** Mean of `tokenNll`, nats per token. */
  meanNll: number;
  /** Argmax of the logits row that predicted each continuation token. */
  argmax: number[];
}

/** Options of {@link Session.start}. */
export interface SessionStartOptions {
  /**
   * How {@link Session.compress} compresses the prompt's cache: a `Strategy`, a registered strategy
   * name (with `options`), or a `{ name, options }` config. Default `dense` with float32 storage (exact).
   * Strategies come from the registry: import `@kvpack/xkv` / `@kvpack/baselines` to register theirs.
   */
  strategy?: Strategy | StrategyConfig | string;
  /** Options of a strategy given by name. */
  options?: Record<string, unknown>;
  /**
   * Post-RoPE queries of the last prompt tokens kept for the strategy (`KVCache.queries`, tokens);
   * default: the window its registered capabilities declare (`queryWindow`, e.g. SnapKV's), at most
   * the prompt's length. An explicit window longer than the prompt is an error of the prefill.
   */
  observationWindow?: number;
  /** tfjs backend to select first (core `selectBackend`: `auto`, `wasm`, `webgpu`, …); default: the active one. */
  backend?: string;
}

/** Options of {@link Session.resume}. */
export interface SessionResumeOptions {
  /**
   * Tokens after the cached prefix, fed in one decode call at the positions right after it (their
   * post-RoPE keys and values are appended exactly). Needed before generating: a cache holds no
   * logits, so at least one token must follow it.
   */
  remainingTokens?: number[];
  /** The token ids the cache covers, when known (they become {@link Session.tokens}); their count must be the cache's. */
  tokens?: number[];
  /** Positions the cache covers; default {@link cachePosition} of the cache. */
  position?: number;
}

/**
 * Positions a compressed cache covers (the position of the next token fed), counting evicted tokens:
 * max(tokenCount(0), prefillLength + decode tokens held in the exact residual). For caches made by a
 * {@link Session}, whose prefill starts at position 0.
 */
export function cachePosition(cache: SessionCache): number {
  const residual = cache instanceof BaseCompressedCache || cache instanceof BaseCompressedMlaCache ? cache.residualTokens(0) : 0;
  return Math.max(cache.tokenCount(0), cache.prefillLength + residual);
}

/**
 * Negative log-likelihoods (nats) of `targets` under logits rows, computed in float64 on the host:
 * nll_i = logsumexp(logits[i]) − logits[i, targets[i]].
 * @param logits row-major [n, V]
 * @throws KvpackError('shape') when the row count differs from the number of targets or an id is out of range.
 */
export function tokenNlls(logits: ArrayLike<number>, vocab: number, targets: readonly number[]): Float64Array {
  const n = targets.length;
  check(logits.length === n * vocab, 'shape', `tokenNlls: ${logits.length} logits for ${n} targets × vocab ${vocab}`);
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const t = targets[i];
    check(Number.isInteger(t) && t >= 0 && t < vocab, 'shape', `tokenNlls: target id ${t} is outside the vocabulary [0, ${vocab})`);
    let m = -Infinity;
    for (let j = 0; j < vocab; j++) m = Math.max(m, logits[i * vocab + j]);
    let s = 0;
    for (let j = 0; j < vocab; j++) s += Math.exp(logits[i * vocab + j] - m);
    out[i] = m + Math.log(s) - logits[i * vocab + t];
  }
  return out;
}

function buildStrategy(o: SessionStartOptions): Strategy {
  const s = o.strategy;
  if (s === undefined) {
    check(o.options === undefined, 'config', 'session: `options` need a strategy name');
    return denseStrategy({ storage: 'float32' });
  }
  if (typeof s === 'string') return createStrategy({ name: s, ...(o.options ? { options: o.options } : {}) });
  check(o.options === undefined, 'config', 'session: `options` go with a strategy given by name, not with a strategy object or config');
  if ('compress' in s) return s;
  return createStrategy(s);
}

function checkIds(ids: readonly number[], vocab: number, what: string): void {
  check(Array.isArray(ids), 'shape', `${what}: token ids must be an array of integers`);
  for (let i = 0; i < ids.length; i++)
    check(Number.isInteger(ids[i]) && ids[i] >= 0 && ids[i] < vocab, 'shape', () => `${what}: token id ${ids[i]} at index ${i} is not an integer in [0, vocab ${vocab})`);
}

/** The uncompressed prompt of a started session, before {@link Session.compress}. */
interface Prompt {
  kv: KVCache | MlaKVCache;
  tokens: number[];
}

function disposePrompt(kv: KVCache | MlaKVCache): void {
  if (isMlaCache(kv)) disposeMlaCache(kv);
  else disposeKVCache(kv);
}

/**
 * A generation session over a model and one compressed KV cache: prefill → compress with a strategy →
 * decode, or a restored cache → the remaining tokens → decode. It tracks the position of the next
 * token, the logits row that predicts it and the token ids the cache covers, so that greedy or
 * sampled generation and teacher-forced scoring are written once. Key conventions stay inside: the
 * prompt is compressed from the model's **pre-RoPE** prefill keys, decode steps append **post-RoPE**
 * keys (the model's `decode`); a caller never rotates a key.
 *
 * - {@link Session.start}: `prefill(tokens)` (exact), `compress()`, then `generate(…)`; the session
 *   owns its cache.
 * - {@link Session.resume}: from a compressed cache or its serialized bytes (a stored prefix); only the
 *   remaining tokens are fed, appended exactly after the prefix. The session owns the cache.
 * - `new Session(model, cache, position, nextLogits?)`: decodes over a cache the caller owns (what a
 *   benchmark that compresses one prefill many ways does).
 *
 * The session's cache is {@link cache}; it serializes with `cache.serialize()` / `serializeAsync()`
 * and restores with `Session.resume(model, bytes)` (`deserializeCache(bytes, { model })`). A sampled
 * token is fed at the next `prefill` or `generate` (it is {@link pendingTokens} until then).
 */
export class Session<C extends SessionCache = CompressedCache> {
  private pos: number;
  private next: Float32Array | undefined;
  private compressed: C | undefined;
  private owns: boolean;
  private prompt: Prompt | undefined;
  private known: number[] | undefined;
  private unfed: number[] = [];
  private strategy: Strategy | undefined;
  private window: number | undefined;
  private closed = false;

  /**
   * A session over a cache the caller owns (and disposes); the session appends to it.
   * @param position position of the next token fed (the tokens already in the cache, evicted ones included)
   * @param nextLogits the logits row [V] that predicts the token at `position` (e.g. the prefill's last
   *   row), when known; otherwise the first call must feed a token ({@link step}, {@link prefill}, or
   *   `first` of {@link teacherForcedNll}).
   * @throws KvpackError('shape') for a position that is not an integer ≥ 0.
   */
  constructor(
    readonly model: DecodeModel<C>,
    cache: C | undefined,
    position: number,
    nextLogits?: ArrayLike<number>,
  ) {
    check(Number.isInteger(position) && position >= 0, 'shape', `decode session: position ${position} must be an integer ≥ 0`);
    this.pos = position;
    this.next = nextLogits ? Float32Array.from(nextLogits) : undefined;
    this.compressed = cache;
    this.owns = false;
  }

  /**
   * A session that will prefill a prompt and compress it with `options.strategy` (default exact dense
   * float32). Selects `options.backend` first when given.
   * @throws KvpackError('unknown-strategy' | 'config' | 'io') for a bad strategy; KvpackError('unsupported') for a backend that cannot start.
   */
  static async start<M extends SessionModel<SessionCache>>(model: M, options: SessionStartOptions = {}): Promise<Session<CacheOf<M>>> {
    if (options.backend !== undefined) await selectBackend(options.backend);
    const strategy = buildStrategy(options);
    const s = new Session<CacheOf<M>>(model as unknown as DecodeModel<CacheOf<M>>, undefined, 0);
    s.strategy = strategy;
    s.window = options.observationWindow;
    s.known = [];
    return s;
  }

  /**
   * A session over a compressed cache that covers a prefix (restored from a store or a file): the
   * `remainingTokens` are fed right after it, their keys and values appended exactly, and the session
   * takes ownership of the cache ({@link dispose} frees it; {@link detach} hands it back). Bytes are
   * restored with `deserializeCache(bytes, { model: await model.fingerprint() })`; the registry must
   * know their strategy.
   * @throws KvpackError('model') when the cache was made from another model than `model` (or records no
   *   model while `model` has a fingerprint); KvpackError('corrupt' | 'truncated' | 'unknown-strategy')
   *   for bytes that do not restore; KvpackError('shape') for bad tokens, a position past the model's
   *   context, or `tokens` whose count differs from the cache's positions. The cache (restored here or
   *   given) is disposed when resume throws.
   */
  static async resume<M extends DecodeModel<SessionCache>>(model: M, cache: CacheOf<M> | ByteSource, options: SessionResumeOptions = {}): Promise<Session<CacheOf<M>>> {
    const fp = 'fingerprint' in model && typeof model.fingerprint === 'function' ? await (model as { fingerprint(): Promise<string> }).fingerprint() : undefined;
    const given = isCompressedCache(cache);
    const restoreOpts = fp !== undefined ? { model: fp } : {};
    const c = (
      given ? cache : isMlaContainer(decodeContainer(cache as ByteSource)) ? deserializeMlaCache(cache as ByteSource, restoreOpts) : deserializeCache(cache as ByteSource, restoreOpts)
    ) as CacheOf<M>;
    try {
      if (given && fp !== undefined)
        check(
          c.model === fp,
          'model',
          `session: this ${c.strategy} cache was made from ${c.model ? `model ${c.model}` : 'a cache without a model fingerprint'}, not from model ${fp}`,
        );
      const position = options.position ?? cachePosition(c);
      const s = new Session<CacheOf<M>>(model as unknown as DecodeModel<CacheOf<M>>, c, position);
      s.owns = true;
      if (options.tokens !== undefined) {
        checkIds(options.tokens, model.config.vocabSize, 'session tokens');
        check(options.tokens.length === position, 'shape', `session: ${options.tokens.length} tokens given for a cache that covers ${position} positions`);
        s.known = [...options.tokens];
      }
      const rest = options.remainingTokens ?? [];
      if (rest.length > 0) await s.prefill(rest);
      return s;
    } catch (e) {
      c.dispose();
      throw e;
    }
  }

  /** Position of the next token fed: the positions the cache covers. */
  get position(): number {
    return this.pos;
  }

  /** The logits row that predicts the token at {@link position}, when known. */
  get nextLogits(): Float32Array | undefined {
    return this.next;
  }

  /**
   * The compressed cache (covering {@link tokens}). It belongs to the session unless the session was
   * constructed over a caller's cache; it stays valid until {@link dispose}.
   * @throws KvpackError('config') before {@link compress} on a started session.
   */
  get cache(): C {
    this.assertOpen();
    check(this.compressed, 'config', 'session: no compressed cache yet; call compress() after prefill()');
    return this.compressed;
  }

  /** True once the session holds a compressed cache. */
  get isCompressed(): boolean {
    return this.compressed !== undefined;
  }

  /**
   * The token ids the cache covers (prompt, fed tokens, generated tokens fed back), in order; undefined
   * when the session was made over a cache whose token ids it was not told.
   */
  get tokens(): readonly number[] | undefined {
    return this.known;
  }

  /** Tokens chosen by {@link generate} / {@link sample} but not fed yet (at most one): the next prefill or generate feeds them first. */
  get pendingTokens(): readonly number[] {
    return this.unfed;
  }

  private assertOpen(): void {
    if (this.closed) throw new KvpackError('disposed', 'session was disposed');
  }

  /**
   * Feeds prompt tokens. Before {@link compress} (a started session) this is the exact prefill: the
   * tokens join the prompt, and the prompt is prefilled from position 0 (again, with any earlier
   * prompt tokens). After it (or on a resumed session) they are appended exactly after the cached
   * tokens in one decode call, preceded by any {@link pendingTokens}.
   * @throws KvpackError('shape') for ids outside the vocabulary or past the model's context.
   */
  async prefill(tokens: number[]): Promise<void> {
    this.assertOpen();
    checkIds(tokens, this.model.config.vocabSize, 'session prefill');
    if (this.compressed) {
      if (tokens.length + this.unfed.length > 0) await this.step([...this.unfed, ...tokens]);
      return;
    }
    check(this.strategy, 'config', 'session: no cache to prefill into');
    const ids = [...(this.prompt?.tokens ?? []), ...tokens];
    const model = this.model as unknown as SessionModel<C>;
    const obs = this.window ?? Math.min(ids.length, queryWindow(this.strategy));
    const r = await model.prefill(ids, { logits: 'last', ...(obs > 0 ? { observationWindow: obs } : {}) });
    let last: Float32Array;
    try {
      last = (await r.logits.data()) as Float32Array;
    } catch (e) {
      disposePrompt(r.cache);
      throw e;
    } finally {
      r.logits.dispose();
    }
    if (this.prompt) disposePrompt(this.prompt.kv);
    this.prompt = { kv: r.cache, tokens: ids };
    this.known = [...ids];
    this.pos = ids.length;
    this.next = Float32Array.from(last.subarray(last.length - model.config.vocabSize));
  }

  /**
   * Compresses the prefilled prompt with the session's strategy and frees the uncompressed prompt
   * cache. Returns the compressed cache (the session's; see {@link cache}). A second call returns the
   * same cache.
   * @throws KvpackError('config') before any {@link prefill}; whatever the strategy throws (the prompt stays prefilled then).
   */
  async compress(): Promise<C> {
    this.assertOpen();
    if (this.compressed) return this.compressed;
    check(this.prompt && this.strategy, 'config', 'session: nothing to compress; call prefill(tokens) first');
    // A strategy that scores by context reconstruction (capability `reconstruction`) gets the pass here;
    // a model without it (an MLA model) is named by withReconstructionScores.
    const view = await withReconstructionScores(this.model as unknown as Partial<ReconstructingModel>, this.strategy, this.prompt.kv as KVCache, this.prompt.tokens);
    let c: C;
    try {
      c = (await this.strategy.compress(view.cache)) as C;
    } finally {
      view.dispose();
    }
    // Strategies built outside the registry (e.g. core denseStrategy) do not record the model themselves.
    if (this.prompt.kv.model && c.model === undefined && (c instanceof BaseCompressedCache || c instanceof BaseCompressedMlaCache)) c.model = this.prompt.kv.model;
    disposePrompt(this.prompt.kv);
    this.prompt = undefined;
    this.compressed = c;
    this.owns = true;
    return c;
  }

  /**
   * Feeds `ids` at the current position (one decode call, causal among them) and reads their logits
   * back. Low level: it drops {@link pendingTokens} (the caller chose what to feed).
   */
  async step(ids: number[]): Promise<StepLogits> {
    this.assertOpen();
    const cache = this.cache;
    const t = await this.model.decode(ids, cache, this.pos);
    let data: Float32Array;
    try {
      data = (await t.data()) as Float32Array;
    } finally {
      t.dispose();
    }
    const vocab = t.shape[1];
    const rows = t.shape[0];
    this.pos += ids.length;
    this.next = data.slice((rows - 1) * vocab);
    this.known?.push(...ids);
    this.unfed = [];
    return { data, vocab, rows };
  }

  /**
   * Streams up to `maxTokens` generated tokens: each is chosen from the pending logits row (greedy, or
   * sampled with a seeded generator), yielded, then fed before the next one is chosen. The last token
   * is not fed (it is {@link pendingTokens}); a later `generate` or `prefill` feeds it first, so
   * generating n then m tokens equals generating n + m. Compresses a prefilled prompt first. Stops at a
   * stop id (EOS with `stopAtEos`), or when the next token's position would pass the model's maxSeqLen.
   * @returns (the generator's return value) the ids, their top-2 logit gaps and why it stopped
   * @throws KvpackError('config') when nothing pending predicts a token (a resumed cache with no
   *   remaining tokens) or for bad options.
   */
  async *generate(options: SessionStreamOptions): AsyncGenerator<number, SessionGeneration, void> {
    this.assertOpen();
    const n = options.maxTokens;
    check(Number.isInteger(n) && n >= 0, 'config', `session: maxTokens must be an integer ≥ 0, got ${n}`);
    const pick = createSampler(options.sampling === 'greedy' || options.sampling === undefined ? {} : options.sampling);
    const stops = new Set(options.stopIds ?? []);
    const eos = this.model.config.eosId;
    if (options.stopAtEos && eos !== undefined) stops.add(eos);
    if (!this.compressed && this.prompt) await this.compress();
    if (this.unfed.length > 0 && n > 0) {
      if (this.pos >= this.model.config.maxSeqLen) return { ids: [], margins: [], stopReason: 'maxSeqLen' };
      await this.step([...this.unfed]);
    }
    const ids: number[] = [];
    const margins: number[] = [];
    for (let i = 0; i < n; i++) {
      if (i > 0) {
        if (this.pos >= this.model.config.maxSeqLen) return { ids, margins, stopReason: 'maxSeqLen' };
        await this.step([ids[i - 1]]);
      }
      check(this.next, 'config', 'session: no pending logits; feed a token first (prefill, or remainingTokens of resume)');
      margins.push(top2Margin(this.next));
      const tok = pick(this.next);
      ids.push(tok);
      this.unfed = [tok];
      yield tok;
      if (stops.has(tok)) return { ids, margins, stopReason: 'stopId' };
    }
    return { ids, margins, stopReason: 'maxNewTokens' };
  }

  /**
   * Generates up to `n` tokens with `sampling` (greedy at temperature 0; seeded otherwise) and
   * collects them; see {@link generate}.
   * @throws KvpackError('config') when no logits row is pending or n is not an integer ≥ 0.
   */
  async sample(n: number, sampling: SamplingOptions = {}, options: SessionGenerateOptions = {}): Promise<SessionGeneration> {
    const it = this.generate({ maxTokens: n, sampling, stopIds: options.stopIds });
    for (;;) {
      const r = await it.next();
      if (r.done) return r.value;
    }
  }

  /** Greedy (argmax) generation of up to `n` tokens; see {@link generate}. */
  greedy(n: number, options: SessionGenerateOptions = {}): Promise<SessionGeneration> {
    return this.sample(n, {}, options);
  }

  /**
   * Scores `continuation` teacher-forced, in one decode call. With `first` (the token before the
   * continuation, not yet fed), [first, continuation[0..m−2]] are decoded and every row is scored;
   * without it, the pending logits row predicts continuation[0] and continuation[0..m−2] are decoded.
   * NLLs are float64 on the host ({@link tokenNlls}).
   * @throws KvpackError('shape') for an empty continuation; KvpackError('config') when neither `first`
   *   nor a pending row is there.
   */
  async teacherForcedNll(continuation: readonly number[], options: { first?: number } = {}): Promise<TeacherForcedScore> {
    const m = continuation.length;
    check(m >= 1, 'shape', 'decode session: the continuation is empty');
    const tokenNll = new Float64Array(m);
    const best: number[] = [];
    let fed: number[];
    let offset = 0;
    if (options.first !== undefined) fed = [options.first, ...continuation.slice(0, -1)];
    else {
      const row = this.next;
      check(row, 'config', 'decode session: no pending logits to predict the first continuation token; pass `first`');
      tokenNll.set(tokenNlls(row, row.length, [continuation[0]]), 0);
      best.push(argmax(row));
      fed = continuation.slice(0, -1);
      offset = 1;
    }
    if (fed.length > 0) {
      const { data, vocab, rows } = await this.step(fed);
      tokenNll.set(tokenNlls(data, vocab, continuation.slice(offset)), offset);
      for (let i = 0; i < rows; i++) best.push(argmax(data.subarray(i * vocab, (i + 1) * vocab)));
    }
    return { tokenNll, meanNll: tokenNll.reduce((a, b) => a + b, 0) / m, argmax: best };
  }

  /**
   * Hands the compressed cache to the caller (who disposes it) and closes the session.
   * @throws KvpackError('config') when there is no compressed cache.
   */
  detach(): C {
    const c = this.cache;
    this.owns = false;
    this.dispose();
    return c;
  }

  /** Frees what the session owns (the uncompressed prompt, its compressed cache) and closes it. Idempotent. */
  dispose(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.prompt) disposePrompt(this.prompt.kv);
    this.prompt = undefined;
    if (this.owns) this.compressed?.dispose();
  }
}

/**
 * A decode over a cache the caller owns: the constructor of {@link Session}.
 * @deprecated use {@link Session}
 */
export const DecodeSession = Session;
/** @deprecated use {@link Session} */
export type DecodeSession = Session;

function isCompressedCache(x: unknown): x is SessionCache {
  return typeof x === 'object' && x !== null && typeof (x as CompressedCache).tokenCount === 'function' && typeof (x as CompressedCache).serialize === 'function';
}

/** Query window (tokens of post-RoPE prompt queries) that the strategy's compress reads, from its registered capabilities. */
function queryWindow(strategy: Strategy): number {
  try {
    return getStrategyDefinition(strategy.name).capabilities?.queryWindow?.(strategy.options) ?? 0;
  } catch (e) {
    if (e instanceof KvpackError && e.code === 'unknown-strategy') return 0;
    throw e;
  }
}
