"""Dump a Hugging Face Llama-family model's prefill KV cache as a kvpack KV dump (safetensors).

    pip install torch transformers safetensors
    python dump_kv.py meta-llama/Llama-3.2-1B prompt.txt llama-1b.kvdump.safetensors

Then benchmark strategies on it without running the model in kvpack:

    pnpm --filter @kvpack/examples exec tsx pytorch-dump/bench-dump.ts llama-1b.kvdump.safetensors

Format (what @kvpack/models' readKVDump reads): per layer i, `layers.{i}.keys_post_rope` and
`layers.{i}.values`, each [T, H_kv, d]; `__metadata__` with `rope` (JSON: theta, layout "half" for
Hugging Face Llama/Qwen/Mistral, scaling as HF's rope_scaling or null), `layout` (JSON: nLayers,
nHeads, nKvHeads, headDim) and `start_position`. Hugging Face caches hold post-RoPE keys; kvpack
rotates them back to pre-RoPE (xKV factors pre-RoPE keys).
"""
import json
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(model_id: str, prompt_file: str, out: str) -> None:
    tok = AutoTokenizer.from_pretrained(model_id)
    model = AutoModelForCausalLM.from_pretrained(model_id, torch_dtype=torch.float32)
    model.eval()
    ids = tok(open(prompt_file, encoding="utf-8").read(), return_tensors="pt").input_ids
    with torch.no_grad():
        out_ = model(ids, use_cache=True)
    cache = out_.past_key_values  # DynamicCache: per layer keys/values [1, H_kv, T, d], keys post-RoPE
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    tensors = {}
    for i in range(cfg.num_hidden_layers):
        k, v = cache[i][0], cache[i][1]
        tensors[f"layers.{i}.keys_post_rope"] = k[0].transpose(0, 1).contiguous().float()  # [T, H_kv, d]
        tensors[f"layers.{i}.values"] = v[0].transpose(0, 1).contiguous().float()
    metadata = {
        "format": "kvpack.kvdump",
        "rope": json.dumps({"theta": getattr(cfg, "rope_theta", 10000.0), "layout": "half", "scaling": getattr(cfg, "rope_scaling", None)}),
        "layout": json.dumps({"nLayers": cfg.num_hidden_layers, "nHeads": cfg.num_attention_heads, "nKvHeads": cfg.num_key_value_heads, "headDim": head_dim}),
        "start_position": "0",
    }
    save_file(tensors, out, metadata=metadata)
    print(f"wrote {out}: {cfg.num_hidden_layers} layers, T = {ids.shape[1]}, H_kv = {cfg.num_key_value_heads}, d = {head_dim}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
