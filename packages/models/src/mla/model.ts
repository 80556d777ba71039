import { checkPositionSpan, checkTokenIds, readWeightBytes, weightsDigest } from '../model/identity.js';
import * as tf from '@tensorflow/tfjs-core';
import {
  applyRope,
  causalTailMask,
  check,
  ropeSharedKeys,
  type CompressedMlaCache,
  type MlaKVCache,
  type MlaLayout,
  type Strategy,
} from '@kvpack/core';
import { rmsNorm } from '../model/blocks.js';
import { generate, scoreContinuation, type ContinuationScore, type GenerateOptions, type GenerateResult, type ScoreOptions } from '../model/generation.js';
import { isMoeLayer, type DeepseekConfig } from './config.js';
import { moeForward, swiglu } from './moe.js';
import { disposeDeepseekWeights, namedDeepseekTensors, type DeepseekWeights } from './weights.js';

/**
 * How attention over the latent cache is computed:
 * - `absorbed`: W_UK is folded into the query (q_lat = W_UKᵀ·q_nope per head, [H, r]) and W_UV applied
 *   after attention (o = W_UV·Σ p·c); scores are q_lat·c + q_R·k_R, the latent never expanded to per-head
 *   keys (DeepSeek-V2 §2.1.2, "absorb").
 * - `naive`: the latent is expanded to per-head keys [k_nope = W_UK·c ; k_R] and values W_UV·c, then
 *   ordinary multi-head attention (DeepSeek's reference code; the form transformers runs).
 */
export type MlaAttentionForm = 'absorbed' | 'naive';

/** Options of {@link DeepseekModel}. */
export interface DeepseekModelOptions {
  /** Attention form of prefill and decode (default `absorbed`). Both give the same logits up to float32 rounding. */
  attention?: MlaAttentionForm;
}

/** Options of {@link DeepseekModel.prefill}. */
export interface MlaPrefillOptions {
  /**
   * Keep the absorbed-form queries of the last `observationWindow` prompt tokens of every layer
   * (`MlaKVCache.queries`, [T_obs, H, r + d_r], softmax scale included) for query-aware strategies.
   */
  observationWindow?: number;
  /** 'all' (default): logits of every prompt token, [T, V]; 'last': only the last one, [1, V]. */
  logits?: 'all' | 'last';
}

/** Per-layer up-projections split for the absorbed form (derived from kv_b_proj at construction). */
interface Absorbed {
  /** W_UK per head, [H, d_n, r]: q_lat[h] = q_nope[h] · wUK[h]. */
  wUK: tf.Tensor3D;
  /** W_UV per head, [H, r, d_v]: o[h] = (Σ p·c) · wUV[h]. */
  wUV: tf.Tensor3D;
}

/**
 * A DeepSeek-V2 / V2-Lite / V3 decoder with Multi-head Latent Attention (DeepSeek-V2 paper §2.1,
 * arXiv 2405.04434) and DeepSeekMoE feed-forwards, on TensorFlow.js, following transformers'
 * `modeling_deepseek_v2.py` / `modeling_deepseek_v3.py` and DeepSeek's `modeling_deepseek.py`.
 *
 * Per layer, with n(·) an RMSNorm: h = n(x); q = W_q·h or W_qB·n(W_qA·h), split per head into
 * q_nope [d_n] and q_R [d_r]; [c' ; k_R] = W_kvA·h with the latent c = n(c') [r] and the shared
 * pre-RoPE key k_R [d_r]; per head k_nope = W_UK·c, v = W_UV·c (kv_b_proj); scores
 * (q_nope·k_nope + RoPE(q_R)·RoPE(k_R)) · softmaxScale; x += W_o·(softmax · v); then x += FFN(n(x)),
 * dense SwiGLU or MoE. The cache holds, per layer, c [T, r] and k_R [T, d_r] only
 * ({@link MlaKVCache}).
 *
 * The model owns its weights ({@link dispose}). Returned tensors belong to the caller.
 */
export class DeepseekModel {
  readonly config: DeepseekConfig;
  /** Attention form of the next prefill / decode calls; may be switched between calls. */
  attentionForm: MlaAttentionForm;
  private readonly absorbed: Absorbed[];
  private fingerprintValue: string | undefined;

  /**
   * @throws KvpackError('config') for an unknown attention form.
   */
  constructor(
    readonly weights: DeepseekWeights,
    options: DeepseekModelOptions = {},
  ) {
    this.config = weights.config;
    const form = options.attention ?? 'absorbed';
    check(form === 'absorbed' || form === 'naive', 'config', `DeepseekModel: attention must be 'absorbed' or 'naive', got ${JSON.stringify(form)}`);
    this.attentionForm = form;
    const c = this.config;
    const [H, dn, dv, r] = [c.nHeads, c.qkNopeHeadDim, c.vHeadDim, c.kvLoraRank];
    this.absorbed = weights.layers.map((lw) =>
      tf.tidy(() => {
        const kv = lw.wkvB.reshape([r, H, dn + dv]);
        return {
          wUK: tf.slice(kv, [0, 0, 0], [r, H, dn]).transpose([1, 2, 0]) as tf.Tensor3D,
          wUV: tf.slice(kv, [0, 0, dn], [r, H, dv]).transpose([1, 0, 2]) as tf.Tensor3D,
        };
      }),
    );
  }

  /** The MLA cache layout of this model. */
  get layout(): MlaLayout {
    const c = this.config;
    return { nLayers: c.nLayers, nHeads: c.nHeads, kvLoraRank: c.kvLoraRank, qkRopeHeadDim: c.qkRopeHeadDim, qkNopeHeadDim: c.qkNopeHeadDim, vHeadDim: c.vHeadDim };
  }

  private digest(data: (t: tf.Tensor) => Uint8Array): string {
    const config = JSON.stringify(this.config, (_k, v) => (v && typeof v === 'object' && !Array.isArray(v) ? Object.fromEntries(Object.entries(v).sort()) : v));
    return weightsDigest(config, namedDeepseekTensors(this.weights), data, (h) =>
      this.weights.layers.forEach((l, i) => {
        const b = l.moe?.scoreBias;
        if (b) h.update(`\nlayers.${i}.moe.scoreBias\n`).update(new Uint8Array(b.buffer, b.byteOffset, b.byteLength));
      }),
    );
  }

  /**
   * The model's fingerprint: `sha256:` over its config, every weight's name, dtype, shape and float32
   * bytes (and the router biases). Caches from {@link prefill} carry it. Computed once.
   */
  async fingerprint(): Promise<string> {
    if (this.fingerprintValue === undefined) {
      const bytes = await readWeightBytes(namedDeepseekTensors(this.weights));
      this.fingerprintValue ??= this.digest(bytes);
    }
    return this.fingerprintValue;
  }

  /** Throws unless ids are integers in [0, V). @internal */
  checkIds(ids: readonly number[], what: string): void {
    checkTokenIds(ids, this.config.vocabSize, what);
  }

  /** Throws unless positions start … start + count − 1 fit the model's context. @internal */
  checkPositions(start: number, count: number, what: string): void {
    checkPositionSpan(start, count, this.config.maxSeqLen, 'max_position_embeddings', what);
  }

  /**
   * One layer's projections for normed rows h [n, D] at positions start…: q_nope [n, H, d_n], post-RoPE
   * q_R [n, H, d_r], the latent c [n, r] (after its RMSNorm) and the pre-RoPE shared key k_R [n, d_r].
   */
  private project(l: number, h: tf.Tensor2D, start: number) {
    const c = this.config;
    const lw = this.weights.layers[l];
    const n = h.shape[0];
    const [H, dn, dr, r] = [c.nHeads, c.qkNopeHeadDim, c.qkRopeHeadDim, c.kvLoraRank];
    const qFlat = lw.wq ? tf.matMul(h, lw.wq) : tf.matMul(rmsNorm(tf.matMul(h, lw.wqA!), lw.qANorm!, c.normEps), lw.wqB!);
    const q = qFlat.reshape([n, H, dn + dr]);
    const qNope = tf.slice(q, [0, 0, 0], [n, H, dn]) as tf.Tensor3D;
    const qR = applyRope(tf.slice(q, [0, 0, dn], [n, H, dr]) as tf.Tensor3D, c.rope, { start, count: n });
    const ckv = tf.matMul(h, lw.wkvA);
    const latent = rmsNorm(tf.slice(ckv, [0, 0], [n, r]) as tf.Tensor2D, lw.kvANorm, c.normEps);
    const kR = tf.slice(ckv, [0, r], [n, dr]) as tf.Tensor2D;
    return { qNope, qR, latent, kR };
  }

  /** Absorbed-form queries [n, H, r + d_r]: [W_UKᵀ·q_nope ; q_R] per head (softmax scale not applied). */
  private absorbedQueries(l: number, qNope: tf.Tensor3D, qR: tf.Tensor3D): tf.Tensor3D {
    const qLat = tf.matMul(qNope.transpose([1, 0, 2]), this.absorbed[l].wUK).transpose([1, 0, 2]); // [n, H, r]
    return tf.concat([qLat, qR], 2) as tf.Tensor3D;
  }

  /**
   * Attention of n query rows over N cached tokens (the last n are the rows' own), causal among those:
   * returns [n, H·d_v].
   * @param latents c [N, r]; ropeKeys post-RoPE k_R [N, d_r]
   */
  private attend(l: number, qNope: tf.Tensor3D, qR: tf.Tensor3D, latents: tf.Tensor2D, ropeKeys: tf.Tensor2D): tf.Tensor2D {
    const c = this.config;
    const [n, H] = qNope.shape;
    const N = latents.shape[0];
    const [dn, dv, r] = [c.qkNopeHeadDim, c.vHeadDim, c.kvLoraRank];
    const mask = n > 1 ? causalTailMask(n, N, n) : null;
    if (this.attentionForm === 'absorbed') {
      // One [H·n, r + d_r] × [r + d_r, N] product: every head reads the same latent keys.
      const q = this.absorbedQueries(l, qNope, qR).transpose([1, 0, 2]).reshape([H * n, -1]) as tf.Tensor2D;
      const keys = tf.concat([latents, ropeKeys], 1);
      let s = tf.matMul(q, keys, false, true).mul(c.softmaxScale).reshape([H, n, N]);
      if (mask) s = s.add(mask.reshape([1, n, N]));
      const p = tf.softmax(s, -1).reshape([H * n, N]) as tf.Tensor2D;
      const oLat = tf.matMul(p, latents).reshape([H, n, r]) as tf.Tensor3D;
      return tf.matMul(oLat, this.absorbed[l].wUV).transpose([1, 0, 2]).reshape([n, H * dv]) as tf.Tensor2D;
    }
    // Naive: per-head keys [k_nope ; k_R] and values from the latent.
    const kv = tf.matMul(latents, this.weights.layers[l].wkvB).reshape([N, H, dn + dv]);
    const kNope = tf.slice(kv, [0, 0, 0], [N, H, dn]);
    const v = tf.slice(kv, [0, 0, dn], [N, H, dv]).transpose([1, 0, 2]); // [H, N, d_v]
    const k = tf.concat([kNope, tf.tile(ropeKeys.reshape([N, 1, -1]), [1, H, 1])], 2).transpose([1, 2, 0]); // [H, d, N]
    const q = tf.concat([qNope, qR], 2).transpose([1, 0, 2]); // [H, n, d]
    let s = tf.matMul(q, k).mul(c.softmaxScale);
    if (mask) s = s.add(mask.reshape([1, n, N]));
    const o = tf.matMul(tf.softmax(s, -1), v); // [H, n, d_v]
    return o.transpose([1, 0, 2]).reshape([n, H * dv]) as tf.Tensor2D;
  }

  private async ffn(l: number, x1: tf.Tensor2D): Promise<tf.Tensor2D> {
    const lw = this.weights.layers[l];
    const h = tf.tidy(() => rmsNorm(x1, lw.ffnNorm, this.config.normEps));
    try {
      const y = isMoeLayer(this.config, l) ? await moeForward(lw.moe!, this.config.moe!, this.config.modelType === 'deepseek_v3', h) : swiglu(lw.mlp!, h);
      try {
        return tf.add(x1, y) as tf.Tensor2D;
      } finally {
        y.dispose();
      }
    } finally {
      h.dispose();
    }
  }

  private embed(ids: readonly number[]): tf.Tensor2D {
    return tf.tidy(() => tf.gather(this.weights.embedding, tf.tensor1d(ids as number[], 'int32')) as tf.Tensor2D);
  }

  private classify(x: tf.Tensor2D): tf.Tensor2D {
    return tf.tidy(() => tf.matMul(rmsNorm(x, this.weights.finalNorm, this.config.normEps), this.weights.classifier));
  }

  /** Causal forward over ids at positions 0..T−1 with exact attention. */
  private async forward(ids: readonly number[], collect: boolean, obs: number, lastOnly: boolean) {
    const T = ids.length;
    const latents: tf.Tensor2D[] = [];
    const ropeKeys: tf.Tensor2D[] = [];
    const queries: tf.Tensor3D[] = [];
    let x = this.embed(ids);
    try {
      for (let l = 0; l < this.config.nLayers; l++) {
        const x1 = tf.tidy(() => {
          const p = this.project(l, rmsNorm(x, this.weights.layers[l].attnNorm, this.config.normEps), 0);
          if (collect) {
            latents.push(tf.keep(p.latent));
            ropeKeys.push(tf.keep(p.kR));
            if (obs > 0)
              queries.push(
                tf.keep(tf.slice(this.absorbedQueries(l, p.qNope, p.qR), [T - obs, 0, 0], [obs, -1, -1]).mul(this.config.softmaxScale) as tf.Tensor3D),
              );
          }
          const o = this.attend(l, p.qNope, p.qR, p.latent, ropeSharedKeys(p.kR, this.config.rope, 0));
          return tf.add(x, tf.matMul(o, this.weights.layers[l].wo)) as tf.Tensor2D;
        });
        x.dispose();
        x = x1;
        const x2 = await this.ffn(l, x);
        x.dispose();
        x = x2;
      }
      const logits = lastOnly ? tf.tidy(() => this.classify(tf.slice(x, [T - 1, 0], [1, -1]))) : this.classify(x);
      return { logits, latents, ropeKeys, queries };
    } catch (e) {
      tf.dispose([...latents, ...ropeKeys, ...queries]);
      throw e;
    } finally {
      x.dispose();
    }
  }

  /**
   * Runs the prompt with exact causal attention and returns its logits and MLA cache.
   * @param ids prompt token ids, at positions 0..T−1 (T ≤ maxSeqLen)
   * @returns logits [T, V] (or [1, V]) and the cache: per layer the latents c [T, r] and **pre-RoPE**
   *   shared keys k_R [T, d_r], the model's layout and RoPE, startPosition 0, the fingerprint, and with
   *   `observationWindow` the absorbed-form queries. The caller disposes them.
   * @throws KvpackError('shape') for bad ids, an empty or too long prompt, or a bad observationWindow.
   */
  async prefill(ids: number[], opts: MlaPrefillOptions = {}): Promise<{ logits: tf.Tensor2D; cache: MlaKVCache }> {
    this.checkIds(ids, 'prefill');
    this.checkPositions(0, ids.length, 'prefill');
    const obs = opts.observationWindow ?? 0;
    check(Number.isInteger(obs) && obs >= 0 && obs <= ids.length, 'shape', `prefill: observationWindow ${obs} must be an integer in [0, T = ${ids.length}]`);
    const model = await this.fingerprint();
    const { logits, latents, ropeKeys, queries } = await this.forward(ids, true, obs, opts.logits === 'last');
    const cache: MlaKVCache = { kind: 'mla', layout: this.layout, rope: this.config.rope, latents, ropeKeys, startPosition: 0, model, ...(obs > 0 ? { queries } : {}) };
    return { logits, cache };
  }

  /**
   * Runs n new tokens at positions position … position + n − 1 against a (compressed) MLA cache: per
   * layer it appends their latents and **post-RoPE** shared keys (`cache.append`), then attends over
   * everything cached (`cache.latents`, `cache.ropeKeys`), causally among the n new tokens, in the
   * model's attention form. n > 1 scores teacher-forced in one call.
   * @returns logits [n, V]; row i predicts the token after ids[i]
   * @throws KvpackError('shape') for bad ids or positions past maxSeqLen; ('layout' | 'config') when
   *   the cache belongs to another layout or RoPE; ('model') when it records another model's fingerprint.
   */
  async decode(ids: number[], cache: CompressedMlaCache, position: number): Promise<tf.Tensor2D> {
    this.checkIds(ids, 'decode');
    this.checkPositions(position, ids.length, 'decode');
    const L = this.layout;
    const cl = cache.layout;
    check(
      cache.kind === 'mla' && cl !== undefined && (Object.keys(L) as (keyof MlaLayout)[]).every((k) => cl[k] === L[k]),
      'layout',
      () => `decode: the cache's layout ${cache.kind === 'mla' ? JSON.stringify(cl) : '(a per-head KV cache)'} is not this MLA model's ${JSON.stringify(L)}`,
    );
    if (cache.model !== undefined) {
      const mine = await this.fingerprint();
      check(cache.model === mine, 'model', `decode: the cache was made from model ${cache.model}, not from this model (${mine})`);
    }
    check(canonical(cache.rope) === canonical(this.config.rope), 'config', `decode: the cache's RoPE ${canonical(cache.rope)} is not the model's ${canonical(this.config.rope)}`);
    let x = this.embed(ids);
    try {
      for (let l = 0; l < this.config.nLayers; l++) {
        // append() keeps copies, so it runs outside any tidy scope.
        const p = tf.tidy(() => {
          const r = this.project(l, rmsNorm(x, this.weights.layers[l].attnNorm, this.config.normEps), position);
          return { ...r, kRot: ropeSharedKeys(r.kR, this.config.rope, position) };
        });
        let x1: tf.Tensor2D;
        try {
          cache.append(l, p.latent, p.kRot);
          x1 = tf.tidy(() => {
            const o = this.attend(l, p.qNope, p.qR, cache.latents(l), cache.ropeKeys(l));
            return tf.add(x, tf.matMul(o, this.weights.layers[l].wo)) as tf.Tensor2D;
          });
        } finally {
          tf.dispose([p.qNope, p.qR, p.latent, p.kR, p.kRot]);
        }
        x.dispose();
        x = x1;
        const x2 = await this.ffn(l, x);
        x.dispose();
        x = x2;
      }
      return this.classify(x);
    } finally {
      x.dispose();
    }
  }

  /**
   * Generates up to `maxNewTokens` tokens after a prompt: prefill, compress the prompt's MLA cache
   * with the strategy (default exact dense float32; it must declare MLA support), then decode (a
   * `Session`). Same options and result as `LlamaModel.generate`; the compression ratio counts fp16
   * latents and RoPE keys (core `mlaDenseBytes`).
   * @throws KvpackError('shape' | 'config') for bad ids or options; ('unsupported') from a strategy that does not compress MLA caches.
   */
  generate(promptIds: number[], options: GenerateOptions<CompressedMlaCache>): Promise<GenerateResult<CompressedMlaCache>> {
    return generate<CompressedMlaCache>(this, promptIds, options);
  }

  /**
   * Scores a continuation given a prompt whose MLA cache is compressed by `strategy` (default exact),
   * as `LlamaModel.scoreContinuation`: the first token from the prompt's last logits, the others
   * teacher-forced in one decode call; NLLs in float64.
   */
  scoreContinuation(promptIds: number[], continuationIds: number[], strategy?: Strategy, options: ScoreOptions = {}): Promise<ContinuationScore> {
    return scoreContinuation<CompressedMlaCache>(this, promptIds, continuationIds, strategy, options);
  }

  /**
   * Teacher-forced mean negative log-likelihood (nats per token) of ids[1..T−1], from one causal
   * forward over ids[0..T−2] with no cache compression.
   * @throws KvpackError('shape') for fewer than 2 ids, bad ids or T − 1 > maxSeqLen.
   */
  async meanNll(ids: number[]): Promise<number> {
    this.checkIds(ids, 'meanNll');
    check(ids.length >= 2, 'shape', `meanNll: needs at least 2 token ids, got ${ids.length}`);
    this.checkPositions(0, ids.length - 1, 'meanNll');
    const { logits } = await this.forward(ids.slice(0, -1), false, 0, false);
    const V = this.config.vocabSize;
    try {
      const d = (await logits.data()) as Float32Array;
      let sum = 0;
      for (let i = 0; i < ids.length - 1; i++) {
        const row = d.subarray(i * V, (i + 1) * V);
        let m = -Infinity;
        for (const v of row) m = Math.max(m, v);
        let s = 0;
        for (const v of row) s += Math.exp(v - m);
        sum += m + Math.log(s) - row[ids[i + 1]];
      }
      return sum / (ids.length - 1);
    } finally {
      logits.dispose();
    }
  }

  /** Frees the model's weights and its derived absorbed-form matrices. */
  dispose(): void {
    for (const a of this.absorbed) tf.dispose([a.wUK, a.wUV]);
    this.absorbed.length = 0;
    disposeDeepseekWeights(this.weights);
  }
}

/** JSON with sorted keys and null for absent scaling, for comparing RoPE configs. */
function canonical(v: unknown): string {
  return JSON.stringify(v ?? null, (_k, x) =>
    x && typeof x === 'object' && !Array.isArray(x) ? Object.fromEntries(Object.entries(x).filter(([, y]) => y != null).sort(([a], [b]) => (a < b ? -1 : 1))) : x,
  );
}
