import { KvpackError } from '@kvpack/core';
// The suite's settings name strategies of both packages: importing them registers those strategies.
import '@kvpack/xkv';
import '@kvpack/baselines';
import { resolveStrategy, type ResolvedStrategy } from '../strategy.js';

/** One strategy configuration of the perf suite. */
export interface PerfSetting {
  /** Short label for tables, e.g. "xkv G=4 r=512/768". */
  label: string;
  /** Registered strategy name. */
  name: string;
  /** Strategy options (validated by the strategy's schema). */
  options: Record<string, unknown>;
  /** The published configuration these settings reproduce, for the reader's comparison. */
  paper: string;
}

/**
 * The suite's settings on a Llama-3.1-8B-shaped cache, taken from the configurations the xKV
 * authors evaluate on Llama-3.1-8B-Instruct (abdelfattah-lab/xKV README, "Evaluation on RULER"):
 * xKV-4 with group ranks 512 (keys) and 768 (values) — per-layer ranks 128 / 192 of H_kv·d = 1024
 * — and Single SVD at the same per-layer ranks; MiniCache on the upper half of the layers; KIVI at
 * 2 bits (jy-yuan/KIVI defaults: group 32, residual 128); SnapKV and StreamingLLM with a 2,048-token
 * budget (the sparse-decode budget of xKV's ShadowKV-style follow-up). xKV appears twice: with its
 * default full decode and compressed with `decode: 'sparse'` (which also stores chunk landmarks and
 * exact outlier/local tokens, so its bytes differ).
 */
export const PERF_SETTINGS: readonly PerfSetting[] = [
  { label: 'dense fp16', name: 'dense', options: { storage: 'float16' }, paper: 'uncompressed fp16 KV cache (ratio 1), held packed two halves per 32-bit element' },
  { label: 'dense fp32', name: 'dense', options: { storage: 'float32' }, paper: 'uncompressed float32 KV cache (ratio 0.5): what a tfjs runner without packed fp16 holds' },
  {
    label: 'xkv G=4 r=512/768',
    name: 'xkv',
    options: { layersPerGroup: 4, rankK: 128, rankV: 192 },
    paper: 'xKV-4 on Llama-3.1-8B: --layer_group_size 4 --rank_k 512 --rank_v 768 (xKV README)',
  },
  {
    label: 'xkv G=4 r=512/768 sparse 2048',
    name: 'xkv',
    options: { layersPerGroup: 4, rankK: 128, rankV: 192, decode: 'sparse', sparse: { budget: 2048 } },
    paper: 'xKV-4 as above, decoded sparsely (xKV-SR after ShadowKV: 8-token chunk landmarks, 2,048-token budget, 48 outlier chunks, 32 local tokens)',
  },
  {
    label: 'svd r=128/192',
    name: 'svd',
    options: { rankK: 128, rankV: 192 },
    paper: 'Single SVD: --layer_group_size 1 --rank_k 128 --rank_v 192 (xKV README)',
  },
  {
    label: 'kivi 2-bit',
    name: 'kivi',
    options: { bits: 2, quantGroupSize: 32, residualLength: 128 },
    paper: 'KIVI-2: group 32, residual 128 (Liu et al. 2024)',
  },
  {
    label: 'minicache',
    name: 'minicache',
    options: { t: 0.6, gamma: 0.05 },
    paper: 'MiniCache from mid-depth (xKV README: layers 16–31), t = 0.6, γ = 0.05',
  },
  { label: 'snapkv 2048', name: 'snapkv', options: { budget: 2048, window: 32 }, paper: 'SnapKV, budget 2,048 incl. window 32' },
  { label: 'streamingllm 2048', name: 'streamingllm', options: { sinks: 4, budget: 2048 }, paper: 'StreamingLLM, 4 sinks + recent, budget 2,048' },
];

/** Names accepted by `--strategies`: the registered names of {@link PERF_SETTINGS} (`xkv` selects both xkv rows). */
export const PERF_STRATEGY_NAMES: readonly string[] = [...new Set(PERF_SETTINGS.map((s) => s.name))];

/** A perf setting with its options resolved by the strategy's schema. */
export type ResolvedPerfSetting = PerfSetting & ResolvedStrategy;

/** The setting with its options resolved (once: a setting already resolved is returned as is). */
export function resolvedSetting(s: PerfSetting & Partial<ResolvedStrategy>): ResolvedPerfSetting {
  return s.resolvedOptions ? (s as ResolvedPerfSetting) : { ...s, ...resolveStrategy(s.name, s.options) };
}

/**
 * A copy of settings with the sparse-decode budget replaced (settings whose options have `sparse`).
 */
export function withSparseBudget(settings: PerfSetting[], budget: number): PerfSetting[] {
  return settings.map((s) => {
    const sp = s.options.sparse as Record<string, unknown> | undefined;
    if (!sp || sp.budget === budget) return s;
    return { ...s, label: s.label.replace(/sparse \d+/, `sparse ${budget}`), options: { ...s.options, sparse: { ...sp, budget } } };
  });
}

/**
 * The settings named in a comma-separated list (default all), in the suite's order.
 * @throws KvpackError('config') naming an unknown name and listing the known ones.
 */
export function selectSettings(list?: string | string[]): PerfSetting[] {
  if (list === undefined) return [...PERF_SETTINGS];
  const names = (Array.isArray(list) ? list : list.split(','))
    .map((s) => s.trim())
    .filter(Boolean);
  if (names.length === 0) throw new KvpackError('config', `--strategies is empty; choose from ${PERF_STRATEGY_NAMES.join(', ')}`);
  for (const n of names)
    if (!PERF_STRATEGY_NAMES.includes(n)) throw new KvpackError('config', `unknown perf strategy "${n}"; choose from ${PERF_STRATEGY_NAMES.join(', ')}`);
  return PERF_SETTINGS.filter((s) => names.includes(s.name));
}

/**
 * Parses a comma-separated token list such as "4096,8192" or "4K,32K" (K = 1,024).
 * @throws KvpackError('config') for anything but positive integers.
 */
export function parseTokenList(text: string): number[] {
  const out = text
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean)
    .map((s) => {
      const m = /^(\d+)([kK])?$/.exec(s);
      if (!m) throw new KvpackError('config', `--tokens: "${s}" is not a positive integer (e.g. 4096 or 4K)`);
      const v = Number(m[1]) * (m[2] ? 1024 : 1);
      if (!(v >= 1)) throw new KvpackError('config', `--tokens: "${s}" must be ≥ 1`);
      return v;
    });
  if (out.length === 0) throw new KvpackError('config', '--tokens is empty');
  return out;
}
