import { KvpackError, check, crc32 } from '@kvpack/core';

const MAGIC = 'KVPSESS2';
/** The first format, whose header had no checksum. */
const MAGIC_V1 = 'KVPSESS1';
/** The serialized cache's own magic ("KVPK"): a bare cache. */
const CACHE_MAGIC = 'KVPK';

/** What a session file records beside the cache. */
export interface SessionFileHeader {
  format: 'kvpack-session';
  version: 2;
  /** Token ids the cache covers, in order. */
  tokens: number[];
  /** Generated tokens not yet fed to the cache (at most one): a continuation feeds them first. */
  pending: number[];
  /** The cache's strategy and model fingerprint (also inside the cache; here for `head`-style inspection). */
  strategy: string;
  model?: string;
}

const KEYS = new Set(['format', 'version', 'tokens', 'pending', 'strategy', 'model']);
const isIds = (x: unknown): x is number[] => Array.isArray(x) && x.every((v) => Number.isInteger(v) && v >= 0);

/** The problems of a parsed session header, one per field; empty when it is a {@link SessionFileHeader}. */
function headerProblems(raw: unknown): string[] {
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) return ['not a JSON object'];
  const h = raw as Record<string, unknown>;
  const out: string[] = [];
  for (const k of Object.keys(h)) if (!KEYS.has(k)) out.push(`unknown key "${k}"`);
  if (h.format !== 'kvpack-session') out.push('format: expected "kvpack-session"');
  if (h.version !== 2) out.push('version: expected 2');
  if (!isIds(h.tokens)) out.push('tokens: expected an array of integers ≥ 0');
  if (!isIds(h.pending) || h.pending.length > 1) out.push('pending: expected at most one integer ≥ 0');
  if (typeof h.strategy !== 'string') out.push('strategy: expected a string');
  if (h.model !== undefined && typeof h.model !== 'string') out.push('model: expected a string');
  return out;
}

/**
 * A session file (`kvpack generate --save-cache`, the browser example's saved session): the 8 bytes
 * `KVPSESS2`, a little-endian uint32 n, the CRC-32 (uint32) of the n header bytes, n bytes of UTF-8
 * JSON ({@link SessionFileHeader}: the token ids the cache covers and the pending one), then the
 * compressed cache exactly as `cache.serialize()` writes it (itself checksummed, restorable with
 * `deserializeCache` or `Session.resume`).
 */
export function encodeSessionFile(header: SessionFileHeader, cache: Uint8Array): Uint8Array {
  const json = new TextEncoder().encode(JSON.stringify(header));
  const out = new Uint8Array(16 + json.length + cache.length);
  out.set(new TextEncoder().encode(MAGIC), 0);
  const dv = new DataView(out.buffer);
  dv.setUint32(8, json.length, true);
  dv.setUint32(12, crc32(json) >>> 0, true);
  out.set(json, 16);
  out.set(cache, 16 + json.length);
  return out;
}

/**
 * Reads a session file ({@link encodeSessionFile}), or a bare serialized cache (its own magic "KVPK";
 * its tokens are unknown).
 * @param path the file's name, for messages
 * @throws KvpackError('corrupt' | 'truncated') for bytes that are neither, a header whose checksum or
 * fields do not hold, or the first session format (no checksum over its header).
 */
export function decodeSessionFile(bytes: Uint8Array, path: string): { header: SessionFileHeader | null; cache: Uint8Array } {
  const magic = new TextDecoder().decode(bytes.subarray(0, 8));
  if (magic.startsWith(CACHE_MAGIC)) return { header: null, cache: bytes };
  check(magic !== MAGIC_V1, 'corrupt', `${path}: a session file of the first format, whose header had no checksum; save the session again`);
  check(magic === MAGIC, 'corrupt', `${path} is not a kvpack session or cache file (its first bytes are neither "${MAGIC}" nor "${CACHE_MAGIC}")`);
  check(bytes.length >= 16, 'truncated', `${path}: ${bytes.length} bytes, shorter than a session file's 16-byte preamble`);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = dv.getUint32(8, true);
  check(16 + n <= bytes.length, 'truncated', `${path}: the session header claims ${n} bytes, the file holds ${bytes.length - 16}`);
  const json = bytes.subarray(16, 16 + n);
  check((crc32(json) >>> 0) === dv.getUint32(12, true), 'corrupt', `${path}: the session header fails its CRC-32 (the token ids or the pending token were changed or damaged)`);
  let raw: unknown;
  try {
    raw = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(json));
  } catch (e) {
    throw new KvpackError('corrupt', `${path}: the session header is not JSON: ${(e as Error).message}`, { cause: e });
  }
  const problems = headerProblems(raw);
  if (problems.length) throw new KvpackError('corrupt', `${path}: bad session header: ${problems.join('; ')}`);
  return { header: raw as SessionFileHeader, cache: bytes.subarray(16 + n) };
}
