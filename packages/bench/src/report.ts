import { compressionRatioOf } from '@kvpack/core';
import type { BenchRunResult, PromptReference, SettingResult } from './runner.js';

/** Where and how a run happened. */
export interface BenchEnvironment {
  backend: string;
  /** describeBackend line, with skipped backends. */
  backendLine: string;
  node: string;
  platform: string;
  arch: string;
  cpus: number;
  /** ISO date of the run. */
  date: string;
  kvpackVersion: string;
  quick: boolean;
}

/** The JSON report `kvpack bench` writes (also the baseline format). */
export interface BenchReport {
  /** Format version of this file. */
  format: 'kvpack-bench/1';
  title?: string;
  environment: BenchEnvironment;
  /** The config file and its parsed content. */
  config: { source: string; data: unknown };
  model: { path: string; tokenizer?: string; layout: BenchRunResult['layout'] };
  /** Run parameters after --quick. */
  run: { decodeTokens: number; repeats: number; prompts: number };
  /** What the reconstruction errors compare. */
  errorBasis: string;
  references: PromptReference[];
  results: SettingResult[];
}

/** The sentence every report carries about the error basis. */
export const ERROR_BASIS =
  'keys: post-RoPE reconstructed keys vs RoPE applied to the original pre-RoPE keys; values: reconstructed vs original; ' +
  'relative Frobenius error sqrt(Σ‖X − X̂‖² / Σ‖X‖²) pooled over layers and prompts; N/A when tokens were evicted';

function num(x: number | null | undefined, digits: number): string {
  if (x === null || x === undefined || Number.isNaN(x)) return 'N/A';
  return x.toFixed(digits);
}

function signed(x: number, digits: number): string {
  const s = x.toFixed(digits);
  return x >= 0 && !s.startsWith('-') ? `+${s}` : s;
}

/** Renders rows as a Markdown table with padded columns. Cells must not contain `|` (escaped if they do). */
export function markdownTable(header: string[], rows: string[][], align: ('l' | 'r')[] = []): string {
  const esc = (c: string) => c.replace(/\|/g, '\\|');
  const all = [header, ...rows].map((r) => r.map(esc));
  const w = header.map((_, j) => Math.max(3, ...all.map((r) => (r[j] ?? '').length)));
  const line = (r: string[]) => `| ${r.map((c, j) => (align[j] === 'r' ? c.padStart(w[j]) : c.padEnd(w[j]))).join(' | ')} |`;
  const sep = `| ${w.map((n, j) => (align[j] === 'r' ? `${'-'.repeat(n - 1)}:` : '-'.repeat(n))).join(' | ')} |`;
  return [line(all[0]), sep, ...all.slice(1).map(line)].join('\n');
}

/** The results table: one row per setting. */
export function resultsTable(results: SettingResult[]): string {
  // A target column only when some setting was configured by a target ratio.
  const targets = results.some((r) => r.targetRatio !== null && r.targetRatio !== undefined);
  const header = ['setting', ...(targets ? ['target'] : []), 'ratio', 'cr', 'paper ratio', 'key err', 'value err', 'NLL', 'ΔNLL', 'top-1', 'greedy', 'first div', 'compress ms'];
  const rows = results.map((r) => r.error !== undefined ? [r.label, ...(targets ? [r.targetRatio ? `${num(r.targetRatio, 2)}×` : '–'] : []), 'error', ...Array(header.length - 2 - (targets ? 1 : 0)).fill('')] : [
    r.label,
    ...(targets ? [r.targetRatio ? `${num(r.targetRatio, 2)}×` : '–'] : []),
    `${num(r.ratio, 2)}×`,
    num(compressionRatioOf(r.ratio), 3),
    r.paperRatio === null ? '–' : `${num(r.paperRatio, 2)}×`,
    num(r.keyError, 4),
    num(r.valueError, 4),
    num(r.nll, 4),
    signed(r.deltaNll, 4),
    num(r.top1Agreement, 3),
    r.agreement === null ? '–' : num(r.agreement, 3),
    r.agreement === null ? '–' : r.firstDivergence === null ? 'none' : String(r.firstDivergence),
    num(r.compressMs, 1),
  ]);
  return markdownTable(header, rows, ['l', ...header.slice(1).map(() => 'r' as const)]);
}

/** Near-tie threshold (logits) for the greedy-fragility note. */
export const NEAR_TIE = 0.1;

/** Notes on reference greedy runs with a near-tie (top-2 logit gap < {@link NEAR_TIE}). */
export function nearTieNotes(refs: PromptReference[]): string[] {
  return refs.flatMap((r) => {
    const i = r.greedyMargins.findIndex((m) => m < NEAR_TIE);
    return i < 0
      ? []
      : [
          `note: prompt "${r.prompt}": the uncompressed greedy run has a near-tie at step ${i} (top-2 logit gap ${r.greedyMargins[i].toFixed(3)}); ` +
            `greedy agreement is fragile from there on — read top-1 alongside.`,
        ];
  });
}

/** The full Markdown report: title, environment line, table and notes. */
export function markdownReport(report: BenchReport): string {
  const e = report.environment;
  const refs = report.references;
  const refNll = refs.reduce((a, r) => a + r.nll * r.continuationTokens, 0) / refs.reduce((a, r) => a + r.continuationTokens, 0);
  const l = report.model.layout;
  return [
    `## ${report.title ?? 'kvpack bench'}`,
    '',
    `${e.backendLine} · node ${e.node} · ${e.date}${e.quick ? ' · --quick' : ''}`,
    `model ${report.model.path} (${l.nLayers} layers, ${l.nHeads} heads, ${l.nKvHeads} KV heads, head_dim ${l.headDim}) · ` +
      `${refs.length} prompt(s), ${refs.map((r) => r.contextTokens - 1).join('/')} prefill tokens, ` +
      `${refs.map((r) => r.continuationTokens).join('/')} held-out tokens, ${report.run.decodeTokens} greedy tokens · ` +
      `uncompressed NLL ${refNll.toFixed(4)}`,
    '',
    resultsTable(report.results),
    '',
    ...report.results.filter((r) => r.error !== undefined).map((r) => `**${r.label} failed:** ${r.error}\n`),
    `ratio: fp16 dense bytes / bytes held (measured); cr: the same as kvpress's compression_ratio, the fraction removed (1 − 1/ratio)` +
      `${report.results.some((r) => r.targetRatio) ? '; target: the ratio the setting asked for (its knob resolved so the measured ratio reaches it)' : ''}; paper ratio: the strategy's own formula. ` +
      `key/value err: ${ERROR_BASIS}. ΔNLL: continuation NLL (nats/token) with the compressed cache minus the uncompressed forward pass. ` +
      `top-1: fraction of held-out positions (teacher-forced) whose argmax matches the uncompressed pass. ` +
      `greedy: fraction of ${report.run.decodeTokens} free-running greedy tokens equal to the uncompressed run's; first div: first differing index. ` +
      `compress ms: median of ${report.run.repeats} run(s).`,
    ...nearTieNotes(refs).flatMap((n) => ['', n]),
  ].join('\n');
}

