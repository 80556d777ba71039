import { check } from '@kvpack/core';
import type { ResolvedSetting } from './config.js';
import type { BenchTokenizer } from './model.js';
import type { EvalExample } from './accuracy/dataset.js';
import { runAccuracy, type AccuracyModel, type AccuracyRunOptions, type QueryMode } from './accuracy/runner.js';

// Needle-in-a-haystack depth sweep (after kvpress's needle_in_haystack benchmark and RULER's niah):
// a haystack of filler sentences cut to a context length, one needle ("the special magic number for
// KEY is : d d d d d d d .") inserted at a relative depth, and a question at the end; each
// (context length, depth) cell scores exact-match retrieval through the compressed cache.

/** Filler sentences of the default haystack (words every RULER-style vocabulary holds). */
export const DEFAULT_FILLER = [
  'the sun is blue .',
  'the bird is red .',
  'the mother is big .',
  'the queen helps the blue teacher .',
  'the teacher is warm .',
  'the horse is old .',
  'the mother feeds the old cloud .',
  'the cat likes the green baker .',
  'the storm is green .',
  'the cat follows the red boy .',
  'the baker is cold .',
  'the tree is big .',
  'the child is cold .',
];

/** Needle keys of the default sweep. */
export const DEFAULT_KEYS = ['colex', 'mofen', 'gitan', 'ivbim', 'eltan', 'momar'];

/** Options of {@link needlePrompt}. */
export interface NeedlePromptOptions {
  /** Total prompt tokens: BOS + haystack + needle + question. */
  length: number;
  /** Relative depth of the needle in the haystack, 0 (start) … 1 (end). */
  depth: number;
  key: string;
  /** The magic number's digits. */
  value: string;
  /** Filler sentences, cycled from `offset`. Default {@link DEFAULT_FILLER}. */
  filler?: readonly string[];
  /** First filler sentence (varies the haystack between samples). */
  offset?: number;
}

/** A synthesized needle prompt (token ids). */
export interface NeedlePrompt {
  /** BOS (when the tokenizer has one) + haystack with the needle + question. */
  inputIds: number[];
  /** Tokens before the question (the context a query-agnostic run compresses). */
  contextTokens: number;
  answerIds: number[];
  /** Token index where the needle starts. */
  needleStart: number;
  /** Depth reached: needle start within the haystack ÷ haystack tokens (the needle snaps to a sentence boundary). */
  actualDepth: number;
}

/**
 * Builds one needle prompt of exactly `length` tokens with the model's tokenizer: whole filler
 * sentences (each encoded alone, without BOS) up to the room left by BOS, needle and question, the
 * last one cut to fit; the needle goes to the sentence boundary nearest to `depth` × haystack length.
 * @throws KvpackError('config') when the needle and question leave no room for a haystack, or a depth outside [0, 1].
 */
export function needlePrompt(tokenizer: BenchTokenizer, o: NeedlePromptOptions): NeedlePrompt {
  check(o.depth >= 0 && o.depth <= 1, 'config', `needle depth must be in [0, 1], got ${o.depth}`);
  const enc = (t: string) => tokenizer.encode(t, { bos: false });
  const digits = o.value.split('').join(' ');
  const needle = enc(`the special magic number for ${o.key} is : ${digits} .`);
  const question = enc(`what is the special magic number for ${o.key} ? answer :`);
  const answerIds = enc(`${digits} .`);
  const bos = tokenizer.bosId !== undefined ? [tokenizer.bosId] : [];
  const room = o.length - bos.length - needle.length - question.length;
  check(room >= 1, 'config', `a ${o.length}-token needle prompt leaves no room for the haystack (needle ${needle.length} + question ${question.length} tokens)`);
  const filler = o.filler ?? DEFAULT_FILLER;
  check(filler.length > 0, 'config', 'the haystack needs at least one filler sentence');
  const sentences: number[][] = [];
  let used = 0;
  for (let i = o.offset ?? 0; used < room; i++) {
    const s = enc(filler[i % filler.length]);
    check(s.length > 0, 'config', `filler sentence "${filler[i % filler.length]}" encodes to no tokens`);
    sentences.push(s.slice(0, room - used));
    used += Math.min(s.length, room - used);
  }
  // Sentence boundaries (token offsets) before each whole sentence and after the last whole one.
  const bounds = [0];
  for (const s of sentences) bounds.push(bounds[bounds.length - 1] + s.length);
  const whole = sentences[sentences.length - 1].length < enc(filler[((o.offset ?? 0) + sentences.length - 1) % filler.length]).length ? bounds.slice(0, -1) : bounds;
  const target = o.depth * room;
  const at = whole.reduce((b, x) => (Math.abs(x - target) < Math.abs(b - target) ? x : b), whole[0]);
  const hay = sentences.flat();
  const inputIds = [...bos, ...hay.slice(0, at), ...needle, ...hay.slice(at), ...question];
  return { inputIds, contextTokens: inputIds.length - question.length, answerIds, needleStart: bos.length + at, actualDepth: at / room };
}

/** Options of {@link runNeedleSweep}. */
export interface NeedleSweepOptions {
  lengths: number[];
  depths: number[];
  /** Prompts per cell (different keys, values and haystack offsets). Default 1. */
  samples?: number;
  /** Default `agnostic` (the question is not seen at compression, as kvpress's needle benchmark runs). */
  queryMode?: QueryMode;
  filler?: readonly string[];
  keys?: readonly string[];
  /** Seed of the magic numbers. Default 0. */
  seed?: number;
  /** Digits of each magic number (RULER: 7). Default 7. */
  digits?: number;
  onCell?(done: number, total: number): void;
}

/** One (context length, depth) cell. */
export interface NeedleCell {
  length: number;
  depth: number;
  /** Mean depth reached over the samples (sentence-snapped). */
  actualDepth: number;
  /** Exact-match accuracy through the compressed cache. */
  accuracy: number;
  /** Exact-match accuracy of the uncompressed model. */
  reference: number;
  /** Fraction of answers equal to the uncompressed model's. */
  agreement: number;
  /** Measured compression ratio (dense fp16 ÷ held). */
  ratio: number;
}

/** A sweep's results. */
export interface NeedleSweep {
  setting: string;
  queryMode: QueryMode;
  samples: number;
  cells: NeedleCell[];
  /** Set when the strategy rejected a prompt. */
  error?: string;
}

/** Deterministic magic numbers: a 32-bit LCG. */
function digitsOf(seed: number, n: number): string {
  let s = (seed * 2654435761) >>> 0;
  let out = '';
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out += String((s >>> 16) % 10);
  }
  return out;
}

/**
 * Runs the depth × context length sweep of one setting: per cell `samples` prompts
 * ({@link needlePrompt}), each compressed and answered as the accuracy runner does
 * ({@link runAccuracy}: the uncompressed reference and the setting, exact match).
 * @throws KvpackError('config') for bad lengths/depths or prompts the model cannot take.
 */
export async function runNeedleSweep(
  model: AccuracyModel,
  tokenizer: BenchTokenizer,
  setting: ResolvedSetting,
  o: NeedleSweepOptions,
  runOptions: AccuracyRunOptions = {},
): Promise<NeedleSweep> {
  check(o.lengths.length > 0 && o.depths.length > 0, 'config', 'the needle sweep needs at least one length and one depth');
  for (const l of o.lengths) check(Number.isInteger(l) && l > 0, 'config', `needle context lengths must be positive integers, got ${l}`);
  const samples = o.samples ?? 1;
  check(o.digits === undefined || (Number.isInteger(o.digits) && o.digits >= 1), 'config', `needle digits must be a positive integer, got ${o.digits}`);
  check(Number.isInteger(samples) && samples >= 1, 'config', `needle samples must be a positive integer, got ${samples}`);
  const keys = o.keys ?? DEFAULT_KEYS;
  const queryMode = o.queryMode ?? 'agnostic';
  const cells: NeedleCell[] = [];
  const total = o.lengths.length * o.depths.length;
  let error: string | undefined;
  for (const length of o.lengths)
    for (const depth of o.depths) {
      const examples: EvalExample[] = [];
      const depths: number[] = [];
      for (let k = 0; k < samples; k++) {
        const p = needlePrompt(tokenizer, { length, depth, key: keys[k % keys.length], value: digitsOf((o.seed ?? 0) * 7919 + k, o.digits ?? 7), filler: o.filler, offset: k * 5 });
        depths.push(p.actualDepth);
        examples.push({ id: `needle:${length}:${depth}:${k}`, task: 'needle', line: k + 1, inputIds: p.inputIds, answerIds: p.answerIds, contextTokens: p.contextTokens });
      }
      const r = await runAccuracy(model, examples, [setting], { attentionQueries: 0, ...runOptions, queryMode });
      const s = r.results[0];
      if (s.error !== undefined) error ??= s.error;
      cells.push({
        length,
        depth,
        actualDepth: depths.reduce((a, b) => a + b, 0) / depths.length,
        accuracy: s.error !== undefined ? NaN : s.accuracy.mean,
        reference: r.reference.accuracy.mean,
        agreement: s.agreement,
        ratio: s.ratio,
      });
      o.onCell?.(cells.length, total);
    }
  return { setting: setting.label, queryMode, samples, cells, ...(error !== undefined ? { error } : {}) };
}

/** vega-lite heatmap spec of a sweep: depth (y) × context length (x), color = `metric`, the value printed in each cell. */
export function needleHeatmapSpec(sweep: NeedleSweep, metric: 'accuracy' | 'agreement' = 'accuracy', title?: string): Record<string, unknown> {
  return {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    title: { text: title ?? `needle retrieval: ${sweep.setting} (${sweep.queryMode === 'aware' ? 'query-aware' : 'query-agnostic'}, ${sweep.samples} prompt(s) per cell)`, anchor: 'start' },
    data: { values: sweep.cells.map((c) => ({ length: String(c.length), depth: `${Math.round(c.depth * 100)}%`, value: Number.isFinite(c[metric]) ? c[metric] : null, ratio: c.ratio })) },
    width: { step: 56 },
    height: { step: 36 },
    encoding: {
      x: { field: 'length', type: 'ordinal', title: 'context length (tokens)', sort: sweep.cells.map((c) => String(c.length)).filter((v, i, a) => a.indexOf(v) === i) },
      y: { field: 'depth', type: 'ordinal', title: 'needle depth', sort: sweep.cells.map((c) => `${Math.round(c.depth * 100)}%`).filter((v, i, a) => a.indexOf(v) === i) },
    },
    layer: [
      { mark: 'rect', encoding: { color: { field: 'value', type: 'quantitative', title: metric, scale: { domain: [0, 1], scheme: 'redyellowgreen' } } } },
      { mark: { type: 'text', fontSize: 11 }, encoding: { text: { field: 'value', type: 'quantitative', format: '.2f' } } },
    ],
  };
}

function esc(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

/** Red (0) → yellow (0.5) → green (1). */
function heatColor(v: number): string {
  if (!Number.isFinite(v)) return '#dddddd';
  const t = Math.min(1, Math.max(0, v));
  const [r, g] = t < 0.5 ? [215, Math.round(48 + (t / 0.5) * (220 - 48))] : [Math.round(215 - ((t - 0.5) / 0.5) * (215 - 26)), Math.round(220 - ((t - 0.5) / 0.5) * (220 - 152))];
  return `rgb(${r},${g},${t < 0.5 ? 39 : Math.round(39 + ((t - 0.5) / 0.5) * (80 - 39))})`;
}

/** The heatmap as a plain SVG written by code (no vega): the same cells, colors and values. */
export function needleHeatmapSvg(sweep: NeedleSweep, metric: 'accuracy' | 'agreement' = 'accuracy', title?: string): string {
  const lengths = [...new Set(sweep.cells.map((c) => c.length))];
  const depths = [...new Set(sweep.cells.map((c) => c.depth))];
  const cw = 64;
  const ch = 32;
  const left = 90;
  const top = 40;
  const w = left + lengths.length * cw + 20;
  const h = top + depths.length * ch + 50;
  const parts = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}" font-family="sans-serif" font-size="11">`,
    `<text x="8" y="18" font-size="13">${esc(title ?? `needle ${metric}: ${sweep.setting} (${sweep.queryMode})`)}</text>`,
  ];
  for (const [j, d] of depths.entries()) parts.push(`<text x="${left - 8}" y="${top + j * ch + ch / 2 + 4}" text-anchor="end">${Math.round(d * 100)}%</text>`);
  for (const [i, l] of lengths.entries()) parts.push(`<text x="${left + i * cw + cw / 2}" y="${top + depths.length * ch + 16}" text-anchor="middle">${l}</text>`);
  parts.push(`<text x="${left + (lengths.length * cw) / 2}" y="${top + depths.length * ch + 36}" text-anchor="middle">context length (tokens)</text>`);
  parts.push(`<text x="12" y="${top + (depths.length * ch) / 2}" transform="rotate(-90 12 ${top + (depths.length * ch) / 2})" text-anchor="middle">needle depth</text>`);
  for (const c of sweep.cells) {
    const x = left + lengths.indexOf(c.length) * cw;
    const y = top + depths.indexOf(c.depth) * ch;
    const v = c[metric];
    parts.push(`<rect x="${x}" y="${y}" width="${cw}" height="${ch}" fill="${heatColor(v)}" stroke="#ffffff"><title>${c.length} tokens, depth ${c.depth}: ${metric} ${Number.isFinite(v) ? v.toFixed(2) : 'n/a'}</title></rect>`);
    parts.push(`<text x="${x + cw / 2}" y="${y + ch / 2 + 4}" text-anchor="middle">${Number.isFinite(v) ? v.toFixed(2) : 'n/a'}</text>`);
  }
  parts.push('</svg>');
  return parts.join('\n');
}

/**
 * The heatmap SVG: vega-lite when the optional peers are installed, else {@link needleHeatmapSvg}.
 */
export async function renderNeedleHeatmap(sweep: NeedleSweep, metric: 'accuracy' | 'agreement' = 'accuracy', title?: string): Promise<string> {
  let vega: typeof import('vega');
  let vl: typeof import('vega-lite');
  try {
    [vega, vl] = await Promise.all([import('vega'), import('vega-lite')]);
  } catch {
    return needleHeatmapSvg(sweep, metric, title);
  }
  const compiled = vl.compile(needleHeatmapSpec(sweep, metric, title) as never).spec;
  const view = new vega.View(vega.parse(compiled), { renderer: 'none' });
  try {
    return await view.toSVG();
  } finally {
    view.finalize();
  }
}
