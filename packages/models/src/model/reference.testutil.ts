/**
 * Test support (not exported): the models folder, a plain float64 Llama forward written
 * independently of the tfjs model, a stand-alone reader of the stories260K Q8_0 file, and writers of
 * small llama2.c checkpoints with random weights.
 */
import { existsSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const repoRoot = fileURLToPath(new URL('../../../../', import.meta.url));
/** KVPACK_MODELS_DIR, else <repo>/../shared/models. */
export const MODELS_DIR = process.env.KVPACK_MODELS_DIR ?? resolve(repoRoot, '..', 'shared', 'models');
/** stories260K and its float64 oracle: embedded in the repository (models/), unless KVPACK_MODELS_DIR is set. */
export const STORIES_DIR = process.env.KVPACK_MODELS_DIR ? resolve(MODELS_DIR, 'stories260K') : resolve(repoRoot, 'models', 'stories260K');
export const STORIES_BIN = resolve(STORIES_DIR, 'stories260K_q80.bin');
export const STORIES_TOK = resolve(STORIES_DIR, 'tok512.bin');
export const STORIES_ORACLE = resolve(STORIES_DIR, 'oracle.json');
export const HAVE_STORIES = existsSync(STORIES_BIN) && existsSync(STORIES_TOK) && existsSync(STORIES_ORACLE);
export const SKIP_STORIES = HAVE_STORIES ? '' : ` (SKIPPED: ${STORIES_DIR} not found; set KVPACK_MODELS_DIR)`;

export interface Oracle {
  greedy_ids: number[];
  greedy_text: string;
  top2_logit_margin: number[];
  mean_nll_greedy_seq: number;
  kv_shape: number[];
}
export const readOracle = (): Oracle => JSON.parse(readFileSync(STORIES_ORACLE, 'utf8'));

/** A Llama model in float64, PyTorch orientation ([out, in] row-major matrices). */
export interface RefModel {
  dim: number;
  hidden: number;
  nLayers: number;
  nHeads: number;
  nKvHeads: number;
  vocab: number;
  maxSeqLen: number;
  eps: number;
  theta: number;
  ropeLayout: 'interleaved' | 'half';
  /** head_dim when it is not dim / nHeads (Qwen3). */
  headDim?: number;
  /** Per-layer sliding window (tokens) or null; absent = full attention everywhere. */
  windows?: (number | null)[];
  emb: Float64Array; // [V, D]
  cls: Float64Array; // [V, D]
  shared: boolean;
  finalNorm: Float64Array;
  layers: {
    attnNorm: Float64Array;
    wq: Float64Array;
    wk: Float64Array;
    wv: Float64Array;
    wo: Float64Array;
    bq?: Float64Array;
    bk?: Float64Array;
    bv?: Float64Array;
    /** Qwen3 per-head RMSNorm of q and k (before RoPE), [d]. */
    qNorm?: Float64Array;
    kNorm?: Float64Array;
    ffnNorm: Float64Array;
    w1: Float64Array;
    w2: Float64Array;
    w3: Float64Array;
  }[];
}

function matvec(W: Float64Array, x: Float64Array, out: number, inp: number, bias?: Float64Array): Float64Array {
  const y = new Float64Array(out);
  for (let o = 0; o < out; o++) {
    let s = bias ? bias[o] : 0;
    for (let i = 0; i < inp; i++) s += W[o * inp + i] * x[i];
    y[o] = s;
  }
  return y;
}

function rms(x: Float64Array, w: Float64Array, eps: number): Float64Array {
  let ss = 0;
  for (const v of x) ss += v * v;
  const r = 1 / Math.sqrt(ss / x.length + eps);
  return x.map((v, i) => v * r * w[i]);
}

/** RoPE of one [heads·d] vector at position p, in float64. */
export function refRope(x: Float64Array, heads: number, d: number, p: number, theta: number, layout: 'interleaved' | 'half'): Float64Array {
  const y = new Float64Array(x.length);
  for (let h = 0; h < heads; h++) {
    for (let i = 0; i < d / 2; i++) {
      const a = p * Math.pow(theta, (-2 * i) / d);
      const [j0, j1] = layout === 'interleaved' ? [h * d + 2 * i, h * d + 2 * i + 1] : [h * d + i, h * d + i + d / 2];
      y[j0] = x[j0] * Math.cos(a) - x[j1] * Math.sin(a);
      y[j1] = x[j0] * Math.sin(a) + x[j1] * Math.cos(a);
    }
  }
  return y;
}

export interface RefTrace {
  /** Logits per position, [T][V]. */
  logits: Float64Array[];
  /** Per layer, per position: pre-RoPE keys [H_kv·d], values, post-RoPE queries [H·d]. */
  keys: Float64Array[][];
  values: Float64Array[][];
  queries: Float64Array[][];
}

/** Token-by-token float64 forward (as run.c `forward()`), keeping every intermediate the tests need. */
export function refForward(m: RefModel, ids: number[]): RefTrace {
  const D = m.dim;
  const d = m.headDim ?? D / m.nHeads;
  const q = m.nHeads * d;
  const kv = m.nKvHeads * d;
  const g = m.nHeads / m.nKvHeads;
  const trace: RefTrace = { logits: [], keys: m.layers.map(() => []), values: m.layers.map(() => []), queries: m.layers.map(() => []) };
  const kRot: Float64Array[][] = m.layers.map(() => []);
  ids.forEach((id, p) => {
    let x = m.emb.slice(id * D, (id + 1) * D);
    m.layers.forEach((L, l) => {
      const h = rms(x, L.attnNorm, m.eps);
      const headNorm = (x: Float64Array, w: Float64Array | undefined, heads: number) => {
        if (!w) return x;
        const y = new Float64Array(x.length);
        for (let hh = 0; hh < heads; hh++) y.set(rms(x.subarray(hh * d, (hh + 1) * d), w, m.eps), hh * d);
        return y;
      };
      const qv = refRope(headNorm(matvec(L.wq, h, q, D, L.bq), L.qNorm, m.nHeads), m.nHeads, d, p, m.theta, m.ropeLayout);
      const k = headNorm(matvec(L.wk, h, kv, D, L.bk), L.kNorm, m.nKvHeads);
      const v = matvec(L.wv, h, kv, D, L.bv);
      trace.keys[l].push(k);
      trace.values[l].push(v);
      trace.queries[l].push(qv);
      kRot[l].push(refRope(k, m.nKvHeads, d, p, m.theta, m.ropeLayout));
      const att = new Float64Array(q);
      for (let hh = 0; hh < m.nHeads; hh++) {
        const kvh = Math.floor(hh / g);
        // A sliding window W lets position p see keys at positions t > p − W.
        const W = m.windows?.[l] ?? null;
        const t0 = W === null ? 0 : Math.max(0, p - W + 1);
        const s = new Float64Array(p + 1).fill(-Infinity);
        for (let t = t0; t <= p; t++) {
          let dot = 0;
          for (let i = 0; i < d; i++) dot += qv[hh * d + i] * kRot[l][t][kvh * d + i];
          s[t] = dot / Math.sqrt(d);
        }
        const mx = Math.max(...s);
        let z = 0;
        for (let t = t0; t <= p; t++) z += s[t] = Math.exp(s[t] - mx);
        for (let t = t0; t <= p; t++) for (let i = 0; i < d; i++) att[hh * d + i] += (s[t] / z) * trace.values[l][t][kvh * d + i];
      }
      const o = matvec(L.wo, att, D, q);
      x = x.map((v, i) => v + o[i]);
      const h2 = rms(x, L.ffnNorm, m.eps);
      const a = matvec(L.w1, h2, m.hidden, D);
      const b = matvec(L.w3, h2, m.hidden, D);
      const f = matvec(
        L.w2,
        a.map((v, i) => (v / (1 + Math.exp(-v))) * b[i]),
        D,
        m.hidden,
      );
      x = x.map((v, i) => v + f[i]);
    });
    trace.logits.push(matvec(m.cls, rms(x, m.finalNorm, m.eps), m.vocab, D));
  });
  return trace;
}

/** Mean of −log softmax(logits[t])[ids[t+1]] over t, in float64. */
export function refMeanNll(logits: Float64Array[], targets: number[]): number {
  let s = 0;
  targets.forEach((y, t) => {
    const row = logits[t];
    const mx = Math.max(...row);
    let z = 0;
    for (const v of row) z += Math.exp(v - mx);
    s += -(row[y] - mx - Math.log(z));
  });
  return s / targets.length;
}

/**
 * Reads stories260K_q80.bin from the layout documented in PROVENANCE.md (not via the package's
 * reader): float32 norms, then Q8_0 tables (int8 values, float32 scales per group), dequantized in float64.
 */
export function readStoriesRef(bytes: Uint8Array): RefModel {
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const [D, F, L, H, KV, V, S] = [8, 12, 16, 20, 24, 28, 32].map((o) => dv.getInt32(o, true));
  const gs = dv.getInt32(37, true);
  let pos = 256;
  const f32 = (n: number) => {
    const a = new Float64Array(n);
    for (let i = 0; i < n; i++) a[i] = dv.getFloat32(pos + 4 * i, true);
    pos += 4 * n;
    return a;
  };
  const q8 = (n: number) => {
    const vals = new Float64Array(n);
    const qpos = pos;
    pos += n;
    const scales = f32(n / gs);
    for (let i = 0; i < n; i++) vals[i] = dv.getInt8(qpos + i) * scales[Math.floor(i / gs)];
    return vals;
  };
  const d = D / H;
  const att = Array.from({ length: L }, () => f32(D));
  const ffn = Array.from({ length: L }, () => f32(D));
  const finalNorm = f32(D);
  const emb = q8(V * D);
  const per = (n: number) => Array.from({ length: L }, () => q8(n));
  const [wq, wk, wv, wo, w1, w2, w3] = [H * d * D, KV * d * D, KV * d * D, D * H * d, F * D, D * F, F * D].map(per);
  if (pos !== bytes.byteLength) throw new Error(`readStoriesRef: read ${pos} of ${bytes.byteLength} bytes`);
  return {
    dim: D,
    hidden: F,
    nLayers: L,
    nHeads: H,
    nKvHeads: KV,
    vocab: V,
    maxSeqLen: S,
    eps: 1e-5,
    theta: 10000,
    ropeLayout: 'interleaved',
    emb,
    cls: emb,
    shared: true,
    finalNorm,
    layers: att.map((a, l) => ({ attnNorm: a, wq: wq[l], wk: wk[l], wv: wv[l], wo: wo[l], ffnNorm: ffn[l], w1: w1[l], w2: w2[l], w3: w3[l] })),
  };
}

/** Small seeded PRNG for test data (LCG; independent of the package's sampler). */
export function lcg(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 4294967296;
  };
}

/** A matrix for Q8_0 round-trips: per group of `gs` values, int8 × a power-of-two scale, exact in float32. */
export interface Q8Table {
  q: Int8Array;
  scales: Float32Array;
  values: Float64Array;
}

function q8Table(n: number, gs: number, rnd: () => number, amp: number): Q8Table {
  const q = new Int8Array(n);
  const scales = new Float32Array(n / gs);
  const values = new Float64Array(n);
  for (let g = 0; g < n / gs; g++) {
    scales[g] = (amp * Math.pow(2, -Math.floor(rnd() * 3))) / 128;
    for (let j = 0; j < gs; j++) {
      const i = g * gs + j;
      q[i] = Math.round(rnd() * 254) - 127;
      values[i] = q[i] * scales[g];
    }
  }
  return { q, scales, values };
}

export interface RandomSpec {
  dim: number;
  hidden: number;
  nLayers: number;
  nHeads: number;
  nKvHeads: number;
  vocab: number;
  maxSeqLen: number;
  shared: boolean;
  groupSize: number;
  seed: number;
}

/** A random model whose matrices are exact Q8_0 tables (so v0, v1 and v2 files hold identical weights). */
export function randomModel(spec: RandomSpec): { ref: RefModel; tables: Record<string, Q8Table[]> } {
  const rnd = lcg(spec.seed);
  const { dim: D, hidden: F, nLayers: L, nHeads: H, nKvHeads: KV, vocab: V, groupSize: gs } = spec;
  const d = D / H;
  const amp = (fanIn: number) => 2 / Math.sqrt(fanIn);
  const mats = (n: number, a: number) => Array.from({ length: L }, () => q8Table(n, gs, rnd, a));
  const tables: Record<string, Q8Table[]> = {
    emb: [q8Table(V * D, gs, rnd, 1)],
    wq: mats(H * d * D, amp(D)),
    wk: mats(KV * d * D, amp(D)),
    wv: mats(KV * d * D, amp(D)),
    wo: mats(D * H * d, amp(H * d)),
    w1: mats(F * D, amp(D)),
    w2: mats(D * F, amp(F)),
    w3: mats(F * D, amp(D)),
    cls: spec.shared ? [] : [q8Table(V * D, gs, rnd, amp(D))],
  };
  const norm = () => Float64Array.from({ length: D }, () => Math.fround(0.5 + rnd()));
  const att = Array.from({ length: L }, norm);
  const ffn = Array.from({ length: L }, norm);
  const finalNorm = norm();
  const ref: RefModel = {
    dim: D,
    hidden: F,
    nLayers: L,
    nHeads: H,
    nKvHeads: KV,
    vocab: V,
    maxSeqLen: spec.maxSeqLen,
    eps: 1e-5,
    theta: 10000,
    ropeLayout: 'interleaved',
    emb: tables.emb[0].values,
    cls: spec.shared ? tables.emb[0].values : tables.cls[0].values,
    shared: spec.shared,
    finalNorm,
    layers: att.map((a, l) => ({
      attnNorm: a,
      wq: tables.wq[l].values,
      wk: tables.wk[l].values,
      wv: tables.wv[l].values,
      wo: tables.wo[l].values,
      ffnNorm: ffn[l],
      w1: tables.w1[l].values,
      w2: tables.w2[l].values,
      w3: tables.w3[l].values,
    })),
  };
  return { ref, tables };
}

class Writer {
  private parts: Uint8Array[] = [];
  size = 0;
  push(b: Uint8Array) {
    this.parts.push(b);
    this.size += b.length;
  }
  i32(...v: number[]) {
    const b = new Uint8Array(4 * v.length);
    v.forEach((x, i) => new DataView(b.buffer).setInt32(4 * i, x, true));
    this.push(b);
  }
  f32(v: ArrayLike<number>) {
    const b = new Uint8Array(4 * v.length);
    const dv = new DataView(b.buffer);
    for (let i = 0; i < v.length; i++) dv.setFloat32(4 * i, v[i], true);
    this.push(b);
  }
  pad(to: number) {
    this.push(new Uint8Array(to - this.size));
  }
  bytes(): Uint8Array {
    return Buffer.concat(this.parts);
  }
}

/** Writes a model as a llama2.c checkpoint of version 0, 1 or 2 (layouts of llama2.c export.py). */
export function writeLlama2c(m: RefModel, tables: Record<string, Q8Table[]>, version: 0 | 1 | 2, groupSize: number): Uint8Array {
  const w = new Writer();
  const hdr = [m.dim, m.hidden, m.nLayers, m.nHeads, m.nKvHeads, m.vocab, m.maxSeqLen];
  const all = (k: string) => tables[k].map((t) => t.values);
  if (version === 0) {
    hdr[5] = m.shared ? m.vocab : -m.vocab;
    w.i32(...hdr);
    w.f32(m.emb);
    m.layers.forEach((l) => w.f32(l.attnNorm));
    for (const k of ['wq', 'wk', 'wv', 'wo']) all(k).forEach((t) => w.f32(t));
    m.layers.forEach((l) => w.f32(l.ffnNorm));
    for (const k of ['w1', 'w2', 'w3']) all(k).forEach((t) => w.f32(t));
    w.f32(m.finalNorm);
    const hd = m.dim / m.nHeads;
    // freqs_cos, freqs_sin [max_seq_len, head_dim/2]: garbage here, a reader must skip them
    w.f32(new Float64Array(2 * m.maxSeqLen * (hd / 2)).fill(1e30));
    if (!m.shared) w.f32(m.cls);
    return w.bytes();
  }
  w.i32(0x616b3432, version, ...hdr);
  w.push(Uint8Array.of(m.shared ? 1 : 0));
  if (version === 2) w.i32(groupSize);
  w.pad(256);
  m.layers.forEach((l) => w.f32(l.attnNorm));
  m.layers.forEach((l) => w.f32(l.ffnNorm));
  w.f32(m.finalNorm);
  const order = ['emb', 'wq', 'wk', 'wv', 'wo', 'w1', 'w2', 'w3', 'cls'];
  for (const k of order)
    for (const t of tables[k]) {
      if (version === 1) w.f32(t.values);
      else {
        w.push(new Uint8Array(t.q.buffer, t.q.byteOffset, t.q.byteLength));
        w.f32(t.scales);
      }
    }
  return w.bytes();
}

/** Max |a − b| over two equal-length sequences. */
export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return a.length === b.length ? m : Infinity;
}
