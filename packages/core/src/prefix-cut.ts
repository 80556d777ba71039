import { BaseCompressedCache } from './cache.js';
import { KvpackError } from './errors.js';
import { getStrategyDefinition, type PrefixCutter } from './registry.js';
import type { CompressedCache } from './types.js';

/**
 * How caches of a registered strategy made with `options` (resolved, as a cache records them) are cut
 * to a prefix (capability `cutPrefix`), or a sentence saying why they cannot be.
 * @throws KvpackError('unknown-strategy') when the strategy is not registered.
 */
export function prefixCutter(strategy: string, options: unknown): PrefixCutter | string {
  const cap = getStrategyDefinition(strategy).capabilities?.cutPrefix;
  if (!cap) return `${strategy} declares no prefix cut (its compressed prefill is not a sequence of per-token rows); store and restore whole prefixes`;
  return cap(options);
}

/**
 * A compressed cache cut to its first `tokens` tokens without compressing again (see
 * {@link PrefixCutter}): a new cache owning its tensors; `cache` stays usable and is not disposed.
 * The strategy must be registered (import its package).
 * @throws KvpackError('unsupported') when the cache's strategy or options cannot be cut (the message
 *   says why); KvpackError('shape') for a token count outside [1, tokenCount].
 */
export async function cutCachePrefix(cache: CompressedCache, tokens: number): Promise<CompressedCache> {
  const options = cache instanceof BaseCompressedCache ? cache.options : undefined;
  const cut = prefixCutter(cache.strategy, options);
  if (typeof cut === 'string') throw new KvpackError('unsupported', `cannot cut a ${cache.strategy} cache to a prefix: ${cut}`);
  return cut(cache, tokens);
}
