import { readFileSync } from 'node:fs';
import { extname } from 'node:path';
import { parse as parseYaml } from 'yaml';
import { z } from 'zod';
import { KvpackError, check } from './errors.js';
import { decodeContainer } from './serialize.js';
import type { CompressedCache, Strategy } from './types.js';

/**
 * A registered compression method: a name, a zod schema for its options (with defaults), and a
 * factory. Register with {@link registerStrategy}; build with {@link createStrategy}.
 */
export interface StrategyDefinition<S extends z.ZodType = z.ZodType> {
  name: string;
  /** One line for `kvpack strategies` and error messages. */
  description: string;
  /** Options schema; unknown keys must be rejected (use z.strictObject). */
  schema: S;
  create(options: z.output<S>): Strategy<z.output<S>>;
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
 * Registers a strategy under `def.name`. Re-registering the same name replaces it.
 */
export function registerStrategy<S extends z.ZodType>(def: StrategyDefinition<S>): void {
  check(/^[a-z][a-z0-9-]*$/.test(def.name), 'config', `strategy name "${def.name}" must be lower-case kebab-case`);
  registry.set(def.name, def as unknown as StrategyDefinition);
}

/** Registered strategy names, sorted. */
export function listStrategies(): string[] {
  return [...registry.keys()].sort();
}

/** The definition registered under `name`. @throws KvpackError('unknown-strategy') listing the names. */
export function getStrategyDefinition(name: string): StrategyDefinition {
  const def = registry.get(name);
  if (!def) {
    const known = listStrategies();
    throw new KvpackError(
      'unknown-strategy',
      `unknown strategy "${name}"; registered strategies: ${known.length ? known.join(', ') : '(none — import @kvpack/xkv or @kvpack/baselines to register some)'}`,
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
  const r = def.schema.safeParse(options ?? {});
  if (!r.success) {
    const allowed = optionKeys(def.schema);
    throw new KvpackError(
      'config',
      `invalid options for strategy "${name}":\n${z.prettifyError(r.error)}` + (allowed.length ? `\nallowed options: ${allowed.join(', ')}` : ''),
    );
  }
  return r.data;
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
  try {
    if (ext === '.json') return JSON.parse(text);
    if (ext === '.yaml' || ext === '.yml') return parseYaml(text);
  } catch (e) {
    throw new KvpackError('config', `config file ${path} is not valid ${ext.slice(1).toUpperCase()}: ${(e as Error).message}`, { cause: e });
  }
  throw new KvpackError('config', `config file ${path}: unsupported extension "${ext}" (use .json, .yaml or .yml)`);
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
  return def.create(parseStrategyOptions(parsed.data.name, parsed.data.options));
}

/**
 * Restores any registered strategy's serialized cache (the container names its strategy and options).
 * @throws KvpackError('corrupt' | 'truncated' | 'unknown-strategy')
 */
export function deserializeCache(bytes: Uint8Array): CompressedCache {
  const c = decodeContainer(bytes);
  const strategy = createStrategy({ name: c.strategy, options: (c.options ?? {}) as Record<string, unknown> });
  return strategy.deserialize(bytes);
}
