import * as tf from '@tensorflow/tfjs-core';
import fc from 'fast-check';
import { beforeAll, describe, expect, it } from 'vitest';
import {
  applyRope,
  attention,
  createStrategy,
  decodeContainer,
  decodeHalf,
  encodeContainer,
  encodeHalf,
  fromHalfBits,
  headerBytes,
  KvpackError,
  listStrategies,
  ropeInverseFrequencies,
  ropeTableData64,
  yarnAttentionFactor,
  ropeTableData,
  selectBackend,
  softwareAdapter,
  toHalfBits,
  roundHalf,
  roundToHalfOnDevice,
  storeTensor,
  encodeBFloat16,
  decodeBFloat16,
} from './index.js';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

beforeAll(async () => {
  await selectBackend('wasm');
});

describe('fp16 / bf16', () => {
  it('matches the IEEE-754 binary16 closed forms', () => {
    expect(toHalfBits(1)).toBe(0x3c00);
    expect(toHalfBits(-2)).toBe(0xc000);
    expect(toHalfBits(65504)).toBe(0x7bff);
    expect(toHalfBits(65520)).toBe(0x7c00); // rounds to +Inf
    expect(fromHalfBits(0x0001)).toBe(2 ** -24); // smallest subnormal
    expect(toHalfBits(2 ** -24)).toBe(1);
    expect(toHalfBits(1 + 2 ** -11)).toBe(0x3c00); // tie → even
    expect(toHalfBits(1 + 3 * 2 ** -11)).toBe(0x3c02);
  });
  it('round-trips every finite half value and rounds to the nearest half', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 0xffff }), (h) => {
        const v = fromHalfBits(h);
        if (!Number.isFinite(v)) return true;
        return toHalfBits(v) === h || (v === 0 && (h & 0x7fff) === 0);
      }),
    );
    fc.assert(
      fc.property(fc.float({ min: -60000, max: 60000, noNaN: true }), (x) => {
        const r = decodeHalf(encodeHalf([x]))[0];
        const f = Math.fround(x);
        // nearest-rounding bound: half an ulp of binary16 at |x|
        const ulp = Math.abs(f) < 2 ** -14 ? 2 ** -24 : 2 ** (Math.floor(Math.log2(Math.abs(f))) - 10);
        return Math.abs(r - f) <= ulp / 2 + 1e-12;
      }),
    );
  });
  it('device float16 rounding equals the host rounding bit for bit (wasm and cpu)', async () => {
    // Every finite half value, the midpoints between neighbours (ties) and one float32 ulp either side
    // of them, the subnormal range, the overflow edge, zeros and values far outside the range.
    const xs: number[] = [0, -0, 1e-30, -1e-30, 2 ** -25, 2 ** -25 * 1.0000001, 65504, 65519.99, 65520, -65520, 1e6, -3e38];
    for (let h = 0; h < 0x7c00; h += 7) {
      const v = fromHalfBits(h);
      const next = fromHalfBits(h + 1);
      const mid = Math.fround((v + next) / 2);
      xs.push(v, -v, mid, -mid, nextUp(mid), nextDown(mid));
    }
    xs.push(...fc.sample(fc.float({ noNaN: true, noDefaultInfinity: true }), { numRuns: 3000, seed: 7 }));
    const x32 = Float32Array.from(xs);
    const want = roundHalf(x32);
    const before = tf.getBackend();
    for (const be of ['wasm', 'cpu']) {
      await selectBackend(be);
      const n0 = tf.memory().numTensors;
      const t = tf.tensor1d(x32);
      const r = roundToHalfOnDevice(t);
      const got = r.dataSync() as Float32Array;
      tf.dispose([t, r]);
      expect(tf.memory().numTensors).toBe(n0);
      const bad = Array.from(x32.keys()).filter((i) => !Object.is(got[i], want[i]) && !(got[i] === 0 && want[i] === 0));
      expect(bad.slice(0, 5).map((i) => [x32[i], got[i], want[i]]), be).toEqual([]);
    }
    await selectBackend(before);
  });
  it('bfloat16 keeps the top 16 bits with round-to-nearest-even', () => {
    const x = [1, -3.140625, 1 + 2 ** -8, 1 + 3 * 2 ** -8];
    expect(Array.from(decodeBFloat16(encodeBFloat16(x)))).toEqual([1, -3.140625, 1, 1 + 2 ** -6]);
  });
});

describe('backend selection', () => {
  it('a software WebGPU adapter (lavapipe, SwiftShader, fallback) is recognized; a hardware one is not', () => {
    expect(softwareAdapter({ info: { vendor: 'mesa', description: 'llvmpipe: Mesa 25.0.7 (LLVM 15.0.6)' } })).toMatch(/llvmpipe/);
    expect(softwareAdapter({ info: { vendor: 'google', architecture: 'swiftshader', description: '' } })).toMatch(/swiftshader/);
    expect(softwareAdapter({ isFallbackAdapter: true, info: {} })).toBe('fallback adapter');
    expect(softwareAdapter({ info: { vendor: 'nvidia', architecture: 'hopper', description: 'NVIDIA H200' } })).toBeNull();
  });
});

describe('RoPE', () => {
  it('long position ranges reuse their host tables; values equal a float64 computation', () => {
    const rope = { theta: 500000, layout: 'half' as const, scaling: { type: 'llama3' as const, factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 } };
    const a = ropeTableData(rope, 128, { start: 7, count: 4096 });
    const b = ropeTableData(rope, 128, { start: 7, count: 4096 });
    expect(b.cos).toBe(a.cos); // cached
    const inv = ropeInverseFrequencies(rope, 128);
    for (const [t, i] of [[0, 0], [4095, 63], [2048, 17]]) {
      expect(a.cos[t * 64 + i]).toBe(Math.fround(Math.cos((7 + t) * inv[i])));
      expect(a.sin[t * 64 + i]).toBe(Math.fround(Math.sin((7 + t) * inv[i])));
    }
    expect(ropeTableData(rope, 128, { start: 8, count: 4096 }).cos).not.toBe(a.cos); // another range
    expect(ropeTableData(rope, 128, [7, 8]).cos[64]).toBe(a.cos[64]); // explicit lists are computed
  });
  it('interleaved and half layouts rotate pairs by position × θ^(-2i/d) (float64 re-computation)', () => {
    for (const layout of ['interleaved', 'half'] as const) {
      const T = 5, H = 2, d = 8;
      const x = tf.randomNormal([T, H, d], 0, 1, 'float32', 3) as tf.Tensor3D;
      const xs = x.dataSync();
      const out = applyRope(x, { theta: 10000, layout }, { start: 7, count: T }).dataSync();
      for (let t = 0; t < T; t++)
        for (let h = 0; h < H; h++)
          for (let i = 0; i < d / 2; i++) {
            const a = (7 + t) * Math.pow(10000, (-2 * i) / d);
            const [p, q] = layout === 'interleaved' ? [2 * i, 2 * i + 1] : [i, i + d / 2];
            const base = (t * H + h) * d;
            const x0 = xs[base + p], x1 = xs[base + q];
            expect(out[base + p]).toBeCloseTo(x0 * Math.cos(a) - x1 * Math.sin(a), 5);
            expect(out[base + q]).toBeCloseTo(x0 * Math.sin(a) + x1 * Math.cos(a), 5);
          }
      const back = applyRope(applyRope(x, { theta: 10000, layout }, [3, 9, 1, 0, 2]), { theta: 10000, layout }, [3, 9, 1, 0, 2], true);
      const diff = tf.max(tf.abs(tf.sub(back, x))).dataSync()[0];
      expect(diff).toBeLessThan(1e-5);
      tf.dispose([x, back]);
    }
  });
  it('llama3 scaling follows the Hugging Face piecewise rule', () => {
    const s = { type: 'llama3' as const, factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 };
    const base = ropeInverseFrequencies({ theta: 500000, layout: 'half' }, 128);
    const inv = ropeInverseFrequencies({ theta: 500000, layout: 'half', scaling: s }, 128);
    for (let i = 0; i < 64; i++) {
      const wl = (2 * Math.PI) / base[i];
      if (wl < 8192 / 4) expect(inv[i]).toBe(base[i]);
      else if (wl > 8192) expect(inv[i]).toBeCloseTo(base[i] / 8, 15);
      else {
        const sm = (8192 / wl - 1) / 3;
        expect(inv[i]).toBeCloseTo((1 - sm) * (base[i] / 8) + sm * base[i], 15);
      }
    }
  });
});

describe('YaRN RoPE scaling', () => {
  // DeepSeek-V2's rope_scaling on its 64 RoPE dims: θ 10000, s = 40, original context 4096, β 32 / 1.
  const yarn = { type: 'yarn' as const, factor: 40, originalMaxPositionEmbeddings: 4096, betaFast: 32, betaSlow: 1, mscale: 0.707, mscaleAllDim: 0.707 };
  it('keeps the fast dimensions, divides the slow ones by the factor, ramps linearly between (float64)', () => {
    const d = 64;
    const base = ropeInverseFrequencies({ theta: 10000, layout: 'interleaved' }, d);
    const inv = ropeInverseFrequencies({ theta: 10000, layout: 'interleaved', scaling: yarn }, d);
    // Dimension making r turns over 4096 tokens: d·ln(4096 / (2πr)) / (2 ln θ) = 10.472 (r = 32), 22.513 (r = 1).
    const dimOf = (r: number) => (d * Math.log(4096 / (2 * Math.PI * r))) / (2 * Math.log(10000));
    expect(dimOf(32)).toBeCloseTo(10.4722, 3);
    expect(dimOf(1)).toBeCloseTo(22.5134, 3);
    const low = 10, high = 23; // floor / ceil
    for (let i = 0; i < d / 2; i++) {
      expect(base[i]).toBeCloseTo(Math.pow(10000, -(2 * i) / d), 15);
      const r = Math.min(1, Math.max(0, (i - low) / (high - low)));
      const want = (base[i] / 40) * r + base[i] * (1 - r);
      expect(Math.abs(inv[i] - want) / base[i]).toBeLessThan(1e-14);
      if (i <= low) expect(inv[i]).toBe(base[i]);
      if (i >= high) expect(inv[i] / base[i]).toBeCloseTo(1 / 40, 14);
    }
  });
  it('cos/sin carry m(s, mscale) / m(s, mscale_all_dim), m(s, k) = 0.1·k·ln(s) + 1', () => {
    expect(yarnAttentionFactor({ theta: 1e4, layout: 'half', scaling: yarn })).toBe(1);
    const m = (k: number) => 0.1 * k * Math.log(40) + 1;
    const r = { theta: 1e4, layout: 'half' as const, scaling: { ...yarn, mscale: 1, mscaleAllDim: 0.5 } };
    expect(yarnAttentionFactor(r)).toBeCloseTo(m(1) / m(0.5), 14);
    expect(yarnAttentionFactor({ ...r, scaling: { ...yarn, mscale: 1, mscaleAllDim: 0 } })).toBeCloseTo(m(1), 14);
    expect(yarnAttentionFactor({ theta: 1e4, layout: 'half', scaling: { type: 'linear', factor: 4 } })).toBe(1);
    const inv = ropeInverseFrequencies(r, 8);
    const t = ropeTableData64(r, 8, [5]);
    for (let i = 0; i < 4; i++) {
      expect(t.cos[i]).toBeCloseTo((m(1) / m(0.5)) * Math.cos(5 * inv[i]), 14);
      expect(t.sin[i]).toBeCloseTo((m(1) / m(0.5)) * Math.sin(5 * inv[i]), 14);
    }
  });
});

describe('attention', () => {
  it('equals a float64 softmax(qKᵀ/√d)V with GQA and a causal tail', () => {
    const n = 3, N = 7, H = 4, Hkv = 2, d = 4;
    const q = tf.randomNormal([n, H, d], 0, 1, 'float32', 1) as tf.Tensor3D;
    const k = tf.randomNormal([N, Hkv, d], 0, 1, 'float32', 2) as tf.Tensor3D;
    const v = tf.randomNormal([N, Hkv, d], 0, 1, 'float32', 3) as tf.Tensor3D;
    const out = attention(q, k, v, n).dataSync();
    const Q = q.dataSync(), K = k.dataSync(), V = v.dataSync();
    for (let i = 0; i < n; i++)
      for (let h = 0; h < H; h++) {
        const g = Math.floor(h / (H / Hkv));
        const last = N - n + i;
        const s: number[] = [];
        for (let j = 0; j <= last; j++) {
          let dot = 0;
          for (let c = 0; c < d; c++) dot += Q[(i * H + h) * d + c] * K[(j * Hkv + g) * d + c];
          s.push(dot / Math.sqrt(d));
        }
        const m = Math.max(...s);
        const e = s.map((x) => Math.exp(x - m));
        const z = e.reduce((a, b) => a + b, 0);
        for (let c = 0; c < d; c++) {
          let o = 0;
          for (let j = 0; j <= last; j++) o += (e[j] / z) * V[(j * Hkv + g) * d + c];
          expect(out[(i * H + h) * d + c]).toBeCloseTo(o, 5);
        }
      }
    tf.dispose([q, k, v]);
  });
});

describe('container serialization', () => {
  it('a backend without a synchronous readback gets a clear error that names serializeAsync', () => {
    const t = tf.zeros([2, 3]);
    // What tfjs-webgpu does under Node: its readSync needs OffscreenCanvas.
    t.dataSync = () => {
      throw new ReferenceError('OffscreenCanvas is not defined');
    };
    expect(() => storeTensor('k.basis.0', t, 'float16')).toThrow(/cannot read tensor "k.basis.0" back synchronously .*OffscreenCanvas.*serializeAsync/);
    t.dispose();
    // A disposed tensor is tfjs's own error, not a backend limitation.
    const gone = tf.zeros([2]);
    gone.dispose();
    expect(() => storeTensor('x', gone, 'float32')).toThrow(/disposed/i);
    expect(() => storeTensor('x', gone, 'float32')).not.toThrow(/serializeAsync/);
  });
  const c = {
    strategy: 'x',
    options: { a: 1 },
    meta: { note: 'héllo' },
    tensors: [
      { name: 'a', dtype: 'float16' as const, shape: [2, 3], data: encodeHalf([1, 2, 3, 4, 5, 6]) },
      { name: 'b', dtype: 'int8' as const, shape: [4], data: new Int8Array([-1, 2, -3, 4]) },
    ],
  };
  it('round-trips, and the header is the only overhead', () => {
    const bytes = encodeContainer(c);
    expect(bytes.length - headerBytes(bytes)).toBe(12 + 4);
    const d = decodeContainer(bytes);
    expect(Array.from(decodeHalf(d.get('a').data as Uint16Array))).toEqual([1, 2, 3, 4, 5, 6]);
    expect(Array.from(d.get('b').data)).toEqual([-1, 2, -3, 4]);
    expect(d.meta.note).toBe('héllo');
  });
  it('names truncation and corruption', () => {
    const bytes = encodeContainer(c);
    expect(() => decodeContainer(bytes.slice(0, bytes.length - 3))).toThrow(/truncated/);
    expect(() => decodeContainer(bytes.slice(0, 20))).toThrow(/truncated/);
    const flipped = bytes.slice();
    flipped[bytes.length - 1] ^= 0xff;
    expect(() => decodeContainer(flipped)).toThrow(/CRC-32/);
    const magic = bytes.slice();
    magic[0] = 0;
    expect(() => decodeContainer(magic)).toThrow(/magic/);
    expect(() => decodeContainer(new Uint8Array(4))).toThrow(KvpackError);
  });
});

describe('registry and config', () => {
  it('lists strategies in the unknown-name error', () => {
    expect(() => createStrategy({ name: 'nope' })).toThrow(/unknown strategy "nope"; registered strategies: .*dense/);
  });
  it('reads JSON and YAML configs and reports bad options with the allowed list', () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvpack-'));
    writeFileSync(join(dir, 'a.yaml'), 'name: dense\noptions:\n  storage: float32\n');
    writeFileSync(join(dir, 'b.json'), JSON.stringify({ name: 'dense', options: { storage: 'bf12' } }));
    expect(createStrategy(join(dir, 'a.yaml')).options).toEqual({ storage: 'float32' });
    expect(() => createStrategy(join(dir, 'b.json'))).toThrow(/invalid options for strategy "dense"[\s\S]*storage[\s\S]*allowed options: storage/);
    expect(() => createStrategy(join(dir, 'missing.yaml'))).toThrow(/cannot read config file/);
    expect(listStrategies()).toContain('dense');
  });
});

/** The next float32 above / below v (v finite, positive). */
function nextUp(v: number): number {
  const f = new Float32Array([v]);
  const u = new Uint32Array(f.buffer);
  u[0] += 1;
  return f[0];
}
function nextDown(v: number): number {
  const f = new Float32Array([v]);
  const u = new Uint32Array(f.buffer);
  if (u[0] > 0) u[0] -= 1;
  return f[0];
}
