import { check, type FactoredShape, type ModelLayout } from '@kvpack/core';

/** Arguments of {@link paperCompressedElements} and {@link paperCompressionRatio}. */
export interface PaperRatioArgs {
  layout: ModelLayout;
  /** Prefill length T, tokens. */
  tokens: number;
  /** Layers per group G (1 = per-layer "Single SVD"). */
  layersPerGroup: number;
  /** Per-layer key rank r_K; the group's key rank is r_K · G. */
  rankK: number;
  /** Per-layer value rank r_V; the group's value rank is r_V · G. 0 = values stay uncompressed. */
  rankV: number;
  /** Bits per stored element for both the dense cache and the factors (default 16). */
  bits?: number;
}

/**
 * Elements the xKV authors count for a cross-layer low-rank KV cache (batch 1):
 *
 *   ⌈L / G⌉ · T · (R_K + R_V)  +  L · H_kv · d · (R_K + R_V)  [+ L · T · H_kv · d when R_V = 0]
 *
 * with group ranks R = r · G: one shared token basis [T, R] per group and one [R, H_kv·d]
 * reconstruction factor per layer. Every group, the last one included, is charged G layers' rank.
 *
 * Source: abdelfattah-lab/xKV, `scripts/calc_kv_comp_rate.py` (`cross_layer_lowrank_elements`,
 * rank scaled by the group size as its `scale_rank_with_gs` default does), the calculator behind the
 * compression rates of the xKV paper (Chang et al. 2025, arXiv 2503.18893); the repository README
 * likewise scales the rank with the group size "so that the average rank per layer is similar".
 * @throws KvpackError('config') on non-positive sizes or negative ranks.
 */
function paperCompressedElements(a: PaperRatioArgs): number {
  const { layout, tokens: T, layersPerGroup: G, rankK, rankV } = a;
  check(Number.isInteger(T) && T > 0 && Number.isInteger(G) && G > 0, 'config', `paper ratio: tokens (${T}) and layersPerGroup (${G}) must be positive integers`);
  check(rankK >= 0 && rankV >= 0, 'config', `paper ratio: ranks must be ≥ 0, got rankK ${rankK}, rankV ${rankV}`);
  const L = layout.nLayers;
  const F = layout.nKvHeads * layout.headDim;
  const Rk = rankK * G;
  const Rv = rankV * G;
  const groups = Math.ceil(L / G);
  const vFull = rankV === 0 ? L * T * F : 0;
  return groups * T * (Rk + Rv) + L * F * (Rk + Rv) + vFull;
}

/**
 * The compression ratio as the xKV paper computes it: dense elements 2 · L · T · H_kv · d over
 * {@link paperCompressedElements}, both at the same bits per element (so `bits` cancels; it is kept
 * for symmetry with the authors' calculator).
 *
 * Differences from the measured ratio (`denseCacheBytes / byteSize()`), which kvpack reports beside it:
 * - a shorter last group (L mod G ≠ 0) is charged the full G layers' rank here, while kvpack uses
 *   r · (layers in the group), so the measured ratio is higher then;
 * - float32 storage halves the measured ratio; decode-time tokens held exactly in the residual
 *   buffer and quantization scales / zero points add bytes the formula does not count.
 * With float16 storage, L mod G = 0 and no decode tokens, the two agree exactly.
 */
export function paperCompressionRatio(a: PaperRatioArgs): number {
  const F = a.layout.nKvHeads * a.layout.headDim;
  const dense = 2 * a.layout.nLayers * a.tokens * F;
  return dense / paperCompressedElements(a);
}

/**
 * The matrices a grouped low-rank compression of `layers` layers factors: per group of n ≤ G layers,
 * keys and values each [T, n·H_kv·d] at rank n·r (G = 1: the per-layer SVD), merged by shape.
 */
export function groupFactoredShapes(layout: ModelLayout, layers: number, layersPerGroup: number, rankK: number, rankV: number): FactoredShape[] {
  const F = layout.nKvHeads * layout.headDim;
  const out = new Map<string, FactoredShape>();
  for (let s = 0; s < layers; s += layersPerGroup) {
    const n = Math.min(layersPerGroup, layers - s);
    for (const r of [rankK * n, rankV * n]) {
      const key = `${n * F}x${r}`;
      const e = out.get(key) ?? { features: n * F, rank: r, count: 0 };
      e.count++;
      out.set(key, e);
    }
  }
  return [...out.values()];
}

/**
 * The xKV authors' element count at explicit group ranks (e.g. resolved from a rank target): dense
 * 2 · L · T · H_kv · d over Σ_g T · (R_K,g + R_V,g) + Σ_l H_kv · d · (R_K,g(l) + R_V,g(l)), each group
 * charged its own ranks.
 */
export function groupRanksPaperRatio(layout: ModelLayout, tokens: number, layersPerGroup: number, ranks: { k: number[]; v: number[] }): number {
  const F = layout.nKvHeads * layout.headDim;
  let elements = 0;
  for (let s = 0, g = 0; s < layout.nLayers; s += layersPerGroup, g++) {
    const n = Math.min(layersPerGroup, layout.nLayers - s);
    elements += (tokens + n * F) * (ranks.k[g] + ranks.v[g]);
  }
  return (2 * layout.nLayers * tokens * F) / elements;
}
