import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import type { KVCache } from '@kvpack/core';
import type { PerfReport } from './report.js';
import { ratioCheck, type RatioCheck } from './stats.js';
import { compressCheckLabel } from './suite.js';

/** Result file of the PyTorch peer (scripts/gpu/xkv_torch.py --json). */
export interface PeerResult {
  format: 'kvpack-peer/1';
  torch: string;
  device: string;
  T: number;
  F: number;
  rank: number;
  matrices: {
    name: string;
    svd_lowrank: Record<string, { median_ms: number }>;
    rel_err: Record<string, number>;
    xkv_compress: { median_ms: number };
    /** Relative Frobenius error of the exact truncated SVD at `rank` (float64 eigenvalues of XᵀX). */
    exact_rel_err?: number;
  }[];
  /** The four products of a rank-r range finder with one power iteration (X·Ω, Xᵀ·Q, X·Z, Qᵀ·X), summed over K and V (ms). */
  range_finder_products_kv_ms?: number;
  /** Baseline compressions of the group's layers in PyTorch, by kvpack perf setting label. */
  baselines?: Record<string, { median_ms: number }>;
  svd_lowrank_kv_ms: Record<string, number>;
  xkv_compress_kv_ms: number;
  group_layers?: number;
  reconstruct_keys: { median_ms: number };
  reconstruct_values: { median_ms: number };
  dense_attention: { median_ms: number };
}

/** Writes a group's pre-RoPE keys and values [T, G·H_kv·d] as raw little-endian float32 + meta.json for the peer. */
export async function writeGroupMatrices(cache: KVCache, dir: string): Promise<void> {
  mkdirSync(dir, { recursive: true });
  const T = cache.keys[0].shape[0];
  const { nKvHeads, headDim } = cache.layout;
  const G = cache.keys.length;
  const F = G * nKvHeads * headDim;
  const out: { name: string; file: string }[] = [];
  for (const [name, xs] of [
    ['xk', cache.keys],
    ['xv', cache.values],
  ] as const) {
    const X = tf.tidy(() => tf.concat(xs.map((x) => tf.reshape(x, [T, nKvHeads * headDim])), 1));
    const data = (await X.data()) as Float32Array;
    X.dispose();
    writeFileSync(join(dir, `${name}.f32`), new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
    out.push({ name, file: `${name}.f32` });
  }
  // The observation-window queries (post-RoPE [w, H, d] per layer), when the cache carries them (SnapKV's peer reads them).
  const queries: { layer: number; file: string; shape: number[] }[] = [];
  for (const [l, q] of (cache.queries ?? []).entries()) {
    const data = (await q.data()) as Float32Array;
    writeFileSync(join(dir, `q${l}.f32`), new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
    queries.push({ layer: l, file: `q${l}.f32`, shape: q.shape });
  }
  const meta = { T, F, group_layers: G, kv_heads: nKvHeads, n_heads: cache.layout.nHeads, head_dim: headDim, dtype: 'float32', matrices: out, queries };
  writeFileSync(join(dir, 'meta.json'), `${JSON.stringify(meta, null, 2)}\n`);
}

/**
 * The GPU targets against the PyTorch peer run on the same matrices in the same run:
 * - xkv compression of the G = 4 group (K+V) within 2× of the four range-finder products timed in
 *   PyTorch (the fp32 matmul floor);
 * - its relative error within 2% of the exact truncated SVD's at the same rank (per matrix);
 * - each baseline compression (KIVI, MiniCache, SnapKV) of the same layers within 3× of its PyTorch peer.
 */
export function peerChecks(report: PerfReport, peer: PeerResult): RatioCheck[] {
  const d = report.compressDetail;
  if (!d || d.tokens !== peer.T || d.features !== peer.F || d.rank !== peer.rank) return [];
  const out: RatioCheck[] = [];
  const where = `torch ${peer.torch}, ${peer.device}, same matrices, same run`;
  if (peer.range_finder_products_kv_ms && peer.range_finder_products_kv_ms > 0)
    out.push(
      ratioCheck(
        `${compressCheckLabel(report.environment.backend, d.tokens, d.features, d.rank)} vs the fp32 matmul floor`,
        d.compressMs,
        peer.range_finder_products_kv_ms,
        2,
        'the four range-finder products X·Ω, Xᵀ·Q, X·Z, Qᵀ·X of K and V in PyTorch',
        where,
      ),
    );
  for (const m of peer.matrices) {
    const ours = d.relErr[m.name as 'xk' | 'xv'];
    if (m.exact_rel_err === undefined || ours === undefined || !(m.exact_rel_err > 0)) continue;
    out.push(
      ratioCheck(
        `relative error of the ${m.name === 'xk' ? 'keys' : 'values'} group (${m.name}) at rank ${d.rank}`,
        ours,
        m.exact_rel_err,
        1.02,
        'the exact truncated SVD at the same rank',
        `${ours.toFixed(5)} vs ${m.exact_rel_err.toFixed(5)} (float64 eigenvalues of XᵀX)`,
        'ratio',
      ),
    );
  }
  for (const [label, ms] of Object.entries(d.baselineMs)) {
    const p = peer.baselines?.[label];
    if (!p || !(p.median_ms > 0)) continue;
    const k = d.baselineKernels?.[label];
    const kernels = k ? `; ${k.dispatches} GPU kernels and ${k.readbacks} readbacks per compress` : '';
    out.push(ratioCheck(`${report.environment.backend}: ${label} compress, ${peer.group_layers ?? 4} layers [${d.tokens}]`, ms, p.median_ms, 3, 'its PyTorch peer', `${where}${kernels}`));
  }
  return out;
}

/**
 * The GPU target: our compression of one G = 4 group (keys and values, rank 512) against
 * torch.svd_lowrank(q = 512, niter = 2) of the same two matrices, from the same run.
 */
export function peerCheck(report: PerfReport, peer: PeerResult): RatioCheck | null {
  const label = compressCheckLabel(report.environment.backend, peer.T, peer.F, peer.rank);
  const ours = report.checks.find((c) => c.label === label);
  const torchMs = peer.svd_lowrank_kv_ms['2'];
  if (!ours || !(torchMs > 0)) return null;
  return ratioCheck(
    `${label} vs PyTorch`,
    ours.valueMs,
    torchMs,
    2,
    `torch.svd_lowrank(q=${peer.rank}, niter=2) of the same two matrices (torch ${peer.torch}, ${peer.device})`,
    `PyTorch xKV compress (svd_lowrank niter 2 + fp16 factors) of K+V: ${peer.xkv_compress_kv_ms.toFixed(1)} ms`,
  );
}

