/**
 * Host float64 reference of SnapKV's 1-D pooling (test oracle; the strategy pools on the backend with
 * {@link import('./index.js').pool1d}): each row of `x` ([rows, n] row-major) pooled with a window of
 * `kernel` (odd) positions centered on each position, stride 1, same length: `avg` divides by the
 * kernel (zero padding counted, as torch's avg_pool1d), `max` ignores the padding.
 */
export function pool1dHost(x: ArrayLike<number>, rows: number, n: number, kernel: number, mode: 'avg' | 'max'): Float64Array {
  const r = Math.floor(kernel / 2);
  const out = new Float64Array(rows * n);
  for (let h = 0; h < rows; h++) {
    for (let i = 0; i < n; i++) {
      let acc = mode === 'avg' ? 0 : -Infinity;
      for (let j = Math.max(0, i - r); j <= Math.min(n - 1, i + r); j++) {
        const v = x[h * n + j];
        acc = mode === 'avg' ? acc + v : Math.max(acc, v);
      }
      out[h * n + i] = mode === 'avg' ? acc / kernel : acc;
    }
  }
  return out;
}
