import { readFileSync } from 'node:fs';
import type * as tf from '@tensorflow/tfjs-core';
import { extname } from 'node:path';
import { parse as parseYaml } from 'yaml';
import { z } from 'zod';
import { KvpackError, check } from './errors.js';
import { BaseCompressedCache, unreadMessage } from './cache.js';
import { normalizeRatioOptions } from './ratio.js';
import { BaseCompressedMlaCache } from './mla.js';
import { byteView, decodeContainer, withDecodedContainer, type ByteSource, type DecodedContainer } from './serialize.js';
import { disposeCreatedOnError } from './scope.js';
import type { CompressedCache, KVCache, ModelLayout, Strategy } from './types.js';
import { isMlaCache, isMlaContainer, mlaRefusal, type CompressedMlaCache, type MlaCompressor, type MlaKVCache } from './mla.js';

/** A low-rank factorization a strategy computes: `count` matrices of [T, features] factored at `rank`. */
export interface FactoredShape {
  /** Columns of the factored matrix (e.g. G·H_kv·d for an xKV group). */
  features: number;
  /** Rank of the factorization. */
  rank: number;
  /** How many such matrices one compression factors. */
  count: number;
}

/**
 * What benchmarks and runners need to know about a strategy without knowing its name. Every member
 * takes the strategy's resolved (parsed, defaulted) options.
 */
export interface StrategyCapabilities<O = unknown> {
  /**
   * Post-RoPE queries of the last prompt tokens that `compress` reads (`KVCache.queries`), in tokens;
   * 0 or absent for query-agnostic strategies.
   */
  queryWindow?(options: O): number;
  /** The ratio the method's paper reports for these options on this layout at T tokens (dense fp16 ÷ compressed elements). */
  paperRatio?(options: O, layout: ModelLayout, tokens: number): number;
  /** The matrices `compress` factors for a cache of `layers` layers (for timing against matmul floors). */
  factoredShapes?(options: O, layout: ModelLayout, layers: number): FactoredShape[];
  /**
   * Layers of an `nLayers`-layer model that these options leave uncompressed (e.g. MiniCache below
   * its start layer): a report warns that retrieval happening there cannot show the method's loss.
   */
  exactLayers?(options: O, nLayers: number): number[];
  /**
   * How a cache made with these options is cut to its first t tokens without compressing again (a
   * stored prefix served to a shorter query), or a sentence saying why it cannot be. Absent: the
   * strategy's caches cannot be cut. Use {@link cutCachePrefix} rather than calling it directly.
   */
  cutPrefix?(options: O): PrefixCutter | string;
  /**
   * The target ratio these options ask for (`targetRatio`, or kvpress's `compressionRatio` as the
   * registry converts it) and the knob compress resolves from it for the actual T and layout (e.g.
   * `budget`, `bits`, `ranks`), so that the measured ratio (dense fp16 bytes ÷ `byteSize()` right
   * after compress) is ≥ the target; null when these options set the knob directly. A strategy with
   * this capability accepts `targetRatio`; one whose target is out of reach throws a KvpackError
   * naming the reachable range.
   */
  ratioTarget?(options: O): { target: number; knob: string } | null;
  /**
   * The token selection of a token-eviction strategy, for compositions that evict first and compress
   * the kept tokens further (the `stacked` strategy resolves it by name through the registry).
   */
  tokenSelector?(options: O): TokenSelector;
  /**
   * The context-reconstruction pass `compress` reads (`KVCache.reconstructionScores`), or null when
   * these options need none: the runner re-reads the prompt through the model after `prompt` and
   * hands the attention maxima to `compress`.
   */
  reconstruction?(options: O): ReconstructionRequest | null;
  /**
   * How these options compress MLA latent caches ({@link MlaKVCache}: per layer c_KV [T, d_c] and
   * the shared pre-RoPE k_R [T, d_R]), or a sentence saying why they do not. Absent: the strategy
   * refuses MLA caches with KvpackError('unsupported') naming itself. `Strategy.compress` dispatches
   * on the cache's `kind`; read {@link compressesMla} rather than calling it directly.
   */
  mla?(options: O): MlaCompressor | string;
}

/**
 * Which prefill tokens a token-eviction method keeps, apart from how the kept tokens are stored.
 * Positions are 0-based token indices (the token at position startPosition + p).
 */
export interface TokenSelector {
  /**
   * Tokens kept per KV head and layer at T prefill tokens on this layout (the budget, resolved from
   * a target ratio when the options give one).
   * @throws KvpackError when a target ratio is out of reach.
   */
  kept(layout: ModelLayout, T: number): number;
  /**
   * Present when the positions depend only on T and the options (implied, not stored): the n kept
   * positions [n], ascending, the same for every KV head.
   */
  impliedPositions?(T: number, n: number): Int32Array;
  /** Checks what the selection needs (queries, layout) before any layer. @throws KvpackError */
  check?(cache: KVCache): void;
  /**
   * Kept positions of one layer, ascending per head: host [n, H_kv] row-major, or an int32 backend
   * tensor [H_kv, n] (handed over), or null to keep all T. `postKeys` are the layer's post-RoPE keys
   * [T, H_kv, d] (owned by the caller). `n` is {@link kept}.
   */
  select(cache: KVCache, layer: number, postKeys: tf.Tensor3D, T: number, n: number): Promise<Int32Array | tf.Tensor2D | null>;
}

/**
 * A context-reconstruction pass (KVzip, Kim et al. 2025, arXiv 2505.23416): after the prefill of the
 * context, the model reads `prompt` followed by the context again (in chunks of `chunkSize` context
 * tokens, each after the prompt and the last 8 tokens of the chunk before) through the prefilled
 * cache; each KV pair's score is the largest attention it receives from any query head and repeated
 * token, the softmax taken over the first min(nSink, chunk start) tokens, the chunk and the repeated
 * tokens.
 */
export interface ReconstructionRequest {
  /** Instruction read before the context (text; a runner without a tokenizer reads the context alone). */
  prompt: string;
  /** Context tokens per reconstruction chunk. */
  chunkSize: number;
  /** Attention-sink tokens kept in every chunk's softmax. */
  nSink: number;
}

/**
 * Whether a registered strategy compresses MLA latent caches at these resolved options: true, or the
 * sentence saying why not (from its definition, never from its name).
 */
export function compressesMla(name: string, resolvedOptions: unknown): true | string {
  const m = getStrategyDefinition(name).capabilities?.mla?.(resolvedOptions);
  if (m === undefined) return 'its definition declares no MLA support';
  return typeof m === 'string' ? m : true;
}

/**
 * Cuts a compressed cache to its first `tokens` tokens (1 ≤ tokens ≤ tokenCount), returning a new
 * cache that owns its tensors (the input stays usable): the compressed prefill restricted to its
 * first min(tokens, prefillLength) tokens with the same stored factors, codes or values, then the
 * first tokens − prefillLength exact decode tokens. Decoding over the result equals decoding over a
 * cache holding exactly those stored numbers.
 */
export type PrefixCutter = (cache: CompressedCache, tokens: number) => Promise<CompressedCache>;

/**
 * A registered compression method: a name, a zod schema for its options (with defaults), a
 * factory, and what runners may ask of it. Register with {@link registerStrategy}; build with
 * {@link createStrategy}.
 */
export interface StrategyDefinition<S extends z.ZodType = z.ZodType> {
  name: string;
  /** One line for `kvpack strategies` and error messages. */
  description: string;
  /** Options schema; unknown keys must be rejected (use z.strictObject). */
  schema: S;
  create(options: z.output<S>): Strategy<z.output<S>>;
  /** Capabilities a benchmark reads instead of recognizing the strategy by name. */
  capabilities?: StrategyCapabilities<z.output<S>>;
  /**
   * Identity of the definition's behaviour, compared when a name is registered again (the same
   * package loaded twice, as ESM and as CommonJS, registers equal definitions); `create`'s source
   * when absent. `defineStrategy` sets it from the spec's functions.
   */
  signature?: string;
  /**
   * Former option names still accepted, old → new, as dotted paths (`'factorQuantization.groupSize':
   * 'factorQuantization.quantGroupSize'`): the value moves to the new name with a deprecation warning.
   */
  renamedOptions?: Record<string, string>;
}

/** A strategy config: `{ name, options }` as plain object, JSON or YAML. */
export const StrategyConfigSchema = z.strictObject({
  name: z.string().min(1),
  options: z.record(z.string(), z.unknown()).optional(),
});
export type StrategyConfig = z.infer<typeof StrategyConfigSchema>;

// One registry per process, even if both the ESM and CJS builds of core are loaded.
const KEY = Symbol.for('kvpack.strategy-registry');
const g = globalThis as unknown as Record<symbol, Map<string, StrategyDefinition>>;
const registry: Map<string, StrategyDefinition> = (g[KEY] ??= new Map());

/**
 * Registers a strategy under `def.name`. Registering the same definition again (a package imported
 * twice) is a no-op; registering a different definition under a taken name is refused, so that one
 * package cannot silently replace another's strategy: {@link unregisterStrategy} it first.
 * @throws KvpackError('config') for a name that is not lower-case kebab-case, or already taken.
 */
export function registerStrategy<S extends z.ZodType>(def: StrategyDefinition<S>): void {
  check(/^[a-z][a-z0-9-]*$/.test(def.name), 'config', `strategy name "${def.name}" must be lower-case kebab-case`);
  const old = registry.get(def.name);
  if (old === (def as unknown as StrategyDefinition)) return;
  check(
    !old || (old.description === def.description && definitionSignature(old) === definitionSignature(def as unknown as StrategyDefinition)),
    'config',
    `a different strategy is already registered as "${def.name}" (${old?.description}); unregisterStrategy("${def.name}") first to replace it`,
  );
  registry.set(def.name, def as unknown as StrategyDefinition);
}

function definitionSignature(d: StrategyDefinition): string {
  return d.signature ?? d.create.toString();
}

/** Removes a registered strategy; returns whether one was registered under `name`. */
export function unregisterStrategy(name: string): boolean {
  return registry.delete(name);
}

/** Registered strategy names, sorted. */
export function listStrategies(): string[] {
  return [...registry.keys()].sort();
}

/**
 * kvpack's own strategies and what registers each: importing the package (or calling its
 * registration function, for bundles that drop unused imports) makes the name available.
 */
export const FIRST_PARTY_STRATEGIES: Readonly<Record<string, { package: string; register: string }>> = {
  dense: { package: '@kvpack/core', register: "import '@kvpack/core'" },
  xkv: { package: '@kvpack/xkv', register: "import { registerXkv } from '@kvpack/xkv'; registerXkv()" },
  ...Object.fromEntries(
    ['svd', 'quant', 'kivi', 'minicache', 'streamingllm', 'snapkv', 'adakv', 'pyramidkv', 'expected-attention', 'turboquant', 'kvzip', 'stacked'].map((n) => [
      n,
      { package: '@kvpack/baselines', register: "import { registerBaselines } from '@kvpack/baselines'; registerBaselines()" },
    ]),
  ),
};

/** Levenshtein edit distance (insert, delete, substitute; an adjacent swap counts 1, as in Damerau's). */
function editDistance(a: string, b: string): number {
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) => Array.from({ length: b.length + 1 }, (_, j) => (i === 0 ? j : j === 0 ? i : 0)));
  for (let i = 1; i <= a.length; i++)
    for (let j = 1; j <= b.length; j++) {
      d[i][j] = Math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) d[i][j] = Math.min(d[i][j], d[i - 2][j - 2] + 1);
    }
  return d[a.length][b.length];
}

/** The known name nearest to `name` (at most 2 edits, or a case/separator variant), or null. */
export function nearestStrategyName(name: string, candidates: Iterable<string>): string | null {
  const norm = (s: string) => s.toLowerCase().replace(/[-_ ]/g, '');
  let best: string | null = null;
  let bestD = Infinity;
  for (const c of candidates) {
    const dist = norm(c) === norm(name) ? 0 : editDistance(name.toLowerCase(), c);
    if (dist < bestD) [best, bestD] = [c, dist];
  }
  return bestD <= Math.min(2, Math.max(1, Math.floor(name.length / 2))) ? best : null;
}

/**
 * The definition registered under `name`.
 * @throws KvpackError('unknown-strategy') listing the registered names, naming the import that
 *   registers a known strategy, and suggesting the nearest name (`xvk` → `xkv`).
 */
export function getStrategyDefinition(name: string): StrategyDefinition {
  const def = registry.get(name);
  if (!def) {
    const known = listStrategies();
    const firstParty = FIRST_PARTY_STRATEGIES[name];
    const near = firstParty ? null : nearestStrategyName(name, new Set([...known, ...Object.keys(FIRST_PARTY_STRATEGIES)]));
    const hint = firstParty
      ? `; "${name}" is in ${firstParty.package}, not registered in this process: ${firstParty.register}`
      : near
        ? `; did you mean "${near}"?${registry.has(near) ? '' : ` (registered by ${FIRST_PARTY_STRATEGIES[near].package}: ${FIRST_PARTY_STRATEGIES[near].register})`}`
        : '; a third-party strategy registers when its package is imported (kvpack CLI: list it under `plugins:` in the config)';
    throw new KvpackError(
      'unknown-strategy',
      `unknown strategy "${name}"; registered strategies: ${known.length ? known.join(', ') : '(none)'}${hint}`,
    );
  }
  return def;
}

function optionKeys(schema: z.ZodType): string[] {
  const shape = (schema as unknown as { shape?: Record<string, unknown> }).shape;
  return shape ? Object.keys(shape) : [];
}

/**
 * Validates options against a strategy's schema and applies defaults.
 * @throws KvpackError('config') naming each bad option and listing the allowed ones.
 */
export function parseStrategyOptions(name: string, options: unknown): unknown {
  const def = getStrategyDefinition(name);
  // A target ratio may be given as kvpress's compressionRatio (fraction removed) where the strategy takes targetRatio.
  const renamed = renameOptions(name, options ?? {}, def.renamedOptions);
  const r = def.schema.safeParse(optionKeys(def.schema).includes('targetRatio') ? normalizeRatioOptions(renamed, `options of strategy "${name}"`) : renamed);
  if (!r.success) {
    const allowed = optionKeys(def.schema);
    throw new KvpackError(
      'config',
      `invalid options for strategy "${name}":\n${z.prettifyError(r.error)}` +
        (allowed.length ? `\nallowed options: ${[...allowed, ...(allowed.includes('targetRatio') ? ['compressionRatio (kvpress form of targetRatio)'] : [])].join(', ')}` : ''),
    );
  }
  return r.data;
}

const warned = new Set<string>();

/** Options with former names moved to their current ones (a copy), warning once per name. */
function renameOptions(strategy: string, options: unknown, renamed: Record<string, string> | undefined): unknown {
  if (!renamed || !options || typeof options !== 'object' || Array.isArray(options)) return options;
  let out = options as Record<string, unknown>;
  for (const [from, to] of Object.entries(renamed)) {
    const path = from.split('.');
    const oldKey = path[path.length - 1];
    const newKey = to.split('.').pop()!;
    // Shallow copies of the objects along the path only: the rest of the options is left as given.
    const chain: Record<string, unknown>[] = [out];
    for (const k of path.slice(0, -1)) {
      const next = chain[chain.length - 1][k];
      if (!next || typeof next !== 'object' || Array.isArray(next)) break;
      chain.push(next as Record<string, unknown>);
    }
    if (chain.length !== path.length) continue;
    const parent = chain[chain.length - 1];
    if (!Object.hasOwn(parent, oldKey) || Object.hasOwn(parent, newKey)) continue; // both given: the schema reports the old one
    const copies = chain.map((o) => ({ ...o }));
    for (let i = 1; i < copies.length; i++) copies[i - 1][path[i - 1]] = copies[i];
    const p = copies[copies.length - 1];
    p[newKey] = p[oldKey];
    delete p[oldKey];
    out = copies[0];
    const note = `kvpack: option "${from}" of strategy "${strategy}" is now "${to}"; the old name still works but is deprecated`;
    if (!warned.has(note)) {
      warned.add(note);
      const proc = (globalThis as { process?: { emitWarning?: (m: string, t: string) => void } }).process;
      if (proc?.emitWarning) proc.emitWarning(note, 'DeprecationWarning');
      else console.warn(note);
    }
  }
  return out;
}

/** Reads a strategy config (or any config object) from a .json, .yaml or .yml file. */
export function readConfigFile(path: string): unknown {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new KvpackError('io', `cannot read config file ${path}: ${(e as Error).message}`, { cause: e });
  }
  const ext = extname(path).toLowerCase();
  if (ext !== '.json' && ext !== '.yaml' && ext !== '.yml')
    throw new KvpackError('config', `config file ${path}: unsupported extension "${ext}" (use .json, .yaml or .yml)`);
  return parseConfigText(text, ext === '.json' ? 'json' : 'yaml', `config file ${path}`);
}

/**
 * Parses a strategy config (or any config object) written as JSON or YAML text — a text box on a page,
 * a request body — as {@link readConfigFile} parses a file; pass the result to {@link createStrategy}.
 * @param format `yaml` (default) also reads JSON, which is valid YAML
 * @param source what the text is, for messages
 * @throws KvpackError('config') for text that is not valid JSON / YAML, naming the line.
 */
export function parseConfigText(text: string, format: 'json' | 'yaml' = 'yaml', source = 'config'): unknown {
  try {
    return format === 'json' ? JSON.parse(text) : parseYaml(text);
  } catch (e) {
    throw new KvpackError('config', `${source} is not valid ${format.toUpperCase()}: ${(e as Error).message}`, { cause: e });
  }
}

/**
 * Builds a strategy from `{ name, options }` (a plain object) or from the path of a JSON/YAML file
 * holding one.
 * @throws KvpackError('unknown-strategy' | 'config' | 'io')
 */
export function createStrategy(config: StrategyConfig | string): Strategy {
  const raw = typeof config === 'string' ? readConfigFile(config) : config;
  const parsed = StrategyConfigSchema.safeParse(raw);
  if (!parsed.success) throw new KvpackError('config', `invalid strategy config:\n${z.prettifyError(parsed.error)}\nexpected { name: string, options?: object }`);
  const def = getStrategyDefinition(parsed.data.name);
  const options = parseStrategyOptions(parsed.data.name, parsed.data.options);
  return guardStrategy(def.create(options), def, options);
}

/**
 * Builds a registered strategy from options already resolved by {@link parseStrategyOptions} (its
 * schema's output), without parsing them again: what a runner that resolves its settings once uses.
 * @throws KvpackError('unknown-strategy')
 */
export function createResolvedStrategy(name: string, resolvedOptions: unknown): Strategy {
  const def = getStrategyDefinition(name);
  return guardStrategy(def.create(resolvedOptions), def, resolvedOptions);
}

/**
 * The strategy with the guarantees every registered strategy gets from core: `compress` records the
 * input cache's model fingerprint on the result and refuses an MLA latent cache unless the definition's
 * `mla` capability compresses it, and `deserialize` is {@link restoreCache}.
 */
function guardStrategy(s: Strategy, def: StrategyDefinition, options: unknown): Strategy {
  const compress = async (cache: KVCache | MlaKVCache): Promise<CompressedCache | CompressedMlaCache> => {
    if (isMlaCache(cache)) {
      // Read from the definition, so that a strategy not built by defineStrategy refuses too.
      const m = def.capabilities?.mla?.(options);
      if (m === undefined || typeof m === 'string') throw mlaRefusal(s.name, m);
    }
    const c = await s.compress(cache);
    if (cache.model && (c instanceof BaseCompressedCache || c instanceof BaseCompressedMlaCache)) c.model = cache.model;
    return c;
  };
  return {
    ...s,
    name: s.name,
    options: s.options,
    compress: compress as Strategy['compress'],
    deserialize: (bytes) => restoreCache(s, bytes),
  };
}

/**
 * Words of the error raised when a strategy's deserializer fails with something other than a
 * KvpackError (a defect in its checks, which the fuzz tests count). @internal
 */
export const UNEXPECTED_RESTORE_FAILURE = 'could not be restored';

/** Options of {@link deserializeCache} and {@link restoreCache}. */
export interface RestoreOptions {
  /**
   * Fingerprint of the model the cache is for (e.g. `LlamaModel.fingerprint()`): a cache whose header
   * records another model's fingerprint, or none, is refused.
   */
  model?: string;
}

/**
 * Restores a cache serialized by `strategy`, from any byte view (Node Buffer, subarray, SharedArrayBuffer).
 * The container is decoded and checked once (checksum, header, tensor table); the strategy's
 * deserializer then reads it, and every tensor in the file must be one that the strategy reads. If
 * anything fails, every tensor created so far is disposed.
 * @throws KvpackError('corrupt' | 'truncated') naming the field or tensor; KvpackError('model') when
 *         `options.model` is given and the cache was made from another model.
 */
export function restoreCache(strategy: Strategy, source: ByteSource, options: RestoreOptions = {}): CompressedCache {
  const bytes = byteView(source);
  const c = decodeContainer(bytes);
  check(c.strategy === strategy.name, 'corrupt', `expected a serialized ${strategy.name} cache, got a ${c.strategy} cache`);
  if (options.model !== undefined) {
    check(
      c.model === options.model,
      'model',
      `this ${c.strategy} cache was made from ${c.model ? `model ${c.model}` : 'a cache without a model fingerprint'}, not from model ${options.model}`,
    );
  }
  let cache: CompressedCache;
  try {
    cache = disposeCreatedOnError(() => withDecodedContainer(bytes, c, () => strategy.deserialize(bytes)));
  } catch (e) {
    if (e instanceof KvpackError) throw e;
    throw new KvpackError('corrupt', `serialized ${c.strategy} cache ${UNEXPECTED_RESTORE_FAILURE}: ${(e as Error).message}`, { cause: e });
  }
  const extra = c.unread();
  if (extra.length) {
    cache.dispose();
    throw new KvpackError('corrupt', `serialized ${c.strategy} cache is corrupt: ${unreadMessage(c.strategy, extra)}`);
  }
  if (c.model && cache instanceof BaseCompressedCache) cache.model = c.model;
  return cache;
}

/**
 * The strategy a decoded container records (its definition's own, from the recorded options).
 * @throws KvpackError('unknown-strategy') when it is not registered; KvpackError('corrupt') when its
 *         definition rejects the recorded options.
 */
function recordedStrategy(c: DecodedContainer): Strategy {
  const def = getStrategyDefinition(c.strategy);
  try {
    return def.create(parseStrategyOptions(c.strategy, c.options));
  } catch (e) {
    if (e instanceof KvpackError && e.code === 'config') throw new KvpackError('corrupt', `serialized ${c.strategy} cache is corrupt: it records ${e.message}`, { cause: e });
    throw e;
  }
}

/**
 * Restores any registered strategy's serialized cache (the container names its strategy and options),
 * from any byte view: a Node Buffer (`readFileSync`), a subarray at any offset, a SharedArrayBuffer.
 * @throws KvpackError('corrupt' | 'truncated') naming the field or tensor at fault (the options
 *         recorded in a file that its strategy rejects count as corrupt); KvpackError('unknown-strategy')
 *         when the strategy is not registered; KvpackError('model') when `options.model` is given and
 *         the cache was made from another model. A failed restore leaks no tensor.
 */
export function deserializeCache(source: ByteSource, options: RestoreOptions = {}): CompressedCache {
  const bytes = byteView(source);
  const c = decodeContainer(bytes);
  check(!isMlaContainer(c), 'corrupt', `this serialized ${c.strategy} cache is an MLA latent cache: restore it with deserializeMlaCache`);
  // The definition's own strategy: restoreCache below gives it the guarantees a guarded one has.
  const strategy = recordedStrategy(c);
  return withDecodedContainer(bytes, c, () => restoreCache(strategy, bytes, options));
}

/**
 * Restores any registered strategy's serialized MLA latent cache (the container names its strategy
 * and options), from any byte view.
 * @throws KvpackError('corrupt' | 'truncated') naming the field or tensor at fault (a per-head KV cache
 *         is named as such); KvpackError('unknown-strategy'); KvpackError('unsupported') when the strategy
 *         does not restore MLA caches; KvpackError('model') when `options.model` is given and the cache
 *         was made from another model. A failed restore leaks no tensor.
 */
export function deserializeMlaCache(source: ByteSource, options: RestoreOptions = {}): CompressedMlaCache {
  const bytes = byteView(source);
  const c = decodeContainer(bytes);
  check(isMlaContainer(c), 'corrupt', `this serialized ${c.strategy} cache is a per-head KV cache, not an MLA latent cache: restore it with deserializeCache`);
  const strategy = recordedStrategy(c);
  if (!strategy.deserializeMla) throw mlaRefusal(c.strategy);
  if (options.model !== undefined) {
    check(
      c.model === options.model,
      'model',
      `this ${c.strategy} MLA cache was made from ${c.model ? `model ${c.model}` : 'a cache without a model fingerprint'}, not from model ${options.model}`,
    );
  }
  const restore = strategy.deserializeMla;
  try {
    return withDecodedContainer(bytes, c, () => disposeCreatedOnError(() => restore(bytes)));
  } catch (e) {
    if (e instanceof KvpackError) throw e;
    throw new KvpackError('corrupt', `serialized ${c.strategy} MLA cache ${UNEXPECTED_RESTORE_FAILURE}: ${(e as Error).message}`, { cause: e });
  }
}
