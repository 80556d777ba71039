// runWgsl on a WebGPU adapter (a software one such as Mesa's lavapipe is enough; see
// scripts/webgpu-software.sh). Without an adapter the suite is skipped and says why.
import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { HalfTensor, KvpackError, applyRope, nonFiniteFlags, validateKVCache, releaseSharedRopeTables, countWebGpuDispatches, encodeHalf, fromHalfBits, toHalfBits, runWgsl, selectBackend, wgslValidationErrors, wgslWorkgroupStorageLimit, type WgslKernel } from './index.js';

const unavailable = await selectBackend('webgpu').then(
  () => null,
  (e: Error) => e.message.split('\n')[0],
);
const title = unavailable ? `runWgsl (SKIPPED: no WebGPU adapter: ${unavailable})` : 'runWgsl (webgpu)';
if (unavailable) console.warn(`[kvpack] ${title}`);

/** out[i] = 2·x[i] + y[i mod n], one invocation per element. */
function axpy(x: tf.Tensor1D, y: tf.Tensor1D, code?: string): WgslKernel {
  const N = x.shape[0];
  return {
    key: `test_axpy_${code ? 'bad' : 'ok'}`,
    names: ['X', 'Y'],
    inputs: [x, y],
    outputShape: [N],
    dtype: 'float32',
    workgroupSize: 64,
    dispatch: [Math.ceil(N / 64), 1, 1],
    workgroupBytes: 0,
    code:
      code ??
      `fn kernel(index: i32) {
  let i = u32(index);
  if (i < u32(uniforms.xShape)) { result[i] = 2.0 * X[i] + Y[i % u32(uniforms.yShape)]; }
}`,
  };
}

describe.skipIf(unavailable !== null)(title, { timeout: 600_000 }, () => {
  it('runs a kernel on tfjs tensors and returns a tensor tf.tidy frees; the values are the closed form', async () => {
    const x = tf.tensor1d(Float32Array.from({ length: 1000 }, (_, i) => i / 7));
    const y = tf.tensor1d([1, -2, 3]);
    const n0 = tf.memory().numTensors;
    const r = tf.tidy(() => tf.add(runWgsl(axpy(x, y)), 0)); // the kernel's own output is freed by the tidy
    expect(tf.memory().numTensors).toBe(n0 + 1);
    const got = await r.data();
    r.dispose();
    for (let i = 0; i < 1000; i++) expect(got[i]).toBeCloseTo(2 * (i / 7) + [1, -2, 3][i % 3], 4);
    tf.dispose([x, y]);
    expect(await wgslValidationErrors()).toEqual([]);
  });

  it('nonFiniteFlags scans each float32 tensor in one kernel: NaN, ±Inf anywhere (grid-stride tails included), finite extremes pass', async () => {
    // Sizes around the scan's grid: below one workgroup, not a multiple of 256, beyond 512 workgroups × 4
    // strides (of floats, and of vec4s for sizes divisible by 4).
    const sizes = [1, 255, 257, 5000, 512 * 256 * 4 + 3, 700_001, 512 * 256 * 16 + 4];
    const specials = [Number.NaN, Infinity, -Infinity];
    const n0 = tf.memory().numTensors;
    const cases: { data: Float32Array; bad: boolean }[] = [];
    let seed = 5;
    const next = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31);
    for (const n of sizes) {
      const base = Float32Array.from({ length: n }, (_, i) => ((i % 97) - 48) * 1e-3);
      base[0] = 3.4e38;
      if (n > 2) base[1] = -1e-45; // a float32 subnormal
      cases.push({ data: base, bad: false });
      for (const at of [0, n - 1, next() % n]) {
        const d = Float32Array.from(base);
        d[at] = specials[next() % 3];
        cases.push({ data: d, bad: true });
      }
    }
    const xs = cases.map((c, i) => (i % 2 ? tf.tensor1d(c.data) : tf.tensor2d(c.data, [1, c.data.length])));
    const flags = tf.tidy(() => nonFiniteFlags(xs));
    const got = Array.from(await flags.data());
    flags.dispose();
    expect(got).toEqual(cases.map((c) => (c.bad ? 1 : 0)));
    // The cache validation names the first bad layer and tensor.
    const layout = { nLayers: 2, nHeads: 2, nKvHeads: 1, headDim: 8 };
    const keys = [tf.ones([40, 1, 8]), tf.ones([40, 1, 8])] as tf.Tensor3D[];
    const vals: tf.Tensor3D[] = [tf.ones([40, 1, 8]), tf.tensor3d(Float32Array.from({ length: 320 }, (_, i) => (i === 301 ? Number.NaN : 1)), [40, 1, 8])];
    const rope = { theta: 10000, layout: 'half' as const };
    await expect(validateKVCache({ layout, rope, keys, values: vals })).rejects.toThrow(KvpackError);
    await expect(validateKVCache({ layout, rope, keys, values: vals })).rejects.toThrow(/layer 1 values contain NaN or Inf/);
    tf.dispose([...xs, ...keys, ...vals]);
    expect(tf.memory().numTensors).toBe(n0);
    expect(await wgslValidationErrors()).toEqual([]);
  });

  it('passes per-dispatch scalars as uniforms: one pipeline, new values each call, no tensor upload', async () => {
    const x = tf.tensor1d(Float32Array.from({ length: 300 }, (_, i) => i));
    const n0 = tf.memory().numTensors;
    const scaled = (a: number, b: number) =>
      runWgsl({
        key: 'test_uniform_affine',
        names: ['X'],
        inputs: [x],
        outputShape: [300],
        dtype: 'float32',
        workgroupSize: 64,
        dispatch: [5, 1, 1],
        workgroupBytes: 0,
        uniforms: [
          { name: 'mulBy', type: 'f32', value: a },
          { name: 'addN', type: 'i32', value: b },
        ],
        code: `fn kernel(index: i32) {
  if (index < uniforms.xShape) { result[index] = X[index] * uniforms.mulBy + f32(uniforms.addN); }
}`,
      });
    for (const [a, b] of [[2, 1], [-0.5, 7], [3, -4]]) {
      const { result: y, dispatches } = await countWebGpuDispatches(() => scaled(a, b));
      expect(dispatches).toBe(1);
      const got = await y.data();
      y.dispose();
      for (let i = 0; i < 300; i++) expect(got[i]).toBe(Math.fround(i * a) + b);
    }
    expect(tf.memory().numTensors).toBe(n0);
    // A name of tfjs's own uniforms, or a value that is not an int32, is refused before dispatch.
    const bad = (u: { name: string; type: 'i32' | 'f32'; value: number }) => () =>
      runWgsl({ key: 'test_uniform_bad', names: ['X'], inputs: [x], outputShape: [1], dtype: 'float32', workgroupSize: 64, dispatch: [1, 1, 1], workgroupBytes: 0, uniforms: [u], code: 'fn kernel(index: i32) { result[0] = X[0]; }' });
    expect(bad({ name: 'xShape', type: 'i32', value: 1 })).toThrow(/uniform name "xShape"/);
    expect(bad({ name: 'step', type: 'i32', value: 1.5 })).toThrow(/not a finite int32/);
    expect(bad({ name: 'scale', type: 'f32', value: Number.NaN })).toThrow(/not a finite float/);
    // vec4 element widths: a size not divisible by 4, or a width other than 1 or 4, is refused before dispatch.
    const odd = tf.tensor1d([1, 2, 3]);
    const wide = (x: tf.Tensor, w: number) => () =>
      runWgsl({ key: 'test_wide_bad', names: ['X'], inputs: [x], outputShape: [1], dtype: 'float32', workgroupSize: 64, dispatch: [1, 1, 1], workgroupBytes: 0, components: { inputs: [w] }, code: 'fn kernel(index: i32) { result[0] = X[0].x; }' });
    expect(wide(odd, 4)).toThrow(/size divisible by 4/);
    expect(wide(x, 2)).toThrow(/widths must be 1 or 4/);
    odd.dispose();
    expect(tf.memory().numTensors).toBe(n0);
    x.dispose();
    expect(await wgslValidationErrors()).toEqual([]);
  });

  it('HalfTensor.fromTensor packs in one kernel, bit for bit as the host encodeHalf: ties, subnormals, overflow, ±Inf, NaN, float32 subnormals', async () => {
    const xs: number[] = [0, -0, 1e-30, -1e-30, 1e-40, -1e-40, 2 ** -25, 2 ** -25 * 1.0000001, 65504, 65519.99, 65520, -65520, 1e6, -3e38, Infinity, -Infinity];
    for (let h = 0; h < 0x7c00; h += 5) {
      const v = fromHalfBits(h);
      const mid = Math.fround((v + fromHalfBits(h + 1)) / 2);
      xs.push(v, -v, mid, -mid, mid * (1 + 2 ** -23), -mid * (1 - 2 ** -24));
    }
    xs.push(...fc.sample(fc.float({ noNaN: true }), { numRuns: 3000, seed: 11 }));
    // A count divisible by 8 takes the eight-per-invocation kernels, another count the scalar ones.
    const n8 = xs.length - (xs.length % 8);
    for (const n of [n8, n8 - 3]) {
      const x32 = Float32Array.from(xs.slice(0, n));
      const want = encodeHalf(x32);
      const n0 = tf.memory().numTensors;
      const t = tf.tensor1d(x32);
      const { result: h, dispatches } = await countWebGpuDispatches(() => HalfTensor.fromTensor(t));
      expect(dispatches).toBe(1);
      const got = await h.bits();
      const bad = Array.from(x32.keys()).filter((i) => got[i] !== want[i]);
      expect(bad.slice(0, 5).map((i) => [i, x32[i], got[i], want[i]]), `${bad.length} of ${x32.length} differ`).toEqual([]);
      // Unpacked on the device: the float16 values, bit for bit.
      const u = h.unpack();
      const back = Array.from(await u.data()).map(toHalfBits);
      expect(back.filter((b, i) => b !== want[i]).length, `unpack of ${n}`).toBe(0);
      tf.dispose([t, u]);
      h.dispose();
      expect(tf.memory().numTensors).toBe(n0);
    }
    // NaN stays NaN (a quiet NaN pattern).
    const nan = tf.tensor1d([NaN, 1]);
    const hn = await HalfTensor.fromTensor(nan);
    const nb = await hn.bits();
    expect((nb[0] & 0x7c00) === 0x7c00 && (nb[0] & 0x3ff) !== 0).toBe(true);
    expect(nb[1]).toBe(0x3c00);
    tf.dispose(nan);
    hn.dispose();
  });
  it('applyRope is one kernel, bit for bit the wasm tfjs ops: both layouts, inverse, a range (shared tables) and a position list', async () => {
    const T = 300;
    const H = 3;
    const d = 16;
    let s = 7;
    const x32 = Float32Array.from({ length: T * H * d }, () => ((s = (s * 1103515245 + 12345) % 2147483648) / 2147483648 - 0.5) * 6);
    for (const layout of ['half', 'interleaved'] as const) {
      for (const inverse of [false, true]) {
        for (const positions of [{ start: 5, count: T }, Int32Array.from({ length: T }, (_, i) => 3 * i + 1)]) {
          const rope = { theta: 10000, layout };
          await selectBackend('wasm');
          const xw = tf.tensor3d(x32, [T, H, d]);
          const rw = applyRope(xw, rope, positions, inverse);
          const want = (await rw.data()) as Float32Array;
          tf.dispose([xw, rw]);
          await selectBackend('webgpu');
          const xg = tf.tensor3d(x32, [T, H, d]);
          const { result: rg, dispatches } = await countWebGpuDispatches(() => applyRope(xg, rope, positions, inverse));
          expect(dispatches).toBe(1);
          const got = (await rg.data()) as Float32Array;
          tf.dispose([xg, rg]);
          const bad = Array.from(want.keys()).filter((i) => !Object.is(got[i], want[i]));
          expect(bad.slice(0, 3).map((i) => [i, got[i], want[i]]), `${layout} inverse ${inverse}`).toEqual([]);
        }
      }
    }
    releaseSharedRopeTables();
  });
  it('a kernel over the workgroup-memory limit is refused before dispatch; an invalid shader is reported, then refused', async () => {
    const x = tf.tensor1d([1, 2]);
    const y = tf.tensor1d([3]);
    const big = { ...axpy(x, y), workgroupBytes: wgslWorkgroupStorageLimit() + 4 };
    expect(() => runWgsl(big)).toThrow(/needs \d+ bytes of workgroup memory; this device allows \d+/);
    const bad = axpy(x, y, 'fn kernel(index: i32) { result[0] = X[0] + Y[0] + undefined_name; }');
    const log = console.error;
    console.error = () => {};
    try {
      runWgsl(bad).dispose();
      const errors = await wgslValidationErrors();
      expect(errors.length).toBe(1);
      expect(errors[0]).toMatch(/^test_axpy_bad: /);
    } finally {
      console.error = log;
    }
    expect(() => runWgsl(bad)).toThrow(/WGSL kernel test_axpy_bad failed WebGPU validation/);
    tf.dispose([x, y]);
  });
});
