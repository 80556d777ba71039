import { crc32 } from 'node:zlib';
import { KvpackError, check } from './errors.js';

/** Storage dtypes of a serialized tensor. 16-bit floats are stored as their bit patterns. */
export type StoredDType = 'float32' | 'float16' | 'bfloat16' | 'int8' | 'uint8' | 'int32' | 'uint16';

const ITEM_BYTES: Record<StoredDType, number> = {
  float32: 4,
  float16: 2,
  bfloat16: 2,
  int8: 1,
  uint8: 1,
  int32: 4,
  uint16: 2,
};

type StoredArray = Float32Array | Uint16Array | Int8Array | Uint8Array | Int32Array;

/** One named blob of a container. `shape` is informational for packed codes (uint8 bytes). */
export interface StoredTensor {
  name: string;
  dtype: StoredDType;
  shape: number[];
  data: StoredArray;
}

/** Everything a strategy writes: its name, options, free-form JSON metadata and tensors. */
export interface Container {
  strategy: string;
  options: unknown;
  meta: Record<string, unknown>;
  tensors: StoredTensor[];
}

const MAGIC = 0x4b50564b; // "KVPK" little-endian
const FORMAT_VERSION = 1;
const PREAMBLE = 12;

function elementCount(shape: number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

function bytesOf(t: StoredTensor): number {
  return t.data.byteLength;
}

/** Payload bytes of a container: the sum of its tensors' bytes (what `byteSize()` reports). */
export function payloadBytes(tensors: StoredTensor[]): number {
  return tensors.reduce((a, t) => a + bytesOf(t), 0);
}

/**
 * Writes a container: `"KVPK"`, u32 format version, u32 header length, the UTF-8 JSON header
 * (strategy, options, meta, tensor table, payload CRC-32) padded to 8 bytes, then the raw payload.
 * The header is the only overhead: `bytes.length − headerBytes(bytes)` equals {@link payloadBytes}.
 */
export function encodeContainer(c: Container): Uint8Array {
  let offset = 0;
  const table = c.tensors.map((t) => {
    const expected = t.dtype === 'uint8' && t.shape.length === 0 ? t.data.length : elementCount(t.shape);
    check(
      t.data.length === expected,
      'shape',
      `serialize: tensor "${t.name}" has ${t.data.length} elements but shape [${t.shape}]`,
    );
    check(t.data.byteLength === t.data.length * ITEM_BYTES[t.dtype], 'dtype', `serialize: tensor "${t.name}" data does not match dtype ${t.dtype}`);
    const entry = { name: t.name, dtype: t.dtype, shape: t.shape, offset, bytes: bytesOf(t) };
    offset += entry.bytes;
    return entry;
  });
  const payload = new Uint8Array(offset);
  c.tensors.forEach((t, i) => payload.set(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength), table[i].offset));
  const header = JSON.stringify({
    strategy: c.strategy,
    options: c.options,
    meta: c.meta,
    tensors: table,
    payloadBytes: offset,
    crc32: crc32(payload),
  });
  const hb = new TextEncoder().encode(header);
  const padded = Math.ceil((PREAMBLE + hb.length) / 8) * 8;
  const out = new Uint8Array(padded + offset);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, MAGIC, true);
  dv.setUint32(4, FORMAT_VERSION, true);
  dv.setUint32(8, hb.length, true);
  out.set(hb, PREAMBLE);
  out.fill(0x20, PREAMBLE + hb.length, padded);
  out.set(payload, padded);
  return out;
}

/** Bytes of a serialized container that are header (preamble + JSON + padding), not payload. */
export function headerBytes(bytes: Uint8Array): number {
  check(bytes.length >= PREAMBLE, 'truncated', `serialized cache is truncated: ${bytes.length} bytes, less than the 12-byte preamble`);
  const len = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getUint32(8, true);
  return Math.ceil((PREAMBLE + len) / 8) * 8;
}

/** Decoded container with a tensor lookup by name. */
export interface DecodedContainer extends Container {
  get(name: string): StoredTensor;
  has(name: string): boolean;
}

/**
 * Parses a container written by {@link encodeContainer}.
 * @throws KvpackError('corrupt') on a bad magic, version, header JSON, tensor table or CRC-32;
 *         KvpackError('truncated') when the bytes end before the header or payload does.
 */
export function decodeContainer(bytes: Uint8Array): DecodedContainer {
  check(bytes.length >= PREAMBLE, 'truncated', `serialized cache is truncated: ${bytes.length} bytes, less than the 12-byte preamble`);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  check(dv.getUint32(0, true) === MAGIC, 'corrupt', 'serialized cache is corrupt: bad magic (expected "KVPK")');
  const version = dv.getUint32(4, true);
  check(version === FORMAT_VERSION, 'corrupt', `serialized cache has unsupported format version ${version} (this build reads ${FORMAT_VERSION})`);
  const hlen = dv.getUint32(8, true);
  const start = headerBytes(bytes);
  check(bytes.length >= PREAMBLE + hlen, 'truncated', `serialized cache is truncated inside its ${hlen}-byte header (${bytes.length} bytes in all)`);
  let header: {
    strategy: string;
    options: unknown;
    meta: Record<string, unknown>;
    tensors: { name: string; dtype: StoredDType; shape: number[]; offset: number; bytes: number }[];
    payloadBytes: number;
    crc32: number;
  };
  try {
    header = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes.subarray(PREAMBLE, PREAMBLE + hlen)));
  } catch (e) {
    throw new KvpackError('corrupt', 'serialized cache is corrupt: its header is not valid JSON', { cause: e });
  }
  check(
    header && typeof header.strategy === 'string' && Array.isArray(header.tensors) && Number.isInteger(header.payloadBytes),
    'corrupt',
    'serialized cache is corrupt: header lacks strategy, tensors or payloadBytes',
  );
  const have = bytes.length - start;
  check(have >= header.payloadBytes, 'truncated', `serialized cache is truncated: payload has ${have} of ${header.payloadBytes} bytes`);
  check(have === header.payloadBytes, 'corrupt', `serialized cache is corrupt: ${have - header.payloadBytes} trailing bytes after the payload`);
  const payload = bytes.slice(start, start + header.payloadBytes);
  check(crc32(payload) === header.crc32, 'corrupt', 'serialized cache is corrupt: payload CRC-32 mismatch');
  const tensors: StoredTensor[] = header.tensors.map((e) => {
    const item = ITEM_BYTES[e.dtype];
    check(item !== undefined, 'corrupt', `serialized cache is corrupt: tensor "${e.name}" has unknown dtype ${String(e.dtype)}`);
    check(
      e.offset >= 0 && e.bytes >= 0 && e.offset + e.bytes <= payload.length && e.bytes % item === 0,
      'corrupt',
      `serialized cache is corrupt: tensor "${e.name}" lies outside the payload`,
    );
    const buf = payload.buffer.slice(e.offset, e.offset + e.bytes);
    const n = e.bytes / item;
    const data: StoredArray =
      e.dtype === 'float32'
        ? new Float32Array(buf)
        : e.dtype === 'float16' || e.dtype === 'bfloat16' || e.dtype === 'uint16'
          ? new Uint16Array(buf)
          : e.dtype === 'int8'
            ? new Int8Array(buf)
            : e.dtype === 'int32'
              ? new Int32Array(buf)
              : new Uint8Array(buf);
    check(data.length === n, 'corrupt', `serialized cache is corrupt: tensor "${e.name}" size`);
    return { name: e.name, dtype: e.dtype, shape: e.shape, data };
  });
  const byName = new Map(tensors.map((t) => [t.name, t]));
  return {
    strategy: header.strategy,
    options: header.options,
    meta: header.meta ?? {},
    tensors,
    has: (name) => byName.has(name),
    get(name) {
      const t = byName.get(name);
      if (!t) throw new KvpackError('corrupt', `serialized ${header.strategy} cache is corrupt: tensor "${name}" is missing`);
      return t;
    },
  };
}
