// Internal helpers shared by the loaders for checking header fields against the size of the file
// before anything sized by them is allocated (not exported from the package).

/** A byte count for messages: "294816 bytes (295 KB)"; exact below 1 KB, decimal units above. */
export function fmtBytes(n: number): string {
  if (!Number.isFinite(n)) return `${n} bytes`;
  if (n < 1000) return `${n} bytes`;
  const units = ['KB', 'MB', 'GB', 'TB', 'PB', 'EB'];
  let v = n / 1000;
  let u = 0;
  while (v >= 1000 && u < units.length - 1) {
    v /= 1000;
    u++;
  }
  const exact = n <= Number.MAX_SAFE_INTEGER ? String(n) : n.toExponential(3);
  return `${exact} bytes (${v >= 100 ? Math.round(v) : v.toPrecision(3)} ${units[u]})`;
}

/**
 * Of several header fields, the one most responsible for an impossible size: the field whose
 * replacement by its smallest valid value shrinks the implied byte count the most.
 * @param total the byte count the header implies
 * @param fields each field's name, value and the byte count implied with it set to its minimum
 */
export function blameField(total: number, fields: { name: string; value: number; without: number }[]): { name: string; value: number } {
  let best = fields[0];
  let bestRatio = -Infinity;
  for (const f of fields) {
    const ratio = total / Math.max(1, f.without);
    if (ratio > bestRatio) {
      bestRatio = ratio;
      best = f;
    }
  }
  return { name: best.name, value: best.value };
}

/** Levenshtein distance, for "did you mean" suggestions (short strings only). */
export function editDistance(a: string, b: string): number {
  const m = a.length;
  const n = b.length;
  let prev = Array.from({ length: n + 1 }, (_, j) => j);
  for (let i = 1; i <= m; i++) {
    const cur = [i];
    for (let j = 1; j <= n; j++)
      cur[j] = Math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    prev = cur;
  }
  return prev[n];
}
