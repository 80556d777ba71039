import * as tf from '@tensorflow/tfjs-core';
import { BaseCompressedCache, attention, type CompressedCache } from '@kvpack/core';
import { attendWith, hasAttendSwitches } from '@kvpack/strategy-utils/internal';

/** One way to run a decode step's attention over a compressed cache. */
export interface DecodeMode {
  /** "full" (reconstruct the layer's keys and values, then core attention), "attend", "sparse". */
  mode: string;
  /** Words for the table, e.g. "sparse, budget 2048". */
  label: string;
  /** Attention output [1, H, d] of one post-RoPE query q [1, H, d] over the layer's cached tokens. */
  step(layer: number, q: tf.Tensor3D): tf.Tensor3D;
  /** Frees what the mode allocated (nothing for most). */
  dispose?(): void;
}

/** Landmark-selected sparse attention, which a cache compressed for sparse decoding offers. */
interface SparseDecodePath {
  attendSparse?(layer: number, q: tf.Tensor3D, options?: { budget?: number }): tf.Tensor3D;
}

/** Full reconstruction: `keys(layer)` (RoPE applied) and `values(layer)`, then core GQA attention. */
export function fullMode(cache: CompressedCache): DecodeMode {
  return {
    mode: 'full',
    label: 'full reconstruction',
    step: (layer, q) => tf.tidy(() => attention(q, cache.keys(layer), cache.values(layer), 0)),
  };
}

/**
 * The decode modes measured for a cache, from what the cache offers (never from the strategy's name).
 * A cache with one decode path gets it: `attend` when it offers it (the strategy's own fast path, or
 * BaseCompressedCache's reconstruction + core attention), else full reconstruction + core attention.
 * A cache that offers alternative paths (the attention switches of the internal entry, or
 * `attendSparse`: the low-rank caches) gets each measured: `full` (explicit `keys`/`values` + core
 * attention), `attend-full` (its fused full mode, internal `attendWith(cache, l, q, { mode: 'full' })`,
 * or its own `attend`), and `sparse` when it was compressed for sparse decoding
 * (`attendSparse(l, q, { budget })`: landmark-selected chunks up to the budget).
 */
export function decodeModes(cache: CompressedCache, opts: { sparseBudget: number }): DecodeMode[] {
  const modes: DecodeMode[] = [];
  const c = cache as CompressedCache & SparseDecodePath;
  const switches = hasAttendSwitches(cache);
  const proto = Object.getPrototypeOf(cache) as Record<string, unknown>;
  // BaseCompressedCache.attend is reconstruction + attention; a subclass override is a real fast path.
  const ownAttend = typeof c.attend === 'function' && hasOverride(proto, 'attend');
  if (!switches && typeof c.attendSparse !== 'function') {
    modes.push(
      typeof c.attend === 'function'
        ? { mode: 'attend', label: ownAttend ? 'attend (strategy fast path)' : 'attend (reconstruct + attention)', step: (l, q) => c.attend!(l, q) }
        : fullMode(cache),
    );
    return modes;
  }
  modes.push(fullMode(cache));
  if (switches) {
    modes.push({ mode: 'attend-full', label: 'attend, full mode (fused)', step: (l, q) => attendWith(cache, l, q, { mode: 'full' }) });
  } else if (ownAttend) {
    modes.push({ mode: 'attend', label: 'attend (default path)', step: (l, q) => c.attend!(l, q) });
  }
  if (typeof c.attendSparse === 'function') {
    modes.push({ mode: 'sparse', label: `sparse, budget ${opts.sparseBudget}`, step: (l, q) => c.attendSparse!(l, q, { budget: opts.sparseBudget }) });
  }
  return modes;
}

/** True when a class below BaseCompressedCache defines `name` itself. */
function hasOverride(proto: Record<string, unknown> | null, name: string): boolean {
  for (let p = proto; p && p !== Object.prototype; p = Object.getPrototypeOf(p) as Record<string, unknown> | null) {
    if (p === (BaseCompressedCache.prototype as unknown)) return false;
    if (Object.prototype.hasOwnProperty.call(p, name)) return true;
  }
  return false;
}
