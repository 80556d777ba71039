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
  matrices: { name: string; svd_lowrank: Record<string, { median_ms: number }>; rel_err: Record<string, number>; xkv_compress: { median_ms: number } }[];
  svd_lowrank_kv_ms: Record<string, number>;
  xkv_compress_kv_ms: number;
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
  writeFileSync(join(dir, 'meta.json'), `${JSON.stringify({ T, F, group_layers: G, kv_heads: nKvHeads, head_dim: headDim, dtype: 'float32', matrices: out }, null, 2)}\n`);
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

