import { KvpackError } from '@kvpack/core';

/**
 * CSV as RFC 4180 writes it (what pandas' `to_csv` reads and writes): comma-separated fields, a field
 * quoted when it holds a comma, a quote, CR or LF (quotes doubled inside), CRLF-free `\n` row ends.
 */
export function csvField(v: string | number | boolean | null | undefined): string {
  const s = v === null || v === undefined ? '' : String(v);
  return /[",\r\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

/** Rows (the header first) as CSV text, each row ended by `\n`. */
export function stringifyCsv(rows: readonly (readonly (string | number | boolean | null | undefined)[])[]): string {
  return rows.map((r) => `${r.map(csvField).join(',')}\n`).join('');
}

/**
 * Parses RFC 4180 CSV (quoted fields may hold commas, doubled quotes and line breaks; rows end with
 * `\n` or `\r\n`; a final row end is optional) into rows of strings.
 * @throws KvpackError('corrupt') for an unclosed quote or a quote inside an unquoted field, naming the row.
 */
export function parseCsv(text: string): string[][] {
  const rows: string[][] = [];
  let row: string[] = [];
  let field = '';
  let i = 0;
  let quoted = false;
  let wasQuoted = false;
  const endField = () => {
    row.push(field);
    field = '';
    wasQuoted = false;
  };
  const endRow = () => {
    endField();
    rows.push(row);
    row = [];
  };
  while (i < text.length) {
    const c = text[i];
    if (quoted) {
      if (c === '"') {
        if (text[i + 1] === '"') {
          field += '"';
          i += 2;
          continue;
        }
        quoted = false;
        i++;
        continue;
      }
      field += c;
      i++;
      continue;
    }
    if (c === '"') {
      if (field !== '' || wasQuoted) throw new KvpackError('corrupt', `CSV row ${rows.length + 1}: a quote inside an unquoted field`);
      quoted = true;
      wasQuoted = true;
      i++;
    } else if (c === ',') {
      endField();
      i++;
    } else if (c === '\n' || (c === '\r' && text[i + 1] === '\n')) {
      endRow();
      i += c === '\r' ? 2 : 1;
    } else {
      if (wasQuoted) throw new KvpackError('corrupt', `CSV row ${rows.length + 1}: text after a closing quote`);
      field += c;
      i++;
    }
  }
  if (quoted) throw new KvpackError('corrupt', `CSV row ${rows.length + 1}: unclosed quote`);
  if (field !== '' || wasQuoted || row.length) endRow();
  return rows;
}

/** Parses CSV with a header row into records keyed by the header's names. @throws KvpackError('corrupt') for a row whose width differs from the header's. */
export function parseCsvRecords(text: string): Record<string, string>[] {
  const [head, ...rest] = parseCsv(text);
  if (!head) return [];
  return rest.map((r, i) => {
    if (r.length !== head.length) throw new KvpackError('corrupt', `CSV row ${i + 2}: ${r.length} fields, the header has ${head.length}`);
    return Object.fromEntries(head.map((h, j) => [h, r[j]]));
  });
}
