import * as tf from '@tensorflow/tfjs-core';
import {
  BaseCompressedCache,
  KvpackError,
  applyRope,
  check,
  compressionRatioOf,
  denseCacheBytes,
  specBytes,
  type ModelLayout,
  type RopeConfig,
  type StoredItem,
  type StoredReader,
} from '@kvpack/core';
import { decodePositions, encodePositions, positionLayerBytes, positionSpec } from './positions.js';
import type { GroupSvdConfig } from '../lowrank/group-config.js';
import { GroupSvdCache } from '../lowrank/group-svd-cache.js';
import { lowRankBytes } from '../lowrank/rank-target.js';

/** One stage of a composed cache: bytes before and after it, and its ratio bytesIn ÷ bytesOut. */
export interface StageStats {
  stage: 'evict' | 'lowRank' | 'quantize';
  /** What the stage is (`snapkv budget 48`, `xkv G=2 ranks K [8,8] V [12,12]`, `int4 g=8`). */
  what: string;
  bytesIn: number;
  bytesOut: number;
  /** bytesIn ÷ bytesOut (×). */
  ratio: number;
  /** kvpress's compression_ratio of this stage: 1 − 1/ratio. */
  compressionRatio: number;
}

/** Byte breakdown of a {@link StackedCache}; see {@link StackedCache.stats}. */
export interface StackedStats {
  strategy: string;
  /** Prefill tokens T. */
  tokens: number;
  /** Tokens kept per KV head and layer after eviction (n ≤ T). */
  kept: number;
  /** The stages in order; the product of their ratios is `ratio`. */
  stages: StageStats[];
  /** Bytes of the stored low-rank (possibly quantized) factors. */
  factorBytes: number;
  /** Bytes of the stored kept positions (0 when implied). */
  positionBytes: number;
  /** Bytes of the exact decode-token buffer. */
  residualBytes: number;
  /** factorBytes + positionBytes + residualBytes = byteSize(). */
  totalBytes: number;
  /** Dense fp16 bytes of the T prefill tokens. */
  denseBytes: number;
  /** Measured ratio of the compressed prefill: denseBytes ÷ (factorBytes + positionBytes) (×). */
  ratio: number;
  /** kvpress's compression_ratio of `ratio`. */
  compressionRatio: number;
}

/**
 * A composed (stacked) compressed cache: token eviction → grouped low rank over the kept tokens →
 * optionally quantized factors. Per layer it keeps n of the T prefill tokens per KV head (positions
 * [n, H_kv], stored as int32 unless the eviction implies them), and the kept tokens' pre-RoPE keys and
 * values, [n, H_kv, d] with row j of head h the token at positions[j·H_kv + h], are held as a
 * {@link GroupSvdCache} of n tokens (xKV, Chang et al. 2025, §3: U_g [n, R_g] per group, B_l
 * [R_g, H_kv·d] per layer, float16 or int8/int4 group-quantized, bit-packed).
 *
 * Keys are rebuilt pre-RoPE (U_g·B_l) and rotated at their **true** positions startPosition + p (not at
 * their slot index), so decoding after compression sees every kept key where the model put it.
 * Stored: the low-rank stage's items plus `pos.l` (a T-bit mask per KV head or a uint16/int32 list,
 * whichever is smaller: positions.ts); `byteSize()` is their payload (the serialized
 * length minus the container header).
 */
export class StackedCache extends BaseCompressedCache {
  constructor(
    readonly strategy: string,
    readonly options: unknown,
    layout: ModelLayout,
    rope: RopeConfig,
    prefillLength: number,
    /** Position of the first prefill token. */
    readonly startPosition: number,
    /** Kept positions per layer, [n, H_kv] row-major (0-based token indices). */
    private readonly positions: Int32Array[],
    /** Whether the positions are stored (and counted) or implied by the options. */
    private readonly storePositions: boolean,
    /** The low-rank stage over the kept tokens (n tokens, positions 0…n−1 inside it). */
    readonly lowRank: GroupSvdCache,
    /** What the eviction stage is, for {@link stats} (`snapkv`, or `none`). */
    private readonly evictLabel: string,
  ) {
    super(layout, rope, prefillLength);
  }

  /** Tokens kept per KV head and layer (n). */
  get kept(): number {
    return this.lowRank.prefillLength;
  }

  /** Prefill positions (0-based token indices) kept in a layer, [n, H_kv] row-major. */
  keptPositions(layer: number): Int32Array {
    this.assertLive(layer);
    return Int32Array.from(this.positions[layer]);
  }

  protected prefillTokens(): number {
    return this.kept;
  }

  /** Pre-RoPE keys of the kept tokens as reconstructed, [n, H_kv, d]. */
  preRopeKeys(layer: number): tf.Tensor3D {
    this.assertLive(layer);
    return this.lowRank.preRopeKeys(layer);
  }

  /** RoPE(U_g·B_l) with row j of head h rotated at startPosition + positions[j·H_kv + h]. */
  protected prefillKeys(layer: number): tf.Tensor3D {
    const { nKvHeads: H, headDim: d } = this.layout;
    const n = this.kept;
    const pos = Int32Array.from(this.positions[layer], (p) => p + this.startPosition);
    return tf.tidy(() => {
      const pre = this.lowRank.preRopeKeys(layer);
      // One row per (token, head): [n·H, 1, d] rotated at its own position.
      return tf.reshape(applyRope(tf.reshape(pre, [n * H, 1, d]) as tf.Tensor3D, this.rope, pos), [n, H, d]) as tf.Tensor3D;
    });
  }

  protected prefillValues(layer: number): tf.Tensor3D {
    return this.lowRank.values(layer);
  }

  protected stored(): StoredItem[] {
    const { nKvHeads: H } = this.layout;
    return [
      ...this.lowRank.storedItems(),
      ...(this.storePositions
        ? this.positions.map((p, l): StoredItem => ({ name: `pos.${l}`, ...positionSpec(H, this.prefillLength, this.kept), data: encodePositions(p, this.prefillLength, H) }))
        : []),
    ];
  }

  protected meta(): Record<string, unknown> {
    return { startPosition: this.startPosition, kept: this.kept, lowRank: this.lowRank.storedMeta() };
  }

  protected disposeStored(): void {
    this.lowRank.dispose();
  }

  /**
   * Bytes and ratio per stage. Evict: dense fp16 bytes of T tokens → fp16 kept tokens + positions
   * (L · n · H_kv · d · 2 · 2 + the stored positions); low rank: → float16 factors at the resolved ranks (`lowRankBytes` without
   * quantization) + positions; quantize: → the stored factors as measured + positions. The last
   * stage's output is the measured prefill bytes, so the product of the stage ratios is the measured
   * ratio (dense ÷ byteSize() before decode tokens).
   */
  stats(): StackedStats {
    this.assertLive();
    const { layout } = this;
    const n = this.kept;
    const T = this.prefillLength;
    const specs = this.storedLayout();
    const bytesOf = (f: (name: string) => boolean) => specs.filter((s) => f(s.name)).reduce((a, s) => a + specBytes(s), 0);
    const positionBytes = bytesOf((s) => s.startsWith('pos.'));
    const residualBytes = bytesOf((s) => s.startsWith('residual.'));
    const totalBytes = this.byteSize();
    const factorBytes = totalBytes - positionBytes - residualBytes;
    const dense = denseCacheBytes(layout, T);
    const afterEvict = layout.nLayers * n * layout.nKvHeads * layout.headDim * 4 + (this.storePositions ? layout.nLayers * positionLayerBytes(layout.nKvHeads, T, n) : 0);
    const cfg = this.lowRank.config;
    const fp16: GroupSvdConfig = { ...cfg, factorQuantization: undefined };
    const ranks = { k: this.lowRank.groups.map((g) => this.lowRank.groupRank('k', g.index)), v: this.lowRank.groups.map((g) => this.lowRank.groupRank('v', g.index)) };
    const afterLowRank = lowRankBytes(cfg.factorQuantization ? fp16 : cfg, layout, n, ranks) + positionBytes;
    const final = factorBytes + positionBytes;
    const stage = (s: StageStats['stage'], what: string, bytesIn: number, bytesOut: number): StageStats => ({
      stage: s,
      what,
      bytesIn,
      bytesOut,
      ratio: bytesIn / bytesOut,
      compressionRatio: compressionRatioOf(bytesIn / bytesOut),
    });
    const q = cfg.factorQuantization;
    const stages = [
      stage('evict', `${this.evictLabel}: ${n} of ${T} tokens per KV head`, dense, afterEvict),
      stage('lowRank', `G=${cfg.layersPerGroup}, group ranks K [${ranks.k.join(', ')}] V [${ranks.v.join(', ')}], ${cfg.storage}`, afterEvict, afterLowRank),
    ];
    if (q) stages.push(stage('quantize', `int${q.bits} ${q.apply}, groups of ${q.quantGroupSize}, ${q.symmetric ? 'symmetric' : 'asymmetric'}`, afterLowRank, final));
    else check(final === afterLowRank, 'corrupt', `${this.strategy}: stored factor bytes ${factorBytes} disagree with the low-rank byte count ${afterLowRank - positionBytes}`);
    return {
      strategy: this.strategy,
      tokens: T,
      kept: n,
      stages,
      factorBytes,
      positionBytes,
      residualBytes,
      totalBytes,
      denseBytes: dense,
      ratio: dense / final,
      compressionRatio: compressionRatioOf(dense / final),
    };
  }

  /**
   * Restores a cache written by {@link serialize} through its reader: the low-rank stage from its
   * items (as a cache of `kept` tokens), the positions from `pos.l` or from `impliedPositions`.
   * @throws KvpackError('corrupt') naming what does not fit.
   */
  static restore(
    r: StoredReader,
    strategy: string,
    options: unknown,
    lowRankConfig: GroupSvdConfig,
    expectKept: (layout: ModelLayout, T: number) => number,
    impliedPositions: ((T: number, n: number) => Int32Array) | null,
    evictLabel: string,
  ): StackedCache {
    const { layout, rope, prefillLength: T, startPosition, meta } = r.header;
    const { nKvHeads: H } = layout;
    let n: number;
    try {
      n = expectKept(layout, T);
    } catch (e) {
      throw new KvpackError('corrupt', `serialized ${strategy} cache is corrupt: its options keep no tokens at T = ${T} (${(e as Error).message})`);
    }
    check(meta.kept === n, 'corrupt', `serialized ${strategy} cache is corrupt: metadata kept = ${JSON.stringify(meta.kept)}, but its options keep ${n} of T = ${T} tokens`);
    check(meta.lowRank && typeof meta.lowRank === 'object', 'corrupt', `serialized ${strategy} cache is corrupt: metadata lowRank is missing`);
    const inner: StoredReader = {
      ...r,
      header: { layout, rope, prefillLength: n, startPosition: 0, meta: meta.lowRank as Record<string, unknown> },
      has: r.has,
      half: r.half,
      held: r.held,
      tensor: r.tensor,
      host: r.host,
      shape: r.shape,
    };
    const lowRank = GroupSvdCache.restore(inner, strategy, options, lowRankConfig);
    try {
      const positions: Int32Array[] = [];
      for (let l = 0; l < layout.nLayers; l++) {
        let p: Int32Array;
        if (impliedPositions) {
          const one = impliedPositions(T, n);
          p = new Int32Array(n * H);
          for (let j = 0; j < n; j++) p.fill(one[j], j * H, (j + 1) * H);
        } else p = decodePositions(r.host(`pos.${l}`, positionSpec(H, T, n)), T, n, H, strategy, `pos.${l}`);
        positions.push(p);
      }
      return new StackedCache(strategy, options, layout, rope, T, startPosition, positions, !impliedPositions, lowRank, evictLabel);
    } catch (e) {
      lowRank.dispose();
      throw e;
    }
  }
}
