import * as tf from '@tensorflow/tfjs-core';
import { HalfTensor, decodeHalf, disposeHeld, heldRowPrefix, type HeldFloat, type StoredItem, type StoredReader, type StoredSpec } from '@kvpack/core';
import { dequantizeHeld, disposeHeldQuantized, heldQuantizedItems, heldQuantizedResidentBytes, heldQuantizedSpecs, holdQuantized, readHeldQuantized, type HeldQuantized } from '../quant/held-quantized.js';
import { quantizeMatrix, quantizedRowPrefix, readQuantized, type QuantSpec } from '../quant/quantize.js';
import type { GroupSvdConfig } from './group-config.js';

/*
 * The stored matrices of a grouped low-rank cache (token bases and per-layer factors), held on the
 * backend in their stored form only: float16 packed ({@link HalfTensor}), float32 as a tensor, or
 * group-quantized as packed codes + float16 scales (+ uint8 zero points). {@link blockValues} unpacks
 * (or dequantizes) one into a transient float32 tensor per use.
 */

/** One stored matrix [rows, cols]. */
export interface Block {
  name: string;
  rows: number;
  cols: number;
  /** float16 (packed) or float32 values as stored; null when quantized. */
  held: HeldFloat | null;
  /** The quantized form on the backend (what compute dequantizes and a serialization reads back), or null. */
  quant: HeldQuantized | null;
}

/** The stored matrices of one kind (keys or values). */
export interface KindBlocks {
  /** Shared token basis per group, [T, R_g]. */
  basis: Block[];
  /** Reconstruction factor per layer, [R_g, H_kv·d]. */
  factors: Block[];
}

function quantFor(config: GroupSvdConfig, part: 'basis' | 'factors'): QuantSpec | null {
  const q = config.factorQuantization;
  if (!q || (q.apply !== 'both' && q.apply !== part)) return null;
  return { bits: q.bits, quantGroupSize: q.quantGroupSize, symmetric: q.symmetric };
}

function quantBlock(name: string, quant: HeldQuantized): Block {
  return { name, rows: quant.rows, cols: quant.cols, held: null, quant };
}

/**
 * Makes a stored block from float32 values: quantizes, or packs as float16 (on webgpu on the device),
 * or keeps the float32 tensor, as configured. Takes ownership of `x`.
 */
export async function makeBlock(name: string, x: tf.Tensor2D, config: GroupSvdConfig, part: 'basis' | 'factors'): Promise<Block> {
  const [rows, cols] = x.shape;
  const spec = quantFor(config, part);
  if (spec) {
    try {
      return quantBlock(name, holdQuantized(quantizeMatrix((await x.data()) as Float32Array, rows, cols, spec)));
    } finally {
      x.dispose();
    }
  }
  if (config.storage === 'float16') {
    try {
      return { name, rows, cols, held: await HalfTensor.fromTensor(x), quant: null };
    } finally {
      x.dispose();
    }
  }
  return { name, rows, cols, held: x, quant: null };
}

/**
 * The block's values as float32 [rows, cols]. Call inside `tf.tidy`: float16 and quantized blocks give
 * a transient tensor (unpacked, or dequantized with `dequantizeHeld`, bit-identical to the host
 * dequantization); a float32 block gives its stored tensor itself (never dispose it).
 */
export function blockValues(b: Block): tf.Tensor2D {
  if (b.quant) return dequantizeHeld(b.quant);
  const h = b.held!;
  return (h instanceof HalfTensor ? h.unpack() : h) as tf.Tensor2D;
}

/**
 * Rows `rows` of the block's values, float32 [S, cols] (transient; inside tf.tidy): a float16 block
 * gathers the packed rows and unpacks only them (`HalfTensor.unpackRows`), a float32 block gathers its
 * stored tensor, a quantized block dequantizes whole and gathers. Same values as
 * `tf.gather(blockValues(b), rows)`.
 */
export function blockRows(b: Block, rows: tf.Tensor1D): tf.Tensor2D {
  if (b.held instanceof HalfTensor) return b.held.unpackRows(rows);
  return tf.gather(blockValues(b), rows) as tf.Tensor2D;
}

/** A caller-owned copy of the block's values, [rows, cols] float32. */
export function blockCopy(b: Block): tf.Tensor2D {
  return tf.tidy(() => {
    const v = blockValues(b);
    return v === b.held ? tf.clone(v) : v;
  });
}

/**
 * Rows of a block read on the host, float32 [starts.length · run, cols]: rows s … s + run − 1 for each
 * start s. For the wasm backend (the packed bits are read in place from its heap, only the rows needed
 * are decoded); null when the block cannot be read that way (quantized, or not on wasm).
 */
export function blockRowsOnHost(b: Block, starts: ArrayLike<number>, run: number, out: Float32Array): Float32Array | null {
  if (!b.held || tf.getBackend() !== 'wasm') return null;
  const w = b.cols;
  const need = starts.length * run * w;
  if (b.held instanceof HalfTensor) {
    const bits = b.held.bitsView();
    for (let i = 0; i < starts.length; i++) out.set(decodeHalf(bits.subarray(starts[i] * w, (starts[i] + run) * w)), i * run * w);
  } else {
    const f = (tf.backend() as unknown as { typedArrayFromHeap(t: tf.Tensor): Float32Array }).typedArrayFromHeap(b.held);
    for (let i = 0; i < starts.length; i++) out.set(f.subarray(starts[i] * w, (starts[i] + run) * w), i * run * w);
  }
  return out.subarray(0, need);
}

/** Whether {@link blockRowsOnHost} can read this block on the current backend. */
export function hostRowsReadable(b: Block): boolean {
  return b.held !== null && tf.getBackend() === 'wasm';
}

export function blockSpecs(b: Block, storage: 'float16' | 'float32'): StoredSpec[] {
  return b.quant ? heldQuantizedSpecs(b.name, b.quant) : [{ name: b.name, dtype: storage, shape: [b.rows, b.cols] }];
}

/** What the block stores, as serialization items (the same bytes as {@link blockSpecs}). */
export function blockItems(b: Block): StoredItem[] {
  return b.quant ? heldQuantizedItems(b.name, b.quant) : [{ name: b.name, held: b.held! }];
}

/** Bytes the block holds on the backend. */
export function blockResidentBytes(b: Block): number {
  if (b.quant) return heldQuantizedResidentBytes(b.quant);
  const h = b.held!;
  return h instanceof HalfTensor ? h.residentBytes : h.size * 4;
}

/**
 * A new block of the first `rows` rows of `b`, the stored numbers bit for bit (float16 bit patterns,
 * float32 values, or quantized codes with their scales and zero points); `rows = b.rows` copies it.
 * Does not dispose `b`.
 */
export async function blockRowPrefix(b: Block, rows: number): Promise<Block> {
  if (b.quant) return quantBlock(b.name, holdQuantized(quantizedRowPrefix(await readHeldQuantized(b.quant), rows)));
  return { name: b.name, rows, cols: b.cols, held: await heldRowPrefix(b.held!, rows), quant: null };
}

export function disposeBlock(b: Block): void {
  disposeHeld(b.held);
  if (b.quant) disposeHeldQuantized(b.quant);
}

/** Restores a stored block from a decoded container: float16 packed as stored, float32 as a tensor, quantized parts as stored. */
export function loadBlock(r: Omit<StoredReader, 'header'>, config: GroupSvdConfig, name: string, rows: number, cols: number, part: 'basis' | 'factors'): Block {
  const spec = quantFor(config, part);
  if (!spec) {
    const expect = { dtype: config.storage, shape: [rows, cols] };
    const held = config.storage === 'float16' ? r.half(name, expect) : r.held(name, expect);
    return { name, rows, cols, held, quant: null };
  }
  return quantBlock(name, holdQuantized(readQuantized(r, name, rows, cols, spec)));
}
