import { KvpackError } from '@kvpack/core';
import { fmtBytes } from '../bounds.js';
import { ggmlTensorBytes, isSupportedGgmlType } from './quant.js';

/**
 * A bounds-checked reader of GGUF headers (ggml docs/gguf.md), written so that a corrupt or hostile
 * file cannot make it allocate more than the file holds: every count (tensors, KV pairs, array
 * elements) and every length (strings) is checked against the bytes left in the file, times the
 * smallest encoding of one item, before anything is sized by it.
 *
 * Layout (little-endian): "GGUF", u32 version (1–3), tensor_count, kv_count (u64; u32 in version 1),
 * then kv_count pairs (string key, u32 value type, value), then tensor_count tensor infos
 * (string name, u32 n_dims, n_dims × u64 ne (u32 in version 1), u32 ggml type, u64 offset), padding to
 * `general.alignment` (default 32), then the tensor data. A string is a u64 (u32 in version 1) byte
 * length then UTF-8 bytes; an array is u32 element type, u64 (u32) count, elements.
 */

/** GGUF metadata value types (gguf.md `gguf_metadata_value_type`). */
const T = { U8: 0, I8: 1, U16: 2, I16: 3, U32: 4, I32: 5, F32: 6, BOOL: 7, STRING: 8, ARRAY: 9, U64: 10, I64: 11, F64: 12 } as const;
const SCALAR_BYTES: Record<number, number> = { 0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8 };
/** GGML_MAX_DIMS. */
const MAX_DIMS = 4;
/** Arrays of arrays deeper than this are refused (llama.cpp writes none). */
const MAX_ARRAY_DEPTH = 4;

/** One tensor info of a GGUF header. */
export interface GgufTensorInfo {
  name: string;
  /** ne[0] first (the fastest-varying dimension). */
  ne: number[];
  /** ggml type id. */
  type: number;
  /** Byte offset from the start of the tensor data section. */
  offset: number;
}

/** A parsed GGUF header. Metadata values: numbers, bigint (u64/i64), booleans, strings, arrays. */
export interface GgufHeader {
  version: number;
  metadata: Record<string, unknown>;
  tensorInfos: GgufTensorInfo[];
  alignment: number;
  /** Absolute byte offset of the tensor data section. */
  dataStart: number;
}

/** Thrown inside the parser when the bytes read so far end before the file does. */
class NeedMore {
  constructor(readonly upTo: number) {}
}

class Cursor {
  pos = 0;
  private readonly dv: DataView;
  constructor(
    private readonly buf: Uint8Array,
    private readonly fileSize: number,
    private readonly name: string,
    private readonly wide: boolean,
  ) {
    this.dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  }

  /** Bytes of the file after the cursor. */
  get left(): number {
    return this.fileSize - this.pos;
  }

  /** Ensures n bytes at the cursor: truncated when the file ends first, NeedMore when only the buffer does. */
  need(n: number, what: string): void {
    if (this.pos + n > this.fileSize)
      throw new KvpackError('truncated', `${this.name} is truncated: ${what} at byte ${this.pos} needs ${n} bytes but the file ends at ${this.fileSize}`);
    if (this.pos + n > this.buf.byteLength) throw new NeedMore(this.pos + n);
  }

  u8(what: string): number {
    this.need(1, what);
    return this.buf[this.pos++];
  }
  u32(what: string): number {
    this.need(4, what);
    const v = this.dv.getUint32(this.pos, true);
    this.pos += 4;
    return v;
  }
  u64(what: string): bigint {
    this.need(8, what);
    const v = this.dv.getBigUint64(this.pos, true);
    this.pos += 8;
    return v;
  }
  /** A count or length: u64 (u32 in version 1), as a number when it fits, else Infinity. */
  size(what: string): number {
    if (!this.wide) return this.u32(what);
    const v = this.u64(what);
    return v > BigInt(Number.MAX_SAFE_INTEGER) ? Infinity : Number(v);
  }

  /**
   * A count of items each taking at least `minBytes`, refused when the rest of the file cannot hold
   * that many (before anything is sized by it).
   */
  count(field: string, minBytes: number): number {
    const at = this.pos;
    const n = this.size(field);
    if (n * minBytes > this.left)
      throw new KvpackError(
        'truncated',
        `${this.name}: header ${field} = ${n === Infinity ? '> 2^53' : n} (at byte ${at}) needs at least ${fmtBytes(n * minBytes)} after it but the file has ${fmtBytes(this.left)} left (${fmtBytes(this.fileSize)} in all)`,
      );
    return n;
  }

  str(field: string): string {
    const n = this.count(`${field} length`, 1);
    this.need(n, field);
    const s = new TextDecoder('utf-8').decode(this.buf.subarray(this.pos, this.pos + n));
    this.pos += n;
    return s;
  }

  value(type: number, field: string, depth = 0): unknown {
    const dv = this.dv;
    const scalar = SCALAR_BYTES[type];
    if (scalar !== undefined) {
      this.need(scalar, field);
      const p = this.pos;
      this.pos += scalar;
      switch (type) {
        case T.U8:
          return dv.getUint8(p);
        case T.I8:
          return dv.getInt8(p);
        case T.U16:
          return dv.getUint16(p, true);
        case T.I16:
          return dv.getInt16(p, true);
        case T.U32:
          return dv.getUint32(p, true);
        case T.I32:
          return dv.getInt32(p, true);
        case T.F32:
          return dv.getFloat32(p, true);
        case T.BOOL:
          return dv.getUint8(p) !== 0;
        case T.U64:
          return dv.getBigUint64(p, true);
        case T.I64:
          return dv.getBigInt64(p, true);
        case T.F64:
          return dv.getFloat64(p, true);
      }
    }
    if (type === T.STRING) return this.str(field);
    if (type === T.ARRAY) {
      if (depth >= MAX_ARRAY_DEPTH) throw new KvpackError('corrupt', `${this.name}: ${field} nests arrays deeper than ${MAX_ARRAY_DEPTH}`);
      const et = this.u32(`${field} element type`);
      const min = SCALAR_BYTES[et] ?? (et === T.STRING ? (this.wide ? 8 : 4) : et === T.ARRAY ? (this.wide ? 12 : 8) : 0);
      if (min === 0) throw new KvpackError('corrupt', `${this.name}: ${field} has array element type ${et}, not a GGUF value type`);
      const n = this.count(`${field} array length`, min);
      const out = new Array<unknown>(n);
      for (let i = 0; i < n; i++) out[i] = this.value(et, field, depth + 1);
      return out;
    }
    throw new KvpackError('corrupt', `${this.name}: ${field} has value type ${type}, not a GGUF value type`);
  }
}

function parse(buf: Uint8Array, fileSize: number, name: string): GgufHeader {
  if (fileSize < 4 || buf.byteLength < 4) throw new KvpackError('truncated', `${name} is truncated: ${fileSize} bytes, shorter than a GGUF header`);
  const magic = String.fromCharCode(buf[0], buf[1], buf[2], buf[3]);
  if (magic !== 'GGUF') throw new KvpackError('corrupt', `${name} is not a valid GGUF file: magic ${JSON.stringify(magic)}, expected "GGUF"`);
  const version = new Cursor(buf, fileSize, name, true);
  version.pos = 4;
  const v = version.u32('version');
  if (v > 0xffff) throw new KvpackError('unsupported', `${name}: big-endian GGUF files are not supported`);
  if (v < 1 || v > 3) throw new KvpackError('corrupt', `${name} is not a valid GGUF file: version ${v} (known: 1, 2, 3)`);
  const c = new Cursor(buf, fileSize, name, v >= 2);
  c.pos = 8;
  const sizeBytes = v >= 2 ? 8 : 4;
  const tensorCount = c.size('tensor_count');
  const kvCount = c.count('kv_count', sizeBytes + 4 + 1); // key length + value type + ≥ 1 byte
  // Each tensor info: name length, ≥ 0 name bytes, n_dims, ≥ 1 ne (u64; u32 in version 1), type, offset.
  const minInfo = sizeBytes + 4 + sizeBytes + 4 + 8;
  if (tensorCount * minInfo > c.left)
    throw new KvpackError(
      'truncated',
      `${name}: header tensor_count = ${tensorCount === Infinity ? '> 2^53' : tensorCount} (at byte 8) needs at least ${fmtBytes(tensorCount * minInfo)} of tensor infos after it but the file has ${fmtBytes(c.left)} left (${fmtBytes(fileSize)} in all)`,
    );
  const metadata: Record<string, unknown> = { version: v, tensor_count: BigInt(tensorCount), kv_count: BigInt(kvCount) };
  const keys = new Set<string>();
  for (let i = 0; i < kvCount; i++) {
    const key = c.str(`metadata key ${i}`);
    if (keys.has(key)) throw new KvpackError('corrupt', `${name}: metadata key "${key}" appears twice`);
    keys.add(key);
    const type = c.u32(`"${key}" value type`);
    metadata[key] = c.value(type, `metadata "${key}"`);
  }
  const alignRaw = metadata['general.alignment'] ?? 32;
  const alignment = typeof alignRaw === 'bigint' ? Number(alignRaw) : (alignRaw as number);
  if (!(Number.isInteger(alignment) && alignment > 0 && (alignment & (alignment - 1)) === 0 && alignment <= 1 << 20))
    throw new KvpackError('corrupt', `${name}: general.alignment = ${String(alignRaw)} must be a power of two`);
  const tensorInfos: GgufTensorInfo[] = [];
  const names = new Set<string>();
  for (let i = 0; i < tensorCount; i++) {
    const tn = c.str(`tensor ${i} name`);
    if (names.has(tn)) throw new KvpackError('corrupt', `${name}: tensor "${tn}" is listed twice`);
    names.add(tn);
    const nd = c.u32(`tensor "${tn}" n_dims`);
    if (nd < 1 || nd > MAX_DIMS) throw new KvpackError('corrupt', `${name}: tensor "${tn}" has n_dims = ${nd}, outside 1..${MAX_DIMS}`);
    const ne: number[] = [];
    for (let d = 0; d < nd; d++) {
      const x = v >= 2 ? c.u64(`tensor "${tn}" ne[${d}]`) : BigInt(c.u32(`tensor "${tn}" ne[${d}]`));
      // No ggml type packs more than 8 elements per byte: a larger count cannot be in the file.
      if (x > BigInt(fileSize) * 8n)
        throw new KvpackError('truncated', `${name}: header tensor "${tn}" ne[${d}] = ${x} needs more than the file's ${fmtBytes(fileSize)}`);
      ne.push(Number(x));
    }
    const type = c.u32(`tensor "${tn}" type`);
    const off = c.u64(`tensor "${tn}" offset`);
    if (off > BigInt(fileSize))
      throw new KvpackError('truncated', `${name}: header tensor "${tn}" offset = ${off} lies past the end of the file (${fmtBytes(fileSize)})`);
    tensorInfos.push({ name: tn, ne, type, offset: Number(off) });
  }
  const dataStart = Math.ceil(c.pos / alignment) * alignment;
  if (tensorCount > 0 && dataStart > fileSize)
    throw new KvpackError('truncated', `${name} is truncated: its tensor data should start at byte ${dataStart} but the file has ${fileSize} bytes`);
  return { version: v, metadata, tensorInfos, alignment, dataStart };
}

/**
 * Parses a GGUF header from a reader of the file's bytes, reading a growing prefix (1 MiB, doubled
 * as needed) until the header fits; never more than the file.
 * @param read returns `length` bytes at `position` (fewer only at the end of the file)
 * @param fileSize the file's size in bytes
 * @param name the file name, for messages
 * @throws KvpackError('truncated') when the header runs past the end of the file or claims a count,
 *         length, dimension or offset the file cannot hold (naming the field and both sizes);
 *         ('corrupt') for a bad magic or version, a duplicate key or tensor name, bad n_dims or value types;
 *         ('unsupported') for big-endian files.
 */
export async function parseGgufHeader(
  read: (position: number, length: number) => Promise<Uint8Array>,
  fileSize: number,
  name: string,
): Promise<GgufHeader> {
  let want = Math.min(fileSize, 1 << 20);
  for (;;) {
    const buf = await read(0, want);
    try {
      return parse(buf, fileSize, name);
    } catch (e) {
      if (!(e instanceof NeedMore)) throw e;
      if (buf.byteLength < want) throw new KvpackError('truncated', `${name} is truncated: read ${buf.byteLength} of ${want} bytes`);
      want = Math.min(fileSize, Math.max(2 * want, e.upTo));
    }
  }
}

/**
 * Checks a header's tensors against the file: each supported tensor's offset is a multiple of the
 * alignment, its data (ggml type × ne) ends inside the file, and no two overlap. Unsupported types
 * (whose sizes kvpack does not know) are only required to start inside the file.
 * @returns each tensor's absolute start and byte length (−1 for unsupported types)
 * @throws KvpackError('truncated' | 'corrupt' | 'shape') naming the file and tensor.
 */
export function checkGgufTensorData(h: GgufHeader, fileSize: number, name: string): { start: number; byteLength: number }[] {
  const out = h.tensorInfos.map((t) => {
    const start = h.dataStart + t.offset;
    if (t.offset % h.alignment !== 0)
      throw new KvpackError('corrupt', `${name}: tensor "${t.name}" offset ${t.offset} is not a multiple of the alignment ${h.alignment}`);
    let byteLength = -1;
    if (isSupportedGgmlType(t.type)) {
      const count = t.ne.reduce((a, b) => a * b, 1);
      byteLength = ggmlTensorBytes(t.type, count, t.ne[0], t.name, name);
      if (start + byteLength > fileSize)
        throw new KvpackError('truncated', `${name} is truncated: tensor "${t.name}" ends at byte ${start + byteLength} but the file has ${fileSize} bytes`);
    } else if (start > fileSize)
      throw new KvpackError('truncated', `${name} is truncated: tensor "${t.name}" starts at byte ${start} but the file has ${fileSize} bytes`);
    return { name: t.name, start, byteLength };
  });
  const sized = out.filter((t) => t.byteLength > 0).sort((a, b) => a.start - b.start);
  let last: (typeof sized)[number] | undefined; // the tensor ending furthest so far
  for (const t of sized) {
    if (last && last.start + last.byteLength > t.start)
      throw new KvpackError(
        'corrupt',
        `${name}: the data of tensors "${last.name}" (bytes ${last.start}..${last.start + last.byteLength}) and "${t.name}" (from byte ${t.start}) overlap`,
      );
    if (!last || t.start + t.byteLength > last.start + last.byteLength) last = t;
  }
  return out.map(({ start, byteLength }) => ({ start, byteLength }));
}
