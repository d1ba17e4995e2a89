#!/usr/bin/env python3
"""Write llama.cpp-style GGUF copies of the tiny dense fixtures under tests/fixtures/tiny/.

For each of qwen2, qwen3, phi3 and olmo2, tests/fixtures/tiny/<name>_gguf/model.gguf holds the
float32 tensors of tests/fixtures/tiny/<name>/model.safetensors, bit for bit, under the names
the `gguf` package's TensorNameMap gives them for that llama.cpp architecture (the map
llama.cpp's convert_hf_to_gguf.py uses), with the metadata that converter writes:

  qwen2  attn_q/k/v (+ biases), attn_output, ffn_gate/up/down, attn_norm, ffn_norm.
  qwen3  as qwen2 without biases, plus per-head attn_q_norm / attn_k_norm [head_dim].
  phi3   fused attn_qkv, ffn_up holding gate and up stacked ([2I, H], gate first),
         rope.dimension_count = int(partial_rotary_factor * hidden) // heads,
         attention.sliding_window, rope.scaling.original_context_length.
  olmo2  no pre-norms: post_attention_norm / post_ffw_norm, and attn_q_norm / attn_k_norm
         over whole projections ([heads * head_dim], [kv_heads * head_dim]).

No Q/K row permutation: llama.cpp's converter permutes only for its LLAMA-rope families
(llama, mistral, olmo, ...); these four use NeoX-style rotation as Hugging Face does.
The tokenizer is the fixtures' byte-level BPE as a `gpt2` GGUF vocabulary. The test
(tests/gguf_arch.rs) checks the GGUF loads to the same tensors and config as the safetensors
directory and matches that directory's reference.json logits.

Run:  /work/ref/venv/bin/python tests/reference/make_tiny_dense_gguf.py
"""

import json
import os
import shutil
import sys

import numpy as np
from safetensors.numpy import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "tiny")

FAMILIES = [("qwen2", "QWEN2"), ("qwen3", "QWEN3"), ("phi3", "PHI3"), ("olmo2", "OLMO2")]


def rope_theta(cfg):
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    return float(cfg["rope_parameters"]["rope_theta"])


def build(src, arch_const):
    import gguf
    sys.path.insert(0, HERE)
    from make_tiny_arch_models import gguf_tokenizer

    d = os.path.join(OUT, src)
    cfg = json.load(open(os.path.join(d, "config.json")))
    state = load_file(os.path.join(d, "model.safetensors"))
    arch = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch_const)]
    assert arch == src, (arch, src)
    n_layers = cfg["num_hidden_layers"]
    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch_const), n_layers)

    name = f"{src}_gguf"
    out = os.path.join(OUT, name)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    path = os.path.join(out, "model.gguf")
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"swk tiny {src} fixture")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(rope_theta(cfg))
    if src == "phi3":
        w.add_rope_scaling_orig_ctx_len(cfg["original_max_position_embeddings"])
        rot = cfg.get("partial_rotary_factor", 1.0)
        w.add_rope_dimension_count(int(rot * hidden) // heads)
        w.add_sliding_window(cfg.get("sliding_window") or 0)
    elif "head_dim" in cfg:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    gguf_tokenizer(w)
    for k in sorted(state):
        v = np.ascontiguousarray(state[k].astype(np.float32))
        new = tmap.get_name(k, try_suffixes=(".weight", ".bias"))
        assert new is not None, f"{src}: no llama.cpp name for {k}"
        w.add_tensor(new, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    size = os.path.getsize(path)
    print(f"{name}: {len(state)} tensors, {size / 1024:.0f} KiB")
    assert size < 1024 * 1024, (name, size)


def main():
    for src, arch in FAMILIES:
        build(src, arch)


if __name__ == "__main__":
    main()
