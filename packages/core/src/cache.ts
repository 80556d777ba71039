import * as tf from '@tensorflow/tfjs-core';
import { check, KvpackError } from './errors.js';
import { decodeBFloat16, decodeHalf, encodeHalf, roundHalf } from './fp16.js';
import { z } from 'zod';
import { decodeContainer, encodeContainer, payloadBytes, type ByteSource, type StoredDType, type StoredTensor, type DecodedContainer, type TensorExpectation } from './serialize.js';
import { disposeCreatedOnError } from './scope.js';
import { HalfTensor, type HeldFloat } from './half.js';
import type { CompressedCache, ModelLayout, RopeConfig, AttendOptions } from './types.js';
import { checkKV } from './validate.js';
import { attention } from './attention.js';
import { isHostBackend } from './backend.js';

const ITEM: Record<StoredDType, number> = { float32: 4, float16: 2, bfloat16: 2, int8: 1, uint8: 1, int32: 4, uint16: 2 };

/** Name, dtype and shape of one stored tensor, known without reading it from the backend. */
export interface StoredSpec {
  name: string;
  dtype: StoredDType;
  shape: number[];
}

/** Bytes of one stored tensor. */
export function specBytes(s: StoredSpec): number {
  return s.shape.reduce((a, b) => a * b, 1) * ITEM[s.dtype];
}

/**
 * Rounds a float32 tensor's values through float16 (what 16-bit storage keeps), bit-identical to the
 * host {@link roundHalf} (round to nearest even, subnormals, overflow to ±Inf). On wasm/cpu the values
 * are rounded on the host (a readback there is a copy); elsewhere on the device with
 * {@link roundToHalfOnDevice}, so a GPU compression makes no host round-trip. Returns a new tensor.
 */
export async function roundToHalf(x: tf.Tensor): Promise<tf.Tensor> {
  if (!isHostBackend()) return roundToHalfOnDevice(x);
  const data = (await x.data()) as Float32Array;
  return tf.tensor(roundHalf(data), x.shape, 'float32');
}

/** 2^(i − 14), i = 0 … 29: the float16 binades' lower bounds (i = 0 also covers the subnormals). */
const HALF_BINADE = Float32Array.from({ length: 30 }, (_, i) => 2 ** (i - 14));
/** 2^(i − 24): the float16 spacing (ulp) in binade i. */
const HALF_ULP = Float32Array.from({ length: 30 }, (_, i) => 2 ** (i - 24));
/** 2^(24 − i): its inverse. */
const HALF_INV_ULP = Float32Array.from({ length: 30 }, (_, i) => 2 ** (24 - i));

/**
 * {@link roundToHalf} in float32 tensor ops on the current backend: with e = ⌊log₂|x|⌋ clamped to the
 * float16 exponent range [−14, 15] (−14 also for subnormals), y = round(x · 2^(10−e)) · 2^(e−10), and
 * |y| > 65504 → ±Inf. Every factor is an exact power of two looked up from a table (no pow/exp2,
 * whose GPU precision is not exact), ⌊log₂|x|⌋ is corrected by exact comparisons with the binade
 * bounds, and `round` is round-half-to-even (WGSL `round`, tfjs's Round), so the result equals the
 * host rounding bit for bit; tested against {@link roundHalf} on every backend the tests run.
 * NaN stays NaN. Returns a new tensor.
 */
export function roundToHalfOnDevice(x: tf.Tensor): tf.Tensor {
  return tf.tidy(() => {
    const a = tf.abs(x);
    const est = tf.cast(tf.clipByValue(tf.floor(tf.mul(tf.log(tf.maximum(a, 2 ** -14)), 1 / Math.LN2)), -14, 15), 'int32');
    let i = tf.add(est, tf.scalar(14, 'int32'));
    const lo = tf.gather(tf.tensor1d(HALF_BINADE), i);
    // ⌊log₂⌋ estimated from a float log may be one off at a binade edge: correct it exactly.
    const down = tf.logicalAnd(tf.less(a, lo), tf.greater(i, tf.scalar(0, 'int32')));
    const up = tf.logicalAnd(tf.greaterEqual(a, tf.mul(lo, 2)), tf.less(i, tf.scalar(29, 'int32')));
    i = tf.add(tf.sub(i, tf.cast(down, 'int32')), tf.cast(up, 'int32'));
    const y = tf.mul(tf.round(tf.mul(x, tf.gather(tf.tensor1d(HALF_INV_ULP), i))), tf.gather(tf.tensor1d(HALF_ULP), i));
    return tf.where(tf.greater(tf.abs(y), 65504), tf.mul(tf.sign(x), Infinity), y);
  });
}

/**
 * Reads a float32 tensor into a stored tensor of dtype float16 or float32 (a synchronous readback).
 * @throws KvpackError('unsupported') when the backend cannot read back synchronously (tfjs-webgpu under
 *         Node: its readSync needs OffscreenCanvas), naming `serializeAsync` as the way out.
 */
export function storeTensor(name: string, x: tf.Tensor, dtype: 'float16' | 'float32'): StoredTensor {
  const data = readSyncOrExplain(x, `tensor "${name}"`, 'use await cache.serializeAsync()');
  return { name, dtype, shape: [...x.shape], data: dtype === 'float16' ? encodeHalf(data) : Float32Array.from(data) };
}

/**
 * `x.dataSync()` as float32, or a clear error when the backend cannot read back synchronously
 * (tfjs-webgpu under Node: its readSync needs OffscreenCanvas) instead of tfjs's own.
 * @throws KvpackError('unsupported') naming `what`, the backend and `remedy`.
 */
export function readSyncOrExplain(x: tf.Tensor, what: string, remedy: string): Float32Array {
  try {
    return x.dataSync() as Float32Array;
  } catch (e) {
    if (x.isDisposed) throw e; // tfjs's own "disposed" error says it better
    throw new KvpackError(
      'unsupported',
      `cannot read ${what} back synchronously on the ${tf.getBackend()} backend (${(e as Error).message}); where a backend has no synchronous readback (tfjs-webgpu under Node): ${remedy}`,
      { cause: e },
    );
  }
}

/** Restores a stored float tensor (float32, float16 or bfloat16) as a float32 tf tensor. */
export function loadTensor(t: StoredTensor): tf.Tensor {
  const data =
    t.dtype === 'float16'
      ? decodeHalf(t.data as Uint16Array)
      : t.dtype === 'bfloat16'
        ? decodeBFloat16(t.data as Uint16Array)
        : t.dtype === 'float32'
          ? (t.data as Float32Array)
          : (() => {
              throw new KvpackError('corrupt', `tensor "${t.name}" has dtype ${t.dtype}, expected a float dtype`);
            })();
  return tf.tensor(data, t.shape, 'float32');
}

/**
 * One thing a compressed cache stores, as it declares it in {@link BaseCompressedCache.stored}: a
 * float tensor on the backend written at a storage dtype (float16 rounds, as compression already
 * did), or a host array written as it is (codes, scales, indices).
 */
export type StoredItem =
  | { name: string; half: HalfTensor }
  | { name: string; held: HeldFloat }
  /**
   * Data held on the backend in a form of the strategy's own (packed codes, segments): `read` returns
   * the stored array when a serialization writes it (a synchronous readback); `backing` lists the
   * tensors it reads, which `serializeAsync` reads back asynchronously first.
   */
  | { name: string; dtype: StoredDType; shape: number[]; backing: tf.Tensor[]; read(): StoredTensor['data'] }
  | { name: string; tensor: tf.Tensor; dtype: 'float16' | 'float32' }
  | { name: string; dtype: StoredDType; shape: number[]; data: StoredTensor['data'] };

/** Name, dtype and shape of a stored item. @internal */
export function itemSpec(i: StoredItem): StoredSpec {
  if ('held' in i) return itemSpec(heldItem(i.name, i.held));
  if ('read' in i) return { name: i.name, dtype: i.dtype, shape: [...i.shape] };
  if ('half' in i) return { name: i.name, dtype: 'float16', shape: [...i.half.shape] };
  return 'tensor' in i ? { name: i.name, dtype: i.dtype, shape: [...i.tensor.shape] } : { name: i.name, dtype: i.dtype, shape: i.shape };
}

/** A held float as the item it stores: float16 packed, or a float32 tensor. */
export function heldItem(name: string, h: HeldFloat): StoredItem {
  return h instanceof HalfTensor ? { name, half: h } : { name, tensor: h, dtype: 'float32' };
}

/** A stored item as the tensor a serialization writes (a synchronous readback). @internal */
export function itemTensor(i: StoredItem): StoredTensor {
  if ('held' in i) return itemTensor(heldItem(i.name, i.held));
  if ('read' in i) return { name: i.name, dtype: i.dtype, shape: [...i.shape], data: i.read() };
  if ('half' in i) return { name: i.name, dtype: 'float16', shape: [...i.half.shape], data: i.half.bitsSync(`tensor "${i.name}"`) };
  return 'tensor' in i ? storeTensor(i.name, i.tensor, i.dtype) : { name: i.name, dtype: i.dtype, shape: i.shape, data: i.data };
}

/**
 * How a cache base names its exact decode buffers: the two per-layer tensors' serialization names
 * (`residual.<a>.<l>`, `residual.<b>.<l>`), their trailing shapes, the nouns that error messages use,
 * the label before "cache" in messages ('' or 'MLA ') and metadata written before the common fields.
 * @internal
 */
export interface DecodeBufferSpec<Lay> {
  names: [string, string];
  tails(layout: Lay): [number[], number[]];
  nouns: [string, string];
  label: string;
  metaHead: Record<string, unknown>;
}

/**
 * What {@link BaseCompressedCache} and the MLA cache base share: a subclass declares what its
 * compressed prefill stores ({@link stored}); this class keeps the exact float32 decode buffers —
 * per layer two row-stacked tensors of the same token count n (keys and values [n, H_kv, d], or
 * latents [n, d_c] and RoPE keys [n, d_R]) — and derives byte counting, serialization, restore of
 * the buffers and disposal. `byteSize()` = Σ bytes of `stored()` + decode buffers = the payload
 * `serialize()` writes.
 * @internal
 */
export abstract class DecodeBufferedCache<T extends tf.Tensor, Lay extends { nLayers: number }> {
  abstract readonly strategy: string;
  /** Options recorded in the serialization, so that deserialization can rebuild the strategy. */
  abstract readonly options: unknown;
  protected resA: (T | null)[];
  protected resB: (T | null)[];
  protected disposed = false;
  /**
   * Fingerprint of the model whose KV cache was compressed (`KVCache.model`), written into the
   * serialization's header and restored with it; undefined when the cache did not come from a model.
   */
  model?: string;

  constructor(
    readonly layout: Lay,
    readonly rope: RopeConfig,
    readonly prefillLength: number,
    private readonly buffers: DecodeBufferSpec<Lay>,
  ) {
    this.resA = new Array(layout.nLayers).fill(null);
    this.resB = new Array(layout.nLayers).fill(null);
  }

  /** Number of prefill tokens kept for a layer (T unless tokens are evicted or merged away). */
  protected prefillTokens(_layer: number): number {
    return this.prefillLength;
  }
  /**
   * What the compressed prefill stores, in serialization order: each item's name, storage dtype and
   * backend tensor or host array. Names are unique; a restore reads them back by name, and every
   * restored cache must declare exactly the tensors of its file.
   */
  protected abstract stored(): StoredItem[];
  /** Strategy-specific JSON metadata for the serialization. */
  protected meta(): Record<string, unknown> {
    return {};
  }
  /** Frees the subclass's tensors. */
  protected abstract disposeStored(): void;

  protected assertLive(layer?: number): void {
    if (this.disposed) throw new KvpackError('disposed', `${this.strategy} ${this.buffers.label}cache was disposed`);
    if (layer !== undefined)
      check(Number.isInteger(layer) && layer >= 0 && layer < this.layout.nLayers, 'shape', `layer ${layer} is out of range [0, ${this.layout.nLayers})`);
  }

  tokenCount(layer: number): number {
    this.assertLive(layer);
    return this.prefillTokens(layer) + (this.resA[layer]?.shape[0] ?? 0);
  }

  /** Decode tokens held in the exact buffer of a layer. */
  residualTokens(layer: number): number {
    return this.resA[layer]?.shape[0] ?? 0;
  }

  /** A layer's prefill rows followed by its decode rows of buffer `which`. */
  protected withDecodeRows(layer: number, which: 'a' | 'b', prefill: (layer: number) => T): T {
    this.assertLive(layer);
    const r = (which === 'a' ? this.resA : this.resB)[layer];
    if (!r) return prefill(layer);
    return tf.tidy(() => tf.concat([prefill(layer), r], 0)) as T;
  }

  /** Appends validated decode rows to both buffers of a layer. */
  protected appendRows(layer: number, a: T, b: T): void {
    const x = this.resA[layer];
    const y = this.resB[layer];
    this.resA[layer] = x ? (tf.concat([x, a], 0) as T) : (tf.clone(a) as T);
    this.resB[layer] = y ? (tf.concat([y, b], 0) as T) : (tf.clone(b) as T);
    x?.dispose();
    y?.dispose();
  }

  /** The decode buffers as stored tensors, layer by layer, each layer's pair in order. */
  private residualTensors(): { name: string; tensor: T }[] {
    const [na, nb] = this.buffers.names;
    const out: { name: string; tensor: T }[] = [];
    for (let l = 0; l < this.layout.nLayers; l++) {
      const a = this.resA[l];
      const b = this.resB[l];
      if (!a || !b) continue;
      out.push({ name: `residual.${na}.${l}`, tensor: a }, { name: `residual.${nb}.${l}`, tensor: b });
    }
    return out;
  }

  /** Name, dtype and shape of every tensor `serialize()` writes, in order (the compressed prefill's, then the decode buffers'). */
  storedLayout(): StoredSpec[] {
    this.assertLive();
    return [...this.stored().map(itemSpec), ...this.residualTensors().map(({ name, tensor }) => ({ name, dtype: 'float32' as const, shape: [...tensor.shape] }))];
  }

  byteSize(): number {
    return this.storedLayout().reduce((a, s) => a + specBytes(s), 0);
  }

  serialize(): Uint8Array {
    this.assertLive();
    const tensors = [...this.stored().map(itemTensor), ...this.residualTensors().map(({ name, tensor }) => storeTensor(name, tensor, 'float32'))];
    const bytes = encodeContainer({
      strategy: this.strategy,
      options: this.options,
      ...(this.model ? { model: this.model } : {}),
      meta: { ...this.buffers.metaHead, layout: this.layout, rope: this.rope, prefillLength: this.prefillLength, ...this.meta() },
      tensors,
    });
    check(payloadBytes(tensors) === this.byteSize(), 'corrupt', `${this.strategy}: ${this.buffers.label}byte accounting disagrees with the serialization`);
    return bytes;
  }

  /**
   * {@link serialize} for backends without a synchronous readback (tfjs-webgpu under Node): the
   * declared tensors and the decode buffers are read back asynchronously first (tfjs keeps their
   * values on the host afterwards), then `serialize()` runs. Same bytes on every backend (the
   * conformance suite checks it).
   */
  async serializeAsync(): Promise<Uint8Array> {
    this.assertLive();
    const seen: tf.Tensor[] = this.stored().flatMap((i) => {
      if ('read' in i) return i.backing;
      const it = 'held' in i ? heldItem(i.name, i.held) : i;
      return 'half' in it ? [it.half.packed] : 'tensor' in it ? [it.tensor] : [];
    });
    seen.push(...this.residualTensors().map((r) => r.tensor));
    await Promise.all(seen.map((t) => t.data()));
    return this.serialize();
  }

  /**
   * Restores the decode buffers written by `serialize`: for each layer either both tensors, float32
   * with the same row count, or neither. Also restores the model fingerprint. Replaces (and frees)
   * decode tokens already held.
   * @internal
   * @throws KvpackError('corrupt') naming the tensor that does not fit.
   */
  restoreResidual(c: DecodedContainer): void {
    const { names: [na, nb], nouns: [wa, wb], label } = this.buffers;
    const [ta, tb] = this.buffers.tails(this.layout);
    if (c.model) this.model = c.model;
    for (let l = 0; l < this.layout.nLayers; l++) {
      const has = c.has(`residual.${na}.${l}`);
      check(has === c.has(`residual.${nb}.${l}`), 'corrupt', `serialized ${this.strategy} ${label}cache is corrupt: layer ${l} has residual ${has ? `${wa} without ${wb}` : `${wb} without ${wa}`}`);
      if (!has) continue;
      const a = c.get(`residual.${na}.${l}`, { dtype: 'float32', shape: [null, ...ta] });
      const b = c.get(`residual.${nb}.${l}`, { dtype: 'float32', shape: [a.shape[0], ...tb] });
      this.resA[l]?.dispose();
      this.resB[l]?.dispose();
      this.resA[l] = loadTensor(a) as T;
      this.resB[l] = loadTensor(b) as T;
    }
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    for (const t of [...this.resA, ...this.resB]) t?.dispose();
    this.disposeStored();
  }
}

const KV_BUFFERS: DecodeBufferSpec<ModelLayout> = {
  names: ['k', 'v'],
  tails: ({ nKvHeads, headDim }) => [
    [nKvHeads, headDim],
    [nKvHeads, headDim],
  ],
  nouns: ['keys', 'values'],
  label: '',
  metaHead: {},
};

/**
 * Base class for compressed caches. A subclass declares what it stores ({@link stored}) and
 * reconstructs its prefill (`prefillKeys` / `prefillValues`); this class derives from the declaration
 * byte counting, serialization (`serialize`, `serializeAsync`) and, with {@link restoreStored},
 * deserialization; it adds the exact float32 residual buffer for decode tokens, and disposal.
 *
 * `byteSize()` = Σ bytes of `stored()` + residual buffer, which equals the payload that `serialize()`
 * writes (the container header is the only overhead).
 */
export abstract class BaseCompressedCache extends DecodeBufferedCache<tf.Tensor3D, ModelLayout> implements CompressedCache {
  constructor(layout: ModelLayout, rope: RopeConfig, prefillLength: number) {
    super(layout, rope, prefillLength, KV_BUFFERS);
  }

  /** Post-RoPE reconstructed prefill keys of one layer, [T_kept, H_kv, d]. */
  protected abstract prefillKeys(layer: number): tf.Tensor3D;
  /** Reconstructed prefill values of one layer, [T_kept, H_kv, d]. */
  protected abstract prefillValues(layer: number): tf.Tensor3D;

  keys(layer: number): tf.Tensor3D {
    return this.withDecodeRows(layer, 'a', (l) => this.prefillKeys(l));
  }

  values(layer: number): tf.Tensor3D {
    return this.withDecodeRows(layer, 'b', (l) => this.prefillValues(l));
  }

  /**
   * The cache cut to its first `tokens` tokens, for a strategy's prefix cut (capability `cutPrefix`):
   * `cutPrefill(t)` builds a new cache of the compressed prefill's first t = min(tokens,
   * prefillLength) tokens (same stored numbers, new tensors); the first tokens − prefillLength exact
   * decode tokens of every layer are copied after it and the model fingerprint is kept. The input
   * stays usable; if anything throws, the new cache is disposed.
   * @throws KvpackError('shape') when tokens is not an integer in [1, tokenCount] of every layer.
   */
  protected async cutWith<C extends BaseCompressedCache>(tokens: number, cutPrefill: (t: number) => Promise<C>): Promise<C> {
    this.assertLive();
    const most = Math.min(...Array.from({ length: this.layout.nLayers }, (_, l) => this.tokenCount(l)));
    check(
      Number.isInteger(tokens) && tokens >= 1 && tokens <= most,
      'shape',
      `${this.strategy} cut: ${tokens} tokens is not an integer in [1, ${most}] (the tokens this cache holds)`,
    );
    const out = await cutPrefill(Math.min(tokens, this.prefillLength));
    try {
      const n = tokens - this.prefillLength;
      if (n > 0) {
        for (let l = 0; l < this.layout.nLayers; l++) {
          out.resA[l] = tf.slice(this.resA[l]!, 0, n);
          out.resB[l] = tf.slice(this.resB[l]!, 0, n);
        }
      }
      if (this.model) out.model = this.model;
      return out;
    } catch (e) {
      out.dispose();
      throw e;
    }
  }

  /** Residual (decode) keys and values of a layer, or null when none were appended. Not copies. */
  protected residual(layer: number): { k: tf.Tensor3D; v: tf.Tensor3D } | null {
    const k = this.resA[layer];
    const v = this.resB[layer];
    return k && v ? { k, v } : null;
  }

  append(layer: number, keys: tf.Tensor3D, values: tf.Tensor3D): void {
    this.assertLive(layer);
    checkKV(keys, this.layout, `append(layer ${layer}) keys`);
    checkKV(values, this.layout, `append(layer ${layer}) values`, keys.shape[0]);
    this.appendRows(layer, keys, values);
  }

  attend(layer: number, queries: tf.Tensor3D, options?: AttendOptions): tf.Tensor3D {
    return tf.tidy(() => attention(queries, this.keys(layer), this.values(layer), options?.causalTail ?? queries.shape[0]));
  }
}

/** Schema of a serialized {@link RopeConfig}'s scaling. @internal */
export const RopeScalingSchema = z.union([
  z.null(),
  z.strictObject({ type: z.literal('linear'), factor: z.number().positive() }),
  z.strictObject({
    type: z.literal('llama3'),
    factor: z.number().positive(),
    lowFreqFactor: z.number().positive(),
    highFreqFactor: z.number().positive(),
    originalMaxPositionEmbeddings: z.int().positive(),
  }),
  z.strictObject({
    type: z.literal('yarn'),
    factor: z.number().positive(),
    originalMaxPositionEmbeddings: z.int().positive(),
    betaFast: z.number().positive(),
    betaSlow: z.number().positive(),
    mscale: z.number(),
    mscaleAllDim: z.number(),
  }),
]);

const positiveInt = z.int().positive().max(2 ** 31 - 1);

/** Schema of a serialized {@link RopeConfig}. @internal */
export const RopeConfigSchema = z.strictObject({ theta: z.number().positive(), layout: z.enum(['interleaved', 'half']), scaling: RopeScalingSchema.optional() });

/** The fields every serialized cache's metadata carries (see {@link BaseCompressedCache.serialize}). */
const CacheMetaSchema = z.looseObject({
  layout: z.strictObject({ nLayers: positiveInt, nHeads: positiveInt, nKvHeads: positiveInt, headDim: positiveInt }),
  rope: RopeConfigSchema,
  prefillLength: positiveInt,
  startPosition: z.int().nonnegative().max(2 ** 31 - 1).optional(),
});

/**
 * Reads and validates layout, rope, prefillLength and startPosition (default 0) from a decoded
 * container's metadata. The layer count must not exceed the stored tensors (every strategy stores at
 * least one per layer), so nothing is sized by a layer count the payload cannot hold.
 * @throws KvpackError('corrupt') naming the field.
 */
export function containerHeader(c: DecodedContainer): { layout: ModelLayout; rope: RopeConfig; prefillLength: number; startPosition: number } {
  check(
    (c.meta as { kind?: unknown } | null)?.kind !== 'mla',
    'corrupt',
    `this serialized ${c.strategy} cache is an MLA latent cache, not a per-head KV cache: restore it with deserializeMlaCache`,
  );
  const r = CacheMetaSchema.safeParse(c.meta);
  if (!r.success) {
    const i = r.error.issues[0];
    throw new KvpackError('corrupt', `serialized ${c.strategy} cache is corrupt: metadata field ${i.path.join('.') || '(root)'}: ${i.message}`);
  }
  const { layout, rope, prefillLength, startPosition } = r.data;
  check(layout.nHeads % layout.nKvHeads === 0, 'corrupt', `serialized ${c.strategy} cache is corrupt: metadata layout has ${layout.nHeads} query heads, not a multiple of ${layout.nKvHeads} KV heads`);
  check(
    layout.nLayers <= c.tensors.length,
    'corrupt',
    `serialized ${c.strategy} cache is corrupt: metadata layout.nLayers = ${layout.nLayers}, but the payload holds only ${c.tensors.length} tensors`,
  );
  check(layout.headDim % 2 === 0, 'corrupt', `serialized ${c.strategy} cache is corrupt: metadata layout.headDim = ${layout.headDim} is odd (RoPE rotates pairs)`);
  return { layout, rope: rope as RopeConfig, prefillLength, startPosition: startPosition ?? 0 };
}

/** Header of a serialized cache, as {@link restoreStored} hands it to a strategy's builder. */
export interface StoredHeader {
  layout: ModelLayout;
  rope: RopeConfig;
  prefillLength: number;
  /** Position of the first prefill token. */
  startPosition: number;
  /** The strategy's own metadata (what its cache's `meta()` wrote). */
  meta: Record<string, unknown>;
}

/**
 * Reads the declared items of a serialized cache by name, each checked against what the builder
 * expects. Every method throws KvpackError('corrupt') naming the item when it is missing or its dtype
 * or shape differs from `expect`; an item read is marked as read (the file may hold no other).
 */
export interface StoredReader {
  readonly header: StoredHeader;
  /** True when the file holds an item of this name. */
  has(name: string): boolean;
  /** A float16 item as held on the backend (packed, not decoded); `expect.shape` uses `null` for a free axis. */
  half(name: string, expect: TensorExpectation): HalfTensor;
  /** A float item at its stored precision: float16 packed, float32 as a tensor. */
  held(name: string, expect: TensorExpectation): HeldFloat;
  /** A float item (float16, bfloat16 or float32) as a float32 tensor; `expect.shape` uses `null` for a free axis. */
  tensor<T extends tf.Tensor = tf.Tensor>(name: string, expect: TensorExpectation): T;
  /** A host item's stored array, as written (codes, scales, indices): the decoded container's own copy, not shared with the input bytes. */
  host<A extends StoredTensor['data'] = StoredTensor['data']>(name: string, expect: TensorExpectation): A;
  /** The item's shape as stored, after the same checks. */
  shape(name: string, expect: TensorExpectation): number[];
}

/** A {@link StoredReader}-style reader over a decoded container, with the given header. @internal */
export function containerReader<H>(c: DecodedContainer, header: H): Omit<StoredReader, 'header'> & { header: H } {
  return {
    header,
    has: (name) => c.has(name),
    half: (name, expect) => {
      const t = c.get(name, { ...expect, dtype: 'float16' });
      return HalfTensor.fromBits(t.data as Uint16Array, t.shape);
    },
    held: (name, expect) => {
      const t = c.get(name, { dtype: ['float16', 'float32'], ...expect });
      return t.dtype === 'float16' ? HalfTensor.fromBits(t.data as Uint16Array, t.shape) : tf.tensor(t.data as Float32Array, t.shape, 'float32');
    },
    tensor: <T extends tf.Tensor>(name: string, expect: TensorExpectation) => loadTensor(c.get(name, { dtype: ['float16', 'bfloat16', 'float32'], ...expect })) as T,
    host: <A extends StoredTensor['data']>(name: string, expect: TensorExpectation) => c.get(name, expect).data as A,
    shape: (name, expect) => c.get(name, expect).shape,
  };
}

/** Where the tensors a restored cache declares differ from those in its file, or null when they agree. @internal */
export function storedLayoutMismatch(declared: StoredSpec[], stored: StoredTensor[]): string | null {
  return layoutMismatch(declared, stored);
}

/**
 * Restores a cache of `strategy` from its serialization: decodes and checks the container, validates
 * the common header (layout, RoPE, prefill length, start position), lets `build` read the declared
 * items by name and construct the cache, then restores the residual decode tokens and the model
 * fingerprint, and finally requires the file to hold exactly the tensors the restored cache declares
 * (`storedLayout()`: names, dtypes and shapes, in order). Every tensor created is disposed if
 * anything throws.
 * @throws KvpackError('corrupt' | 'truncated') naming the field or item at fault.
 */
export function restoreStored<C extends BaseCompressedCache>(bytes: ByteSource, strategy: string, build: (r: StoredReader) => C): C {
  const c = decodeContainer(bytes);
  check(c.strategy === strategy, 'corrupt', `expected a serialized ${strategy} cache, got a ${c.strategy} cache`);
  const { layout, rope, prefillLength, startPosition } = containerHeader(c);
  const reader = containerReader(c, { layout, rope, prefillLength, startPosition, meta: c.meta });
  return disposeCreatedOnError(() => {
    const cache = build(reader);
    cache.restoreResidual(c);
    const extra = c.unread();
    const mismatch = extra.length ? unreadMessage(strategy, extra) : layoutMismatch(cache.storedLayout(), c.tensors);
    if (mismatch) {
      cache.dispose();
      throw new KvpackError('corrupt', `serialized ${strategy} cache is corrupt: ${mismatch}`);
    }
    return cache;
  });
}

/** The message for tensors of a file that the restored cache did not read. */
export function unreadMessage(strategy: string, names: string[]): string {
  return `it holds tensors that a ${strategy} cache does not have: ${names.slice(0, 5).join(', ')}${names.length > 5 ? ', …' : ''}`;
}

/** Where the tensors a restored cache declares differ from those in its file, or null when they agree. */
function layoutMismatch(declared: StoredSpec[], stored: StoredTensor[]): string | null {
  for (let i = 0; i < Math.max(declared.length, stored.length); i++) {
    const d = declared[i];
    const s = stored[i];
    if (!d) return `tensor "${s.name}" is not part of the restored cache`;
    if (!s) return `tensor "${d.name}" is missing`;
    if (d.name !== s.name || d.dtype !== s.dtype || d.shape.length !== s.shape.length || d.shape.some((v, j) => v !== s.shape[j]))
      return `tensor ${i} is "${s.name}" ${s.dtype} [${s.shape}], but the restored cache declares "${d.name}" ${d.dtype} [${d.shape}]`;
  }
  return null;
}

