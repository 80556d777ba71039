import * as tf from '@tensorflow/tfjs-core';
import { z } from 'zod';
import { check, KvpackError } from './errors.js';
import {
  containerReader,
  DecodeBufferedCache,
  RopeConfigSchema,
  storedLayoutMismatch,
  type DecodeBufferSpec,
  unreadMessage,
  type StoredReader,
} from './cache.js';
import { decodeContainer, type ByteSource, type DecodedContainer } from './serialize.js';
import { disposeCreatedOnError } from './scope.js';
import { applyRope } from './rope.js';
import { nonFiniteIndices } from './validate.js';
import type { RopeConfig } from './types.js';

/**
 * Attention layout of a Multi-head Latent Attention model (DeepSeek-V2 §2.1, arXiv 2405.04434).
 * Each layer caches one latent c_KV of `kvLoraRank` channels per token and one RoPE key k_R of
 * `qkRopeHeadDim` channels shared by all `nHeads` query heads; per-head keys and values are
 * up-projections of the latent (W_UK, W_UV), never cached.
 */
export interface MlaLayout {
  /** Number of decoder layers L. */
  nLayers: number;
  /** Number of query heads H. */
  nHeads: number;
  /** Latent width d_c (`kv_lora_rank`). */
  kvLoraRank: number;
  /** Width of the decoupled RoPE key and query part, d_R (`qk_rope_head_dim`, even). */
  qkRopeHeadDim: number;
  /** Width of each head's non-RoPE query/key part (`qk_nope_head_dim`). */
  qkNopeHeadDim: number;
  /** Width of each head's value (`v_head_dim`). */
  vHeadDim: number;
}

/**
 * A prefill MLA cache. Per layer: the latents c_KV [T, d_c] (after the latent's RMSNorm, what the
 * model up-projects) and the RoPE keys k_R [T, d_R], **pre-RoPE**, shared by every head; `rope` says
 * how to rotate them. Token i sits at position `startPosition + i`.
 *
 * Ownership: strategies never dispose the tensors of an `MlaKVCache` they are given.
 */
export interface MlaKVCache {
  kind: 'mla';
  layout: MlaLayout;
  rope: RopeConfig;
  /** Latents c_KV per layer, [T, d_c] float32. */
  latents: tf.Tensor2D[];
  /** Pre-RoPE shared keys k_R per layer, [T, d_R] float32. */
  ropeKeys: tf.Tensor2D[];
  /** Position of the first token (default 0). */
  startPosition?: number;
  /**
   * Optional absorbed-form queries of the last prompt tokens per layer, [T_obs, H, d_c + d_R], for
   * query-aware strategies (SnapKV): per head, the first d_c channels are W_UKᵀ·q_nope and the last d_R
   * the post-RoPE q_R, with the softmax scale already multiplied in, so that head h's attention logits
   * over the cache are q_h · [c_KV ; RoPE(k_R)]. They belong to positions startPosition + T − T_obs … + T − 1.
   */
  queries?: tf.Tensor3D[];
  /** Fingerprint of the model that produced this cache (see `KVCache.model`). */
  model?: string;
}

/** True for an MLA latent cache ({@link MlaKVCache}), false for a per-head KV cache. */
export function isMlaCache(cache: unknown): cache is MlaKVCache {
  return typeof cache === 'object' && cache !== null && (cache as { kind?: unknown }).kind === 'mla';
}

/**
 * A compressed MLA cache: the result of `Strategy.compress` on an {@link MlaKVCache}. The model
 * attends in absorbed form over `latents` and `ropeKeys`. Tensors returned belong to the caller.
 */
export interface CompressedMlaCache {
  readonly kind: 'mla';
  /** Registered strategy name that produced this cache. */
  readonly strategy: string;
  readonly layout: MlaLayout;
  readonly rope: RopeConfig;
  /** Number of prefill tokens that were compressed (T). */
  readonly prefillLength: number;
  /** Fingerprint of the model whose cache was compressed, when it came from one. */
  readonly model?: string;
  /** Number of tokens `latents(layer)` returns (prefill tokens kept + decode tokens). */
  tokenCount(layer: number): number;
  /** Reconstructed latents of one layer, [N, d_c]. */
  latents(layer: number): tf.Tensor2D;
  /** Reconstructed **post-RoPE** shared keys of one layer, [N, d_R], rotated at their true positions. */
  ropeKeys(layer: number): tf.Tensor2D;
  /**
   * Appends decode-time tokens to one layer: latents [n, d_c] and **post-RoPE** shared keys [n, d_R],
   * kept exact (float32). The tensors are copied; the caller keeps its arguments.
   * @throws KvpackError('shape' | 'dtype')
   */
  append(layer: number, latents: tf.Tensor2D, ropeKeys: tf.Tensor2D): void;
  /** Bytes really held (payload of {@link serialize}), RoPE keys included, 16-bit storage counted as 2 bytes. */
  byteSize(): number;
  /** Self-describing binary form; `deserializeMlaCache` restores it. */
  serialize(): Uint8Array;
  /** {@link serialize} reading device tensors back asynchronously first (webgpu). */
  serializeAsync(): Promise<Uint8Array>;
  /** Frees every tensor this cache holds. Idempotent. */
  dispose(): void;
}

/** Dense fp16 bytes of an MLA cache of T tokens: L · T · (d_c + d_R) · 2 — what a serving system keeps. */
export function mlaDenseBytes(layout: MlaLayout, tokens: number): number {
  return layout.nLayers * tokens * (layout.kvLoraRank + layout.qkRopeHeadDim) * 2;
}

/** Checks an MLA layout's integers. @throws KvpackError('layout') */
export function validateMlaLayout(layout: MlaLayout): void {
  check(typeof layout === 'object' && layout !== null, 'layout', 'MLA layout must be an object');
  for (const k of ['nLayers', 'nHeads', 'kvLoraRank', 'qkRopeHeadDim', 'qkNopeHeadDim', 'vHeadDim'] as const) {
    check(Number.isInteger(layout[k]) && layout[k] > 0, 'layout', `MLA layout: ${k} must be a positive integer, got ${layout[k]}`);
  }
  check(layout.qkRopeHeadDim % 2 === 0, 'layout', `MLA layout: qkRopeHeadDim must be even (RoPE rotates pairs), got ${layout.qkRopeHeadDim}`);
}

/**
 * Throws unless `x` is a float32 [T, width] tensor (T when given).
 * @throws KvpackError('shape' | 'dtype')
 */
export function checkMlaRows(x: tf.Tensor, width: number, what: string, widthName: string, T?: number): void {
  check(x instanceof tf.Tensor, 'dtype', `${what}: expected a tf.Tensor, got ${typeof x}`);
  check(x.dtype === 'float32', 'dtype', `${what}: dtype must be float32, got ${x.dtype}`);
  check(
    x.rank === 2 && x.shape[1] === width && (T === undefined || x.shape[0] === T),
    'shape',
    `${what}: shape must be [${T ?? 'T'}, ${widthName}=${width}], got [${x.shape}]`,
  );
}

/**
 * Validates a prefill MLA cache: layout, layer counts, shapes, dtypes, queries, and no NaN/Inf.
 * Returns T.
 * @throws KvpackError('layout' | 'shape' | 'dtype' | 'nonfinite') naming the layer and tensor.
 */
export async function validateMlaCache(cache: MlaKVCache): Promise<number> {
  validateMlaLayout(cache.layout);
  const { nLayers: L, kvLoraRank: dc, qkRopeHeadDim: dr, nHeads: H } = cache.layout;
  check(
    Array.isArray(cache.latents) && Array.isArray(cache.ropeKeys),
    'shape',
    'MLA cache: latents and ropeKeys must be arrays of per-layer [T, d_c] and [T, d_R] tensors',
  );
  check(cache.latents.length === L, 'layout', `MLA cache has ${cache.latents.length} latent layers but the model has ${L} layers`);
  check(cache.ropeKeys.length === L, 'layout', `MLA cache has ${cache.ropeKeys.length} RoPE key layers but the model has ${L} layers`);
  check(cache.latents[0] instanceof tf.Tensor && cache.latents[0].rank === 2, 'shape', 'MLA cache: layer 0 latents must be [T, d_c]');
  const T = cache.latents[0].shape[0];
  check(T > 0, 'shape', 'MLA cache is empty (T = 0)');
  for (let l = 0; l < L; l++) {
    checkMlaRows(cache.latents[l], dc, `MLA cache layer ${l} latents`, 'd_c', T);
    checkMlaRows(cache.ropeKeys[l], dr, `MLA cache layer ${l} RoPE keys`, 'd_R', T);
  }
  const start = cache.startPosition ?? 0;
  check(Number.isInteger(start) && start >= 0, 'shape', `MLA cache: startPosition must be a non-negative integer, got ${start}`);
  const q = cache.queries;
  if (q !== undefined) {
    check(Array.isArray(q) && q.length === L, 'layout', `MLA cache: queries must hold one [T_obs, H, d_c + d_R] tensor per layer (${L}), got ${Array.isArray(q) ? q.length : typeof q}`);
    for (let l = 0; l < L; l++) {
      const x = q[l];
      check(x instanceof tf.Tensor && x.dtype === 'float32', 'dtype', `MLA cache layer ${l} queries: expected a float32 tf.Tensor`);
      check(
        x.rank === 3 && x.shape[0] >= 1 && x.shape[0] <= T && x.shape[1] === H && x.shape[2] === dc + dr && x.shape[0] === q[0].shape[0],
        'shape',
        `MLA cache layer ${l} queries: shape must be [T_obs ≤ ${T}, H=${H}, d_c + d_R=${dc + dr}] (the same T_obs in every layer), got [${x.shape}]`,
      );
    }
  }
  const all = [...cache.latents.flatMap((c, l) => [c, cache.ropeKeys[l]]), ...(q ?? [])];
  const bad = await nonFiniteIndices(all);
  if (bad.length) {
    const i = bad[0];
    const what = i < 2 * L ? `layer ${i >> 1} ${i & 1 ? 'RoPE keys' : 'latents'}` : `layer ${i - 2 * L} queries`;
    throw new KvpackError('nonfinite', `MLA cache ${what} contain NaN or Inf`);
  }
  return T;
}

/** Disposes every tensor of an MlaKVCache (latents, RoPE keys and queries). */
export function disposeMlaCache(c: MlaKVCache): void {
  tf.dispose([...c.latents, ...c.ropeKeys, ...(c.queries ?? [])]);
}

/**
 * The error of a strategy that does not compress MLA latent caches.
 * @param reason why, when the definition says (a sentence)
 */
export function mlaRefusal(strategy: string, reason?: string): KvpackError {
  return new KvpackError(
    'unsupported',
    `strategy "${strategy}" does not compress MLA latent caches${reason ? `: ${reason}` : ''} (it compresses per-head KV caches [T, H_kv, d])`,
  );
}

/** Rotates pre-RoPE shared keys [n, d_R] at `count` positions from `start`; returns [n, d_R]. */
export function ropeSharedKeys(x: tf.Tensor2D, rope: RopeConfig, start: number): tf.Tensor2D {
  return tf.tidy(() => {
    const [n, d] = x.shape;
    return applyRope(tf.reshape(x, [n, 1, d]) as tf.Tensor3D, rope, { start, count: n }).reshape([n, d]) as tf.Tensor2D;
  });
}

const MLA_BUFFERS: DecodeBufferSpec<MlaLayout> = {
  names: ['c', 'kr'],
  tails: ({ kvLoraRank, qkRopeHeadDim }) => [[kvLoraRank], [qkRopeHeadDim]],
  nouns: ['latents', 'RoPE keys'],
  label: 'MLA ',
  metaHead: { kind: 'mla' },
};

/**
 * Base class for compressed MLA caches, the counterpart of `BaseCompressedCache`: a subclass
 * declares what it stores and reconstructs its prefill latents and (post-RoPE) RoPE keys; the shared
 * base derives byte counting, serialization, the exact float32 decode buffers and disposal.
 * `byteSize()` = Σ bytes of `stored()` + decode buffers = the payload `serialize()` writes.
 */
export abstract class BaseCompressedMlaCache extends DecodeBufferedCache<tf.Tensor2D, MlaLayout> implements CompressedMlaCache {
  readonly kind = 'mla' as const;

  constructor(layout: MlaLayout, rope: RopeConfig, prefillLength: number) {
    super(layout, rope, prefillLength, MLA_BUFFERS);
  }

  /** Reconstructed prefill latents of one layer, [T_kept, d_c]. */
  protected abstract prefillLatents(layer: number): tf.Tensor2D;
  /** Reconstructed post-RoPE prefill RoPE keys of one layer, [T_kept, d_R]. */
  protected abstract prefillRopeKeys(layer: number): tf.Tensor2D;

  latents(layer: number): tf.Tensor2D {
    return this.withDecodeRows(layer, 'a', (l) => this.prefillLatents(l));
  }

  ropeKeys(layer: number): tf.Tensor2D {
    return this.withDecodeRows(layer, 'b', (l) => this.prefillRopeKeys(l));
  }

  append(layer: number, latents: tf.Tensor2D, ropeKeys: tf.Tensor2D): void {
    this.assertLive(layer);
    checkMlaRows(latents, this.layout.kvLoraRank, `append(layer ${layer}) latents`, 'd_c');
    checkMlaRows(ropeKeys, this.layout.qkRopeHeadDim, `append(layer ${layer}) RoPE keys`, 'd_R', latents.shape[0]);
    this.appendRows(layer, latents, ropeKeys);
  }
}

const positiveInt = z.int().positive().max(2 ** 31 - 1);

const MlaMetaSchema = z.looseObject({
  kind: z.literal('mla'),
  layout: z.strictObject({
    nLayers: positiveInt,
    nHeads: positiveInt,
    kvLoraRank: positiveInt,
    qkRopeHeadDim: positiveInt,
    qkNopeHeadDim: positiveInt,
    vHeadDim: positiveInt,
  }),
  rope: RopeConfigSchema,
  prefillLength: positiveInt,
  startPosition: z.int().nonnegative().max(2 ** 31 - 1).optional(),
});

/** True when a decoded container holds an MLA latent cache. */
export function isMlaContainer(c: DecodedContainer): boolean {
  return (c.meta as { kind?: unknown } | null)?.kind === 'mla';
}

/** Header of a serialized MLA cache, as {@link restoreMlaStored} hands it to a builder. */
export interface MlaStoredHeader {
  layout: MlaLayout;
  rope: RopeConfig;
  prefillLength: number;
  startPosition: number;
  meta: Record<string, unknown>;
}

/** {@link StoredReader} of an MLA cache's serialization. */
export type MlaStoredReader = Omit<StoredReader, 'header'> & { header: MlaStoredHeader };

/**
 * Reads and validates an MLA container's header.
 * @throws KvpackError('corrupt') naming the field.
 */
export function mlaContainerHeader(c: DecodedContainer): MlaStoredHeader {
  const r = MlaMetaSchema.safeParse(c.meta);
  if (!r.success) {
    const i = r.error.issues[0];
    throw new KvpackError('corrupt', `serialized ${c.strategy} MLA cache is corrupt: metadata field ${i.path.join('.') || '(root)'}: ${i.message}`);
  }
  const { layout, rope, prefillLength, startPosition } = r.data;
  check(layout.nLayers <= c.tensors.length, 'corrupt', `serialized ${c.strategy} MLA cache is corrupt: metadata layout.nLayers = ${layout.nLayers}, but the payload holds only ${c.tensors.length} tensors`);
  check(layout.qkRopeHeadDim % 2 === 0, 'corrupt', `serialized ${c.strategy} MLA cache is corrupt: metadata layout.qkRopeHeadDim = ${layout.qkRopeHeadDim} is odd`);
  return { layout, rope: rope as RopeConfig, prefillLength, startPosition: startPosition ?? 0, meta: c.meta as Record<string, unknown> };
}

/**
 * Restores an MLA cache of `strategy` from its serialization, as `restoreStored` does for per-head
 * caches: header checked, items read by name through `build`, decode buffers and model fingerprint
 * restored, and the file must hold exactly what the restored cache declares. Leaks no tensor on error.
 * @throws KvpackError('corrupt' | 'truncated')
 */
export function restoreMlaStored<C extends BaseCompressedMlaCache>(bytes: ByteSource, strategy: string, build: (r: MlaStoredReader) => C): C {
  const c = decodeContainer(bytes);
  check(c.strategy === strategy, 'corrupt', `expected a serialized ${strategy} cache, got a ${c.strategy} cache`);
  check(isMlaContainer(c), 'corrupt', `expected a serialized ${strategy} MLA latent cache, got a per-head KV cache (restore it with deserializeCache)`);
  const reader = containerReader(c, mlaContainerHeader(c));
  return disposeCreatedOnError(() => {
    const cache = build(reader);
    cache.restoreResidual(c);
    const extra = c.unread();
    const mismatch = extra.length ? unreadMessage(strategy, extra) : storedLayoutMismatch(cache.storedLayout(), c.tensors);
    if (mismatch) {
      cache.dispose();
      throw new KvpackError('corrupt', `serialized ${strategy} MLA cache is corrupt: ${mismatch}`);
    }
    return cache;
  });
}

/**
 * How a strategy compresses MLA latent caches (capability `mla`): `compress` receives a validated
 * cache (T its token count); `restore` rebuilds what its caches serialize.
 */
export interface MlaCompressor {
  compress(cache: MlaKVCache, T: number): Promise<BaseCompressedMlaCache>;
  restore(reader: MlaStoredReader): BaseCompressedMlaCache;
}
