import * as tf from '@tensorflow/tfjs-core';
import {
  BaseCompressedCache,
  KvpackError,
  check,
  restoreStored,
  denseCacheBytes,
  isHostBackend,
  matmul,
  roundToHalf,
  specBytes,
  storeTensor,
  truncatedSvd,
  validateKVCache,
  type CompressedCache,
  type KVCache,
  type ModelLayout,
  type RopeConfig,
  type StoredItem,
  type StoredSpec,
  type Orthogonalization,
  type AttendOptions,
} from '@kvpack/core';
import { DecodeState, attendFull, queryBlocks, type ValuePath } from './decode.js';
import { SparseDecoder, buildSparseIndex, loadSparseIndex, sparseMeta, sparseSpecs, sparseTensors, type SparseAttendOptions, type SparseIndex, type SparseOptions } from './sparse.js';
import { dequantizeMatrix, quantizeMatrix, quantizedSpecs, quantizedTensors, readQuantized, type QuantSpec, type QuantizedMatrix } from '../quant/quantize.js';
import { paperCompressionRatio } from './ratio.js';

/** Which stored factors {@link FactorQuantization} applies to. */
export type QuantTarget = 'basis' | 'factors' | 'both';

/** Group-wise int8/int4 quantization of the stored low-rank factors (see `quant.ts`). */
export interface FactorQuantization extends QuantSpec {
  /**
   * `basis`: the shared token bases [T, R] (what the xKV authors quantize); `factors`: the per-layer
   * [R, H_kv·d] factors; `both`.
   */
  apply: QuantTarget;
}

/**
 * Settings of the grouped low-rank machinery shared by `xkv` (G ≥ 1) and the per-layer `svd`
 * baseline (G = 1).
 */
export interface GroupSvdConfig {
  /** Layers per group G; consecutive layers from layer 0, the last group may be shorter. */
  groupSize: number;
  /** Per-layer key rank r_K; a group of n layers gets rank r_K · n. */
  rankK: number;
  /** Per-layer value rank r_V; a group of n layers gets rank r_V · n. */
  rankV: number;
  /** Randomized SVD oversampling p (Halko et al. 2011), or `auto` (core `autoOversample` of the group rank). */
  oversample: number | 'auto';
  /** Randomized SVD power iterations q (a multiple of 0.5). */
  powerIters: number;
  /** Seed of the randomized SVD's Gaussian test matrix. */
  seed: number;
  /** Exact truncated SVD instead of the randomized one. */
  exact: boolean;
  /** Where the randomized SVD's k×k orthonormalizations run (core `Orthogonalization`; default `auto`). */
  orthogonalization?: Orthogonalization;
  /** Storage of factors that are not quantized. */
  storage: 'float16' | 'float32';
  /** Optional quantization of the factors. */
  factorQuantization?: FactorQuantization;
  /** Decode mode of `attend` (default `full`); `sparse` stores the sparse index at compress time (sparse.ts). */
  decode?: 'full' | 'sparse';
  /** Sparse decode settings; used when `decode` is `sparse`. */
  sparse?: SparseOptions;
}

/** A group of consecutive layers sharing one token basis. */
export interface LayerGroup {
  index: number;
  /** Layer indices, consecutive. */
  layers: number[];
}

/** Consecutive groups of `groupSize` layers from layer 0; the last one holds the remainder. */
export function layerGroups(nLayers: number, groupSize: number): LayerGroup[] {
  check(Number.isInteger(groupSize) && groupSize >= 1, 'config', `groupSize must be a positive integer, got ${groupSize}`);
  const out: LayerGroup[] = [];
  for (let s = 0, g = 0; s < nLayers; s += groupSize, g++) {
    out.push({ index: g, layers: Array.from({ length: Math.min(groupSize, nLayers - s) }, (_, i) => s + i) });
  }
  return out;
}

/** Keys or values. */
export type Kind = 'k' | 'v';
const KINDS: Kind[] = ['k', 'v'];

/** One stored matrix: its values as held on the backend, and its quantized form when quantized. */
interface Block {
  name: string;
  rows: number;
  cols: number;
  /** float32 values equal to what deserialization restores, [rows, cols]. */
  tensor: tf.Tensor2D;
  quant: QuantizedMatrix | null;
}

/** Byte breakdown and ratios of a grouped low-rank cache; see {@link GroupSvdCache.stats}. */
export interface GroupSvdStats {
  strategy: string;
  /** Prefill tokens T. */
  tokens: number;
  groupSize: number;
  groups: { layers: number[]; rankK: number; rankV: number }[];
  /** Bytes of the shared token bases (codes + scales + zero points when quantized). */
  basisBytes: number;
  /** Bytes of the per-layer factors. */
  factorBytes: number;
  /** Bytes of the exact decode-token buffer. */
  residualBytes: number;
  /** basisBytes + factorBytes + residualBytes = byteSize(). */
  totalBytes: number;
  /** Bytes of the fp16 dense cache of the prefill: `denseCacheBytes(layout, T)`. */
  denseBytes: number;
  /** denseBytes / totalBytes. */
  measuredRatio: number;
  /** The xKV authors' formula ({@link paperCompressionRatio}) at 16 bits per element. */
  paperRatio: number;
}

function rankOf(config: GroupSvdConfig, kind: Kind, group: LayerGroup): number {
  return (kind === 'k' ? config.rankK : config.rankV) * group.layers.length;
}

/**
 * Checks every group's key and value rank against min(T, features) before any work.
 * @throws KvpackError('rank') naming the group, its rank and the bound.
 */
export function checkGroupRanks(strategy: string, config: GroupSvdConfig, layout: ModelLayout, T: number): void {
  const F = layout.nKvHeads * layout.headDim;
  for (const g of layerGroups(layout.nLayers, config.groupSize)) {
    for (const kind of KINDS) {
      const per = kind === 'k' ? config.rankK : config.rankV;
      const r = rankOf(config, kind, g);
      const feats = g.layers.length * F;
      const bound = Math.min(T, feats);
      const what = kind === 'k' ? 'key' : 'value';
      check(
        Number.isInteger(per) && r >= 1 && r <= bound,
        'rank',
        () =>
          `${strategy}: group ${g.index} (layers ${g.layers[0]}–${g.layers[g.layers.length - 1]}) ${what} rank ${r} ` +
          `(rank${kind.toUpperCase()} ${per} × ${g.layers.length} layers) is out of range [1, min(T=${T}, features=${feats}) = ${bound}]`,
      );
    }
  }
}

function quantFor(config: GroupSvdConfig, part: 'basis' | 'factors'): QuantSpec | null {
  const q = config.factorQuantization;
  if (!q || (q.apply !== 'both' && q.apply !== part)) return null;
  return { bits: q.bits, groupSize: q.groupSize, symmetric: q.symmetric };
}

/** Makes a stored block from float32 values: quantizes, or rounds through float16, as configured. Takes ownership of `x`. */
async function makeBlock(name: string, x: tf.Tensor2D, config: GroupSvdConfig, part: 'basis' | 'factors'): Promise<Block> {
  const [rows, cols] = x.shape;
  const spec = quantFor(config, part);
  if (spec) {
    const quant = quantizeMatrix((await x.data()) as Float32Array, rows, cols, spec);
    x.dispose();
    return { name, rows, cols, tensor: tf.tensor2d(dequantizeMatrix(quant), [rows, cols]), quant };
  }
  if (config.storage === 'float16') {
    const t = (await roundToHalf(x)) as tf.Tensor2D;
    x.dispose();
    return { name, rows, cols, tensor: t, quant: null };
  }
  return { name, rows, cols, tensor: x, quant: null };
}

function blockSpecs(b: Block, storage: 'float16' | 'float32'): StoredSpec[] {
  return b.quant ? quantizedSpecs(b.name, b.quant) : [{ name: b.name, dtype: storage, shape: [b.rows, b.cols] }];
}

/** The stored matrices of one kind (keys or values). */
interface KindBlocks {
  /** Shared token basis per group, [T, R_g]. */
  basis: Block[];
  /** Reconstruction factor per layer, [R_g, H_kv·d]. */
  factors: Block[];
}

/**
 * A KV cache compressed by grouped low-rank factorization (xKV, Chang et al. 2025, §3; with
 * G = 1 the per-layer "Single SVD" baseline). For each group g of layers and each of keys
 * (pre-RoPE) and values, X_g = [T, G·H_kv·d] ≈ U_g · [B_l₁ … B_l_G] with one shared token basis
 * U_g [T, R_g] and one factor B_l [R_g, H_kv·d] per layer. Keys of layer l are rebuilt as
 * RoPE(U_g · B_l) at positions startPosition…startPosition+T−1, values as U_g · B_l.
 *
 * Stored: U_g and B_l in float16 (or float32), or group-quantized when `factorQuantization` says so;
 * the singular values are split evenly (U·√Σ, √Σ·Vᵀ, by row norm) as the authors' `fake_svd` does.
 */
export class GroupSvdCache extends BaseCompressedCache {
  /** Layer groups, in order. */
  readonly groups: LayerGroup[];
  private readonly groupOf: number[];

  constructor(
    readonly strategy: string,
    /** The strategy's options, recorded in the serialization. */
    readonly options: unknown,
    readonly config: GroupSvdConfig,
    layout: ModelLayout,
    rope: RopeConfig,
    prefillLength: number,
    /** Position of the first prefill token. */
    readonly startPosition: number,
    private readonly blocks: Record<Kind, KindBlocks>,
    /** The sparse-decode index (landmarks, outlier and local tokens) when `config.decode` is `sparse`. */
    readonly sparseIndex: SparseIndex | null = null,
  ) {
    super(layout, rope, prefillLength);
    this.groups = layerGroups(layout.nLayers, config.groupSize);
    this.groupOf = [];
    for (const g of this.groups) for (const l of g.layers) this.groupOf[l] = g.index;
    this.decodeState = new DecodeState({
      layout,
      rope,
      prefillLength,
      startPosition,
      basisOf: (kind, l) => this.blocks[kind].basis[this.groupOf[l]].tensor,
      factorOf: (kind, l) => this.blocks[kind].factors[l].tensor,
    });
    this.sparseDecoder = sparseIndex ? new SparseDecoder(this.decodeState, sparseIndex) : null;
    if (this.sparseDecoder) {
      this.attendSparse = (layer, queries, options = {}) => this.runAttend(layer, queries, options, 'sparse');
    }
  }

  /** Derived decode tensors (RoPE tables, pair swap, per-head factors); freed with the cache. */
  private readonly decodeState: DecodeState;
  private readonly sparseDecoder: SparseDecoder | null;

  /**
   * Sparse attention (xKV-SR; see sparse.ts) with per-call options — present only on caches compressed
   * with `decode: 'sparse'` (they hold the landmarks). q [n, H, d] post-RoPE → [n, H, d].
   */
  readonly attendSparse?: (layer: number, queries: tf.Tensor3D, options?: AttendOptions & SparseAttendOptions) => tf.Tensor3D;

  /** Rank R_g of a group's keys or values (per-layer rank × layers in the group). */
  groupRank(kind: Kind, group: number): number {
    return rankOf(this.config, kind, this.groups[group]);
  }

  /** A copy of a group's stored token basis U_g, [T, R_g] float32 (dequantized / fp16-rounded values). */
  basis(kind: Kind, group: number): tf.Tensor2D {
    this.assertLive();
    check(Number.isInteger(group) && group >= 0 && group < this.groups.length, 'shape', `group ${group} is out of range [0, ${this.groups.length})`);
    return tf.clone(this.blocks[kind].basis[group].tensor);
  }

  /** A copy of a layer's stored factor B_l, [R_g, H_kv·d] float32. */
  factor(kind: Kind, layer: number): tf.Tensor2D {
    this.assertLive(layer);
    return tf.clone(this.blocks[kind].factors[layer].tensor);
  }

  /** The quantized form of a stored matrix, or null when it is not quantized. */
  quantized(kind: Kind, part: 'basis' | 'factor', index: number): QuantizedMatrix | null {
    this.assertLive();
    return (part === 'basis' ? this.blocks[kind].basis : this.blocks[kind].factors)[index].quant;
  }

  private rebuild(kind: Kind, layer: number): tf.Tensor3D {
    const { nKvHeads, headDim } = this.layout;
    const U = this.blocks[kind].basis[this.groupOf[layer]].tensor;
    const B = this.blocks[kind].factors[layer].tensor;
    return tf.tidy(() => tf.reshape(matmul(U, B), [this.prefillLength, nKvHeads, headDim]) as tf.Tensor3D);
  }

  /**
   * Post-RoPE keys RoPE(U_g·B_l), fused: (U·B)∘cos + (U·B)·P∘sin with cached tables (decode.ts). In
   * sparse mode the exact outlier and local tokens replace their rebuilt rows.
   */
  protected prefillKeys(layer: number): tf.Tensor3D {
    const k = this.decodeState.keys(layer);
    return this.sparseDecoder ? this.patch(layer, k, 'k') : k;
  }

  /** Values U_g·B_l (sparse mode: exact outlier and local rows in place). */
  protected prefillValues(layer: number): tf.Tensor3D {
    const v = this.decodeState.values(layer);
    return this.sparseDecoder ? this.patch(layer, v, 'v') : v;
  }

  private patch(layer: number, full: tf.Tensor3D, kind: Kind): tf.Tensor3D {
    const out = this.sparseDecoder!.patchExact(layer, full, kind);
    if (out !== full) full.dispose();
    return out;
  }

  /**
   * Attention of post-RoPE queries q [n, H, d] over every cached token of a layer (prefill and
   * decode tokens), in the cache's decode mode: `full` — every key scored at its position (the RoPE
   * rotation moved to the queries), values in the compressed domain when cheaper ({@link attendFull}); `sparse` — landmark-selected chunks up to the
   * token budget plus the exact outlier, local and decode tokens ({@link SparseDecoder.attend}).
   * `causalTail` (default n): the last causalTail cached tokens are the queries' own.
   * Returns [n, H, d].
   * @throws KvpackError('shape') when q is not [n, H, d] of this layout or causalTail is out of range.
   */
  attend(layer: number, queries: tf.Tensor3D, options?: AttendOptions): tf.Tensor3D {
    return this.runAttend(layer, queries, options ?? {}, this.sparseDecoder ? 'sparse' : 'full');
  }

  /** {@link attend} with a forced value path (tests, benchmarks); full mode only unless the cache is sparse. */
  attendWith(layer: number, queries: tf.Tensor3D, options: AttendOptions & SparseAttendOptions & { mode?: 'full' | 'sparse' }): tf.Tensor3D {
    return this.runAttend(layer, queries, options, options.mode ?? (this.sparseDecoder ? 'sparse' : 'full'));
  }

  /**
   * The chunks sparse attention would select for queries q [n, H, d] at a layer: per KV head, the
   * chunk indices (ascending; chunk i = prefill tokens i·c … i·c + c − 1). For tests and inspection.
   * @throws KvpackError('unsupported') when the cache was not compressed with decode: 'sparse'.
   */
  sparseSelection(layer: number, queries: tf.Tensor3D, budget?: number): number[][] {
    this.assertLive(layer);
    check(this.sparseDecoder, 'unsupported', `${this.strategy}: sparseSelection needs a cache compressed with decode: 'sparse'`);
    const dec = this.sparseDecoder;
    const k = dec.selectedChunks(budget ?? dec.index.options.budget);
    if (k === 0) return Array.from({ length: this.layout.nKvHeads }, () => []);
    const sel = tf.tidy(() => dec.selectChunks(layer, queryBlocks(queries, this.layout, this.decodeState.pairSwap()), budget ?? dec.index.options.budget)!);
    const H = sel.shape[0];
    const data = sel.dataSync();
    sel.dispose();
    return Array.from({ length: H }, (_, h) => Array.from(data.subarray(h * k, (h + 1) * k)).sort((a, b) => a - b));
  }

  private runAttend(layer: number, q: tf.Tensor3D, options: AttendOptions & SparseAttendOptions, mode: 'full' | 'sparse'): tf.Tensor3D {
    this.assertLive(layer);
    const { nHeads, headDim } = this.layout;
    check(
      q instanceof tf.Tensor && q.rank === 3 && q.shape[0] >= 1 && q.shape[1] === nHeads && q.shape[2] === headDim && q.dtype === 'float32',
      'shape',
      () => `${this.strategy} attend(layer ${layer}): queries must be float32 [n, ${nHeads}, ${headDim}], got ${q?.dtype} [${q?.shape}]`,
    );
    const N = this.tokenCount(layer);
    const tail = options.causalTail ?? q.shape[0];
    check(Number.isInteger(tail) && tail >= 0 && tail <= N, 'shape', `${this.strategy} attend(layer ${layer}): causalTail ${tail} is out of range [0, ${N}]`);
    const residual = this.residual(layer);
    if (mode === 'sparse') {
      check(this.sparseDecoder, 'unsupported', `${this.strategy} attend: sparse mode needs a cache compressed with decode: 'sparse'`);
      return this.sparseDecoder.attend(layer, q, tail, residual, () => ({ k: this.keys(layer), v: this.values(layer) }), options);
    }
    return attendFull(this.decodeState, layer, q, tail, residual, (options.values ?? 'auto') as ValuePath);
  }

  /** Pre-RoPE keys of one layer as reconstructed, [T, H_kv, d] (for error measurement). */
  preRopeKeys(layer: number): tf.Tensor3D {
    this.assertLive(layer);
    return this.rebuild('k', layer);
  }

  private allBlocks(): Block[] {
    return KINDS.flatMap((k) => [...this.blocks[k].basis, ...this.blocks[k].factors]);
  }

  protected stored(): StoredItem[] {
    const items = this.allBlocks().flatMap((b): StoredItem[] => (b.quant ? quantizedTensors(b.name, b.quant) : [{ name: b.name, tensor: b.tensor, dtype: this.config.storage }]));
    return this.sparseIndex ? [...items, ...sparseTensors(this.sparseIndex, this.layout)] : items;
  }

  protected meta(): Record<string, unknown> {
    return {
      startPosition: this.startPosition,
      groupSize: this.config.groupSize,
      ranks: { k: this.groups.map((g) => this.groupRank('k', g.index)), v: this.groups.map((g) => this.groupRank('v', g.index)) },
      ...(this.sparseIndex ? { sparse: sparseMeta(this.sparseIndex) } : {}),
    };
  }

  protected disposeStored(): void {
    this.decodeState.dispose();
    tf.dispose(this.allBlocks().map((b) => b.tensor));
  }

  /**
   * Bytes (basis / factors / residual) and the measured compression ratio next to the xKV paper's
   * formula ({@link paperCompressionRatio}).
   */
  stats(): GroupSvdStats {
    this.assertLive();
    const bytesOf = (bs: Block[]) => bs.flatMap((b) => blockSpecs(b, this.config.storage)).reduce((a, s) => a + specBytes(s), 0);
    const basisBytes = bytesOf(KINDS.flatMap((k) => this.blocks[k].basis));
    const factorBytes = bytesOf(KINDS.flatMap((k) => this.blocks[k].factors));
    const totalBytes = this.byteSize();
    const denseBytes = denseCacheBytes(this.layout, this.prefillLength);
    return {
      strategy: this.strategy,
      tokens: this.prefillLength,
      groupSize: this.config.groupSize,
      groups: this.groups.map((g) => ({ layers: [...g.layers], rankK: this.groupRank('k', g.index), rankV: this.groupRank('v', g.index) })),
      basisBytes,
      factorBytes,
      residualBytes: totalBytes - basisBytes - factorBytes,
      totalBytes,
      denseBytes,
      measuredRatio: denseBytes / totalBytes,
      paperRatio: paperCompressionRatio({
        layout: this.layout,
        tokens: this.prefillLength,
        groupSize: this.config.groupSize,
        rankK: this.config.rankK,
        rankV: this.config.rankV,
      }),
    };
  }

  /**
   * Restores a serialized cache written by {@link GroupSvdCache.serialize}.
   * @throws KvpackError('corrupt' | 'truncated') naming the strategy and the tensor at fault.
   */
  static fromBytes(bytes: Uint8Array, strategy: string, options: unknown, config: GroupSvdConfig): GroupSvdCache {
    return restoreStored(bytes, strategy, (r) => {
      const { layout, rope, prefillLength: T, startPosition, meta } = r.header;
      const F = layout.nKvHeads * layout.headDim;
      const groups = layerGroups(layout.nLayers, config.groupSize);
      const ranks = { k: groups.map((g) => rankOf(config, 'k', g)), v: groups.map((g) => rankOf(config, 'v', g)) };
      check(
        meta.groupSize === config.groupSize && JSON.stringify(meta.ranks) === JSON.stringify(ranks),
        'corrupt',
        `serialized ${strategy} cache was written with group size ${meta.groupSize} and group ranks ${JSON.stringify(meta.ranks)}, ` +
          `but these options give ${config.groupSize} and ${JSON.stringify(ranks)} (restore it with deserializeCache)`,
      );
      const load = (name: string, rows: number, cols: number, part: 'basis' | 'factors'): Block => {
        const spec = quantFor(config, part);
        if (!spec) return { name, rows, cols, tensor: r.tensor<tf.Tensor2D>(name, { dtype: config.storage, shape: [rows, cols] }), quant: null };
        const quant = readQuantized(r, name, rows, cols, spec);
        return { name, rows, cols, tensor: tf.tensor2d(dequantizeMatrix(quant), [rows, cols]), quant };
      };
      const blocks: Record<Kind, KindBlocks> = { k: { basis: [], factors: [] }, v: { basis: [], factors: [] } };
      for (const kind of KINDS) {
        for (const g of groups) {
          const R = rankOf(config, kind, g);
          blocks[kind].basis.push(load(`${kind}.basis.${g.index}`, T, R, 'basis'));
          for (const l of g.layers) blocks[kind].factors[l] = load(`${kind}.factor.${l}`, R, F, 'factors');
        }
      }
      const sparse = config.decode === 'sparse' ? loadSparseIndex(r, strategy, layout, T, config.sparse!) : null;
      return new GroupSvdCache(strategy, options, config, layout, rope, T, startPosition, blocks, sparse);
    });
  }
}

/** {@link GroupSvdCache.stats} of an `xkv` or `svd` cache; null for caches of other strategies. */
export function lowRankStats(cache: CompressedCache): GroupSvdStats | null {
  return cache instanceof GroupSvdCache ? cache.stats() : null;
}

/**
 * Compresses a prefill cache by grouped truncated SVD: per group of layers and per keys (pre-RoPE) /
 * values, X_g = [T, n·H_kv·d] (the group's layers' [T, H_kv·d] side by side) is factored by
 * `truncatedSvd` from @kvpack/core (randomized, or exact) at rank r · n.
 *
 * Shapes: cache.keys[l], cache.values[l] are [T, H_kv, d]; the result stores U_g [T, R_g] per group and
 * B_l [R_g, H_kv·d] per layer, for keys and for values. Does not dispose `cache`.
 * @throws KvpackError('layout' | 'shape' | 'dtype' | 'nonfinite') for a bad cache (from validateKVCache);
 *         KvpackError('rank') when a group's rank is 0 or above min(T, features).
 */
export async function compressGroupSvd(cache: KVCache, strategy: string, options: unknown, config: GroupSvdConfig): Promise<GroupSvdCache> {
  const T = await validateKVCache(cache);
  const layout = cache.layout;
  checkGroupRanks(strategy, config, layout, T);
  const F = layout.nKvHeads * layout.headDim;
  const groups = layerGroups(layout.nLayers, config.groupSize);
  const blocks: Record<Kind, KindBlocks> = { k: { basis: [], factors: [] }, v: { basis: [], factors: [] } };
  const live: tf.Tensor[] = [];
  try {
    for (const g of groups) {
      for (const kind of KINDS) {
        const src = kind === 'k' ? cache.keys : cache.values;
        // X_g = [X_l₁ … X_l_G] as column blocks, never concatenated (core truncatedSvd takes blocks; the
        // per-layer factors come back as its coefficient blocks). On wasm/cpu each block is a fresh copy:
        // the wasm backend keeps a packed copy of a product's right operand until that tensor's data is
        // freed, which for the cache's own tensors would be never during compression.
        const X = g.layers.map((l) => tf.tidy(() => (isHostBackend() ? tf.add(tf.reshape(src[l], [T, F]), 0) : tf.reshape(src[l], [T, F])) as tf.Tensor2D));
        live.push(...X);
        const R = rankOf(config, kind, g);
        const svd = await truncatedSvd(X, {
          rank: R,
          oversample: config.oversample,
          powerIters: config.powerIters,
          seed: config.seed,
          exact: config.exact,
          orthogonalization: config.orthogonalization,
        });
        live.push(svd.basis, ...svd.coeffs);
        tf.dispose(X);
        // Split Σ evenly between the basis and the factors (U·√Σ, √Σ·Vᵀ) by the factor rows' norms
        // (over all the group's layers), on the backend: no host round-trip between the SVD and the
        // stored factors.
        const [basis, ...factors] = tf.tidy(() => {
          const norms = tf.sqrt(tf.addN(svd.coeffs.map((c) => tf.sum(tf.square(c), 1))));
          const s = tf.where(tf.logicalAnd(tf.greater(norms, 0), tf.isFinite(norms)), tf.sqrt(norms), tf.onesLike(norms));
          const sr = tf.reshape(s, [R, 1]);
          return [tf.mul(svd.basis, tf.reshape(s, [1, R])) as tf.Tensor2D, ...svd.coeffs.map((c) => tf.div(c, sr) as tf.Tensor2D)];
        });
        tf.dispose([svd.basis, ...svd.coeffs]);
        live.push(basis, ...factors);
        const bb = await makeBlock(`${kind}.basis.${g.index}`, basis, config, 'basis');
        blocks[kind].basis[g.index] = bb;
        live.push(bb.tensor);
        for (let i = 0; i < g.layers.length; i++) {
          const fb = await makeBlock(`${kind}.factor.${g.layers[i]}`, factors[i], config, 'factors');
          blocks[kind].factors[g.layers[i]] = fb;
          live.push(fb.tensor);
        }
      }
    }
  } catch (e) {
    for (const t of live) if (!t.isDisposed) t.dispose();
    if (e instanceof KvpackError) throw e;
    throw new KvpackError('unsupported', `${strategy}: compression failed: ${(e as Error).message}`, { cause: e });
  }
  let sparse: SparseIndex | null = null;
  if (config.decode === 'sparse') {
    try {
      sparse = await buildSparseIndex(cache, T, config.sparse!);
    } catch (e) {
      tf.dispose(KINDS.flatMap((k) => [...blocks[k].basis, ...blocks[k].factors].map((b) => b.tensor)));
      throw e;
    }
  }
  return new GroupSvdCache(strategy, options, config, layout, cache.rope, T, cache.startPosition ?? 0, blocks, sparse);
}
