import * as tf from '@tensorflow/tfjs-core';
import { beforeAll, describe, expect, it } from 'vitest';
import { selectBackend } from '@kvpack/core';
import { fmtBytes, fmtMs, measurePeakMemory, median, ratioCheck, summarize, timeInterleaved, timeOp } from './stats.js';
import { factoredShapes, floorMs, type MatmulFloor } from './suite.js';
import { PERF_SETTINGS, parseTokenList, selectSettings, withSparseBudget } from './settings.js';
import { LLAMA31_8B_LAYOUT } from './synthetic.js';

beforeAll(async () => {
  await selectBackend('wasm');
});

describe('median and summaries', () => {
  it('odd and even counts, unsorted input, no mutation', () => {
    const xs = [5, 1, 4];
    expect(median(xs)).toBe(4);
    expect(xs).toEqual([5, 1, 4]);
    expect(median([4, 1, 3, 2])).toBe(2.5);
    expect(median([7])).toBe(7);
    const s = summarize([3, 9, 1], 2);
    expect(s).toMatchObject({ medianMs: 3, minMs: 1, maxMs: 9, warmup: 2 });
  });
  it('rejects empty and non-finite input', () => {
    expect(() => median([])).toThrow(/empty/);
    expect(() => median([1, NaN])).toThrow(/non-finite/);
  });
});

describe('timeOp', () => {
  it('runs warm-up + reps times, reports reps samples, disposes results', async () => {
    const start = tf.memory().numTensors;
    let calls = 0;
    const t = await timeOp(
      () => {
        calls++;
        return [tf.ones([8, 8]), tf.zeros([4])];
      },
      { warmup: 2, reps: 3 },
    );
    expect(calls).toBe(5);
    expect(t.samplesMs).toHaveLength(3);
    expect(t.warmup).toBe(2);
    expect(t.medianMs).toBe(median(t.samplesMs));
    expect(tf.memory().numTensors).toBe(start);
  });
  it('disposes objects with dispose() and rejects bad counts', async () => {
    let disposed = 0;
    await timeOp(() => ({ dispose: () => void disposed++ }), { warmup: 1, reps: 2 });
    expect(disposed).toBe(3);
    await expect(timeOp(() => undefined, { reps: 0 })).rejects.toThrow(/reps/);
    await expect(timeOp(() => undefined, { warmup: -1 })).rejects.toThrow(/warmup/);
  });
});

describe('timeInterleaved', () => {
  it('alternates the operations round by round and records reps rounds after warm-up', async () => {
    const start = tf.memory().numTensors;
    const order: string[] = [];
    const t = await timeInterleaved(
      {
        a: () => {
          order.push('a');
          return tf.ones([4]);
        },
        b: () => void order.push('b'),
      },
      { warmup: 1, reps: 2 },
    );
    expect(order).toEqual(['a', 'b', 'a', 'b', 'a', 'b']);
    expect(t.a.samplesMs).toHaveLength(2);
    expect(t.b.samplesMs).toHaveLength(2);
    expect(t.a.medianMs).toBe(median(t.a.samplesMs));
    expect(tf.memory().numTensors).toBe(start);
  });
});

describe('batched samples', () => {
  it('batch runs the op that many times per sample, disposes every result, and rejects batch < 1', async () => {
    const start = tf.memory().numTensors;
    let calls = 0;
    const t = await timeOp(
      () => {
        calls++;
        return tf.ones([8]);
      },
      { warmup: 1, reps: 3, batch: 4 },
    );
    expect(calls).toBe((1 + 3) * 4);
    expect(t.samplesMs).toHaveLength(3);
    expect(tf.memory().numTensors).toBe(start);
    const order: string[] = [];
    await timeInterleaved({ a: () => void order.push('a'), b: () => void order.push('b') }, { warmup: 0, reps: 1, batch: 2 });
    expect(order).toEqual(['a', 'a', 'b', 'b']);
    await expect(timeOp(() => undefined, { batch: 0 })).rejects.toThrow(/batch must be an integer ≥ 1/);
    // An op that fails mid-sample: the runs before it are still released.
    let n = 0;
    await expect(
      timeOp(
        () => {
          if (++n === 3) throw new Error('boom');
          return tf.ones([4]);
        },
        { warmup: 0, reps: 1, batch: 4 },
      ),
    ).rejects.toThrow('boom');
    expect(tf.memory().numTensors).toBe(start);
  });
});

describe('measurePeakMemory', () => {
  it('peak and retained bytes of a known allocation pattern', async () => {
    const held = tf.ones([1000]); // 4,000 bytes held before: not counted
    const start = tf.memory().numTensors;
    // a: 256 floats (1,024 B), b = a + a (1,024 B) → peak 2,048 B; then a and b are freed and c (64 B) is returned.
    const r = await measurePeakMemory(
      () => {
        const a = tf.ones([256]);
        const b = tf.add(a, a);
        a.dispose();
        const c = tf.slice(b, [0], [16]);
        b.dispose();
        return c;
      },
      () => true,
    );
    expect(r.peakBytes).toBe(2048);
    expect(r.retainedBytes).toBe(64);
    expect(r.result).not.toBeNull();
    (r.result as tf.Tensor).dispose();
    const r2 = await measurePeakMemory(() => tf.zeros([100]));
    expect(r2.peakBytes).toBe(400);
    expect(r2.result).toBeNull(); // disposed: not kept
    expect(tf.memory().numTensors).toBe(start);
    held.dispose();
  });
  it('resets profiling after a failure', async () => {
    await expect(
      measurePeakMemory(() => {
        throw new Error('boom');
      }),
    ).rejects.toThrow('boom');
    const r = await measurePeakMemory(() => tf.zeros([10]));
    expect(r.peakBytes).toBe(40);
  });
});

describe('ratio checks', () => {
  it('ratio, pass at and below target, fail above; the line names both figures', () => {
    const a = ratioCheck('CPU: compress', 600, 200, 3, 'the two matmuls');
    expect(a.ratio).toBe(3);
    expect(a.pass).toBe(true);
    expect(a.line).toMatch(/^PASS CPU: compress = 3\.00× the two matmuls \(600 ms vs 200 ms; target ≤ 3×\)$/);
    const b = ratioCheck('decode', 250, 100, 2, 'dense', 'one layer');
    expect(b.pass).toBe(false);
    expect(b.ratio).toBeCloseTo(2.5, 12);
    expect(b.line).toMatch(/^FAIL decode = 2\.50× dense/);
    expect(b.note).toBe('one layer');
    const c = ratioCheck('webgpu: compress', 600, 100, null, 'the two matmuls');
    expect([c.pass, c.target, c.ratio]).toEqual([true, null, 6]);
    expect(c.line).toBe('INFO webgpu: compress = 6.00× the two matmuls (600 ms vs 100 ms)');
    expect(() => ratioCheck('x', 1, 0, 2, 'y')).toThrow(/baseline/);
    expect(() => ratioCheck('x', NaN, 1, 2, 'y')).toThrow(/measured/);
  });
  it('formats times and sizes', () => {
    expect(fmtMs(1234)).toBe('1.23 s');
    expect(fmtMs(123.4)).toBe('123 ms');
    expect(fmtMs(12.34)).toBe('12.3 ms');
    expect(fmtMs(1.234)).toBe('1.23 ms');
    expect(fmtBytes(512)).toBe('512 B');
    expect(fmtBytes(3 * 2 ** 20)).toBe('3.0 MiB');
    expect(fmtBytes(2 ** 31)).toBe('2.00 GiB');
  });
});

describe('matmul floors of the factored shapes', () => {
  const xkv = PERF_SETTINGS.find((s) => s.name === 'xkv')!;
  const svd = PERF_SETTINGS.find((s) => s.name === 'svd')!;
  it('xkv G=4 at r=128/192 per layer: one [T, 4096] group at 512 and 768 per 4 layers; a short last group', () => {
    expect(factoredShapes(xkv, LLAMA31_8B_LAYOUT, 8)).toEqual([
      { features: 4096, rank: 512, count: 2 },
      { features: 4096, rank: 768, count: 2 },
    ]);
    expect(factoredShapes(xkv, LLAMA31_8B_LAYOUT, 6)).toEqual([
      { features: 4096, rank: 512, count: 1 },
      { features: 4096, rank: 768, count: 1 },
      { features: 2048, rank: 256, count: 1 },
      { features: 2048, rank: 384, count: 1 },
    ]);
    expect(factoredShapes(svd, LLAMA31_8B_LAYOUT, 3)).toEqual([
      { features: 1024, rank: 128, count: 3 },
      { features: 1024, rank: 192, count: 3 },
    ]);
    expect(factoredShapes(PERF_SETTINGS[0], LLAMA31_8B_LAYOUT, 4)).toEqual([]);
  });
  it('floor = Σ count · (X·Ω + Qᵀ·X)', () => {
    const t = (ms: number) => summarize([ms]);
    const floors: MatmulFloor[] = [
      { tokens: 8192, features: 4096, rank: 512, xOmega: t(10), qtX: t(12) },
      { tokens: 8192, features: 4096, rank: 768, xOmega: t(15), qtX: t(17) },
    ];
    expect(floorMs(factoredShapes(xkv, LLAMA31_8B_LAYOUT, 8), floors, 8192)).toBe(2 * 22 + 2 * 32);
    expect(() => floorMs(factoredShapes(xkv, LLAMA31_8B_LAYOUT, 8), floors, 4096)).toThrow(/no matmul floor/);
  });
});

describe('settings and token lists', () => {
  it('parses token lists with K suffixes and rejects junk', () => {
    expect(parseTokenList('4096, 8K,32k')).toEqual([4096, 8192, 32768]);
    expect(() => parseTokenList('4096,abc')).toThrow(/"abc" is not a positive integer/);
    expect(() => parseTokenList('0')).toThrow(/≥ 1/);
    expect(() => parseTokenList(' , ')).toThrow(/empty/);
  });
  it('selects settings by name in suite order; unknown names are named', () => {
    const sel = selectSettings('svd,xkv');
    expect(sel.map((s) => s.name)).toEqual(['xkv', 'xkv', 'svd']); // xkv: full decode, and compressed for sparse decode
    expect(sel.map((s) => s.options.decode ?? 'full')).toEqual(['full', 'sparse', 'full']);
    const b = withSparseBudget(sel, 1024);
    expect(b[1].options.sparse).toEqual({ budget: 1024 });
    expect(b[1].label).toMatch(/sparse 1024$/);
    expect(b[0]).toBe(sel[0]);
    expect(sel[1].options.sparse).toEqual({ budget: 2048 }); // not mutated
    expect(selectSettings().length).toBe(PERF_SETTINGS.length);
    expect(() => selectSettings('xkv,foo')).toThrow(/unknown perf strategy "foo"/);
  });
  it("xkv's settings are the paper's Llama-3.1-8B xKV-4: group ranks 512 / 768", () => {
    const x = selectSettings('xkv')[0];
    const G = x.options.layersPerGroup as number;
    expect(G * (x.options.rankK as number)).toBe(512);
    expect(G * (x.options.rankV as number)).toBe(768);
  });
});
