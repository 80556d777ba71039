import { crc32 } from './crc32.js';
import { z } from 'zod';
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
const DTYPES = Object.keys(ITEM_BYTES) as [StoredDType, ...StoredDType[]];

type StoredArray = Float32Array | Uint16Array | Int8Array | Uint8Array | Int32Array;

/**
 * One named blob of a container. `shape` gives the element count, except for packed codes: a uint8
 * tensor with shape `[]` holds any number of bytes.
 */
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
  /** Fingerprint of the model whose KV cache was compressed, when it came from a model. */
  model?: string;
}

/** Bytes a serialized cache may be read from: any byte view (Node Buffer, subarray, SharedArrayBuffer-backed) or a whole buffer. */
export type ByteSource = Uint8Array | ArrayBuffer | SharedArrayBuffer | ArrayBufferView;

const MAGIC = 0x4b50564b; // "KVPK" little-endian
/** The container format this build writes (and the only one it reads). */
export const CONTAINER_VERSION = 2;
/** "KVPK", u32 version, u32 header length, u32 CRC-32, f64 payload length. */
const PREAMBLE = 24;
const CRC_AT = 12;

function elementCount(shape: number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/** Elements a stored tensor of this dtype and shape holds, or null for packed bytes (uint8, shape []). */
function expectedElements(dtype: StoredDType, shape: number[]): number | null {
  return dtype === 'uint8' && shape.length === 0 ? null : elementCount(shape);
}

/** Payload bytes of a container: the sum of its tensors' bytes (what `byteSize()` reports). */
export function payloadBytes(tensors: StoredTensor[]): number {
  return tensors.reduce((a, t) => a + t.data.byteLength, 0);
}

/** CRC-32 of a container's bytes, every byte but the CRC field itself. */
function containerCrc(bytes: Uint8Array): number {
  return crc32(bytes.subarray(CRC_AT + 4), crc32(bytes.subarray(0, CRC_AT)));
}

/**
 * Writes a container (format version 2): a 24-byte preamble — `"KVPK"`, u32 format version, u32 JSON
 * header length, u32 CRC-32 of every other byte of the container (preamble, header and payload), f64
 * payload length — then the UTF-8 JSON header (strategy, options, model fingerprint, meta, tensor
 * table) padded to 8 bytes, then the raw payload. The header is the only overhead:
 * `bytes.length − headerBytes(bytes)` equals {@link payloadBytes}.
 * @throws KvpackError('shape' | 'dtype') when a tensor's data does not match its shape or dtype.
 */
export function encodeContainer(c: Container): Uint8Array {
  let offset = 0;
  const names = new Set<string>();
  const table = c.tensors.map((t) => {
    check(!names.has(t.name), 'shape', `serialize: tensor "${t.name}" is written twice`);
    names.add(t.name);
    const expected = expectedElements(t.dtype, t.shape) ?? t.data.length;
    check(t.data.length === expected, 'shape', `serialize: tensor "${t.name}" has ${t.data.length} elements but shape [${t.shape}]`);
    check(t.data.byteLength === t.data.length * ITEM_BYTES[t.dtype], 'dtype', `serialize: tensor "${t.name}" data does not match dtype ${t.dtype}`);
    const entry = { name: t.name, dtype: t.dtype, shape: t.shape, offset, bytes: t.data.byteLength };
    offset += entry.bytes;
    return entry;
  });
  const header = JSON.stringify({
    strategy: c.strategy,
    options: c.options ?? {},
    ...(c.model ? { model: c.model } : {}),
    meta: c.meta,
    tensors: table,
  });
  const payload = new Uint8Array(offset);
  c.tensors.forEach((t, i) => payload.set(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength), table[i].offset));
  return writeContainer(header, payload);
}

/**
 * The container bytes of a JSON header text and a payload, with the preamble and the CRC-32 filled
 * in. {@link encodeContainer} writes through it; tests use it to write hostile headers that still
 * carry a valid checksum. @internal
 */
export function writeContainer(header: string, payload: Uint8Array): Uint8Array {
  const hb = new TextEncoder().encode(header);
  const start = Math.ceil((PREAMBLE + hb.length) / 8) * 8;
  const out = new Uint8Array(start + payload.length);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, MAGIC, true);
  dv.setUint32(4, CONTAINER_VERSION, true);
  dv.setUint32(8, hb.length, true);
  dv.setFloat64(16, payload.length, true);
  out.set(hb, PREAMBLE);
  out.fill(0x20, PREAMBLE + hb.length, start);
  out.set(payload, start);
  dv.setUint32(CRC_AT, containerCrc(out), true);
  return out;
}

/** The JSON header text and the payload of container bytes (no checks beyond the preamble's lengths). @internal */
export function splitContainer(source: ByteSource): { header: string; payload: Uint8Array } {
  const bytes = byteView(source);
  const pre = readPreamble(bytes);
  return { header: new TextDecoder().decode(bytes.subarray(PREAMBLE, PREAMBLE + pre.headerLength)), payload: bytes.subarray(pre.start) };
}

/**
 * A Uint8Array over exactly the given bytes, without copying: a Node Buffer or any other view keeps
 * its byteOffset and length; an ArrayBuffer or SharedArrayBuffer is viewed whole.
 * @throws KvpackError('dtype') for anything else.
 */
export function byteView(bytes: ByteSource): Uint8Array {
  if (bytes instanceof Uint8Array) return bytes;
  if (ArrayBuffer.isView(bytes)) return new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (bytes instanceof ArrayBuffer || (typeof SharedArrayBuffer !== 'undefined' && bytes instanceof SharedArrayBuffer)) return new Uint8Array(bytes);
  throw new KvpackError('dtype', `a serialized cache must be a Uint8Array, Buffer, ArrayBuffer or SharedArrayBuffer, got ${Object.prototype.toString.call(bytes)}`);
}

interface Preamble {
  version: number;
  headerLength: number;
  crc: number;
  payloadBytes: number;
  /** Offset of the payload: the preamble and header rounded up to 8 bytes. */
  start: number;
}

function readPreamble(bytes: Uint8Array): Preamble {
  check(bytes.length >= 8, 'truncated', `serialized cache is truncated: ${bytes.length} bytes, less than its ${PREAMBLE}-byte preamble`);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  check(dv.getUint32(0, true) === MAGIC, 'corrupt', 'serialized cache is corrupt: bad magic (expected "KVPK"); this is not a kvpack cache');
  const version = dv.getUint32(4, true);
  check(
    version === CONTAINER_VERSION,
    'corrupt',
    version === 1
      ? `serialized cache has container format version 1, which this build no longer reads: version 1 had no checksum over its header, so edits to it went unnoticed; serialize the cache again (this build writes version ${CONTAINER_VERSION})`
      : `serialized cache has unsupported container format version ${version} (this build reads version ${CONTAINER_VERSION})`,
  );
  check(bytes.length >= PREAMBLE, 'truncated', `serialized cache is truncated: ${bytes.length} bytes, less than its ${PREAMBLE}-byte preamble`);
  const headerLength = dv.getUint32(8, true);
  const payload = dv.getFloat64(16, true);
  check(Number.isSafeInteger(payload) && payload >= 0, 'corrupt', `serialized cache is corrupt: preamble field payloadBytes = ${payload} is not a byte count`);
  const start = Math.ceil((PREAMBLE + headerLength) / 8) * 8;
  const want = start + payload;
  check(bytes.length >= want, 'truncated', `serialized cache is truncated: ${bytes.length} bytes, but its preamble declares ${want} (a ${headerLength}-byte header and a ${payload}-byte payload)`);
  check(bytes.length === want, 'corrupt', `serialized cache is corrupt: ${bytes.length - want} trailing bytes after the ${want} that its preamble declares`);
  return { version, headerLength, crc: dv.getUint32(CRC_AT, true), payloadBytes: payload, start };
}

/**
 * Bytes of a serialized container that are header (preamble + JSON + padding), not payload.
 * @throws KvpackError('corrupt' | 'truncated') when the preamble is not a kvpack container's.
 */
export function headerBytes(bytes: ByteSource): number {
  return readPreamble(byteView(bytes)).start;
}

const NAME = /^[A-Za-z0-9_.-]{1,200}$/;

const TableEntrySchema = z.strictObject({
  name: z.string().regex(NAME, 'a tensor name of 1–200 letters, digits, "_", "." or "-"'),
  dtype: z.enum(DTYPES),
  shape: z.array(z.int().nonnegative()).max(8),
  offset: z.int().nonnegative(),
  bytes: z.int().nonnegative(),
});

const HeaderSchema = z.strictObject({
  strategy: z.string().regex(/^[a-z][a-z0-9-]{0,63}$/, 'a registered strategy name'),
  options: z.record(z.string(), z.unknown()),
  model: z.string().min(1).max(256).optional(),
  meta: z.record(z.string(), z.unknown()),
  tensors: z.array(TableEntrySchema),
});

/** Expectation for {@link DecodedContainer.get}: a dtype (or several) and a shape, `null` for a free axis. */
export interface TensorExpectation {
  dtype?: StoredDType | StoredDType[];
  shape?: (number | null)[];
}

/** Decoded container with a tensor lookup by name. */
export interface DecodedContainer extends Container {
  /** The tensor `name`, checked against `expect` when given. Marks it as read. */
  get(name: string, expect?: TensorExpectation): StoredTensor;
  has(name: string): boolean;
  /** Names of the tensors no {@link get} has read yet, in table order. */
  unread(): string[];
  /** Container format version. */
  readonly version: number;
}

/** Deepest nesting a header may have (kvpack writes at most 6). */
const MAX_HEADER_DEPTH = 32;

/** Nesting depth of a parsed JSON value, iteratively (no recursion on hostile input). */
function jsonDepth(v: unknown): number {
  let max = 0;
  const stack: [unknown, number][] = [[v, 0]];
  while (stack.length) {
    const [x, d] = stack.pop()!;
    if (d > max) max = d;
    if (max > MAX_HEADER_DEPTH) return max;
    if (x && typeof x === 'object') for (const y of Object.values(x)) stack.push([y, d + 1]);
  }
  return max;
}

/** The first line of a zod error, with its path, for a one-line message. */
function firstIssue(e: z.ZodError): string {
  const i = e.issues[0];
  return `${i.path.length ? i.path.join('.') + ': ' : ''}${i.message}`;
}

/**
 * Parses a container written by {@link encodeContainer}, from any byte view (a Node Buffer, a
 * subarray at any offset, a SharedArrayBuffer) without depending on its alignment. Each tensor's data
 * is copied into a buffer of its own.
 *
 * Checked before anything is used: magic, format version (version 1 is refused by name), the
 * declared lengths against the bytes present, the CRC-32 over every byte, the header's fields and
 * types, unique tensor names, and a tensor table that tiles the payload exactly (each entry inside
 * it, no gaps or overlaps, bytes = elements × dtype size).
 * @throws KvpackError('truncated') when the bytes end before the declared header or payload does;
 *         KvpackError('corrupt') naming the field for everything else.
 */
export function decodeContainer(source: ByteSource): DecodedContainer {
  if (reuse && reuse.bytes === source) return reuse.container;
  const bytes = byteView(source);
  const pre = readPreamble(bytes);
  check(containerCrc(bytes) === pre.crc, 'corrupt', 'serialized cache is corrupt: CRC-32 mismatch (the header or the payload was changed or damaged)');
  let raw: unknown;
  try {
    raw = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes.subarray(PREAMBLE, PREAMBLE + pre.headerLength)));
  } catch (e) {
    throw new KvpackError('corrupt', 'serialized cache is corrupt: its header is not valid UTF-8 JSON', { cause: e });
  }
  check(jsonDepth(raw) <= MAX_HEADER_DEPTH, 'corrupt', `serialized cache is corrupt: its header nests deeper than ${MAX_HEADER_DEPTH} levels`);
  const parsed = HeaderSchema.safeParse(raw);
  if (!parsed.success) throw new KvpackError('corrupt', `serialized cache is corrupt: header field ${firstIssue(parsed.error)}`);
  const header = parsed.data;
  const payload = bytes.subarray(pre.start);
  const seen = new Set<string>();
  let end = 0;
  const tensors: StoredTensor[] = header.tensors.map((e) => {
    const what = `serialized ${header.strategy} cache is corrupt: tensor "${e.name}"`;
    check(!seen.has(e.name), 'corrupt', `${what} appears twice in the tensor table`);
    seen.add(e.name);
    check(e.offset === end, 'corrupt', `${what} starts at payload byte ${e.offset}, expected ${end} (the table must tile the payload without gaps or overlaps)`);
    check(e.offset + e.bytes <= payload.length, 'corrupt', `${what} ends at byte ${e.offset + e.bytes}, past the ${payload.length}-byte payload`);
    const item = ITEM_BYTES[e.dtype];
    const n = expectedElements(e.dtype, e.shape);
    check(Number.isSafeInteger(n ?? 0), 'corrupt', `${what} has an impossible shape [${e.shape}]`);
    check(n === null ? true : n * item === e.bytes, 'corrupt', `${what} has ${e.bytes} bytes, but shape [${e.shape}] of ${e.dtype} needs ${(n ?? 0) * item}`);
    check(e.bytes % item === 0, 'corrupt', `${what} has ${e.bytes} bytes, not a multiple of ${item} (${e.dtype})`);
    end = e.offset + e.bytes;
    const copy = new Uint8Array(e.bytes);
    copy.set(payload.subarray(e.offset, e.offset + e.bytes));
    const buf = copy.buffer;
    const data: StoredArray =
      e.dtype === 'float32'
        ? new Float32Array(buf)
        : e.dtype === 'float16' || e.dtype === 'bfloat16' || e.dtype === 'uint16'
          ? new Uint16Array(buf)
          : e.dtype === 'int8'
            ? new Int8Array(buf)
            : e.dtype === 'int32'
              ? new Int32Array(buf)
              : copy;
    return { name: e.name, dtype: e.dtype, shape: e.shape, data };
  });
  check(end === payload.length, 'corrupt', `serialized ${header.strategy} cache is corrupt: its tensor table covers ${end} of the ${payload.length} payload bytes`);
  const byName = new Map(tensors.map((t) => [t.name, t]));
  const read = new Set<string>();
  return {
    version: pre.version,
    strategy: header.strategy,
    options: header.options,
    ...(header.model ? { model: header.model } : {}),
    meta: header.meta,
    tensors,
    has: (name) => byName.has(name),
    unread: () => tensors.map((t) => t.name).filter((n) => !read.has(n)),
    get(name, expect) {
      const t = byName.get(name);
      if (!t) throw new KvpackError('corrupt', `serialized ${header.strategy} cache is corrupt: tensor "${name}" is missing`);
      read.add(name);
      if (expect) checkTensor(header.strategy, t, expect);
      return t;
    },
  };
}

/** A container already decoded from these very bytes, while {@link withDecodedContainer} runs. */
let reuse: { bytes: ByteSource; container: DecodedContainer } | null = null;

/**
 * Runs `fn` with `decodeContainer(bytes)` answered by `container` (already decoded and checked from
 * those bytes), so that a restore decodes and checksums the bytes once, and what the strategy reads
 * is tracked on one container. @internal
 */
export function withDecodedContainer<T>(bytes: ByteSource, container: DecodedContainer, fn: () => T): T {
  const outer = reuse;
  reuse = { bytes, container };
  try {
    return fn();
  } finally {
    reuse = outer;
  }
}

function checkTensor(strategy: string, t: StoredTensor, expect: TensorExpectation): void {
  const what = `serialized ${strategy} cache is corrupt: tensor "${t.name}"`;
  if (expect.dtype !== undefined) {
    const ok = Array.isArray(expect.dtype) ? expect.dtype : [expect.dtype];
    check(ok.includes(t.dtype), 'corrupt', `${what} has dtype ${t.dtype}, expected ${ok.join(' or ')}`);
  }
  if (expect.shape !== undefined) {
    const want = expect.shape;
    check(
      t.shape.length === want.length && want.every((w, i) => w === null || w === t.shape[i]),
      'corrupt',
      `${what} has shape [${t.shape}], expected [${want.map((w) => (w === null ? '*' : w))}]`,
    );
  }
}
