import * as tf from '@tensorflow/tfjs-core';
import {
  applyRope,
  attention,
  MAX_TOKENS,
  atMost,
  check,
  isHostBackend,
  isWebGpuBackend,
  wgslWorkgroupStorageLimit,
  decodeHalf,
  encodeHalf,
  ropeInverseFrequencies,
  type StoredReader,
  type KVCache,
  type ModelLayout,
  type StoredSpec,
  type StoredTensor,
} from '@kvpack/core';
import { z } from 'zod';
import {
  addRowMask,
  causalParts,
  ownHeadBlock,
  queryBlocks,
  ropeScores,
  type DecodeState,
  type QueryBlocks,
  type ValuePath,
} from './decode.js';
import { ropeScoresWgsl, selectChunkTokens, softmaxExactWgsl, valuesWgsl, wgslStepFits } from './sparse-wgsl.js';

/*
 * Sparse decode (xKV-SR: the xKV authors' follow-up, after ShadowKV, Sun et al. 2024, arXiv
 * 2410.21465; reference code abdelfattah-lab/xKV `xKV_SR/models/kv_cache_xkv.py`, ShadowKV's
 * `ShadowKVCache`): at compress time, one landmark per chunk of `chunkSize` tokens (the mean of the
 * chunk's exact post-RoPE keys), the chunks whose keys are least like their landmark kept exact
 * ("outliers"), and the last tokens kept exact ("local"). At decode, per KV head, the chunks with the
 * highest landmark attention are selected up to a token budget and only their keys and values are
 * rebuilt from the low-rank factors.
 */

const tokenCount = (what: string) => atMost(MAX_TOKENS, `${what}; 2^20 tokens of one layer's keys already fill the wasm heap`);

/**
 * Options of the sparse decode mode (`sparse` in the xkv options). Every count is at most 2^20
 * (core MAX_TOKENS): a token count beyond it can never be met by a cache kvpack holds.
 */
export const SparseOptionsSchema = z
  .strictObject({
    /** Tokens rebuilt per KV head and decode step (a multiple of chunkSize); default 2,048 (ShadowKV / xKV-SR); at most 2^20. */
    budget: z.int().positive().max(MAX_TOKENS, { error: tokenCount('tokens') }).default(2048),
    /** Tokens per chunk (one landmark each); default 8; at most 2^20. */
    chunkSize: z.int().positive().max(MAX_TOKENS, { error: tokenCount('tokens') }).default(8),
    /**
     * Outlier chunks per layer and KV head kept exact (16-bit); default 48, ShadowKV's count for a
     * 2,048 budget (24 per 1,024). At most the number of chunks (and at most 2^20).
     */
    outlierChunks: z.int().nonnegative().max(MAX_TOKENS, { error: tokenCount('chunks') }).default(48),
    /** The last prompt tokens kept exact (16-bit), rounded up to whole chunks; default 32 (ShadowKV: 4 chunks); at most 2^20. */
    localTokens: z.int().nonnegative().max(MAX_TOKENS, { error: tokenCount('tokens') }).default(32),
  })
  .refine((o) => o.budget % o.chunkSize === 0, { message: 'budget must be a multiple of chunkSize', path: ['budget'] });
export type SparseOptions = z.output<typeof SparseOptionsSchema>;

/** Host data of one layer's sparse index (what is stored and serialized). */
export interface SparseLayer {
  /** Landmarks, float16 bits, [C, H_kv, d]. */
  landmarks: Uint16Array;
  /** Outlier chunk indices per KV head, ascending, [H_kv, O]. */
  outlierChunks: Int32Array;
  /** Exact post-RoPE keys / values of the outlier chunks, float16 bits, [H_kv, O·c, d]. */
  outlierK: Uint16Array;
  outlierV: Uint16Array;
  /** Exact post-RoPE keys / values of the local tokens C·c … T − 1, float16 bits, [T − C·c, H_kv, d]. */
  localK: Uint16Array;
  localV: Uint16Array;
}

/** The sparse index of a cache: chunk geometry and the per-layer host data. */
export interface SparseIndex {
  options: SparseOptions;
  /** Tokens per chunk c. */
  chunkSize: number;
  /** Landmark chunks C = ⌊max(0, T − localTokens) / c⌋ (tokens 0 … C·c − 1). */
  chunks: number;
  /** Outlier chunks per KV head O = min(outlierChunks, C). */
  outliers: number;
  /** Exact local tokens T − C·c (≥ localTokens; includes a last partial chunk). */
  local: number;
  layers: SparseLayer[];
}

/** Chunk geometry for T tokens. */
export function sparseGeometry(T: number, o: SparseOptions): { chunks: number; outliers: number; local: number } {
  const chunks = Math.floor(Math.max(0, T - o.localTokens) / o.chunkSize);
  return { chunks, outliers: Math.min(o.outlierChunks, chunks), local: T - chunks * o.chunkSize };
}

/** One layer's stored index from float32 landmarks [C·F], outlier chunks and exact rows (16-bit storage). */
function encodeLayer(lm: Float32Array, outl: Int32Array, oK: Float32Array, oV: Float32Array, lK: Float32Array, lV: Float32Array): SparseLayer {
  return { landmarks: encodeHalf(lm), outlierChunks: outl, outlierK: encodeHalf(oK), outlierV: encodeHalf(oV), localK: encodeHalf(lK), localV: encodeHalf(lV) };
}

/**
 * Builds the sparse index from a prefill cache's exact keys and values (compress time). Keys are
 * rotated on the host in float64 at positions startPosition…; each landmark is the float64 mean of its
 * chunk's post-RoPE keys (per KV head), stored as float16. The outlier score of a chunk is the lowest
 * cosine similarity between one of its keys and its landmark (as ShadowKV: cos = x·y / max(‖x‖‖y‖,
 * 1e-8)); the O lowest per KV head are outliers (ties: lower chunk first).
 */
export async function buildSparseIndex(cache: KVCache, T: number, o: SparseOptions, where: 'auto' | 'host' | 'device' = 'auto'): Promise<SparseIndex> {
  if (where === 'device' || (where === 'auto' && !isHostBackend())) return buildSparseIndexOnDevice(cache, T, o);
  const { nKvHeads: Hkv, headDim: d, nLayers } = cache.layout;
  const F = Hkv * d;
  const c = o.chunkSize;
  const { chunks: C, outliers: O, local } = sparseGeometry(T, o);
  const half = d / 2;
  const inv = ropeInverseFrequencies(cache.rope, d);
  const start = cache.startPosition ?? 0;
  const cosT = new Float64Array(T * half);
  const sinT = new Float64Array(T * half);
  for (let t = 0; t < T; t++)
    for (let i = 0; i < half; i++) {
      const a = (start + t) * inv[i];
      cosT[t * half + i] = Math.cos(a);
      sinT[t * half + i] = Math.sin(a);
    }
  const interleaved = cache.rope.layout === 'interleaved';
  const pairA = (i: number) => (interleaved ? 2 * i : i);
  const pairB = (i: number) => (interleaved ? 2 * i + 1 : i + half);
  /** Post-RoPE key of token t, KV head h, into out[off … off + d). */
  const rotate = (x: Float32Array, t: number, h: number, out: Float64Array | Float32Array, off: number) => {
    const base = t * F + h * d;
    for (let i = 0; i < half; i++) {
      const a = x[base + pairA(i)];
      const b = x[base + pairB(i)];
      const cs = cosT[t * half + i];
      const sn = sinT[t * half + i];
      out[off + pairA(i)] = a * cs - b * sn;
      out[off + pairB(i)] = b * cs + a * sn;
    }
  };
  const layers: SparseLayer[] = [];
  const key = new Float64Array((C > 0 ? c : 0) * d); // c ≤ T when there is a chunk
  const mean = new Float64Array(d);
  for (let l = 0; l < nLayers; l++) {
    const K = (await cache.keys[l].data()) as Float32Array;
    const V = (await cache.values[l].data()) as Float32Array;
    const lm = new Float32Array(C * F);
    const score = new Float64Array(Hkv * C);
    for (let ch = 0; ch < C; ch++) {
      for (let h = 0; h < Hkv; h++) {
        mean.fill(0);
        for (let j = 0; j < c; j++) {
          rotate(K, ch * c + j, h, key, j * d);
          for (let e = 0; e < d; e++) mean[e] += key[j * d + e];
        }
        let nm = 0;
        for (let e = 0; e < d; e++) {
          mean[e] /= c;
          nm += mean[e] * mean[e];
          lm[ch * F + h * d + e] = mean[e];
        }
        nm = Math.sqrt(nm);
        let lowest = Infinity;
        for (let j = 0; j < c; j++) {
          let dot = 0;
          let nk = 0;
          for (let e = 0; e < d; e++) {
            dot += key[j * d + e] * mean[e];
            nk += key[j * d + e] * key[j * d + e];
          }
          lowest = Math.min(lowest, dot / Math.max(Math.sqrt(nk) * nm, 1e-8));
        }
        score[h * C + ch] = lowest;
      }
    }
    const outl = new Int32Array(Hkv * O);
    for (let h = 0; h < Hkv; h++) {
      const order = Array.from({ length: C }, (_, i) => i).sort((a, b) => score[h * C + a] - score[h * C + b] || a - b);
      const pick = order.slice(0, O).sort((a, b) => a - b);
      outl.set(pick, h * O);
    }
    const oK = new Float32Array(Hkv * O * c * d);
    const oV = new Float32Array(Hkv * O * c * d);
    for (let h = 0; h < Hkv; h++)
      for (let k = 0; k < O; k++)
        for (let j = 0; j < c; j++) {
          const t = outl[h * O + k] * c + j;
          const off = ((h * O + k) * c + j) * d;
          rotate(K, t, h, oK, off);
          oV.set(V.subarray(t * F + h * d, t * F + h * d + d), off);
        }
    const lK = new Float32Array(local * F);
    for (let u = 0; u < local; u++) for (let h = 0; h < Hkv; h++) rotate(K, C * c + u, h, lK, u * F + h * d);
    const lV = V.slice(C * c * F, T * F);
    layers.push(encodeLayer(lm, outl, oK, oV, lK, lV));
  }
  return { options: o, chunkSize: c, chunks: C, outliers: O, local, layers };
}

/**
 * {@link buildSparseIndex} on the tfjs backend (the default off wasm/cpu, where reading the whole cache
 * back would dominate the compression): keys rotated by core `applyRope`, chunk means, min-cosine
 * outlier scores and the exact rows computed in float32 on the device; only the landmarks [C, H_kv, d],
 * the outlier chunk indices and the exact rows come back to the host (about 1/8 of the keys). The same
 * rules as the host build; results agree with it up to float32 rounding (tested).
 */
async function buildSparseIndexOnDevice(cache: KVCache, T: number, o: SparseOptions): Promise<SparseIndex> {
  const { nKvHeads: H, headDim: d, nLayers } = cache.layout;
  const F = H * d;
  const c = o.chunkSize;
  const { chunks: C, outliers: O, local } = sparseGeometry(T, o);
  const start = cache.startPosition ?? 0;
  const layers: SparseLayer[] = [];
  for (let l = 0; l < nLayers; l++) {
    const parts = tf.tidy(() => {
      const K = applyRope(cache.keys[l], cache.rope, { start, count: T }); // [T, H, d]
      const V = cache.values[l];
      const out: tf.Tensor[] = [];
      if (C > 0) {
        const Kc = tf.reshape(tf.slice(K, [0, 0, 0], [C * c, H, d]), [C, c, H, d]);
        const lm = tf.mean(Kc, 1); // [C, H, d]
        out.push(lm);
        if (O > 0) {
          const dot = tf.sum(tf.mul(Kc, tf.reshape(lm, [C, 1, H, d])), 3); // [C, c, H]
          const den = tf.maximum(tf.mul(tf.norm(Kc, 'euclidean', 3), tf.reshape(tf.norm(lm, 'euclidean', 2), [C, 1, H])), 1e-8);
          const score = tf.transpose(tf.min(tf.div(dot, den), 1)); // [H, C]: lowest cosine of each chunk
          const outl = tf.topk(tf.neg(score), O).indices; // [H, O], lowest scores
          // Exact rows of every head's outlier chunks: rows t·H + h of K, V viewed as [T·H, d].
          const tok = tf.add(tf.reshape(tf.mul(outl, tf.scalar(c, 'int32')), [H, O, 1]), tf.reshape(tf.range(0, c, 1, 'int32'), [1, 1, c]));
          const rows = tf.reshape(tf.add(tf.mul(tok, tf.scalar(H, 'int32')), tf.reshape(tf.range(0, H, 1, 'int32'), [H, 1, 1])), [-1]);
          out.push(outl, tf.gather(tf.reshape(K, [T * H, d]), rows), tf.gather(tf.reshape(V, [T * H, d]), rows));
        }
      }
      out.push(tf.slice(K, [C * c, 0, 0], [local, H, d]), tf.slice(V, [C * c, 0, 0], [local, H, d]));
      return out;
    });
    let data: Awaited<ReturnType<tf.Tensor['data']>>[];
    try {
      data = await Promise.all(parts.map((t) => t.data()));
    } finally {
      tf.dispose(parts);
    }
    let i = 0;
    const lm = C > 0 ? (data[i++] as Float32Array) : new Float32Array(0);
    let outl = new Int32Array(0);
    let oK: Float32Array = new Float32Array(0);
    let oV: Float32Array = new Float32Array(0);
    if (C > 0 && O > 0) {
      const raw = data[i++] as Int32Array;
      const k = data[i++] as Float32Array;
      const v = data[i++] as Float32Array;
      // Ascending chunk order per head, rows reordered to match ([H, O·c, d]).
      outl = new Int32Array(H * O);
      oK = new Float32Array(H * O * c * d);
      oV = new Float32Array(H * O * c * d);
      for (let h = 0; h < H; h++) {
        const order = Array.from({ length: O }, (_, j) => j).sort((a, b) => raw[h * O + a] - raw[h * O + b]);
        order.forEach((j, dst) => {
          outl[h * O + dst] = raw[h * O + j];
          oK.set(k.subarray((h * O + j) * c * d, (h * O + j + 1) * c * d), (h * O + dst) * c * d);
          oV.set(v.subarray((h * O + j) * c * d, (h * O + j + 1) * c * d), (h * O + dst) * c * d);
        });
      }
    }
    const lK = data[i++] as Float32Array;
    const lV = data[i++] as Float32Array;
    check(lm.length === C * F && lK.length === local * F && lV.length === local * F, 'shape', 'buildSparseIndex: unexpected tensor sizes');
    layers.push(encodeLayer(lm, outl, oK, oV, lK, lV));
  }
  return { options: o, chunkSize: c, chunks: C, outliers: O, local, layers };
}

function layerSpecs(l: number, ix: SparseIndex, layout: ModelLayout): StoredSpec[] {
  const { nKvHeads: H, headDim: d } = layout;
  const { chunks: C, outliers: O, local, chunkSize: c } = ix;
  return [
    { name: `sparse.landmarks.${l}`, dtype: 'float16', shape: [C, H, d] },
    { name: `sparse.outliers.${l}`, dtype: 'int32', shape: [H, O] },
    { name: `sparse.outlier.k.${l}`, dtype: 'float16', shape: [H, O * c, d] },
    { name: `sparse.outlier.v.${l}`, dtype: 'float16', shape: [H, O * c, d] },
    { name: `sparse.local.k.${l}`, dtype: 'float16', shape: [local, H, d] },
    { name: `sparse.local.v.${l}`, dtype: 'float16', shape: [local, H, d] },
  ];
}

/** Specs of the stored sparse-index tensors, in serialization order. */
export function sparseSpecs(ix: SparseIndex, layout: ModelLayout): StoredSpec[] {
  return ix.layers.flatMap((_, l) => layerSpecs(l, ix, layout));
}

/** The stored sparse-index tensors, same order as {@link sparseSpecs}. */
export function sparseTensors(ix: SparseIndex, layout: ModelLayout): StoredTensor[] {
  return ix.layers.flatMap((L, l) => {
    const s = layerSpecs(l, ix, layout);
    const data = [L.landmarks, L.outlierChunks, L.outlierK, L.outlierV, L.localK, L.localV];
    return s.map((spec, i) => ({ ...spec, data: data[i] }));
  });
}

/** Sparse-index metadata written to the serialization. */
export function sparseMeta(ix: SparseIndex): Record<string, number> {
  return { chunkSize: ix.chunkSize, chunks: ix.chunks, outliers: ix.outliers, local: ix.local };
}

/**
 * Restores a sparse index from a decoded container.
 * @throws KvpackError('corrupt') naming the tensor whose dtype, shape or contents are wrong.
 */
export function loadSparseIndex(r: StoredReader, strategy: string, layout: ModelLayout, T: number, o: SparseOptions): SparseIndex {
  const g = sparseGeometry(T, o);
  const meta = r.header.meta.sparse as Record<string, number> | undefined;
  check(
    meta && meta.chunkSize === o.chunkSize && meta.chunks === g.chunks && meta.outliers === g.outliers && meta.local === g.local,
    'corrupt',
    `serialized ${strategy} cache has sparse index ${JSON.stringify(meta ?? null)}, but its options give ${JSON.stringify({ chunkSize: o.chunkSize, ...g })}`,
  );
  const ix: SparseIndex = { options: o, chunkSize: o.chunkSize, ...g, layers: [] };
  for (let l = 0; l < layout.nLayers; l++) {
    const data = layerSpecs(l, ix, layout).map((spec) => r.host(spec.name, spec));
    const outl = data[1] as Int32Array;
    check(
      outl.every((v) => v >= 0 && v < g.chunks),
      'corrupt',
      `serialized ${strategy} cache is corrupt: tensor "sparse.outliers.${l}" holds a chunk index outside [0, ${g.chunks})`,
    );
    ix.layers.push({
      landmarks: data[0] as Uint16Array,
      outlierChunks: outl,
      outlierK: data[2] as Uint16Array,
      outlierV: data[3] as Uint16Array,
      localK: data[4] as Uint16Array,
      localV: data[5] as Uint16Array,
    });
  }
  return ix;
}

/**
 * The value side of a sparse step over S selected rows for g·n query rows (value rank R_v, head_dim
 * d): `compressed`, (p·U_v[rows])·B_v, costs g·n·S·R_v + g·n·R_v·d multiply–adds; `reconstruct`,
 * p·(U_v[rows]·B_v), costs S·R_v·d + g·n·S·d. `auto` takes the cheaper.
 */
export function sparseValuePath(values: ValuePath, gn: number, S: number, Rv: number, d: number): 'compressed' | 'reconstruct' {
  if (values !== 'auto') return values;
  return gn * S * Rv + gn * Rv * d <= S * Rv * d + gn * S * d ? 'compressed' : 'reconstruct';
}

/** Long-lived per-layer tensors of sparse decode (built on first use, held by the DecodeState). */
interface SparseLayerTensors {
  /** Landmarks per KV head, transposed, [d, C]. */
  lt: tf.Tensor2D[];
  /** −1e30 at each head's outlier chunks, [H_kv, 1, C]; null without outliers. */
  mask: tf.Tensor3D | null;
  /** Exact keys / values per KV head: its outlier tokens then the local tokens, [E₀, d]. */
  kx: tf.Tensor2D[];
  vx: tf.Tensor2D[];
  /** (token, KV head) of every exact row, [H_kv·E₀, 2] int32, and those rows' keys / values [H_kv·E₀, d]. */
  exactIdx: tf.Tensor2D;
  exactK: tf.Tensor2D;
  exactV: tf.Tensor2D;
  /** All heads' landmarks, transposed, [H_kv, d, C] (batched path). */
  ltAll: tf.Tensor3D;
}

/** Options of {@link SparseDecoder.attend} beyond the configured ones (tests, benchmarks). */
export interface SparseAttendOptions {
  /** Token budget per KV head for this call (a multiple of chunkSize); default the configured budget. */
  budget?: number;
  /** Value side: compressed domain ((softmax·U_v)·B_v) or reconstruction; default by flop count. */
  values?: ValuePath;
  /** Row gathers: `host` copies rows through the wasm heap (wasm only), `device` uses tf.gather; default host on wasm. */
  gather?: 'auto' | 'host' | 'device';
  /**
   * `loop`: one sequence of 2-D products per KV head (fastest on wasm/cpu, where batched products are
   * slow); `batched`: every KV head in the same kernels — one gather of all heads' selected rows, batched
   * [H_kv, ·, ·] products, one softmax — so a GPU step launches a fixed ~35 kernels instead of ~25 per
   * head. Default (`auto`): `loop` on wasm/cpu, `batched` elsewhere. Both compute the same attention.
   */
  heads?: 'auto' | 'loop' | 'batched';
  /**
   * Kernels of the batched path on the webgpu backend: `wgsl` runs a one-token step as 8 dispatches
   * (sparse-wgsl.ts: chunk selection, RoPE scores, softmax, values — plus tfjs's gather and matMul for
   * the key product); `tfjs` composes tfjs ops. Default (`auto`): `wgsl` on webgpu for one query token
   * with exact rows (E₀ > 0), else `tfjs`. Both compute the same attention.
   */
  kernels?: 'auto' | 'tfjs' | 'wgsl';
}

/**
 * Sparse decode over a grouped low-rank cache (see the file comment). Tensors of the index are built
 * on the backend on first use of a layer and held by the {@link DecodeState} (freed with the cache).
 */
export class SparseDecoder {
  private readonly perLayer = new Map<number, SparseLayerTensors>();
  private scratch = new Float32Array(0);

  constructor(
    readonly state: DecodeState,
    readonly index: SparseIndex,
  ) {}

  /** Exact tokens per KV head E₀ = O·c + local. */
  get exactPerHead(): number {
    return this.index.outliers * this.index.chunkSize + this.index.local;
  }

  /** The (token index) list of KV head h's exact tokens: its outlier chunks' tokens, then the local tokens. */
  exactTokens(layer: number, h: number): number[] {
    const { outliers: O, chunkSize: c, chunks: C, local } = this.index;
    const oc = this.index.layers[layer].outlierChunks;
    const out: number[] = [];
    for (let k = 0; k < O; k++) for (let j = 0; j < c; j++) out.push(oc[h * O + k] * c + j);
    for (let u = 0; u < local; u++) out.push(C * c + u);
    return out;
  }

  /** The layer's index tensors (built once). */
  tensors(layer: number): SparseLayerTensors {
    let t = this.perLayer.get(layer);
    if (t) return t;
    const { nKvHeads: H, headDim: d } = this.state.src.layout;
    const F = H * d;
    const { chunks: C, outliers: O, local, chunkSize: c } = this.index;
    const L = this.index.layers[layer];
    const E0 = this.exactPerHead;
    const lmk = decodeHalf(L.landmarks);
    const oK = decodeHalf(L.outlierK);
    const oV = decodeHalf(L.outlierV);
    const lK = decodeHalf(L.localK);
    const lV = decodeHalf(L.localV);
    const hold = <T extends tf.Tensor>(x: T) => this.state.hold(x);
    const lt: tf.Tensor2D[] = [];
    const kx: tf.Tensor2D[] = [];
    const vx: tf.Tensor2D[] = [];
    const idx = new Int32Array(H * E0 * 2);
    const ltData = new Float32Array(H * d * C);
    const exK = new Float32Array(H * E0 * d);
    const exV = new Float32Array(H * E0 * d);
    for (let h = 0; h < H; h++) {
      const a = new Float32Array(d * C);
      for (let ch = 0; ch < C; ch++) for (let e = 0; e < d; e++) a[e * C + ch] = lmk[ch * F + h * d + e];
      ltData.set(a, h * d * C);
      // Per-head tensors for the loop path (wasm/cpu); the batched path reads the stacked ones.
      if (isHostBackend()) lt.push(hold(tf.tensor2d(a, [d, C])));
      const k = new Float32Array(E0 * d);
      const v = new Float32Array(E0 * d);
      k.set(oK.subarray(h * O * c * d, (h + 1) * O * c * d));
      v.set(oV.subarray(h * O * c * d, (h + 1) * O * c * d));
      for (let u = 0; u < local; u++) {
        k.set(lK.subarray(u * F + h * d, u * F + h * d + d), (O * c + u) * d);
        v.set(lV.subarray(u * F + h * d, u * F + h * d + d), (O * c + u) * d);
      }
      if (isHostBackend()) {
        kx.push(hold(tf.tensor2d(k, [E0, d])));
        vx.push(hold(tf.tensor2d(v, [E0, d])));
      }
      exK.set(k, h * E0 * d);
      exV.set(v, h * E0 * d);
      this.exactTokens(layer, h).forEach((tok, i) => {
        idx[(h * E0 + i) * 2] = tok;
        idx[(h * E0 + i) * 2 + 1] = h;
      });
    }
    let mask: tf.Tensor3D | null = null;
    if (O > 0) {
      const m = new Float32Array(H * C);
      for (let h = 0; h < H; h++) for (let k = 0; k < O; k++) m[h * C + L.outlierChunks[h * O + k]] = -1e30;
      mask = hold(tf.tensor3d(m, [H, 1, C]));
    }
    t = {
      lt,
      mask,
      kx,
      vx,
      exactIdx: hold(tf.tensor2d(idx, [H * E0, 2], 'int32')),
      exactK: hold(tf.tensor2d(exK, [H * E0, d])),
      exactV: hold(tf.tensor2d(exV, [H * E0, d])),
      ltAll: hold(tf.tensor3d(ltData, [H, d, C])),
    };
    this.perLayer.set(layer, t);
    return t;
  }

  /** The layer's tensors with the per-head lists of the loop path filled (split from the stacked ones when built for the batched path). */
  private loopTensors(layer: number): SparseLayerTensors {
    const t = this.tensors(layer);
    if (t.lt.length === 0) {
      const H = t.ltAll.shape[0];
      const E0 = this.exactPerHead;
      const d = t.ltAll.shape[1];
      tf.tidy(() => {
        t.lt.push(...(tf.unstack(t.ltAll, 0) as tf.Tensor2D[]).map((x) => this.state.hold(x)));
        t.kx.push(...(tf.unstack(tf.reshape(t.exactK, [H, E0, d]), 0) as tf.Tensor2D[]).map((x) => this.state.hold(x)));
        t.vx.push(...(tf.unstack(tf.reshape(t.exactV, [H, E0, d]), 0) as tf.Tensor2D[]).map((x) => this.state.hold(x)));
      });
    }
    return t;
  }

  /**
   * Overwrites a full reconstruction [T, H_kv, d] with the exact outlier and local rows: what sparse
   * attention sees when its budget covers every chunk. Returns a new tensor.
   */
  patchExact(layer: number, full: tf.Tensor3D, kind: 'k' | 'v'): tf.Tensor3D {
    const t = this.tensors(layer);
    if (t.exactIdx.shape[0] === 0) return full;
    return tf.tidy(() => tf.tensorScatterUpdate(full, t.exactIdx, kind === 'k' ? t.exactK : t.exactV) as tf.Tensor3D);
  }

  /**
   * Chunk scores per KV head, [H_kv, C]: for each query row, softmax over the non-outlier chunks of
   * q·landmark/√d; summed over the n query tokens; the maximum over the g query heads of the GQA
   * group (ShadowKV's `get_retrieval_position_ids`; xKV-SR likewise). Outlier chunks score −1e30.
   */
  chunkScores(layer: number, qb: QueryBlocks): tf.Tensor2D {
    const t = this.loopTensors(layer);
    const C = this.index.chunks;
    return tf.tidy(() => {
      const H = t.lt.length;
      let a = tf.stack(t.lt.map((lt, h) => tf.matMul(qb.rows[h], lt)), 0) as tf.Tensor3D; // [H_kv, g·n, C]
      if (t.mask) a = tf.add(a, t.mask);
      const p = tf.reshape(tf.softmax(a, -1), [H, qb.g, qb.n, C]);
      const score = tf.max(tf.sum(p, 2), 1) as tf.Tensor2D;
      // Outlier chunks (already exact) stay below every candidate even when the candidates' mass underflows to 0.
      return t.mask ? (tf.add(score, tf.reshape(t.mask, [H, C])) as tf.Tensor2D) : score;
    });
  }

  /** Number of chunks selected per KV head for a token budget: min(⌊budget / c⌋, C − O). */
  selectedChunks(budget: number): number {
    return Math.max(0, Math.min(Math.floor(budget / this.index.chunkSize), this.index.chunks - this.index.outliers));
  }

  /** The selected chunk indices per KV head, [H_kv, k] int32 (highest score first). */
  selectChunks(layer: number, qb: QueryBlocks, budget: number): tf.Tensor2D | null {
    const k = this.selectedChunks(budget);
    if (k === 0) return null;
    return tf.tidy(() => tf.topk(this.chunkScores(layer, qb), k).indices as tf.Tensor2D);
  }

  /** Rows of src [T, R] at the tokens of the given chunks (c consecutive rows each), [k·c, R]. */
  private gatherChunks(src: tf.Tensor2D, chunks: Int32Array | tf.Tensor1D, useHost: boolean): tf.Tensor2D {
    const c = this.index.chunkSize;
    const R = src.shape[1];
    if (useHost && chunks instanceof Int32Array) {
      const view = (tf.backend() as unknown as { typedArrayFromHeap(t: tf.Tensor): Float32Array }).typedArrayFromHeap(src);
      const need = chunks.length * c * R;
      if (this.scratch.length < need) this.scratch = new Float32Array(need);
      const out = this.scratch;
      for (let i = 0; i < chunks.length; i++) out.set(view.subarray(chunks[i] * c * R, (chunks[i] + 1) * c * R), i * c * R);
      // The wasm backend copies the values into its heap at creation, so the scratch is reusable.
      return tf.tensor2d(out.subarray(0, need), [chunks.length * c, R]);
    }
    return tf.tidy(() => {
      const ch = chunks instanceof Int32Array ? tf.tensor1d(chunks, 'int32') : chunks;
      const tok = tf.reshape(tf.add(tf.reshape(tf.mul(ch, tf.scalar(c, 'int32')), [-1, 1]), tf.reshape(tf.range(0, c, 1, 'int32'), [1, c])), [-1]);
      return tf.gather(src, tok) as tf.Tensor2D;
    });
  }

  /**
   * Sparse attention of post-RoPE queries q [n, H, d] over one layer (see the file comment): per KV
   * head, the top chunks by landmark score up to the budget, their keys rebuilt as
   * RoPE(U_k[rows]·B_k[:, h]) at their positions and their values in the compressed domain
   * ((p·U_v[rows])·B_v[:, h]) or rebuilt (by flop count), plus the head's exact outlier and local
   * tokens and the exact residual decode tokens, under one softmax. Returns [n, H, d].
   * When the causal mask reaches into the prefill (the queries' own tokens are prefill tokens and
   * n > 1) it falls back to core attention over the full representation (keys()/values()).
   */
  attend(
    layer: number,
    q: tf.Tensor3D,
    tail: number,
    residual: { k: tf.Tensor3D; v: tf.Tensor3D } | null,
    full: () => { k: tf.Tensor3D; v: tf.Tensor3D },
    opts: SparseAttendOptions = {},
  ): tf.Tensor3D {
    const src = this.state.src;
    const { nKvHeads: Hkv, headDim: d } = src.layout;
    const F = Hkv * d;
    const nDec = residual ? residual.k.shape[0] : 0;
    const budget = opts.budget ?? this.index.options.budget;
    check(
      Number.isInteger(budget) && budget > 0 && budget % this.index.chunkSize === 0,
      'config',
      `sparse attend: budget ${budget} must be a positive multiple of chunkSize ${this.index.chunkSize}`,
    );
    if (causalParts(q.shape[0], src.prefillLength, nDec, tail).pre) {
      return tf.tidy(() => {
        const { k, v } = full();
        return attention(q, k, v, tail);
      });
    }
    const heads = opts.heads ?? 'auto';
    check(heads === 'auto' || heads === 'loop' || heads === 'batched', 'config', `sparse attend: heads must be 'auto', 'loop' or 'batched', got ${String(heads)}`);
    const kernels = opts.kernels ?? 'auto';
    check(kernels === 'auto' || kernels === 'tfjs' || kernels === 'wgsl', 'config', `sparse attend: kernels must be 'auto', 'tfjs' or 'wgsl', got ${String(kernels)}`);
    check(kernels !== 'wgsl' || heads !== 'loop', 'config', "sparse attend: kernels: 'wgsl' is a batched path (it needs heads: 'batched' or 'auto', not 'loop')");
    check(kernels !== 'wgsl' || opts.values === undefined || opts.values === 'compressed', 'config', "sparse attend: kernels: 'wgsl' computes values in the compressed domain (values: 'reconstruct' needs kernels: 'tfjs')");
    if (heads === 'batched' || (heads === 'auto' && !isHostBackend())) {
      check(opts.gather !== 'host', 'config', "sparse attend: the batched path gathers on the device (gather: 'host' needs heads: 'loop')");
      const webgpu = isWebGpuBackend();
      const { nKvHeads, headDim } = this.state.src.layout;
      const fits = webgpu && wgslStepFits(q.shape[1] / nKvHeads, headDim, this.state.src.basisOf('v', layer).shape[1], this.index.chunks, wgslWorkgroupStorageLimit());
      const wgslOk = webgpu && q.shape[0] === 1 && this.exactPerHead > 0 && this.selectedChunks(budget) > 0 && fits;
      check(
        kernels !== 'wgsl' || wgslOk,
        'unsupported',
        `sparse attend: WGSL kernels need the webgpu backend (now ${tf.getBackend()}), one query token (got ${q.shape[0]}), exact rows, a budget of at least one chunk, ` +
          `and arrays that fit the device's workgroup memory and WGSL's 8 KiB per-invocation variables (${fits ? 'they do' : 'they do not'})`,
      );
      if (kernels === 'wgsl' || (kernels === 'auto' && wgslOk && (opts.values ?? 'compressed') === 'compressed')) return this.attendWgsl(layer, q, residual, budget);
      return this.attendBatched(layer, q, tail, residual, budget, opts.values ?? 'auto');
    }
    const t = this.loopTensors(layer);
    const useHost = (opts.gather ?? 'auto') === 'host' || ((opts.gather ?? 'auto') === 'auto' && tf.getBackend() === 'wasm');
    check(!useHost || tf.getBackend() === 'wasm', 'unsupported', `sparse attend: host gathers need the wasm backend, not ${tf.getBackend()}`);
    return tf.tidy(() => {
      const qb = queryBlocks(q, src.layout, this.state.pairSwap());
      const { n, H, g } = qb;
      const gn = g * n;
      const masks = causalParts(n, src.prefillLength, nDec, tail);
      const sel = this.selectChunks(layer, qb, budget); // [H_kv, k] int32
      const hostChunks = sel && useHost ? (sel.dataSync() as Int32Array) : null;
      const perHeadChunks = sel && !useHost ? (Hkv === 1 ? [tf.reshape(sel, [-1]) as tf.Tensor1D] : (tf.unstack(sel, 0) as tf.Tensor1D[])) : null;
      const k = sel ? sel.shape[1] : 0;
      const S = k * this.index.chunkSize;
      const { cos, sin } = this.state.tables();
      const Uk = src.basisOf('k', layer);
      const Uv = src.basisOf('v', layer);
      const Bh = this.state.headFactors('k', layer);
      const Bvh = this.state.headFactors('v', layer);
      const Rv = Uv.shape[1];
      const path = sparseValuePath(opts.values ?? 'auto', gn, S, Rv, d);
      // Residual (exact decode) tokens: scores for all heads at once through the block-diagonal queries.
      const Sres = nDec > 0 ? addRowMask(tf.transpose(tf.matMul(tf.reshape(residual!.k, [nDec, F]) as tf.Tensor2D, qb.blockDiag)) as tf.Tensor2D, masks.res, n) : null;
      const resRows = Sres ? (Hkv === 1 ? [Sres] : (tf.split(Sres, Hkv, 0) as tf.Tensor2D[])) : null;
      const outs: tf.Tensor2D[] = [];
      const zs: tf.Tensor2D[] = [];
      const eres: tf.Tensor2D[] = [];
      for (let h = 0; h < Hkv; h++) {
        const parts: tf.Tensor2D[] = []; // [g·n, ·] score blocks: selected, exact, residual
        let Uvs: tf.Tensor2D | null = null;
        if (S > 0) {
          const ch = hostChunks ? hostChunks.subarray(h * k, (h + 1) * k) : perHeadChunks![h];
          const Us = this.gatherChunks(Uk, ch, useHost);
          const cs = this.gatherChunks(cos, ch, useHost);
          const sn = this.gatherChunks(sin, ch, useHost);
          parts.push(ropeScores(tf.matMul(Us, Bh[h]), cs, sn, qb, h)); // keys at their positions, never materialized
          Uvs = this.gatherChunks(Uv, ch, useHost);
        }
        if (this.exactPerHead > 0) parts.push(tf.transpose(tf.matMul(t.kx[h], qb.cols[h])) as tf.Tensor2D);
        if (resRows) parts.push(resRows[h]);
        let m = tf.max(parts[0], 1, true);
        for (let i = 1; i < parts.length; i++) m = tf.maximum(m, tf.max(parts[i], 1, true));
        const E = parts.map((s) => tf.exp(tf.sub(s, m)) as tf.Tensor2D);
        zs.push(E.reduce((acc, e) => tf.add(acc, tf.sum(e, 1, true)) as tf.Tensor2D, tf.zeros([gn, 1]) as tf.Tensor2D));
        let o = tf.zeros([gn, d]) as tf.Tensor2D;
        let i = 0;
        if (S > 0) {
          const Es = E[i++];
          o = tf.add(o, path === 'compressed' ? tf.matMul(tf.matMul(Es, Uvs!), Bvh[h]) : tf.matMul(Es, tf.matMul(Uvs!, Bvh[h]))) as tf.Tensor2D;
        }
        if (this.exactPerHead > 0) o = tf.add(o, tf.matMul(E[i++], t.vx[h])) as tf.Tensor2D;
        if (resRows) eres.push(E[i++]);
        outs.push(o);
      }
      let O = Hkv === 1 ? outs[0] : (tf.concat(outs, 0) as tf.Tensor2D); // [H·n, d]
      const z = Hkv === 1 ? zs[0] : (tf.concat(zs, 0) as tf.Tensor2D);
      if (eres.length) {
        const Er = Hkv === 1 ? eres[0] : (tf.concat(eres, 0) as tf.Tensor2D);
        O = tf.add(O, ownHeadBlock(tf.matMul(Er, tf.reshape(residual!.v, [nDec, F]) as tf.Tensor2D), qb, d)) as tf.Tensor2D;
      }
      return tf.transpose(tf.reshape(tf.div(O, z), [H, n, d]), [1, 0, 2]) as tf.Tensor3D;
    });
  }

  /**
   * One query token's sparse step on the webgpu backend in 8 dispatches (see sparse-wgsl.ts): the same
   * selection, scores and softmax as {@link attendBatched}, values in the compressed domain. A single
   * query token is never causally masked (the residual rows all precede it).
   */
  private attendWgsl(layer: number, q: tf.Tensor3D, residual: { k: tf.Tensor3D; v: tf.Tensor3D } | null, budget: number): tf.Tensor3D {
    const src = this.state.src;
    const { nKvHeads: Hkv, headDim: d } = src.layout;
    const t = this.tensors(layer);
    const c = this.index.chunkSize;
    const C = this.index.chunks;
    const E0 = this.exactPerHead;
    const k = this.selectedChunks(budget);
    return tf.tidy(() => {
      const H = q.shape[1];
      const g = H / Hkv;
      const qh = tf.reshape(tf.mul(q, 1 / Math.sqrt(d)), [Hkv, g, d]) as tf.Tensor3D;
      const mask = t.mask ? (tf.reshape(t.mask, [Hkv, C]) as tf.Tensor2D) : null;
      const tok = selectChunkTokens(qh, t.ltAll, mask, k, c); // [H_kv, S]
      const S = k * c;
      const Uk = src.basisOf('k', layer);
      const y = tf.matMul(tf.reshape(tf.gather(Uk, tf.reshape(tok, [-1])), [Hkv, S, Uk.shape[1]]), this.state.stackedHeadFactors('k', layer)) as tf.Tensor3D;
      const { cos, sin } = this.state.tables();
      const ss = ropeScoresWgsl(qh, y, tok, cos, sin, src.rope.layout === 'interleaved');
      let kx = tf.reshape(t.exactK, [Hkv, E0, d]) as tf.Tensor3D;
      let vx = tf.reshape(t.exactV, [Hkv, E0, d]) as tf.Tensor3D;
      if (residual && residual.k.shape[0] > 0) {
        kx = tf.concat([kx, tf.transpose(residual.k, [1, 0, 2])], 1) as tf.Tensor3D;
        vx = tf.concat([vx, tf.transpose(residual.v, [1, 0, 2])], 1) as tf.Tensor3D;
      }
      const p = softmaxExactWgsl(ss, qh, kx);
      const o = valuesWgsl(p, tok, src.basisOf('v', layer), this.state.stackedHeadFactors('v', layer), vx);
      return tf.reshape(o, [1, H, d]) as tf.Tensor3D;
    });
  }

  /**
   * The batched form of {@link attend} (every KV head in the same kernels; see
   * {@link SparseAttendOptions.heads}): chunk scores [H_kv, g·n, C] from the stacked landmarks, top-k
   * chunks per head, ONE gather of all heads' selected basis rows and RoPE table rows ([H_kv·S]), keys
   * rebuilt as [H_kv, S, R]·[H_kv, R, d], scores against the queries and their pair swap (RoPE moved to
   * the queries as in {@link ropeScores}), the exact and residual scores, one softmax over
   * [H_kv, g·n, S + E₀ + n_dec], and values as (p·U_v[rows])·B_v (or p·(U_v[rows]·B_v), by flop count).
   * Same result as the loop path up to float32 rounding (tested).
   */
  private attendBatched(
    layer: number,
    q: tf.Tensor3D,
    tail: number,
    residual: { k: tf.Tensor3D; v: tf.Tensor3D } | null,
    budget: number,
    values: ValuePath,
  ): tf.Tensor3D {
    const src = this.state.src;
    const { nKvHeads: Hkv, headDim: d } = src.layout;
    const t = this.tensors(layer);
    const c = this.index.chunkSize;
    const C = this.index.chunks;
    const E0 = this.exactPerHead;
    const nDec = residual ? residual.k.shape[0] : 0;
    return tf.tidy(() => {
      const [n, H] = q.shape;
      const g = H / Hkv;
      const gn = g * n;
      const masks = causalParts(n, src.prefillLength, nDec, tail);
      const qh = tf.reshape(tf.mul(tf.transpose(q, [1, 0, 2]), 1 / Math.sqrt(d)), [Hkv, gn, d]) as tf.Tensor3D; // row ii·n + j
      const k = this.selectedChunks(budget);
      const S = k * c;
      const parts: tf.Tensor3D[] = []; // score blocks [H_kv, g·n, ·]: selected, exact, residual
      let tok: tf.Tensor1D | null = null;
      if (S > 0) {
        let a = tf.matMul(qh, t.ltAll) as tf.Tensor3D; // [H_kv, g·n, C]
        if (t.mask) a = tf.add(a, t.mask);
        const p = tf.softmax(a, -1);
        let score = tf.max(n === 1 ? tf.reshape(p, [Hkv, g, C]) : tf.sum(tf.reshape(p, [Hkv, g, n, C]), 2), 1); // [H_kv, C]
        if (t.mask) score = tf.add(score, tf.reshape(t.mask, [Hkv, C])); // outliers never selected (see chunkScores)
        const sel = tf.topk(score, k).indices; // [H_kv, k]
        tok = tf.reshape(tf.add(tf.reshape(tf.mul(sel, tf.scalar(c, 'int32')), [Hkv, k, 1]), tf.reshape(tf.range(0, c, 1, 'int32'), [1, 1, c])), [-1]) as tf.Tensor1D;
        const Uk = src.basisOf('k', layer);
        const Y = tf.matMul(tf.reshape(tf.gather(Uk, tok), [Hkv, S, Uk.shape[1]]), this.state.stackedHeadFactors('k', layer)); // pre-RoPE rows [H_kv, S, d]
        const { cos, sin } = this.state.tables();
        const cs = tf.reshape(tf.gather(cos, tok), [Hkv, S, d]);
        const sn = tf.reshape(tf.gather(sin, tok), [Hkv, S, d]);
        const qsw = tf.reshape(tf.matMul(tf.reshape(qh, [Hkv * gn, d]) as tf.Tensor2D, this.state.pairSwap(), false, true), [Hkv, gn, d]); // rows (P·q)ᵀ
        parts.push(tf.add(tf.matMul(qh, tf.mul(Y, cs), false, true), tf.matMul(qsw, tf.mul(Y, sn), false, true)) as tf.Tensor3D);
      }
      if (E0 > 0) parts.push(tf.matMul(qh, tf.reshape(t.exactK, [Hkv, E0, d]), false, true) as tf.Tensor3D);
      let Vres: tf.Tensor3D | null = null;
      if (nDec > 0) {
        let sr = tf.matMul(qh, tf.transpose(residual!.k, [1, 0, 2]), false, true) as tf.Tensor3D; // [H_kv, g·n, n_dec]
        if (masks.res) sr = tf.reshape(tf.add(tf.reshape(sr, [Hkv, g, n, nDec]), tf.tensor4d(masks.res, [1, 1, n, nDec])), [Hkv, gn, nDec]);
        parts.push(sr);
        Vres = tf.transpose(residual!.v, [1, 0, 2]) as tf.Tensor3D;
      }
      const all = parts.length === 1 ? parts[0] : (tf.concat(parts, 2) as tf.Tensor3D);
      const e = tf.exp(tf.sub(all, tf.max(all, 2, true))) as tf.Tensor3D;
      const z = tf.sum(e, 2, true);
      const sizes = [S, E0, nDec].filter((x) => x > 0);
      const E = sizes.length === 1 ? [e] : (tf.split(e, sizes, 2) as tf.Tensor3D[]);
      let i = 0;
      let o: tf.Tensor3D | null = null;
      const add = (x: tf.Tensor3D) => (o = o ? (tf.add(o, x) as tf.Tensor3D) : x);
      if (S > 0) {
        const Uv = src.basisOf('v', layer);
        const Rv = Uv.shape[1];
        const Uvs = tf.reshape(tf.gather(Uv, tok!), [Hkv, S, Rv]) as tf.Tensor3D;
        const Bv = this.state.stackedHeadFactors('v', layer);
        const compressed = sparseValuePath(values, gn, S, Rv, d) === 'compressed';
        add(compressed ? (tf.matMul(tf.matMul(E[i++], Uvs), Bv) as tf.Tensor3D) : (tf.matMul(E[i++], tf.matMul(Uvs, Bv)) as tf.Tensor3D));
      }
      if (E0 > 0) add(tf.matMul(E[i++], tf.reshape(t.exactV, [Hkv, E0, d])) as tf.Tensor3D);
      if (nDec > 0) add(tf.matMul(E[i++], Vres!) as tf.Tensor3D);
      return tf.transpose(tf.reshape(tf.div(o!, z), [H, n, d]), [1, 0, 2]) as tf.Tensor3D;
    });
  }
}
