import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { beforeAll, describe, expect, it } from 'vitest';
import { createStrategy, decodeHalf, denseCacheBytes, disposeKVCache, encodeHalf, selectBackend } from '@kvpack/core';
import '@kvpack/xkv';
import '@kvpack/baselines';
import { writeKVDump } from '@kvpack/models';
import { runCli } from '../program.js';
import type { CommandIO } from '../commands.js';
import { perfCommand } from './command.js';
import { groupRelErr } from './checks.js';
import { decodeModes } from './decode-modes.js';
import { peerCheck, peerChecks, writeGroupMatrices, type PeerResult } from './peer.js';
import { checkLines, perfMarkdown, type PerfReport } from './report.js';
import { selectSettings } from './settings.js';
import { summarize } from './stats.js';
import { factoredShapes, floorMs, keyRebuildVsDense, runPerfSuite, type PerfSuiteResult } from './suite.js';
import { LLAMA31_8B_LAYOUT, syntheticLlamaCache } from './synthetic.js';

beforeAll(async () => {
  await selectBackend('wasm');
});

const io = () => {
  const c = { out: '', err: '', o: (t: string) => void (c.out += `${t}\n`), e: (t: string) => void (c.err += `${t}\n`) };
  return { c, io: { out: c.o, err: c.e } };
};

describe('runPerfSuite on a small Llama-shaped cache', () => {
  let r: PerfSuiteResult;
  let start = 0;
  beforeAll(async () => {
    start = tf.memory().numTensors;
    r = await runPerfSuite({ tokens: [256], settings: selectSettings('dense,svd,streamingllm,snapkv'), layers: 2, reps: 2, warmup: 1, checks: false });
  });

  it('measures every setting with consistent ratios, and frees every tensor', () => {
    expect(tf.memory().numTensors).toBe(start);
    expect(r.rows.map((x) => x.strategy)).toEqual(['dense', 'dense', 'svd', 'snapkv', 'streamingllm']);
    // Dense at float16 holds its keys and values packed (resident = stored); at float32 it holds 4-byte
    // values and counts them so, twice the fp16 bytes (2·L·T·H_kv·d·2 = 2·2·256·8·128·2).
    const [d16, d32] = r.rows;
    expect(d16.bytes).toBe(2 * 2 * 256 * 8 * 128 * 2);
    expect(d16.residentBytes).toBe(d16.bytes);
    expect(d32.bytes).toBe(2 * d16.bytes);
    expect(d32.residentBytes).toBe(d32.bytes);
    expect(r.layout).toEqual({ ...LLAMA31_8B_LAYOUT, nLayers: 2 });
    for (const row of r.rows) {
      expect(row.error).toBeUndefined();
      expect(row.compress!.samplesMs).toHaveLength(2);
      expect(row.compressPerLayerMs).toBeCloseTo(row.compress!.medianMs / 2, 9);
      expect(row.ratio).toBeCloseTo(denseCacheBytes(r.layout, 256) / row.bytes, 12);
      expect(row.decode.length).toBeGreaterThan(0);
      for (const d of row.decode) {
        expect(d.vsDense).toBeCloseTo(d.timing.medianMs / r.baselines[0].denseBestMs, 9);
        expect(d.vsCoreAttention).toBeCloseTo(d.timing.medianMs / r.baselines[0].denseAttention.medianMs, 9);
      }
    }
    const by = (n: string) => r.rows.find((x) => x.strategy === n)!;
    // fp16 dense keeps 2 bytes per element: ratio 1; T = 256 ≤ budget 2,048: the eviction strategies keep everything.
    expect(by('dense').ratio).toBe(1);
    // the fp16 dense cache holds its values packed, nothing more after decoding
    expect(by('dense').residentAfterDecodeBytes).toBe(by('dense').residentBytes);
    expect(by('streamingllm').bytes).toBe(denseCacheBytes(r.layout, 256));
    // Single SVD at r = 128/192 per layer: 2·T·F / ((T + F)·(r_K + r_V)) = 2·256·1024 / (1280·320)
    expect(by('svd').ratio).toBeCloseTo((2 * 256 * 1024) / (1280 * 320), 12);
    expect(by('svd').paperRatio).toBeCloseTo(by('svd').ratio, 12);
    const svd = selectSettings('svd')[0];
    expect(by('svd').compressVsFloor).toBeCloseTo(by('svd').compress!.medianMs / floorMs(factoredShapes(svd, r.layout, 2), r.baselines[0].floors, 256), 9);
    expect(r.baselines[0].floors.map((f) => `${f.features}:${f.rank}`).sort()).toEqual(['1024:128', '1024:192']);
    expect(r.baselines[0].denseBestMs).toBe(Math.min(r.baselines[0].denseAttention.medianMs, r.baselines[0].denseReady.medianMs));
  });

  it('renders one Markdown row per setting and decode mode', () => {
    const rep: PerfReport = {
      format: 'kvpack-perf/1',
      environment: { backend: 'wasm', backendLine: 'backend wasm', node: 'v20', platform: 'linux', arch: 'x64', cpus: 2, date: '2026-11-29T00:00:00Z', quick: true, kvpackVersion: '0' },
      ...r,
    };
    const md = perfMarkdown(rep);
    const lines = md.split('\n').filter((l) => / \| 256 \| /.test(l));
    expect(lines).toHaveLength(r.rows.reduce((a, x) => a + Math.max(1, x.decode.length), 0));
    expect(md).toMatch(/^# kvpack perf — 2026-11-29/);
    expect(md).toMatch(/svd r=128\/192 \| 256 \|/);
    expect(md).toMatch(/--layer_group_size 4 --rank_k 512 --rank_v 768|Single SVD/);
  });
});

describe('--dump', () => {
  it('reads the cache from a KV dump, sliced to T and to the layers asked for', async () => {
    const layout = { nLayers: 3, nHeads: 4, nKvHeads: 2, headDim: 16 };
    const src = await syntheticLlamaCache({ T: 96, layout, seed: 5 });
    const file = join(mkdtempSync(join(tmpdir(), 'kvpack-dump-')), 'cache.safetensors');
    await writeKVDump(file, src);
    tf.dispose([...src.keys, ...src.values]);
    const start = tf.memory().numTensors;
    const r = await runPerfSuite({ dump: file, tokens: [64], settings: selectSettings('dense'), layers: 2, reps: 1, checks: false });
    expect(tf.memory().numTensors).toBe(start);
    expect(r.source).toMatch(/^KV dump .*cache\.safetensors$/);
    expect(r.layout).toEqual({ ...layout, nLayers: 2 });
    expect(r.rows[0].bytes).toBe(denseCacheBytes({ ...layout, nLayers: 2 }, 64));
    await expect(runPerfSuite({ dump: file, tokens: [200], settings: selectSettings('dense'), checks: false })).rejects.toThrow(/exceeds the dump's 96 tokens/);
  });
});

describe('target checks', () => {
  it('the compression check divides by the two matmuls of K and V; a missing sparse mode is reported, not hidden', async () => {
    const start = tf.memory().numTensors;
    const r = await runPerfSuite({
      tokens: [128],
      settings: selectSettings('dense'),
      layers: 1,
      reps: 1,
      warmup: 1,
      checkCompressTokens: 512,
      checkRank: 16,
      checkDecodeTokens: 1024,
      checkDecodeRanks: { rankK: 16, rankV: 16 },
      checkBaselines: ['kivi 2-bit', 'snapkv 2048'],
    });
    expect(tf.memory().numTensors).toBe(start);
    const d = r.compressDetail!;
    expect([d.tokens, d.features, d.rank]).toEqual([512, 4096, 64]);
    expect(Object.keys(d.baselineMs)).toEqual(['kivi 2-bit', 'snapkv 2048']);
    for (const ms of Object.values(d.baselineMs)) expect(ms).toBeGreaterThan(0);
    // Rank 64 of 512 tokens keeps most but not all of the planted energy.
    for (const e of [d.relErr.xk, d.relErr.xv]) expect(e).toBeGreaterThan(0.01), expect(e).toBeLessThan(0.9);
    const c = r.checks.find((x) => /compress K\+V of one G=4 group \[512, 4096\] r=64/.test(x.label));
    expect(c).toBeDefined();
    expect(c!.ratio).toBeCloseTo(c!.valueMs / c!.baselineMs, 12);
    expect(c!.pass).toBe(c!.ratio <= 3);
    expect(c!.line).toMatch(/^(PASS|FAIL) wasm: compress K\+V/);
    const sparse = [...r.checks.map((x) => x.label), ...r.unavailable.map((x) => x.label)].filter((l) => /sparse mode, T=1024, budget 2048/.test(l));
    expect(sparse).toHaveLength(1);
    const lines = checkLines(r.checks, r.unavailable);
    expect(lines[0]).toBe('Target checks (computed in this run):');
    expect(lines.length).toBe(2 + r.checks.length + r.unavailable.length);
  });

  it('groupRelErr equals a float64 re-computation of ‖X̂ − X‖/‖X‖ (dense fp16: the rounding error of every element)', async () => {
    const cache = await syntheticLlamaCache({ T: 64, layers: 2, seed: 3 });
    const start = tf.memory().numTensors;
    const got = await groupRelErr(await createStrategy({ name: 'dense', options: { storage: 'float16' } }).compress(cache), cache);
    expect(tf.memory().numTensors).toBe(start);
    const host = async (xs: tf.Tensor[]) => {
      let e = 0;
      let n = 0;
      for (const x of xs) {
        const v = (await x.data()) as Float32Array;
        const h = decodeHalf(encodeHalf(v));
        for (let i = 0; i < v.length; i++) (e += (h[i] - v[i]) ** 2), (n += v[i] ** 2);
      }
      return Math.sqrt(e / n);
    };
    // Keys are compared post-RoPE; RoPE rotates pairs, so the error is the pre-RoPE one (to float32 rounding of the rotation).
    expect(got.xk).toBeCloseTo(await host(cache.keys), 5);
    expect(got.xv).toBeCloseTo(await host(cache.values), 7);
    expect(got.xv).toBeGreaterThan(1e-5);
    disposeKVCache(cache);
  });

  it('the sparse check states the compute floor: key rebuild multiply–adds over dense attention', () => {
    // Llama-3.1-8B, T = 32K, budget 2,048, group rank 512: 8·2048·512·128 / (2·32768·32·128) = 4.
    expect(keyRebuildVsDense({ nHeads: 32, nKvHeads: 8, headDim: 128 }, 32768, 2048, 512)).toBe(4);
    // Direct count on a small GQA layout: per KV head S rows × R × d, against q·K and p·V over T tokens for every query head.
    let rebuild = 0;
    for (let h = 0; h < 2; h++) rebuild += 16 * 6 * 8;
    let dense = 0;
    for (let h = 0; h < 4; h++) dense += 100 * 8 + 100 * 8;
    expect(keyRebuildVsDense({ nHeads: 4, nKvHeads: 2, headDim: 8 }, 100, 16, 6)).toBeCloseTo(rebuild / dense, 12);
  });

  it('peerCheck compares our K+V compression with torch.svd_lowrank niter=2 of both matrices', () => {
    const t = (ms: number) => ({ median_ms: ms });
    const peer: PeerResult = {
      format: 'kvpack-peer/1',
      torch: '2.11',
      device: 'NVIDIA H200',
      T: 32768,
      F: 4096,
      rank: 512,
      matrices: [],
      svd_lowrank_kv_ms: { '0': 70, '2': 150 },
      xkv_compress_kv_ms: 160,
      reconstruct_keys: t(1),
      reconstruct_values: t(1),
      dense_attention: t(0.1),
    };
    const check = { label: 'webgpu: compress K+V of one G=4 group [32768, 4096] r=512', valueMs: 240, baselineMs: 100, ratio: 2.4, target: 3, pass: true, line: '' };
    const rep = { environment: { backend: 'webgpu' }, checks: [check] } as unknown as PerfReport;
    const c = peerCheck(rep, peer)!;
    expect(c.ratio).toBeCloseTo(240 / 150, 12);
    expect(c.pass).toBe(true);
    expect(c.line).toMatch(/torch\.svd_lowrank\(q=512, niter=2\)/);
    expect(peerCheck({ ...rep, checks: [] } as PerfReport, peer)).toBeNull();
  });

  it('peerChecks: floor (≤ 2×), error vs exact SVD (≤ 1.02×), baselines vs their peers (≤ 3×), only for the same matrices', () => {
    const t = (ms: number) => ({ median_ms: ms });
    const m = (name: string, exact: number) => ({ name, svd_lowrank: {}, rel_err: {}, xkv_compress: t(1), exact_rel_err: exact });
    const peer: PeerResult = {
      format: 'kvpack-peer/1', torch: '2.11', device: 'NVIDIA H100', T: 32768, F: 4096, rank: 512, group_layers: 4,
      matrices: [m('xk', 0.1), m('xv', 0.2)], svd_lowrank_kv_ms: { '2': 150 }, xkv_compress_kv_ms: 160,
      reconstruct_keys: t(1), reconstruct_values: t(1), dense_attention: t(0.1),
      range_finder_products_kv_ms: 50, baselines: { 'kivi 2-bit': t(4), minicache: t(10) },
    };
    const detail = { tokens: 32768, features: 4096, rank: 512, compressMs: 120, relErr: { xk: 0.101, xv: 0.21 }, baselineMs: { 'kivi 2-bit': 10, minicache: 40, 'snapkv 2048': 5 } };
    const rep = { environment: { backend: 'webgpu' }, checks: [], compressDetail: detail } as unknown as PerfReport;
    const cs = peerChecks(rep, peer);
    expect(cs.map((c) => [c.ratio, c.target, c.pass])).toEqual([
      [120 / 50, 2, false],
      [0.101 / 0.1, 1.02, true],
      [0.21 / 0.2, 1.02, false],
      [10 / 4, 3, true],
      [40 / 10, 3, false],
    ]);
    expect(cs[1].unit).toBe('ratio');
    expect(cs[1].line).toMatch(/^PASS relative error of the keys group \(xk\) at rank 512 = 1\.0100× /);
    expect(peerChecks({ ...rep, compressDetail: { ...detail, tokens: 8192 } } as PerfReport, peer)).toEqual([]);
  });
});

describe('decode modes and the peer matrices', () => {
  it('xkv gets full reconstruction (+ its own paths); others their attend', async () => {
    const cache = await syntheticLlamaCache({ T: 64, layers: 4, layout: { nLayers: 4, nHeads: 4, nKvHeads: 2, headDim: 16 } });
    const x = await createStrategy({ name: 'xkv', options: { layersPerGroup: 4, rankK: 4, rankV: 4 } }).compress(cache);
    const d = await createStrategy({ name: 'dense' }).compress(cache);
    try {
      const mx = decodeModes(x, { sparseBudget: 32 });
      expect(mx[0].mode).toBe('full');
      const md = decodeModes(d, { sparseBudget: 32 });
      expect(md.map((m) => m.mode)).toEqual(['attend']);
      const q = tf.randomNormal([1, 4, 16]) as tf.Tensor3D;
      for (const m of [...mx, ...md]) {
        const o = m.step(3, q);
        expect(o.shape).toEqual([1, 4, 16]);
        o.dispose();
      }
      q.dispose();
      // Raw float32 group matrices + meta.json, as the PyTorch peer reads them.
      const dir = mkdtempSync(join(tmpdir(), 'kvpack-peer-'));
      await writeGroupMatrices(cache, dir);
      const meta = JSON.parse(readFileSync(join(dir, 'meta.json'), 'utf8'));
      expect(meta).toMatchObject({ T: 64, F: 128, group_layers: 4, kv_heads: 2, head_dim: 16 });
      const xk = new Float32Array(readFileSync(join(dir, 'xk.f32')).buffer.slice(0));
      expect(xk.length).toBe(64 * 128);
      // row 5, layer 2's KV head 1, channel 3 = keys[2][5, 1, 3]
      const k2 = (await cache.keys[2].data()) as Float32Array;
      expect(xk[5 * 128 + 2 * 32 + 1 * 16 + 3]).toBe(k2[(5 * 2 + 1) * 16 + 3]);
    } finally {
      x.dispose();
      d.dispose();
      tf.dispose([...cache.keys, ...cache.values]);
    }
  });
});

describe('kvpack bench perf / structure (CLI)', () => {
  it('bad options exit 2 with the option named; --help exits 0', async () => {
    const cap = (): CommandIO & { stderr: string } => {
      const o = { stderr: '', out: () => {}, err: (t: string) => void (o.stderr += `${t}\n`) };
      return o;
    };
    const a = cap();
    expect(await runCli(['bench', 'perf', '--tokens', '4096,abc'], a)).toBe(2);
    expect(a.stderr).toMatch(/"abc" is not a positive integer/);
    const b = cap();
    expect(await runCli(['bench', 'perf', '--strategies', 'xkv,foo'], b)).toBe(2);
    expect(b.stderr).toMatch(/unknown perf strategy "foo"/);
    expect(await runCli(['bench', 'perf', '--reps', '0', '--tokens', '64', '--strategies', 'dense'], cap())).toBe(2);
  });

  it('perfCommand writes perf.json and perf.md', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvpack-perf-'));
    const { c, io: pio } = io();
    const { report } = await perfCommand({ backend: 'wasm', tokens: '128', strategies: 'dense', layers: '1', reps: '1', checks: false, out: dir }, pio);
    const json = JSON.parse(readFileSync(join(dir, 'perf.json'), 'utf8')) as PerfReport;
    expect(json.format).toBe('kvpack-perf/1');
    expect(json.rows.map((x) => x.setting)).toEqual(['dense fp16', 'dense fp32']);
    expect(json.environment.backend).toBe('wasm');
    expect(readFileSync(join(dir, 'perf.md'), 'utf8')).toContain('| dense fp16 | 128 |');
    expect(c.out).toContain('| dense fp16 | 128 |');
    expect(report.rows[0].compress!.samplesMs).toHaveLength(1);
    expect(summarize(report.rows[0].compress!.samplesMs).medianMs).toBe(report.rows[0].compress!.medianMs);
  });
});
