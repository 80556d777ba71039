import { readFileSync } from 'node:fs';
import { basename } from 'node:path';
import { KvpackError, check } from '@kvpack/core';
import type { BenchTokenizer } from '../model.js';

/**
 * One eval example, tokenized. The model is asked to continue `inputIds` with `answerIds`.
 */
export interface EvalExample {
  /** `file:line`, unique within a run (for logs and the JSON report). */
  id: string;
  /** Task name (the `task` field; `default` when the line has none). */
  task: string;
  /** 1-based line number in the JSONL file. */
  line: number;
  /** Prompt token ids (as given, or the tokenized `input`; BOS only if the text or ids carry it, or `bos`). */
  inputIds: number[];
  /** Expected continuation token ids. */
  answerIds: number[];
  /** The answer text, when the line has one. */
  answer?: string;
  /**
   * Where the question starts: `inputIds.slice(0, contextTokens)` is the context (compressed alone in
   * query-agnostic runs), the rest is the question. Set when the eval set is split (see
   * {@link QuestionSplit}); `inputIds` is then always context + question.
   */
  contextTokens?: number;
}

/**
 * How a prompt splits into context and question (as kvpress's `context` / `question` columns):
 * - `field`: the line carries the question in this field (text, tokenized without BOS, or token ids);
 *   `input` / `input_ids` is the context, and the prompt is context + question;
 * - `separator`: the question starts at the last occurrence of this text (tokenized without BOS) or
 *   token-id sequence in the prompt's ids, the separator included.
 */
export type QuestionSplit = { field: string; separator?: undefined } | { separator: string | string[] | number[]; field?: undefined };

/** Options of {@link parseEvalJsonl} / {@link readEvalSet}. */
export interface EvalSetOptions {
  /** Turns `input` / `answer` text into ids for lines without `input_ids` / `answer_ids`. */
  tokenizer?: BenchTokenizer;
  /** Prepend the tokenizer's BOS to tokenized `input` text (default false: prompts usually carry it). */
  bos?: boolean;
  /** Keep only these tasks, in this order. Default: every task, in order of first appearance. */
  tasks?: readonly string[];
  /** Keep at most this many examples per task (the first ones in the file). */
  limit?: number;
  /** Split each prompt into context and question. */
  question?: QuestionSplit;
}

/** Last start index of `needle` in `hay`, or -1. */
export function lastIndexOfSeq(hay: readonly number[], needle: readonly number[]): number {
  outer: for (let i = hay.length - needle.length; i >= 0; i--) {
    for (let j = 0; j < needle.length; j++) if (hay[i + j] !== needle[j]) continue outer;
    return i;
  }
  return -1;
}

/** Token-id sequences of a separator: text (or alternative texts) tokenized without BOS, or ids as given. */
function separatorIds(sep: string | string[] | number[], tokenizer: BenchTokenizer | undefined): number[][] {
  if (Array.isArray(sep) && sep.every((x) => typeof x === 'number')) return [sep as number[]];
  return (typeof sep === 'string' ? [sep] : (sep as string[])).map((t) => {
    check(tokenizer, 'config', `question separator "${t}" is text, but no tokenizer is available to encode it (give token ids instead)`);
    const ids = tokenizer.encode(t, { bos: false });
    check(ids.length > 0, 'config', `question separator "${t}" encodes to no tokens`);
    return ids;
  });
}

/** Sets `contextTokens` of the selected examples (and appends a `field` question to `inputIds`). */
function splitQuestions(examples: EvalExample[], raw: Map<string, Record<string, unknown>>, q: QuestionSplit, tokenizer: BenchTokenizer | undefined): void {
  const seps = q.separator !== undefined ? separatorIds(q.separator, tokenizer) : [];
  for (const ex of examples) {
    const where = ex.id;
    const o = raw.get(where)!;
    if (q.field !== undefined) {
      const v = o[q.field];
      check(v !== undefined, 'config', `${where}: no question field "${q.field}"`);
      let qIds: number[];
      if (typeof v === 'string') {
        check(tokenizer, 'config', `${where}: "${q.field}" is text, but no tokenizer is available to encode it`);
        qIds = tokenizer.encode(v, { bos: false });
        check(qIds.length > 0, 'config', `${where}: "${q.field}" encodes to no tokens`);
      } else qIds = idArray(v, where, q.field);
      ex.contextTokens = ex.inputIds.length;
      ex.inputIds = [...ex.inputIds, ...qIds];
    } else {
      const at = Math.max(...seps.map((s) => lastIndexOfSeq(ex.inputIds, s)));
      check(at >= 0, 'config', () => `${where}: the question separator ${JSON.stringify(q.separator)} (ids ${seps.map((s) => s.join(' ')).join(' | ')}) does not occur in the prompt`);
      check(at > 0, 'config', `${where}: the question separator starts the prompt: the context is empty`);
      ex.contextTokens = at;
    }
  }
}

/** A parsed eval set. */
export interface EvalSet {
  /** The file name as given. */
  file: string;
  /** Selected examples, grouped by task in `tasks` order, file order within a task. */
  examples: EvalExample[];
  /** Tasks in the selection, in order. */
  tasks: string[];
  /** Every task of the file with its number of examples (before `tasks` / `limit`). */
  available: Record<string, number>;
}

const DEFAULT_TASK = 'default';

function idArray(v: unknown, where: string, field: string): number[] {
  check(Array.isArray(v), 'config', `${where}: "${field}" must be an array of token ids, got ${v === null ? 'null' : typeof v}`);
  check(v.length > 0, 'config', `${where}: "${field}" is empty`);
  for (let i = 0; i < v.length; i++)
    check(Number.isInteger(v[i]) && v[i] >= 0, 'config', () => `${where}: "${field}"[${i}] = ${JSON.stringify(v[i])} is not a non-negative integer token id`);
  return v as number[];
}

/**
 * Parses a JSONL eval set (RULER's layout): one JSON object per line with `input_ids` + `answer_ids`
 * (token ids) or `input` + `answer` (text, tokenized with `tokenizer`), and an optional `task`.
 * Ids win when a line has both. Blank lines are skipped.
 * @param text the file's content
 * @param file the file name used in error messages
 * @throws KvpackError('corrupt') for a line that is not a JSON object, naming file and line;
 *         KvpackError('config') for missing or malformed fields (naming file, line and field), text
 *         without a tokenizer, an empty selection or a requested task the file lacks (listing its tasks).
 */
export function parseEvalJsonl(text: string, file: string, options: EvalSetOptions = {}): EvalSet {
  const name = basename(file);
  const all: EvalExample[] = [];
  const objects = new Map<string, Record<string, unknown>>();
  const lines = text.split(/\r?\n/);
  for (let i = 0; i < lines.length; i++) {
    const raw = lines[i].trim();
    if (raw === '') continue;
    const where = `${name}:${i + 1}`;
    let obj: unknown;
    try {
      obj = JSON.parse(raw);
    } catch (e) {
      throw new KvpackError('corrupt', `${where}: not valid JSON (${(e as Error).message})`, { cause: e });
    }
    check(obj !== null && typeof obj === 'object' && !Array.isArray(obj), 'corrupt', `${where}: expected a JSON object, got ${Array.isArray(obj) ? 'an array' : JSON.stringify(obj)}`);
    const o = obj as Record<string, unknown>;
    check(o.task === undefined || (typeof o.task === 'string' && o.task !== ''), 'config', `${where}: "task" must be a non-empty string, got ${JSON.stringify(o.task)}`);
    const task = (o.task as string | undefined) ?? DEFAULT_TASK;
    const hasIds = 'input_ids' in o || 'answer_ids' in o;
    let inputIds: number[];
    let answerIds: number[];
    if (hasIds) {
      check('input_ids' in o, 'config', `${where}: has "answer_ids" but no "input_ids"`);
      check('answer_ids' in o, 'config', `${where}: has "input_ids" but no "answer_ids"`);
      inputIds = idArray(o.input_ids, where, 'input_ids');
      answerIds = idArray(o.answer_ids, where, 'answer_ids');
    } else {
      check(
        'input' in o && 'answer' in o,
        'config',
        `${where}: needs "input_ids" + "answer_ids" (token ids) or "input" + "answer" (text); found ${Object.keys(o).map((k) => `"${k}"`).join(', ') || 'no fields'}`,
      );
      check(typeof o.input === 'string' && o.input !== '', 'config', `${where}: "input" must be a non-empty string`);
      check(typeof o.answer === 'string' && o.answer !== '', 'config', `${where}: "answer" must be a non-empty string`);
      const tok = options.tokenizer;
      check(tok, 'config', `${where}: has text ("input"/"answer") but no token ids, and no tokenizer is available to encode it`);
      inputIds = tok.encode(o.input as string, { bos: Boolean(options.bos) && tok.bosId !== undefined });
      answerIds = tok.encode(o.answer as string, { bos: false });
      check(inputIds.length > 0 && answerIds.length > 0, 'config', `${where}: "input" or "answer" encodes to no tokens`);
    }
    all.push({
      id: where,
      task,
      line: i + 1,
      inputIds,
      answerIds,
      ...(typeof o.answer === 'string' ? { answer: o.answer } : {}),
    });
    objects.set(where, o);
  }
  check(all.length > 0, 'config', `${name}: no examples (the file is empty)`);
  const available: Record<string, number> = {};
  for (const e of all) available[e.task] = (available[e.task] ?? 0) + 1;
  const list = () => Object.entries(available).map(([t, n]) => `${t} (${n})`).join(', ');
  const tasks = options.tasks ? [...options.tasks] : Object.keys(available);
  for (const t of tasks) check(t in available, 'config', `${name}: no examples of task "${t}"; the file has: ${list()}`);
  const limit = options.limit;
  check(limit === undefined || (Number.isInteger(limit) && limit > 0), 'config', `eval limit must be a positive integer, got ${limit}`);
  const examples = tasks.flatMap((t) => {
    const of = all.filter((e) => e.task === t);
    return limit === undefined ? of : of.slice(0, limit);
  });
  if (options.question) splitQuestions(examples, objects, options.question, options.tokenizer);
  return { file, examples, tasks, available };
}

/**
 * Reads a JSONL eval set from disk; see {@link parseEvalJsonl}.
 * @throws KvpackError('io') when the file cannot be read; parse errors as {@link parseEvalJsonl}.
 */
export function readEvalSet(path: string, options: EvalSetOptions = {}): EvalSet {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new KvpackError('io', `cannot read eval file ${path}: ${(e as Error).message}`, { cause: e });
  }
  return parseEvalJsonl(text, path, options);
}
