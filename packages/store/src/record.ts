import { crc32 } from 'node:zlib';
import { z } from 'zod';
import { KvpackError, check } from '@kvpack/core';
import { KEY_PATTERN, NAMESPACE_PATTERN } from './keys.js';

/** The record format this build writes and reads. */
export const RECORD_VERSION = 1;
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
}

const HeaderSchema = z.strictObject({
  v: z.literal(RECORD_VERSION),
  key: z.string().regex(KEY_PATTERN),
  namespace: z.string().regex(NAMESPACE_PATTERN),
  tokens: z.int().positive(),
  payloadBytes: z.int().nonnegative(),
  created: z.number().nonnegative(),
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

const ManifestSchema = z.strictObject({
  v: z.literal(RECORD_VERSION),
  key: z.string().regex(KEY_PATTERN),
  namespace: z.string().regex(NAMESPACE_PATTERN),
  tokens: z.int().positive(),
  bytes: z.int().positive(),
  crc: z.int().nonnegative(),
  created: z.number().nonnegative(),
  expires: z.number().nonnegative().optional(),
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
  check(version === RECORD_VERSION, 'corrupt', `store record has format version ${version}; this build reads version ${RECORD_VERSION}`);
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

/**
 * Parses a manifest.
 * @throws KvpackError('corrupt') for anything but a valid manifest of this version.
 */
export function decodeManifest(bytes: Uint8Array): Manifest {
  let raw: unknown;
  try {
    raw = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  } catch (e) {
    throw new KvpackError('corrupt', 'store manifest is corrupt: not valid UTF-8 JSON', { cause: e });
  }
  const parsed = ManifestSchema.safeParse(raw);
  check(parsed.success, 'corrupt', () => `store manifest is corrupt: field ${parsed.error!.issues[0].path.join('.')}: ${parsed.error!.issues[0].message}`);
  return parsed.data;
}
