import { KvpackError, compressionRatioOf } from '@kvpack/core';

/**
 * Resolves a discrete knob (bits, a start layer, …) from a target ratio ρ (dense fp16 bytes ÷ bytes
 * held): the first of `candidates` — ordered best quality first, i.e. most bytes first — whose bytes
 * right after compress satisfy `bytes · ρ ≤ denseBytes`, so the measured ratio is ≥ ρ.
 * @throws KvpackError('config') when no candidate reaches ρ, naming the reachable range
 *   (the ratios of the first and last candidates) at this T.
 */
export function resolveKnobByTarget<K>(a: {
  strategy: string;
  knob: string;
  target: number;
  tokens: number;
  denseBytes: number;
  candidates: readonly K[];
  bytesOf: (k: K) => number;
}): K {
  for (const k of a.candidates) if (a.bytesOf(k) * a.target <= a.denseBytes) return k;
  const ratios = a.candidates.map((k) => a.denseBytes / a.bytesOf(k));
  const lo = Math.min(...ratios);
  const hi = Math.max(...ratios);
  const last = a.candidates[a.candidates.length - 1];
  throw new KvpackError(
    'config',
    `${a.strategy}: targetRatio ${a.target} (compressionRatio ${compressionRatioOf(a.target).toFixed(4)}) is out of reach at T=${a.tokens}: ` +
      `${a.knob} ${String(last)} already gives only ${(a.denseBytes / a.bytesOf(last)).toFixed(3)}×; reachable with these options: ${lo.toFixed(3)}× to ${hi.toFixed(3)}×`,
  );
}

/**
 * Resolves a token budget (tokens kept per KV head and layer, on average) from a target ratio ρ
 * (dense fp16 bytes ÷ bytes held): the largest n in [least, tokens] whose bytes right after compress
 * satisfy `bytes(n) · ρ ≤ denseBytes`, so the measured ratio is ≥ ρ with the most tokens kept.
 * `bytesOf` must not decrease with n (binary search).
 * @throws KvpackError('config') when even `least` tokens (the fewest the options allow) stay below ρ,
 *   naming the reachable range at this T.
 */
export function resolveBudgetByTarget(a: {
  strategy: string;
  target: number;
  tokens: number;
  denseBytes: number;
  /** The smallest budget the options allow (≥ 1). */
  least: number;
  bytesOf: (n: number) => number;
}): number {
  const least = Math.max(1, Math.min(a.least, a.tokens));
  const fits = (n: number) => a.bytesOf(n) * a.target <= a.denseBytes;
  if (!fits(least)) {
    const best = a.denseBytes / a.bytesOf(least);
    const worst = a.denseBytes / a.bytesOf(a.tokens);
    throw new KvpackError(
      'config',
      `${a.strategy}: targetRatio ${a.target} (compressionRatio ${compressionRatioOf(a.target).toFixed(4)}) is out of reach at T=${a.tokens}: ` +
        `the fewest tokens these options keep (${least} per KV head and layer) give ${best.toFixed(3)}×; reachable: ${Math.min(worst, best).toFixed(3)}× to ${best.toFixed(3)}×`,
    );
  }
  let lo = least; // fits
  let hi = a.tokens + 1; // first that does not fit, or past the end
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (fits(mid)) lo = mid;
    else hi = mid;
  }
  return lo;
}

/**
 * Options with a quantizer's `bits` fixed for a prefill of T tokens: as given, `fallback` when unset,
 * or — with a targetRatio ρ — the first of `candidates` (most bits first) whose bytes right after
 * compress, `bytesOf(b)`, times ρ are ≤ the dense fp16 bytes ({@link resolveKnobByTarget}). The
 * result records bits, not the target.
 * @throws KvpackError('config') when the last candidate does not reach ρ, naming the reachable range.
 */
export function resolveBitsOption<O extends { bits?: B; targetRatio?: number }, B extends number>(a: {
  strategy: string;
  options: O;
  fallback: B;
  tokens: number;
  denseBytes: number;
  candidates: readonly B[];
  bytesOf: (b: B) => number;
}): O & { bits: B } {
  const o = a.options;
  if (o.targetRatio === undefined) return { ...o, bits: o.bits ?? a.fallback };
  const bits = resolveKnobByTarget({ strategy: a.strategy, knob: 'bits', target: o.targetRatio, tokens: a.tokens, denseBytes: a.denseBytes, candidates: a.candidates, bytesOf: a.bytesOf });
  const { targetRatio: _, ...rest } = o;
  return { ...rest, bits } as O & { bits: B };
}
