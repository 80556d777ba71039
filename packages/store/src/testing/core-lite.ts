// What the load workers need of @kvpack/core (errors and the container codec), without tfjs: a
// worker process then starts in well under a second. bundle-worker.ts maps @kvpack/core here.
export { KvpackError, check } from '../../../core/src/errors.js';
export { decodeContainer, encodeContainer } from '../../../core/src/serialize.js';
export { mulberry32 } from '../../../core/src/random.js';
export function deserializeCache(): never {
  throw new Error('the load workers do not restore caches');
}
export function cutCachePrefix(): never {
  throw new Error('the load workers do not cut caches');
}
/** No strategy is registered in a load worker: no links are written or followed. */
export function prefixCutter(): string {
  return 'no strategies in the load workers';
}
