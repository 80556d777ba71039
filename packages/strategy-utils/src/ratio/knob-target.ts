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
