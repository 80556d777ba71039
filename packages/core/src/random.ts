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

/**
 * Box–Muller: two independent standard normal draws from two uniforms, u1 in (0, 1] and u2 in [0, 1):
 * sqrt(−2 ln u1) · (cos 2πu2, sin 2πu2). The one Gaussian transform of kvpack's seeded generators.
 */
export function normalPair(u1: number, u2: number): [number, number] {
  const r = Math.sqrt(-2 * Math.log(u1));
  return [r * Math.cos(2 * Math.PI * u2), r * Math.sin(2 * Math.PI * u2)];
}

/**
 * A seeded stream of standard normal draws: each draw is the cosine half of {@link normalPair} over two
 * fresh {@link mulberry32} uniforms (the form kvpack's tests have used, so their data stays the same).
 */
export function gaussian(seed: number): () => number {
  const u = mulberry32(seed);
  return () => normalPair(1 - u(), u())[0];
}
