/**
 * mulberry32: a small seeded 32-bit PRNG (Tommy Ettinger), uniform in [0, 1). Deterministic across
 * platforms and backends; not cryptographic. kvpack uses it for sampling, test data and the
 * randomized SVD's Gaussian test matrices.
 */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
