// Types of tfjs's chained ops (x.reshape(), …) for this package's build; @kvpack/core registers them.
import type {} from '@tensorflow/tfjs-core/dist/public/chained_ops/register_all_chained_ops';
// What strategies share, as provider-utils is to vercel/ai's providers. Strategies import this
// package, never each other. Registers nothing. Tuning switches and kernels are in ./internal.ts.

// Grouped low-rank cache (xkv, svd): options, compression, the cache, its stats and the paper's ratio.
export { lowRankOptionShape, refineRankTarget, MlaLowRankOptionsSchema, type MlaLowRankOptions } from './lowrank/options.js';
export { paperCompressionRatio, groupFactoredShapes, groupRanksPaperRatio, type PaperRatioArgs } from './lowrank/ratio.js';
export { hasRankTarget, lowRankBytes, resolveRanks, targetGroupRanks, type GroupRanks } from './lowrank/rank-target.js';
export type { FactorQuantization, GroupSvdConfig, Kind, LayerGroup, QuantTarget } from './lowrank/group-config.js';
export { GroupSvdCache, groupSvdPrefixCut, lowRankStats, type SparseBudgetOptions } from './lowrank/group-svd-cache.js';
export type { GroupSvdStats } from './lowrank/group-svd-stats.js';
export { compressGroupSvd } from './lowrank/group-svd-compress.js';
export { MlaGroupSvdCache, compressMlaGroupSvd, mlaGroupRanks, mlaGroupSvdCompressor, mlaLowRankBytes, restoreMlaGroupSvd, type MlaGroupRanks } from './lowrank/mla-group-svd.js';
export { SparseOptionsSchema, type SparseOptions } from './lowrank/sparse-options.js';
export type { SparseIndex, SparseLayer } from './lowrank/sparse-index.js';

export * from './quant/quantize.js';
export * from './quant/packing.js';
export * from './quant/codes-tensor.js';
export * from './quant/held-quantized.js';
export * from './quant/half-rows.js';
export * from './quant/words.js';
export * from './quant/minmax-groups.js';
export * from './eviction/kept-tokens.js';
export * from './eviction/mla-kept-tokens.js';
export * from './eviction/scorer.js';
export { resolveBitsOption, resolveKnobByTarget, resolveBudgetByTarget } from './ratio/knob-target.js';
export { budgetAboveScorerWindow, budgetOption, budgetOrTarget, resolveBudgetOption, restoredBudget, targetRatioOption } from './ratio/budget-options.js';
export { StackedCache, type StackedStats, type StageStats } from './stack/stacked-cache.js';
export { compressStacked, keptPositionBytes, stackedBytes, stackedGroupRanks, type StackedStages } from './stack/stacked-compress.js';
export { decodePositions, encodePositions, positionEncoding, positionLayerBytes, type PositionEncoding } from './stack/positions.js';
export * from './eviction/snapkv-votes.js';
export * from './eviction/scorers.js';
export * from './eviction/budgets.js';
export * from './eviction/ragged-kept.js';
export * from './quant/rotation.js';
export { gatherRowsPackedWgsl } from './eviction/gather-wgsl.js';
export { packStatsColumn } from './quant/minmax-wgsl.js';
export { topKPositionsWgsl, plainScores, type WgslScoreSource } from './eviction/top-k-wgsl.js';
export { gemmTileWgsl, type GemmTileParts } from './wgsl-gemm-tile.js';
