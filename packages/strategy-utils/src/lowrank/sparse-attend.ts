import * as tf from '@tensorflow/tfjs-core';
import { attention, check, isHostBackend, isWebGpuBackend, wgslWorkgroupStorageLimit } from '@kvpack/core';
import type { ValuePath } from './attend-full.js';
import { addRowMask, causalParts, ownHeadBlock, queryBlocks, ropeScores } from './query-blocks.js';
import type { SparseDecoder } from './sparse-decoder.js';
import { keyRowsFits, keyRowsWgsl, ropeScoresWgsl, selectChunkTokens, softmaxExactWgsl, valuesWgsl, wgslStepFits } from './sparse-wgsl.js';

/*
 * The attend paths of sparse decode (xKV-SR, sparse-index.ts) over a {@link SparseDecoder}: the
 * dispatcher {@link sparseAttend} and its three paths — per KV head with tfjs ops (wasm/cpu), all KV
 * heads batched (GPU), and the WGSL kernels of sparse-wgsl.ts (webgpu, one query token). All compute
 * the same attention (tested against each other).
 */

/** Exact residual (decode) tokens of a layer, [n_dec, H_kv, d] each, or null. */
type Residual = { k: tf.Tensor3D; v: tf.Tensor3D } | null;

/**
 * Per-call settings of {@link sparseAttend}: the token budget, and the tuning switches of kvpack's own
 * tests and benchmarks (reached through `attendWith` of the internal entry, never the public API).
 */
export interface SparseSwitches {
  /** Token budget per KV head for this call (a multiple of chunkSize); default the configured budget. */
  budget?: number;
  /** Value side: compressed domain ((softmax·U_v)·B_v) or reconstruction; default by flop count. */
  values?: ValuePath;
  /** Row gathers: `host` copies rows through the wasm heap (wasm only), `device` uses tf.gather; default host on wasm. */
  gather?: 'auto' | 'host' | 'device';
  /**
   * `loop`: one sequence of 2-D products per KV head (fastest on wasm/cpu, where batched products are
   * slow); `batched`: every KV head in the same kernels — one gather of all heads' selected rows, batched
   * [H_kv, ·, ·] products, one softmax — so a GPU step launches a fixed ~35 kernels instead of ~25 per
   * head. Default (`auto`): `loop` on wasm/cpu, `batched` elsewhere. Both compute the same attention.
   */
  heads?: 'auto' | 'loop' | 'batched';
  /**
   * Kernels of the batched path on the webgpu backend: `wgsl` runs a one-token step as 9 dispatches
   * (sparse-wgsl.ts: chunk selection, the selected keys' product read from the packed factors, RoPE
   * scores, softmax, values — plus tfjs's query scale and the exact rows' unpacking); `tfjs` composes
   * tfjs ops. Default (`auto`): `wgsl` on webgpu for one query token
   * with exact rows (E₀ > 0), else `tfjs`. Both compute the same attention.
   */
  kernels?: 'auto' | 'tfjs' | 'wgsl';
}


/**
 * The value side of a sparse step over S selected rows for g·n query rows (value rank R_v, head_dim
 * d): `compressed`, (p·U_v[rows])·B_v, costs g·n·S·R_v + g·n·R_v·d multiply–adds; `reconstruct`,
 * p·(U_v[rows]·B_v), costs S·R_v·d + g·n·S·d. `auto` takes the cheaper.
 */
function sparseValuePath(values: ValuePath, gn: number, S: number, Rv: number, d: number): 'compressed' | 'reconstruct' {
  if (values !== 'auto') return values;
  return gn * S * Rv + gn * Rv * d <= S * Rv * d + gn * S * d ? 'compressed' : 'reconstruct';
}

/**
 * Sparse attention of post-RoPE queries q [n, H, d] over one layer (xKV-SR, see sparse-index.ts): per KV
 * head, the top chunks by landmark score up to the budget, their keys rebuilt as
 * RoPE(U_k[rows]·B_k[:, h]) at their positions and their values in the compressed domain
 * ((p·U_v[rows])·B_v[:, h]) or rebuilt (by flop count), plus the head's exact outlier and local
 * tokens and the exact residual decode tokens, under one softmax. Returns [n, H, d].
 * When the causal mask reaches into the prefill (the queries' own tokens are prefill tokens and
 * n > 1) it falls back to core attention over the full representation (keys()/values()).
 */
export function sparseAttend(
  dec: SparseDecoder,
  layer: number,
  q: tf.Tensor3D,
  tail: number,
  residual: Residual,
  full: () => { k: tf.Tensor3D; v: tf.Tensor3D },
  opts: SparseSwitches = {},
): tf.Tensor3D {
  const src = dec.state.src;
  const nDec = residual ? residual.k.shape[0] : 0;
  const budget = opts.budget ?? dec.index.options.budget;
  check(
    Number.isInteger(budget) && budget > 0 && budget % dec.index.chunkSize === 0,
    'config',
    `sparse attend: budget ${budget} must be a positive multiple of chunkSize ${dec.index.chunkSize}`,
  );
  if (causalParts(q.shape[0], src.prefillLength, nDec, tail).pre) {
    return tf.tidy(() => {
      const { k, v } = full();
      return attention(q, k, v, tail);
    });
  }
  const heads = opts.heads ?? 'auto';
  check(heads === 'auto' || heads === 'loop' || heads === 'batched', 'config', `sparse attend: heads must be 'auto', 'loop' or 'batched', got ${String(heads)}`);
  const kernels = opts.kernels ?? 'auto';
  check(kernels === 'auto' || kernels === 'tfjs' || kernels === 'wgsl', 'config', `sparse attend: kernels must be 'auto', 'tfjs' or 'wgsl', got ${String(kernels)}`);
  check(kernels !== 'wgsl' || heads !== 'loop', 'config', "sparse attend: kernels: 'wgsl' is a batched path (it needs heads: 'batched' or 'auto', not 'loop')");
  check(kernels !== 'wgsl' || opts.values === undefined || opts.values === 'compressed', 'config', "sparse attend: kernels: 'wgsl' computes values in the compressed domain (values: 'reconstruct' needs kernels: 'tfjs')");
  if (heads === 'batched' || (heads === 'auto' && !isHostBackend())) {
    check(opts.gather !== 'host', 'config', "sparse attend: the batched path gathers on the device (gather: 'host' needs heads: 'loop')");
    const webgpu = isWebGpuBackend();
    const { nKvHeads, headDim } = dec.state.src.layout;
    const fits = webgpu && wgslStepFits(q.shape[1] / nKvHeads, headDim, dec.state.rank('v', layer), dec.index.chunks, wgslWorkgroupStorageLimit());
    const wgslOk = webgpu && q.shape[0] === 1 && dec.exactPerHead > 0 && dec.selectedChunks(budget) > 0 && fits;
    check(
      kernels !== 'wgsl' || wgslOk,
      'unsupported',
      `sparse attend: WGSL kernels need the webgpu backend (now ${tf.getBackend()}), one query token (got ${q.shape[0]}), exact rows, a budget of at least one chunk, ` +
        `and arrays that fit the device's workgroup memory and WGSL's 8 KiB per-invocation variables (${fits ? 'they do' : 'they do not'})`,
    );
    if (kernels === 'wgsl' || (kernels === 'auto' && wgslOk && (opts.values ?? 'compressed') === 'compressed')) return attendWgsl(dec, layer, q, residual, budget);
    return attendBatched(dec, layer, q, tail, residual, budget, opts.values ?? 'auto');
  }
  const useHost = (opts.gather ?? 'auto') === 'host' || ((opts.gather ?? 'auto') === 'auto' && tf.getBackend() === 'wasm');
  check(!useHost || tf.getBackend() === 'wasm', 'unsupported', `sparse attend: host gathers need the wasm backend, not ${tf.getBackend()}`);
  return attendLoop(dec, layer, q, tail, residual, budget, opts.values ?? 'auto', useHost);
}

/**
 * The per-KV-head form of {@link sparseAttend} (wasm/cpu default): one sequence of 2-D products per KV
 * head; `useHost` gathers the selected rows through the wasm heap instead of tf.gather.
 */
function attendLoop(
  dec: SparseDecoder,
  layer: number,
  q: tf.Tensor3D,
  tail: number,
  residual: Residual,
  budget: number,
  values: ValuePath,
  useHost: boolean,
): tf.Tensor3D {
  const src = dec.state.src;
  const { nKvHeads: Hkv, headDim: d } = src.layout;
  const F = Hkv * d;
  const nDec = residual ? residual.k.shape[0] : 0;
  return tf.tidy(() => {
    const t = dec.loopTensors(layer);
    const qb = queryBlocks(q, src.layout, dec.state.pairSwap());
    const { n, H, g } = qb;
    const gn = g * n;
    const masks = causalParts(n, src.prefillLength, nDec, tail);
    const sel = dec.selectChunks(layer, qb, budget, t); // [H_kv, k] int32
    const hostChunks = sel && useHost ? (sel.dataSync() as Int32Array) : null;
    const perHeadChunks = sel && !useHost ? (Hkv === 1 ? [tf.reshape(sel, [-1]) as tf.Tensor1D] : (tf.unstack(sel, 0) as tf.Tensor1D[])) : null;
    const k = sel ? sel.shape[1] : 0;
    const S = k * dec.index.chunkSize;
    // Per-call operands, made on first need: the dense bases and tables only where rows are gathered on the device.
    const once = <T>(f: () => T) => {
      let v: T | undefined;
      return () => (v ??= f());
    };
    const tabs = once(() => dec.state.tables());
    const hostTabs = useHost ? dec.state.tableData() : null;
    const Ukb = src.basisBlock('k', layer);
    const Uvb = src.basisBlock('v', layer);
    const Uk = once(() => dec.state.basis('k', layer));
    const Uv = once(() => dec.state.basis('v', layer));
    const Bh = S > 0 ? dec.state.headFactors(dec.state.factor('k', layer)) : [];
    const Bvh = S > 0 ? dec.state.headFactors(dec.state.factor('v', layer)) : [];
    const Rv = Uvb.cols;
    const path = sparseValuePath(values, gn, S, Rv, d);
    // Residual (exact decode) tokens: scores for all heads at once through the block-diagonal queries.
    const Sres = nDec > 0 ? addRowMask(tf.transpose(tf.matMul(tf.reshape(residual!.k, [nDec, F]) as tf.Tensor2D, qb.blockDiag)) as tf.Tensor2D, masks.res, n) : null;
    const resRows = Sres ? (Hkv === 1 ? [Sres] : (tf.split(Sres, Hkv, 0) as tf.Tensor2D[])) : null;
    const outs: tf.Tensor2D[] = [];
    const zs: tf.Tensor2D[] = [];
    const eres: tf.Tensor2D[] = [];
    for (let h = 0; h < Hkv; h++) {
      const parts: tf.Tensor2D[] = []; // [g·n, ·] score blocks: selected, exact, residual
      let Uvs: tf.Tensor2D | null = null;
      if (S > 0) {
        const ch = hostChunks ? hostChunks.subarray(h * k, (h + 1) * k) : perHeadChunks![h];
        const Us = dec.gatherBlockChunks(Ukb, ch, useHost, Uk);
        const hc = ch instanceof Int32Array ? ch : null;
        const cs = hostTabs && hc ? dec.gatherHostRows(hostTabs.cos, d, hc) : dec.gatherChunks(tabs().cos, ch, useHost);
        const sn = hostTabs && hc ? dec.gatherHostRows(hostTabs.sin, d, hc) : dec.gatherChunks(tabs().sin, ch, useHost);
        parts.push(ropeScores(tf.matMul(Us, Bh[h]), cs, sn, qb, h)); // keys at their positions, never materialized
        Uvs = dec.gatherBlockChunks(Uvb, ch, useHost, Uv);
      }
      if (dec.exactPerHead > 0) parts.push(tf.transpose(tf.matMul(t.kx[h], qb.cols[h])) as tf.Tensor2D);
      if (resRows) parts.push(resRows[h]);
      let m = tf.max(parts[0], 1, true);
      for (let i = 1; i < parts.length; i++) m = tf.maximum(m, tf.max(parts[i], 1, true));
      const E = parts.map((s) => tf.exp(tf.sub(s, m)) as tf.Tensor2D);
      zs.push(E.reduce((acc, e) => tf.add(acc, tf.sum(e, 1, true)) as tf.Tensor2D, tf.zeros([gn, 1]) as tf.Tensor2D));
      let o = tf.zeros([gn, d]) as tf.Tensor2D;
      let i = 0;
      if (S > 0) {
        const Es = E[i++];
        o = tf.add(o, path === 'compressed' ? tf.matMul(tf.matMul(Es, Uvs!), Bvh[h]) : tf.matMul(Es, tf.matMul(Uvs!, Bvh[h]))) as tf.Tensor2D;
      }
      if (dec.exactPerHead > 0) o = tf.add(o, tf.matMul(E[i++], t.vx[h])) as tf.Tensor2D;
      if (resRows) eres.push(E[i++]);
      outs.push(o);
    }
    let O = Hkv === 1 ? outs[0] : (tf.concat(outs, 0) as tf.Tensor2D); // [H·n, d]
    const z = Hkv === 1 ? zs[0] : (tf.concat(zs, 0) as tf.Tensor2D);
    if (eres.length) {
      const Er = Hkv === 1 ? eres[0] : (tf.concat(eres, 0) as tf.Tensor2D);
      O = tf.add(O, ownHeadBlock(tf.matMul(Er, tf.reshape(residual!.v, [nDec, F]) as tf.Tensor2D), qb, d)) as tf.Tensor2D;
    }
    return tf.transpose(tf.reshape(tf.div(O, z), [H, n, d]), [1, 0, 2]) as tf.Tensor3D;
  });
}

/**
 * One query token's sparse step on the webgpu backend in 9 dispatches (see sparse-wgsl.ts): the same
 * selection, scores and softmax as {@link attendBatched}, values in the compressed domain. A single
 * query token is never causally masked (the residual rows all precede it).
 */
function attendWgsl(dec: SparseDecoder, layer: number, q: tf.Tensor3D, residual: Residual, budget: number): tf.Tensor3D {
  const src = dec.state.src;
  const { nKvHeads: Hkv, headDim: d } = src.layout;
  const c = dec.index.chunkSize;
  const E0 = dec.exactPerHead;
  const k = dec.selectedChunks(budget);
  return tf.tidy(() => {
    // Per call: the landmarks, both bases and both factors are read packed by the kernels
    // (unpack2x16float), only the small exact rows are unpacked; the RoPE tables are core's shared
    // device tables (not the cache's).
    const t = dec.wgslTensors(layer);
    const H = q.shape[1];
    const g = H / Hkv;
    // The attention scale 1/√d is applied by the kernels as they read the queries (no scalar upload).
    const scale = 1 / Math.sqrt(d);
    const qh = tf.reshape(q, [Hkv, g, d]) as tf.Tensor3D;
    const tok = selectChunkTokens(qh, t.lt, t.outliers, k, c, scale); // [H_kv, S]
    const S = k * c;
    const Rk = dec.state.rank('k', layer);
    const y = keyRowsFits(d)
      ? keyRowsWgsl(tok, dec.state.basisHeld('k', layer), dec.state.factorHeld('k', layer), d)
      : (tf.matMul(tf.reshape(dec.state.basisRows('k', layer, tf.reshape(tok, [-1])), [Hkv, S, Rk]), dec.state.stackedHeadFactors(dec.state.factor('k', layer))) as tf.Tensor3D);
    const { cos, sin } = dec.state.tables();
    const ss = ropeScoresWgsl(qh, y, tok, cos, sin, src.rope.layout === 'interleaved', scale);
    let kx = tf.reshape(t.exactK, [Hkv, E0, d]) as tf.Tensor3D;
    let vx = tf.reshape(t.exactV, [Hkv, E0, d]) as tf.Tensor3D;
    if (residual && residual.k.shape[0] > 0) {
      kx = tf.concat([kx, tf.transpose(residual.k, [1, 0, 2])], 1) as tf.Tensor3D;
      vx = tf.concat([vx, tf.transpose(residual.v, [1, 0, 2])], 1) as tf.Tensor3D;
    }
    const p = softmaxExactWgsl(ss, qh, kx, scale);
    const o = valuesWgsl(p, tok, dec.state.basisHeld('v', layer), dec.state.factorHeld('v', layer), vx);
    return tf.reshape(o, [1, H, d]) as tf.Tensor3D;
  });
}

/**
 * The batched form of {@link sparseAttend} (every KV head in the same kernels; see
 * {@link SparseSwitches.heads}): chunk scores [H_kv, g·n, C] from the stacked landmarks, top-k
 * chunks per head, ONE gather of all heads' selected basis rows and RoPE table rows ([H_kv·S]), keys
 * rebuilt as [H_kv, S, R]·[H_kv, R, d], scores against the queries and their pair swap (RoPE moved to
 * the queries as in {@link ropeScores}), the exact and residual scores, one softmax over
 * [H_kv, g·n, S + E₀ + n_dec], and values as (p·U_v[rows])·B_v (or p·(U_v[rows]·B_v), by flop count).
 * Same result as the loop path up to float32 rounding (tested).
 */
function attendBatched(
  dec: SparseDecoder,
  layer: number,
  q: tf.Tensor3D,
  tail: number,
  residual: Residual,
  budget: number,
  values: ValuePath,
): tf.Tensor3D {
  const src = dec.state.src;
  const { nKvHeads: Hkv, headDim: d } = src.layout;
  const c = dec.index.chunkSize;
  const C = dec.index.chunks;
  const E0 = dec.exactPerHead;
  const nDec = residual ? residual.k.shape[0] : 0;
  return tf.tidy(() => {
    const t = dec.tensors(layer);
    const [n, H] = q.shape;
    const g = H / Hkv;
    const gn = g * n;
    const masks = causalParts(n, src.prefillLength, nDec, tail);
    const qh = tf.reshape(tf.mul(tf.transpose(q, [1, 0, 2]), 1 / Math.sqrt(d)), [Hkv, gn, d]) as tf.Tensor3D; // row ii·n + j
    const k = dec.selectedChunks(budget);
    const S = k * c;
    const parts: tf.Tensor3D[] = []; // score blocks [H_kv, g·n, ·]: selected, exact, residual
    let tok: tf.Tensor1D | null = null;
    if (S > 0) {
      let a = tf.matMul(qh, t.ltAll) as tf.Tensor3D; // [H_kv, g·n, C]
      if (t.mask) a = tf.add(a, t.mask);
      const p = tf.softmax(a, -1);
      let score = tf.max(n === 1 ? tf.reshape(p, [Hkv, g, C]) : tf.sum(tf.reshape(p, [Hkv, g, n, C]), 2), 1); // [H_kv, C]
      if (t.mask) score = tf.add(score, tf.reshape(t.mask, [Hkv, C])); // outliers never selected (see chunkScores)
      const sel = tf.topk(score, k).indices; // [H_kv, k]
      tok = tf.reshape(tf.add(tf.reshape(tf.mul(sel, tf.scalar(c, 'int32')), [Hkv, k, 1]), tf.reshape(tf.range(0, c, 1, 'int32'), [1, 1, c])), [-1]) as tf.Tensor1D;
      const Rk = dec.state.rank('k', layer);
      const Y = tf.matMul(tf.reshape(dec.state.basisRows('k', layer, tok), [Hkv, S, Rk]), dec.state.stackedHeadFactors(dec.state.factor('k', layer))); // pre-RoPE rows [H_kv, S, d]
      const { cos, sin } = dec.state.tables();
      const cs = tf.reshape(tf.gather(cos, tok), [Hkv, S, d]);
      const sn = tf.reshape(tf.gather(sin, tok), [Hkv, S, d]);
      const qsw = tf.reshape(tf.matMul(tf.reshape(qh, [Hkv * gn, d]) as tf.Tensor2D, dec.state.pairSwap(), false, true), [Hkv, gn, d]); // rows (P·q)ᵀ
      parts.push(tf.add(tf.matMul(qh, tf.mul(Y, cs), false, true), tf.matMul(qsw, tf.mul(Y, sn), false, true)) as tf.Tensor3D);
    }
    if (E0 > 0) parts.push(tf.matMul(qh, tf.reshape(t.exactK, [Hkv, E0, d]), false, true) as tf.Tensor3D);
    let Vres: tf.Tensor3D | null = null;
    if (nDec > 0) {
      let sr = tf.matMul(qh, tf.transpose(residual!.k, [1, 0, 2]), false, true) as tf.Tensor3D; // [H_kv, g·n, n_dec]
      if (masks.res) sr = tf.reshape(tf.add(tf.reshape(sr, [Hkv, g, n, nDec]), tf.tensor4d(masks.res, [1, 1, n, nDec])), [Hkv, gn, nDec]);
      parts.push(sr);
      Vres = tf.transpose(residual!.v, [1, 0, 2]) as tf.Tensor3D;
    }
    const all = parts.length === 1 ? parts[0] : (tf.concat(parts, 2) as tf.Tensor3D);
    const e = tf.exp(tf.sub(all, tf.max(all, 2, true))) as tf.Tensor3D;
    const z = tf.sum(e, 2, true);
    const sizes = [S, E0, nDec].filter((x) => x > 0);
    const E = sizes.length === 1 ? [e] : (tf.split(e, sizes, 2) as tf.Tensor3D[]);
    let i = 0;
    let o: tf.Tensor3D | null = null;
    const add = (x: tf.Tensor3D) => (o = o ? (tf.add(o, x) as tf.Tensor3D) : x);
    if (S > 0) {
      const Rv = dec.state.rank('v', layer);
      const Uvs = tf.reshape(dec.state.basisRows('v', layer, tok!), [Hkv, S, Rv]) as tf.Tensor3D;
      const Bv = dec.state.stackedHeadFactors(dec.state.factor('v', layer));
      const compressed = sparseValuePath(values, gn, S, Rv, d) === 'compressed';
      add(compressed ? (tf.matMul(tf.matMul(E[i++], Uvs), Bv) as tf.Tensor3D) : (tf.matMul(E[i++], tf.matMul(Uvs, Bv)) as tf.Tensor3D));
    }
    if (E0 > 0) add(tf.matMul(E[i++], tf.reshape(t.exactV, [Hkv, E0, d])) as tf.Tensor3D);
    if (nDec > 0) add(tf.matMul(E[i++], Vres!) as tf.Tensor3D);
    return tf.transpose(tf.reshape(tf.div(o!, z), [H, n, d]), [1, 0, 2]) as tf.Tensor3D;
  });
}
