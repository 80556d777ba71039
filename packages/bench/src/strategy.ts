import { compressesMla, createResolvedStrategy, getStrategyDefinition, parseStrategyOptions, type FactoredShape, type ModelLayout, type Strategy, type StrategyCapabilities } from '@kvpack/core';

/**
 * A strategy and its options resolved by the strategy's schema (defaults applied). The bench parses
 * options once, when a setting is loaded, and reads everything it needs to know about a strategy
 * from the definition's capabilities — never from its name.
 */
export interface ResolvedStrategy {
  /** Registered strategy name. */
  name: string;
  /** Options after the strategy's schema. */
  resolvedOptions: Record<string, unknown>;
}

/**
 * Resolves options with the strategy's schema (defaults applied).
 * @throws KvpackError('unknown-strategy' | 'config')
 */
export function resolveStrategy(name: string, options: unknown): ResolvedStrategy {
  return { name, resolvedOptions: parseStrategyOptions(name, options) as Record<string, unknown> };
}

/** Builds the strategy of resolved options. */
export function buildStrategy(s: ResolvedStrategy): Strategy {
  return createResolvedStrategy(s.name, s.resolvedOptions);
}

function capabilities(name: string): StrategyCapabilities {
  return getStrategyDefinition(name).capabilities ?? {};
}

/** Post-RoPE query window (tokens) the strategy's `compress` reads; 0 for query-agnostic strategies. */
export function strategyQueryWindow(s: ResolvedStrategy): number {
  return capabilities(s.name).queryWindow?.(s.resolvedOptions) ?? 0;
}

/** The ratio the strategy's paper reports for these options on `layout` at `tokens` tokens, or null when it declares none. */
export function strategyPaperRatio(s: ResolvedStrategy, layout: ModelLayout, tokens: number): number | null {
  const r = capabilities(s.name).paperRatio?.(s.resolvedOptions, layout, tokens);
  return r !== undefined && Number.isFinite(r) ? r : null;
}

/** The target ratio the options ask for and the knob it resolves (capability `ratioTarget`), or null when they set the knob directly. */
export function strategyRatioTarget(s: ResolvedStrategy): { target: number; knob: string } | null {
  return capabilities(s.name).ratioTarget?.(s.resolvedOptions) ?? null;
}

/** The low-rank matrices the strategy's `compress` factors over `layers` layers (empty for other strategies). */
export function strategyFactoredShapes(s: ResolvedStrategy, layout: ModelLayout, layers: number): FactoredShape[] {
  return capabilities(s.name).factoredShapes?.(s.resolvedOptions, layout, layers) ?? [];
}

/** Whether the strategy compresses MLA latent caches at these options: true, or the sentence its definition gives why not. */
export function strategyCompressesMla(s: ResolvedStrategy): true | string {
  return compressesMla(s.name, s.resolvedOptions);
}
