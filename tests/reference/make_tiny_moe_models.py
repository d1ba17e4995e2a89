#!/usr/bin/env python3
"""Build tiny random-weight mixture-of-experts reference models under tests/fixtures/tiny/.

Families (2 layers, hidden 64, 4 heads / 2 kv heads of 16, 4 experts, top-2, expert width 32):
  mixtral    MixtralForCausalLM, the legacy layout transformers 5 still saves
             (block_sparse_moe.gate, block_sparse_moe.experts.E.w1/w2/w3), top-2 renormalized.
  olmoe      OlmoeForCausalLM, saved in transformers 5's *fused* in-memory layout
             (mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj [E, H, I]);
             QK-norm over whole projections, norm_topk_prob false, clip_qkv 0.5.
  qwen2_moe  Qwen2MoeForCausalLM: q/k/v biases, shared expert (width 48) scaled by
             sigmoid(shared_expert_gate), norm_topk_prob false.
  qwen3_moe  Qwen3MoeForCausalLM: per-head QK-norm, norm_topk_prob true, layer 0 dense
             (mlp_only_layers [0], intermediate 96), layer 1 sparse.

Plus four llama.cpp-style GGUF files written with the `gguf` package's GGUFWriter from the same
weights, checked against the same reference.json:
  qwen2_moe_gguf  arch `qwen2moe`: ffn_gate_inp, stacked ffn_{gate,up,down}_exps [E, I, H] /
                  [E, H, I], ffn_{gate,up,down}_shexp, ffn_gate_inp_shexp as a vector.
  olmoe_gguf      arch `olmoe`: whole-projection attn_q_norm/attn_k_norm, clamp_kqv, no
                  Q/K permutation;
  qwen3_moe_gguf  arch `qwen3moe`: per-head QK-norm, dense layer 0 as plain ffn_{gate,up,down};
  mixtral_gguf    arch `llama` with llama.expert_count (how llama.cpp writes Mixtral), Q/K rows
                  permuted as llama.cpp's converter does.

Every directory gets config.json, model.safetensors (float32), tokenizer.json (copied from
tests/fixtures/tiny/llama) and reference.json: text, token ids, float32 logits from transformers
(eager attention), and for each sparse layer the router's choices and, per expert, the largest
|down_proj output| over the tokens routed to it (before the routing weight), with its position
and row, and the largest |down_proj input| with its position and column.

Run:  /work/ref/venv/bin/python tests/reference/make_tiny_moe_models.py
"""

import copy
import json
import os
import shutil

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from fixture_common import HERE, OUT, TEXT, TOKENIZER, VOCAB, f32_list, finish_gguf, logits_of

SEED = 20250601

COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=0,
    pad_token_id=None,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
)


def init_weights(model, gen):
    """Deterministic random init in sorted parameter-name order; norms around 1. Routers get
    larger weights so that routing is decisive, embeddings and head 0.1."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if "norm" in name and p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("mlp.gate.weight") or "shared_expert_gate" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif "embed" in name or "lm_head" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))


def sparse_blocks(model):
    return [(l, layer.mlp) for l, layer in enumerate(model.model.layers)
            if hasattr(layer.mlp, "experts")]


def run_reference(model, ids):
    """Logits, and per sparse layer: router top-k indices/weights per token, and per expert the
    maxima of its down_proj input and output over the tokens routed to it."""
    rec = {}
    hooks = []
    for l, mlp in sparse_blocks(model):
        def hook(mod, inp, out, l=l):
            rec[l] = inp[0][0].detach().clone()
        hooks.append(mlp.register_forward_hook(hook))
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits[0]
    for h in hooks:
        h.remove()
    layers = []
    with torch.no_grad():
        for l, mlp in sparse_blocks(model):
            x = rec[l]
            _, weights, idx = mlp.gate(x)
            ex = mlp.experts
            experts = []
            for e in range(ex.num_experts):
                pos = [t for t in range(x.shape[0]) if e in idx[t].tolist()]
                entry = {"expert": e, "selected": len(pos)}
                if pos:
                    xs = x[pos]
                    g, u = torch.nn.functional.linear(xs, ex.gate_up_proj[e]).chunk(2, dim=-1)
                    a = ex.act_fn(g) * u
                    y = torch.nn.functional.linear(a, ex.down_proj[e])
                    for src, key, ch in ((a, "down_in_max", "channel"), (y, "down_out_max", "row")):
                        flat = src.abs().flatten()
                        top2 = torch.topk(flat, 2).values
                        assert top2[0] > top2[1] * (1 + 1e-4), f"near-tie layer {l} expert {e}"
                        p, c = np.unravel_index(int(flat.argmax()), tuple(src.shape))
                        entry[key] = {"value": f32_list(src[p, c].numpy()), "position": pos[p],
                                      ch: int(c)}
                experts.append(entry)
            layers.append({"layer": l,
                           "top_k": [[int(i) for i in row] for row in idx.tolist()],
                           "weights": [f32_list(row.numpy()) for row in weights],
                           "experts": experts})
    return logits.numpy().astype(np.float32), layers


def fuse_state(d, model):
    """Rewrite model.safetensors with the in-memory (fused 3-D expert) parameter names."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd), sorted(sd)[:20]
    save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})


SPECS = [
    ("mixtral", MixtralForCausalLM, MixtralConfig,
     dict(COMMON, intermediate_size=32, num_local_experts=4, rms_norm_eps=1e-5,
          rope_theta=1000000.0, sliding_window=None),
     False, [],
     "MixtralForCausalLM, legacy layout (block_sparse_moe.experts.E.w1/w3/w2 = gate/up/down), "
     "softmax top-2 renormalized."),
    ("olmoe", OlmoeForCausalLM, OlmoeConfig,
     dict(COMMON, intermediate_size=32, num_experts=4, rms_norm_eps=1e-5, rope_theta=10000.0,
          clip_qkv=0.5, norm_topk_prob=False),
     True, [dict(norm_topk_prob=True), dict(clip_qkv=None)],
     "OlmoeForCausalLM in the fused layout (mlp.experts.gate_up_proj [E, 2I, H] with gate the "
     "first half, mlp.experts.down_proj [E, H, I]); QK-norm over whole projections, "
     "clip_qkv 0.5, softmax top-2 not renormalized."),
    ("qwen2_moe", Qwen2MoeForCausalLM, Qwen2MoeConfig,
     dict(COMMON, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
          shared_expert_intermediate_size=48, rms_norm_eps=1e-6, rope_theta=10000.0,
          norm_topk_prob=False, qkv_bias=True),
     False, [dict(norm_topk_prob=True)],
     "Qwen2MoeForCausalLM: q/k/v biases, shared expert (48 wide) scaled by "
     "sigmoid(shared_expert_gate(x)), softmax top-2 not renormalized."),
    ("qwen3_moe", Qwen3MoeForCausalLM, Qwen3MoeConfig,
     dict(COMMON, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
          rms_norm_eps=1e-6, rope_theta=1000000.0, norm_topk_prob=True, mlp_only_layers=[0]),
     False, [dict(norm_topk_prob=False)],
     "Qwen3MoeForCausalLM: per-head QK-norm, softmax top-2 renormalized, layer 0 dense "
     "(mlp_only_layers [0], intermediate 96), layer 1 sparse."),
]


def build(spec, k, ids):
    name, cls, cfg_cls, kw, fused, toggles, note = spec
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
    if fused:
        fuse_state(d, model)
    shutil.copyfile(TOKENIZER, os.path.join(d, "tokenizer.json"))
    re = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    re.eval()
    for (a, pa), (b, pb) in zip(sorted(model.state_dict().items()), sorted(re.state_dict().items())):
        assert a == b and torch.equal(pa, pb), f"{name}: {a} did not round-trip"
    logits, layers = run_reference(re, ids)
    state = re.state_dict()
    for t in toggles:
        c2 = copy.deepcopy(re.config)
        for key, v in t.items():
            setattr(c2, key, v)
        c2._attn_implementation = "eager"
        diff = float(np.abs(logits_of(cls, c2, state, ids) - logits).max())
        print(f"  toggle {t}: max|dlogit| {diff:.3e}")
        assert diff > 1e-3, f"{name}: toggle {t} has no effect"
    ref = dict(
        text=TEXT, tokens=[int(i) for i in ids], logits=f32_list(logits), moe_layers=layers,
        note=note + " Tokens: tokenizer.json's encoding of `text`, no special tokens. Logits: "
             f"[position][vocab] float32 from transformers {transformers.__version__} (eager "
             "attention). moe_layers: per sparse layer, the router's top-k expert ids and "
             "weights per token, and per expert how many tokens chose it and the entries of "
             "largest |x| of its down_proj input (channel) and output (row, before the routing "
             "weight) over the tokens routed to it.")
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f, separators=(",", ":"))
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d))
    sel = [[e["selected"] for e in L["experts"]] for L in layers]
    print(f"{name}: logit std {logits.std():.3f}, selections {sel}, {size / 1024:.0f} KiB, "
          f"files {sorted(os.listdir(d))}")
    assert size < 700 * 1024, (name, size)


GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def llama_permute(w, n_head):
    """llama.cpp's converter permutation of Q/K rows (LlamaModel.permute)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def build_gguf(src, name, arch):
    import sys
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
    w = gguf.GGUFWriter(os.path.join(out, "model.gguf"), arch)
    w.add_name(f"swk tiny {src} fixture")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_expert_count(4)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if hasattr(cfg, "moe_intermediate_size"):
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if getattr(cfg, "shared_expert_intermediate_size", None):
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if arch in ("olmoe", "qwen3moe"):
        # Written for these two only, so the older files stay byte-identical.
        w.add_expert_weights_norm(bool(cfg.norm_topk_prob))
        if getattr(cfg, "clip_qkv", None):
            w.add_clamp_kqv(cfg.clip_qkv)
    gguf_tokenizer(w)
    for k, v in sorted(model.state_dict().items()):
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
        if rest == "mlp.experts":  # fused in-memory stacks
            if kind == "gate_up_proj":
                i = v.shape[1] // 2
                w.add_tensor(f"blk.{l}.ffn_gate_exps.weight", np.ascontiguousarray(v[:, :i]))
                w.add_tensor(f"blk.{l}.ffn_up_exps.weight", np.ascontiguousarray(v[:, i:]))
            else:
                w.add_tensor(f"blk.{l}.ffn_down_exps.weight", np.ascontiguousarray(v))
            continue
        if arch == "llama" and rest == "self_attn.q_proj":
            v = llama_permute(v, cfg.num_attention_heads)
        if arch == "llama" and rest == "self_attn.k_proj":
            v = llama_permute(v, cfg.num_key_value_heads)
        if rest == "mlp.shared_expert_gate":
            v = v.reshape(-1)
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
    build_gguf("qwen2_moe", "qwen2_moe_gguf", "qwen2moe")
    build_gguf("mixtral", "mixtral_gguf", "llama")
    build_gguf("olmoe", "olmoe_gguf", "olmoe")
    # Qwen3-MoE with a dense layer 0 (mlp_only_layers): llama.cpp's qwen3moe has no dense
    # layers, swk tells sparse layers by their ffn_gate_inp, so the file is llama.cpp-named
    # but only swk reads that layer.
    build_gguf("qwen3_moe", "qwen3_moe_gguf", "qwen3moe")


if __name__ == "__main__":
    main()
