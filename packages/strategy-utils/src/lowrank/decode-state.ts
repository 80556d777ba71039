import * as tf from '@tensorflow/tfjs-core';
import { HalfTensor, matmul, type ModelLayout, type RopeConfig } from '@kvpack/core';
import { blockRows, blockValues, type Block } from './factor-blocks.js';
import type { Kind } from './group-config.js';
import { fullWidthRopeTables, fullWidthRopeTensors, fusedRopeProduct, signedPairSwap } from './rope-fused.js';

/*
 * Decode-side view of the grouped low-rank cache: what the decode code reads from the cache (its stored
 * blocks), and the tensors derived from them per call (unpacked factors, RoPE tables, pair swap,
 * per-head factor blocks). Nothing derived lives between calls: the cache holds on the backend only its
 * stored form. Every accessor returning a tensor is for use inside `tf.tidy` (what it creates is
 * transient and freed by the caller's tidy).
 *
 * Backend notes (tfjs 4.22, measured on the wasm backend): a plain 2-D matMul whose right operand is
 * large and new costs about as much again to pack (XNNPACK); `slice`/`split`/`unstack` copy the WHOLE
 * input to JS first (`readSync`); `gather`, `transpose` and `reverse` are 10–100× slower per element
 * than a multiply. So the decode code never slices a big tensor, transposes only small ones
 * ([T, g·n] score blocks), and on wasm reads the rows it gathers straight from the packed bits in the
 * heap (factor-blocks.ts `blockRowsOnHost`).
 */

/** What the decode code reads from a grouped low-rank cache (the cache's own blocks, not copies). */
interface LowRankSource {
  readonly layout: ModelLayout;
  readonly rope: RopeConfig;
  /** Prefill tokens T. */
  readonly prefillLength: number;
  /** Position of the first prefill token. */
  readonly startPosition: number;
  /** The stored group token basis U_g of a layer, [T, R_g]. */
  basisBlock(kind: Kind, layer: number): Block;
  /** The stored layer factor B_l, [R_g, H_kv·d]. */
  factorBlock(kind: Kind, layer: number): Block;
}

/**
 * Per-call tensors derived from a grouped low-rank cache for reconstruction and decode. Holds no
 * tensor: the RoPE tables come from core's shared device tables on device backends (one per position
 * range for every cache and layer, not this cache's) or are uploaded per call from host arrays on
 * wasm/cpu (core's `ropeTableData`, expanded to full width and memoized on the host by rope-fused.ts),
 * the pair swap is uploaded per call, and the factors are unpacked from their stored form (only the
 * rows needed where the decode code gathers rows).
 */
export class DecodeState {
  constructor(readonly src: LowRankSource) {}

  /** U_g of a layer as float32 [T, R_g] (transient; inside tf.tidy). */
  basis(kind: Kind, layer: number): tf.Tensor2D {
    return blockValues(this.src.basisBlock(kind, layer));
  }

  /** B_l as float32 [R_g, H_kv·d] (transient; inside tf.tidy). */
  factor(kind: Kind, layer: number): tf.Tensor2D {
    return blockValues(this.src.factorBlock(kind, layer));
  }

  /** Rank R_g of a layer's group. */
  rank(kind: Kind, layer: number): number {
    return this.src.basisBlock(kind, layer).cols;
  }

  /** Full-width RoPE tables at the prefill positions as host arrays, [T, d] each (shared: do not modify). */
  tableData(): { cos: Float32Array; sin: Float32Array } {
    return fullWidthRopeTables(this.src.rope, this.src.layout.headDim, this.src.startPosition, this.src.prefillLength);
  }

  /**
   * Full-width RoPE tables at the prefill positions, [T, d] each, for use inside tf.tidy: on device
   * backends core's shared device tables (a process-wide working set, not the cache's; never dispose
   * them), on wasm/cpu transient uploads of the host memo (rope-fused.ts `fullWidthRopeTensors`).
   */
  tables(): { cos: tf.Tensor2D; sin: tf.Tensor2D } {
    return fullWidthRopeTensors(this.src.rope, this.src.layout.headDim, this.src.startPosition, this.src.prefillLength);
  }

  /**
   * U_g of a layer as a kernel can read it in place: the stored float16 tensor itself when the block is
   * float16 (never dispose it), else its float32 values (transient, or a float32 block's own tensor;
   * inside tf.tidy).
   */
  basisHeld(kind: Kind, layer: number): HalfTensor | tf.Tensor2D {
    const b = this.src.basisBlock(kind, layer);
    return b.held instanceof HalfTensor ? b.held : blockValues(b);
  }

  /**
   * B_l of a layer as a kernel can read it in place, [R_g, H_kv·d]: the stored float16 tensor itself
   * when the block is float16 (never dispose it), else its float32 values (transient, or a float32
   * block's own tensor; inside tf.tidy).
   */
  factorHeld(kind: Kind, layer: number): HalfTensor | tf.Tensor2D {
    const b = this.src.factorBlock(kind, layer);
    return b.held instanceof HalfTensor ? b.held : blockValues(b);
  }

  /** U_g of a layer at the given token rows, float32 [S, R_g] (only those rows unpacked; transient; inside tf.tidy). */
  basisRows(kind: Kind, layer: number, rows: tf.Tensor1D): tf.Tensor2D {
    return blockRows(this.src.basisBlock(kind, layer), rows);
  }

  /** The signed pair swap P [d, d] (transient; inside tf.tidy). */
  pairSwap(): tf.Tensor2D {
    const d = this.src.layout.headDim;
    const P = signedPairSwap(this.src.rope.layout, d);
    return tf.tensor2d(tf.getBackend() === 'cpu' ? P.slice() : P, [d, d]);
  }

  /** B′ = B·P of a key factor B [R, F] when R ≤ d (then U·B′ is cheaper than (U·B)·P), else null. */
  swappedKeyFactor(B: tf.Tensor2D, P: tf.Tensor2D): tf.Tensor2D | null {
    const [R, F] = B.shape;
    const d = this.src.layout.headDim;
    if (R > d) return null;
    return tf.reshape(matmul(tf.reshape(B, [R * (F / d), d]) as tf.Tensor2D, P), [R, F]) as tf.Tensor2D;
  }

  /** Per-KV-head column blocks of a factor B [R, H_kv·d]: H_kv tensors [R, d] (one split). */
  headFactors(B: tf.Tensor2D): tf.Tensor2D[] {
    const { nKvHeads } = this.src.layout;
    return nKvHeads === 1 ? [B] : (tf.split(B, nKvHeads, 1) as tf.Tensor2D[]);
  }

  /** A factor's per-KV-head blocks stacked for batched products, [H_kv, R, d] (B reshaped [R, H_kv, d] and transposed). */
  stackedHeadFactors(B: tf.Tensor2D): tf.Tensor3D {
    const { nKvHeads, headDim } = this.src.layout;
    return tf.transpose(tf.reshape(B, [B.shape[0], nKvHeads, headDim]), [1, 0, 2]) as tf.Tensor3D;
  }

  /** Post-RoPE keys of the whole prefill of a layer, [T, H_kv, d]: the fused reconstruction. Caller-owned. */
  keys(layer: number): tf.Tensor3D {
    return tf.tidy(() => {
      const { cos, sin } = this.tables();
      const P = this.pairSwap();
      const B = this.factor('k', layer);
      return fusedRopeProduct(this.basis('k', layer), B, this.swappedKeyFactor(B, P), P, cos, sin, this.src.layout.nKvHeads);
    });
  }

  /** Values of the whole prefill of a layer, [T, H_kv, d]. Caller-owned. */
  values(layer: number): tf.Tensor3D {
    const { nKvHeads, headDim } = this.src.layout;
    return tf.tidy(() => tf.reshape(matmul(this.basis('v', layer), this.factor('v', layer)), [this.src.prefillLength, nKvHeads, headDim]) as tf.Tensor3D);
  }
}
