import { compressionRatioOf, getStrategyDefinition } from '@kvpack/core';
import type { PlotPanel } from '../plot.js';
import { markdownTable, type BenchEnvironment } from '../report.js';
import type { AccuracyReference, AccuracyRunResult, AccuracySettingResult, QueryMode } from './runner.js';

/** The JSON report `kvpack bench accuracy` writes. */
export interface AccuracyReport {
  format: 'kvpack-accuracy/1';
  title?: string;
  environment: BenchEnvironment;
  config: { source: string; data: unknown };
  model: { path: string; tokenizer?: string; layout: AccuracyRunResult['layout'] };
  eval: { path: string; tasks: string[]; examples: number; available: Record<string, number> };
  run: {
    lastToken: 'decode' | 'prefill';
    /** Query modes run, in order (results carry theirs). */
    queryModes?: QueryMode[];
    attentionQueries: number;
    /** Prefill tokens per example, min and max. */
    prefillTokens: { min: number; max: number; mean: number };
  };
  /** The uncompressed model (dense float32 cache, same decode path). */
  reference: AccuracyReference;
  /** The uncompressed reference per query mode, when several ran (`reference` is the first mode's). */
  references?: Partial<Record<QueryMode, AccuracyReference>>;
  results: AccuracySettingResult[];
  /** Notes printed under the table (config notes and automatic ones). */
  notes: string[];
}

function fmt(x: number | null | undefined, digits: number): string {
  if (x === null || x === undefined || !Number.isFinite(x)) return 'N/A';
  return x.toFixed(digits);
}

function attnCell(x: number | null): string {
  if (x === null || !Number.isFinite(x)) return '–';
  return x === 0 ? '0' : x < 1e-3 ? x.toExponential(1) : x.toFixed(4);
}

/**
 * The accuracy table: one row per setting (the uncompressed reference first) with the measured
 * compression ratio, exact-match accuracy per task (and their mean when there are several), the
 * fraction of answers equal to the uncompressed model's, the attention-output error and the
 * compress time.
 */
export function accuracyTable(reference: AccuracyReference, results: AccuracySettingResult[]): string {
  const tasks = reference.accuracy.tasks.map((t) => t.task);
  const many = tasks.length > 1;
  const header = ['setting', 'ratio', 'cr', ...tasks, ...(many ? ['mean'] : []), 'agree', 'attn err', 'compress ms', 'resident ÷ stored'];
  const acc = (r: { accuracy: AccuracyReference['accuracy'] }) => [
    ...tasks.map((t) => {
      const a = r.accuracy.tasks.find((x) => x.task === t);
      return a && a.total ? `${fmt(a.accuracy, 2)} (${a.correct}/${a.total})` : 'N/A';
    }),
    ...(many ? [fmt(r.accuracy.mean, 3)] : []),
  ];
  const rows: string[][] = [['uncompressed (float32)', '–', ...acc(reference), '1.00', '0', '–', '–']];
  for (const r of results) {
    if (r.error !== undefined) {
      rows.push([r.label, 'error', ...Array(header.length - 2).fill('')]);
      continue;
    }
    const res = r.resident ? `${fmt(r.resident.afterCompress, 2)} / ${fmt(r.resident.peakDecode, 2)} / ${fmt(r.resident.afterDecode, 2)}` : '–';
    rows.push([r.label, `${fmt(r.ratio, 2)}×`, fmt(compressionRatioOf(r.ratio), 3), ...acc(r), fmt(r.agreement, 2), attnCell(r.attentionError), fmt(r.compressMs, 0), res]);
  }
  return markdownTable(header, rows, ['l', ...header.slice(1).map(() => 'r' as const)]);
}

/**
 * Automatic notes: settings whose strategy declares layers it leaves uncompressed (capability
 * `exactLayers`, e.g. MiniCache below its start layer), which a model retrieving in those layers
 * cannot expose.
 */
export function automaticNotes(results: AccuracySettingResult[], nLayers: number): string[] {
  const partial = results.flatMap((r) => {
    if (r.error !== undefined) return [];
    const exact = getStrategyDefinition(r.name).capabilities?.exactLayers?.(r.resolvedOptions, nLayers) ?? [];
    return exact.length ? [{ label: r.label, exact }] : [];
  });
  if (!partial.length) return [];
  const spans = partial.map((p) => `"${p.label}" (${p.exact.length} of ${nLayers}: ${layerSpan(p.exact)})`).join(', ');
  return [
    `Some settings leave layers uncompressed: ${spans}. On a model whose retrieval happens in those layers such a setting looks lossless; ` +
      'compare it with a setting that compresses every layer.',
  ];
}

/** "0–5, 11" for sorted layer indices. */
function layerSpan(layers: number[]): string {
  const parts: string[] = [];
  for (let i = 0; i < layers.length; ) {
    let j = i;
    while (j + 1 < layers.length && layers[j + 1] === layers[j] + 1) j++;
    parts.push(i === j ? `${layers[i]}` : `${layers[i]}–${layers[j]}`);
    i = j + 1;
  }
  return parts.join(', ');
}

/** What was compressed and how the answer started, per query mode. */
function protocolText(run: AccuracyReport['run']): string {
  const last = `last prompt token ${run.lastToken === 'decode' ? 'decoded through the compressed cache' : 'in the exact prefill'}`;
  const modes = run.queryModes ?? ['aware'];
  return modes
    .map((m) =>
      m === 'agnostic'
        ? 'query-agnostic: the context compressed alone, the question prefilled through the compressed cache'
        : modes.length > 1
          ? `query-aware: the question compressed with the context, ${last}`
          : last,
    )
    .join('; ');
}

/** The full Markdown report: title, environment, table, legend and notes. */
export function accuracyMarkdown(report: AccuracyReport): string {
  const e = report.environment;
  const l = report.model.layout;
  const p = report.run.prefillTokens;
  return [
    `## ${report.title ?? 'kvpack bench accuracy'}`,
    '',
    `${e.backendLine} · node ${e.node} · ${e.date}`,
    `model ${report.model.path} (${l.nLayers} layers, ${l.nHeads} heads, ${l.nKvHeads} KV heads, head_dim ${l.headDim}) · ` +
      `eval ${report.eval.path}: ${report.eval.examples} example(s) of ${report.eval.tasks.join(', ')} · ` +
      `${p.min === p.max ? p.min : `${p.min}–${p.max}`} prefill tokens · ${protocolText(report.run)}`,
    '',
    accuracyTable(report.reference, report.results),
    '',
    ...report.results.filter((r) => r.error !== undefined).map((r) => `**${r.label} failed:** ${r.error}\n`),
    `ratio: fp16 dense bytes / bytes the compressed prefill holds (measured, Σ over examples); cr: kvpress's compression_ratio, the fraction removed (1 − 1/ratio). ` +
      `resident ÷ stored: tensor bytes the compressed cache holds on the backend over its byteSize(), after compress / at the peak of answering (with the decode steps' transient working set) / after answering; the largest over the examples. ` +
      `Task columns: exact-match accuracy — the greedy answer (len(answer_ids) tokens, or up to a stop id) equals answer_ids token for token. ` +
      `agree: fraction of answers identical to the uncompressed model's. ` +
      (report.run.attentionQueries > 0
        ? `attn err: attention-output error ‖softmax(qKᵀ/√d)V − same over the compressed cache‖ / ‖exact‖ with the model's post-RoPE queries of the prompt's last ${report.run.attentionQueries} tokens (causal), pooled over layers and examples as sqrt(Σ‖ΔO‖² / Σ‖O‖²). `
        : 'attn err: skipped (attentionQueries 0). ') +
      `compress ms: mean time of one compress call.`,
    ...report.notes.flatMap((n) => ['', `note: ${n}`]),
  ].join('\n');
}

/**
 * Plot panels for {@link renderRatioPlot}: exact-match accuracy against the measured compression
 * ratio, one panel per task, one line per series (strategy); and, when measured, the
 * attention-output error (log scale).
 */
export function accuracyPanels(report: Pick<AccuracyReport, 'reference' | 'results'>): PlotPanel[] {
  const ok = report.results.filter((r) => r.error === undefined);
  const panels: PlotPanel[] = report.reference.accuracy.tasks.map((t) => ({
    title: `${t.task}: exact-match accuracy (uncompressed ${fmt(t.accuracy, 2)})`,
    yTitle: 'accuracy',
    points: ok.flatMap((r) => {
      const a = r.accuracy.tasks.find((x) => x.task === t.task);
      return a && a.total ? [{ ratio: r.ratio, value: a.accuracy, series: r.series, label: r.label }] : [];
    }),
  }));
  const attn = ok.filter((r) => r.attentionError !== null && r.attentionError > 0);
  if (attn.length)
    panels.push({
      title: 'attention-output error',
      yTitle: 'relative error (log)',
      yScale: 'log',
      points: attn.map((r) => ({ ratio: r.ratio, value: r.attentionError as number, series: r.series, label: r.label })),
    });
  return panels;
}
