#!/usr/bin/env python3
"""PyTorch peer of kvpack's perf suite: the same xKV work, timed in PyTorch on the same GPU.

What it measures, each a median of --reps runs after --warmup warm-up runs, timed with CUDA events
(host clock + synchronize on CPU):

* ``torch.svd_lowrank(X, q=RANK, niter=n)`` for n in --niters (default 0, 1, 2) on each matrix,
  with its relative Frobenius error ||X - U S V^T|| / ||X||;
* a PyTorch xKV compress of a G-layer group (X = [T, G*H_kv*d]): ``svd_lowrank`` at the group rank,
  singular values split evenly (U*sqrt(S), sqrt(S)*V^T, as the xKV authors' ``fake_svd``), stored in
  fp16 (basis [T, r], one [r, H_kv*d] factor per layer);
* reconstruction of one layer: keys = RoPE(U @ B_l) (Llama-3.1 RoPE: theta 500000, llama3 scaling,
  rotate-half), values = U @ B_l, in fp32 from fp32 copies of the fp16 factors (--half: in fp16);
* dense attention of one query token over one uncompressed layer (the decode baseline).

Input: --matrices DIR, written by kvpack's GPU entry (``gpu-perf.ts --matrices DIR``): ``meta.json``
({"T", "F", "matrices": [{"name", "file"}], "group_layers", "kv_heads", "head_dim"}) and raw
little-endian float32 row-major [T, F] files. Or --synthetic: a matrix of the same shape with the same
spectral model as kvpack's generator (power-law singular values over a noise floor, random
orthonormal mixing); the same structure, not the same numbers.

Output: a table on stdout and, with --json FILE, the results as JSON (format "kvpack-peer/1").
Needs python3 with PyTorch (CUDA for the GPU numbers) and numpy; nothing else.

    python3 scripts/gpu/xkv_torch.py --matrices /tmp/kvpack-mats --json /tmp/peer.json
    python3 scripts/gpu/xkv_torch.py --synthetic --T 32768 --F 4096 --rank 512
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines_torch  # noqa: E402

# Llama-3.1-8B's RoPE (config.json): theta 500000, rope_scaling llama3.
ROPE = dict(theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def llama3_inv_freq(head_dim, rope=ROPE):
    """Inverse RoPE frequencies with llama3 scaling, as Hugging Face's _compute_llama3_parameters (float64)."""
    inv = 1.0 / (rope["theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    low_wavelen = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high_wavelen = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    out = inv.copy()
    for i, f in enumerate(inv):
        wavelen = 2 * math.pi / f
        if wavelen > low_wavelen:
            out[i] = f / rope["factor"]
        elif wavelen >= high_wavelen:
            smooth = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"]
            )
            out[i] = (1 - smooth) * f / rope["factor"] + smooth * f
    return out


def rope_tables(T, head_dim, device):
    """cos, sin [T, 1, d/2] float32 for positions 0..T-1 (computed in float64, like kvpack's ropeTables)."""
    ang = np.outer(np.arange(T, dtype=np.float64), llama3_inv_freq(head_dim))
    cos = torch.from_numpy(np.cos(ang).astype(np.float32)).to(device).unsqueeze(1)
    sin = torch.from_numpy(np.sin(ang).astype(np.float32)).to(device).unsqueeze(1)
    return cos, sin


def apply_rope_half(x, cos, sin):
    """Rotate-half RoPE of x [T, H, d] with cos/sin [T, 1, d/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, reps, warmup):
    """Median ms of fn() over `reps` runs after `warmup` runs (CUDA events on GPU, perf_counter on CPU)."""
    samples = []
    for i in range(warmup + reps):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            sync(device)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            out = fn()
            dt = (time.perf_counter() - t0) * 1000
        del out
        if i >= warmup:
            samples.append(dt)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples), "samples_ms": samples}


def synthetic_matrix(T, F, seed, decay, noise, device):
    """X = sqrt(F) * Z diag(sigma) Q^T: power-law spectrum over a noise floor (kvpack's spectral model)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    j = torch.arange(1, F + 1, dtype=torch.float64)
    w = j ** (-2 * decay)
    sigma = torch.sqrt((1 - noise) * w / w.sum() + noise / F).to(torch.float32)
    Q, _ = torch.linalg.qr(torch.randn(F, F, generator=g, dtype=torch.float64))
    W = (sigma[:, None] * Q.T.to(torch.float32)) * math.sqrt(F)
    Z = torch.randn(T, F, generator=g, dtype=torch.float32)
    return (Z.to(device) @ W.to(device)).contiguous()


def load_matrices(path, device):
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    T, F = int(meta["T"]), int(meta["F"])
    mats = []
    for m in meta["matrices"]:
        file = os.path.join(path, m["file"])
        a = np.fromfile(file, dtype="<f4")
        if a.size != T * F:
            sys.exit(f"xkv_torch.py: {file} holds {a.size} float32 values, expected T*F = {T}*{F} = {T * F}")
        mats.append((m["name"], torch.from_numpy(a.reshape(T, F)).to(device)))
    queries = []
    for q in meta.get("queries", []):
        a = np.fromfile(os.path.join(path, q["file"]), dtype="<f4")
        queries.append(torch.from_numpy(a.reshape(q["shape"])).to(device))
    meta["_queries"] = queries
    return meta, mats


def exact_rel_err(X, rank):
    """Relative Frobenius error of the exact truncated SVD at `rank`: sqrt(sum of the trailing eigenvalues of XᵀX / trace), in float64."""
    Xd = X.double()
    lam = torch.linalg.eigvalsh(Xd.T @ Xd).clamp_min(0).flip(0)
    return math.sqrt(lam[rank:].sum().item() / lam.sum().item())


def rel_err(X, U, S, V):
    return (torch.linalg.norm(X - (U * S) @ V.T) / torch.linalg.norm(X)).item()


def xkv_compress(X, rank, niter, layers):
    """One group's xKV factors: fp16 basis U*sqrt(S) [T, r] and per-layer factors sqrt(S)*V_l^T [r, F/G]."""
    U, S, V = torch.svd_lowrank(X, q=rank, niter=niter)
    sq = S.sqrt()
    basis = (U * sq).half()
    coeffs = (sq[:, None] * V.T).half()
    factors = [c.contiguous() for c in coeffs.chunk(layers, dim=1)]
    return basis, factors


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--matrices", help="folder with meta.json and raw float32 [T, F] files (kvpack gpu-perf --matrices)")
    src.add_argument("--synthetic", action="store_true", help="generate two [T, F] matrices (keys-like and values-like spectra)")
    ap.add_argument("--T", type=int, default=32768, help="tokens of the synthetic matrices (default 32768)")
    ap.add_argument("--F", type=int, default=4096, help="features of the synthetic matrices (default 4096 = 4 layers x 8 KV heads x 128)")
    ap.add_argument("--group-layers", type=int, default=4, help="layers in the group for the synthetic matrices (default 4)")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rank", type=int, default=512, help="q of svd_lowrank = the group rank (default 512)")
    ap.add_argument("--niters", default="0,1,2", help="power iterations to time (default 0,1,2)")
    ap.add_argument("--xkv-niter", type=int, default=2, help="niter of the PyTorch xKV compress (default 2)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (default off: plain fp32, like kvpack)")
    ap.add_argument("--half", action="store_true", help="reconstruct in fp16 (the xKV authors' dtype; CUDA only) instead of fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--baselines", default="kivi,minicache,snapkv", help="baseline peers to time on the group's layers (default kivi,minicache,snapkv; empty: none)")
    a = ap.parse_args(argv)

    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    torch.backends.cudnn.allow_tf32 = a.tf32
    device = torch.device(a.device)
    torch.manual_seed(a.seed)
    if a.matrices:
        meta, mats = load_matrices(a.matrices, device)
        G = int(meta.get("group_layers", a.group_layers))
        Hkv = int(meta.get("kv_heads", a.kv_heads))
        d = int(meta.get("head_dim", a.head_dim))
        source = f"matrices {a.matrices}"
    else:
        G, Hkv, d = a.group_layers, a.kv_heads, a.head_dim
        mats = [
            ("xk", synthetic_matrix(a.T, a.F, a.seed, 1.0, 0.02, device)),
            ("xv", synthetic_matrix(a.T, a.F, a.seed + 1, 0.8, 0.05, device)),
        ]
        source = "synthetic"
    T, F = mats[0][1].shape
    if F != G * Hkv * d:
        sys.exit(f"xkv_torch.py: F = {F} is not group_layers*kv_heads*head_dim = {G}*{Hkv}*{d}")
    niters = [int(s) for s in a.niters.split(",") if s.strip()]
    run = lambda fn: time_ms(fn, device, a.reps, a.warmup)  # noqa: E731

    res = {
        "format": "kvpack-peer/1",
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "tf32": a.tf32,
        "source": source,
        "T": T,
        "F": F,
        "rank": a.rank,
        "group_layers": G,
        "reps": a.reps,
        "warmup": a.warmup,
        "matrices": [],
    }
    for name, X in mats:
        entry = {"name": name, "svd_lowrank": {}, "rel_err": {}}
        for n in niters:
            entry["svd_lowrank"][str(n)] = run(lambda: torch.svd_lowrank(X, q=a.rank, niter=n))
            entry["rel_err"][str(n)] = rel_err(X, *torch.svd_lowrank(X, q=a.rank, niter=n))
        # The two dense products a range finder cannot avoid, at the same sizes.
        omega = torch.randn(F, a.rank, device=device)
        qt = torch.randn(a.rank, T, device=device)
        entry["x_omega"] = run(lambda: X @ omega)
        entry["qt_x"] = run(lambda: qt @ X)
        # The four products of a rank-r range finder with one power iteration: X·Ω, Xᵀ·Q, X·Z, Qᵀ·X.
        q_tall = torch.randn(T, a.rank, device=device)
        entry["xt_q"] = run(lambda: X.T @ q_tall)
        entry["range_finder_products_ms"] = 2 * entry["x_omega"]["median_ms"] + entry["xt_q"]["median_ms"] + entry["qt_x"]["median_ms"]
        entry["exact_rel_err"] = exact_rel_err(X, a.rank)
        del q_tall
        entry["xkv_compress"] = run(lambda: xkv_compress(X, a.rank, a.xkv_niter, G))
        res["matrices"].append(entry)

    # Reconstruction of one layer from the keys' factors, and dense attention over one layer.
    cos, sin = rope_tables(T, d, device)
    basis, factors = xkv_compress(mats[0][1], a.rank, a.xkv_niter, G)
    # Working copies in the compute dtype (kvpack keeps float32 copies of its fp16 factors too).
    cdt = torch.float16 if a.half else torch.float32
    U = basis.to(cdt)
    B = factors[-1].to(cdt)
    res["reconstruct_dtype"] = str(cdt).replace("torch.", "")
    res["reconstruct_keys"] = run(lambda: apply_rope_half((U @ B).view(T, Hkv, d), cos.to(cdt), sin.to(cdt)))
    res["reconstruct_values"] = run(lambda: (U @ B).view(T, Hkv, d))
    K = apply_rope_half(mats[0][1][:, -Hkv * d :].reshape(T, Hkv, d), cos, sin).permute(1, 0, 2).contiguous()  # [Hkv, T, d]
    V = mats[-1][1][:, -Hkv * d :].reshape(T, Hkv, d).permute(1, 0, 2).contiguous()
    q = torch.randn(Hkv, 4, d, device=device)  # 32 query heads = 8 KV heads x 4

    def dense_step():
        s = torch.softmax((q @ K.transpose(1, 2)) / math.sqrt(d), dim=-1)
        return s @ V

    res["dense_attention"] = run(dense_step)
    res["range_finder_products_kv_ms"] = sum(m["range_finder_products_ms"] for m in res["matrices"])

    # Baseline peers on the same layers (the group's per-layer slices of X_K and X_V).
    layers = [
        (mats[0][1][:, l * Hkv * d : (l + 1) * Hkv * d].reshape(T, Hkv, d), mats[-1][1][:, l * Hkv * d : (l + 1) * Hkv * d].reshape(T, Hkv, d))
        for l in range(G)
    ]
    queries = meta.get("_queries", []) if a.matrices else []
    if not queries:
        gq = torch.Generator(device="cpu").manual_seed(a.seed + 5)
        queries = [torch.randn(32, 4 * Hkv, d, generator=gq).to(device) for _ in range(G)]
    peers = {
        "kivi 2-bit": lambda: baselines_torch.kivi(layers, (cos, sin), bits=2, g=32, R=128),
        "minicache": lambda: baselines_torch.minicache(layers, t=0.6, gamma=0.05),
        "snapkv 2048": lambda: baselines_torch.snapkv(layers, queries, (cos, sin), budget=2048, window=32),
    }
    wanted = [b.strip() for b in a.baselines.split(",") if b.strip()]
    res["baselines"] = {label: run(fn) for label, fn in peers.items() if label.split(" ")[0] in wanted}
    res["baseline_layers"] = G
    res["xkv_compress_kv_ms"] = sum(m["xkv_compress"]["median_ms"] for m in res["matrices"])
    res["svd_lowrank_kv_ms"] = {str(n): sum(m["svd_lowrank"][str(n)]["median_ms"] for m in res["matrices"]) for n in niters}

    print(f"PyTorch {res['torch']} on {res['device']} (tf32 {'on' if a.tf32 else 'off'}), {source}: [{T} x {F}], rank {a.rank}")
    print("| matrix | " + " | ".join(f"svd_lowrank niter={n} (rel err)" for n in niters) + " | X·Ω | Qᵀ·X | xKV compress |")
    print("| --- " * (len(niters) + 4) + "|")
    for m in res["matrices"]:
        cells = [f"{m['svd_lowrank'][str(n)]['median_ms']:.1f} ms ({m['rel_err'][str(n)]:.4f})" for n in niters]
        print(
            f"| {m['name']} | " + " | ".join(cells)
            + f" | {m['x_omega']['median_ms']:.1f} ms | {m['qt_x']['median_ms']:.1f} ms | {m['xkv_compress']['median_ms']:.1f} ms |"
        )
    print(
        f"reconstruct one layer: keys (with RoPE) {res['reconstruct_keys']['median_ms']:.2f} ms, values {res['reconstruct_values']['median_ms']:.2f} ms; "
        f"dense attention, one query, one layer: {res['dense_attention']['median_ms']:.3f} ms"
    )
    print(f"range-finder products (X·Ω, Xᵀ·Q, X·Z, Qᵀ·X) of K+V: {res['range_finder_products_kv_ms']:.1f} ms; exact truncated SVD rel err: "
          + ", ".join(f"{m['name']} {m['exact_rel_err']:.4f}" for m in res["matrices"]))
    for label, t in res["baselines"].items():
        print(f"{label} compress of {G} layers: {t['median_ms']:.2f} ms")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {a.json}")
    return res


if __name__ == "__main__":
    main()
