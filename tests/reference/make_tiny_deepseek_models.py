#!/usr/bin/env python3
"""Build tiny random-weight DeepSeek-V2 / DeepSeek-V3 reference models under tests/fixtures/tiny/.

Shared shapes (2 layers, hidden 64, 4 heads, vocab 320): multi-head latent attention with
kv_lora_rank 24, qk_nope_head_dim 12, qk_rope_head_dim 8, v_head_dim 10 (so the value width
differs from the query/key width 20); dense MLP 96 wide; routed experts 16 wide.

  deepseek_v2  DeepseekV2ForCausalLM: q_lora_rank 32 (q_a_proj -> q_a_layernorm -> q_b_proj),
               6 routed experts, top-2 of a softmax with topk_method group_limited_greedy
               (n_group 3, topk_group 2), routed_scaling_factor 1.5, 2 shared experts (32 wide),
               first_k_dense_replace 0 (both layers sparse). RoPE on the interleaved pairs,
               YaRN-scaled (factor 4, original context 32, mscale 1, mscale_all_dim 0.8: blended
               frequencies, rotated dims times the attention factor, softmax scale times
               mscale(4, 0.8)^2).
  deepseek_v3  DeepseekV3ForCausalLM: q_lora_rank null (plain q_proj), 8 routed experts, top-3
               of sigmoid scores picked with the e_score_correction_bias inside the best 2 of
               4 groups, norm_topk_prob, routed_scaling_factor 2.5, 1 shared expert,
               first_k_dense_replace 1 (layer 0 dense), rope_interleave true.

Plus deepseek_v3_gguf/model.gguf: the deepseek_v3 weights, bit for bit, as current llama.cpp
writes DeepSeek-V3 (`general.architecture = deepseek2`, attn_q / attn_kv_a_mqa / attn_kv_a_norm,
kv_b_proj split per head into attn_k_b [H, kv_lora, nope] (transposed) and attn_v_b
[H, v, kv_lora] with attention.key_length(_mla) / value_length(_mla), ffn_gate_inp,
exp_probs_b.bias, stacked ffn_{gate,up,down}_exps, *_shexp, dense ffn_* in layer 0, sigmoid
gating metadata), checked against deepseek_v3/reference.json.

Every directory gets config.json, model.safetensors (float32, transformers' own per-expert
layout), tokenizer.json (copied from tests/fixtures/tiny/llama) and reference.json: text, token
ids, float32 logits from transformers (eager attention) and, per sparse layer, each token's
routed experts (by expert id) with their routing weights (scaling factor included).

Run:  /work/ref/venv/bin/python tests/reference/make_tiny_deepseek_models.py
"""

import copy
import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
)

from fixture_common import HERE, OUT, TEXT, TOKENIZER, VOCAB, f32_list, finish_gguf, logits_of

SEED = 20251127

COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=0,
    pad_token_id=None,
    tie_word_embeddings=False,
    intermediate_size=96,
    moe_intermediate_size=16,
    kv_lora_rank=24,
    qk_nope_head_dim=12,
    qk_rope_head_dim=8,
    v_head_dim=10,
    rms_norm_eps=1e-6,
)


def init_weights(model, gen):
    """Deterministic random init in sorted name order; norms around 1, routers larger so that
    routing is decisive, the V3 correction bias O(0.1) so it changes some choices."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if "norm" in name and p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif "embed" in name or "lm_head" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
        for name, b in sorted(model.named_buffers(), key=lambda kv: kv[0]):
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.randn(b.shape, generator=gen))


def run_reference(model, ids):
    """Logits, and per sparse layer each token's (expert, weight) choices sorted by expert."""
    rec = {}
    hooks = []
    sparse = [(l, layer.mlp) for l, layer in enumerate(model.model.layers)
              if hasattr(layer.mlp, "experts")]
    for l, mlp in sparse:
        def hook(mod, inp, out, l=l):
            rec[l] = inp[0][0].detach().clone()
        hooks.append(mlp.register_forward_hook(hook))
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits[0]
    for h in hooks:
        h.remove()
    layers = []
    with torch.no_grad():
        for l, mlp in sparse:
            _, weights, idx = mlp.gate(rec[l])
            routes = []
            for t in range(idx.shape[0]):
                pairs = sorted(zip(idx[t].tolist(), weights[t].tolist()))
                routes.append({"experts": [int(e) for e, _ in pairs],
                               "weights": f32_list([w for _, w in pairs])})
            layers.append({"layer": l, "routes": routes})
    return logits.numpy().astype(np.float32), layers


SPECS = [
    ("deepseek_v2", DeepseekV2ForCausalLM, DeepseekV2Config,
     dict(COMMON, q_lora_rank=32, n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=2,
          topk_method="group_limited_greedy", n_group=2, topk_group=1,
          routed_scaling_factor=1.5, first_k_dense_replace=0,
          rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                               original_max_position_embeddings=32, beta_fast=32, beta_slow=1,
                               mscale=1.0, mscale_all_dim=0.8)),
     [dict(topk_method="greedy"), dict(routed_scaling_factor=1.0),
      dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0))],
     "DeepseekV2ForCausalLM: MLA with q_lora_rank 32, softmax top-2 of 6 experts, "
     "group_limited_greedy (2 groups of 3, the best 1 by max score), routed_scaling_factor 1.5, "
     "2 shared experts (32 wide), both layers sparse, interleaved RoPE with YaRN (factor 4, "
     "original_max_position_embeddings 32, mscale 1, mscale_all_dim 0.8)."),
    ("deepseek_v3", DeepseekV3ForCausalLM, DeepseekV3Config,
     dict(COMMON, q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
          n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
          first_k_dense_replace=1, rope_theta=10000.0, rope_interleave=True),
     [dict(norm_topk_prob=False), dict(topk_group=4)],
     "DeepseekV3ForCausalLM: MLA with plain q_proj, sigmoid top-3 of 8 experts chosen with "
     "e_score_correction_bias inside the best 2 of 4 groups (sum of each group's top-2), "
     "renormalized, routed_scaling_factor 2.5, 1 shared expert, layer 0 dense, interleaved RoPE."),
    # What llama.cpp's deepseek2 can express of V2 (greedy softmax top-k, no YaRN attention
    # factor), for the GGUF path of q_lora and softmax routing: written as deepseek_v2_gguf.
    ("deepseek_v2_greedy", DeepseekV2ForCausalLM, DeepseekV2Config,
     dict(COMMON, q_lora_rank=32, n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=2,
          topk_method="greedy", routed_scaling_factor=1.5, first_k_dense_replace=1,
          rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
     [dict(routed_scaling_factor=1.0), dict(num_experts_per_tok=3)],
     "DeepseekV2ForCausalLM as llama.cpp runs it: MLA with q_lora_rank 32, softmax greedy top-2 "
     "of 6 experts, routed_scaling_factor 1.5, 2 shared experts, layer 0 dense, plain RoPE."),
]


def build(spec, k, ids):
    name, cls, cfg_cls, kw, toggles, note = spec
    gen = torch.Generator().manual_seed(SEED + k)
    model = cls(cfg_cls(**kw)).to(torch.float32)
    init_weights(model, gen)
    model.eval()
    d = os.path.join(OUT, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    model.save_pretrained(d, safe_serialization=True)
    if os.path.exists(os.path.join(d, "generation_config.json")):
        os.remove(os.path.join(d, "generation_config.json"))
    shutil.copyfile(TOKENIZER, os.path.join(d, "tokenizer.json"))
    re = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    re.eval()
    sd0, sd1 = model.state_dict(), re.state_dict()
    assert sorted(sd0) == sorted(sd1)
    for a in sd0:
        assert torch.equal(sd0[a], sd1[a]), f"{name}: {a} did not round-trip"
    logits, layers = run_reference(re, ids)
    for t in toggles:
        c2 = copy.deepcopy(re.config)
        for key, v in t.items():
            setattr(c2, key, v)
        c2._attn_implementation = "eager"
        diff = float(np.abs(logits_of(cls, c2, sd1, ids) - logits).max())
        print(f"  toggle {t}: max|dlogit| {diff:.3e}")
        assert diff > 1e-3, f"{name}: toggle {t} has no effect"
    ref = dict(
        text=TEXT, tokens=[int(i) for i in ids], logits=f32_list(logits), moe_layers=layers,
        note=note + " Tokens: tokenizer.json's encoding of `text`, no special tokens. Logits: "
             f"[position][vocab] float32 from transformers {transformers.__version__} (eager "
             "attention). moe_layers: per sparse layer and token, the routed experts sorted by "
             "id and their routing weights (after normalization and routed_scaling_factor).")
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f, separators=(",", ":"))
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d))
    print(f"{name}: logit std {logits.std():.3f}, {size / 1024:.0f} KiB, "
          f"files {sorted(os.listdir(d))}")
    assert size < 700 * 1024, (name, size)


GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.q_a_proj": "attn_q_a",
    "self_attn.q_a_layernorm": "attn_q_a_norm", "self_attn.q_b_proj": "attn_q_b",
    "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa", "self_attn.kv_a_layernorm": "attn_kv_a_norm",
    "self_attn.o_proj": "attn_output",
    "mlp.gate": "ffn_gate_inp", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
    "mlp.shared_experts.up_proj": "ffn_up_shexp", "mlp.shared_experts.down_proj": "ffn_down_shexp",
}


def build_gguf(src, name, split_kv_b=True):
    """A fixture as llama.cpp's converter writes DeepSeek (no Q/K permutation: llama.cpp
    rotates DeepSeek's interleaved pairs as they are). `split_kv_b`: current llama.cpp's
    attn_k_b/attn_v_b (MLA absorption); else the older single attn_kv_b."""
    import gguf
    sys.path.insert(0, HERE)
    from make_tiny_arch_models import gguf_tokenizer
    d = os.path.join(OUT, src)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    cfg = model.config
    out = os.path.join(OUT, name)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    w = gguf.GGUFWriter(os.path.join(out, "model.gguf"), "deepseek2")
    w.add_name(f"swk tiny {src} fixture")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    if cfg.q_lora_rank is not None:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    if split_kv_b:
        # Current llama.cpp (MLA absorption): key/value lengths of the latent cache, the
        # per-head widths as *_mla.
        w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        w.add_value_length(cfg.kv_lora_rank)
        w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        w.add_value_length_mla(cfg.v_head_dim)
    else:
        w.add_key_length(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        w.add_value_length(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    if cfg.model_type == "deepseek_v3":
        w.add_expert_weights_norm(cfg.norm_topk_prob)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
    else:
        # transformers' V2 router never renormalizes (it ignores norm_topk_prob).
        w.add_expert_weights_norm(False)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    gguf_tokenizer(w)
    state = dict(model.state_dict())
    for k, v in sorted(state.items()):
        v = v.detach().to(torch.float32).numpy()
        if k == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", v)
            continue
        if k == "model.norm.weight":
            w.add_tensor("output_norm.weight", v)
            continue
        if k == "lm_head.weight":
            w.add_tensor("output.weight", v)
            continue
        parts = k.split(".")
        l, rest, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
        if rest == "mlp.experts":  # in-memory stacks [E, 2I, H] / [E, H, I]
            if kind == "gate_up_proj":
                i = v.shape[1] // 2
                w.add_tensor(f"blk.{l}.ffn_gate_exps.weight", np.ascontiguousarray(v[:, :i]))
                w.add_tensor(f"blk.{l}.ffn_up_exps.weight", np.ascontiguousarray(v[:, i:]))
            else:
                w.add_tensor(f"blk.{l}.ffn_down_exps.weight", np.ascontiguousarray(v))
            continue
        if rest == "self_attn.kv_b_proj" and not split_kv_b:
            w.add_tensor(f"blk.{l}.attn_kv_b.weight", np.ascontiguousarray(v))
            continue
        if rest == "self_attn.kv_b_proj":
            # llama.cpp's converter: per head, k_b = k_nope rows transposed [H, kv_lora, nope],
            # v_b = v rows [H, v, kv_lora].
            nh, nope, vd = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
            kv_b = v.reshape(nh, nope + vd, v.shape[-1])
            k_b = np.ascontiguousarray(kv_b[:, :nope, :].transpose(0, 2, 1))
            v_b = np.ascontiguousarray(kv_b[:, nope:, :])
            w.add_tensor(f"blk.{l}.attn_k_b.weight", k_b)
            w.add_tensor(f"blk.{l}.attn_v_b.weight", v_b)
            continue
        if rest == "mlp.gate" and kind == "e_score_correction_bias":
            w.add_tensor(f"blk.{l}.exp_probs_b.bias", np.ascontiguousarray(v))
            continue
        w.add_tensor(f"blk.{l}.{GGUF_NAMES[rest]}.{kind}", np.ascontiguousarray(v))
    finish_gguf(w)
    size = os.path.getsize(os.path.join(out, "model.gguf"))
    print(f"{name}: {size / 1024:.0f} KiB")


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    ids = Tokenizer.from_file(TOKENIZER).encode(TEXT, add_special_tokens=False).ids
    for k, spec in enumerate(SPECS):
        build(spec, k, ids)
    build_gguf("deepseek_v3", "deepseek_v3_gguf")
    build_gguf("deepseek_v2_greedy", "deepseek_v2_gguf", split_kv_b=False)


if __name__ == "__main__":
    main()
