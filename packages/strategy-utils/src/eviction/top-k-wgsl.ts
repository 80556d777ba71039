import * as tf from '@tensorflow/tfjs-core';
import { check, runWgsl } from '@kvpack/core';

/** Invocations per workgroup of the top-k kernels. */
const WG = 256;

/** Rows longer than this are split over several workgroups each (the chunked path); shorter rows take one workgroup. */
const SINGLE_WORKGROUP_MAX_T = 4096;

/** Above this many rows one workgroup per row already fills the device: the single-workgroup path. */
const CHUNKED_MAX_ROWS = 512;

/** Most chunks per row of the chunked path (its per-row header holds one count per chunk in 256 slots). */
const MAX_CHUNKS = 254;

/** Workgroups (rows × chunks) past which the chunked path takes fewer, longer chunks (the partial histograms' traffic grows with both). */
const MAX_WORKGROUPS = 4096;

/** Chunks per row the chunked path picks on its own (more would make every workgroup's read of the partial histograms long). */
const AUTO_MAX_CHUNKS = 128;

/**
 * Where the top-k kernel reads its scores: WGSL defining `fn score(row: u32, i: u32) -> f32` (the
 * score of position i of row) and `fn rowLength() -> u32` (T, best read from an input's shape uniform
 * so that one compiled pipeline serves every T), over the named inputs. Lets a caller fuse the last step of its scoring
 * (pooling, a window kept at +∞) into the selection instead of writing the scores first.
 */
export interface WgslScoreSource {
  /** Unique name of the source's code, every baked-in constant included. */
  key: string;
  names: string[];
  inputs: tf.Tensor[];
  code: string;
}

/** Scores read straight from a float32 [R, T] tensor. */
export function plainScores(scores: tf.Tensor): WgslScoreSource {
  return {
    key: 'plain',
    names: ['S'],
    inputs: [scores],
    code: `fn rowLength() -> u32 { return u32(uniforms.sShape[1]); }
fn score(row: u32, i: u32) -> f32 { return S[row * u32(uniforms.sShape[1]) + i]; }`,
  };
}

/**
 * Chunks per row {@link topKPositionsWgsl} splits R rows of T scores into: 1 (one workgroup per row)
 * for rows of at most 4,096 scores or more than 512 rows, else ⌈T / (256·E)⌉, E a power of two near
 * √(T / 512) and at least 4 (16 chunks of 2,048 at T = 32,768), so that the scores a lane reads per
 * round and the chunks' partial histograms every workgroup sums cost about the same; at most 128
 * chunks, and at most max(2, ⌈4,096 / R⌉) so that R × chunks stays near 4,096 workgroups.
 */
export function topKChunksPerRow(R: number, T: number): number {
  if (T <= SINGLE_WORKGROUP_MAX_T || R > CHUNKED_MAX_ROWS) return 1;
  const perLane = Math.max(4, 2 ** Math.round(Math.log2(Math.sqrt(T / 512))));
  return Math.min(AUTO_MAX_CHUNKS, Math.max(2, Math.ceil(MAX_WORKGROUPS / R)), Math.ceil(T / (WG * perLane)));
}

/**
 * Per row, the positions of the `k` highest scores of `src` (R rows of T), ties to the lower position, a
 * NaN ranking lowest (as −∞), −0 equal to +0, ascending — the rule of `topKPositions` and the host
 * `keepTopScores` — as WGSL kernels on webgpu with no host round trip and no sort: a radix select of
 * the k-th largest score over order-preserving 32-bit keys (four 8-bit digits from the top), then a
 * compaction in position order. Rows of at most 4,096 scores (or more than 512 rows) take **one**
 * dispatch, one workgroup per row; longer rows are split into {@link topKChunksPerRow} chunks, one
 * workgroup per (chunk, row), in **5** dispatches (four histogram rounds, each workgroup summing the
 * previous round's per-chunk histograms of its row to fix that digit, and one compaction that writes
 * each chunk's kept positions at the offsets the histograms give). Both paths give the same positions.
 * Returns int32 [R, k], transient, owned by the caller.
 * @throws KvpackError('shape') when k is not in 1 … T − 1 or R is not in 1 … 65,535.
 */
export function topKPositionsWgsl(src: WgslScoreSource, R: number, T: number, k: number): tf.Tensor2D {
  checkTopK(R, T, k);
  const chunks = topKChunksPerRow(R, T);
  return chunks > 1 ? chunkedTopK(src, R, T, k, chunks) : singleWorkgroupTopK(src, R, T, k);
}

/**
 * {@link topKPositionsWgsl} with the number of chunks per row given (1 … 254; 1 is the
 * single-workgroup kernel). For tests of the chunked path on short rows.
 * @throws KvpackError('shape') as topKPositionsWgsl, or when chunks is not in 1 … 254.
 */
export function topKPositionsChunkedWgsl(src: WgslScoreSource, R: number, T: number, k: number, chunks: number): tf.Tensor2D {
  checkTopK(R, T, k);
  check(Number.isInteger(chunks) && chunks >= 1 && chunks <= MAX_CHUNKS, 'shape', `top-k kernel: ${chunks} chunks per row must be in 1 … ${MAX_CHUNKS}`);
  // The histogram state [R, chunks + 1, 256] int32 must fit one storage binding (WebGPU's guaranteed 128 MiB).
  check(R * (chunks + 1) * 256 * 4 <= 2 ** 27, 'shape', `top-k kernel: ${R} rows × ${chunks} chunks need a ${R * (chunks + 1) * 1024}-byte histogram state, above 128 MiB`);
  return chunks > 1 ? chunkedTopK(src, R, T, k, chunks) : singleWorkgroupTopK(src, R, T, k);
}

function checkTopK(R: number, T: number, k: number): void {
  check(Number.isInteger(k) && k >= 1 && k < T, 'shape', `top-k kernel: k = ${k} must be in 1 … T − 1 = ${T - 1}`);
  check(Number.isInteger(R) && R >= 1 && R <= 65535, 'shape', `top-k kernel: ${R} rows must be in 1 … 65,535`);
}

// Order-preserving key: larger score, larger key; NaN as −∞, −0 as +0.
const KEY_WGSL = `fn tk_key(v: f32) -> u32 {
  let b = bitcast<u32>(v);
  let a = b & 0x7fffffffu;
  if (a > 0x7f800000u) { return 0x007fffffu; }
  if (a == 0u) { return 0x80000000u; }
  if ((b & 0x80000000u) != 0u) { return ~b; }
  return b | 0x80000000u;
}`;

/** One workgroup per row: the whole selection in one dispatch. */
function singleWorkgroupTopK(src: WgslScoreSource, R: number, T: number, k: number): tf.Tensor2D {
  const code = `
const WG: u32 = ${WG}u;
var<workgroup> tk_hist: array<atomic<u32>, 256>;
var<workgroup> tk_scan: array<u32, ${WG}>;
var<workgroup> tk_sel: array<u32, 2>;
${src.code}
${KEY_WGSL}
fn kernel(index: i32) {
  let row = workgroupId.x;
  let lid = localIndex;
  let T = rowLength();
  let K = u32(uniforms.outShape[1]);
  // Radix select of the K-th largest key, 8 bits a pass from the top; remaining = how many of the
  // K are still to be found among the keys that share the prefix chosen so far.
  var prefix = 0u;
  var remaining = K;
  for (var pw = 0u; pw < 4u; pw++) {
    let shift = 24u - 8u * pw;
    let hiMask = ~(0xffffffffu >> (8u * pw));
    atomicStore(&tk_hist[lid], 0u);
    workgroupBarrier();
    for (var i = lid; i < T; i += WG) {
      let key = tk_key(score(row, i));
      if ((key & hiMask) == prefix) { atomicAdd(&tk_hist[(key >> shift) & 255u], 1u); }
    }
    workgroupBarrier();
    if (lid == 0u) {
      var acc = 0u;
      var b = 255u;
      loop {
        let c = atomicLoad(&tk_hist[b]);
        if (acc + c >= remaining || b == 0u) { break; }
        acc += c;
        b -= 1u;
      }
      tk_sel[0] = prefix | (b << shift);
      tk_sel[1] = remaining - acc;
    }
    workgroupBarrier();
    prefix = tk_sel[0];
    remaining = tk_sel[1];
    workgroupBarrier();
  }
  // prefix is the K-th largest key; the K − remaining keys above it are kept, and of the keys equal
  // to it the first \`remaining\` by position. One pass in position order: a workgroup scan of
  // (above, tied) counts packed in 16 bits each gives every kept position its output slot.
  let need = remaining;
  var above = 0u;
  var tied = 0u;
  for (var base = 0u; base < T; base += WG) {
    let i = base + lid;
    var key = 0u;
    var mine = 0u;
    if (i < T) {
      key = tk_key(score(row, i));
      mine = select(0u, 1u, key > prefix) | select(0u, 0x10000u, key == prefix);
    }
    tk_scan[lid] = mine;
    workgroupBarrier();
    for (var off = 1u; off < WG; off = off << 1u) {
      var v = tk_scan[lid];
      if (lid >= off) { v += tk_scan[lid - off]; }
      workgroupBarrier();
      tk_scan[lid] = v;
      workgroupBarrier();
    }
    let before = tk_scan[lid] - mine; // exclusive counts in this block
    let aboveBefore = above + (before & 0xffffu);
    let tiedBefore = tied + (before >> 16u);
    if (i < T && key > prefix) {
      result[row * K + aboveBefore + min(tiedBefore, need)] = i32(i);
    } else if (i < T && key == prefix && tiedBefore < need) {
      result[row * K + aboveBefore + tiedBefore] = i32(i);
    }
    let total = tk_scan[WG - 1u];
    above += total & 0xffffu;
    tied += total >> 16u;
    workgroupBarrier();
  }
}`;
  return runWgsl({
    key: `topk_positions_${src.key}`,
    names: src.names,
    inputs: src.inputs,
    outputShape: [R, k],
    dtype: 'int32',
    workgroupSize: WG,
    dispatch: [R, 1, 1],
    workgroupBytes: 4 * (256 + WG + 2),
    code,
  }) as tf.Tensor2D;
}

// The chunked path's state between dispatches: per round an int32 [R, chunks + 1, 256] tensor; row r
// holds a header of 256 slots — [0] the key prefix fixed so far (bits above this round's digit), [1]
// how many of the k are still to be found among the keys with that prefix, [2 + c] how many keys of
// the chunks before c are already known to rank above the k-th — then chunk c's histogram of this
// round's digit over its keys with that prefix. Every workgroup of a row sums the histograms of all
// its row's chunks (256 lanes, one bin each, reads coalesced) to fix the digit itself, so no pass is
// spent on a per-row reduction and no global atomics (tfjs outputs are not zeroed) are needed.
const CHUNKED_COMMON = `
const WG: u32 = ${WG}u;
${KEY_WGSL}
// Scores per chunk: T / chunks rounded up to 32 (uniform: shapes only).
fn tk_chunkLen(T: u32, NC: u32) -> u32 {
  return ((T + NC - 1u) / NC + 31u) / 32u * 32u;
}`;

const HISTOGRAM_WGSL = `
var<workgroup> tk_hist: array<atomic<u32>, 256>;
// Adds the chunk's keys [start, end) of row that share prefix (under hiMask) to tk_hist by their
// digit at shift; a lane adds a run of equal digits at once (heavy ties do not serialize on one bin).
fn tk_histogram(row: u32, start: u32, end: u32, prefix: u32, hiMask: u32, shift: u32) {
  var run = 0u;
  var runBin = 0u;
  for (var i = start + localIndex; i < end; i += WG) {
    let key = tk_key(score(row, i));
    if ((key & hiMask) == prefix) {
      let bin = (key >> shift) & 255u;
      if (bin != runBin && run > 0u) {
        atomicAdd(&tk_hist[runBin], run);
        run = 0u;
      }
      runBin = bin;
      run += 1u;
    }
  }
  if (run > 0u) { atomicAdd(&tk_hist[runBin], run); }
}`;

// Reads the previous round's state from the input tkh.
const SELECT_WGSL = `
var<workgroup> tk_tot: array<u32, 256>;
var<workgroup> tk_pre: array<u32, 256>;
var<workgroup> tk_tot2: array<u32, 256>;
var<workgroup> tk_pre2: array<u32, 256>;
var<workgroup> tk_sel: array<u32, 4>;
// From the histograms at tkh[hist + c·256 + bin] of a row's NC chunks, with remaining keys to find:
// tk_sel = [digit d (the largest with at least remaining keys at or above it), remaining − keys
// above d, keys above d in the chunks before c, keys at d in the chunks before c].
fn tk_select(hist: u32, c: u32, NC: u32, remaining: u32) {
  let lid = localIndex;
  var tot = 0u;
  var pre = 0u;
  for (var cc = 0u; cc < NC; cc++) {
    let v = u32(tkh[hist + cc * 256u + lid]);
    tot += v;
    pre += select(0u, v, cc < c);
  }
  tk_tot[lid] = tot;
  tk_pre[lid] = pre;
  workgroupBarrier();
  // Inclusive suffix sums over the bins, both arrays at once, ping-ponged (one barrier a step).
  for (var off = 1u; off < WG; off = off << 2u) {
    var t = tk_tot[lid];
    var p = tk_pre[lid];
    if (lid + off < WG) {
      t += tk_tot[lid + off];
      p += tk_pre[lid + off];
    }
    tk_tot2[lid] = t;
    tk_pre2[lid] = p;
    workgroupBarrier();
    let off2 = off << 1u;
    t = tk_tot2[lid];
    p = tk_pre2[lid];
    if (lid + off2 < WG) {
      t += tk_tot2[lid + off2];
      p += tk_pre2[lid + off2];
    }
    tk_tot[lid] = t;
    tk_pre[lid] = p;
    workgroupBarrier();
  }
  let nxt = min(lid + 1u, 255u);
  let atOrAbove = tk_tot[lid];
  let aboveMe = select(0u, tk_tot[nxt], lid < 255u);
  let preAbove = select(0u, tk_pre[nxt], lid < 255u);
  if ((atOrAbove >= remaining && aboveMe < remaining) || (lid == 0u && atOrAbove < remaining)) {
    tk_sel[0] = lid;
    tk_sel[1] = remaining - aboveMe;
    tk_sel[2] = preAbove;
    tk_sel[3] = pre;
  }
  workgroupBarrier();
}`;

/** Scores a lane takes in each tile of the compaction (a tile is 256 lanes × this, staged in workgroup memory). */
const TILE_PER_LANE = 8;

function chunkedTopK(src: WgslScoreSource, R: number, T: number, k: number, chunks: number): tf.Tensor2D {
  const made: tf.Tensor[] = [];
  try {
    let hist: tf.Tensor | null = null;
    for (let round = 0; round < 4; round++) {
      const shift = 24 - 8 * round;
      const first = round === 0;
      const code = `${CHUNKED_COMMON}
${HISTOGRAM_WGSL}
${first ? '' : SELECT_WGSL}
${src.code}
fn kernel(index: i32) {
  let c = workgroupId.x;
  let row = workgroupId.y;
  let lid = localIndex;
  let T = rowLength();
  let NC = u32(uniforms.outShape[1]) - 1u;
  let C = tk_chunkLen(T, NC);
  let h = row * (NC + 1u) * 256u;
  atomicStore(&tk_hist[lid], 0u);
${
  first
    ? `  let prefix = 0u;
  let remaining = u32(uniforms.kSel);
  let above = 0u;
  workgroupBarrier();`
    : `  tk_select(h + 256u, c, NC, u32(tkh[h + 1u]));
  let prefix = bitcast<u32>(tkh[h]) | (tk_sel[0] << ${shift + 8}u);
  let remaining = tk_sel[1];
  let above = u32(tkh[h + 2u + c]) + tk_sel[2];`
}
  let start = c * C;
  tk_histogram(row, start, min(T, start + C), prefix, ${first ? '0u' : `0x${((0xffffffff << (32 - 8 * round)) >>> 0).toString(16)}u`}, ${shift}u);
  workgroupBarrier();
  result[h + 256u + c * 256u + lid] = i32(atomicLoad(&tk_hist[lid]));
  if (lid == 0u) {
    result[h + 2u + c] = i32(above);
    if (c == 0u) {
      result[h] = bitcast<i32>(prefix);
      result[h + 1u] = i32(remaining);
    }
  }
}`;
      const next: tf.Tensor = runWgsl({
        key: `topk_chunked_hist${round}_${src.key}`,
        names: first ? src.names : [...src.names, 'tkh'],
        inputs: first ? src.inputs : [...src.inputs, hist!],
        ...(first ? { uniforms: [{ name: 'kSel', type: 'i32' as const, value: k }] } : {}),
        outputShape: [R, chunks + 1, 256],
        dtype: 'int32',
        workgroupSize: WG,
        dispatch: [chunks, R, 1],
        workgroupBytes: 4 * (first ? 256 : 5 * 256 + 4),
        code,
      });
      made.push(next);
      hist = next;
    }
    const code = `${CHUNKED_COMMON}
${SELECT_WGSL}
const TL: u32 = ${TILE_PER_LANE}u;
// A tile of keys, one padding slot every 32 (a lane's TL consecutive keys fall in distinct banks).
var<workgroup> tk_keys: array<u32, ${WG * TILE_PER_LANE + (WG * TILE_PER_LANE) / 32}>;
var<workgroup> tk_scan: array<u32, 256>;
var<workgroup> tk_scan2: array<u32, 256>;
fn tk_slot(p: u32) -> u32 { return p + (p >> 5u); }
${src.code}
fn kernel(index: i32) {
  let c = workgroupId.x;
  let row = workgroupId.y;
  let lid = localIndex;
  let T = rowLength();
  let K = u32(uniforms.outShape[1]);
  let NC = u32(uniforms.tkhShape[1]) - 1u;
  let C = tk_chunkLen(T, NC);
  let h = row * (NC + 1u) * 256u;
  tk_select(h + 256u, c, NC, u32(tkh[h + 1u]));
  // prefix is the K-th largest key; of the keys equal to it the first \`need\` by position are kept.
  // above and tied count the row's keys above it and equal to it before the current tile.
  let prefix = bitcast<u32>(tkh[h]) | tk_sel[0];
  let need = tk_sel[1];
  var above = u32(tkh[h + 2u + c]) + tk_sel[2];
  var tied = tk_sel[3];
  let start = c * C;
  let end = min(T, start + C);
  // Tiles of WG·TL positions: read coalesced into workgroup memory (key 0, below every key, past
  // the chunk), then lane l takes positions l·TL … l·TL + TL − 1 of the tile in order; one scan of
  // the lanes' (above, tied) counts, packed in 16 bits each, gives every kept position its slot.
  for (var base = 0u; base < C; base += WG * TL) {
    for (var j = 0u; j < TL; j++) {
      let p = j * WG + lid;
      let i = start + base + p;
      var key = 0u;
      if (i < end) { key = tk_key(score(row, i)); }
      tk_keys[tk_slot(p)] = key;
    }
    workgroupBarrier();
    var mine = 0u;
    for (var j = 0u; j < TL; j++) {
      let key = tk_keys[tk_slot(lid * TL + j)];
      mine += select(0u, 1u, key > prefix) + select(0u, 0x10000u, key == prefix);
    }
    // Inclusive scan over the lanes, ping-ponged (one barrier a step).
    tk_scan[lid] = mine;
    workgroupBarrier();
    for (var off = 1u; off < WG; off = off << 2u) {
      var v = tk_scan[lid];
      if (lid >= off) { v += tk_scan[lid - off]; }
      tk_scan2[lid] = v;
      workgroupBarrier();
      let off2 = off << 1u;
      v = tk_scan2[lid];
      if (lid >= off2) { v += tk_scan2[lid - off2]; }
      tk_scan[lid] = v;
      workgroupBarrier();
    }
    let before = tk_scan[lid] - mine; // exclusive counts in this tile
    var a = above + (before & 0xffffu);
    var t = tied + (before >> 16u);
    for (var j = 0u; j < TL; j++) {
      let key = tk_keys[tk_slot(lid * TL + j)];
      let i = i32(start + base + lid * TL + j);
      if (key > prefix) {
        result[row * K + a + min(t, need)] = i;
        a += 1u;
      } else if (key == prefix) {
        if (t < need) { result[row * K + a + t] = i; }
        t += 1u;
      }
    }
    let total = tk_scan[WG - 1u];
    above += total & 0xffffu;
    tied += total >> 16u;
    workgroupBarrier();
  }
}`;
    return runWgsl({
      key: `topk_chunked_compact_${src.key}`,
      names: [...src.names, 'tkh'],
      inputs: [...src.inputs, hist!],
      outputShape: [R, k],
      dtype: 'int32',
      workgroupSize: WG,
      dispatch: [chunks, R, 1],
      workgroupBytes: 4 * (6 * 256 + 4 + WG * TILE_PER_LANE + (WG * TILE_PER_LANE) / 32),
      code,
    }) as tf.Tensor2D;
  } finally {
    for (const m of made) m.dispose();
  }
}
