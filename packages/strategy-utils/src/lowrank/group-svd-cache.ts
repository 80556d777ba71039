import * as tf from '@tensorflow/tfjs-core';
import {
  BaseCompressedCache,
  KvpackError,
  check,
  matmul,
  type AttendOptions,
  type CompressedCache,
  type ModelLayout,
  type PrefixCutter,
  type RopeConfig,
  type StoredItem,
  type StoredReader,
} from '@kvpack/core';
import { attendFull } from './attend-full.js';
import { exposeSwitches, type AttendSwitches } from './attend-with.js';
import { DecodeState } from './decode-state.js';
import { blockCopy, blockItems, blockRowPrefix, disposeBlock, loadBlock, type Block, type KindBlocks } from './factor-blocks.js';
import { KINDS, layerGroups, rankOf, type GroupSvdConfig, type Kind, type LayerGroup } from './group-config.js';
import { groupSvdStats, type GroupSvdStats } from './group-svd-stats.js';
import { queryBlocks } from './query-blocks.js';
import { sparseAttend } from './sparse-attend.js';
import { SparseDecoder } from './sparse-decoder.js';
import type { SparseIndex } from './sparse-index.js';
import { loadSparseIndex, sparseMeta, sparseTensors } from './sparse-storage.js';
import { hasRankTarget, storedGroupRanks } from './rank-target.js';

/** Options of {@link GroupSvdCache.attendSparse}: core's AttendOptions and a per-call token budget. */
export interface SparseBudgetOptions extends AttendOptions {
  /** Tokens rebuilt per KV head for this call (a multiple of chunkSize); default the configured budget. */
  budget?: number;
}

/** Keys of {@link AttendSwitches} the public attend entry points refuse. */
const TUNING_SWITCHES = ['values', 'gather', 'heads', 'kernels', 'mode'] as const;

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
    this.groups = layerGroups(layout.nLayers, config.layersPerGroup);
    this.groupOf = [];
    for (const g of this.groups) for (const l of g.layers) this.groupOf[l] = g.index;
    this.decodeState = new DecodeState({
      layout,
      rope,
      prefillLength,
      startPosition,
      basisBlock: (kind, l) => this.blocks[kind].basis[this.groupOf[l]],
      factorBlock: (kind, l) => this.blocks[kind].factors[l],
    });
    this.sparseDecoder = sparseIndex ? new SparseDecoder(this.decodeState, sparseIndex) : null;
    if (this.sparseDecoder) {
      this.attendSparse = (layer, queries, options = {}) => this.runAttend(layer, queries, this.publicOptions(options, true), 'sparse');
    }
    exposeSwitches(this, {
      attend: (layer, queries, options) => this.runAttend(layer, queries, options, options.mode ?? (this.sparseDecoder ? 'sparse' : 'full')),
      selection: (layer, queries, budget) => this.selection(layer, queries, budget),
    });
  }

  /** Per-call derived decode tensors (unpacked factors, RoPE tables, pair swap, per-head factors); holds none. */
  private readonly decodeState: DecodeState;
  private readonly sparseDecoder: SparseDecoder | null;

  /**
   * Sparse attention (xKV-SR; see sparse-index.ts) with a per-call token budget — present only on caches
   * compressed with `decode: 'sparse'` (they hold the landmarks). q [n, H, d] post-RoPE → [n, H, d].
   * @throws KvpackError('config') when the budget is not a positive multiple of chunkSize.
   */
  readonly attendSparse?: (layer: number, queries: tf.Tensor3D, options?: SparseBudgetOptions) => tf.Tensor3D;

  /** Rank R_g of a group's keys or values (per-layer rank × layers in the group). */
  groupRank(kind: Kind, group: number): number {
    return rankOf(this.config, kind, this.groups[group]);
  }

  /** A copy of a group's stored token basis U_g, [T, R_g] float32 (dequantized / fp16-rounded values). */
  basis(kind: Kind, group: number): tf.Tensor2D {
    this.assertLive();
    check(Number.isInteger(group) && group >= 0 && group < this.groups.length, 'shape', `group ${group} is out of range [0, ${this.groups.length})`);
    return blockCopy(this.blocks[kind].basis[group]);
  }

  /** A copy of a layer's stored factor B_l, [R_g, H_kv·d] float32. */
  factor(kind: Kind, layer: number): tf.Tensor2D {
    this.assertLive(layer);
    return blockCopy(this.blocks[kind].factors[layer]);
  }

  private rebuild(kind: Kind, layer: number): tf.Tensor3D {
    const { nKvHeads, headDim } = this.layout;
    return tf.tidy(() => tf.reshape(matmul(this.decodeState.basis(kind, layer), this.decodeState.factor(kind, layer)), [this.prefillLength, nKvHeads, headDim]) as tf.Tensor3D);
  }

  /**
   * Post-RoPE keys RoPE(U_g·B_l), fused: (U·B)∘cos + (U·B)·P∘sin with per-call tables (decode-state.ts, rope-fused.ts). In
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
   * token budget plus the exact outlier, local and decode tokens ({@link sparseAttend}).
   * `causalTail` (default n): the last causalTail cached tokens are the queries' own.
   * Returns [n, H, d].
   * @throws KvpackError('shape') when q is not [n, H, d] of this layout or causalTail is out of range.
   */
  attend(layer: number, queries: tf.Tensor3D, options?: AttendOptions): tf.Tensor3D {
    return this.runAttend(layer, queries, this.publicOptions(options ?? {}, false), this.sparseDecoder ? 'sparse' : 'full');
  }

  /**
   * The public options of {@link attend} / {@link attendSparse}, refusing the tuning switches (which a
   * caller reaching past the types could pass and see silently ignored otherwise).
   */
  private publicOptions(options: SparseBudgetOptions, sparse: boolean): AttendSwitches {
    for (const key of [...TUNING_SWITCHES, ...(sparse ? [] : ['budget'])]) {
      check(
        (options as Record<string, unknown>)[key] === undefined,
        'config',
        () =>
          key === 'budget'
            ? `${this.strategy} attend: a per-call budget goes to attendSparse (sparse caches only)`
            : `${this.strategy} attend: "${key}" is a tuning switch of kvpack's tests and benchmarks (attendWith in @kvpack/strategy-utils/internal), not an attend option`,
      );
    }
    return options;
  }

  /** {@link sparseSelection}'s work (internal entry). */
  private selection(layer: number, queries: tf.Tensor3D, budget: number | undefined): number[][] {
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

  private runAttend(layer: number, q: tf.Tensor3D, options: AttendSwitches, mode: 'full' | 'sparse'): tf.Tensor3D {
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
      return sparseAttend(this.sparseDecoder, layer, q, tail, residual, () => ({ k: this.keys(layer), v: this.values(layer) }), options);
    }
    return attendFull(this.decodeState, layer, q, tail, residual, options.values ?? 'auto');
  }

  /** Pre-RoPE keys of one layer as reconstructed, [T, H_kv, d] (for error measurement). */
  preRopeKeys(layer: number): tf.Tensor3D {
    this.assertLive(layer);
    return this.rebuild('k', layer);
  }

  private allBlocks(): Block[] {
    return KINDS.flatMap((k) => [...this.blocks[k].basis, ...this.blocks[k].factors]);
  }

  /** What this cache stores ({@link stored}), for a composed cache that holds it as a stage. @internal */
  storedItems(): StoredItem[] {
    this.assertLive();
    return this.stored();
  }

  /** Its serialization metadata ({@link meta}), for a composed cache that holds it as a stage. @internal */
  storedMeta(): Record<string, unknown> {
    return this.meta();
  }

  protected stored(): StoredItem[] {
    const items = this.allBlocks().flatMap(blockItems);
    return this.sparseIndex ? [...items, ...sparseTensors(this.sparseIndex, this.layout)] : items;
  }

  protected meta(): Record<string, unknown> {
    return {
      startPosition: this.startPosition,
      layersPerGroup: this.config.layersPerGroup,
      ranks: { k: this.groups.map((g) => this.groupRank('k', g.index)), v: this.groups.map((g) => this.groupRank('v', g.index)) },
      ...(this.sparseIndex ? { sparse: sparseMeta(this.sparseIndex) } : {}),
    };
  }

  protected disposeStored(): void {
    this.sparseDecoder?.dispose();
    for (const b of this.allBlocks()) disposeBlock(b);
  }

  /**
   * The cache cut to its first `tokens` tokens without compressing again: each group's token basis
   * U_g keeps its rows [0, t) (t = min(tokens, T); a row of U_g belongs to one token, §3), every
   * factor B_l is kept as it is, and the first tokens − T exact decode tokens follow. The stored
   * numbers are the same bits (float16, float32 or quantized codes: quantization groups lie within a
   * row), so decoding over the cut equals decoding over these rows of this cache. A new cache; this
   * one stays usable. The ranks stay those of this cache (a cut may hold fewer tokens than a group's
   * rank; it is still exact, only no longer compact).
   * @throws KvpackError('unsupported') for a cache compressed with `decode: 'sparse'`: its exact local
   *   window is the last tokens of T and its outlier chunks were chosen over all T tokens, so no
   *   prefix of its index is the index of the prefix (compress the prefix again, or use decode 'full');
   *   KvpackError('shape') for tokens outside [1, tokenCount].
   */
  async cutPrefix(tokens: number): Promise<GroupSvdCache> {
    this.assertLive();
    if (this.sparseIndex)
      throw new KvpackError(
        'unsupported',
        `${this.strategy} cut: a cache compressed with decode: 'sparse' cannot be cut to a prefix (its exact local window holds the last tokens of all ${this.prefillLength} and its outlier chunks were chosen over all of them); compress the prefix again, or use decode: 'full'`,
      );
    return this.cutWith(tokens, async (t) => {
      const blocks: Record<Kind, KindBlocks> = { k: { basis: [], factors: [] }, v: { basis: [], factors: [] } };
      try {
        for (const kind of KINDS) {
          for (const b of this.blocks[kind].basis) blocks[kind].basis.push(await blockRowPrefix(b, t));
          for (const b of this.blocks[kind].factors) blocks[kind].factors.push(await blockRowPrefix(b, b.rows));
        }
      } catch (e) {
        for (const kind of KINDS) [...blocks[kind].basis, ...blocks[kind].factors].forEach(disposeBlock);
        throw e;
      }
      return new GroupSvdCache(this.strategy, this.options, this.config, this.layout, this.rope, t, this.startPosition, blocks, null);
    });
  }

  /**
   * Bytes (basis / factors / residual) and the measured compression ratio next to the xKV paper's
   * formula (`paperCompressionRatio`, ratio.ts).
   */
  stats(): GroupSvdStats {
    this.assertLive();
    return groupSvdStats({
      strategy: this.strategy,
      config: this.config,
      layout: this.layout,
      tokens: this.prefillLength,
      groups: this.groups,
      basis: KINDS.flatMap((k) => this.blocks[k].basis),
      factors: KINDS.flatMap((k) => this.blocks[k].factors),
      totalBytes: this.byteSize(),
    });
  }

  /**
   * Restores a cache written by {@link GroupSvdCache.serialize}, through its reader.
   * @throws KvpackError('corrupt') naming the strategy and the tensor at fault.
   */
  static restore(r: StoredReader, strategy: string, options: unknown, configIn: GroupSvdConfig): GroupSvdCache {
    const { layout, rope, prefillLength: T, startPosition, meta } = r.header;
    // Ranks resolved from a rank target at compress time are read back as recorded.
    const config = hasRankTarget(configIn) ? { ...configIn, groupRanks: storedGroupRanks(strategy, meta.ranks, layout, configIn.layersPerGroup) } : configIn;
    const F = layout.nKvHeads * layout.headDim;
    const groups = layerGroups(layout.nLayers, config.layersPerGroup);
    const ranks = { k: groups.map((g) => rankOf(config, 'k', g)), v: groups.map((g) => rankOf(config, 'v', g)) };
    check(
      meta.layersPerGroup === config.layersPerGroup && JSON.stringify(meta.ranks) === JSON.stringify(ranks),
      'corrupt',
      `serialized ${strategy} cache was written with ${meta.layersPerGroup} layers per group and group ranks ${JSON.stringify(meta.ranks)}, ` +
        `but these options give ${config.layersPerGroup} and ${JSON.stringify(ranks)} (restore it with deserializeCache)`,
    );
    const load = (name: string, rows: number, cols: number, part: 'basis' | 'factors') => loadBlock(r, config, name, rows, cols, part);
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
  }
}

/**
 * The `cutPrefix` capability of the grouped low-rank strategies (xkv, svd): {@link GroupSvdCache.cutPrefix},
 * or why caches of these options cannot be cut (sparse decode).
 */
export function groupSvdPrefixCut(strategy: string, options: object): PrefixCutter | string {
  if ((options as { decode?: string }).decode === 'sparse')
    return `${strategy} caches compressed with decode: 'sparse' keep an exact local window of their last tokens and outlier chunks chosen over all of them, which no prefix cut preserves; use decode: 'full'`;
  return (cache, tokens) => {
    check(cache instanceof GroupSvdCache && cache.strategy === strategy, 'shape', `${strategy} cut: expected a ${strategy} cache, got a ${cache.strategy} cache`);
    return cache.cutPrefix(tokens);
  };
}

/** {@link GroupSvdCache.stats} of an `xkv` or `svd` cache; null for caches of other strategies. */
export function lowRankStats(cache: CompressedCache): GroupSvdStats | null {
  return cache instanceof GroupSvdCache ? cache.stats() : null;
}
