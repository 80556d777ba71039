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
 * Of several header fields, the one most responsible for an implied size larger than the file: a
 * field one bit flip away from a value that makes the size exactly the file's (returned as `fits`);
 * else, for each field, the largest value that would fit the file with the others unchanged (binary search
 * between its minimum and its value); the field furthest above its fitting value (as a ratio) is
 * blamed. A field that cannot make the file fit on its own is blamed only when none can.
 * @param found the file's size in bytes
 * @param fields each field's name, value, smallest valid value, and the size implied with it set to v
 */
export function blameField(
  found: number,
  fields: { name: string; value: number; min: number; bytesWith: (v: number) => number }[],
): { name: string; value: number; fits?: number } {
  // A single flipped bit (the usual corruption) is recognised exactly: the field one bit away from
  // a value whose implied size is the file's.
  for (const f of fields)
    for (let bit = 0; bit < 31; bit++) {
      const v = (f.value ^ (2 ** bit)) >>> 0;
      if (v >= f.min && v < f.value && f.bytesWith(v) === found) return { name: f.name, value: f.value, fits: v };
    }
  let best = fields[0];
  let bestRatio = 0;
  for (const f of fields) {
    if (!(f.value > f.min) || !(f.bytesWith(f.min) <= found)) continue;
    let lo = f.min; // fits
    let hi = f.value; // does not fit
    while (hi - lo > 1) {
      const mid = Math.floor((lo + hi) / 2);
      if (f.bytesWith(mid) <= found) lo = mid;
      else hi = mid;
    }
    const ratio = f.value / lo;
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
