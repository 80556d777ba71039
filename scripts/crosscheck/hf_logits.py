"""Compares kvpack's logits with transformers' on the tiny model folders written by write-models.ts.

For each folder: loads it with AutoModelForCausalLM (float64, CPU, eager attention), runs the same
token ids as one causal forward (prefill + decode positions together), and prints the largest
absolute logit difference against kvpack-logits.f32. Exit 1 when one exceeds --tol (default 1e-3).

    python3 scripts/crosscheck/hf_logits.py OUT_DIR [--tol 1e-3]
"""
import argparse, json, os, sys

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--tol", type=float, default=1e-3)
    a = ap.parse_args()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    worst_all = 0.0
    failed = False
    for name in sorted(os.listdir(a.root)):
        d = os.path.join(a.root, name)
        if not os.path.isfile(os.path.join(d, "ids.json")):
            continue
        meta = json.load(open(os.path.join(d, "ids.json")))
        ids = meta["ids"]
        ours = np.fromfile(os.path.join(d, "kvpack-logits.f32"), dtype=np.float32).reshape(len(ids), meta["vocab"])
        try:
            model = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float64, attn_implementation="eager")
        except Exception as e:  # an architecture this transformers lacks
            print(f"{name}: transformers cannot load it: {e}")
            failed = True
            continue
        model.eval()
        with torch.no_grad():
            theirs = model(torch.tensor([ids])).logits[0].numpy()
        diff = float(np.abs(theirs - ours.astype(np.float64)).max())
        worst_all = max(worst_all, diff)
        ok = diff <= a.tol
        failed |= not ok
        print(f"{name}: {type(model).__name__}, {len(ids)} tokens ({meta['prefill']} prefill + {meta['decode']} decode): max |logit diff| = {diff:.3e} {'ok' if ok else 'FAIL'}")
    print(f"worst {worst_all:.3e} (tolerance {a.tol})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
