import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { KvpackError } from '@kvpack/core';
import { parseCsv, parseCsvRecords, stringifyCsv } from './csv.js';

describe('CSV (RFC 4180)', () => {
  it('quotes only fields that need it; doubles inner quotes', () => {
    expect(stringifyCsv([['a', 'b,c', 'say "hi"', 'two\nlines', 3, true, null]])).toBe('a,"b,c","say ""hi""","two\nlines",3,true,\n');
  });

  it('parses hand-written CSV: CRLF, quoted commas and line breaks, empty fields, no final newline', () => {
    expect(parseCsv('x,y\r\n"1,5","a ""q"""\n,\n"multi\nline",z')).toEqual([
      ['x', 'y'],
      ['1,5', 'a "q"'],
      ['', ''],
      ['multi\nline', 'z'],
    ]);
    expect(parseCsvRecords('task,answer\nniah,"0 7 ."\n')).toEqual([{ task: 'niah', answer: '0 7 .' }]);
  });

  it('round-trips any table of strings', () => {
    const cell = fc.string({ unit: fc.constantFrom('a', 'b', ',', '"', '\n', '\r', ' ', 'é') });
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 4 }), fc.array(fc.array(cell, { minLength: 4, maxLength: 4 }), { minLength: 1, maxLength: 5 }), (w, rows) => {
        // Rows of one empty field would print as blank lines: give every row at least two fields.
        const t = rows.map((r) => r.slice(0, Math.max(2, w)));
        expect(parseCsv(stringifyCsv(t))).toEqual(t);
      }),
      { numRuns: 300 },
    );
  });

  it('malformed CSV: a KvpackError naming the row', () => {
    for (const [text, msg] of [
      ['a,b\n"open', /row 2: unclosed quote/],
      ['a,b"c', /row 1: a quote inside an unquoted field/],
      ['"a"b', /row 1: text after a closing quote/],
    ] as const) {
      expect(() => parseCsv(text)).toThrow(KvpackError);
      expect(() => parseCsv(text)).toThrow(msg);
    }
    expect(() => parseCsvRecords('a,b\n1\n')).toThrow(/row 2: 1 fields, the header has 2/);
  });
});
