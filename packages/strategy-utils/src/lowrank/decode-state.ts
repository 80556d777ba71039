import * as tf from '@tensorflow/tfjs-core';
import { matmul, type ModelLayout, type RopeConfig } from '@kvpack/core';
import type { Kind } from './group-config.js';
import { fullWidthRopeTables, fusedRopeProduct, signedPairSwap } from './rope-fused.js';

/*
 * Decode-side state of the grouped low-rank cache: what the decode code reads from the cache, and the
 * long-lived tensors derived from it (RoPE tables, pair swap, per-head factors).
 *
 * Backend notes (tfjs 4.22, measured on the wasm backend): a plain 2-D matMul whose right operand is
 * a long-lived tensor is fast (XNNPACK packs it once); a matMul whose right operand is large and new
 * costs about as much again to pack; `slice`/`split`/`unstack` copy the WHOLE input to JS first
 * (`readSync`), `gather`, `transpose` and `reverse` are 10–100× slower per element than a multiply.
 * So the decode code keeps big right operands long-lived, never slices a big tensor, and transposes
 * only small ones ([T, g·n] score blocks).
 */

/** What the decode code reads from a grouped low-rank cache (tensors are the cache's own, not copies). */
interface LowRankSource {
  readonly layout: ModelLayout;
  readonly rope: RopeConfig;
  /** Prefill tokens T. */
  readonly prefillLength: number;
  /** Position of the first prefill token. */
  readonly startPosition: number;
  /** The group token basis U_g of a layer, [T, R_g]. */
  basisOf(kind: Kind, layer: number): tf.Tensor2D;
  /** The layer factor B_l, [R_g, H_kv·d]. */
  factorOf(kind: Kind, layer: number): tf.Tensor2D;
}

/**
 * Long-lived tensors derived from a grouped low-rank cache for reconstruction and decode, built on
 * first use and kept until {@link DecodeState.dispose} (the cache disposes it): RoPE tables [T, d],
 * the pair swap P [d, d], B′ = B·P per layer (when R ≤ d), and per-KV-head factor slices [R, d].
 * They are not serialized and not counted in `byteSize()` (they are rebuilt from stored tensors).
 */
export class DecodeState {
  private tabs: { cos: tf.Tensor2D; sin: tf.Tensor2D } | null = null;
  private swap: tf.Tensor2D | null = null;
  /** Derived factors by key: B·P (`all.l`) and stacked head blocks (`stacked.kind.l`). */
  private readonly swapped = new Map<string, tf.Tensor>();
  private readonly heads = new Map<string, tf.Tensor2D[]>();
  private readonly extra: tf.Tensor[] = [];

  constructor(readonly src: LowRankSource) {}

  /** Full-width RoPE tables at the prefill positions, [T, d] each. */
  tables(): { cos: tf.Tensor2D; sin: tf.Tensor2D } {
    if (!this.tabs) {
      const { headDim } = this.src.layout;
      const T = this.src.prefillLength;
      const { cos, sin } = fullWidthRopeTables(this.src.rope, headDim, this.src.startPosition, T);
      this.tabs = { cos: tf.keep(tf.tensor2d(cos, [T, headDim])), sin: tf.keep(tf.tensor2d(sin, [T, headDim])) };
    }
    return this.tabs;
  }

  /** The signed pair swap P [d, d]. */
  pairSwap(): tf.Tensor2D {
    if (!this.swap) {
      const d = this.src.layout.headDim;
      this.swap = tf.keep(tf.tensor2d(signedPairSwap(this.src.rope.layout, d), [d, d]));
    }
    return this.swap;
  }

  /** B′ = B·P of a layer's key factor when R ≤ d (then U·B′ is cheaper than (U·B)·P), else null. */
  swappedKeyFactor(layer: number): tf.Tensor2D | null {
    const B = this.src.factorOf('k', layer);
    const [R, F] = B.shape;
    const d = this.src.layout.headDim;
    if (R > d) return null;
    let t = this.swapped.get(`all.${layer}`) as tf.Tensor2D | undefined;
    if (!t) {
      t = tf.keep(tf.tidy(() => tf.reshape(matmul(tf.reshape(B, [R * (F / d), d]) as tf.Tensor2D, this.pairSwap()), [R, F]) as tf.Tensor2D));
      this.swapped.set(`all.${layer}`, t);
    }
    return t;
  }

  /** Per-KV-head column blocks of a factor, H_kv tensors [R, d] (B_l[:, h·d:(h+1)·d]), built once with one split. */
  headFactors(kind: Kind, layer: number): tf.Tensor2D[] {
    const key = `${kind}.${layer}`;
    let hs = this.heads.get(key);
    if (!hs) {
      const { nKvHeads } = this.src.layout;
      const src = this.src.factorOf(kind, layer);
      hs = tf.tidy(() => tf.split(src, nKvHeads, 1).map((t) => tf.keep(t as tf.Tensor2D)));
      this.heads.set(key, hs);
    }
    return hs;
  }

  /**
   * A factor's per-KV-head blocks stacked for batched products, [H_kv, R, d] (B_l reshaped [R, H_kv, d]
   * and transposed), built once: the GPU sparse decode multiplies every head's rows in one kernel.
   */
  stackedHeadFactors(kind: Kind, layer: number): tf.Tensor3D {
    const key = `stacked.${kind}.${layer}`;
    let t = this.swapped.get(key) as tf.Tensor3D | undefined;
    if (!t) {
      const { nKvHeads, headDim } = this.src.layout;
      const B = this.src.factorOf(kind, layer);
      t = tf.keep(tf.tidy(() => tf.transpose(tf.reshape(B, [B.shape[0], nKvHeads, headDim]), [1, 0, 2]) as tf.Tensor3D));
      this.swapped.set(key, t);
    }
    return t;
  }

  /** Keeps an extra derived tensor until dispose (sparse mode's per-head tensors). */
  hold<T extends tf.Tensor>(t: T): T {
    this.extra.push(tf.keep(t));
    return t;
  }

  /** Post-RoPE keys of the whole prefill of a layer, [T, H_kv, d]: the fused reconstruction. */
  keys(layer: number): tf.Tensor3D {
    const { cos, sin } = this.tables();
    return fusedRopeProduct(this.src.basisOf('k', layer), this.src.factorOf('k', layer), this.swappedKeyFactor(layer), this.pairSwap(), cos, sin, this.src.layout.nKvHeads);
  }

  /** Values of the whole prefill of a layer, [T, H_kv, d]. */
  values(layer: number): tf.Tensor3D {
    const { nKvHeads, headDim } = this.src.layout;
    return tf.tidy(() => tf.reshape(matmul(this.src.basisOf('v', layer), this.src.factorOf('v', layer)), [this.src.prefillLength, nKvHeads, headDim]) as tf.Tensor3D);
  }

  dispose(): void {
    const all: tf.Tensor[] = [...this.extra, ...this.swapped.values(), ...[...this.heads.values()].flat()];
    if (this.tabs) all.push(this.tabs.cos, this.tabs.sin);
    if (this.swap) all.push(this.swap);
    tf.dispose(all);
    this.tabs = null;
    this.swap = null;
    this.swapped.clear();
    this.heads.clear();
    this.extra.length = 0;
  }
}
