#!/usr/bin/env python3
"""Logits of small Hugging Face models from transformers, for kvpack's cross-check of its own forward.

kvpack writes a folder of tiny random models (config.json + model.safetensors in transformers' layout)
and the token ids to run (tokens.json: {"ids": [...], "prefill": P, "models": ["deepseek_v2", ...]}):

    KVPACK_MLA_HF_WRITE=gpu-bundle/mla-check pnpm vitest run packages/models/src/mla/hf-crosscheck.test.ts

This script loads each model folder with ``AutoModelForCausalLM.from_pretrained`` (CPU, float64 by
default; eager attention), refuses any missing or unexpected weight, and runs the ids twice: one causal
forward over all of them, and a prefill of the first P ids followed by one-token decode steps through
transformers' own cache. It writes, per model, ``<name>.logits.f32`` (the full forward's logits,
raw little-endian float32, row-major [T, V]) and ``<name>.json`` (shape, dtype, versions, and the
largest difference between the two runs). kvpack then compares its logits with them:

    KVPACK_MLA_HF_LOGITS=<this script's --out> pnpm vitest run packages/models/src/mla/hf-crosscheck.test.ts

Needs python3 with torch and transformers (with DeepseekV2 / DeepseekV3); nothing else.

    python3 scripts/gpu/hf_logits.py gpu-bundle/mla-check --out /tmp/mla-hf [--dtype float32]

The float64 results are committed under packages/models/src/mla/transformers-logits/ (with the SHA-256
of each model file they belong to), so the comparison runs in every test run; after a change to the
tiny checkpoints, rerun steps 1-2 with --out pointing there.
"""
import argparse
import json
import os
import sys

import torch


def load(path, dtype):
    from transformers import AutoModelForCausalLM

    kwargs = dict(attn_implementation="eager", output_loading_info=True)
    try:
        # Eager experts too: the grouped-matmul MoE path has no float64 kernel.
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager", **kwargs)
    except TypeError:  # transformers 4.x names it torch_dtype and has no experts_implementation
        model, info = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, **kwargs)
    bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise SystemExit(f"{path}: weights did not load one-to-one: {json.dumps(bad)[:2000]}")
    return model.to(dtype).eval()


def file_sha256(path):
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_f32(t, path):
    """Raw little-endian float32, row-major (numpy when present, else struct)."""
    t = t.detach().to(torch.float32).contiguous().cpu()
    try:
        t.numpy().astype("<f4").tofile(path)
    except (ImportError, RuntimeError):
        import struct

        vals = t.flatten().tolist()
        with open(path, "wb") as f:
            f.write(struct.pack(f"<{len(vals)}f", *vals))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="folder with tokens.json and one model folder per name in it")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    a = ap.parse_args()
    import transformers

    dtype = getattr(torch, a.dtype)
    spec = json.load(open(os.path.join(a.root, "tokens.json")))
    ids = torch.tensor([spec["ids"]], dtype=torch.long)
    P = int(spec["prefill"])
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(0)
    ok = True
    for name in spec["models"]:
        try:
            meta = run_one(a, name, dtype, ids, P, transformers)
        except Exception as e:  # one model's failure (config, weights) must not hide the others' results
            import traceback

            traceback.print_exc()
            print(f"{name}: FAILED: {type(e).__name__}: {str(e)[:2000]}", file=sys.stderr)
            ok = False
            continue
        ok = ok and meta["max_abs_full_vs_cached"] < 1e-3
    sys.exit(0 if ok else 1)


def run_one(a, name, dtype, ids, P, transformers):
    """Loads one model folder, writes its logits and meta, returns the meta."""
    model = load(os.path.join(a.root, name), dtype)
    with torch.no_grad():
        full = model(ids).logits[0]
        out = model(ids[:, :P], use_cache=True)
        rows, past = [out.logits[0]], out.past_key_values
        for t in range(P, ids.shape[1]):
            o = model(ids[:, t : t + 1], past_key_values=past, use_cache=True)
            rows.append(o.logits[0])
            past = o.past_key_values
        inc = torch.cat(rows)
    write_f32(full, os.path.join(a.out, f"{name}.logits.f32"))
    diff = float((full - inc).abs().max())
    meta = {
        "format": "kvpack-hf-logits/1",
        "model": name,
        "model_type": model.config.model_type,
        "shape": list(full.shape),
        "dtype": a.dtype,
        "prefill": P,
        "max_abs_full_vs_cached": diff,
        "max_abs_logit": float(full.abs().max()),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        # What the logits belong to: kvpack's test checks these against the folder it writes.
        "sha256": {f: file_sha256(os.path.join(a.root, name, f)) for f in sorted(os.listdir(os.path.join(a.root, name)))},
    }
    json.dump(meta, open(os.path.join(a.out, f"{name}.json"), "w"), indent=1)
    print(json.dumps(meta))
    return meta


if __name__ == "__main__":
    main()
