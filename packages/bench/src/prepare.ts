import * as tf from '@tensorflow/tfjs-core';
import { check, createStrategy, disposeKVCache, type CompressedCache, type KVCache } from '@kvpack/core';
import { Session, type SessionGeneration } from '@kvpack/models';
import { argmaxRow, tokenNlls } from './metrics.js';
import type { BenchModel } from './model.js';
import type { BenchPrompt, PromptReference } from './results.js';

/** Reads [n, V] logits back to the host and disposes them. */
export async function logitsData(x: tf.Tensor2D): Promise<{ data: Float32Array; vocab: number }> {
  const data = (await x.data()) as Float32Array;
  const vocab = x.shape[1];
  x.dispose();
  return { data, vocab };
}

/** Argmax of every row of [n, V] logits. */
function rowArgmax(data: Float32Array, vocab: number): number[] {
  return Array.from({ length: data.length / vocab }, (_, i) => argmaxRow(data, vocab, i));
}

/** How greedy decoding through a compressed cache starts: feed a token at `position`, or take the known logits row that predicts it. */
export type GreedyStart = { feed: number | number[]; position: number } | { lastRow: Float32Array; position: number };

/**
 * Greedy decoding of up to `n` tokens through `cache` (the caller's) with a models `Session`: in
 * `feed` mode the token (or tokens, in one causal decode call: a question read through the
 * compressed cache) is fed at `position` first; in `lastRow` mode that row predicts the first
 * token. Stops after `n` tokens or at a stop id. Every greedy loop of the bench goes through here.
 */
export async function greedyFrom(model: BenchModel, cache: CompressedCache, start: GreedyStart, n: number, stopIds?: Iterable<number>): Promise<SessionGeneration> {
  if (n <= 0) return { ids: [], margins: [], stopReason: 'maxNewTokens' };
  const session = new Session(model, cache, start.position, 'lastRow' in start ? start.lastRow : undefined);
  if ('feed' in start) await session.prefill(typeof start.feed === 'number' ? [start.feed] : start.feed);
  return session.greedy(n, { stopIds });
}

/** Teacher-forced NLL (nats per token) and argmax of `continuation` through `cache` (the caller's), feeding `first` at `position` before it. */
export function teacherForced(model: BenchModel, cache: CompressedCache, first: number, position: number, continuation: number[]) {
  return new Session(model, cache, position).teacherForcedNll(continuation, { first });
}

/** A prompt with its uncompressed reference and the prefill caches every setting compresses. */
export interface PreparedPrompt {
  prompt: BenchPrompt;
  ref: PromptReference;
  /** Prefill caches of context[:-1], by query window (0 = no queries). */
  caches: Map<number, KVCache>;
}

/**
 * Prepares one prompt: checks its lengths; the uncompressed reference NLL and argmax from one forward
 * pass over context + continuation; one prefill of context[:-1] per query window; the reference
 * greedy tokens and the decode-path self-check through a dense float32 cache.
 * @throws KvpackError('config') when the prompt is too short or too long for the model.
 */
export async function preparePrompt(model: BenchModel, p: BenchPrompt, windows: number[], decodeTokens: number): Promise<PreparedPrompt> {
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
  let decodeNllDense: number;
  try {
    decodeNllDense = (await teacherForced(model, d1, ctx[T], T, cont)).meanNll;
  } finally {
    d1.dispose();
  }
  let greedyTokens: number[] = [];
  let greedyMargins: number[] = [];
  let greedyForwardAgreement = 1;
  if (decodeTokens > 0) {
    const d2 = await dense.compress(base);
    try {
      ({ ids: greedyTokens, margins: greedyMargins } = await greedyFrom(model, d2, { feed: ctx[T], position: T }, decodeTokens));
    } finally {
      d2.dispose();
    }
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
