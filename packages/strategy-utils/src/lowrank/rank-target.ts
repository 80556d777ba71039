import { KvpackError, check, denseCacheBytes, type ModelLayout } from '@kvpack/core';
import { quantizedBytes, type QuantSpec } from '../quant/quantize.js';
import { KINDS, layerGroups, type GroupSvdConfig, type Kind, type LayerGroup } from './group-config.js';
import { sparseGeometry } from './sparse-index.js';

/*
 * Rank targets of a grouped low-rank cache: a target compression ratio or a rank fraction, resolved
 * into one key and one value rank per group at compress time (they depend on T).
 */

/** Key and value rank R_g of every group, in group order. */
export interface GroupRanks {
  k: number[];
  v: number[];
}

/** True when the config asks for a ratio or a rank fraction instead of absolute ranks. */
export function hasRankTarget(config: Pick<GroupSvdConfig, 'targetRatio' | 'rankFraction'>): boolean {
  return config.targetRatio !== undefined || config.rankFraction !== undefined;
}

function quantFor(config: GroupSvdConfig, part: 'basis' | 'factors'): QuantSpec | null {
  const q = config.factorQuantization;
  if (!q || (q.apply !== 'both' && q.apply !== part)) return null;
  return { bits: q.bits, quantGroupSize: q.quantGroupSize, symmetric: q.symmetric };
}

/** Bytes of one stored [rows, cols] factor matrix at the config's storage or quantization. */
export function matrixBytes(config: GroupSvdConfig, part: 'basis' | 'factors', rows: number, cols: number): number {
  const q = quantFor(config, part);
  return q ? quantizedBytes(rows, cols, q) : rows * cols * (config.storage === 'float16' ? 2 : 4);
}

/**
 * Bytes a compressed prefill of T tokens holds at these group ranks, as `byteSize()` counts them right
 * after compress: per group and kind the token basis [T, R_g] and one factor [R_g, H_kv·d] per layer
 * (float16, float32 or group-quantized as configured), plus the sparse-decode index when
 * `config.decode` is `sparse` (landmarks, outlier ids and rows, local rows: independent of the ranks).
 */
export function lowRankBytes(config: GroupSvdConfig, layout: ModelLayout, T: number, ranks: GroupRanks): number {
  const F = layout.nKvHeads * layout.headDim;
  let bytes = 0;
  for (const g of layerGroups(layout.nLayers, config.layersPerGroup)) {
    for (const kind of KINDS) {
      const R = ranks[kind][g.index];
      bytes += matrixBytes(config, 'basis', T, R) + g.layers.length * matrixBytes(config, 'factors', R, F);
    }
  }
  if (config.decode === 'sparse' && config.sparse) {
    const { chunks: C, outliers: O, local } = sparseGeometry(T, config.sparse);
    const { nKvHeads: H, headDim: d } = layout;
    const c = config.sparse.chunkSize;
    bytes += layout.nLayers * (C * H * d * 2 + H * O * 4 + 2 * H * O * c * d * 2 + 2 * local * H * d * 2);
  }
  return bytes;
}

/** The largest rank a group of `group` layers can take: min(T, n·H_kv·d). */
function bound(group: LayerGroup, layout: ModelLayout, T: number): number {
  return Math.min(T, group.layers.length * layout.nKvHeads * layout.headDim);
}

/**
 * The group ranks of a config with a rank target, at T tokens:
 * - `rankFraction` f: R_g = max(1, ⌊f · min(T, n·H_kv·d)⌋) for keys and for values;
 * - `targetRatio` ρ: the largest s such that R_g = clamp(⌊s · r · n⌋, 1, min(T, n·H_kv·d)), with r the
 *   per-layer `rankK` (keys) or `rankV` (values) as the key : value proportion, keeps
 *   {@link lowRankBytes} ≤ dense fp16 bytes / ρ (`denseCacheBytes`): ranks round down, so the
 *   measured ratio `denseCacheBytes / byteSize()` right after compress is ≥ ρ.
 * @throws KvpackError('rank') when rank 1 everywhere is already above the byte budget (naming the
 *   best ratio reachable), or rankK + rankV is 0.
 */
export function targetGroupRanks(strategy: string, config: GroupSvdConfig, layout: ModelLayout, T: number): GroupRanks {
  const groups = layerGroups(layout.nLayers, config.layersPerGroup);
  if (config.rankFraction !== undefined) {
    const f = config.rankFraction;
    const r = groups.map((g) => Math.max(1, Math.floor(f * bound(g, layout, T))));
    return { k: r, v: [...r] };
  }
  const rho = config.targetRatio!;
  check(config.rankK + config.rankV > 0, 'rank', `${strategy}: targetRatio needs rankK + rankV > 0 (their proportion splits the ranks between keys and values)`);
  const at = (s: number): GroupRanks => {
    const of = (kind: Kind) =>
      groups.map((g) => Math.min(bound(g, layout, T), Math.max(1, Math.floor(s * (kind === 'k' ? config.rankK : config.rankV) * g.layers.length))));
    return { k: of('k'), v: of('v') };
  };
  const budget = denseCacheBytes(layout, T) / rho;
  const lowest = at(0);
  const least = lowRankBytes(config, layout, T, lowest);
  if (least > budget)
    throw new KvpackError(
      'rank',
      `${strategy}: targetRatio ${rho} is out of reach at T=${T}: rank 1 in every group already gives ${(denseCacheBytes(layout, T) / least).toFixed(3)}× dense fp16`,
    );
  // Bytes grow with s (every rank is non-decreasing in s): bisect for the last feasible s.
  let lo = 0;
  let hi = Math.max(T, layout.nKvHeads * layout.headDim) / Math.max(1e-9, Math.min(...[config.rankK, config.rankV].filter((r) => r > 0)));
  if (lowRankBytes(config, layout, T, at(hi)) <= budget) return at(hi);
  for (let i = 0; i < 100 && hi - lo > 1e-12 * hi; i++) {
    const mid = (lo + hi) / 2;
    if (lowRankBytes(config, layout, T, at(mid)) <= budget) lo = mid;
    else hi = mid;
  }
  return at(lo);
}

/**
 * The config with its group ranks fixed for T tokens: unchanged without a rank target, else with
 * `groupRanks` from {@link targetGroupRanks}.
 */
export function resolveRanks(strategy: string, config: GroupSvdConfig, layout: ModelLayout, T: number): GroupSvdConfig {
  if (!hasRankTarget(config) || config.groupRanks) return config;
  return { ...config, groupRanks: targetGroupRanks(strategy, config, layout, T) };
}

/**
 * The group ranks a serialized cache of a rank-target config records (its metadata `ranks`), checked:
 * one positive integer per group and kind, at most the group's features.
 * @throws KvpackError('corrupt') naming what is wrong.
 */
export function storedGroupRanks(strategy: string, meta: unknown, layout: ModelLayout, layersPerGroup: number): GroupRanks {
  const groups = layerGroups(layout.nLayers, layersPerGroup);
  const F = layout.nKvHeads * layout.headDim;
  const r = meta as Partial<GroupRanks> | undefined;
  for (const kind of KINDS) {
    const a = r?.[kind];
    check(
      Array.isArray(a) && a.length === groups.length && a.every((x, i) => Number.isInteger(x) && x >= 1 && x <= groups[i].layers.length * F),
      'corrupt',
      `serialized ${strategy} cache is corrupt: metadata ranks.${kind} must hold ${groups.length} integer group ranks in [1, features], got ${JSON.stringify(a)}`,
    );
  }
  return { k: [...r!.k!], v: [...r!.v!] };
}
