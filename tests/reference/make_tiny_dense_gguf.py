#!/usr/bin/env python3
"""Write llama.cpp-style GGUF copies of the tiny dense fixtures under tests/fixtures/tiny/.

For each of qwen2, qwen3, phi3, olmo2, gemma, gemma2, olmo, gpt2 and gpt_neox,
tests/fixtures/tiny/<name>_gguf/model.gguf holds the float32 tensors of
tests/fixtures/tiny/<name>/model.safetensors under the names the `gguf` package's
TensorNameMap gives them for that llama.cpp architecture (the map llama.cpp's
convert_hf_to_gguf.py uses), changed the way that converter changes them, with the metadata
it writes. Tensors are bit for bit the safetensors ones except where the converter changes
them:

  qwen2  attn_q/k/v (+ biases), attn_output, ffn_gate/up/down, attn_norm, ffn_norm.
  qwen3  as qwen2 without biases, plus per-head attn_q_norm / attn_k_norm [head_dim].
  phi3   fused attn_qkv, ffn_up holding gate and up stacked ([2I, H], gate first),
         rope.dimension_count = int(partial_rotary_factor * hidden) // heads,
         attention.sliding_window, rope.scaling.original_context_length.
  olmo2  no pre-norms: post_attention_norm / post_ffw_norm, and attn_q_norm / attn_k_norm
         over whole projections ([heads * head_dim], [kv_heads * head_dim]).
  gemma  every `*norm.weight` stored as 1 + w (f32), lm_head skipped (tied); no rope keys
         (llama.cpp's default base 10000).
  gemma2 as gemma, plus post_attention_norm / ffn_norm (pre-FFN) / post_ffw_norm,
         attn_logit_softcapping, final_logit_softcapping, attention.sliding_window.
         llama.cpp hard-codes Gemma 2's attention scale (head_dim^-1/2 except the 27B); the
         fixture's query_pre_attn_scalar 24 differs from head_dim 16, so this file also
         carries `gemma2.attention.scale` = 24^-1/2 (a key llama.cpp defines, which its
         gemma2 loader does not read; swk does).
  olmo   Q/K rows permuted as llama.cpp's LlamaModel.permute (OLMo uses its LLAMA rope),
         attention.layer_norm_epsilon 1e-5 (the non-parametric LayerNorm has no tensors),
         attention.clamp_kqv from clip_qkv.
  gpt2   Conv1D weights (c_attn, c_proj, c_fc, mlp.c_proj) transposed to [out, in],
         attn.bias mask buffers dropped, position_embd, feed_forward_length 4 * n_embd,
         attention.layer_norm_epsilon; no output tensor (tied).
  gptneox query_key_value rows regrouped from per-head [q k v] to [all q; all k; all v]
         (weight and bias), rope.dimension_count int(rotary_pct * head_dim),
         use_parallel_residual, attention.layer_norm_epsilon.

No Q/K row permutation for the others: llama.cpp's converter permutes only for its
LLAMA-rope families (llama, mistral, olmo, ...); the rest use NeoX-style rotation as
Hugging Face does.
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

FAMILIES = [("qwen2", "QWEN2"), ("qwen3", "QWEN3"), ("phi3", "PHI3"), ("olmo2", "OLMO2"),
            ("gemma", "GEMMA"), ("gemma2", "GEMMA2"), ("olmo", "OLMO"), ("gpt2", "GPT2"),
            ("gpt_neox", "GPTNEOX")]

GPT2_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


def llama_permute(w, n_head, n_head_kv):
    """llama.cpp's LlamaModel.permute: rotary halves to interleaved pairs, per head."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def convert(src, cfg, state):
    """(HF name, array) pairs as llama.cpp's converter hands them to the name map."""
    out = []
    for k in sorted(state):
        v = state[k].astype(np.float32)
        if src in ("gemma", "gemma2"):
            if k == "lm_head.weight":
                continue
            if k.endswith("norm.weight"):
                v = v + np.float32(1)
        elif src == "olmo":
            heads = cfg["num_attention_heads"]
            if k.endswith("q_proj.weight"):
                v = llama_permute(v, heads, heads)
            elif k.endswith("k_proj.weight"):
                v = llama_permute(v, heads, cfg.get("num_key_value_heads"))
        elif src == "gpt2":
            if k.endswith((".attn.bias", ".attn.masked_bias")):
                continue
            if k.endswith(GPT2_CONV1D):
                v = v.T
        elif src == "gpt_neox" and ".attention.query_key_value." in k:
            heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
            v = v.reshape(heads, 3, hidden // heads, *v.shape[1:])
            v = np.concatenate([v[:, i].reshape(hidden, *v.shape[3:]) for i in range(3)])
        out.append((k, np.ascontiguousarray(v, dtype=np.float32)))
    return out


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
    assert arch == src.replace("_", ""), (arch, src)
    n_layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch_const), n_layers)

    name = f"{src}_gguf"
    out = os.path.join(OUT, name)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    path = os.path.join(out, "model.gguf")
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"swk tiny {src} fixture")
    if src == "gpt2":
        hidden, heads = cfg["n_embd"], cfg["n_head"]
        w.add_block_count(n_layers)
        w.add_context_length(cfg["n_positions"])
        w.add_embedding_length(hidden)
        w.add_feed_forward_length(4 * hidden)
        w.add_head_count(heads)
        w.add_layer_norm_eps(cfg["layer_norm_epsilon"])
    elif src == "gpt_neox":
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        w.add_context_length(cfg["max_position_embeddings"])
        w.add_embedding_length(hidden)
        w.add_block_count(n_layers)
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_rope_dimension_count(int(cfg["rotary_pct"] * (hidden // heads)))
        w.add_head_count(heads)
        w.add_parallel_residual(cfg.get("use_parallel_residual", True))
        w.add_layer_norm_eps(cfg["layer_norm_eps"])
    elif src in ("gemma", "gemma2"):
        w.add_context_length(cfg["max_position_embeddings"])
        w.add_embedding_length(cfg["hidden_size"])
        w.add_block_count(n_layers)
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_head_count(cfg["num_attention_heads"])
        w.add_head_count_kv(cfg.get("num_key_value_heads", cfg["num_attention_heads"]))
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
        if src == "gemma2":
            w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
            w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
            w.add_sliding_window(cfg["sliding_window"])
            if cfg["query_pre_attn_scalar"] != cfg["head_dim"]:
                w.add_attention_scale(cfg["query_pre_attn_scalar"] ** -0.5)
    elif src == "olmo":
        # TextModel's defaults, then OlmoModel's LayerNorm eps and clamp.
        w.add_context_length(cfg["max_position_embeddings"])
        w.add_embedding_length(cfg["hidden_size"])
        w.add_block_count(n_layers)
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_head_count(cfg["num_attention_heads"])
        w.add_head_count_kv(cfg["num_key_value_heads"])
        w.add_rope_freq_base(rope_theta(cfg))
        w.add_layer_norm_eps(1e-5)
        if cfg.get("clip_qkv") is not None:
            w.add_clamp_kqv(cfg["clip_qkv"])
    else:
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
    for k, v in convert(src, cfg, state):
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
