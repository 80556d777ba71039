"""PyTorch peers of kvpack's KIVI, MiniCache and SnapKV compression, for xkv_torch.py.

Each function compresses the layers of one group (pre-RoPE keys and values [T, H_kv, d] per layer, the
same matrices kvpack's gpu-perf writes) into the stored form kvpack keeps, on the GPU, with the
settings of kvpack's perf suite:

* ``kivi`` (Liu et al. 2024, jy-yuan/KIVI quant/new_pack.py): post-RoPE keys quantized per channel over
  groups of g tokens, values per token over groups of g channels, asymmetric min-max at b bits with
  fp16 scale and minimum, codes bit-packed into int32 words; the last T mod R key tokens and R value
  tokens stay fp16.
* ``minicache`` (Liu et al. 2024, arXiv 2405.14366 sections 4.1-4.2): layer pairs (S, S+1), ... from
  S = L // 2; per token and KV head, norms, unit directions, SLERP at t (linear where sin < 1e-6),
  the round(gamma*T) most distinct pairs (largest angle) kept exact; all stored fp16 + int32 positions.
* ``snapkv`` (Li et al. 2024, arXiv 2404.14469 section 4.1): the last w queries' softmax weights over
  the post-RoPE keys (causal inside the window), summed over the window, averaged over each KV head's
  query heads, average-pooled (kernel 7, zero padding counted), top budget - w per KV head plus the
  window, gathered keys and values fp16 + int32 positions.
"""
import math

import torch


def pack_codes(codes, bits):
    """Packs integer codes [..., n] (n a multiple of 32 // bits) into int32 words, low bits first."""
    per = 32 // bits
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], -1, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    return (c << shifts).sum(-1).to(torch.int32)  # wraps into int32 as stored bits


def minmax_quantize(x, dim, bits):
    """Asymmetric min-max codes along `dim`, fp16 scale and min (as KIVI's Triton kernel)."""
    mn = x.amin(dim=dim, keepdim=True).half()
    mx = x.amax(dim=dim, keepdim=True)
    maxq = 2**bits - 1
    scale = ((mx - mn.float()) / maxq).half()
    s = scale.float()
    q = torch.where(s > 0, ((x - mn.float()) / torch.where(s > 0, s, torch.ones_like(s))).clamp(0, maxq).round(), torch.zeros_like(x))
    return q.to(torch.uint8), scale, mn


def kivi(layers, rope, bits=2, g=32, R=128):
    """KIVI-b of every layer: [(key codes, key scale, key min, key window, value codes, value scale, value min, value window)]."""
    cos, sin = rope
    out = []
    for K, V in layers:
        T, H, d = K.shape
        post = apply_rope_half(K, cos[:T], sin[:T])
        nk = T - T % R
        kq, ks, km = minmax_quantize(post[:nk].reshape(nk // g, g, H * d), 1, bits)  # per channel over g tokens
        kcodes = pack_codes(kq.transpose(1, 2).reshape(nk // g, H * d, g), bits)
        kwin = post[nk:].half()
        nv = max(0, T - R)
        vq, vs, vm = minmax_quantize(V[:nv].reshape(nv, H, d // g, g), 3, bits)  # per token over g channels
        vcodes = pack_codes(vq.reshape(nv, H * d), bits)
        vwin = V[nv:].half()
        out.append((kcodes, ks, km, kwin, vcodes, vs, vm, vwin))
    return out


def slerp_pair(x0, x1, t, gamma):
    """MiniCache's merge of x0, x1 [T, H, d]: fp16 direction, fp16 norms, retained positions and vectors."""
    T, H, d = x0.shape
    n0 = x0.norm(dim=-1, keepdim=True)
    n1 = x1.norm(dim=-1, keepdim=True)
    u0 = x0 / torch.where(n0 > 0, n0, torch.ones_like(n0))
    u1 = x1 / torch.where(n1 > 0, n1, torch.ones_like(n1))
    omega = torch.acos((u0 * u1).sum(-1, keepdim=True).clamp(-1, 1))
    so = torch.sin(omega)
    par = so < 1e-6
    safe = torch.where(par, torch.ones_like(so), so)
    w0 = torch.where(par, torch.full_like(so, 1 - t), torch.sin((1 - t) * omega) / safe)
    w1 = torch.where(par, torch.full_like(so, t), torch.sin(t * omega) / safe)
    direction = (w0 * u0 + w1 * u1).half()
    k = min(T, max(0, round(gamma * T)))
    ang = omega[..., 0].T  # [H, T]
    idx = torch.topk(ang, k, dim=1).indices.sort(dim=1).values  # [H, k], ascending positions
    rows = idx.T  # [k, H]
    heads = torch.arange(H, device=x0.device).expand(k, H)
    keep0 = x0[rows, heads].half()
    keep1 = x1[rows, heads].half()
    return direction, n0.half(), n1.half(), rows.to(torch.int32), keep0, keep1


def minicache(layers, t=0.6, gamma=0.05):
    """MiniCache over the pairs (S, S+1), ... from S = L // 2: keys (pre-RoPE) and values merged."""
    L = len(layers)
    out = []
    for l0 in range(L // 2, L - 1, 2):
        (k0, v0), (k1, v1) = layers[l0], layers[l0 + 1]
        out.append((slerp_pair(k0, k1, t, gamma), slerp_pair(v0, v1, t, gamma)))
    return out


def snapkv(layers, queries, rope, budget=2048, window=32, kernel=7):
    """SnapKV: per layer and KV head, the budget - w top pooled votes plus the window (fp16 keys/values, int32 positions)."""
    cos, sin = rope
    out = []
    for (K, V), q in zip(layers, queries):
        T, H, d = K.shape
        w = window
        Hq = q.shape[1]
        g = Hq // H
        post = apply_rope_half(K, cos[:T], sin[:T])
        qh = q[-w:].reshape(w, H, g, d).permute(1, 2, 0, 3).reshape(H, g * w, d)
        logits = (qh @ post.permute(1, 2, 0)) / math.sqrt(d)  # [H, g*w, T]
        logits = logits.reshape(H, g, w, T)
        i = torch.arange(w, device=K.device)[:, None]
        j = torch.arange(T, device=K.device)[None, :]
        logits = logits.masked_fill(j > T - w + i, -1e30)
        p = torch.softmax(logits, dim=-1)
        votes = p[..., : T - w].sum(2).mean(1)  # [H, T - w]
        pooled = torch.nn.functional.avg_pool1d(votes[:, None, :], kernel, stride=1, padding=kernel // 2, count_include_pad=True)[:, 0]
        top = torch.topk(pooled, budget - w, dim=1).indices
        win = torch.arange(T - w, T, device=K.device).expand(H, w)
        idx = torch.cat([top, win], dim=1).sort(dim=1).values.T  # [budget, H]
        heads = torch.arange(H, device=K.device).expand(budget, H)
        out.append((post[idx, heads].half(), V[idx, heads].half(), idx.to(torch.int32)))
    return out


def apply_rope_half(x, cos, sin):
    """Rotate-half RoPE of x [T, H, d] with cos/sin [T, 1, d/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
