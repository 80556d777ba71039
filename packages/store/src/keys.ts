import { createHash } from 'node:crypto';
import { check } from '@kvpack/core';

/** Tokens per chunk when none is given (LMCache's and vLLM's default block of 256 tokens). */
export const DEFAULT_CHUNK_TOKENS = 256;
/** Largest chunk the store accepts, in tokens. */
export const MAX_CHUNK_TOKENS = 1 << 20;

/**
 * JSON with object keys sorted at every level and `undefined` members dropped, so that equal option
 * objects give equal text whatever order their keys were written in.
 */
export function stableJson(value: unknown): string {
  return JSON.stringify(sortDeep(value));
}

function sortDeep(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(sortDeep);
  if (v && typeof v === 'object') {
    const out: Record<string, unknown> = {};
    for (const k of Object.keys(v).sort()) {
      const x = (v as Record<string, unknown>)[k];
      if (x !== undefined) out[k] = sortDeep(x);
    }
    return out;
  }
  return v;
}

/** What a namespace is made of: the model, the strategy at its resolved options, and the chunk size. */
export interface NamespaceDescriptor {
  /** Store format of the keys and records (1). */
  format: 1;
  /** Model fingerprint (`LlamaModel.fingerprint()`: config, tensor names and shapes, digest of the weights). */
  model: string;
  /** Registered strategy name. */
  strategy: string;
  /** The strategy's resolved options (defaults filled in), as its compressed caches record them. */
  options: unknown;
  /** Tokens per chunk, C. */
  chunkTokens: number;
}

/** A namespace: its descriptor and its id, the first 32 hex digits of the descriptor's SHA-256. */
export interface Namespace {
  id: string;
  descriptor: NamespaceDescriptor;
}

/**
 * The namespace of a model, a strategy at its resolved options and a chunk size. Keys are chained
 * from the namespace id, so a key of one namespace is never a key of another: a cache made by
 * another model or strategy cannot be looked up.
 * @throws KvpackError('config') for an empty model fingerprint or strategy name, or a chunk size that
 *   is not an integer in [1, 2^20].
 */
export function makeNamespace(model: string, strategy: string, options: unknown, chunkTokens = DEFAULT_CHUNK_TOKENS): Namespace {
  check(typeof model === 'string' && model.length > 0, 'config', 'prefix store: a model fingerprint is required (LlamaModel.fingerprint())');
  check(typeof strategy === 'string' && strategy.length > 0, 'config', 'prefix store: a strategy name is required');
  check(
    Number.isInteger(chunkTokens) && chunkTokens >= 1 && chunkTokens <= MAX_CHUNK_TOKENS,
    'config',
    `prefix store: chunkTokens must be an integer in [1, ${MAX_CHUNK_TOKENS}], got ${chunkTokens}`,
  );
  const descriptor: NamespaceDescriptor = { format: 1, model, strategy, options: JSON.parse(stableJson(options ?? {})), chunkTokens };
  const id = createHash('sha256').update(stableJson(descriptor)).digest('hex').slice(0, 32);
  return { id, descriptor };
}

/** Throws unless `tokens` is an array of integer token ids in [0, 2^32). */
export function checkTokens(tokens: readonly number[], what: string): void {
  check(Array.isArray(tokens), 'shape', `${what}: token ids must be an array of integers`);
  for (let i = 0; i < tokens.length; i++) {
    const t = tokens[i];
    check(Number.isInteger(t) && t >= 0 && t <= 0xffffffff, 'shape', () => `${what}: token id ${t} at index ${i} is not an integer in [0, 2^32)`);
  }
}

/**
 * Chained chunk keys of a token sequence, after LMCache and vLLM's prefix caching: the tokens are cut
 * into chunks of C tokens, and key i = SHA-256(key i−1 ‖ chunk i's token ids as little-endian uint32),
 * with key −1 the namespace id. Only full chunks get a key: key i names the prefix of (i + 1)·C tokens.
 * @returns lower-case hex keys, one per full chunk (⌊tokens.length / C⌋ of them)
 * @throws KvpackError('shape') for token ids that are not integers in [0, 2^32).
 */
export function chunkKeys(ns: Namespace, tokens: readonly number[], maxChunks = Infinity): string[] {
  checkTokens(tokens, 'prefix store');
  const C = ns.descriptor.chunkTokens;
  const n = Math.min(Math.floor(tokens.length / C), maxChunks);
  const keys: string[] = [];
  let parent = Buffer.from(ns.id, 'hex');
  const buf = Buffer.alloc(C * 4);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < C; j++) buf.writeUInt32LE(tokens[i * C + j], j * 4);
    parent = createHash('sha256').update(parent).update(buf).digest();
    keys.push(parent.toString('hex'));
  }
  return keys;
}

/** A lower-case hex SHA-256 key (64 digits). */
export const KEY_PATTERN = /^[0-9a-f]{64}$/;
/** A namespace id (32 hex digits). */
export const NAMESPACE_PATTERN = /^[0-9a-f]{32}$/;
