import { open, writeFile, type FileHandle } from 'node:fs/promises';
import { basename } from 'node:path';
import { KvpackError, check, decodeBFloat16, decodeHalf, encodeBFloat16, encodeHalf } from '@kvpack/core';

/**
 * Reader and writer for the safetensors format (https://github.com/huggingface/safetensors, README
 * "Format"): an unsigned 64-bit little-endian header length N, N bytes of UTF-8 JSON mapping each
 * tensor name to `{dtype, shape, data_offsets: [begin, end]}` (offsets relative to the byte after
 * the header) plus an optional `__metadata__` string→string map, then the raw little-endian data.
 */

/** Bytes per element of the safetensors dtypes kvpack knows. */
const ITEM_BYTES: Record<string, number> = {
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U64: 8,
  U32: 4,
  U16: 2,
  U8: 1,
  BOOL: 1,
  F8_E4M3: 1,
  F8_E5M2: 1,
};

/** Float dtypes converted to float32 on read. */
export type SafetensorsFloatDType = 'F64' | 'F32' | 'F16' | 'BF16';

/** Refuse headers above this size (the reference implementation's limit is 100 MB). */
const MAX_HEADER_BYTES = 100_000_000;

/** One tensor's entry in a safetensors header. Offsets are bytes from the start of the file. */
export interface SafetensorsEntry {
  name: string;
  dtype: string;
  shape: number[];
  /** Absolute byte offset of the first byte of the tensor's data. */
  start: number;
  /** Byte length of the tensor's data. */
  byteLength: number;
}

/** A parsed safetensors header. */
export interface SafetensorsHeader {
  /** The file the header came from (used in error messages). */
  file: string;
  /** Size of the whole file, bytes. */
  fileSize: number;
  /** 8 + N: where the data section starts, bytes. */
  dataStart: number;
  /** Entries in data order. */
  tensors: Map<string, SafetensorsEntry>;
  /** The `__metadata__` map (empty when absent). */
  metadata: Record<string, string>;
}

function numel(shape: number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/**
 * Parses the JSON header of a safetensors file whose first `headerJson.length + 8` bytes were read.
 * @param headerJson the N header bytes (after the 8-byte length)
 * @param fileSize total file size in bytes, to detect truncation
 * @throws KvpackError('corrupt') on bad JSON or inconsistent entries (dtype × shape ≠ the byte length
 *         data_offsets span, overlapping data_offsets); ('truncated') when a tensor's data lies past the
 *         end of the file. Messages name the file and tensor.
 */
export function parseSafetensorsHeader(headerJson: Uint8Array, fileSize: number, file: string): SafetensorsHeader {
  const name = basename(file);
  let raw: unknown;
  try {
    raw = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(headerJson));
  } catch (e) {
    throw new KvpackError('corrupt', `${name}: safetensors header is not valid UTF-8 JSON (corrupt or not a safetensors file)`, { cause: e });
  }
  check(raw !== null && typeof raw === 'object' && !Array.isArray(raw), 'corrupt', `${name}: safetensors header is not a JSON object`);
  const dataStart = 8 + headerJson.length;
  const metadata: Record<string, string> = {};
  const entries: SafetensorsEntry[] = [];
  for (const [key, value] of Object.entries(raw as Record<string, unknown>)) {
    if (key === '__metadata__') {
      check(value !== null && typeof value === 'object', 'corrupt', `${name}: __metadata__ must be a string→string map`);
      for (const [mk, mv] of Object.entries(value as Record<string, unknown>)) {
        check(typeof mv === 'string', 'corrupt', `${name}: __metadata__["${mk}"] must be a string, got ${typeof mv}`);
        metadata[mk] = mv;
      }
      continue;
    }
    const e = value as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    check(
      e !== null &&
        typeof e === 'object' &&
        typeof e.dtype === 'string' &&
        Array.isArray(e.shape) &&
        e.shape.every((s) => Number.isInteger(s) && s >= 0) &&
        Array.isArray(e.data_offsets) &&
        e.data_offsets.length === 2 &&
        e.data_offsets.every((s) => Number.isInteger(s) && s >= 0) &&
        (e.data_offsets[0] as number) <= (e.data_offsets[1] as number),
      'corrupt',
      `${name}: safetensors header entry "${key}" lacks a valid dtype, shape or data_offsets`,
    );
    const [begin, end] = e.data_offsets as number[];
    const shape = e.shape as number[];
    const item = ITEM_BYTES[e.dtype];
    if (item !== undefined)
      check(
        end - begin === numel(shape) * item,
        'corrupt',
        `${name}: tensor "${key}" (${e.dtype} [${shape}]) should take ${numel(shape) * item} bytes but data_offsets span ${end - begin}`,
      );
    check(
      dataStart + end <= fileSize,
      'truncated',
      `${name} is truncated: tensor "${key}" ends at byte ${dataStart + end} but the file has ${fileSize} bytes`,
    );
    entries.push({ name: key, dtype: e.dtype, shape, start: dataStart + begin, byteLength: end - begin });
  }
  entries.sort((a, b) => a.start - b.start || a.byteLength - b.byteLength);
  let last: SafetensorsEntry | undefined; // the entry ending furthest so far
  for (const e of entries) {
    if (e.byteLength === 0) continue;
    if (last)
      check(
        last.start + last.byteLength <= e.start,
        'corrupt',
        `${name}: tensors "${last.name}" (bytes ${last.start - dataStart}..${last.start - dataStart + last.byteLength}) and "${e.name}" (from byte ${e.start - dataStart}) overlap in data_offsets`,
      );
    last = e;
  }
  return { file, fileSize, dataStart, tensors: new Map(entries.map((x) => [x.name, x])), metadata };
}

/** What a {@link SafetensorsFile} reads through: an open file, or bytes in memory. */
interface ByteReader {
  read(buffer: Uint8Array, offset: number, length: number, position: number): Promise<{ bytesRead: number }>;
  close(): Promise<void>;
}

/** A {@link ByteReader} over bytes in memory. */
function memoryReader(bytes: Uint8Array): ByteReader {
  return {
    async read(buffer, offset, length, position) {
      const part = bytes.subarray(position, Math.min(bytes.length, position + length));
      buffer.set(part, offset);
      return { bytesRead: part.length };
    },
    async close() {},
  };
}

/**
 * An open safetensors file: the header is parsed at open, tensors are read one at a time on demand
 * (so a loader never holds more than one tensor's raw bytes on the host). Close it when done.
 */
export class SafetensorsFile {
  private constructor(
    readonly header: SafetensorsHeader,
    private fh: ByteReader | null,
  ) {}

  /**
   * Opens a file and parses its header.
   * @throws KvpackError('io') when the file cannot be opened; ('truncated' | 'corrupt') for a bad header.
   */
  static async open(file: string): Promise<SafetensorsFile> {
    let fh: FileHandle;
    try {
      fh = await open(file, 'r');
    } catch (e) {
      throw new KvpackError('io', `cannot open ${file}: ${(e as Error).message}`, { cause: e });
    }
    try {
      return await SafetensorsFile.fromReader(fh, (await fh.stat()).size, file);
    } catch (e) {
      await fh.close();
      throw e;
    }
  }

  /**
   * A safetensors file held in memory (a file dropped on a page, a fetched shard); its header is
   * checked as {@link open} checks a file's.
   * @param file the file name, for messages
   * @throws KvpackError('truncated' | 'corrupt') for a bad header.
   */
  static async fromBytes(bytes: Uint8Array, file = 'model.safetensors'): Promise<SafetensorsFile> {
    return SafetensorsFile.fromReader(memoryReader(bytes), bytes.length, file);
  }

  private static async fromReader(fh: ByteReader, size: number, file: string): Promise<SafetensorsFile> {
    const name = basename(file);
    check(size >= 8, 'truncated', `${name} is truncated: ${size} bytes, less than the 8-byte safetensors header length`);
    const lenBuf = new Uint8Array(8);
    await fh.read(lenBuf, 0, 8, 0);
    const n = new DataView(lenBuf.buffer).getBigUint64(0, true);
    check(n <= BigInt(MAX_HEADER_BYTES), 'corrupt', `${name}: safetensors header length ${n} is implausible (corrupt or not a safetensors file)`);
    const len = Number(n);
    check(8 + len <= size, 'truncated', `${name} is truncated: its header claims ${len} bytes but the file has ${size} bytes in all`);
    const hb = new Uint8Array(len);
    await fh.read(hb, 0, len, 8);
    return new SafetensorsFile(parseSafetensorsHeader(hb, size, file), fh);
  }

  /** Tensor names in data order (`__metadata__` excluded). */
  names(): string[] {
    return [...this.header.tensors.keys()];
  }

  /** True when the file holds a tensor of this name. */
  has(name: string): boolean {
    return this.header.tensors.has(name);
  }

  /** Raw bytes of one tensor, in a fresh (8-byte aligned) buffer. */
  async readBytes(name: string): Promise<Uint8Array> {
    check(this.fh, 'disposed', `${basename(this.header.file)} was closed`);
    const e = this.header.tensors.get(name);
    check(e, 'corrupt', `${basename(this.header.file)}: tensor "${name}" is missing`);
    const out = new Uint8Array(e.byteLength);
    let done = 0;
    while (done < out.length) {
      const { bytesRead } = await this.fh.read(out, done, out.length - done, e.start + done);
      check(bytesRead > 0, 'truncated', `${basename(this.header.file)} is truncated inside tensor "${name}"`);
      done += bytesRead;
    }
    return out;
  }

  /**
   * Reads one float tensor (F32, F16, BF16 or F64) as float32.
   * @throws KvpackError('unsupported') naming the tensor and dtype for any other dtype.
   */
  async readFloat32(name: string): Promise<{ shape: number[]; data: Float32Array }> {
    const e = this.header.tensors.get(name);
    check(e, 'corrupt', `${basename(this.header.file)}: tensor "${name}" is missing`);
    check(
      e.dtype === 'F32' || e.dtype === 'F16' || e.dtype === 'BF16' || e.dtype === 'F64',
      'unsupported',
      `${basename(this.header.file)}: tensor "${name}" has dtype ${e.dtype}; kvpack reads F32, F16, BF16 and F64`,
    );
    const bytes = await this.readBytes(name);
    return { shape: e.shape, data: bytesToFloat32(bytes, e.dtype as SafetensorsFloatDType) };
  }

  /** Closes the file. Idempotent. */
  async close(): Promise<void> {
    const fh = this.fh;
    this.fh = null;
    await fh?.close();
  }
}

/** Converts little-endian F32/F16/BF16/F64 bytes (in an aligned buffer) to float32. */
export function bytesToFloat32(bytes: Uint8Array, dtype: SafetensorsFloatDType): Float32Array {
  const b = bytes.byteOffset % 8 === 0 ? bytes : bytes.slice();
  switch (dtype) {
    case 'F32':
      return new Float32Array(b.buffer, b.byteOffset, b.byteLength / 4);
    case 'F16':
      return decodeHalf(new Uint16Array(b.buffer, b.byteOffset, b.byteLength / 2));
    case 'BF16':
      return decodeBFloat16(new Uint16Array(b.buffer, b.byteOffset, b.byteLength / 2));
    case 'F64':
      return Float32Array.from(new Float64Array(b.buffer, b.byteOffset, b.byteLength / 8));
  }
}

/** A tensor to write: float32 values stored as `dtype`. */
export interface SafetensorsTensorInput {
  name: string;
  shape: number[];
  data: Float32Array;
  /** Storage dtype, default F32. */
  dtype?: 'F32' | 'F16' | 'BF16';
}

/**
 * Encodes tensors (stored in the given order) and string metadata as safetensors bytes. The header
 * is padded with spaces to a multiple of 8 bytes, as the reference writer does.
 * @throws KvpackError('shape') when a tensor's data length disagrees with its shape.
 */
export function encodeSafetensors(tensors: SafetensorsTensorInput[], metadata?: Record<string, string>): Uint8Array {
  const header: Record<string, unknown> = {};
  if (metadata && Object.keys(metadata).length) header.__metadata__ = metadata;
  const blobs: Uint8Array[] = [];
  let offset = 0;
  for (const t of tensors) {
    check(t.data.length === numel(t.shape), 'shape', `safetensors: tensor "${t.name}" has ${t.data.length} values but shape [${t.shape}]`);
    check(!(t.name in header), 'shape', `safetensors: tensor name "${t.name}" is used twice`);
    const dtype = t.dtype ?? 'F32';
    const arr = dtype === 'F32' ? t.data : dtype === 'F16' ? encodeHalf(t.data) : encodeBFloat16(t.data);
    const bytes = new Uint8Array(arr.buffer, arr.byteOffset, arr.byteLength);
    header[t.name] = { dtype, shape: t.shape, data_offsets: [offset, offset + bytes.length] };
    blobs.push(bytes);
    offset += bytes.length;
  }
  let json = new TextEncoder().encode(JSON.stringify(header));
  const padded = Math.ceil(json.length / 8) * 8;
  if (padded !== json.length) {
    const p = new Uint8Array(padded).fill(0x20);
    p.set(json);
    json = p;
  }
  const out = new Uint8Array(8 + json.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
  out.set(json, 8);
  let at = 8 + json.length;
  for (const b of blobs) {
    out.set(b, at);
    at += b.length;
  }
  return out;
}

/** Writes a safetensors file (see {@link encodeSafetensors}). */
export async function writeSafetensors(file: string, tensors: SafetensorsTensorInput[], metadata?: Record<string, string>): Promise<void> {
  await writeFile(file, encodeSafetensors(tensors, metadata));
}
