import * as tf from '@tensorflow/tfjs-core';
import { BaseCompressedMlaCache, HalfTensor, KvpackError, ropeSharedKeys, type MlaCompressor, type MlaLayout, type MlaStoredReader, type RopeConfig, type StoredItem } from '@kvpack/core';
import { holdMinMaxOnBackend } from '@kvpack/strategy-utils';
import { HeldMinMaxBlocks } from './held.js';
import type { KiviOptions } from './index.js';

/*
 * KIVI-style quantization of MLA latent caches. The latent c_KV is what W_UK reads as keys (and W_UV
 * as values); like KIVI's keys, it is quantized per channel (groups of g tokens of one channel,
 * asymmetric min–max, float16 scale and minimum), R tokens at a time, the last T mod R tokens kept in
 * a float16 window. The shared RoPE keys (post-RoPE, as KIVI quantizes rotated keys) are treated the
 * same way. Per-channel grouping needs no divisibility of d_c or d_R by g.
 */

/** One layer: quantized latents and RoPE keys ([n, 1, d] as one "head"), and their float16 windows. */
interface MlaKiviLayer {
  c: HeldMinMaxBlocks;
  cWin: HalfTensor | null;
  kr: HeldMinMaxBlocks;
  krWin: HalfTensor | null;
}

function disposeLayer(s: MlaKiviLayer): void {
  s.c.dispose();
  s.kr.dispose();
  s.cWin?.dispose();
  s.krWin?.dispose();
}

/**
 * Bytes a KIVI MLA cache holds right after compressing T tokens: per layer and for the latents (d =
 * d_c) and the RoPE keys (d = d_R): ⌈n·d·b/8⌉ code bytes + 2·2 bytes per group of g tokens of each
 * channel + 2 bytes per element of the r = T mod R window tokens (n = T − r).
 */
export function kiviMlaCacheBytes(layout: MlaLayout, tokens: number, options: KiviOptions): number {
  const { bits: b, quantGroupSize: g, residualLength: R } = options;
  const r = tokens % R;
  const n = tokens - r;
  const part = (d: number) => Math.ceil((n * d * b) / 8) + 4 * (n / g) * d + 2 * r * d;
  return layout.nLayers * (part(layout.kvLoraRank) + part(layout.qkRopeHeadDim));
}

/**
 * A KIVI MLA cache. Decode tokens appended are kept exact (float32) in the base class's buffers; the
 * prefill's quantized blocks and windows are what is compressed.
 */
export class KiviMlaCache extends BaseCompressedMlaCache {
  readonly strategy = 'kivi';
  constructor(
    layout: MlaLayout,
    rope: RopeConfig,
    prefillLength: number,
    readonly options: KiviOptions,
    private readonly state: MlaKiviLayer[],
  ) {
    super(layout, rope, prefillLength);
  }

  private joined(q: HeldMinMaxBlocks, win: HalfTensor | null, d: number): tf.Tensor2D {
    return tf.tidy(() => {
      const parts = [q.dequantize(), win ? (win.unpack() as tf.Tensor3D) : null].filter((x): x is tf.Tensor3D => x !== null);
      const all = parts.length === 1 ? parts[0] : tf.concat(parts, 0);
      return tf.reshape(all, [all.shape[0], d]) as tf.Tensor2D;
    });
  }
  protected prefillLatents(layer: number): tf.Tensor2D {
    return this.joined(this.state[layer].c, this.state[layer].cWin, this.layout.kvLoraRank);
  }
  protected prefillRopeKeys(layer: number): tf.Tensor2D {
    return this.joined(this.state[layer].kr, this.state[layer].krWin, this.layout.qkRopeHeadDim);
  }
  protected stored(): StoredItem[] {
    const win = (name: string, x: HalfTensor | null, d: number): StoredItem => (x ? { name, half: x } : { name, dtype: 'float16', shape: [0, 1, d], data: new Uint16Array(0) });
    const { kvLoraRank: dc, qkRopeHeadDim: dr } = this.layout;
    return this.state.flatMap((s, l): StoredItem[] => [...s.c.items(`c.${l}`), win(`c.${l}.window`, s.cWin, dc), ...s.kr.items(`kr.${l}`), win(`kr.${l}.window`, s.krWin, dr)]);
  }
  protected disposeStored(): void {
    this.state.forEach(disposeLayer);
  }
}

/** The `mla` capability of `kivi` at these options. */
export function kiviMlaCompressor(options: KiviOptions): MlaCompressor {
  const { bits, quantGroupSize: g, residualLength: R } = options;
  const blocks = (d: number) => new HeldMinMaxBlocks({ along: 'tokens', bits, H: 1, d, g, tailTokens: R });
  return {
    async compress(cache, T) {
      const { kvLoraRank: dc, qkRopeHeadDim: dr } = cache.layout;
      const n = T - (T % R);
      const state: MlaKiviLayer[] = [];
      const flags: tf.Scalar[] = [];
      /** Rows [0, n) quantized per channel into `b`, rows [n, T) packed to float16. */
      const split = async (x: tf.Tensor2D, d: number, b: HeldMinMaxBlocks): Promise<HalfTensor | null> => {
        const x3 = tf.reshape(x, [T, 1, d]) as tf.Tensor3D;
        try {
          if (n > 0) {
            const part = n === T ? x3 : tf.slice(x3, [0, 0, 0], [n, 1, d]);
            try {
              const { nonFinite, ...held } = holdMinMaxOnBackend({ along: 'tokens', n, H: 1, d, g, bits }, part);
              flags.push(nonFinite);
              b.push(held);
            } finally {
              if (part !== x3) part.dispose();
            }
          }
          if (n === T) return null;
          const w = tf.slice(x3, [n, 0, 0], [T - n, 1, d]);
          try {
            return await HalfTensor.fromTensor(w);
          } finally {
            w.dispose();
          }
        } finally {
          x3.dispose();
        }
      };
      try {
        for (let l = 0; l < cache.layout.nLayers; l++) {
          const s: MlaKiviLayer = { c: blocks(dc), cWin: null, kr: blocks(dr), krWin: null };
          state.push(s);
          s.cWin = await split(cache.latents[l], dc, s.c);
          const post = ropeSharedKeys(cache.ropeKeys[l], cache.rope, cache.startPosition ?? 0);
          try {
            s.krWin = await split(post, dr, s.kr);
          } finally {
            post.dispose();
          }
        }
        const any = flags.length > 0 ? tf.tidy(() => tf.max(tf.stack(flags))) : null;
        const bad = any ? await any.data().finally(() => any.dispose()) : [0];
        if (bad[0] !== 0) throw new KvpackError('nonfinite', 'kivi: a quantization group of an MLA latent or RoPE key spans a range beyond the float16 range (±65504) of its scale and minimum');
      } catch (e) {
        state.forEach(disposeLayer);
        throw e;
      } finally {
        tf.dispose(flags);
      }
      return new KiviMlaCache(cache.layout, cache.rope, T, options, state);
    },
    restore(r: MlaStoredReader) {
      const { layout, rope, prefillLength: T } = r.header;
      const n = T - (T % R);
      const part = (name: string, d: number) => {
        const b = HeldMinMaxBlocks.fromStored(
          { along: 'tokens', bits, H: 1, d, g, tailTokens: R },
          {
            tokens: n,
            codes: r.host<Uint8Array>(`${name}.codes`, { dtype: 'uint8', shape: [Math.ceil((n * d * bits) / 8)] }),
            scale: r.host<Uint16Array>(`${name}.scale`, { dtype: 'float16', shape: [n / g, 1, d] }),
            min: r.host<Uint16Array>(`${name}.min`, { dtype: 'float16', shape: [n / g, 1, d] }),
          },
        );
        const win = T - n > 0 ? r.half(`${name}.window`, { shape: [T - n, 1, d] }) : (r.shape(`${name}.window`, { dtype: 'float16', shape: [0, 1, d] }), null);
        return { b, win };
      };
      const state: MlaKiviLayer[] = [];
      for (let l = 0; l < layout.nLayers; l++) {
        const c = part(`c.${l}`, layout.kvLoraRank);
        const kr = part(`kr.${l}`, layout.qkRopeHeadDim);
        state.push({ c: c.b, cWin: c.win, kr: kr.b, krWin: kr.win });
      }
      return new KiviMlaCache(layout, rope, T, options, state);
    },
  };
}
