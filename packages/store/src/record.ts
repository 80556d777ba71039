import { crc32 } from 'node:zlib';
import { z } from 'zod';
import { KvpackError, check } from '@kvpack/core';
import { KEY_PATTERN, NAMESPACE_PATTERN } from './keys.js';

/**
 * The record and manifest format this build writes: 2 (records list the chain keys they cover;
 * manifests may be links). Version 1 records and manifests (no chain, no links) are still read.
 */
export const RECORD_VERSION = 2;
const READ_VERSIONS = [1, 2];
const MAGIC = 0x5250564b; // "KVPR" little-endian
/** "KVPR", u32 record version, u32 header length, u32 CRC-32 of every other byte of the record. */
const PREAMBLE = 16;
const CRC_AT = 12;

/** Header of a record: what it stores and for which key. */
export interface RecordHeader {
  /** Record format version ({@link RECORD_VERSION}). */
  v: number;
  /** Chain key of the stored prefix (64 hex digits). */
  key: string;
  /** Namespace id (32 hex digits). */
  namespace: string;
  /** Tokens the stored prefix covers (a multiple of the chunk size). */
  tokens: number;
  /** Bytes of the payload: the serialized cache (container v2, with its own CRC-32 over its JSON header and tensors). */
  payloadBytes: number;
  /** Milliseconds since the epoch when the record was written. */
  created: number;
  /**
   * The chain keys of every chunk boundary the record covers, in order (`chain[i]` names its first
   * (i + 1)·C tokens; the last is `key`). A lookup that serves a shorter prefix cut from this record
   * checks that the prefix's key is in it. Absent in version 1 records (they are never cut).
   */
  chain?: string[];
}

const HeaderSchema = z.strictObject({
  v: z.union([z.literal(1), z.literal(2)]),
  key: z.string().regex(KEY_PATTERN),
  namespace: z.string().regex(NAMESPACE_PATTERN),
  tokens: z.int().positive(),
  payloadBytes: z.int().nonnegative(),
  created: z.number().nonnegative(),
  chain: z.array(z.string().regex(KEY_PATTERN)).min(1).optional(),
});

/**
 * The manifest of a stored prefix: a small JSON document written after its record (the record is
 * never visible through a manifest before it is complete). A lookup reads manifests first and fetches
 * a record only where its manifest is present; the record must then match the manifest's length and
 * CRC-32.
 */
export interface Manifest {
  v: number;
  key: string;
  namespace: string;
  tokens: number;
  /** Bytes of the whole record. */
  bytes: number;
  /** CRC-32 stored in the record's preamble. */
  crc: number;
  created: number;
  /** Milliseconds since the epoch after which the prefix is a miss (a TTL), when one was set. */
  expires?: number;
}

/**
 * A link manifest (version 2): no record is stored under this key, but the record of a longer prefix
 * that starts with this one is, and the strategy's caches can be cut (capability `cutPrefix`). A
 * lookup fetches that record, checks that this key is in its `chain`, and cuts it to `tokens`.
 * Written by `put` for every chunk boundary a stored record covers that holds no record of its own.
 */
export interface LinkManifest {
  v: 2;
  key: string;
  namespace: string;
  /** Tokens of this prefix (a multiple of C). */
  tokens: number;
  created: number;
  expires?: number;
  /** The covering record: its key, tokens, whole-record bytes and CRC-32. */
  link: { key: string; tokens: number; bytes: number; crc: number };
}

const ManifestSchema = z.strictObject({
  v: z.union([z.literal(1), z.literal(2)]),
  key: z.string().regex(KEY_PATTERN),
  namespace: z.string().regex(NAMESPACE_PATTERN),
  tokens: z.int().positive(),
  bytes: z.int().positive(),
  crc: z.int().nonnegative(),
  created: z.number().nonnegative(),
  expires: z.number().nonnegative().optional(),
});

const LinkManifestSchema = z.strictObject({
  v: z.literal(2),
  key: z.string().regex(KEY_PATTERN),
  namespace: z.string().regex(NAMESPACE_PATTERN),
  tokens: z.int().positive(),
  created: z.number().nonnegative(),
  expires: z.number().nonnegative().optional(),
  link: z.strictObject({ key: z.string().regex(KEY_PATTERN), tokens: z.int().positive(), bytes: z.int().positive(), crc: z.int().nonnegative() }),
});

function recordCrc(bytes: Uint8Array): number {
  return crc32(bytes.subarray(CRC_AT + 4), crc32(bytes.subarray(0, CRC_AT)));
}

/**
 * A record: a 16-byte preamble (`"KVPR"`, u32 version, u32 JSON header length, u32 CRC-32 over every
 * other byte of the record), the UTF-8 JSON {@link RecordHeader}, then the serialized cache. The
 * CRC-32 covers the header and the payload; the payload's own container CRC covers its JSON header
 * (strategy, options, model, startPosition, RoPE) and tensors once more.
 */
export function encodeRecord(header: Omit<RecordHeader, 'v' | 'payloadBytes'>, payload: Uint8Array): { bytes: Uint8Array; crc: number } {
  check(!header.chain || (header.chain.length > 0 && header.chain[header.chain.length - 1] === header.key), 'shape', 'store record: its chain must end with its own key');
  const h = new TextEncoder().encode(JSON.stringify({ v: RECORD_VERSION, ...header, payloadBytes: payload.length }));
  const out = new Uint8Array(PREAMBLE + h.length + payload.length);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, MAGIC, true);
  dv.setUint32(4, RECORD_VERSION, true);
  dv.setUint32(8, h.length, true);
  out.set(h, PREAMBLE);
  out.set(payload, PREAMBLE + h.length);
  const crc = recordCrc(out);
  dv.setUint32(CRC_AT, crc, true);
  return { bytes: out, crc };
}

/** A decoded record: its header and the serialized cache (a view into the record's bytes). */
export interface DecodedRecord {
  header: RecordHeader;
  payload: Uint8Array;
  crc: number;
}

/**
 * Checks and splits a record: magic, version, lengths, CRC-32, header fields, and — when `expect` is
 * given — that it is the record of that key and namespace.
 * @throws KvpackError('truncated') when bytes are missing; KvpackError('corrupt') for a damaged record
 *   or one of another version; KvpackError('model') for a foreign record (another key or namespace).
 */
export function decodeRecord(bytes: Uint8Array, expect?: { key?: string; namespace?: string; tokens?: number }): DecodedRecord {
  check(bytes.length >= PREAMBLE, 'truncated', `store record is truncated: ${bytes.length} bytes, less than its ${PREAMBLE}-byte preamble`);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  check(dv.getUint32(0, true) === MAGIC, 'corrupt', 'store record is corrupt: bad magic (expected "KVPR")');
  const version = dv.getUint32(4, true);
  check(READ_VERSIONS.includes(version), 'corrupt', `store record has format version ${version}; this build reads versions ${READ_VERSIONS.join(' and ')}`);
  const hl = dv.getUint32(8, true);
  check(PREAMBLE + hl <= bytes.length, 'truncated', `store record is truncated: ${bytes.length} bytes, but its header alone ends at byte ${PREAMBLE + hl}`);
  let raw: unknown;
  try {
    raw = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes.subarray(PREAMBLE, PREAMBLE + hl)));
  } catch (e) {
    throw new KvpackError('corrupt', 'store record is corrupt: its header is not valid UTF-8 JSON', { cause: e });
  }
  const parsed = HeaderSchema.safeParse(raw);
  check(parsed.success, 'corrupt', () => `store record is corrupt: header field ${parsed.error!.issues[0].path.join('.')}: ${parsed.error!.issues[0].message}`);
  const header = parsed.data;
  check(header.v === version, 'corrupt', `store record is corrupt: its header says version ${header.v}, its preamble ${version}`);
  check(
    !header.chain || header.chain[header.chain.length - 1] === header.key,
    'corrupt',
    'store record is corrupt: its chain does not end with its own key',
  );
  const payload = bytes.subarray(PREAMBLE + hl);
  check(payload.length >= header.payloadBytes, 'truncated', `store record is truncated: ${payload.length} payload bytes, its header declares ${header.payloadBytes}`);
  check(payload.length === header.payloadBytes, 'corrupt', `store record is corrupt: ${payload.length - header.payloadBytes} bytes after the payload its header declares`);
  const crc = dv.getUint32(CRC_AT, true);
  check(recordCrc(bytes) === crc, 'corrupt', 'store record is corrupt: CRC-32 mismatch (the record was changed or damaged)');
  if (expect?.namespace !== undefined)
    check(header.namespace === expect.namespace, 'model', `store record is foreign: it belongs to namespace ${header.namespace}, not ${expect.namespace}`);
  if (expect?.key !== undefined) check(header.key === expect.key, 'model', `store record is foreign: it is the record of key ${header.key.slice(0, 16)}…, not ${expect.key.slice(0, 16)}…`);
  if (expect?.tokens !== undefined) check(header.tokens === expect.tokens, 'corrupt', `store record is corrupt: it covers ${header.tokens} tokens, its key names ${expect.tokens}`);
  return { header, payload, crc };
}

/** Text of a manifest. */
export function encodeManifest(m: Manifest): Uint8Array {
  return new TextEncoder().encode(JSON.stringify(m));
}

/** Text of a link manifest. */
export function encodeLinkManifest(m: LinkManifest): Uint8Array {
  return new TextEncoder().encode(JSON.stringify(m));
}

/** Whether a decoded manifest is a link. */
export function isLink(m: Manifest | LinkManifest): m is LinkManifest {
  return 'link' in m;
}

/**
 * Parses a manifest: a record's ({@link Manifest}) or a link ({@link LinkManifest}).
 * @throws KvpackError('corrupt') for anything but a valid manifest of a version this build reads.
 */
export function decodeAnyManifest(bytes: Uint8Array): Manifest | LinkManifest {
  const raw = parseJson(bytes);
  if (raw && typeof raw === 'object' && 'link' in raw) {
    const parsed = LinkManifestSchema.safeParse(raw);
    check(parsed.success, 'corrupt', () => `store link manifest is corrupt: field ${parsed.error!.issues[0].path.join('.')}: ${parsed.error!.issues[0].message}`);
    check(parsed.data.link.tokens > parsed.data.tokens, 'corrupt', `store link manifest is corrupt: it links ${parsed.data.tokens} tokens to a record of ${parsed.data.link.tokens}, not a longer one`);
    return parsed.data as LinkManifest;
  }
  return decodeManifest(bytes);
}

function parseJson(bytes: Uint8Array): unknown {
  try {
    return JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  } catch (e) {
    throw new KvpackError('corrupt', 'store manifest is corrupt: not valid UTF-8 JSON', { cause: e });
  }
}

/**
 * Parses a record's manifest.
 * @throws KvpackError('corrupt') for anything but a valid record manifest of a version this build reads (a link included).
 */
export function decodeManifest(bytes: Uint8Array): Manifest {
  const raw = parseJson(bytes);
  const parsed = ManifestSchema.safeParse(raw);
  check(parsed.success, 'corrupt', () => `store manifest is corrupt: field ${parsed.error!.issues[0].path.join('.')}: ${parsed.error!.issues[0].message}`);
  return parsed.data;
}
