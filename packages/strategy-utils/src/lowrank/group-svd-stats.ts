import { compressionRatioOf, denseCacheBytes, specBytes, type ModelLayout } from '@kvpack/core';
import { blockSpecs, type Block } from './factor-blocks.js';
import { rankOf, type GroupSvdConfig, type LayerGroup } from './group-config.js';
import { groupRanksPaperRatio, paperCompressionRatio } from './ratio.js';

/** Byte breakdown and ratios of a grouped low-rank cache; see {@link GroupSvdCache.stats}. */
export interface GroupSvdStats {
  strategy: string;
  /** Prefill tokens T. */
  tokens: number;
  layersPerGroup: number;
  /** The key and value rank R_g each group got (resolved from the rank target when one was given). */
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
  /** denseBytes / totalBytes (×). */
  measuredRatio: number;
  /** The same in kvpress's form, compression_ratio: the fraction removed, 1 − 1/measuredRatio. */
  measuredCompressionRatio: number;
  /** The xKV authors' formula ({@link paperCompressionRatio}) at 16 bits per element; with resolved group ranks, {@link groupRanksPaperRatio}. */
  paperRatio: number;
}

/**
 * The byte breakdown of a grouped low-rank cache from its stored blocks and its total `byteSize()`
 * (the residual decode tokens are the rest), with the measured ratio next to the xKV paper's formula
 * ({@link paperCompressionRatio}).
 */
export function groupSvdStats(a: {
  strategy: string;
  config: GroupSvdConfig;
  layout: ModelLayout;
  tokens: number;
  groups: LayerGroup[];
  basis: Block[];
  factors: Block[];
  totalBytes: number;
}): GroupSvdStats {
  const { config, layout, tokens, totalBytes } = a;
  const bytesOf = (bs: Block[]) => bs.flatMap((b) => blockSpecs(b, config.storage)).reduce((s, spec) => s + specBytes(spec), 0);
  const basisBytes = bytesOf(a.basis);
  const factorBytes = bytesOf(a.factors);
  const denseBytes = denseCacheBytes(layout, tokens);
  return {
    strategy: a.strategy,
    tokens,
    layersPerGroup: config.layersPerGroup,
    groups: a.groups.map((g) => ({ layers: [...g.layers], rankK: rankOf(config, 'k', g), rankV: rankOf(config, 'v', g) })),
    basisBytes,
    factorBytes,
    residualBytes: totalBytes - basisBytes - factorBytes,
    totalBytes,
    denseBytes,
    measuredRatio: denseBytes / totalBytes,
    measuredCompressionRatio: compressionRatioOf(denseBytes / totalBytes),
    paperRatio: config.groupRanks
      ? groupRanksPaperRatio(layout, tokens, config.layersPerGroup, config.groupRanks)
      : paperCompressionRatio({ layout, tokens, layersPerGroup: config.layersPerGroup, rankK: config.rankK, rankV: config.rankV }),
  };
}
