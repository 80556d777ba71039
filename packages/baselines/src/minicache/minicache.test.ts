import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, MAX_LAYERS, applyRope, createStrategy, decodeContainer, decodeHalf, deserializeCache, roundHalf, selectBackend, type KVCache, type ModelLayout } from '@kvpack/core';
import './index.js'; // registers the strategy
import { runStrategyConformance, expectOptionBounds } from '@kvpack/core/conformance';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MiniCacheCache, mergeLayerPairOnBackend, miniCacheBytes, type MiniCacheOptions } from './index.js';
import { mergeLayerPair, restoreLayerPair, type MergedPair } from './oracle.js';
import { f16, randomCache, take, unrotate, type RandomCache } from '../testing/testkit.js';

runStrategyConformance('minicache', {
  compressing: {},
  // γ = 1 retains every token pair unmerged: exact float16 storage
  lossless: { gamma: 1 },
  badOptions: [{ t: 1.5 }, { gamma: -0.1 }, { startLayer: -1 }, { startLayer: 1.5 }],
  // L = 4: startLayer 3 leaves no pair to merge.
  failingCompress: [{ startLayer: 3 }],
});

/** Closed-form MiniCache reference for one (token, KV head) of a merged pair, in float64. */
function slerpRef(x0: ArrayLike<number>, x1: ArrayLike<number>, t: number): { e: number[]; n0: number; n1: number; omega: number } {
  const n0 = Math.hypot(...Array.from(x0));
  const n1 = Math.hypot(...Array.from(x1));
  const u0 = Array.from(x0, (v) => v / n0);
  const u1 = Array.from(x1, (v) => v / n1);
  const omega = Math.acos(Math.min(1, Math.max(-1, u0.reduce((a, v, i) => a + v * u1[i], 0))));
  const e =
    Math.sin(omega) < 1e-6
      ? u0.map((v, i) => (1 - t) * v + t * u1[i])
      : u0.map((v, i) => (Math.sin((1 - t) * omega) / Math.sin(omega)) * v + (Math.sin(t * omega) / Math.sin(omega)) * u1[i]);
  return { e, n0, n1, omega };
}

describe('minicache: SLERP merge against its closed form', () => {
  const layout: ModelLayout = { nLayers: 5, nHeads: 4, nKvHeads: 2, headDim: 8 };
  const { nKvHeads: H, headDim: d } = layout;
  const T = 40;
  const options: MiniCacheOptions = { t: 0.6, gamma: 0.1 }; // k = round(0.1·40) = 4 per KV head
  let rc: RandomCache;
  beforeAll(async () => {
    await selectBackend('wasm');
    rc = randomCache(T, layout, 5);
  });
  afterAll(() => rc.dispose());

  it('merges layers (2, 3), keeps 0, 1 and the unpaired 4 exact, retains the most distinct pairs', async () => {
    const c = (await createStrategy({ name: 'minicache', options }).compress(rc.cache)) as MiniCacheCache;
    const pre = { keys: [] as Float32Array[], values: [] as Float32Array[] };
    for (let l = 0; l < layout.nLayers; l++) {
      pre.keys.push(unrotate(c.keys(l)));
      pre.values.push(take(c.values(l)));
    }
    for (const l of [0, 1, 4]) {
      expect(c.retainedPositions(l, 'values')).toBeNull();
      expect(Array.from(pre.values[l])).toEqual(Array.from(rc.values[l], f16).map(Math.fround));
      for (let i = 0; i < T * H * d; i++) expect(Math.abs(pre.keys[l][i] - f16(rc.keys[l][i]))).toBeLessThan(1e-4);
    }
    for (const kind of ['keys', 'values'] as const) {
      const x0 = rc[kind][2];
      const x1 = rc[kind][3];
      const got = [pre[kind][2], pre[kind][3]];
      const tol = kind === 'keys' ? 1e-4 : 1e-6; // keys went through RoPE and back in float32
      const retained = c.retainedPositions(2, kind)!;
      expect(retained.length).toBe(4 * H);
      expect(Array.from(c.retainedPositions(3, kind)!)).toEqual(Array.from(retained));
      for (let h = 0; h < H; h++) {
        const refs = Array.from({ length: T }, (_, t) => slerpRef(x0.subarray((t * H + h) * d, (t * H + h + 1) * d), x1.subarray((t * H + h) * d, (t * H + h + 1) * d), options.t));
        // the paper's rule: the k pairs with the largest angular distance stay unmerged
        const top = refs
          .map((r, t) => [r.omega, t] as const)
          .sort((a, b) => b[0] - a[0])
          .slice(0, 4)
          .map(([, t]) => t)
          .sort((a, b) => a - b);
        const mine = Array.from({ length: 4 }, (_, j) => retained[j * H + h]);
        expect(mine).toEqual(top);
        let exactRows = 0;
        for (let t = 0; t < T; t++) {
          const o = (t * H + h) * d;
          const keep = top.includes(t);
          for (const j of [0, 1]) {
            const x = j === 0 ? x0 : x1;
            const n = j === 0 ? refs[t].n0 : refs[t].n1;
            let exact = true;
            for (let ch = 0; ch < d; ch++) {
              const want = keep ? f16(x[o + ch]) : n * refs[t].e[ch];
              // float16 storage of the direction (and of the norm) bounds the merged error
              expect(Math.abs(got[j][o + ch] - want)).toBeLessThanOrEqual(keep ? tol : n * 2 ** -10 + tol);
              if (Math.abs(got[j][o + ch] - f16(x[o + ch])) > tol) exact = false;
            }
            if (exact && j === 0) exactRows++;
          }
        }
        // only the retained rows reproduce the input: the others really were merged
        expect(exactRows).toBe(4);
      }
    }
    const k = 4;
    const expected = 3 * 2 * T * H * d * 2 + 2 * (T * H * d * 2 + 2 * T * H * 2 + k * H * 4 + 2 * k * H * d * 2);
    expect(c.byteSize()).toBe(expected);
    expect(miniCacheBytes(layout, T, options)).toBe(expected);
    c.dispose();
  });

  /**
   * Float64 reference of a merged pair whose upper layer is a multiple of the lower one (x1 = a·x0,
   * exact in float32 for a = ±2): Ω is 0 (a > 0) or π (a < 0), where sin Ω ≈ 0 and the merge falls
   * back to e = (1 − t)·u0 + t·u1 with u1 = sign(a)·u0; each layer j is restored as f16(‖x_j‖)·f16(e),
   * rounded to float32. With γ = 0 no token is retained. (The backend merges in float32: its norm and
   * direction may each land one float16 step from these float64 ones, so restored values agree to
   * 2·2^-10 relative.)
   */
  function parallelRef(x0: Float32Array, a: number, t: number): [number[], number[]] {
    const out: [number[], number[]] = [[], []];
    for (let i = 0; i < T * H; i++) {
      const row = Array.from(x0.subarray(i * d, (i + 1) * d));
      const n0 = Math.sqrt(row.reduce((s, v) => s + v * v, 0));
      const n1 = Math.abs(a) * n0;
      const e = row.map((v) => (1 - t) * (v / n0) + t * ((a * v) / n1));
      for (const [j, n] of [n0, n1].entries()) out[j].push(...e.map((ec) => Math.fround(f16(n) * f16(ec))));
    }
    return out;
  }

  for (const a of [2, -2])
    it(`falls back to linear interpolation for ${a > 0 ? 'parallel (Ω ≈ 0)' : 'antiparallel (Ω ≈ π)'} layers, x₃ = ${a}·x₂: restored = f16(‖x‖)·f16(e) up to one float16 step of each`, async () => {
      const scaled = (x: Float32Array) => tf.tensor3d(x.map((v) => a * v), [T, H, d]);
      const par: KVCache = {
        ...rc.cache,
        keys: rc.cache.keys.map((k, l) => (l === 3 ? scaled(rc.keys[2]) : k)),
        values: rc.cache.values.map((v, l) => (l === 3 ? scaled(rc.values[2]) : v)),
      };
      const t = 0.6; // the default
      const c = await createStrategy({ name: 'minicache', options: { gamma: 0 } }).compress(par);
      const [v2, v3] = parallelRef(rc.values[2], a, t);
      const [k2, k3] = parallelRef(rc.keys[2], a, t);
      let same = 0;
      for (const [j, want] of [v2, v3].entries()) {
        const got = take(c.values(2 + j));
        for (let i = 0; i < want.length; i++) {
          expect(Math.abs(got[i] - want[i]), `value ${j + 2}[${i}]`).toBeLessThanOrEqual(Math.abs(want[i]) * 2 ** -9 + 1e-7);
          if (got[i] === want[i]) same++;
        }
      }
      expect(same).toBeGreaterThan(0.95 * 2 * v2.length); // mostly bit-equal: float32 vs float64 only moves a few roundings
      // Keys went through RoPE and back in float32.
      const got = [unrotate(c.keys(2)), unrotate(c.keys(3))];
      for (const [j, want] of [k2, k3].entries()) {
        const scale = Math.max(...want.map(Math.abs));
        for (let i = 0; i < want.length; i++) expect(Math.abs(got[j][i] - want[i]), `key ${j + 2}[${i}]`).toBeLessThan(Math.abs(want[i]) * 2 ** -9 + 1e-6 * scale);
      }
      if (a > 0) {
        // Parallel: e = u0, so the pair is restored to within float16 of the input.
        for (const [l, ref] of [[2, rc.values[2]], [3, rc.values[2].map((x) => a * x)]] as const) {
          const v = l === 2 ? v2 : v3;
          for (let i = 0; i < v.length; i++) expect(Math.abs(v[i] - ref[i])).toBeLessThan(Math.abs(ref[i]) * 2e-3 + 5e-3);
        }
      } else {
        // Antiparallel: e = (1 − 2t)·u0 = −0.2·u0, so x₂ comes back as ≈ −0.2·x₂ (not x₂).
        for (let i = 0; i < v2.length; i++) expect(Math.abs(v2[i] - (1 - 2 * t) * rc.values[2][i])).toBeLessThan(Math.abs(rc.values[2][i]) * 2e-3 + 1e-3);
      }
      c.dispose();
      tf.dispose([par.keys[3], par.values[3]]);
    });

  it('rejects a startLayer that leaves no pair to merge', async () => {
    const s = createStrategy({ name: 'minicache', options: { startLayer: 4 } });
    await expect(s.compress(rc.cache)).rejects.toThrow(KvpackError);
    await expect(s.compress(rc.cache)).rejects.toThrow(/startLayer 4 leaves no adjacent layer pair/);
  });
});

describe('minicache: held on the backend at its stored width', () => {
  const layout: ModelLayout = { nLayers: 5, nHeads: 4, nKvHeads: 2, headDim: 8 };
  const { nKvHeads: H, headDim: d } = layout;

  it('T = 256: compress grows tf.memory().numBytes by at most 1.1 × byteSize() (no float32 reconstructions kept)', async () => {
    await selectBackend('wasm');
    const rc = randomCache(256, layout, 11);
    const base = tf.memory().numBytes;
    const c = await createStrategy({ name: 'minicache', options: {} }).compress(rc.cache);
    const grown = tf.memory().numBytes - base;
    expect(grown).toBeLessThanOrEqual(1.1 * c.byteSize());
    c.dispose();
    expect(tf.memory().numBytes).toBe(base);
    rc.dispose();
  });

  /** The merged pair of layers (2, 3) as stored in a serialization. */
  function storedPair(bytes: Uint8Array, kind: 'k' | 'v'): MergedPair {
    const c = decodeContainer(bytes);
    const part = (name: string) => c.get(`pair.2.${kind}.${name}`).data;
    const idx = part('idx') as Int32Array;
    return {
      dir: part('dir') as Uint16Array,
      norm0: part('norm0') as Uint16Array,
      norm1: part('norm1') as Uint16Array,
      idx,
      keep0: part('keep0') as Uint16Array,
      keep1: part('keep1') as Uint16Array,
      retained: idx.length / H,
    };
  }

  // The merge runs on the backend in float32; the float64 host merge (oracle.ts) is its reference: the
  // same retained tokens and exact rows, and norms and directions at most one float16 step apart.
  // The layers are rebuilt per read on the backend (scatter of the retained rows included); they must
  // equal the host reconstruction of the stored parts (exact layers rounded to float16) bit for bit.
  for (const backend of ['wasm', 'cpu'])
    it(`${backend}: stored parts match the float64 merge; reads equal the host reconstruction bit for bit, compressed and restored`, async () => {
      await selectBackend(backend);
      const T = 97;
      const gamma = 0.05; // k = 5 per KV head
      const rc = randomCache(T, layout, 7);
      const c = await createStrategy({ name: 'minicache', options: { gamma } }).compress(rc.cache);
      const bytes = c.serialize();
      const r = deserializeCache(bytes);
      const want = { keys: [] as Float32Array[], values: [] as Float32Array[] };
      for (const kind of ['keys', 'values'] as const) {
        const x = rc[kind];
        const mine = storedPair(bytes, kind === 'keys' ? 'k' : 'v');
        const ref = mergeLayerPair(x[2], x[3], T, H, d, 0.6, gamma);
        expect(mine.retained).toBe(5);
        expect(Array.from(mine.idx), `${kind} retained positions`).toEqual(Array.from(ref.idx));
        expect(Array.from(mine.keep0)).toEqual(Array.from(ref.keep0));
        expect(Array.from(mine.keep1)).toEqual(Array.from(ref.keep1));
        for (const part of ['dir', 'norm0', 'norm1'] as const) {
          const a = decodeHalf(mine[part]);
          const b = decodeHalf(ref[part]);
          let same = 0;
          for (let i = 0; i < b.length; i++) {
            // one float16 step: 2^-10 relative for normal values, 2^-24 for subnormal ones
            expect(Math.abs(a[i] - b[i]), `${kind} ${part}[${i}]`).toBeLessThanOrEqual(Math.max(Math.abs(b[i]) * 2 ** -10, 2 ** -24));
            if (mine[part][i] === ref[part][i]) same++;
          }
          expect(same, `${kind} ${part}: bit-equal values`).toBeGreaterThan(0.95 * b.length);
        }
        const [a, b] = restoreLayerPair(mine, T, H, d);
        want[kind].push(roundHalf(x[0]), roundHalf(x[1]), a, b, roundHalf(x[4]));
      }
      for (const cache of [c, r])
        for (let l = 0; l < layout.nLayers; l++) {
          const pre = tf.tensor3d(want.keys[l], [T, H, d]);
          const rotated = applyRope(pre, rc.cache.rope, { start: 0, count: T });
          expect(take(cache.keys(l)), `keys ${l}`).toEqual(take(rotated));
          expect(take(cache.values(l)), `values ${l}`).toEqual(want.values[l]);
          pre.dispose();
        }
      c.dispose();
      r.dispose();
      rc.dispose();
      await selectBackend('wasm');
    });
});

describe('minicache: backend merge at ties and degenerate pairs, against the float64 merge', () => {
  for (const backend of ['wasm', 'cpu'])
    it(`${backend}: repeated pairs (exact angle ties: lower position kept), parallel, antiparallel and zero vectors`, async () => {
      await selectBackend(backend);
      const T = 24;
      const H = 2;
      const d = 4;
      const rnd = (i: number) => Math.fround(Math.sin(i * 12.9898) * 4.5);
      const x0 = new Float32Array(T * H * d);
      const x1 = new Float32Array(T * H * d);
      for (let t = 0; t < T; t++)
        for (let h = 0; h < H; h++)
          for (let c = 0; c < d; c++) {
            const i = (t * H + h) * d + c;
            const src = ((t % 5) * H + h) * d + c; // tokens t and t + 5 are the same pair: exact ties
            x0[i] = rnd(src);
            x1[i] = t % 7 === 3 ? 2 * x0[i] : t % 7 === 4 ? -x0[i] : t === 10 ? 0 : rnd(src + 1000);
            if (t === 11) x0[i] = 0;
          }
      const n0 = tf.memory().numTensors;
      for (const gamma of [0, 0.2, 0.5, 1]) {
        const ref = mergeLayerPair(x0, x1, T, H, d, 0.6, gamma);
        const a = tf.tensor3d(x0, [T, H, d]);
        const b = tf.tensor3d(x1, [T, H, d]);
        const m = mergeLayerPairOnBackend(a, b, 0.6, gamma);
        expect(Array.from(m.idx.dataSync()), `γ = ${gamma}: retained positions`).toEqual(Array.from(ref.idx));
        for (const [part, want] of [['dir', ref.dir], ['norm0', ref.norm0], ['norm1', ref.norm1], ['keep0', ref.keep0], ['keep1', ref.keep1]] as const) {
          const got = m[part].dataSync();
          const w = decodeHalf(want);
          expect(got.length).toBe(w.length);
          // float32 before the float16 rounding: within one float16 step of the float64 merge
          for (let i = 0; i < w.length; i++) expect(Math.abs(got[i] - w[i]), `γ = ${gamma} ${part}[${i}]`).toBeLessThanOrEqual(Math.max(Math.abs(w[i]) * 2 ** -10, 2 ** -24));
        }
        tf.dispose([a, b, m.dir, m.norm0, m.norm1, m.idx, m.keep0, m.keep1]);
      }
      expect(tf.memory().numTensors).toBe(n0);
      await selectBackend('wasm');
    });
});

describe('minicache option bounds', () => {
  it('startLayer is a layer index below 2^10: accepted at 1023, a config error naming the bound past it', () => {
    expectOptionBounds('minicache', [{ option: 'startLayer', bound: MAX_LAYERS - 1, at: (v) => ({ startLayer: v }) }]);
  });
});
