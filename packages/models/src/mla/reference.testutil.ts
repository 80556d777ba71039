/**
 * Test support (not exported): tiny random DeepSeek-V2 / V3 checkpoints under transformers' tensor
 * names, and a plain float64 forward of them written from the DeepSeek papers and the reference
 * modeling code — naive MLA (per-head keys and values expanded from the latent), YaRN RoPE, and
 * the MoE router — reading config.json and the tensors directly, sharing no code with the model.
 */
import { exactRandom, rng, type TinyCheckpoint } from '../hf/testutil.js';

/** Which DeepSeek shape a tiny model has. */
export interface TinyDeepseekSpec {
  modelType: 'deepseek_v2' | 'deepseek_v3';
  /** q_lora_rank; null: queries projected directly (V2-Lite). */
  qLoraRank: number | null;
  topkMethod: 'greedy' | 'group_limited_greedy' | 'noaux_tc';
  scoring: 'softmax' | 'sigmoid';
  normTopkProb: boolean;
  routedScalingFactor: number;
  /** V3 only: false rotates in the `half` layout. Default true. */
  ropeInterleave?: boolean;
  /** Give the config YaRN scaling (factor 4 over 64 original positions, mscale 1, mscale_all_dim 0.8). Default true. */
  yarn?: boolean;
  vocabSize?: number;
}

/** Dimensions of every tiny DeepSeek model. */
export const TINY = { D: 32, H: 4, dn: 8, dr: 8, dv: 6, r: 12, L: 3, F: 24, E: 8, Fe: 8, shared: 1, k: 2, nGroup: 4, topkGroup: 2, maxPos: 256 } as const;

/** A random DeepSeek checkpoint: layer 0 dense, layers 1–2 MoE (first_k_dense_replace 1). */
export function tinyDeepseekCheckpoint(spec: TinyDeepseekSpec, seed = 7): TinyCheckpoint {
  const r = rng(seed);
  const { D, H, dn, dr, dv, L, F, E, Fe, shared } = TINY;
  const V = spec.vocabSize ?? 64;
  const kvr = TINY.r;
  const tensors = new Map<string, { shape: number[]; data: Float32Array }>();
  const mat = (name: string, out: number, inn: number, gain = 1) =>
    tensors.set(name, { shape: [out, inn], data: exactRandom(out * inn, r, gain * 2 ** -Math.floor(Math.log2(Math.sqrt(inn)))) });
  const vec = (name: string, n: number, base: number, scale: number) => {
    const v = exactRandom(n, r, scale, 5);
    for (let i = 0; i < n; i++) v[i] += base;
    tensors.set(name, { shape: [n], data: v });
  };
  const swiglu = (p: string, f: number) => {
    mat(`${p}.gate_proj.weight`, f, D);
    mat(`${p}.up_proj.weight`, f, D);
    mat(`${p}.down_proj.weight`, D, f);
  };
  tensors.set('model.embed_tokens.weight', { shape: [V, D], data: exactRandom(V * D, r, 1) });
  for (let l = 0; l < L; l++) {
    const p = `model.layers.${l}`;
    vec(`${p}.input_layernorm.weight`, D, 1, 0.25);
    if (spec.qLoraRank === null) mat(`${p}.self_attn.q_proj.weight`, H * (dn + dr), D, 2);
    else {
      mat(`${p}.self_attn.q_a_proj.weight`, spec.qLoraRank, D);
      vec(`${p}.self_attn.q_a_layernorm.weight`, spec.qLoraRank, 1, 0.25);
      mat(`${p}.self_attn.q_b_proj.weight`, H * (dn + dr), spec.qLoraRank, 2);
    }
    mat(`${p}.self_attn.kv_a_proj_with_mqa.weight`, kvr + dr, D, 2);
    vec(`${p}.self_attn.kv_a_layernorm.weight`, kvr, 1, 0.25);
    mat(`${p}.self_attn.kv_b_proj.weight`, H * (dn + dv), kvr, 2);
    mat(`${p}.self_attn.o_proj.weight`, D, H * dv);
    vec(`${p}.post_attention_layernorm.weight`, D, 1, 0.25);
    if (l === 0) swiglu(`${p}.mlp`, F);
    else {
      mat(`${p}.mlp.gate.weight`, E, D, 2);
      if (spec.topkMethod === 'noaux_tc') vec(`${p}.mlp.gate.e_score_correction_bias`, E, 0, 0.0625);
      for (let e = 0; e < E; e++) swiglu(`${p}.mlp.experts.${e}`, Fe);
      swiglu(`${p}.mlp.shared_experts`, Fe * shared);
    }
  }
  vec('model.norm.weight', D, 1, 0.25);
  mat('lm_head.weight', V, D);
  const yarn = spec.yarn ?? true;
  const config: Record<string, unknown> = {
    architectures: [spec.modelType === 'deepseek_v3' ? 'DeepseekV3ForCausalLM' : 'DeepseekV2ForCausalLM'],
    model_type: spec.modelType,
    hidden_size: D,
    intermediate_size: F,
    moe_intermediate_size: Fe,
    num_hidden_layers: L,
    num_attention_heads: H,
    num_key_value_heads: H,
    vocab_size: V,
    max_position_embeddings: TINY.maxPos,
    rms_norm_eps: 1e-6,
    rope_theta: 10000,
    ...(yarn
      ? { rope_scaling: { type: 'yarn', factor: 4, original_max_position_embeddings: 64, beta_fast: 32, beta_slow: 1, mscale: 0.9, mscale_all_dim: 0.8 } }
      : {}),
    q_lora_rank: spec.qLoraRank,
    kv_lora_rank: kvr,
    qk_nope_head_dim: dn,
    qk_rope_head_dim: dr,
    v_head_dim: dv,
    n_routed_experts: E,
    n_shared_experts: shared,
    num_experts_per_tok: TINY.k,
    first_k_dense_replace: 1,
    moe_layer_freq: 1,
    scoring_func: spec.scoring,
    topk_method: spec.topkMethod,
    n_group: spec.topkMethod === 'greedy' ? 1 : TINY.nGroup,
    topk_group: spec.topkMethod === 'greedy' ? 1 : TINY.topkGroup,
    norm_topk_prob: spec.normTopkProb,
    routed_scaling_factor: spec.routedScalingFactor,
    hidden_act: 'silu',
    tie_word_embeddings: false,
    bos_token_id: 1,
    eos_token_id: 2,
    ...(spec.modelType === 'deepseek_v3' ? { rope_interleave: spec.ropeInterleave ?? true } : {}),
  };
  return { config, tensors };
}

type Cfg = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

const f64 = (ckpt: TinyCheckpoint, name: string) => {
  const t = ckpt.tensors.get(name);
  if (!t) throw new Error(`reference: no tensor ${name}`);
  return Float64Array.from(t.data);
};

/** y = W x for W [out, in] row-major. */
function mv(W: Float64Array, x: Float64Array, out: number): Float64Array {
  const inn = x.length;
  const y = new Float64Array(out);
  for (let o = 0; o < out; o++) {
    let s = 0;
    for (let i = 0; i < inn; i++) s += W[o * inn + i] * x[i];
    y[o] = s;
  }
  return y;
}

function rms(x: Float64Array, w: Float64Array, eps: number): Float64Array {
  let ss = 0;
  for (const v of x) ss += v * v;
  const s = 1 / Math.sqrt(ss / x.length + eps);
  return x.map((v, i) => v * s * w[i]);
}

const silu = (v: number) => v / (1 + Math.exp(-v));

function mlp(ckpt: TinyCheckpoint, p: string, x: Float64Array): Float64Array {
  const g = f64(ckpt, `${p}.gate_proj.weight`);
  const F = g.length / x.length;
  const a = mv(g, x, F);
  const u = mv(f64(ckpt, `${p}.up_proj.weight`), x, F);
  return mv(f64(ckpt, `${p}.down_proj.weight`), a.map((v, i) => silu(v) * u[i]), x.length);
}

/** YaRN per DeepSeek's `DeepseekV2YarnRotaryEmbedding`: inverse frequencies and the cos/sin magnitude. */
function ropeParams(cfg: Cfg, d: number): { inv: Float64Array; mag: number } {
  const theta: number = cfg.rope_theta ?? 10000;
  const inv = new Float64Array(d / 2);
  for (let i = 0; i < d / 2; i++) inv[i] = Math.pow(theta, -(2 * i) / d);
  const rs = cfg.rope_scaling;
  if (!rs) return { inv, mag: 1 };
  const s: number = rs.factor;
  const orig: number = rs.original_max_position_embeddings;
  const dimFor = (rot: number) => (d * Math.log(orig / (rot * 2 * Math.PI))) / (2 * Math.log(theta));
  const lo = Math.max(Math.floor(dimFor(rs.beta_fast ?? 32)), 0);
  let hi = Math.min(Math.ceil(dimFor(rs.beta_slow ?? 1)), d - 1);
  if (hi === lo) hi += 0.001;
  for (let i = 0; i < d / 2; i++) {
    const mask = 1 - Math.min(1, Math.max(0, (i - lo) / (hi - lo))); // 1 = extrapolate
    inv[i] = (inv[i] / s) * (1 - mask) + inv[i] * mask;
  }
  const m = (k: number) => (s <= 1 ? 1 : 0.1 * k * Math.log(s) + 1);
  const mag = rs.mscale && rs.mscale_all_dim ? m(rs.mscale) / m(rs.mscale_all_dim) : m(1);
  return { inv, mag };
}

/** Rotates x [d] at position p: interleaved pairs (x[2i], x[2i+1]) or half pairs (x[i], x[i + d/2]). */
function rotate(x: Float64Array, p: number, inv: Float64Array, mag: number, interleaved: boolean): Float64Array {
  const d = x.length;
  const y = new Float64Array(d);
  for (let i = 0; i < d / 2; i++) {
    const [a, b] = interleaved ? [2 * i, 2 * i + 1] : [i, i + d / 2];
    const c = Math.cos(p * inv[i]) * mag;
    const s = Math.sin(p * inv[i]) * mag;
    y[a] = x[a] * c - x[b] * s;
    y[b] = x[a] * s + x[b] * c;
  }
  return y;
}

/** The smallest score gap that decided a routing choice (float32 rounding must not flip it). */
export interface RoutingMargin {
  min: number;
}

/** DeepSeek MoEGate + experts for one token, float64. */
function moe(ckpt: TinyCheckpoint, cfg: Cfg, p: string, x: Float64Array, margin: RoutingMargin): Float64Array {
  const E: number = cfg.n_routed_experts;
  const k: number = cfg.num_experts_per_tok;
  const logits = mv(f64(ckpt, `${p}.mlp.gate.weight`), x, E);
  let scores: number[];
  if (cfg.scoring_func === 'sigmoid') scores = [...logits].map((v) => 1 / (1 + Math.exp(-v)));
  else {
    const mx = Math.max(...logits);
    const ex = [...logits].map((v) => Math.exp(v - mx));
    const z = ex.reduce((a, b) => a + b, 0);
    scores = ex.map((v) => v / z);
  }
  const bias = cfg.topk_method === 'noaux_tc' ? f64(ckpt, `${p}.mlp.gate.e_score_correction_bias`) : null;
  const choice = scores.map((v, e) => v + (bias ? bias[e] : 0));
  let allowed = choice.map(() => true);
  if (cfg.topk_method !== 'greedy') {
    const G: number = cfg.n_group;
    const per = E / G;
    const gs: number[] = [];
    for (let g = 0; g < G; g++) {
      const m = choice.slice(g * per, (g + 1) * per).sort((a, b) => b - a);
      gs.push(cfg.topk_method === 'noaux_tc' ? m[0] + m[1] : m[0]);
    }
    const order = gs.map((v, g) => [v, g]).sort((a, b) => b[0] - a[0]);
    margin.min = Math.min(margin.min, order[cfg.topk_group - 1][0] - order[cfg.topk_group][0]);
    const keep = new Set(order.slice(0, cfg.topk_group).map(([, g]) => g));
    allowed = choice.map((_, e) => keep.has(Math.floor(e / per)));
  }
  const cand = choice.map((v, e) => [v, e]).filter(([, e]) => allowed[e]).sort((a, b) => b[0] - a[0]);
  if (cand.length > k) margin.min = Math.min(margin.min, cand[k - 1][0] - cand[k][0]);
  const chosen = cand.slice(0, k).map(([, e]) => e);
  let w = chosen.map((e) => scores[e]);
  const sum = w.reduce((a, b) => a + b, 0);
  const f: number = cfg.routed_scaling_factor ?? 1;
  if (cfg.model_type === 'deepseek_v3') w = w.map((v) => (cfg.norm_topk_prob ? v / (sum + 1e-20) : v) * f);
  else w = w.map((v) => (k > 1 && cfg.norm_topk_prob ? v / (sum + 1e-20) : v * f));
  const y = mlp(ckpt, `${p}.mlp.shared_experts`, x);
  chosen.forEach((e, j) => {
    const ye = mlp(ckpt, `${p}.mlp.experts.${e}`, x);
    for (let i = 0; i < y.length; i++) y[i] += w[j] * ye[i];
  });
  return y;
}

/**
 * Float64 causal forward of a tiny DeepSeek checkpoint over `ids` (positions 0…T−1) with naive MLA:
 * every head's keys [W_UK·c ; RoPE(k_R)] and values W_UV·c expanded from the latents.
 * @returns logits [T, V] row-major, and the smallest routing margin seen
 */
export function refDeepseekLogits(ckpt: TinyCheckpoint, ids: readonly number[]): { logits: Float64Array; margin: number } {
  const cfg = ckpt.config as Cfg;
  const D: number = cfg.hidden_size;
  const H: number = cfg.num_attention_heads;
  const dn: number = cfg.qk_nope_head_dim;
  const dr: number = cfg.qk_rope_head_dim;
  const dv: number = cfg.v_head_dim;
  const R: number = cfg.kv_lora_rank;
  const V: number = cfg.vocab_size;
  const eps: number = cfg.rms_norm_eps;
  const T = ids.length;
  const interleaved = cfg.model_type === 'deepseek_v2' || cfg.rope_interleave !== false;
  const { inv, mag } = ropeParams(cfg, dr);
  let scale = 1 / Math.sqrt(dn + dr);
  const rs = cfg.rope_scaling;
  if (rs?.mscale_all_dim) scale *= (0.1 * rs.mscale_all_dim * Math.log(rs.factor) + 1) ** 2;
  const margin: RoutingMargin = { min: Infinity };
  const emb = f64(ckpt, 'model.embed_tokens.weight');
  let xs = ids.map((id) => emb.slice(id * D, (id + 1) * D));
  for (let l = 0; l < cfg.num_hidden_layers; l++) {
    const p = `model.layers.${l}`;
    const keys: Float64Array[][] = []; // [t][h] → [dn + dr]
    const vals: Float64Array[][] = []; // [t][h] → [dv]
    const qs: Float64Array[][] = [];
    for (let t = 0; t < T; t++) {
      const h = rms(xs[t], f64(ckpt, `${p}.input_layernorm.weight`), eps);
      const q =
        cfg.q_lora_rank == null
          ? mv(f64(ckpt, `${p}.self_attn.q_proj.weight`), h, H * (dn + dr))
          : mv(
              f64(ckpt, `${p}.self_attn.q_b_proj.weight`),
              rms(mv(f64(ckpt, `${p}.self_attn.q_a_proj.weight`), h, cfg.q_lora_rank), f64(ckpt, `${p}.self_attn.q_a_layernorm.weight`), eps),
              H * (dn + dr),
            );
      const ckv = mv(f64(ckpt, `${p}.self_attn.kv_a_proj_with_mqa.weight`), h, R + dr);
      const c = rms(ckv.slice(0, R), f64(ckpt, `${p}.self_attn.kv_a_layernorm.weight`), eps);
      const kr = rotate(ckv.slice(R), t, inv, mag, interleaved);
      const kv = mv(f64(ckpt, `${p}.self_attn.kv_b_proj.weight`), c, H * (dn + dv));
      keys.push([]);
      vals.push([]);
      qs.push([]);
      for (let hh = 0; hh < H; hh++) {
        const qh = q.slice(hh * (dn + dr), (hh + 1) * (dn + dr));
        const qr = rotate(qh.slice(dn), t, inv, mag, interleaved);
        const qq = new Float64Array(dn + dr);
        qq.set(qh.slice(0, dn));
        qq.set(qr, dn);
        qs[t].push(qq);
        const k = new Float64Array(dn + dr);
        k.set(kv.slice(hh * (dn + dv), hh * (dn + dv) + dn));
        k.set(kr, dn);
        keys[t].push(k);
        vals[t].push(kv.slice(hh * (dn + dv) + dn, (hh + 1) * (dn + dv)));
      }
    }
    const wo = f64(ckpt, `${p}.self_attn.o_proj.weight`);
    xs = xs.map((x, t) => {
      const o = new Float64Array(H * dv);
      for (let hh = 0; hh < H; hh++) {
        const s: number[] = [];
        for (let j = 0; j <= t; j++) {
          let dot = 0;
          for (let i = 0; i < dn + dr; i++) dot += qs[t][hh][i] * keys[j][hh][i];
          s.push(dot * scale);
        }
        const mx = Math.max(...s);
        const e = s.map((v) => Math.exp(v - mx));
        const z = e.reduce((a, b) => a + b, 0);
        for (let j = 0; j <= t; j++) for (let i = 0; i < dv; i++) o[hh * dv + i] += (e[j] / z) * vals[j][hh][i];
      }
      const x1 = mv(wo, o, D).map((v, i) => v + x[i]);
      const h2 = rms(x1, f64(ckpt, `${p}.post_attention_layernorm.weight`), eps);
      const moeLayer = cfg.n_routed_experts != null && l >= (cfg.first_k_dense_replace ?? 0) && l % (cfg.moe_layer_freq ?? 1) === 0;
      const y = moeLayer ? moe(ckpt, cfg, p, h2, margin) : mlp(ckpt, `${p}.mlp`, h2);
      return x1.map((v, i) => v + y[i]);
    });
  }
  const logits = new Float64Array(T * V);
  const cls = f64(ckpt, 'lm_head.weight');
  xs.forEach((x, t) => logits.set(mv(cls, rms(x, f64(ckpt, 'model.norm.weight'), eps), V), t * V));
  return { logits, margin: margin.min };
}

/** The tiny models of the transformers cross-check (scripts/gpu/hf_logits.py), by folder name. */
export const HF_CHECK_MODELS: Record<string, TinyDeepseekSpec> = {
  // transformers' DeepSeek-V2 scales the routed weights and never normalizes them: norm_topk_prob false.
  deepseek_v2: { modelType: 'deepseek_v2', qLoraRank: 16, topkMethod: 'group_limited_greedy', scoring: 'softmax', normTopkProb: false, routedScalingFactor: 2.25 },
  deepseek_v2_lite: { modelType: 'deepseek_v2', qLoraRank: null, topkMethod: 'greedy', scoring: 'softmax', normTopkProb: false, routedScalingFactor: 1.25 },
  deepseek_v3: { modelType: 'deepseek_v3', qLoraRank: 16, topkMethod: 'noaux_tc', scoring: 'sigmoid', normTopkProb: true, routedScalingFactor: 2.5 },
};
/** Token ids of the cross-check: the first HF_CHECK_PREFILL are the prefill, the rest decode steps. */
export const HF_CHECK_IDS = [1, 17, 42, 5, 33, 8, 61, 20, 3, 50, 12, 44, 9, 27, 63, 0, 38, 14, 2, 55, 31, 7, 46, 22];
export const HF_CHECK_PREFILL = 8;
