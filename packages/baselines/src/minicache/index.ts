import * as tf from '@tensorflow/tfjs-core';
import {
  BaseCompressedCache,
  HalfTensor,
  MAX_LAYERS,
  applyRope,
  atMost,
  check,
  defineStrategy,
  denseCacheBytes,
  disposeOwnedOnError,
  isWebGpuBackend,
  type ModelLayout,
  type RopeConfig,
  type StoredItem,
} from '@kvpack/core';
import { resolveKnobByTarget, topKPositions } from '@kvpack/strategy-utils';
import { z } from 'zod';
import { mergeAndPackWgsl } from './merge-wgsl.js';

/** Options of the `minicache` strategy (defaults: the paper's t = 0.6 and γ = 0.05). */
export const MiniCacheOptionsSchema = z.strictObject({
  /**
   * First merged layer S: pairs (S, S+1), (S+2, S+3), … are merged; default ⌊L/2⌋ (the paper's "from
   * the middle"). A layer index: below 1,024 (core MAX_LAYERS), and at most L − 2 at compress.
   */
  startLayer: z.int().nonnegative().max(MAX_LAYERS - 1, { error: atMost(MAX_LAYERS - 1, 'a layer index; models have far fewer layers') }).optional().describe('First merged layer S: pairs (S, S+1), (S+2, S+3), … are merged; default ⌊L/2⌋.'),
  /** SLERP interpolation t ∈ [0, 1] between the lower layer's direction (t = 0) and the upper one's (t = 1). */
  t: z.number().min(0).max(1).default(0.6).describe('SLERP interpolation t in [0, 1] between the lower (0) and upper (1) layer direction.'),
  /** Retained fraction γ ∈ [0, 1]: per merged pair and KV head, round(γ·T) most distinct token pairs stay unmerged. */
  gamma: z.number().min(0).max(1).default(0.05).describe('Retained fraction: per merged pair and KV head, round(gamma·T) most distinct token pairs stay unmerged.'),
  /**
   * Target ratio (dense fp16 bytes ÷ bytes held) instead of startLayer: the highest start layer (fewest
   * merged pairs) whose measured bytes reach it at the actual T ({@link resolveStartLayer}). Excludes
   * startLayer; `compressionRatio` is accepted for it. Merging pairs bounds the ratio below 2×.
   */
  targetRatio: z.number().min(1).max(1e9).optional().describe('Target ratio (dense fp16 bytes ÷ bytes held) instead of startLayer: the highest start layer reaching it at the actual T.'),
}).refine((o) => o.startLayer === undefined || o.targetRatio === undefined, { message: 'give startLayer or targetRatio, not both', path: ['targetRatio'] });

/**
 * The start layer of a prefill of T tokens: `startLayer`, or ⌊L/2⌋ by default, or — with a
 * targetRatio ρ — the highest S in [0, L − 2] whose {@link miniCacheBytes} · ρ ≤ dense fp16 bytes
 * (the measured ratio right after compress is then ≥ ρ).
 * @throws KvpackError('config') when S = 0 does not reach ρ, naming the reachable range.
 */
export function resolveStartLayer(options: MiniCacheOptions, layout: ModelLayout, T: number): number {
  const L = layout.nLayers;
  if (options.targetRatio === undefined || L < 2) return options.startLayer ?? Math.floor(L / 2);
  return resolveKnobByTarget({
    strategy: 'minicache',
    knob: 'startLayer',
    target: options.targetRatio,
    tokens: T,
    denseBytes: denseCacheBytes(layout, T),
    candidates: Array.from({ length: L - 1 }, (_, i) => L - 2 - i),
    bytesOf: (S) => miniCacheBytes(layout, T, { ...options, startLayer: S }),
  });
}
export type MiniCacheOptions = z.output<typeof MiniCacheOptionsSchema>;

/** Angles at or within this of 0 or π make SLERP's 1/sin Ω ill-conditioned: linear interpolation instead. */
export const PARALLEL_EPS = 1e-6;

/** Number of token pairs retained unmerged per KV head: round(γ·T). */
export function retainedCount(tokens: number, gamma: number): number {
  return Math.min(tokens, Math.max(0, Math.round(gamma * tokens)));
}

/**
 * MiniCache's merge of two adjacent layers' states x0 (lower layer) and x1 (upper layer), each
 * [T, H, d] (MiniCache, Liu et al. 2024, arXiv 2405.14366, §4.1–4.2), on the tfjs backend in float32,
 * every KV head and token at once, with no host round trip:
 * - per token per KV head, the vectors are split into norm ‖x‖ and unit direction u = x/‖x‖ (u = 0
 *   for a zero vector);
 * - the directions are merged by SLERP, e = sin((1−t)Ω)/sin Ω · u0 + sin(tΩ)/sin Ω · u1 with
 *   Ω = ∠(u0, u1), falling back to (1−t)·u0 + t·u1 when sin Ω < 1e-6 (Ω ≈ 0 or π); Ω is taken as
 *   2·atan2(‖u0 − u1‖, ‖u0 + u1‖), which is arccos(u0·u1) but keeps its float32 accuracy near 0 and
 *   π (π/2 when either vector is zero, as arccos 0);
 * - each layer keeps its own norm, so layer j is restored as ‖x_j‖·e;
 * - per KV head, the round(γ·T) token pairs with the **largest** angular distance Ω/π (the most
 *   distinct, i.e. least mergeable) are retained unmerged in both layers. This is the paper's stated
 *   rule ("keep highly distinct state pairs unmerged", §4.2). The xKV authors' port
 *   (abdelfattah-lab/xKV, xKV/customized_cache/fake_layer_merge_dynamic_cache.py,
 *   `slerp_merge_rows_batch`) thresholds Ω at d_min + γ·(d_max − d_min) and leaves the tokens
 *   *below* the threshold — the most similar ones — unmerged, which inverts the rule; we follow the
 *   paper, and take γ as the retained fraction (top-γ by angle, ties to the lower position:
 *   strategy-utils `topKPositions`).
 * Returns float32 tensors, transient, owned by the caller: the direction [T, H, d], the norms
 * [T, H] each, the retained positions int32 [k, H] (ascending per KV head) and the retained rows of
 * both layers [k, H, d] each. The stored form rounds the floats to float16.
 */
export function mergeLayerPairOnBackend(
  x0: tf.Tensor3D,
  x1: tf.Tensor3D,
  t: number,
  gamma: number,
): { dir: tf.Tensor3D; norm0: tf.Tensor2D; norm1: tf.Tensor2D; idx: tf.Tensor2D; keep0: tf.Tensor3D; keep1: tf.Tensor3D } {
  const [T, H, d] = x0.shape;
  const k = retainedCount(T, gamma);
  return tf.tidy(() => {
    const n0 = tf.sqrt(tf.sum(tf.square(x0), 2, true)); // [T, H, 1]
    const n1 = tf.sqrt(tf.sum(tf.square(x1), 2, true));
    const inverse = (n: tf.Tensor) => tf.where(tf.greater(n, 0), tf.div(1, tf.maximum(n, Number.MIN_VALUE)), tf.zerosLike(n));
    const u0 = tf.mul(x0, inverse(n0));
    const u1 = tf.mul(x1, inverse(n1));
    const chord = (u: tf.Tensor) => tf.sqrt(tf.sum(tf.square(u), 2, true));
    const zero = tf.logicalOr(tf.equal(n0, 0), tf.equal(n1, 0));
    const omega = tf.where(zero, tf.fill([T, H, 1], Math.PI / 2), tf.mul(2, tf.atan2(chord(tf.sub(u0, u1)), chord(tf.add(u0, u1))))); // [T, H, 1]
    const so = tf.sin(omega);
    const linear = tf.less(so, PARALLEL_EPS);
    const safe = tf.where(linear, tf.onesLike(so), so);
    const w0 = tf.where(linear, tf.fill([T, H, 1], 1 - t), tf.div(tf.sin(tf.mul(1 - t, omega)), safe));
    const w1 = tf.where(linear, tf.fill([T, H, 1], t), tf.div(tf.sin(tf.mul(t, omega)), safe));
    const dir = tf.add(tf.mul(w0, u0), tf.mul(w1, u1)) as tf.Tensor3D;
    const idxHK = topKPositions(tf.transpose(tf.reshape(omega, [T, H])) as tf.Tensor2D, k); // [H, k]
    const idx = tf.transpose(idxHK) as tf.Tensor2D; // [k, H]
    // Rows t·H + h of x viewed as [T·H, d]: every KV head's own retained tokens in one gather.
    const rows = tf.reshape(tf.add(tf.mul(idx, tf.scalar(H, 'int32')), tf.reshape(tf.range(0, H, 1, 'int32'), [1, H])), [k * H]);
    const keep = (x: tf.Tensor3D) => tf.reshape(tf.gather(tf.reshape(x, [T * H, d]), rows), [k, H, d]) as tf.Tensor3D;
    return { dir, norm0: tf.reshape(n0, [T, H]) as tf.Tensor2D, norm1: tf.reshape(n1, [T, H]) as tf.Tensor2D, idx, keep0: keep(x0), keep1: keep(x1) };
  });
}

/** Merged layer pairs (l0, l0 + 1) from `startLayer` while both layers exist. */
export function mergedPairs(nLayers: number, startLayer: number): [number, number][] {
  const out: [number, number][] = [];
  for (let l = startLayer; l + 1 < nLayers; l += 2) out.push([l, l + 1]);
  return out;
}

/**
 * Bytes a MiniCache cache of T prefill tokens holds: exact layers 2·(T·H_kv·d)·2 each; per merged pair,
 * for keys and for values: the shared direction T·H_kv·d·2, two norm tensors 2·T·H_kv·2, the retained
 * indices k·H_kv·4 (int32) and the retained vectors of both layers 2·k·H_kv·d·2, with k = round(γ·T).
 */
export function miniCacheBytes(layout: ModelLayout, tokens: number, options: MiniCacheOptions): number {
  const { nLayers: L, nKvHeads: H, headDim: d } = layout;
  const pairs = mergedPairs(L, options.startLayer ?? Math.floor(L / 2)).length;
  const k = retainedCount(tokens, options.gamma);
  const exact = L - 2 * pairs;
  const perPairKind = tokens * H * d * 2 + 2 * tokens * H * 2 + k * H * 4 + 2 * k * H * d * 2;
  return exact * 2 * tokens * H * d * 2 + pairs * 2 * perPairKind;
}

/**
 * One merged pair's stored parts for keys or for values, held on the backend at their stored width:
 * the float16 parts packed ({@link HalfTensor}), the retained indices as an int32 tensor (for the
 * scatter) with a host copy (what is serialized and what {@link MiniCacheCache.retainedPositions}
 * returns, so neither reads the backend back).
 */
export interface HeldPair {
  dir: HalfTensor;
  norm0: HalfTensor;
  norm1: HalfTensor;
  /** Retained positions, int32 [k, H_kv], on the backend. */
  idx: tf.Tensor2D;
  /** The same, on the host. */
  idxHost: Int32Array;
  keep0: HalfTensor;
  keep1: HalfTensor;
  retained: number;
}

/** One merged pair's keys and values. */
interface PairState {
  layers: [number, number];
  k: HeldPair;
  v: HeldPair;
}

const PAIR_PARTS = ['dir', 'norm0', 'norm1', 'idx', 'keep0', 'keep1'] as const;
const HALF_PARTS = ['dir', 'norm0', 'norm1', 'keep0', 'keep1'] as const;

/** Storage dtype and shape of each stored part of a merged pair over T tokens that retains k tokens. */
function pairShapes(T: number, H: number, d: number, k: number): Record<(typeof PAIR_PARTS)[number], { dtype: 'float16' | 'int32'; shape: number[] }> {
  return {
    dir: { dtype: 'float16', shape: [T, H, d] },
    norm0: { dtype: 'float16', shape: [T, H] },
    norm1: { dtype: 'float16', shape: [T, H] },
    idx: { dtype: 'int32', shape: [k, H] },
    keep0: { dtype: 'float16', shape: [k, H, d] },
    keep1: { dtype: 'float16', shape: [k, H, d] },
  };
}

/**
 * Merges a layer pair on the backend ({@link mergeLayerPairOnBackend}) and holds its stored parts:
 * the floats packed to float16 ({@link HalfTensor.fromTensor}: on the device on webgpu), the retained
 * positions as int32 (on webgpu all in a few fused kernels, merge-wgsl.ts). `idxHost` is left empty: the positions are host metadata (serialized,
 * {@link MiniCacheCache.retainedPositions}) and come back in one readback after every pair is merged.
 */
async function mergeAndHold(x0: tf.Tensor3D, x1: tf.Tensor3D, t: number, gamma: number): Promise<HeldPair> {
  const [T] = x0.shape;
  const k = retainedCount(T, gamma);
  // On webgpu, a handful of fused kernels write the stored parts directly (merge-wgsl.ts).
  if (isWebGpuBackend() && k > 0 && k < T && x0.dtype === 'float32' && x1.dtype === 'float32') {
    const m = mergeAndPackWgsl(x0, x1, t, k, PARALLEL_EPS);
    return { ...m, idxHost: new Int32Array(0), retained: k };
  }
  const m = mergeLayerPairOnBackend(x0, x1, t, gamma);
  const held: Partial<HeldPair> = { idx: m.idx, idxHost: new Int32Array(0), retained: m.idx.shape[0] };
  try {
    for (const part of HALF_PARTS) held[part] = await HalfTensor.fromTensor(m[part]);
    return held as HeldPair;
  } catch (e) {
    disposePair(held);
    throw e;
  } finally {
    tf.dispose(HALF_PARTS.map((part) => m[part]));
  }
}

function disposePair(p: Partial<HeldPair>): void {
  for (const part of HALF_PARTS) p[part]?.dispose();
  p.idx?.dispose();
}

/**
 * Layer j (0: lower, 1: upper) of a held merged pair, [T, H, d] float32, on the backend with tfjs
 * ops only (no readback on webgpu): ‖x_j‖·e, then the retained rows scattered in at their
 * (token, KV head) pairs. The product of two float16 values is exact in float32, so this equals the
 * host reconstruction of the same stored parts (oracle.ts `restoreLayerPair`) bit for bit on every backend. Transient, owned by the caller.
 */
export function restoreHeldLayer(p: HeldPair, j: 0 | 1, T: number, H: number, d: number): tf.Tensor3D {
  return tf.tidy(() => {
    const norm = tf.reshape((j === 0 ? p.norm0 : p.norm1).unpack(), [T, H, 1]);
    const x = tf.mul(norm, p.dir.unpack()) as tf.Tensor3D;
    const k = p.retained;
    if (k === 0) return x;
    const heads = tf.tile(tf.range(0, H, 1, 'int32'), [k]); // head of row r·H + h is h
    const indices = tf.stack([tf.reshape(p.idx, [k * H]), heads], 1); // [k·H, 2]: (token, head)
    const rows = tf.reshape((j === 0 ? p.keep0 : p.keep1).unpack(), [k * H, d]);
    return tf.tensorScatterUpdate(x, indices, rows) as tf.Tensor3D;
  });
}

/**
 * A MiniCache cache: layers below `startLayer` (and an unpaired last layer) stay exact at float16;
 * each merged pair holds one shared direction tensor, per-layer norms and the retained tokens, for
 * pre-RoPE keys and for values. Everything is held on the backend at its stored width (float16
 * packed two per int32, indices int32), nothing else: a merged layer is reconstructed transiently
 * per read ({@link restoreHeldLayer}); keys are rotated at read time.
 *
 * Keys are merged **pre-RoPE**: both layers' keys of a token are rotated by the same position-dependent
 * rotation, which preserves norms and angles and commutes with SLERP, so merging pre- or post-RoPE gives
 * the same result; pre-RoPE is what the KVCache holds (as xKV's MiniCache port also merges pre-RoPE
 * keys and rotates afterwards).
 */
export class MiniCacheCache extends BaseCompressedCache {
  readonly strategy = 'minicache';

  constructor(
    layout: ModelLayout,
    rope: RopeConfig,
    prefillLength: number,
    readonly options: MiniCacheOptions,
    private readonly startLayer: number,
    private readonly startPosition: number,
    private readonly pairs: PairState[],
    /** Pre-RoPE keys and values of the exact layers, float16 [T, H_kv, d] (null for merged layers). */
    private readonly exactK: (HalfTensor | null)[],
    private readonly exactV: (HalfTensor | null)[],
  ) {
    super(layout, rope, prefillLength);
  }

  /** Retained (unmerged) token positions of a merged layer, [k, H_kv] row-major, or null for an exact layer. */
  retainedPositions(layer: number, kind: 'keys' | 'values'): Int32Array | null {
    this.assertLive(layer);
    const p = this.pairs.find((q) => q.layers.includes(layer));
    return p ? Int32Array.from(kind === 'keys' ? p.k.idxHost : p.v.idxHost) : null;
  }

  /** Pre-RoPE keys or values of a layer, [T, H_kv, d] float32, transient. */
  private layerValues(layer: number, kind: 'k' | 'v'): tf.Tensor3D {
    const exact = (kind === 'k' ? this.exactK : this.exactV)[layer];
    if (exact) return exact.unpack() as tf.Tensor3D;
    const p = this.pairs.find((q) => q.layers.includes(layer))!;
    const { nKvHeads: H, headDim: d } = this.layout;
    return restoreHeldLayer(p[kind], layer === p.layers[0] ? 0 : 1, this.prefillLength, H, d);
  }

  protected prefillKeys(layer: number): tf.Tensor3D {
    return tf.tidy(() => applyRope(this.layerValues(layer, 'k'), this.rope, { start: this.startPosition, count: this.prefillLength }));
  }
  protected prefillValues(layer: number): tf.Tensor3D {
    return this.layerValues(layer, 'v');
  }

  protected stored(): StoredItem[] {
    const { nKvHeads: H } = this.layout;
    const out: StoredItem[] = [];
    for (let l = 0; l < this.layout.nLayers; l++) {
      const k = this.exactK[l];
      const v = this.exactV[l];
      if (k && v) out.push({ name: `exact.k.${l}`, half: k }, { name: `exact.v.${l}`, half: v });
    }
    for (const p of this.pairs) {
      for (const kind of ['k', 'v'] as const) {
        const held = p[kind];
        for (const part of PAIR_PARTS) {
          const name = `pair.${p.layers[0]}.${kind}.${part}`;
          out.push(part === 'idx' ? { name, dtype: 'int32', shape: [held.retained, H], data: held.idxHost } : { name, half: held[part] });
        }
      }
    }
    return out;
  }

  protected meta(): Record<string, unknown> {
    return { startLayer: this.startLayer, startPosition: this.startPosition };
  }

  protected disposeStored(): void {
    for (const p of this.pairs) {
      disposePair(p.k);
      disposePair(p.v);
    }
    for (const h of [...this.exactK, ...this.exactV]) h?.dispose();
  }
}

/**
 * The `minicache` strategy (MiniCache, Liu et al. 2024, arXiv 2405.14366): cross-layer merging
 * of adjacent layer pairs from mid-depth by SLERP of per-token directions with per-layer norms and
 * retention of the most distinct token pairs (see {@link mergeLayerPair}). Applies to pre-RoPE keys
 * and to values; decode tokens stay exact in the residual buffer.
 * `compress` throws KvpackError('config') when `startLayer` leaves no pair to merge, and
 * KvpackError('layout' | 'shape' | 'dtype' | 'nonfinite') on a bad cache.
 */
export const miniCacheDefinition = defineStrategy({
  name: 'minicache',
  description: 'MiniCache: SLERP merging of adjacent layer pairs from mid-depth, per-layer norms, most distinct tokens retained (Liu et al. 2024)',
  schema: MiniCacheOptionsSchema,
  capabilities: {
    ratioTarget: (o) => (o.targetRatio === undefined ? null : { target: o.targetRatio, knob: 'startLayer' }),
    // With a target ratio the start layer depends on T, which this capability is not given: none is named.
    mla: () => 'MiniCache merges the per-head key and value directions of adjacent layers; an MLA layer caches one shared latent instead (compress MLA caches with xkv or svd across/within layers)',
    exactLayers: (o, L) => {
      if (o.targetRatio !== undefined) return [];
      const merged = new Set(mergedPairs(L, o.startLayer ?? Math.floor(L / 2)).flat());
      return Array.from({ length: L }, (_, l) => l).filter((l) => !merged.has(l));
    },
  },
  compress: (cache, options, T) =>
    disposeOwnedOnError(async (own) => {
      const { nLayers: L, nKvHeads: H, headDim: d } = cache.layout;
      const start = resolveStartLayer(options, cache.layout, T);
      check(
        start + 1 < L,
        'config',
        `minicache: startLayer ${start} leaves no adjacent layer pair to merge in a ${L}-layer model (startLayer must be at most L − 2 = ${L - 2})`,
      );
      const ownPair = (p: HeldPair): HeldPair => {
        for (const part of HALF_PARTS) own(p[part].packed);
        own(p.idx);
        return p;
      };
      const pairs: PairState[] = [];
      for (const layers of mergedPairs(L, start)) {
        const [a, b] = layers;
        const k = ownPair(await mergeAndHold(cache.keys[a], cache.keys[b], options.t, options.gamma));
        const v = ownPair(await mergeAndHold(cache.values[a], cache.values[b], options.t, options.gamma));
        pairs.push({ layers, k, v });
      }
      // The retained positions, host metadata, in one readback after every pair is merged.
      const held = pairs.flatMap((p) => [p.k, p.v]);
      const joined = held.length === 1 ? held[0].idx : tf.tidy(() => tf.concat(held.map((p) => tf.reshape(p.idx, [-1]))));
      let all: Int32Array;
      try {
        all = Int32Array.from((await joined.data()) as Int32Array);
      } finally {
        if (joined !== held[0].idx) joined.dispose();
      }
      let at = 0;
      for (const p of held) {
        p.idxHost = all.slice(at, at + p.idx.size);
        at += p.idx.size;
      }
      const merged = new Set(pairs.flatMap((p) => p.layers));
      const exactK: (HalfTensor | null)[] = new Array(L).fill(null);
      const exactV: (HalfTensor | null)[] = new Array(L).fill(null);
      const hold = async (x: tf.Tensor) => {
        const h = await HalfTensor.fromTensor(x);
        own(h.packed);
        return h;
      };
      for (let l = 0; l < L; l++) {
        if (merged.has(l)) continue;
        exactK[l] = await hold(cache.keys[l]);
        exactV[l] = await hold(cache.values[l]);
      }
      return new MiniCacheCache(cache.layout, cache.rope, T, options, start, cache.startPosition ?? 0, pairs, exactK, exactV);
    }),
  restore(r, options) {
    const { layout, rope, prefillLength: T, startPosition, meta } = r.header;
    const { nLayers: L, nKvHeads: H, headDim: d } = layout;
    const startLayer = meta.startLayer;
    check(
      typeof startLayer === 'number' && Number.isInteger(startLayer) && startLayer >= 0 && startLayer < L,
      'corrupt',
      `serialized minicache cache is corrupt: metadata startLayer ${JSON.stringify(startLayer)} is not a layer of ${L}`,
    );
    const pairs = mergedPairs(L, startLayer).map((layers): PairState => {
      const read = (kind: 'k' | 'v'): HeldPair => {
        const base = `pair.${layers[0]}.${kind}`;
        const k = r.shape(`${base}.idx`, { dtype: 'int32', shape: [null, H] })[0];
        const shapes = pairShapes(T, H, d, k);
        const half = (name: (typeof HALF_PARTS)[number]) => r.half(`${base}.${name}`, shapes[name]);
        // Read in stored order (the restore checks the declared layout against the file's).
        const dir = half('dir');
        const norm0 = half('norm0');
        const norm1 = half('norm1');
        const idxHost = r.host<Int32Array>(`${base}.idx`, shapes.idx);
        check(idxHost.every((p) => p >= 0 && p < T), 'corrupt', `serialized minicache cache is corrupt: "${base}.idx" holds a token outside [0, ${T})`);
        const keep0 = half('keep0');
        const keep1 = half('keep1');
        return { dir, norm0, norm1, idx: tf.tensor2d(idxHost, [k, H], 'int32'), idxHost, keep0, keep1, retained: k };
      };
      return { layers, k: read('k'), v: read('v') };
    });
    const merged = new Set(pairs.flatMap((p) => p.layers));
    const exactK: (HalfTensor | null)[] = new Array(L).fill(null);
    const exactV: (HalfTensor | null)[] = new Array(L).fill(null);
    for (let l = 0; l < L; l++) {
      if (merged.has(l)) continue;
      exactK[l] = r.half(`exact.k.${l}`, { shape: [T, H, d] });
      exactV[l] = r.half(`exact.v.${l}`, { shape: [T, H, d] });
    }
    return new MiniCacheCache(layout, rope, T, options, startLayer, startPosition, pairs, exactK, exactV);
  },
});
