/**
 * Fuzzing of cache restores, for the conformance suite: truncations, byte flips and header edits of
 * a serialized cache, each read from a Node Buffer at a non-zero offset (or a SharedArrayBuffer), each
 * trial classified as a correct restore, a named KvpackError, another error, a silently different
 * result, or a tensor leak. Seeded (fast-check), so a failure reproduces.
 */
import * as tf from '@tensorflow/tfjs-core';
import fc from 'fast-check';
import { KvpackError } from './errors.js';
import { UNEXPECTED_RESTORE_FAILURE, deserializeCache } from './registry.js';
import { splitContainer, writeContainer } from './serialize.js';
import type { CompressedCache } from './types.js';
import type { CompressedMlaCache } from './mla.js';

/** How a set of trials ended. */
export interface RestoreFuzzFigures {
  trials: number;
  /** Restores that returned exactly the saved cache. */
  correct: number;
  /** Trials that ended in a KvpackError raised by kvpack's own checks. */
  namedErrors: number;
  /** Anything else thrown (a TypeError, a RangeError, a tfjs error, or a KvpackError wrapping one): must be 0. */
  otherErrors: number;
  /** Restores that returned a different cache from bytes whose checksum no longer matched: must be 0. */
  silentlyDifferent: number;
  /**
   * Restores that returned a different cache after a header edit whose checksum was recomputed (a
   * hostile or buggy writer: the file is valid and says something else, e.g. another RoPE theta).
   */
  differentAfterRechecksum: number;
  /** Trials after which `tf.memory().numTensors` had changed: must be 0. */
  leaks: number;
  /** First few unexpected outcomes, for the failure message. */
  examples: string[];
}

/** Every layer's reconstructed keys and values (then the token counts), for a bitwise comparison. */
export async function cacheSnapshot(c: CompressedCache): Promise<Float32Array[]> {
  const out: Float32Array[] = [];
  for (let l = 0; l < c.layout.nLayers; l++) {
    const k = c.keys(l);
    const v = c.values(l);
    try {
      out.push((await k.data()) as Float32Array, (await v.data()) as Float32Array);
    } finally {
      tf.dispose([k, v]);
    }
  }
  out.push(Float32Array.from({ length: c.layout.nLayers }, (_, l) => c.tokenCount(l)));
  return out;
}

/** Every layer's reconstructed latents and RoPE keys (then the token counts) of an MLA cache, for a bitwise comparison. */
export async function mlaCacheSnapshot(c: CompressedMlaCache): Promise<Float32Array[]> {
  const out: Float32Array[] = [];
  for (let l = 0; l < c.layout.nLayers; l++) {
    const a = c.latents(l);
    const b = c.ropeKeys(l);
    try {
      out.push(Float32Array.from((await a.data()) as Float32Array), Float32Array.from((await b.data()) as Float32Array));
    } finally {
      tf.dispose([a, b]);
    }
  }
  out.push(Float32Array.from({ length: c.layout.nLayers }, (_, l) => c.tokenCount(l)));
  return out;
}

function sameSnapshot(a: Float32Array[], b: Float32Array[]): boolean {
  if (a.length !== b.length) return false;
  return a.every((x, i) => x.length === b[i].length && Buffer.from(x.buffer, x.byteOffset, x.byteLength).equals(Buffer.from(b[i].buffer, b[i].byteOffset, b[i].byteLength)));
}

/** The bytes inside a fresh Buffer at `offset` (so the view's byteOffset is not 0), or in a SharedArrayBuffer. */
function placed(bytes: Uint8Array, offset: number, shared: boolean): Uint8Array {
  if (shared) {
    const s = new Uint8Array(new SharedArrayBuffer(bytes.length + offset), offset, bytes.length);
    s.set(bytes);
    return s;
  }
  const b = Buffer.alloc(bytes.length + offset, 0xa5);
  b.set(bytes, offset);
  return b.subarray(offset);
}

type Mutation =
  | { kind: 'truncate'; at: number }
  | { kind: 'flip'; edits: [number, number][] }
  | { kind: 'digit'; at: number; digit: number; rechecksum: boolean }
  | { kind: 'field'; path: number; value: unknown; rechecksum: true };

/** Hostile values for a header field. */
const HOSTILE: unknown[] = [0, -1, 1, 2, 3, 7, 1.5, 1e9, 2 ** 31, 2 ** 53, -0.5, null, 'x', '', [], {}, true, [1e9], 'k.0', 'residual.k.0'];

/** Paths to every leaf (and array/object) of a JSON value. */
function paths(v: unknown, prefix: (string | number)[] = [], out: (string | number)[][] = []): (string | number)[][] {
  if (prefix.length) out.push(prefix);
  if (Array.isArray(v)) v.forEach((x, i) => paths(x, [...prefix, i], out));
  else if (v && typeof v === 'object') for (const [k, x] of Object.entries(v)) paths(x, [...prefix, k], out);
  return out;
}

function setPath(root: unknown, path: (string | number)[], value: unknown): unknown {
  const copy = structuredClone(root) as Record<string | number, unknown>;
  let o = copy;
  for (const k of path.slice(0, -1)) o = o[k] as Record<string | number, unknown>;
  const last = path[path.length - 1];
  if (value === undefined) {
    if (Array.isArray(o)) o.splice(last as number, 1);
    else delete o[last];
  } else o[last] = value;
  return copy;
}

function mutate(bytes: Uint8Array, m: Mutation): Uint8Array {
  if (m.kind === 'truncate') return bytes.slice(0, m.at);
  if (m.kind === 'flip') {
    const out = bytes.slice();
    for (const [pos, mask] of m.edits) out[pos % out.length] ^= mask;
    return out;
  }
  const { header, payload } = splitContainer(bytes);
  if (m.kind === 'digit') {
    const digits = [...header.matchAll(/\d/g)].map((x) => x.index!);
    const at = digits[m.at % digits.length];
    const old = Number(header[at]);
    const next = (old + 1 + (m.digit % 9)) % 10;
    const edited = header.slice(0, at) + String(next) + header.slice(at + 1);
    if (m.rechecksum) return writeContainer(edited, payload);
    const out = bytes.slice();
    out[24 + at] = edited.charCodeAt(at);
    return out;
  }
  const json = JSON.parse(header);
  const all = paths(json);
  const path = all[m.path % all.length];
  return writeContainer(JSON.stringify(setPath(json, path, m.value)), payload);
}

const mutationArb: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ kind: fc.constant('truncate' as const), at: fc.nat() }),
  fc.record({ kind: fc.constant('flip' as const), edits: fc.array(fc.tuple(fc.nat(), fc.integer({ min: 1, max: 255 })), { minLength: 1, maxLength: 4 }) }),
  fc.record({ kind: fc.constant('digit' as const), at: fc.nat(), digit: fc.nat(), rechecksum: fc.boolean() }),
  fc.record({ kind: fc.constant('field' as const), path: fc.nat(), value: fc.oneof(fc.constantFrom(...HOSTILE), fc.constant(undefined)), rechecksum: fc.constant(true as const) }),
);

/**
 * Runs `trials` seeded mutations of `bytes` (a serialized cache whose restore must equal `reference`,
 * from {@link cacheSnapshot}) through `deserializeCache` and counts how each ended. Does not assert;
 * the caller asserts on the figures.
 */
export async function fuzzRestore(
  bytes: Uint8Array,
  reference: Float32Array[],
  trials: number,
  seed: number,
  /** How a cache is restored and compared (default: `deserializeCache` and {@link cacheSnapshot}; MLA caches: `deserializeMlaCache` and {@link mlaCacheSnapshot}). */
  io: { restore(bytes: Uint8Array): { dispose(): void }; snapshot(c: never): Promise<Float32Array[]> } = { restore: deserializeCache, snapshot: cacheSnapshot },
): Promise<RestoreFuzzFigures> {
  const f: RestoreFuzzFigures = { trials: 0, correct: 0, namedErrors: 0, otherErrors: 0, silentlyDifferent: 0, differentAfterRechecksum: 0, leaks: 0, examples: [] };
  const note = (what: string, m: Mutation, e?: unknown) => {
    if (f.examples.length < 5) f.examples.push(`${what} after ${JSON.stringify(m)}${e ? `: ${(e as Error).stack?.split('\n').slice(0, 3).join(' | ')}` : ''}`);
  };
  await fc.assert(
    fc.asyncProperty(mutationArb, fc.integer({ min: 1, max: 15 }), fc.boolean(), async (m, offset, shared) => {
      const mutated = mutate(bytes, m.kind === 'truncate' ? { ...m, at: m.at % bytes.length } : m);
      const covered = !(m.kind === 'field' || (m.kind === 'digit' && m.rechecksum));
      const before = tf.memory().numTensors;
      f.trials++;
      let restored: { dispose(): void } | null = null;
      try {
        restored = io.restore(placed(mutated, offset, shared && f.trials % 4 === 0));
        const snap = await io.snapshot(restored as never);
        if (sameSnapshot(snap, reference)) f.correct++;
        else if (covered) {
          f.silentlyDifferent++;
          note('silently different', m);
        } else f.differentAfterRechecksum++;
      } catch (e) {
        const wrapped = e instanceof KvpackError && e.message.includes(UNEXPECTED_RESTORE_FAILURE);
        if (e instanceof KvpackError && !wrapped) f.namedErrors++;
        else {
          f.otherErrors++;
          note('other error', m, e);
        }
      } finally {
        restored?.dispose();
      }
      if (tf.memory().numTensors !== before) {
        f.leaks++;
        note(`leak of ${tf.memory().numTensors - before} tensors`, m);
      }
      return true;
    }),
    { seed, numRuns: trials, endOnFailure: true },
  );
  return f;
}
