import * as tf from '@tensorflow/tfjs-core';
import { BaseCompressedMlaCache, HalfTensor, KvpackError, check, checkMlaRows, ropeSharedKeys, type MlaCompressor, type MlaLayout, type MlaStoredReader, type RopeConfig, type StoredItem } from '@kvpack/core';
import { concatHalfRows, dropHalfRows, holdMinMaxOnBackend, type HeldMinMax } from '@kvpack/strategy-utils';
import { HeldMinMaxBlocks } from './held.js';
import type { KiviOptions } from './index.js';

/** KIVI's options with the bits fixed (an MLA cache takes bits, not a target ratio). */
export type KiviMlaOptions = KiviOptions & { bits: 2 | 4 };

/*
 * KIVI-style quantization of MLA latent caches. The latent c_KV is what W_UK reads as keys (and W_UV
 * as values); like KIVI's keys, it is quantized per channel (groups of g tokens of one channel,
 * asymmetric min–max, float16 scale and minimum), R tokens at a time, the last T mod R tokens kept in
 * a float16 window. The shared RoPE keys (post-RoPE, as KIVI quantizes rotated keys) are treated the
 * same way, and decode tokens too (R at a time, as KIVI's keys). Per-channel grouping needs no
 * divisibility of d_c or d_R by g.
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
export function kiviMlaCacheBytes(layout: MlaLayout, tokens: number, options: KiviMlaOptions): number {
  const { bits: b, quantGroupSize: g, residualLength: R } = options;
  const r = tokens % R;
  const n = tokens - r;
  const part = (d: number) => Math.ceil((n * d * b) / 8) + 4 * (n / g) * d + 2 * r * d;
  return layout.nLayers * (part(layout.kvLoraRank) + part(layout.qkRopeHeadDim));
}

/**
 * A KIVI MLA cache. Decode tokens join the float16 windows and are quantized as KIVI quantizes keys:
 * once a window holds R tokens, those R tokens become one block (R/g groups per channel) at the start
 * of the next `append`, so every step attends to its newest tokens in full precision.
 */
export class KiviMlaCache extends BaseCompressedMlaCache {
  readonly strategy = 'kivi';
  constructor(
    layout: MlaLayout,
    rope: RopeConfig,
    prefillLength: number,
    readonly options: KiviMlaOptions,
    private readonly state: MlaKiviLayer[],
  ) {
    super(layout, rope, prefillLength);
  }

  /** Quantized latent tokens of a layer (a multiple of R); the rest are in the float16 window. */
  quantizedTokens(layer: number): number {
    this.assertLive(layer);
    return this.state[layer].c.tokens;
  }

  protected override prefillTokens(layer: number): number {
    const s = this.state[layer];
    return s.c.tokens + (s.cWin?.shape[0] ?? 0);
  }

  /**
   * Appends decode tokens (latents [n, d_c], post-RoPE shared keys [n, d_R]) to the float16 windows,
   * first quantizing R tokens at a time of what the windows hold (see the class comment); decode
   * tokens are rounded to float16 and later quantized, not kept exact. Nothing changes if it throws.
   * @throws KvpackError('shape' | 'dtype' | 'disposed')
   */
  override append(layer: number, latents: tf.Tensor2D, ropeKeys: tf.Tensor2D): void {
    this.assertLive(layer);
    const { kvLoraRank: dc, qkRopeHeadDim: dr } = this.layout;
    checkMlaRows(latents, dc, `append(layer ${layer}) latents`, 'd_c');
    checkMlaRows(ropeKeys, dr, `append(layer ${layer}) RoPE keys`, 'd_R', latents.shape[0]);
    const s = this.state[layer];
    const { bits, quantGroupSize: g, residualLength: R } = this.options;
    const n = latents.shape[0];
    const rk = s.cWin?.shape[0] ?? 0;
    const nk = rk >= R ? Math.floor(rk / R) * R : 0;
    const quantize = (win: HalfTensor, d: number): HeldMinMax => {
      const x = tf.tidy(() => tf.slice(win.unpack(), [0, 0, 0], [nk, 1, d]));
      try {
        const b = holdMinMaxOnBackend({ along: 'tokens', n: nk, H: 1, d, g, bits }, x);
        b.nonFinite.dispose(); // window values are float16 already
        return b;
      } finally {
        x.dispose();
      }
    };
    const next = (win: HalfTensor | null, add: tf.Tensor2D, d: number): HalfTensor => {
      const add3 = tf.reshape(add, [n, 1, d]);
      let added: HalfTensor;
      try {
        added = HalfTensor.fromTensorSync(add3);
      } finally {
        add3.dispose();
      }
      if (!win || nk >= win.shape[0]) return added;
      let kept: HalfTensor | null = null;
      try {
        kept = nk === 0 ? win : dropHalfRows(win, nk);
        return concatHalfRows(kept, added);
      } finally {
        added.dispose();
        if (kept !== win) kept?.dispose();
      }
    };
    const made: HeldMinMax[] = [];
    const wins: HalfTensor[] = [];
    try {
      if (nk > 0) made.push(quantize(s.cWin!, dc), quantize(s.krWin!, dr));
      wins.push(next(s.cWin, latents, dc));
      wins.push(next(s.krWin, ropeKeys, dr));
    } catch (e) {
      for (const b of made) [b.codes, b.scale, b.min].forEach((t) => t.dispose());
      wins.forEach((w) => w.dispose());
      throw e;
    }
    // A push takes its block (and frees it if it fails).
    if (nk > 0) {
      s.c.push(made[0]);
      s.kr.push(made[1]);
    }
    s.cWin?.dispose();
    s.krWin?.dispose();
    [s.cWin, s.krWin] = wins;
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
export function kiviMlaCompressor(options: KiviMlaOptions): MlaCompressor {
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
      const part = (name: string, d: number) => {
        // Quantized tokens (a multiple of R, also after decode appends), from the scales' shape.
        const n = r.shape(`${name}.scale`, { dtype: 'float16', shape: [null, 1, d] })[0] * g;
        check(n % R === 0, 'corrupt', `serialized kivi MLA cache is corrupt: "${name}" holds ${n} quantized tokens, not a multiple of R = ${R}`);
        const w = r.shape(`${name}.window`, { dtype: 'float16', shape: [null, 1, d] })[0];
        const b = HeldMinMaxBlocks.fromStored(
          { along: 'tokens', bits, H: 1, d, g, tailTokens: R },
          {
            tokens: n,
            codes: r.host<Uint8Array>(`${name}.codes`, { dtype: 'uint8', shape: [Math.ceil((n * d * bits) / 8)] }),
            scale: r.host<Uint16Array>(`${name}.scale`, { dtype: 'float16', shape: [n / g, 1, d] }),
            min: r.host<Uint16Array>(`${name}.min`, { dtype: 'float16', shape: [n / g, 1, d] }),
          },
        );
        const win = w > 0 ? r.half(`${name}.window`, { shape: [w, 1, d] }) : null;
        return { b, win, tokens: n + w };
      };
      const state: MlaKiviLayer[] = [];
      for (let l = 0; l < layout.nLayers; l++) {
        const c = part(`c.${l}`, layout.kvLoraRank);
        const kr = part(`kr.${l}`, layout.qkRopeHeadDim);
        state.push({ c: c.b, cWin: c.win, kr: kr.b, krWin: kr.win });
        check(
          c.tokens === kr.tokens && c.b.tokens === kr.b.tokens && c.tokens >= T,
          'corrupt',
          `serialized kivi MLA cache is corrupt: layer ${l} holds ${c.tokens} latent tokens (${c.b.tokens} quantized) and ${kr.tokens} RoPE key tokens (${kr.b.tokens} quantized), prefill ${T}`,
        );
      }
      return new KiviMlaCache(layout, rope, T, options, state);
    },
  };
}
