import * as tf from '@tensorflow/tfjs-core';
import {
  BaseCompressedMlaCache,
  HalfTensor,
  KvpackError,
  check,
  disposeHeld,
  disposeOwnedOnError,
  heldValues,
  holdFloat,
  matmul,
  mlaDenseBytes,
  ropeSharedKeys,
  type HeldFloat,
  type MlaCompressor,
  type MlaKVCache,
  type MlaLayout,
  type MlaStoredReader,
  type RopeConfig,
  type StoredItem,
} from '@kvpack/core';
import { blockCopy, blockItems, blockValues, disposeBlock, loadBlock, type Block, type KindBlocks } from './factor-blocks.js';
import { layerGroups, type GroupSvdConfig, type LayerGroup } from './group-config.js';
import { factorGroupBlocks, groupColumnBlock } from './group-svd-compress.js';
import { MlaLowRankOptionsSchema, type MlaLowRankOptions } from './options.js';
import { matrixBytes } from './rank-target.js';

/*
 * Grouped low-rank compression of MLA latent caches (xKV, Chang et al. 2025, §3 and its MLA
 * experiment; with G = 1 the per-layer SVD): per group of layers, the latents X_g = [T, n·d_c] ≈ U_g ·
 * [B_l₁ … B_l_n]; the shared RoPE keys kept exact, or factored the same way over [T, n·d_R].
 */

/** Latent ranks and RoPE key ranks (empty when the RoPE keys are exact) of every group, in group order. */
export interface MlaGroupRanks {
  c: number[];
  r: number[];
}

/** The MLA settings of a config, defaults filled in. */
export function mlaSettings(config: GroupSvdConfig): MlaLowRankOptions {
  return config.mla ?? MlaLowRankOptionsSchema.parse({});
}

/**
 * Bytes a compressed MLA prefill of T tokens holds at these group ranks, as `byteSize()` counts them
 * right after compress: per group the latent basis [T, R_c] and one factor [R_c, d_c] per layer; the
 * RoPE keys exact ([T, d_R] per layer at the factor storage precision) or likewise factored.
 */
export function mlaLowRankBytes(config: GroupSvdConfig, layout: MlaLayout, T: number, ranks: MlaGroupRanks): number {
  const exact = mlaSettings(config).ropeKeys === 'exact';
  let bytes = exact ? layout.nLayers * T * layout.qkRopeHeadDim * (config.storage === 'float16' ? 2 : 4) : 0;
  for (const g of layerGroups(layout.nLayers, config.layersPerGroup)) {
    const n = g.layers.length;
    bytes += matrixBytes(config, 'basis', T, ranks.c[g.index]) + n * matrixBytes(config, 'factors', ranks.c[g.index], layout.kvLoraRank);
    if (!exact) bytes += matrixBytes(config, 'basis', T, ranks.r[g.index]) + n * matrixBytes(config, 'factors', ranks.r[g.index], layout.qkRopeHeadDim);
  }
  return bytes;
}

/**
 * The group ranks of an MLA compression at T tokens: absolute (`mla.rank` · n, `mla.ropeRank` · n),
 * `rankFraction` f (R = max(1, ⌊f · min(T, n·d)⌋)), or `targetRatio` ρ (the largest scale s of the
 * `rank` : `ropeRank` proportion whose {@link mlaLowRankBytes} ≤ dense fp16 MLA bytes ÷ ρ: the measured
 * ratio right after compress is ≥ ρ). Every rank is checked against min(T, n·d).
 * @throws KvpackError('rank') naming the group, its rank and the bound, or a ratio out of reach.
 */
export function mlaGroupRanks(strategy: string, config: GroupSvdConfig, layout: MlaLayout, T: number): MlaGroupRanks {
  const m = mlaSettings(config);
  const groups = layerGroups(layout.nLayers, config.layersPerGroup);
  const exact = m.ropeKeys === 'exact';
  const bound = (g: LayerGroup, d: number) => Math.min(T, g.layers.length * d);
  let ranks: MlaGroupRanks;
  if (config.rankFraction !== undefined) {
    const f = config.rankFraction;
    ranks = {
      c: groups.map((g) => Math.max(1, Math.floor(f * bound(g, layout.kvLoraRank)))),
      r: exact ? [] : groups.map((g) => Math.max(1, Math.floor(f * bound(g, layout.qkRopeHeadDim)))),
    };
  } else if (config.targetRatio !== undefined) {
    const rho = config.targetRatio;
    const at = (s: number): MlaGroupRanks => ({
      c: groups.map((g) => Math.min(bound(g, layout.kvLoraRank), Math.max(1, Math.floor(s * m.rank * g.layers.length)))),
      r: exact ? [] : groups.map((g) => Math.min(bound(g, layout.qkRopeHeadDim), Math.max(1, Math.floor(s * m.ropeRank * g.layers.length)))),
    });
    const budget = mlaDenseBytes(layout, T) / rho;
    const least = mlaLowRankBytes(config, layout, T, at(0));
    if (least > budget)
      throw new KvpackError(
        'rank',
        `${strategy}: targetRatio ${rho} is out of reach on this MLA cache at T=${T}: rank 1 in every group already gives ${(mlaDenseBytes(layout, T) / least).toFixed(3)}× dense fp16${exact ? ' (the exact RoPE keys count; ropeKeys: svd compresses them too)' : ''}`,
      );
    let lo = 0;
    let hi = Math.max(T, layout.kvLoraRank) / Math.min(m.rank, m.ropeRank);
    if (mlaLowRankBytes(config, layout, T, at(hi)) <= budget) ranks = at(hi);
    else {
      for (let i = 0; i < 100 && hi - lo > 1e-12 * hi; i++) {
        const mid = (lo + hi) / 2;
        if (mlaLowRankBytes(config, layout, T, at(mid)) <= budget) lo = mid;
        else hi = mid;
      }
      ranks = at(lo);
    }
  } else {
    ranks = { c: groups.map((g) => m.rank * g.layers.length), r: exact ? [] : groups.map((g) => m.ropeRank * g.layers.length) };
  }
  for (const g of groups) {
    const span = `group ${g.index} (layers ${g.layers[0]}–${g.layers[g.layers.length - 1]})`;
    const rc = ranks.c[g.index];
    const bc = bound(g, layout.kvLoraRank);
    check(rc >= 1 && rc <= bc, 'rank', () => `${strategy}: ${span} latent rank ${rc} is out of range [1, min(T=${T}, features=${g.layers.length * layout.kvLoraRank}) = ${bc}]`);
    if (!exact) {
      const rr = ranks.r[g.index];
      const br = bound(g, layout.qkRopeHeadDim);
      check(rr >= 1 && rr <= br, 'rank', () => `${strategy}: ${span} RoPE key rank ${rr} is out of range [1, min(T=${T}, features=${g.layers.length * layout.qkRopeHeadDim}) = ${br}]`);
    }
  }
  return ranks;
}

/**
 * An MLA latent cache compressed by grouped low-rank factorization. Latents of layer l are rebuilt as
 * U_g · B_l [T, d_c]; RoPE keys as RoPE(k_R) (exact) or RoPE(U^R_g · B^R_l), rotated at positions
 * startPosition … startPosition + T − 1. Stored: the bases and factors as configured (float16,
 * float32 or group-quantized), and the exact RoPE keys at the storage precision.
 */
export class MlaGroupSvdCache extends BaseCompressedMlaCache {
  readonly groups: LayerGroup[];
  private readonly groupOf: number[] = [];

  constructor(
    readonly strategy: string,
    readonly options: unknown,
    readonly config: GroupSvdConfig,
    layout: MlaLayout,
    rope: RopeConfig,
    prefillLength: number,
    readonly startPosition: number,
    readonly ranks: MlaGroupRanks,
    /** Latent bases per group and factors per layer. */
    private readonly latent: KindBlocks,
    /** RoPE key bases and factors (ropeKeys: svd), or null. */
    private readonly ropeFactored: KindBlocks | null,
    /** Exact pre-RoPE RoPE keys per layer, [T, d_R] (ropeKeys: exact), or null. */
    private readonly ropeExact: HeldFloat[] | null,
  ) {
    super(layout, rope, prefillLength);
    this.groups = layerGroups(layout.nLayers, config.layersPerGroup);
    for (const g of this.groups) for (const l of g.layers) this.groupOf[l] = g.index;
  }

  /** A copy of a group's stored latent token basis U_g, [T, R_c] float32. */
  latentBasis(group: number): tf.Tensor2D {
    this.assertLive();
    check(Number.isInteger(group) && group >= 0 && group < this.groups.length, 'shape', `group ${group} is out of range [0, ${this.groups.length})`);
    return blockCopy(this.latent.basis[group]);
  }

  /** A copy of a layer's stored latent factor B_l, [R_c, d_c] float32. */
  latentFactor(layer: number): tf.Tensor2D {
    this.assertLive(layer);
    return blockCopy(this.latent.factors[layer]);
  }

  protected prefillLatents(layer: number): tf.Tensor2D {
    const g = this.groupOf[layer];
    return tf.tidy(() => matmul(blockValues(this.latent.basis[g]), blockValues(this.latent.factors[layer])) as tf.Tensor2D);
  }

  protected prefillRopeKeys(layer: number): tf.Tensor2D {
    return tf.tidy(() => {
      const pre = this.ropeExact
        ? heldValues<tf.Tensor2D>(this.ropeExact[layer])
        : (matmul(blockValues(this.ropeFactored!.basis[this.groupOf[layer]]), blockValues(this.ropeFactored!.factors[layer])) as tf.Tensor2D);
      return ropeSharedKeys(pre, this.rope, this.startPosition);
    });
  }

  protected stored(): StoredItem[] {
    const items: StoredItem[] = [];
    const kind = (b: KindBlocks) => {
      for (const g of this.groups) {
        items.push(...blockItems(b.basis[g.index]));
        for (const l of g.layers) items.push(...blockItems(b.factors[l]));
      }
    };
    kind(this.latent);
    if (this.ropeFactored) kind(this.ropeFactored);
    if (this.ropeExact) this.ropeExact.forEach((h, l) => items.push({ name: `kr.${l}`, held: h }));
    return items;
  }

  protected meta(): Record<string, unknown> {
    return { startPosition: this.startPosition, ranks: this.ranks };
  }

  protected disposeStored(): void {
    for (const b of [this.latent, this.ropeFactored]) {
      if (!b) continue;
      b.basis.forEach(disposeBlock);
      b.factors.forEach(disposeBlock);
    }
    this.ropeExact?.forEach(disposeHeld);
  }
}

/**
 * Compresses an MLA latent cache by grouped truncated SVD (core `truncatedSvd`, randomized or exact):
 * per group of `layersPerGroup` layers the latents [T, n·d_c] at the group's latent rank, and the RoPE
 * keys either held exact or factored likewise. Does not dispose `cache`.
 * @throws KvpackError('rank') for a rank out of range (see {@link mlaGroupRanks}).
 */
export async function compressMlaGroupSvd(cache: MlaKVCache, strategy: string, options: unknown, config: GroupSvdConfig, T: number): Promise<MlaGroupSvdCache> {
  const layout = cache.layout;
  const ranks = mlaGroupRanks(strategy, config, layout, T);
  const exact = mlaSettings(config).ropeKeys === 'exact';
  const groups = layerGroups(layout.nLayers, config.layersPerGroup);
  const made: Block[] = [];
  const factor = async (src: tf.Tensor2D[], d: number, prefix: string, rankOf: number[]): Promise<KindBlocks> => {
    const out: KindBlocks = { basis: [], factors: [] };
    for (const g of groups) {
      const X = g.layers.map((l) => groupColumnBlock(src[l], T, d));
      const [f] = await factorGroupBlocks([{ X, R: rankOf[g.index], basisName: `${prefix}.basis.${g.index}`, factorNames: g.layers.map((l) => `${prefix}.factor.${l}`) }], config);
      made.push(f.basis, ...f.factors);
      out.basis[g.index] = f.basis;
      g.layers.forEach((l, i) => (out.factors[l] = f.factors[i]));
    }
    return out;
  };
  try {
    const latent = await factor(cache.latents, layout.kvLoraRank, 'c', ranks.c);
    const ropeFactored = exact ? null : await factor(cache.ropeKeys, layout.qkRopeHeadDim, 'r', ranks.r);
    const ropeExact = exact
      ? await disposeOwnedOnError(async (own) => {
          const out: HeldFloat[] = [];
          for (const k of cache.ropeKeys) {
            const h = await holdFloat(k, config.storage);
            own(h instanceof HalfTensor ? h.packed : h);
            out.push(h);
          }
          return out;
        })
      : null;
    return new MlaGroupSvdCache(strategy, options, config, layout, cache.rope, T, cache.startPosition ?? 0, ranks, latent, ropeFactored, ropeExact);
  } catch (e) {
    for (const b of made) disposeBlock(b);
    if (e instanceof KvpackError) throw e;
    throw new KvpackError('unsupported', `${strategy}: MLA compression failed: ${(e as Error).message}`, { cause: e });
  }
}

/** Restores an {@link MlaGroupSvdCache} from its serialization. @throws KvpackError('corrupt') */
export function restoreMlaGroupSvd(r: MlaStoredReader, strategy: string, options: unknown, config: GroupSvdConfig): MlaGroupSvdCache {
  const { layout, rope, prefillLength: T, startPosition, meta } = r.header;
  const exact = mlaSettings(config).ropeKeys === 'exact';
  const groups = layerGroups(layout.nLayers, config.layersPerGroup);
  const stored = meta.ranks as Partial<MlaGroupRanks> | undefined;
  const okRanks = (a: unknown, d: number, n: number) =>
    Array.isArray(a) && a.length === n && a.every((x, i) => Number.isInteger(x) && x >= 1 && x <= Math.min(T, groups[i].layers.length * d));
  check(
    okRanks(stored?.c, layout.kvLoraRank, groups.length) && okRanks(stored?.r, layout.qkRopeHeadDim, exact ? 0 : groups.length),
    'corrupt',
    `serialized ${strategy} MLA cache is corrupt: metadata ranks must hold ${groups.length} latent group ranks${exact ? '' : ` and ${groups.length} RoPE key group ranks`} in [1, min(T, features)], got ${JSON.stringify(stored)}`,
  );
  const ranks: MlaGroupRanks = { c: [...stored!.c!], r: [...stored!.r!] };
  if (config.targetRatio === undefined && config.rankFraction === undefined) {
    // Absolute ranks follow from the options: the file must agree with them.
    let want: MlaGroupRanks;
    try {
      want = mlaGroupRanks(strategy, config, layout, T);
    } catch (e) {
      throw new KvpackError('corrupt', `serialized ${strategy} MLA cache is corrupt: ${(e as Error).message}`, { cause: e });
    }
    check(JSON.stringify(want) === JSON.stringify(ranks), 'corrupt', `serialized ${strategy} MLA cache is corrupt: metadata ranks ${JSON.stringify(ranks)} differ from its options' ${JSON.stringify(want)}`);
  }
  const load = (prefix: string, d: number, R: number[]): KindBlocks => {
    const out: KindBlocks = { basis: [], factors: [] };
    for (const g of groups) {
      out.basis[g.index] = loadBlock(r, config, `${prefix}.basis.${g.index}`, T, R[g.index], 'basis');
      for (const l of g.layers) out.factors[l] = loadBlock(r, config, `${prefix}.factor.${l}`, R[g.index], d, 'factors');
    }
    return out;
  };
  const latent = load('c', layout.kvLoraRank, ranks.c);
  const ropeFactored = exact ? null : load('r', layout.qkRopeHeadDim, ranks.r);
  const ropeExact = exact ? Array.from({ length: layout.nLayers }, (_, l) => r.held(`kr.${l}`, { dtype: config.storage, shape: [T, layout.qkRopeHeadDim] })) : null;
  return new MlaGroupSvdCache(strategy, options, config, layout, rope, T, startPosition, ranks, latent, ropeFactored, ropeExact);
}

/** The `mla` capability of a grouped low-rank strategy at this config (xkv; svd with G = 1). */
export function mlaGroupSvdCompressor(strategy: string, options: unknown, config: GroupSvdConfig): MlaCompressor {
  return {
    compress: (cache, T) => compressMlaGroupSvd(cache, strategy, options, config, T),
    restore: (r) => restoreMlaGroupSvd(r, strategy, options, config),
  };
}
