import {
  KvpackError,
  MAX_FEATURES,
  MAX_LAYERS,
  atMost,
  defineStrategy,
  getStrategyDefinition,
  listStrategies,
  parseStrategyOptions,
  targetRatioOf,
  type ModelLayout,
  type TokenSelector,
} from '@kvpack/core';
import { StackedCache, compressStacked, lowRankOptionShape, refineRankTarget, stackedGroupRanks, type GroupSvdConfig } from '@kvpack/strategy-utils';
import { z } from 'zod';

const { factorQuantization: _omit, ...lowRankShape } = lowRankOptionShape;

/** The eviction stage: a registered token-eviction strategy, resolved by name at run time. */
const EvictStageSchema = z.strictObject({
  /** A registered strategy with the `tokenSelector` capability (snapkv, streamingllm, …). */
  strategy: z.string().min(1).describe('Registered token-eviction strategy (one with the tokenSelector capability: snapkv, streamingllm, …).'),
  /** Its options (budget or targetRatio, window, …), checked against its schema. */
  options: z.record(z.string(), z.unknown()).prefault({}).describe("The eviction strategy's options (budget or targetRatio, window, …), checked against its schema."),
});

/** The low-rank stage over the kept tokens: xKV's options (without factorQuantization: that is the quantize stage). */
const LowRankStageSchema = z
  .strictObject({
    /** Layers per group G (consecutive from layer 0); default 4 as xKV-4; at most 1,024. */
    layersPerGroup: z.int().positive().max(MAX_LAYERS, { error: atMost(MAX_LAYERS, 'layers per group; models have far fewer layers') }).default(4).describe('Layers per group G of the cross-layer SVD over the kept tokens.'),
    ...lowRankShape,
    /** kvpress's form of this stage's targetRatio (the fraction removed); give one of them. */
    compressionRatio: z.number().min(0).lt(1).optional().describe("kvpress's compression_ratio (fraction removed) of this stage, instead of its targetRatio."),
  })
  .superRefine((o, ctx) => {
    refineRankTarget(o, ctx);
    try {
      targetRatioOf(o, 'lowRank');
    } catch (e) {
      ctx.addIssue({ code: 'custom', path: ['compressionRatio'], message: (e as Error).message });
    }
  });

/** The quantize stage: group-wise int8/int4 codes of the low-rank factors, bit-packed. */
const QuantizeStageSchema = z.strictObject({
  bits: z.union([z.literal(4), z.literal(8)]).describe('Bits per code (4 or 8), bit-packed.'),
  quantGroupSize: z.int().positive().max(MAX_FEATURES, { error: atMost(MAX_FEATURES, 'a group spans at most one factor row') }).default(32).describe('Elements per quantization group along each factor row.'),
  symmetric: z.boolean().default(false).describe('Symmetric (16-bit scale) or asymmetric (16-bit scale + uint8 zero point) groups.'),
  apply: z.enum(['basis', 'factors', 'both']).default('both').describe('Quantize the token bases, the per-layer factors, or both.'),
});

/** Options of the `stacked` strategy. */
export const StackedOptionsSchema = z
  .strictObject({
    /** Token eviction first (omit to keep every token). */
    evict: EvictStageSchema.optional().describe('Token eviction stage: a registered eviction strategy and its options (omit to keep every token).'),
    /** Grouped low rank over the kept tokens. */
    lowRank: LowRankStageSchema.prefault({}).describe('Low-rank stage: cross-layer SVD (xKV) of the kept tokens; ranks, or a targetRatio of this stage.'),
    /** Quantized factors (omit for float16 factors). */
    quantize: QuantizeStageSchema.optional().describe('Quantize stage: int8/int4 bit-packed factors (omit for float16 factors).'),
    /**
     * Overall target ratio (dense fp16 bytes of the T prefill tokens ÷ bytes held): the eviction stage
     * runs as configured, then the low-rank ranks (rankK : rankV proportion) are the largest whose
     * measured bytes reach it. Excludes lowRank.targetRatio / rankFraction; `compressionRatio` is accepted for it.
     */
    targetRatio: z.number().min(1).max(1e9).optional().describe('Overall target ratio (dense fp16 bytes ÷ bytes held): the low-rank ranks are resolved from it after the eviction stage.'),
  })
  .superRefine((o, ctx) => {
    if (o.targetRatio !== undefined && (o.lowRank.targetRatio !== undefined || o.lowRank.compressionRatio !== undefined || o.lowRank.rankFraction !== undefined))
      ctx.addIssue({ code: 'custom', path: ['targetRatio'], message: 'give the overall targetRatio or a lowRank targetRatio / rankFraction, not both' });
    if (o.evict) {
      try {
        evictStage(o.evict);
      } catch (e) {
        ctx.addIssue({ code: 'custom', path: ['evict'], message: (e as Error).message });
      }
    }
  });
export type StackedOptions = z.output<typeof StackedOptionsSchema>;

/** Registered strategies with the `tokenSelector` capability. */
function evictionStrategies(): string[] {
  return listStrategies().filter((n) => getStrategyDefinition(n).capabilities?.tokenSelector);
}

/**
 * The eviction stage's selector, resolved through the registry by name (strategies never import each
 * other), with its options parsed by its own schema.
 * @throws KvpackError('config' | 'unknown-strategy')
 */
function evictStage(e: { strategy: string; options: Record<string, unknown> }): { selector: TokenSelector; options: unknown; queryWindow: number } {
  const def = getStrategyDefinition(e.strategy);
  const make = def.capabilities?.tokenSelector;
  if (!make)
    throw new KvpackError('config', `stacked: "${e.strategy}" is not a token-eviction strategy (no tokenSelector capability); eviction strategies: ${evictionStrategies().join(', ') || '(none registered)'}`);
  const options = parseStrategyOptions(e.strategy, e.options);
  return { selector: make(options), options, queryWindow: def.capabilities?.queryWindow?.(options) ?? 0 };
}

/** The grouped low-rank settings of the options: lowRank with the quantize stage as factorQuantization. */
function lowRankConfig(o: StackedOptions): GroupSvdConfig {
  const { compressionRatio: _, ...lr } = o.lowRank;
  const target = targetRatioOf(o.lowRank, 'stacked lowRank');
  return { ...lr, targetRatio: target, factorQuantization: o.quantize };
}

/** The eviction selector (or none) and a label for stats. */
function stages(o: StackedOptions) {
  const ev = o.evict ? evictStage(o.evict) : null;
  return { selector: ev?.selector ?? null, label: o.evict ? o.evict.strategy : 'none', queryWindow: ev?.queryWindow ?? 0 };
}

/** Tokens kept per KV head and layer at T. */
function keptAt(o: StackedOptions, layout: ModelLayout, T: number): number {
  const { selector } = stages(o);
  return selector ? selector.kept(layout, T) : T;
}

/**
 * The `stacked` strategy: a composition, set up in configuration, of token eviction (any registered
 * strategy with the `tokenSelector` capability — SnapKV (Li et al. 2024), StreamingLLM (Xiao et al.
 * 2024) — resolved by name at run time) → xKV's cross-layer SVD over the kept tokens (Chang et al.
 * 2025, §3) → int8/int4 group-quantized, bit-packed factors. Kept keys are rebuilt pre-RoPE and rotated
 * at their true positions; the measured bytes are those of the final stored form (factors, scales,
 * zero points and kept positions), and `stats().stages` gives each stage's ratio, whose product is the
 * measured ratio.
 *
 * A target ratio: `targetRatio` (overall; resolves the low-rank ranks after the eviction stage, see
 * `stackedGroupRanks`), or per stage (the eviction strategy's own targetRatio, lowRank.targetRatio).
 * `compress` throws KvpackError('config') when a target is out of reach (naming the reachable range)
 * or the eviction stage cannot run (e.g. SnapKV without queries); KvpackError('rank') for ranks above
 * min(kept tokens, features); KvpackError('layout' | 'shape' | 'dtype' | 'nonfinite') on a bad cache.
 */
export const stackedDefinition = defineStrategy({
  name: 'stacked',
  description: 'stacked: token eviction (a registered scorer) → xKV cross-layer SVD of the kept tokens → int8/int4 bit-packed factors',
  schema: StackedOptionsSchema,
  capabilities: {
    queryWindow: (o) => stages(o).queryWindow,
    ratioTarget: (o) => (o.targetRatio === undefined ? null : { target: o.targetRatio, knob: 'ranks' }),
  },
  async compress(cache, options, T) {
    const s = stages(options);
    return compressStacked(
      cache,
      { strategy: 'stacked', options, selector: s.selector, evictLabel: s.label, lowRank: lowRankConfig(options), targetRatio: options.targetRatio },
      T,
    );
  },
  restore(r, options) {
    const s = stages(options);
    const { layout, prefillLength: T } = r.header;
    let config = lowRankConfig(options);
    if (options.targetRatio !== undefined) {
      const n = keptAt(options, layout, T);
      const stored = !!s.selector && !s.selector.impliedPositions;
      try {
        config = { ...config, groupRanks: stackedGroupRanks('stacked', config, layout, T, n, stored, options.targetRatio) };
      } catch (e) {
        throw new KvpackError('corrupt', `serialized stacked cache is corrupt: its options give no ranks at T = ${T} (${(e as Error).message})`);
      }
    }
    const implied = s.selector?.impliedPositions ? (t: number, n: number) => (n === t ? Int32Array.from({ length: t }, (_, i) => i) : s.selector!.impliedPositions!(t, n)) : null;
    return StackedCache.restore(r, 'stacked', options, config, (l, t) => keptAt(options, l, t), s.selector ? implied : (t) => Int32Array.from({ length: t }, (_, i) => i), s.label);
  },
});
