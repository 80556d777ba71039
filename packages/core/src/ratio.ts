import { KvpackError, check } from './errors.js';

/*
 * The two ways a compression ratio is written:
 * - kvpack's ratio ρ = dense fp16 bytes ÷ bytes held (8 means 8×), what `denseCacheBytes / byteSize()` measures;
 * - NVIDIA/kvpress's `compression_ratio` c = the fraction of the cache removed, c = 1 − 1/ρ (0.5 is 2×, 0.875 is 8×).
 * Every ratio kvpack prints, writes or accepts goes through these helpers.
 */

/** kvpress's compression_ratio (fraction removed, in [0, 1)) of a ratio ρ ≥ 1 (×): 1 − 1/ρ. A ratio below 1 gives a negative fraction (the cache grew). */
export function compressionRatioOf(ratio: number): number {
  return 1 - 1 / ratio;
}

/**
 * kvpack's ratio ρ (×) of kvpress's compression_ratio c (fraction removed): 1 / (1 − c).
 * @throws KvpackError('config') when c is not a number in [0, 1).
 */
export function ratioOfCompressionRatio(compressionRatio: number): number {
  check(
    typeof compressionRatio === 'number' && Number.isFinite(compressionRatio) && compressionRatio >= 0 && compressionRatio < 1,
    'config',
    `compressionRatio must be a number in [0, 1) (the fraction of the cache removed: 0.5 is 2×, 0.875 is 8×), got ${compressionRatio}`,
  );
  return 1 / (1 - compressionRatio);
}

/** Both forms of a measured ratio, as kvpack writes them into JSON results. */
export interface RatioForms {
  /** Dense fp16 bytes ÷ bytes held (×). */
  ratio: number;
  /** kvpress's compression_ratio: the fraction removed, 1 − 1/ratio. */
  compressionRatio: number;
}

/** {@link RatioForms} of a ratio (×). */
export function ratioForms(ratio: number): RatioForms {
  return { ratio, compressionRatio: compressionRatioOf(ratio) };
}

/** A ratio in both forms for tables and logs: `8.00× (cr 0.875)`; `N/A` for a missing or NaN ratio. */
export function formatRatio(ratio: number | null | undefined, digits = 2): string {
  if (ratio === null || ratio === undefined || Number.isNaN(ratio)) return 'N/A';
  return `${ratio.toFixed(digits)}× (cr ${compressionRatioOf(ratio).toFixed(3)})`;
}

/**
 * The target ratio (×) of a config that gives `targetRatio` (×) or `compressionRatio` (kvpress's
 * fraction removed), or undefined when it gives neither. Both may be given when they agree (relative
 * difference ≤ 1e-9).
 * @throws KvpackError('config') when both are given and disagree, or either is out of range
 *   (targetRatio ≥ 1, compressionRatio in [0, 1)); `where` names the config in the message.
 */
export function targetRatioOf(config: { targetRatio?: unknown; compressionRatio?: unknown }, where = 'config'): number | undefined {
  const { targetRatio, compressionRatio } = config;
  if (targetRatio !== undefined)
    check(typeof targetRatio === 'number' && Number.isFinite(targetRatio) && targetRatio >= 1, 'config', `${where}: targetRatio must be a number ≥ 1 (dense fp16 bytes ÷ bytes held), got ${String(targetRatio)}`);
  let fromCr: number | undefined;
  if (compressionRatio !== undefined) {
    try {
      fromCr = ratioOfCompressionRatio(compressionRatio as number);
    } catch (e) {
      throw new KvpackError('config', `${where}: ${(e as Error).message}`);
    }
  }
  if (targetRatio !== undefined && fromCr !== undefined) {
    check(
      Math.abs((targetRatio as number) - fromCr) <= 1e-9 * fromCr,
      'config',
      `${where}: targetRatio ${String(targetRatio)} and compressionRatio ${String(compressionRatio)} disagree (compressionRatio ${String(compressionRatio)} is ${fromCr.toPrecision(6)}×; give one of them)`,
    );
  }
  return (targetRatio as number | undefined) ?? fromCr;
}

/**
 * Options with `compressionRatio` (kvpress's form) moved to `targetRatio` (×), for a strategy whose
 * options take a `targetRatio`: a copy, or the same object when it has no `compressionRatio`.
 * @throws KvpackError('config') as {@link targetRatioOf}.
 */
export function normalizeRatioOptions(options: unknown, where: string): unknown {
  if (!options || typeof options !== 'object' || Array.isArray(options) || !Object.hasOwn(options, 'compressionRatio')) return options;
  const o = options as Record<string, unknown>;
  const target = targetRatioOf(o, where);
  const { compressionRatio: _, ...rest } = o;
  return { ...rest, targetRatio: target };
}
