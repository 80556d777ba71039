import { check, type ModelLayout, type Orthogonalization, type Sketch } from '@kvpack/core';
import type { QuantSpec } from '../quant/quantize.js';
import type { SparseOptions } from './sparse-options.js';
import type { MlaLowRankOptions } from './options.js';

/* Settings of a grouped low-rank cache: the config, its layer groups, and the rank bounds checked before any work. */

/** Which stored factors {@link FactorQuantization} applies to. */
export type QuantTarget = 'basis' | 'factors' | 'both';

/** Group-wise int8/int4 quantization of the stored low-rank factors (see `quant/quantize.ts`). */
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
  layersPerGroup: number;
  /** Per-layer key rank r_K; a group of n layers gets rank r_K · n (with a rank target: the key share of the ranks). */
  rankK: number;
  /** Per-layer value rank r_V; a group of n layers gets rank r_V · n (with a rank target: the value share). */
  rankV: number;
  /** Target compression ratio (dense fp16 bytes ÷ byteSize() after compress) instead of absolute ranks; see rank-target.ts. */
  targetRatio?: number;
  /** Fraction of each group's full rank min(T, n·H_kv·d), instead of absolute ranks; see rank-target.ts. */
  rankFraction?: number;
  /** Group ranks resolved for one T (set by compress and restore when a rank target is given). */
  groupRanks?: { k: number[]; v: number[] };
  /** Randomized SVD oversampling p (Halko et al. 2011), or `auto` (core `autoOversample` of the group rank). */
  oversample: number | 'auto';
  /** Randomized SVD power iterations q (a multiple of 0.5). */
  powerIters: number;
  /** Seed of the randomized SVD's test matrix. */
  seed: number;
  /** The randomized SVD's test matrix (core `Sketch`; default `gaussian`). */
  sketch?: Sketch;
  /** Exact truncated SVD instead of the randomized one. */
  exact: boolean;
  /** Where the randomized SVD's k×k orthonormalizations run (core `Orthogonalization`; default `auto`). */
  orthogonalization?: Orthogonalization;
  /** Storage of factors that are not quantized. */
  storage: 'float16' | 'float32';
  /** Optional quantization of the factors. */
  factorQuantization?: FactorQuantization;
  /** Decode mode of `attend` (default `full`); `sparse` stores the sparse index at compress time (sparse-index.ts). */
  decode?: 'full' | 'sparse';
  /** Sparse decode settings; used when `decode` is `sparse`. */
  sparse?: SparseOptions;
  /** MLA latent caches: latent rank, RoPE keys exact or factored (defaults when absent). */
  mla?: MlaLowRankOptions;
}

/** A group of consecutive layers sharing one token basis. */
export interface LayerGroup {
  index: number;
  /** Layer indices, consecutive. */
  layers: number[];
}

/** Consecutive groups of `layersPerGroup` layers from layer 0; the last one holds the remainder. */
export function layerGroups(nLayers: number, layersPerGroup: number): LayerGroup[] {
  check(Number.isInteger(layersPerGroup) && layersPerGroup >= 1, 'config', `layersPerGroup must be a positive integer, got ${layersPerGroup}`);
  const out: LayerGroup[] = [];
  for (let s = 0, g = 0; s < nLayers; s += layersPerGroup, g++) {
    out.push({ index: g, layers: Array.from({ length: Math.min(layersPerGroup, nLayers - s) }, (_, i) => s + i) });
  }
  return out;
}

/** Keys or values. */
export type Kind = 'k' | 'v';
/** Keys, then values. */
export const KINDS: Kind[] = ['k', 'v'];

/** Rank R_g of a group's keys or values: the per-layer rank times the layers in the group. */
export function rankOf(config: GroupSvdConfig, kind: Kind, group: LayerGroup): number {
  if (config.groupRanks) return config.groupRanks[kind][group.index];
  return (kind === 'k' ? config.rankK : config.rankV) * group.layers.length;
}

/**
 * Checks every group's key and value rank against min(T, features) before any work.
 * @throws KvpackError('rank') naming the group, its rank and the bound.
 */
export function checkGroupRanks(strategy: string, config: GroupSvdConfig, layout: ModelLayout, T: number): void {
  const F = layout.nKvHeads * layout.headDim;
  for (const g of layerGroups(layout.nLayers, config.layersPerGroup)) {
    for (const kind of KINDS) {
      const per = kind === 'k' ? config.rankK : config.rankV;
      const r = rankOf(config, kind, g);
      const feats = g.layers.length * F;
      const bound = Math.min(T, feats);
      const what = kind === 'k' ? 'key' : 'value';
      check(
        (config.groupRanks || Number.isInteger(per)) && Number.isInteger(r) && r >= 1 && r <= bound,
        'rank',
        () =>
          `${strategy}: group ${g.index} (layers ${g.layers[0]}–${g.layers[g.layers.length - 1]}) ${what} rank ${r} ` +
          `(${config.groupRanks ? 'from the rank target' : `rank${kind.toUpperCase()} ${per} × ${g.layers.length} layers`}) is out of range [1, min(T=${T}, features=${feats}) = ${bound}]`,
      );
    }
  }
}
