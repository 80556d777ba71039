import * as tf from '@tensorflow/tfjs-core';
import type { z } from 'zod';
import { restoreStored, type BaseCompressedCache, type StoredReader } from './cache.js';
import { registerStrategy, type StrategyCapabilities, type StrategyDefinition } from './registry.js';
import type { KVCache, Strategy } from './types.js';
import { validateKVCache } from './validate.js';
import { isMlaCache, mlaRefusal, restoreMlaStored, validateMlaCache, type CompressedMlaCache, type MlaKVCache } from './mla.js';
import type { CompressedCache } from './types.js';

/**
 * A strategy in its shortest complete form. `compress` receives a validated cache (layer count,
 * shapes, dtypes and no NaN/Inf already checked; T its token count) and the parsed options;
 * `restore` rebuilds a cache from its serialization through a {@link StoredReader}.
 */
export interface StrategySpec<S extends z.ZodType, C extends BaseCompressedCache> {
  /** Registered name: lower-case kebab-case. */
  name: string;
  /** One line for `kvpack strategies` and error messages, with the method's source. */
  description: string;
  /** Options schema with defaults; unknown keys rejected (z.strictObject). */
  schema: S;
  /** Compresses a prefill cache ([T, H_kv, d] pre-RoPE keys and values per layer). Does not dispose `cache`. */
  compress(cache: KVCache, options: z.output<S>, T: number): Promise<C>;
  /** Rebuilds the cache that `serialize()` wrote, reading its declared items by name. */
  restore(reader: StoredReader, options: z.output<S>): C;
  capabilities?: StrategyCapabilities<z.output<S>>;
  /** Former option names, old → new (see {@link StrategyDefinition.renamedOptions}). */
  renamedOptions?: Record<string, string>;
}

/** The {@link Strategy} of a spec at resolved options. */
export function specStrategy<S extends z.ZodType, C extends BaseCompressedCache>(spec: StrategySpec<S, C>, options: z.output<S>): Strategy<z.output<S>> {
  const mla = spec.capabilities?.mla?.(options);
  const compress = async (cache: KVCache | MlaKVCache): Promise<CompressedCache | CompressedMlaCache> => {
    if (isMlaCache(cache)) {
      if (mla === undefined || typeof mla === 'string') throw mlaRefusal(spec.name, mla);
      return mla.compress(cache, await validateMlaCache(cache));
    }
    return spec.compress(cache, options, await validateKVCache(cache));
  };
  return {
    name: spec.name,
    options,
    compress: compress as Strategy['compress'],
    deserialize: (bytes) => restoreStored(bytes, spec.name, (r) => spec.restore(r, options)),
    ...(mla !== undefined && typeof mla !== 'string'
      ? { deserializeMla: (bytes: Uint8Array) => restoreMlaStored(bytes, spec.name, (r) => mla.restore(r)) }
      : {}),
  };
}

/**
 * Defines and registers a strategy from its {@link StrategySpec}: validation before `compress`,
 * deserialization through `restore`, registration under `spec.name`. Returns the definition.
 * @throws KvpackError('config') as {@link registerStrategy}.
 */
export function defineStrategy<S extends z.ZodType, C extends BaseCompressedCache>(spec: StrategySpec<S, C>): StrategyDefinition<S> {
  const def: StrategyDefinition<S> = {
    name: spec.name,
    description: spec.description,
    schema: spec.schema,
    create: (options) => specStrategy(spec, options),
    ...(spec.capabilities ? { capabilities: spec.capabilities } : {}),
    ...(spec.renamedOptions ? { renamedOptions: spec.renamedOptions } : {}),
    signature: [spec.compress, spec.restore, spec.capabilities ? Object.values(spec.capabilities) : []].flat().map(String).join('\n'),
  };
  registerStrategy(def);
  return def;
}

/**
 * Runs an asynchronous build that allocates tensors: `own(t)` records each tensor it keeps; if the
 * build throws, every recorded tensor still alive is disposed before the error propagates, so a
 * failed compress leaks nothing. (The synchronous counterpart is `disposeCreatedOnError`.)
 */
export async function disposeOwnedOnError<T>(build: (own: <X extends tf.Tensor | null | undefined>(t: X) => X) => Promise<T>): Promise<T> {
  const owned: tf.Tensor[] = [];
  try {
    return await build((t) => {
      if (t) owned.push(t);
      return t;
    });
  } catch (e) {
    tf.dispose(owned.filter((t) => !t.isDisposed));
    throw e;
  }
}
