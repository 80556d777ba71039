import type { PerfSuiteResult } from './suite.js';
import type { PerfRow } from './suite-types.js';
import { fmtBytes, fmtMs, type RatioCheck } from './stats.js';

/** Where and how a perf run ran. */
export interface PerfEnvironment {
  backend: string;
  backendLine: string;
  node: string;
  platform: string;
  arch: string;
  cpus: number;
  cpuModel?: string;
  date: string;
  quick: boolean;
  kvpackVersion: string;
}

/** The JSON a perf run writes (`kvpack-perf/1`). */
export interface PerfReport extends PerfSuiteResult {
  format: 'kvpack-perf/1';
  environment: PerfEnvironment;
  /** Results of the PyTorch peer (scripts/gpu/xkv_torch.py), when run alongside. */
  peer?: unknown;
}

const x = (v: number | null | undefined, digits = 2) => (v === null || v === undefined || !Number.isFinite(v) ? '–' : `${v.toFixed(digits)}×`);

/**
 * The perf report as Markdown: environment, settings (with the published configurations they
 * follow), the baselines measured in the run, one table row per setting × T × decode mode, and the
 * target-check lines.
 */
export function perfMarkdown(r: PerfReport): string {
  const e = r.environment;
  const out: string[] = [];
  out.push(`# kvpack perf — ${e.date.slice(0, 10)}`);
  out.push('');
  out.push(
    `${e.backendLine}; Node ${e.node} on ${e.platform}/${e.arch}, ${e.cpus} CPU core(s)${e.cpuModel ? ` (${e.cpuModel})` : ''}` +
      `${e.quick ? '; --quick' : ''}. Cache: ${r.source}, Llama-3.1-8B layout (${r.layout.nHeads} query heads, ` +
      `${r.layout.nKvHeads} KV heads × ${r.layout.headDim}), ${r.layers} layer(s) per cache. Every time is the median of ${r.reps} run(s) after ${r.warmup} warm-up run(s).`,
  );
  out.push('');
  out.push('Settings (Llama-3.1-8B configurations of the xKV paper and the baselines):');
  out.push('');
  for (const s of r.settings) out.push(`- **${s.label}** — \`${s.name} ${JSON.stringify(s.options)}\`: ${s.paper}`);
  out.push('');
  out.push('Baselines measured in the same run (one layer = one query token over T tokens; floors are plain products):');
  out.push('');
  out.push('| T | dense attention, 1 layer: core attention / attention-ready layout | matmul floors X·Ω / Qᵀ·X |');
  out.push('| --- | --- | --- |');
  for (const b of r.baselines) {
    const fl = b.floors.map((f) => `[${f.tokens}×${f.features}] r=${f.rank}: ${fmtMs(f.xOmega.medianMs)} / ${fmtMs(f.qtX.medianMs)}`).join('; ');
    out.push(`| ${b.tokens} | ${fmtMs(b.denseAttention.medianMs)} / ${fmtMs(b.denseReady.medianMs)} | ${fl || '–'} |`);
  }
  out.push('');
  out.push(
    '| strategy | T | compress (all layers) | per layer | × matmul floor | reconstruct K / V (1 layer) | decode mode | decode step (1 layer) | × dense attn (× core attn) | bytes | ratio (paper) | resident tensors: after compress / after decode | resident ÷ stored: compress / step peak / after | peak: compress / step |',
  );
  out.push('| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |');
  for (const row of r.rows) {
    if (row.error) {
      out.push(`| ${row.setting} | ${row.tokens} | failed: ${row.error.replace(/\|/g, '\\|')} | | | | | | | | | | | |`);
      continue;
    }
    const modes = row.decode.length ? row.decode : [null];
    modes.forEach((d, i) => {
      const first = i === 0;
      out.push(
        `| ${first ? row.setting : ''} | ${row.tokens} | ${first ? fmtMs(row.compress!.medianMs) : ''} | ${first ? fmtMs(row.compressPerLayerMs!) : ''} | ` +
          `${first ? x(row.compressVsFloor) : ''} | ${first ? `${fmtMs(row.reconstructKeys!.medianMs)} / ${fmtMs(row.reconstructValues!.medianMs)}` : ''} | ` +
          `${d ? d.label : '–'} | ${d ? fmtMs(d.timing.medianMs) : '–'} | ${d ? `${x(d.vsDense)} (${x(d.vsCoreAttention)})` : '–'} | ` +
          `${first ? fmtBytes(row.bytes) : ''} | ${first ? `${row.ratio.toFixed(2)}×${row.paperRatio !== null ? ` (${row.paperRatio.toFixed(2)}×)` : ''}` : ''} | ` +
          `${first ? `${fmtBytes(row.residentBytes)} / ${fmtBytes(row.residentAfterDecodeBytes)}` : ''} | ` +
          `${first ? residentRatios(row, d) : d ? `– / ${((row.residentBytes + d.peakBytes) / row.bytes).toFixed(2)} / –` : ''} | ` +
          `${first ? fmtBytes(row.compressPeakBytes) : ''} / ${d ? fmtBytes(d.peakBytes) : '–'} |`,
      );
    });
  }
  out.push('');
  out.push(
    '× dense attn: decode step / the faster of the two dense steps at the same T (in parentheses: / core attention). ' +
      'bytes: what the compressed cache holds (`byteSize()`, 16-bit values counted as 2 bytes; ratio = fp16 dense bytes / bytes). ' +
      'resident tensors: tensor bytes the compressed cache keeps on the backend right after compression, and after the decode steps (plus what it derived for decoding); float32 working copies of 16-bit data count 4 bytes. ' +
      'resident ÷ stored: those bytes over `byteSize()` — after compression, at the peak of a decode step (the cache plus the step\'s transient working set: reconstructed or dequantized tensors, scores), and after the steps; 1.00 means the backend holds exactly the stored form. ' +
      'Shared device RoPE tables (one per position range, used by every cache and layer, like the model weights) are excluded from the resident figures; their size after the steps is listed below the table. ' +
      'peak: highest tfjs tensor bytes during one compression (above the uncompressed cache) and during one decode step; every strategy compresses on the backend (host arrays would not be counted).',
  );
  const rope = Math.max(0, ...r.rows.map((x) => x.sharedRopeBytes ?? 0));
  if (rope > 0) out.push('', `Shared device RoPE tables after the decode steps: ${fmtBytes(rope)}.`);
  out.push('');
  out.push(...checkLines(r.checks, r.unavailable));
  return out.join('\n');
}

/** The target-check lines: PASS/FAIL with ratio, or why a check could not run. */
export function checkLines(checks: RatioCheck[], unavailable: { label: string; reason: string }[] = []): string[] {
  if (!checks.length && !unavailable.length) return [];
  return ['Target checks (computed in this run):', '', ...checks.map((c) => `- ${c.line}${c.note ? ` — ${c.note}` : ''}`), ...unavailable.map((u) => `- N/A ${u.label}: ${u.reason}`)];
}

/** "compress / step peak / after" resident ÷ stored ratios of a row (the first decode mode's step peak). */
function residentRatios(row: PerfRow, d: PerfRow['decode'][number] | null): string {
  const r = (b: number) => (b / row.bytes).toFixed(2);
  return `${r(row.residentBytes)} / ${d ? r(row.residentBytes + d.peakBytes) : '–'} / ${r(row.residentAfterDecodeBytes)}`;
}
