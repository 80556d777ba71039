import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, MAX_FEATURES, MAX_TOKENS, createStrategy, deserializeCache, headerBytes, selectBackend, type ModelLayout } from '@kvpack/core';
import './index.js'; // registers the strategy
import { disposeKVCache, runStrategyConformance, syntheticCache, expectOptionBounds } from '@kvpack/core/conformance';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { packCodes, unpackCodes } from '@kvpack/strategy-utils';
import { KiviCache, kiviCacheBytes, type KiviOptions } from './index.js';
import { quantizeKeysPerChannel, quantizeValuesPerToken } from './host-oracle.js';
import { f16, maxAbsDiff, prng, randomCache, rint, take, type RandomCache } from '../testing/testkit.js';

runStrategyConformance('kivi', {
  compressing: { bits: 2, quantGroupSize: 8, residualLength: 16 },
  // T = 64 < R = 128: every key and value stays in the float16 window.
  lossless: { quantGroupSize: 16, residualLength: 128 },
  badOptions: [{ bits: 3 }, { bits: 8 }, { quantGroupSize: 8, residualLength: 20 }, { quantGroupSize: 0 }, { residualLength: -16 }],
  exactDecode: false,
  // MLA: latents and RoPE keys quantized per channel, decode tokens too (R at a time); T = 64 < R = 128 keeps all in float16.
  mla: { exactDecode: false, lossless: { quantGroupSize: 16, residualLength: 128 } },
  // head_dim 16 is not a multiple of g = 32.
  failingCompress: [{ quantGroupSize: 32, residualLength: 32 }],
});

/**
 * Float64 KIVI quantize → dequantize of x [n, H, d] (jy-yuan/KIVI quant/new_pack.py): groups of g
 * tokens per channel (keys) or of g channels per token (values); mn = f16(min),
 * s = f16((max − min)/(2^b − 1)), q = rint(clamp((x − mn)/s, 0, 2^b − 1)), x̂ = q·s + mn.
 */
function refKivi(x: ArrayLike<number>, n: number, H: number, d: number, g: number, bits: number, along: 'tokens' | 'channels'): Float64Array {
  const out = new Float64Array(n * H * d);
  const maxq = 2 ** bits - 1;
  const groups: number[][] = [];
  if (along === 'tokens') {
    for (let t0 = 0; t0 < n; t0 += g)
      for (let h = 0; h < H; h++)
        for (let c = 0; c < d; c++) groups.push(Array.from({ length: g }, (_, i) => ((t0 + i) * H + h) * d + c));
  } else {
    for (let t = 0; t < n; t++)
      for (let h = 0; h < H; h++)
        for (let c0 = 0; c0 < d; c0 += g) groups.push(Array.from({ length: g }, (_, i) => (t * H + h) * d + c0 + i));
  }
  for (const idx of groups) {
    const vals = idx.map((i) => x[i]);
    const lo = Math.min(...vals);
    const hi = Math.max(...vals);
    const mn = f16(lo);
    const s = f16((hi - lo) / maxq);
    idx.forEach((i) => (out[i] = rint(Math.min(maxq, Math.max(0, (x[i] - mn) / s))) * s + mn));
  }
  return out;
}

const rowsOf = (x: ArrayLike<number>, from: number, to: number, H: number, d: number) => Array.prototype.slice.call(x, from * H * d, to * H * d) as number[];

describe('kivi: bit packing', () => {
  it('packs 2-bit codes four per byte and 4-bit codes two per byte, lowest bits first', () => {
    expect(Array.from(packCodes([1, 2, 3, 0, 3], 2))).toEqual([1 | (2 << 2) | (3 << 4) | (0 << 6), 3]);
    expect(Array.from(packCodes([0xa, 0x5, 0xf], 4))).toEqual([0x5a, 0x0f]);
    expect(Array.from(packCodes([7, 200], 8))).toEqual([7, 200]);
  });

  it('round-trips random codes of every width and odd lengths', () => {
    const rnd = prng(3);
    for (const bits of [2, 4, 8] as const) {
      for (const n of [1, 3, 7, 64, 1001]) {
        const codes = Uint8Array.from({ length: n }, () => Math.floor(rnd() * 2 ** bits));
        const packed = packCodes(codes, bits);
        expect(packed.length).toBe(Math.ceil((n * bits) / 8));
        expect(Array.from(unpackCodes(packed, bits, n))).toEqual(Array.from(codes));
      }
    }
    expect(() => unpackCodes(new Uint8Array(3), 2, 20)).toThrow(KvpackError);
  });
});

describe('kivi: quantization against a float64 re-computation', () => {
  const layout: ModelLayout = { nLayers: 2, nHeads: 4, nKvHeads: 2, headDim: 16 };
  const { nKvHeads: H, headDim: d } = layout;
  const T = 70; // R = 16: 64 keys quantized + 6 in the window; 54 values quantized + 16 in the window
  let rc: RandomCache;
  beforeAll(async () => {
    await selectBackend('wasm');
    rc = randomCache(T, layout, 21);
  });
  afterAll(() => rc.dispose());

  for (const bits of [2, 4] as const) {
    it(`${bits}-bit: prefill keys per channel (post-RoPE), values per token, windows float16, bytes`, async () => {
      const o: KiviOptions = { bits, quantGroupSize: 8, residualLength: 16 };
      const c = (await createStrategy({ name: 'kivi', options: o }).compress(rc.cache)) as KiviCache;
      for (let l = 0; l < layout.nLayers; l++) {
        expect(c.tokenCount(l)).toBe(T);
        expect(c.quantizedKeyTokens(l)).toBe(64);
        expect(c.quantizedValueTokens(l)).toBe(54);
        const k = take(c.keys(l));
        const v = take(c.values(l));
        const refK = refKivi(rc.postKeys[l].subarray(0, 64 * H * d), 64, H, d, 8, bits, 'tokens');
        expect(maxAbsDiff(k.subarray(0, 64 * H * d), refK)).toBeLessThan(1e-5);
        expect(maxAbsDiff(k.subarray(64 * H * d), rowsOf(rc.postKeys[l], 64, 70, H, d).map(f16))).toBe(0);
        const refV = refKivi(rc.values[l].subarray(0, 54 * H * d), 54, H, d, 8, bits, 'channels');
        expect(maxAbsDiff(v.subarray(0, 54 * H * d), refV)).toBeLessThan(1e-5);
        expect(maxAbsDiff(v.subarray(54 * H * d), rowsOf(rc.values[l], 54, 70, H, d).map(f16))).toBe(0);
        // quantization error is visible but bounded by one step of the group's range
        const err = maxAbsDiff(k.subarray(0, 64 * H * d), rc.postKeys[l].subarray(0, 64 * H * d));
        expect(err).toBeGreaterThan(bits === 2 ? 0.1 : 0.01);
      }
      // bytes: per layer, keys 64·H·d·b/8 + 4·(64/8)·H·d + 2·6·H·d; values 54·H·d·b/8 + 4·54·H·(d/8) + 2·16·H·d
      const perLayer = (64 * H * d * bits) / 8 + 4 * 8 * H * d + 2 * 6 * H * d + (54 * H * d * bits) / 8 + 4 * 54 * H * 2 + 2 * 16 * H * d;
      expect(c.byteSize()).toBe(layout.nLayers * perLayer);
      expect(kiviCacheBytes(layout, T, o)).toBe(layout.nLayers * perLayer);
      const bytes = c.serialize();
      expect(bytes.length - headerBytes(bytes)).toBe(c.byteSize());
      c.dispose();
    });
  }

  it('decode: keys flush R at a time, values slide one token at a time; state survives serialization', async () => {
    const o: KiviOptions = { bits: 2, quantGroupSize: 8, residualLength: 16 };
    const c = (await createStrategy({ name: 'kivi', options: o }).compress(rc.cache)) as KiviCache;
    const rnd = prng(9);
    const appendedK: number[] = [];
    const appendedV: number[] = [];
    const l = 1;
    const step = (i: number) => {
      const kd = Float32Array.from({ length: H * d }, () => rnd() * 4 - 2);
      const vd = Float32Array.from({ length: H * d }, () => rnd() * 4 - 2);
      appendedK.push(...kd);
      appendedV.push(...vd);
      const k = tf.tensor3d(kd, [1, H, d]);
      const v = tf.tensor3d(vd, [1, H, d]);
      c.append(l, k, v);
      tf.dispose([k, v]);
      expect(c.tokenCount(l)).toBe(T + i + 1);
    };
    // The key window holds 6 tokens; 10 appends fill it to R = 16, still unquantized.
    for (let i = 0; i < 10; i++) {
      step(i);
      expect(c.quantizedKeyTokens(l)).toBe(64);
      // values: the window keeps R + 1 after an append; each later append quantizes its oldest token
      expect(c.quantizedValueTokens(l)).toBe(54 + i);
    }
    step(10); // the full R-token key window is quantized as one block before the new key joins
    expect(c.quantizedKeyTokens(l)).toBe(80);
    expect(c.quantizedValueTokens(l)).toBe(64);
    const k = take(c.keys(l));
    const v = take(c.values(l));
    // keys 64..79 = block of [6 prefill window keys, 10 appended keys], each rounded to float16 first
    const block = [...rowsOf(rc.postKeys[l], 64, 70, H, d), ...appendedK.slice(0, 10 * H * d)].map(f16);
    expect(maxAbsDiff(k.subarray(64 * H * d, 80 * H * d), refKivi(block, 16, H, d, 8, 2, 'tokens'))).toBeLessThan(1e-5);
    expect(maxAbsDiff(k.subarray(80 * H * d), appendedK.slice(10 * H * d).map(f16))).toBe(0);
    // values 54..63: the 10 oldest window tokens (prefill rows 54..63), quantized one by one
    const slid = rowsOf(rc.values[l], 54, 64, H, d).map(f16);
    expect(maxAbsDiff(v.subarray(54 * H * d, 64 * H * d), refKivi(slid, 10, H, d, 8, 2, 'channels'))).toBeLessThan(1e-5);
    // the window: prefill rows 64..69 and the 11 appended values
    expect(maxAbsDiff(v.subarray(64 * H * d), [...rowsOf(rc.values[l], 64, 70, H, d), ...appendedV].map(f16))).toBe(0);
    // other layers are untouched
    expect(c.tokenCount(0)).toBe(T);
    const bytes = c.serialize();
    expect(bytes.length - headerBytes(bytes)).toBe(c.byteSize());
    const r = deserializeCache(bytes) as KiviCache;
    expect(r.quantizedKeyTokens(l)).toBe(80);
    expect(r.quantizedValueTokens(l)).toBe(64);
    expect(Array.from(take(r.keys(l)))).toEqual(Array.from(k));
    expect(Array.from(take(r.values(l)))).toEqual(Array.from(v));
    c.dispose();
    r.dispose();
  });

  it('rejects a head_dim that is not a multiple of the group size', async () => {
    const s = createStrategy({ name: 'kivi', options: { quantGroupSize: 32, residualLength: 64 } });
    await expect(s.compress(rc.cache)).rejects.toThrow(/head_dim 16 is not a multiple of quantGroupSize 32/);
  });

  it('rejects R not a multiple of g by name', () => {
    expect(() => createStrategy({ name: 'kivi', options: { quantGroupSize: 32, residualLength: 100 } })).toThrow(/residualLength \(R\) must be a multiple of quantGroupSize/);
  });
});

describe('kivi: ties round half to even (torch.round)', () => {
  /** The even one of the two integers around the tie k + ½ (written from k, no rounding call). */
  const evenNeighbour = (k: number) => (k % 2 === 0 ? k : k + 1);
  /** float16 bits → value (normal and subnormal), by the IEEE-754 binary16 closed form. */
  const fromHalf = (h: number) => {
    const e = (h >> 10) & 31;
    const m = h & 1023;
    return (h & 0x8000 ? -1 : 1) * (e === 0 ? m * 2 ** -24 : (1 + m / 1024) * 2 ** (e - 15));
  };
  /**
   * A group of g values whose float16 minimum `lo` and float16 scale `s` (a power of two, pinned by
   * max = lo + (2^b − 1)·s) make (x − lo)/s an exact half-integer k + ½ for every other element, and
   * the codes the reference's torch.round gives: the extremes 0 and 2^b − 1, the ties their even
   * neighbours.
   */
  function tieGroup(bits: number, lo: number, s: number): { vals: number[]; codes: number[] } {
    const maxq = 2 ** bits - 1;
    const ks = Array.from({ length: maxq }, (_, k) => k);
    return { vals: [lo, lo + maxq * s, ...ks.map((k) => lo + (k + 0.5) * s)], codes: [0, maxq, ...ks.map(evenNeighbour)] };
  }
  // Two groups with different minimum and scale (exact float16 values).
  const shapes = [
    [0, 2 ** -3],
    [-1.25, 2 ** -2],
  ] as const;

  for (const bits of [2, 4] as const) {
    it(`${bits}-bit keys per channel (over g tokens): tie codes are the even neighbours`, () => {
      const groups = shapes.map(([lo, s]) => tieGroup(bits, lo, s));
      const g = groups[0].vals.length; // one group of g tokens per channel
      const [n, H, d] = [g, 1, 2];
      const x = new Float32Array(n * H * d);
      for (let t = 0; t < n; t++) for (let c = 0; c < d; c++) x[t * d + c] = groups[c].vals[t];
      const b = quantizeKeysPerChannel(x, n, H, d, g, bits);
      expect(Array.from(b.scale, fromHalf)).toEqual(shapes.map(([, s]) => s));
      expect(Array.from(b.min, fromHalf)).toEqual(shapes.map(([lo]) => lo));
      const want = new Array<number>(n * d);
      for (let t = 0; t < n; t++) for (let c = 0; c < d; c++) want[t * d + c] = groups[c].codes[t];
      expect(Array.from(b.codes)).toEqual(want);
    });

    it(`${bits}-bit values per token (over g channels): tie codes are the even neighbours`, () => {
      const groups = shapes.map(([lo, s]) => tieGroup(bits, lo, s));
      const g = groups[0].vals.length; // one group of g channels per token
      const [n, H, d] = [2, 1, g];
      const x = Float32Array.from(groups.flatMap((gr) => gr.vals));
      const b = quantizeValuesPerToken(x, n, H, d, g, bits);
      expect(Array.from(b.scale, fromHalf)).toEqual(shapes.map(([, s]) => s));
      expect(Array.from(b.min, fromHalf)).toEqual(shapes.map(([lo]) => lo));
      expect(Array.from(b.codes)).toEqual(groups.flatMap((gr) => gr.codes));
    });
  }
});

describe('kivi option bounds', () => {
  it('quantGroupSize ≤ 2^16 and residualLength ≤ 2^20 tokens: accepted at the bound, a config error naming it past it', () => {
    expectOptionBounds('kivi', [
      { option: 'quantGroupSize', bound: MAX_FEATURES, at: (v) => ({ quantGroupSize: v, residualLength: MAX_FEATURES }) },
      { option: 'residualLength', bound: MAX_TOKENS, at: (v) => ({ quantGroupSize: 1, residualLength: v }) },
    ]);
  });
});

describe('kivi frees what it allocated when a later layer fails', () => {
  it('a key group beyond the float16 range in the last layer is a nonfinite error and leaves no tensor', async () => {
    await selectBackend('wasm');
    const cache = syntheticCache(64);
    const L = cache.layout.nLayers;
    const data = Float32Array.from(cache.keys[L - 1].dataSync());
    data[0] = 1e6; // finite in float32, beyond float16: its group's minimum or scale overflows
    const huge = tf.tensor3d(data, cache.keys[L - 1].shape);
    const bad = { ...cache, keys: cache.keys.map((k, l) => (l === L - 1 ? huge : k)) };
    const before = tf.memory().numTensors;
    const err = await createStrategy({ name: 'kivi', options: { quantGroupSize: 8, residualLength: 16 } })
      .compress(bad)
      .then(() => null, (e: unknown) => e);
    expect(err).toBeInstanceOf(KvpackError);
    expect((err as KvpackError).code).toBe('nonfinite');
    expect(tf.memory().numTensors).toBe(before);
    huge.dispose();
    disposeKVCache(cache);
  });
});

describe('kivi holds on the backend only its stored form', () => {
  beforeAll(async () => {
    await selectBackend('wasm');
  });

  it('T = 256: backend bytes grow by at most 1.1 · byteSize() after compress, after decode steps and after restore', async () => {
    const layout: ModelLayout = { nLayers: 2, nHeads: 8, nKvHeads: 4, headDim: 64 };
    const { nKvHeads: H, headDim: d } = layout;
    const rc = randomCache(256, layout, 17);
    try {
      const base = tf.memory().numBytes;
      const c = (await createStrategy({ name: 'kivi', options: { bits: 2, quantGroupSize: 32, residualLength: 128 } }).compress(rc.cache)) as KiviCache;
      // A float32 copy of the dequantized keys and values would be 16 times their 2-bit codes.
      expect(tf.memory().numBytes - base).toBeLessThanOrEqual(1.1 * c.byteSize());
      const rnd = prng(4);
      for (let step = 0; step < 3; step++)
        for (let l = 0; l < layout.nLayers; l++) {
          const k = tf.tensor3d(Float32Array.from({ length: H * d }, () => rnd() * 2 - 1), [1, H, d]);
          c.append(l, k, k);
          tf.dispose([k, c.keys(l), c.values(l)]);
        }
      expect(c.quantizedValueTokens(0)).toBe(130);
      expect(tf.memory().numBytes - base).toBeLessThanOrEqual(1.1 * c.byteSize());
      const stored = c.byteSize();
      const bytes = c.serialize();
      c.dispose();
      expect(tf.memory().numBytes).toBe(base);
      const r = deserializeCache(bytes);
      expect(tf.memory().numBytes - base).toBeLessThanOrEqual(1.1 * stored);
      r.dispose();
    } finally {
      rc.dispose();
    }
  });

  it('decode through many tail merges with codes that end mid-byte: matches the float64 reference, restores bit-identically', async () => {
    // One KV head of d = 2 at 2 bits: a token's codes are half a byte, so segments join mid-byte.
    const layout: ModelLayout = { nLayers: 1, nHeads: 1, nKvHeads: 1, headDim: 2 };
    const [H, d, g, R, T] = [1, 2, 2, 4, 8];
    const rc = randomCache(T, layout, 23);
    const c = (await createStrategy({ name: 'kivi', options: { bits: 2, quantGroupSize: g, residualLength: R } }).compress(rc.cache)) as KiviCache;
    const rnd = prng(12);
    const appK: number[] = [];
    const appV: number[] = [];
    for (let i = 0; i < 31; i++) {
      const kd = Array.from({ length: H * d }, () => rnd() * 4 - 2);
      const vd = Array.from({ length: H * d }, () => rnd() * 4 - 2);
      appK.push(...kd);
      appV.push(...vd);
      const k = tf.tensor3d(kd, [1, H, d]);
      const v = tf.tensor3d(vd, [1, H, d]);
      c.append(0, k, v);
      tf.dispose([k, v]);
    }
    const nk = c.quantizedKeyTokens(0);
    const nv = c.quantizedValueTokens(0);
    expect(nk).toBe(T + 28);
    expect(nv).toBe(T + 31 - R - 1);
    const k = take(c.keys(0));
    const v = take(c.values(0));
    // Keys: the prefill block (quantized from float32), then blocks of R appended keys rounded to float16.
    const wantK = [...refKivi(rc.postKeys[0], T, H, d, g, 2, 'tokens'), ...refKivi(appK.slice(0, (nk - T) * d).map(f16), nk - T, H, d, g, 2, 'tokens'), ...appK.slice((nk - T) * d).map(f16)];
    expect(maxAbsDiff(k, wantK)).toBeLessThan(1e-5);
    // Values: the first T − R prefill tokens from float32, then each later token on its own from float16.
    const stream = [...rc.values[0], ...appV];
    const wantV = [
      ...refKivi(stream.slice(0, (T - R) * d), T - R, H, d, g, 2, 'channels'),
      ...refKivi(stream.slice((T - R) * d, nv * d).map(f16), nv - (T - R), H, d, g, 2, 'channels'),
      ...stream.slice(nv * d).map(f16),
    ];
    expect(maxAbsDiff(v, wantV)).toBeLessThan(1e-5);
    const bytes = c.serialize();
    expect(bytes.length - headerBytes(bytes)).toBe(c.byteSize());
    expect(Buffer.from(await c.serializeAsync()).equals(Buffer.from(bytes))).toBe(true);
    const r = deserializeCache(bytes) as KiviCache;
    expect(Array.from(take(r.keys(0)))).toEqual(Array.from(k));
    expect(Array.from(take(r.values(0)))).toEqual(Array.from(v));
    expect(Buffer.from(r.serialize()).equals(Buffer.from(bytes))).toBe(true);
    c.dispose();
    r.dispose();
    rc.dispose();
  });
});

describe('renamed options', () => {
  it('accepts the former groupSize as quantGroupSize, with a deprecation warning', async () => {
    const warnings: string[] = [];
    const onWarning = (w: Error) => warnings.push(w.message);
    process.on('warning', onWarning);
    try {
      const s = createStrategy({ name: 'kivi', options: { groupSize: 16, residualLength: 32 } });
      expect(s.options).toMatchObject({ quantGroupSize: 16, residualLength: 32 });
      expect('groupSize' in (s.options as object)).toBe(false);
      await new Promise((r) => setImmediate(r));
    } finally {
      process.off('warning', onWarning);
    }
    expect(warnings.some((w) => w.includes('"groupSize" of strategy "kivi" is now "quantGroupSize"'))).toBe(true);
  });
});
