import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { KvpackError } from '@kvpack/core';
import type { BenchTokenizer } from '../model.js';
import { parseEvalJsonl, readEvalSet } from './dataset.js';

/** Whitespace word tokenizer over a fixed vocabulary; "<bos>" is id 1. */
const words = ['<pad>', '<bos>', '<eos>', 'the', 'number', 'is', '7', '3', '.', 'what', '?'];
const tok: BenchTokenizer = {
  bosId: 1,
  encode: (text, o) => [...(o?.bos ? [1] : []), ...text.split(/\s+/).filter(Boolean).map((w) => words.indexOf(w))],
  decode: (ids) => ids.map((i) => words[i]).join(' '),
};

function thrown(f: () => unknown): KvpackError {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(KvpackError);
    return e as KvpackError;
  }
  throw new Error('expected a KvpackError');
}

const lines = [
  { task: 'a', input_ids: [1, 3, 4], answer_ids: [6, 8] },
  { task: 'b', input_ids: [1, 5], answer_ids: [7] },
  { task: 'a', input_ids: [1, 4], answer_ids: [7, 8], input: 'ignored', answer: '3 .' },
  { task: 'a', input: '<bos> what is the number ?', answer: '7 .' },
].map((o) => JSON.stringify(o));

describe('JSONL eval sets', () => {
  it('reads ids, or tokenizes text; ids win when a line has both; blank lines are skipped', () => {
    const s = parseEvalJsonl([...lines.slice(0, 2), '', ...lines.slice(2)].join('\n') + '\n', '/x/eval.jsonl', { tokenizer: tok });
    expect(s.tasks).toEqual(['a', 'b']);
    expect(s.available).toEqual({ a: 3, b: 1 });
    // Grouped by task (first-appearance order), file order within a task.
    expect(s.examples.map((e) => e.id)).toEqual(['eval.jsonl:1', 'eval.jsonl:4', 'eval.jsonl:5', 'eval.jsonl:2']);
    expect(s.examples[1]).toMatchObject({ task: 'a', line: 4, inputIds: [1, 4], answerIds: [7, 8], answer: '3 .' });
    expect(s.examples[2]).toMatchObject({ inputIds: [1, 9, 5, 3, 4, 10], answerIds: [6, 8], answer: '7 .' });
  });

  it('bos: true prepends BOS to tokenized input text only', () => {
    const s = parseEvalJsonl(JSON.stringify({ input: 'the number', answer: '7' }), 'e.jsonl', { tokenizer: tok, bos: true });
    expect(s.examples[0]).toMatchObject({ task: 'default', inputIds: [1, 3, 4], answerIds: [6] });
  });

  it('selects tasks in the given order and limits examples per task', () => {
    const s = parseEvalJsonl(lines.join('\n'), 'e.jsonl', { tokenizer: tok, tasks: ['b', 'a'], limit: 2 });
    expect(s.examples.map((e) => e.line)).toEqual([2, 1, 3]);
    const e = thrown(() => parseEvalJsonl(lines.join('\n'), 'e.jsonl', { tokenizer: tok, tasks: ['niah_single'] }));
    expect(e.message).toBe('e.jsonl: no examples of task "niah_single"; the file has: a (3), b (1)');
  });

  it('a line that is not JSON: an error naming the file and the line', () => {
    const text = [lines[0], lines[1], '{"task": "a", "input_ids": [1, 2', lines[2]].join('\n');
    const e = thrown(() => parseEvalJsonl(text, '/data/eval_1024.jsonl'));
    expect(e.code).toBe('corrupt');
    expect(e.message).toMatch(/^eval_1024\.jsonl:3: not valid JSON \(/);
    expect(thrown(() => parseEvalJsonl('[1, 2]', 'e.jsonl')).message).toBe('e.jsonl:1: expected a JSON object, got an array');
  });

  it('missing or malformed fields: errors naming file, line and field', () => {
    const at = (o: unknown, opts = {}) => thrown(() => parseEvalJsonl(`${lines[0]}\n${JSON.stringify(o)}`, 'e.jsonl', opts)).message;
    expect(at({ task: 'a', prompt: 'x' })).toBe('e.jsonl:2: needs "input_ids" + "answer_ids" (token ids) or "input" + "answer" (text); found "task", "prompt"');
    expect(at({ input_ids: [1, 2] })).toBe('e.jsonl:2: has "input_ids" but no "answer_ids"');
    expect(at({ answer_ids: [1] })).toBe('e.jsonl:2: has "answer_ids" but no "input_ids"');
    expect(at({ input_ids: [1, 2], answer_ids: [] })).toBe('e.jsonl:2: "answer_ids" is empty');
    expect(at({ input_ids: [1, -2], answer_ids: [3] })).toBe('e.jsonl:2: "input_ids"[1] = -2 is not a non-negative integer token id');
    expect(at({ input_ids: '1 2', answer_ids: [3] })).toBe('e.jsonl:2: "input_ids" must be an array of token ids, got string');
    expect(at({ input: 'the', answer: 7 }, { tokenizer: tok })).toBe('e.jsonl:2: "answer" must be a non-empty string');
    expect(at({ input: 'the', answer: '7' })).toBe('e.jsonl:2: has text ("input"/"answer") but no token ids, and no tokenizer is available to encode it');
    expect(at({ task: 3, input_ids: [1], answer_ids: [2] })).toBe('e.jsonl:2: "task" must be a non-empty string, got 3');
    expect(thrown(() => parseEvalJsonl('\n\n', 'e.jsonl')).message).toBe('e.jsonl: no examples (the file is empty)');
  });

  it('readEvalSet: an unreadable file is an io error naming it', () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvpack-eval-'));
    const f = join(dir, 'ok.jsonl');
    writeFileSync(f, lines.slice(0, 2).join('\n'));
    expect(readEvalSet(f).examples).toHaveLength(2);
    const e = thrown(() => readEvalSet(join(dir, 'missing.jsonl')));
    expect(e.code).toBe('io');
    expect(e.message).toMatch(/cannot read eval file .*missing\.jsonl/);
  });

  it('question split: a field (text or ids) appended to the context, or the last occurrence of a separator', () => {
    const text = [
      JSON.stringify({ task: 'a', input: '<bos> the number is 7 .', question: 'what is the number ?', answer: '7 .' }),
      JSON.stringify({ task: 'a', input_ids: [1, 3, 4], question: [9, 4, 10], answer_ids: [6] }),
    ].join('\n');
    const f = parseEvalJsonl(text, 'q.jsonl', { tokenizer: tok, question: { field: 'question' } });
    expect(f.examples.map((e) => [e.inputIds, e.contextTokens])).toEqual([
      [[1, 3, 4, 5, 6, 8, 9, 5, 3, 4, 10], 6],
      [[1, 3, 4, 9, 4, 10], 3],
    ]);
    expect(() => parseEvalJsonl(text, 'q.jsonl', { tokenizer: tok, question: { field: 'query' } })).toThrow(/^q\.jsonl:1: no question field "query"$/);
    // "what is" twice: the question starts at the last one; alternatives take the latest of any.
    const two = JSON.stringify({ task: 'b', input_ids: [1, 9, 5, 3, 8, 9, 5, 4, 10], answer_ids: [6] });
    const sep = (separator: string | string[] | number[]) => parseEvalJsonl(two, 's.jsonl', { tokenizer: tok, question: { separator } }).examples[0].contextTokens;
    expect(sep('what is')).toBe(5);
    expect(sep([9, 5])).toBe(5);
    expect(sep(['the', 'number ?'])).toBe(7);
    expect(sep(['the', '7 ?'])).toBe(3);
    expect(() => sep('7 ?')).toThrow(/^s\.jsonl:1: the question separator "7 \?" \(ids 6 10\) does not occur in the prompt$/);
    // Only the selected examples are split: task "a" lacks the separator but is not selected.
    const mixed = [text.split('\n')[1], two].join('\n');
    expect(parseEvalJsonl(mixed, 'm.jsonl', { tokenizer: tok, tasks: ['b'], question: { separator: 'what is' } }).examples.map((e) => e.contextTokens)).toEqual([5]);
  });
});
