import * as tf from '@tensorflow/tfjs-core';
import {
  BaseCompressedCache,
  MAX_LAYERS,
  applyRope,
  atMost,
  check,
  decodeHalf,
  encodeHalf,
  defineStrategy,
  disposeOwnedOnError,
  roundToHalf,
  type ModelLayout,
  type RopeConfig,
  type StoredItem,
} from '@kvpack/core';
import { z } from 'zod';

/** Options of the `minicache` strategy (defaults: the paper's t = 0.6 and γ = 0.05). */
export const MiniCacheOptionsSchema = z.strictObject({
  /**
   * First merged layer S: pairs (S, S+1), (S+2, S+3), … are merged; default ⌊L/2⌋ (the paper's "from
   * the middle"). A layer index: below 1,024 (core MAX_LAYERS), and at most L − 2 at compress.
   */
  startLayer: z.int().nonnegative().max(MAX_LAYERS - 1, { error: atMost(MAX_LAYERS - 1, 'a layer index; models have far fewer layers') }).optional(),
  /** SLERP interpolation t ∈ [0, 1] between the lower layer's direction (t = 0) and the upper one's (t = 1). */
  t: z.number().min(0).max(1).default(0.6),
  /** Retained fraction γ ∈ [0, 1]: per merged pair and KV head, round(γ·T) most distinct token pairs stay unmerged. */
  gamma: z.number().min(0).max(1).default(0.05),
});
export type MiniCacheOptions = z.output<typeof MiniCacheOptionsSchema>;

/** Angles at or within this of 0 or π make SLERP's 1/sin Ω ill-conditioned: linear interpolation instead. */
const PARALLEL_EPS = 1e-6;

/**
 * The merged form of one adjacent layer pair (l0 = S + 2i, l1 = l0 + 1), for keys or for values,
 * T tokens × H_kv KV heads × d channels. All floats are float16 bit patterns.
 */
export interface MergedPair {
  /** Shared unit direction per token per KV head (SLERP of the two layers' directions), [T, H_kv, d]. */
  dir: Uint16Array;
  /** Per-token norms of the lower and upper layer, [T, H_kv] each. */
  norm0: Uint16Array;
  norm1: Uint16Array;
  /** Retained (unmerged) token positions per KV head, ascending, [k, H_kv]. */
  idx: Int32Array;
  /** The retained tokens' exact vectors of the lower and upper layer, [k, H_kv, d] each. */
  keep0: Uint16Array;
  keep1: Uint16Array;
  /** k: retained tokens per KV head. */
  retained: number;
}

/** Number of token pairs retained unmerged per KV head: round(γ·T). */
export function retainedCount(tokens: number, gamma: number): number {
  return Math.min(tokens, Math.max(0, Math.round(gamma * tokens)));
}

/**
 * MiniCache's merge of two adjacent layers' states x0 (lower layer) and x1 (upper layer), each
 * [T, H, d] (MiniCache, Liu et al. 2024, arXiv 2405.14366, §4.1–4.2):
 * - per token per KV head, the vectors are split into norm ‖x‖ and unit direction u = x/‖x‖;
 * - the directions are merged by SLERP, e = sin((1−t)Ω)/sin Ω · u0 + sin(tΩ)/sin Ω · u1 with
 *   Ω = arccos(u0·u1), falling back to (1−t)·u0 + t·u1 when sin Ω < 1e-6 (Ω ≈ 0 or π);
 * - each layer keeps its own norm, so layer j is restored as ‖x_j‖·e;
 * - per KV head, the round(γ·T) token pairs with the **largest** angular distance Ω/π (the most
 *   distinct, i.e. least mergeable) are retained unmerged in both layers. This is the paper's stated
 *   rule ("keep highly distinct state pairs unmerged", §4.2). The xKV authors' port
 *   (abdelfattah-lab/xKV, xKV/customized_cache/fake_layer_merge_dynamic_cache.py,
 *   `slerp_merge_rows_batch`) thresholds Ω at d_min + γ·(d_max − d_min) and leaves the tokens
 *   *below* the threshold — the most similar ones — unmerged, which inverts the rule; we follow the
 *   paper, and take γ as the retained fraction (top-γ by angle, ties to the lower position).
 * Everything is computed in float64 and stored as float16.
 */
export function mergeLayerPair(x0: Float32Array, x1: Float32Array, T: number, H: number, d: number, t: number, gamma: number): MergedPair {
  const n = T * H;
  const dir = new Float64Array(n * d);
  const norm0 = new Float64Array(n);
  const norm1 = new Float64Array(n);
  const angle = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const o = i * d;
    let s0 = 0;
    let s1 = 0;
    for (let c = 0; c < d; c++) {
      s0 += x0[o + c] * x0[o + c];
      s1 += x1[o + c] * x1[o + c];
    }
    const a = Math.sqrt(s0);
    const b = Math.sqrt(s1);
    norm0[i] = a;
    norm1[i] = b;
    const ia = a > 0 ? 1 / a : 0;
    const ib = b > 0 ? 1 / b : 0;
    let dot = 0;
    for (let c = 0; c < d; c++) dot += x0[o + c] * ia * (x1[o + c] * ib);
    const omega = Math.acos(Math.min(1, Math.max(-1, dot)));
    angle[i] = omega;
    const so = Math.sin(omega);
    let w0: number;
    let w1: number;
    if (so < PARALLEL_EPS) {
      w0 = 1 - t;
      w1 = t;
    } else {
      w0 = Math.sin((1 - t) * omega) / so;
      w1 = Math.sin(t * omega) / so;
    }
    for (let c = 0; c < d; c++) dir[o + c] = w0 * x0[o + c] * ia + w1 * x1[o + c] * ib;
  }
  const k = retainedCount(T, gamma);
  const idx = new Int32Array(k * H);
  const keep0 = new Float32Array(k * H * d);
  const keep1 = new Float32Array(k * H * d);
  const order = new Int32Array(T);
  for (let h = 0; h < H; h++) {
    for (let i = 0; i < T; i++) order[i] = i;
    const chosen = Array.from(order)
      .sort((p, q) => angle[q * H + h] - angle[p * H + h] || p - q)
      .slice(0, k)
      .sort((p, q) => p - q);
    chosen.forEach((tok, j) => {
      idx[j * H + h] = tok;
      const src = (tok * H + h) * d;
      const dst = (j * H + h) * d;
      for (let c = 0; c < d; c++) {
        keep0[dst + c] = x0[src + c];
        keep1[dst + c] = x1[src + c];
      }
    });
  }
  return { dir: encodeHalf(dir), norm0: encodeHalf(norm0), norm1: encodeHalf(norm1), idx, keep0: encodeHalf(keep0), keep1: encodeHalf(keep1), retained: k };
}

/** Restores both layers of a merged pair, [T, H, d] float32 each: ‖x_j‖·e, with retained tokens exact. */
export function restoreLayerPair(m: MergedPair, T: number, H: number, d: number): [Float32Array, Float32Array] {
  const dir = decodeHalf(m.dir);
  const out: [Float32Array, Float32Array] = [new Float32Array(T * H * d), new Float32Array(T * H * d)];
  const norms = [decodeHalf(m.norm0), decodeHalf(m.norm1)];
  const keep = [decodeHalf(m.keep0), decodeHalf(m.keep1)];
  for (let j = 0; j < 2; j++) {
    const o = out[j];
    const nj = norms[j];
    for (let i = 0; i < T * H; i++) for (let c = 0; c < d; c++) o[i * d + c] = nj[i] * dir[i * d + c];
    for (let r = 0; r < m.retained; r++) {
      for (let h = 0; h < H; h++) {
        const tok = m.idx[r * H + h];
        o.set(keep[j].subarray((r * H + h) * d, (r * H + h + 1) * d), (tok * H + h) * d);
      }
    }
  }
  return out;
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

/** One merged pair's keys and values. */
interface PairState {
  layers: [number, number];
  k: MergedPair;
  v: MergedPair;
}

const PAIR_PARTS = ['dir', 'norm0', 'norm1', 'idx', 'keep0', 'keep1'] as const;

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
 * A MiniCache cache: layers below `startLayer` (and an unpaired last layer) stay exact at float16;
 * each merged pair holds one shared direction tensor, per-layer norms and the retained tokens, for
 * pre-RoPE keys and for values. The restored pre-RoPE keys and values of every layer live on the
 * backend as float32 (rebuilt identically by the deserializer); keys are rotated at read time.
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
    /** Pre-RoPE keys and values of every layer, float32 (float16-rounded for exact layers). */
    private readonly recK: tf.Tensor3D[],
    private readonly recV: tf.Tensor3D[],
  ) {
    super(layout, rope, prefillLength);
  }

  /** Retained (unmerged) token positions of a merged layer, [k, H_kv] row-major, or null for an exact layer. */
  retainedPositions(layer: number, kind: 'keys' | 'values'): Int32Array | null {
    this.assertLive(layer);
    const p = this.pairs.find((q) => q.layers.includes(layer));
    return p ? Int32Array.from(kind === 'keys' ? p.k.idx : p.v.idx) : null;
  }

  protected prefillKeys(layer: number): tf.Tensor3D {
    return applyRope(this.recK[layer], this.rope, { start: this.startPosition, count: this.prefillLength });
  }
  protected prefillValues(layer: number): tf.Tensor3D {
    return tf.clone(this.recV[layer]);
  }

  private isMerged(layer: number): boolean {
    return this.pairs.some((p) => p.layers.includes(layer));
  }

  protected stored(): StoredItem[] {
    const { nKvHeads: H, headDim: d } = this.layout;
    const T = this.prefillLength;
    const out: StoredItem[] = [];
    for (let l = 0; l < this.layout.nLayers; l++) {
      if (this.isMerged(l)) continue;
      out.push({ name: `exact.k.${l}`, tensor: this.recK[l], dtype: 'float16' }, { name: `exact.v.${l}`, tensor: this.recV[l], dtype: 'float16' });
    }
    for (const p of this.pairs) {
      for (const kind of ['k', 'v'] as const) {
        const shapes = pairShapes(T, H, d, p[kind].retained);
        for (const part of PAIR_PARTS) out.push({ name: `pair.${p.layers[0]}.${kind}.${part}`, ...shapes[part], data: p[kind][part] });
      }
    }
    return out;
  }

  protected meta(): Record<string, unknown> {
    return { startLayer: this.startLayer, startPosition: this.startPosition };
  }

  protected disposeStored(): void {
    tf.dispose([...this.recK, ...this.recV]);
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
    exactLayers: (o, L) => {
      const merged = new Set(mergedPairs(L, o.startLayer ?? Math.floor(L / 2)).flat());
      return Array.from({ length: L }, (_, l) => l).filter((l) => !merged.has(l));
    },
  },
  compress: (cache, options, T) =>
    disposeOwnedOnError(async (own) => {
      const { nLayers: L, nKvHeads: H, headDim: d } = cache.layout;
      const start = options.startLayer ?? Math.floor(L / 2);
      check(
        start + 1 < L,
        'config',
        `minicache: startLayer ${start} leaves no adjacent layer pair to merge in a ${L}-layer model (startLayer must be at most L − 2 = ${L - 2})`,
      );
      const pairs: PairState[] = [];
      for (const layers of mergedPairs(L, start)) {
        const [a, b] = layers;
        const merge = async (x: tf.Tensor3D[]) => mergeLayerPair((await x[a].data()) as Float32Array, (await x[b].data()) as Float32Array, T, H, d, options.t, options.gamma);
        pairs.push({ layers, k: await merge(cache.keys), v: await merge(cache.values) });
      }
      const { recK, recV } = rebuildPairs(pairs, L, T, H, d, own);
      for (let l = 0; l < L; l++) {
        if (recK[l]) continue;
        recK[l] = own((await roundToHalf(cache.keys[l])) as tf.Tensor3D);
        recV[l] = own((await roundToHalf(cache.values[l])) as tf.Tensor3D);
      }
      return new MiniCacheCache(cache.layout, cache.rope, T, options, start, cache.startPosition ?? 0, pairs, recK, recV);
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
      const read = (kind: 'k' | 'v'): MergedPair => {
        const base = `pair.${layers[0]}.${kind}`;
        const k = r.shape(`${base}.idx`, { dtype: 'int32', shape: [null, H] })[0];
        const shapes = pairShapes(T, H, d, k);
        const part = <A extends Uint16Array | Int32Array>(name: (typeof PAIR_PARTS)[number]) => r.host<A>(`${base}.${name}`, shapes[name]);
        const idx = part<Int32Array>('idx');
        check(idx.every((p) => p >= 0 && p < T), 'corrupt', `serialized minicache cache is corrupt: "${base}.idx" holds a token outside [0, ${T})`);
        return { dir: part('dir'), norm0: part('norm0'), norm1: part('norm1'), idx, keep0: part('keep0'), keep1: part('keep1'), retained: k } as MergedPair;
      };
      return { layers, k: read('k'), v: read('v') };
    });
    const { recK, recV } = rebuildPairs(pairs, L, T, H, d, (t) => t);
    for (let l = 0; l < L; l++) {
      if (recK[l]) continue;
      recK[l] = r.tensor(`exact.k.${l}`, { dtype: 'float16', shape: [T, H, d] });
      recV[l] = r.tensor(`exact.v.${l}`, { dtype: 'float16', shape: [T, H, d] });
    }
    return new MiniCacheCache(layout, rope, T, options, startLayer, startPosition, pairs, recK, recV);
  },
});

/** The merged layers' keys and values [T, H, d] rebuilt from their pairs (unmerged layers left empty). */
function rebuildPairs(pairs: PairState[], L: number, T: number, H: number, d: number, own: (t: tf.Tensor3D) => tf.Tensor3D): { recK: tf.Tensor3D[]; recV: tf.Tensor3D[] } {
  const recK: tf.Tensor3D[] = new Array(L);
  const recV: tf.Tensor3D[] = new Array(L);
  for (const { layers, k, v } of pairs) {
    const [k0, k1] = restoreLayerPair(k, T, H, d);
    const [v0, v1] = restoreLayerPair(v, T, H, d);
    recK[layers[0]] = own(tf.tensor3d(k0, [T, H, d]));
    recK[layers[1]] = own(tf.tensor3d(k1, [T, H, d]));
    recV[layers[0]] = own(tf.tensor3d(v0, [T, H, d]));
    recV[layers[1]] = own(tf.tensor3d(v1, [T, H, d]));
  }
  return { recK, recV };
}
