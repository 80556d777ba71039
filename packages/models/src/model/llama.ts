import { checkPositionSpan, checkTokenIds, readWeightBytes, weightBytesSync, weightsDigest } from './identity.js';
import * as tf from '@tensorflow/tfjs-core';
import {
  applyRope,
  attention,
  check,
  isHostBackend,
  type CompressedCache,
  type KVCache,
  type ModelLayout,
  type ReconstructionRequest,
  type Strategy,
} from '@kvpack/core';
import type { LlamaConfig, LlamaWeights } from '../types.js';
import { disposeLlamaWeights } from '../hf/weights.js';
import { classify, embed, finishLayer, projectQkv, rmsNorm } from './blocks.js';
import { generate, scoreContinuation, type ContinuationScore, type GenerateOptions, type GenerateResult, type ScoreOptions } from './generation.js';
import { checkLlamaWeights } from './weights-check.js';
import { reconstructionScores } from './reconstruction.js';

/** Options of {@link LlamaModel.prefill}. */
export interface PrefillOptions {
  /**
   * Keep the post-RoPE queries of the last `observationWindow` prompt tokens of every layer in the
   * returned cache (`queries`, [T_obs, H, d]) for query-aware strategies (SnapKV). Default 0 (none).
   */
  observationWindow?: number;
  /** 'all' (default): logits of every prompt token, [T, V]; 'last': only the last one, [1, V]. */
  logits?: 'all' | 'last';
}

/** Result of {@link LlamaModel.prefill}. The caller owns (and disposes) every tensor. */
export interface PrefillResult {
  /** Logits [T, V] (or [1, V] with `logits: 'last'`). */
  logits: tf.Tensor2D;
  /** The prompt's KV cache: pre-RoPE keys and values [T, H_kv, d] per layer, startPosition 0. */
  cache: KVCache;
}

/**
 * A Llama-family decoder (Llama 2/3, Qwen2, Mistral, llama2.c) on TensorFlow.js with a pluggable,
 * compressible KV cache. Per layer: x += Wo·attention(RoPE(Wq·n(x)), RoPE(Wk·n(x)), Wv·n(x)) with
 * RMSNorm n, GQA and causal masking; then x += W2·(silu(W1·n(x)) ⊙ W3·n(x)) (SwiGLU); finally RMSNorm
 * and the classifier. Follows karpathy/llama2.c `model.py` / `run.c` and Hugging Face
 * `modeling_llama.py` (q/k/v biases as `modeling_qwen2.py`).
 *
 * The model owns its weights: {@link dispose} frees them. Every method disposes its intermediate
 * tensors; returned tensors belong to the caller.
 */
export class LlamaModel {
  readonly config: LlamaConfig;

  /**
   * @throws KvpackError('layout' | 'shape' | 'dtype' | 'config') when the weights disagree with their config.
   */
  constructor(readonly weights: LlamaWeights) {
    checkLlamaWeights(weights);
    this.config = weights.config;
  }

  private fingerprintValue: string | undefined;

  /** Every weight tensor with its name, in a fixed order. */
  private namedWeights(): [string, tf.Tensor][] {
    const w = this.weights;
    const out: [string, tf.Tensor][] = [['embedding', w.embedding]];
    w.layers.forEach((l, i) => {
      for (const [k, t] of Object.entries(l).sort(([a], [b]) => (a < b ? -1 : 1))) if (t instanceof tf.Tensor) out.push([`layers.${i}.${k}`, t]);
    });
    out.push(['finalNorm', w.finalNorm], ['classifier', w.classifier]);
    return out;
  }

  private digest(data: (t: tf.Tensor) => Uint8Array): string {
    return weightsDigest(JSON.stringify(this.config, Object.keys(this.config).sort()), this.namedWeights(), data);
  }

  /**
   * The model's fingerprint: `sha256:` and the SHA-256 of its config, every weight's name, dtype and
   * shape, and the weights' float32 bytes as loaded. Caches from {@link prefill} carry it
   * (`KVCache.model`), compressed caches write it into their serialization, and
   * `deserializeCache(bytes, { model: await model.fingerprint() })` refuses a cache made from another
   * model. Computed once (one read of every weight), then cached.
   */
  async fingerprint(): Promise<string> {
    if (this.fingerprintValue === undefined) {
      const bytes = await readWeightBytes(this.namedWeights());
      this.fingerprintValue ??= this.digest(bytes);
    }
    return this.fingerprintValue;
  }

  /** The fingerprint when known or computable without an asynchronous readback (wasm, cpu), else undefined. */
  private knownFingerprint(): string | undefined {
    if (this.fingerprintValue === undefined && isHostBackend()) {
      this.fingerprintValue = this.digest(weightBytesSync);
    }
    return this.fingerprintValue;
  }

  /** Attention layout (L, H, H_kv, d) of this model, as KV caches record it. */
  get layout(): ModelLayout {
    const c = this.config;
    return { nLayers: c.nLayers, nHeads: c.nHeads, nKvHeads: c.nKvHeads, headDim: c.headDim };
  }

  /** Throws unless ids are integers in [0, V). @internal */
  checkIds(ids: readonly number[], what: string): void {
    checkTokenIds(ids, this.config.vocabSize, what);
  }

  /** Throws unless positions start … start + count − 1 fit the model's context. @internal */
  checkPositions(start: number, count: number, what: string): void {
    checkPositionSpan(start, count, this.config.maxSeqLen, 'max_seq_len', what);
  }

  /** Causal forward over ids at positions 0..T−1 with exact attention. */
  private forward(ids: readonly number[], collect: boolean, obs: number, lastOnly: boolean) {
    const T = ids.length;
    const rope = this.config.rope;
    return tf.tidy(() => {
      let x = embed(this.weights, ids);
      const keys: tf.Tensor3D[] = [];
      const values: tf.Tensor3D[] = [];
      const queries: tf.Tensor3D[] = [];
      for (let l = 0; l < this.config.nLayers; l++) {
        const { q, k, v } = projectQkv(this.weights, l, rmsNorm(x, this.weights.layers[l].attnNorm, this.config.normEps));
        const qr = applyRope(q, rope, { start: 0, count: T });
        const kr = applyRope(k, rope, { start: 0, count: T });
        if (collect) {
          keys.push(k);
          values.push(v);
          if (obs > 0) queries.push(tf.slice(qr, [T - obs, 0, 0], [obs, -1, -1]));
        }
        x = finishLayer(this.weights, l, x, attention(qr, kr, v, T, this.config.windows?.[l] ?? undefined));
      }
      const logits = classify(this.weights, lastOnly ? tf.slice(x, [T - 1, 0], [1, -1]) : x);
      return { logits, keys, values, queries };
    });
  }

  /**
   * Runs the prompt with exact causal attention and returns its logits and KV cache.
   * @param ids prompt token ids, at positions 0..T−1 (T ≤ maxSeqLen)
   * @returns logits [T, V] (or [1, V]) and the cache: per layer **pre-RoPE** keys and values
   *   [T, H_kv, d], the model's layout and RoPE, startPosition 0, and with `observationWindow` the
   *   post-RoPE queries [T_obs, H, d] of the last T_obs tokens. The caller disposes them.
   * @throws KvpackError('shape') for ids that are not integers in [0, V), an empty or too long prompt,
   *   or an observationWindow outside [0, T].
   */
  async prefill(ids: number[], opts: PrefillOptions = {}): Promise<PrefillResult> {
    this.checkIds(ids, 'prefill');
    this.checkPositions(0, ids.length, 'prefill');
    const obs = opts.observationWindow ?? 0;
    check(Number.isInteger(obs) && obs >= 0 && obs <= ids.length, 'shape', `prefill: observationWindow ${obs} must be an integer in [0, T = ${ids.length}]`);
    const model = await this.fingerprint();
    const { logits, keys, values, queries } = this.forward(ids, true, obs, opts.logits === 'last');
    const windows = this.config.windows;
    const cache: KVCache = { layout: this.layout, rope: this.config.rope, keys, values, startPosition: 0, model, ...(windows ? { windows: [...windows] } : {}), ...(obs > 0 ? { queries } : {}) };
    return { logits, cache };
  }

  /**
   * KVzip's context-reconstruction scores of a prefilled context: the model re-reads `promptIds` and
   * the context through the cache, chunk by chunk; per layer, each KV pair's largest attention from
   * the repeated tokens ([T, H_kv], float32, owned by the caller). See {@link reconstructionScores}
   * in ./reconstruction.ts for the exact rule.
   * @param cache the prefill cache of `contextIds` (from {@link prefill})
   * @throws KvpackError('shape') for bad ids, a cache of another length, or a pass past max_seq_len
   */
  reconstructionScores(cache: KVCache, contextIds: readonly number[], promptIds: readonly number[], request: Pick<ReconstructionRequest, 'chunkSize' | 'nSink'>): tf.Tensor2D[] {
    this.checkIds(contextIds as number[], 'reconstruction');
    if (promptIds.length) this.checkIds(promptIds as number[], 'reconstruction prompt');
    return reconstructionScores(this.weights, cache, contextIds, promptIds, request);
  }

  /**
   * Runs n new tokens at positions position … position + n − 1 against a (compressed) cache. In each
   * layer it computes q, k, v, applies RoPE, appends the **post-RoPE** keys and the values to the
   * cache (`cache.append`), then attends over everything cached — with `cache.attend(layer, q,
   * { causalTail: n })` when the cache offers it, else core `attention` over `cache.keys/values` —
   * causally among the n new tokens. n > 1 gives teacher-forced scoring in one call.
   * @param ids the new tokens
   * @param cache grows by n tokens per layer
   * @param position position of ids[0] (the number of tokens before it, including evicted ones)
   * @returns logits [n, V]; row i predicts the token after ids[i]
   * @throws KvpackError('shape') for bad ids or positions past maxSeqLen; KvpackError('layout' | 'config')
   *   when the cache belongs to another layout or RoPE; KvpackError('model') when the cache records the
   *   fingerprint of another model ({@link fingerprint}).
   */
  decode(ids: number[], cache: CompressedCache, position: number): tf.Tensor2D {
    this.checkIds(ids, 'decode');
    this.checkPositions(position, ids.length, 'decode');
    const L = this.layout;
    const cl = cache.layout;
    check((cache as { kind?: string }).kind !== 'mla', 'layout', 'decode: this is an MLA latent cache; a Llama-family model decodes over per-head KV caches');
    check(
      cl.nLayers === L.nLayers && cl.nHeads === L.nHeads && cl.nKvHeads === L.nKvHeads && cl.headDim === L.headDim,
      'layout',
      `decode: the cache's layout (${cl.nLayers} layers, ${cl.nHeads} heads, ${cl.nKvHeads} KV heads, head_dim ${cl.headDim}) is not the model's (${L.nLayers}, ${L.nHeads}, ${L.nKvHeads}, ${L.headDim})`,
    );
    const mine = cache.model === undefined ? undefined : this.knownFingerprint();
    check(
      cache.model === undefined || mine === undefined || cache.model === mine,
      'model',
      () => `decode: the cache was made from model ${cache.model}, not from this model (${mine})`,
    );
    const rope = this.config.rope;
    check(
      cache.rope.theta === rope.theta && cache.rope.layout === rope.layout,
      'config',
      `decode: the cache's RoPE (theta ${cache.rope.theta}, ${cache.rope.layout}) is not the model's (theta ${rope.theta}, ${rope.layout})`,
    );
    const n = ids.length;
    const pos = { start: position, count: n };
    let x = embed(this.weights, ids);
    try {
      for (let l = 0; l < this.config.nLayers; l++) {
        // append() creates tensors the cache keeps, so it must run outside any tidy scope.
        const { q, k, v } = tf.tidy(() => {
          const p = projectQkv(this.weights, l, rmsNorm(x, this.weights.layers[l].attnNorm, this.config.normEps));
          return { q: applyRope(p.q, rope, pos), k: applyRope(p.k, rope, pos), v: p.v };
        });
        try {
          cache.append(l, k, v);
        } catch (e) {
          q.dispose();
          throw e;
        } finally {
          tf.dispose([k, v]);
        }
        let next: tf.Tensor2D;
        try {
          next = tf.tidy(() => {
            const W = this.config.windows?.[l] ?? undefined;
            const o = W !== undefined ? this.windowedAttention(cache, l, q, n, position, W) : cache.attend ? cache.attend(l, q, { causalTail: n }) : attention(q, cache.keys(l), cache.values(l), n);
            return finishLayer(this.weights, l, x, o);
          });
        } finally {
          q.dispose();
        }
        x.dispose();
        x = next;
      }
      return tf.tidy(() => classify(this.weights, x));
    } finally {
      x.dispose();
    }
  }

  /**
   * Attention of a sliding-window layer over a compressed cache: the reconstructed keys and values,
   * masked to the W tokens ending at each query's position. The mask works on cache rows, so the
   * cache must hold every token before the new ones at consecutive positions.
   * @throws KvpackError('unsupported') when the cache dropped tokens of this layer (token eviction).
   */
  private windowedAttention(cache: CompressedCache, l: number, q: tf.Tensor3D, n: number, position: number, W: number): tf.Tensor3D {
    const held = cache.tokenCount(l);
    check(
      held === position + n,
      'unsupported',
      `decode: layer ${l} uses a ${W}-token sliding window, but the ${cache.strategy} cache holds ${held} of its ${position + n} tokens: sliding-window layers need every token at its position (use a strategy that keeps all tokens)`,
    );
    return attention(q, cache.keys(l), cache.values(l), n, W);
  }

  /**
   * Generates up to `maxNewTokens` tokens after a prompt: prefill, compress the prompt's cache with
   * the strategy, then decode (a {@link Session}: one {@link decode} per new token; decode tokens stay
   * exact in the cache). With `options.cache` (a compressed prefix, e.g. restored from bytes) the
   * prompt ids are the tokens after that prefix: only they are fed, appended exactly after it. With
   * `returnCache` the cache it ends with is returned (`compressedCache`). Sampling is greedy by
   * default; with a temperature it is seeded and deterministic. Stops early at EOS (`stopAtEos`), a
   * `stopIds` token, or when the next position would pass maxSeqLen.
   * @returns generated ids, the top-2 logit gap per step, the cache's byte accounting (and the cache)
   * @throws KvpackError('shape' | 'config') for bad ids or options; KvpackError('model') when
   *   `options.cache` was made from another model; whatever the strategy throws.
   */
  generate(promptIds: number[], options: GenerateOptions): Promise<GenerateResult> {
    return generate(this, promptIds, options);
  }

  /**
   * Scores a continuation given a prompt whose cache is compressed by `strategy`: the first
   * continuation token is predicted from the prompt's last logits, the others teacher-forced through
   * one {@link decode} call over continuation[0..m−2] (n = m − 1, causal among themselves); NLLs in
   * float64 ({@link Session.teacherForcedNll}).
   * @param strategy default `dense` with float32 storage (exact)
   * @throws KvpackError('shape') for bad ids or when prompt + continuation − 1 tokens exceed maxSeqLen.
   */
  scoreContinuation(promptIds: number[], continuationIds: number[], strategy?: Strategy, options: ScoreOptions = {}): Promise<ContinuationScore> {
    return scoreContinuation(this, promptIds, continuationIds, strategy, options);
  }

  /**
   * Mean negative log-likelihood (nats per token) of a continuation given a prompt whose cache is
   * compressed by `strategy` (default exact); see {@link scoreContinuation}.
   */
  async nll(promptIds: number[], continuationIds: number[], strategy?: Strategy, options?: ScoreOptions): Promise<number> {
    return (await this.scoreContinuation(promptIds, continuationIds, strategy, options)).meanNll;
  }

  /** −log softmax(logits)[target] per row, computed on the backend. */
  private async rowNll(logits: tf.Tensor2D, targets: readonly number[]): Promise<Float64Array> {
    const V = logits.shape[1];
    const r = tf.tidy(() => {
      const idx = tf.tensor1d(targets.map((t, i) => i * V + t), 'int32');
      return tf.neg(tf.gather(tf.logSoftmax(logits).reshape([-1]), idx));
    });
    const out = Float64Array.from((await r.data()) as Float32Array);
    r.dispose();
    return out;
  }

  /**
   * Teacher-forced mean negative log-likelihood (nats per token) of ids[1..T−1], each given all
   * earlier ids, from one causal forward over ids[0..T−2] with no cache compression.
   * @throws KvpackError('shape') for fewer than 2 ids, bad ids, or T − 1 > maxSeqLen.
   */
  async meanNll(ids: number[]): Promise<number> {
    this.checkIds(ids, 'meanNll');
    check(ids.length >= 2, 'shape', `meanNll: needs at least 2 token ids, got ${ids.length}`);
    this.checkPositions(0, ids.length - 1, 'meanNll');
    const { logits } = this.forward(ids.slice(0, -1), false, 0, false);
    try {
      const nll = await this.rowNll(logits, ids.slice(1));
      return nll.reduce((a, b) => a + b, 0) / nll.length;
    } finally {
      logits.dispose();
    }
  }

  /** Frees the model's weights. */
  dispose(): void {
    disposeLlamaWeights(this.weights);
  }
}
