#!/usr/bin/env python3
"""Build tiny random-weight reference models of the non-Llama families under tests/fixtures/tiny/.

Families: qwen3, gemma, gemma2, gemma3, phi3, olmo, olmo2, gpt2, gpt_neox, plus gemma3_gguf (a
Gemma 3 written as a llama.cpp-style GGUF with the `gguf` package's GGUFWriter).

Every directory gets:
  config.json            HF config (some rewritten into the classic layout real checkpoints use,
                         see `style` below)
  model.safetensors      float32 weights (gemma3_gguf: model.gguf instead)
  tokenizer.json         copied from tests/fixtures/tiny/llama (the tiny byte-level BPE)
  reference.json         text, token ids, float32 logits from transformers (eager attention),
                         and per layer the signed maximum of |down-projection input| and of
                         |what the MLP writes into the residual stream| (for Gemma 2/3 and
                         OLMo 2 that is the output of post_feedforward_layernorm, for the others
                         the down-projection's output), with their positions and channels.

Every feature the fixture is meant to test is checked to matter: the script rebuilds the model
with the feature switched off and asserts the logits move (`toggles` below).

Run:  /work/ref/venv/bin/python tests/reference/make_tiny_arch_models.py
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
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    OlmoConfig,
    OlmoForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from fixture_common import OUT, TEXT, TOKENIZER, VOCAB, f32_list, finish_gguf, logits_of

SEED = 20250301

COMMON = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=0,
    pad_token_id=None,
)


def init_weights(model, gen, zero_centered_norms):
    """Deterministic random init in sorted parameter-name order. Gemma norms multiply by
    (1 + w), so theirs are centered on 0; every other norm weight is centered on 1."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            is_norm = ("norm" in name or ".ln_" in name or name.startswith("transformer.ln_f")) \
                and p.dim() == 1
            if is_norm and name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif is_norm:
                base = 0.0 if zero_centered_norms else 1.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 2 and p.shape[0] in (VOCAB,) and ("embed" in name or "wte" in name
                                                             or "lm_head" in name or "embed_out" in name):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "wpe" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))


def layers_of(model):
    if hasattr(model, "transformer"):
        return model.transformer.h
    if hasattr(model, "gpt_neox"):
        return model.gpt_neox.layers
    return model.model.layers


def mlp_modules(layer):
    """(down-projection module, module whose output is added to the residual stream)."""
    mlp = layer.mlp
    if hasattr(mlp, "c_proj"):  # GPT-2
        return mlp.c_proj, mlp.c_proj
    if hasattr(mlp, "dense_4h_to_h"):  # GPT-NeoX
        return mlp.dense_4h_to_h, mlp.dense_4h_to_h
    if hasattr(layer, "post_feedforward_layernorm"):  # Gemma 2/3, OLMo 2
        return mlp.down_proj, layer.post_feedforward_layernorm
    return mlp.down_proj, mlp.down_proj


def run_reference(model, ids):
    """Forward in float32; returns logits and the per-layer maxima described above."""
    rec_in, rec_out, hooks = {}, {}, []
    for l, layer in enumerate(layers_of(model)):
        down, writer = mlp_modules(layer)

        def hin(mod, inp, out, l=l):
            rec_in[l] = inp[0][0].detach().clone()

        def hout(mod, inp, out, l=l):
            rec_out[l] = out[0].detach().clone()

        hooks.append(down.register_forward_hook(hin))
        hooks.append(writer.register_forward_hook(hout))
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits[0]
    for h in hooks:
        h.remove()
    ins, outs = [], []
    for l in range(len(layers_of(model))):
        for src, dst, key in ((rec_in[l], ins, "channel"), (rec_out[l], outs, "row")):
            a = src.abs().flatten()
            top2 = torch.topk(a, 2).values
            assert top2[0] > top2[1] * (1 + 1e-4), f"near-tie in layer {l} maxima: {top2}"
            p, c = np.unravel_index(int(a.argmax()), tuple(src.shape))
            dst.append({"layer": l, "value": f32_list(src[p, c].numpy()),
                        "abs": f32_list(src[p, c].abs().numpy()), "position": int(p), key: int(c)})
    return logits.numpy().astype(np.float32), ins, outs


# ------------------------------------------------------------------------------------------
# Config rewrites into the layouts real Hub checkpoints use.
# ------------------------------------------------------------------------------------------


def rewrite(path, fn):
    with open(path) as f:
        cfg = json.load(f)
    fn(cfg)
    cfg = dict(sorted(cfg.items()))
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


def classic_rope(cfg):
    """rope_parameters {rope_theta, rope_type, ...} -> top-level rope_theta / rope_scaling."""
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    if "partial_rotary_factor" in rp:
        cfg["partial_rotary_factor"] = rp.pop("partial_rotary_factor")
    cfg["rope_scaling"] = None if rp.get("rope_type", "default") == "default" else rp
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = "float32"


def classic_gemma3(cfg):
    """Gemma 3 as google/gemma-3-1b ships it: rope_theta, rope_local_base_freq,
    rope_scaling, sliding_window_pattern (no layer_types, no rope_parameters)."""
    rp = cfg.pop("rope_parameters")
    full, local = rp["full_attention"], rp["sliding_attention"]
    cfg["rope_theta"] = full.pop("rope_theta")
    cfg["rope_local_base_freq"] = local["rope_theta"]
    cfg["rope_scaling"] = None if full.get("rope_type", "default") == "default" else full
    types = cfg.pop("layer_types")
    assert types == ["sliding_attention", "full_attention"], types
    cfg["sliding_window_pattern"] = 2
    cfg.pop("_sliding_window_pattern", None)
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = "float32"


def classic_neox(cfg):
    """GPT-NeoX as EleutherAI/pythia ships it: rotary_pct, rotary_emb_base."""
    rp = cfg.pop("rope_parameters")
    cfg["rotary_emb_base"] = rp["rope_theta"]
    cfg["rotary_pct"] = rp["partial_rotary_factor"]
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = "float32"


def classic_gpt2_names(d):
    """Rename the safetensors keys like openai-community/gpt2's (no `transformer.` prefix,
    no lm_head) and add the `attn.bias` causal-mask buffers that old checkpoints carry."""
    from safetensors.torch import load_file, save_file
    p = os.path.join(d, "model.safetensors")
    sd = load_file(p)
    out = {}
    for k, v in sd.items():
        if k == "lm_head.weight":
            continue
        out[k.removeprefix("transformer.")] = v
    n = json.load(open(os.path.join(d, "config.json")))["n_positions"]
    for l in range(2):
        out[f"h.{l}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    save_file(out, p, metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------

SPECS = [
    # name, model class, config class, config kwargs, zero-centered norms, style, toggles, note
    ("qwen3", Qwen3ForCausalLM, Qwen3Config,
     dict(COMMON, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
          attention_bias=False, hidden_act="silu"),
     False, "native", [],
     "Qwen3ForCausalLM: RMSNorm over each q/k head (self_attn.q_norm/k_norm, [head_dim]) "
     "before RoPE, no biases, untied, transformers-5 config layout."),
    ("gemma", GemmaForCausalLM, GemmaConfig,
     dict(COMMON, rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="gelu_pytorch_tanh"),
     True, "classic", [],
     "GemmaForCausalLM: GeGLU (tanh GELU), (1 + w) RMSNorm, embedding times sqrt(64), tied."),
    ("gemma2", Gemma2ForCausalLM, Gemma2Config,
     dict(COMMON, rms_norm_eps=1e-6, rope_theta=10000.0, query_pre_attn_scalar=24,
          attn_logit_softcapping=2.0, final_logit_softcapping=3.0, sliding_window=4),
     True, "native",
     [dict(attn_logit_softcapping=None), dict(final_logit_softcapping=None),
      dict(layer_types=["full_attention", "full_attention"])],
     "Gemma2ForCausalLM: norms before and after attention and MLP, attention soft-cap 2, "
     "final soft-cap 3, query_pre_attn_scalar 24, layer 0 sliding (window 4), layer 1 "
     "global; transformers-5 config layout (layer_types)."),
    ("gemma3", Gemma3ForCausalLM, Gemma3TextConfig,
     dict(COMMON, rms_norm_eps=1e-6, query_pre_attn_scalar=20, sliding_window=4,
          layer_types=["sliding_attention", "full_attention"],
          rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                              "rope_theta": 1000000.0},
                           "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
     True, "gemma3",
     [dict(layer_types=["full_attention", "full_attention"])],
     "Gemma3ForCausalLM: Gemma 2 plus QK-norm ((1 + w) RMSNorm per head); layer 0 sliding "
     "(window 4, RoPE base 10000), layer 1 global (base 1e6, linear scaling 8); "
     "query_pre_attn_scalar 20; classic config layout (sliding_window_pattern 2, "
     "rope_local_base_freq, rope_scaling)."),
    ("phi3", Phi3ForCausalLM, Phi3Config,
     dict(COMMON, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=5,
          partial_rotary_factor=0.75, tie_word_embeddings=False, pad_token_id=0),
     False, "classic", [dict(sliding_window=None)],
     "Phi3ForCausalLM: fused qkv_proj and gate_up_proj (gate is the first half), "
     "partial_rotary_factor 0.75 (12 of 16 dims rotate), sliding_window 5, untied."),
    ("olmo", OlmoForCausalLM, OlmoConfig,
     dict({k: v for k, v in COMMON.items() if k != "head_dim"}, rope_theta=10000.0,
          clip_qkv=0.5, tie_word_embeddings=True),
     False, "classic", [dict(clip_qkv=None)],
     "OlmoForCausalLM: LayerNorm without weight or bias (eps 1e-5), q/k/v clamped to "
     "[-0.5, 0.5], tied."),
    ("olmo2", Olmo2ForCausalLM, Olmo2Config,
     dict({k: v for k, v in COMMON.items() if k != "head_dim"}, rms_norm_eps=1e-6,
          rope_theta=500000.0, tie_word_embeddings=False),
     False, "native", [],
     "Olmo2ForCausalLM: no pre-norms; RMSNorm on the attention output and on the MLP output "
     "before each residual add; RMSNorm over the whole q and k projections; untied."),
    ("gpt2", GPT2LMHeadModel, GPT2Config,
     dict(n_embd=64, n_layer=2, n_head=4, n_inner=None, n_positions=64, vocab_size=VOCAB,
          activation_function="gelu_new", layer_norm_epsilon=1e-5, bos_token_id=1,
          eos_token_id=0),
     False, "gpt2", [],
     "GPT2LMHeadModel: Conv1D weights ([in, out]), learned positions (n_positions 64), "
     "LayerNorm with bias, gelu_new MLP of 4 x 64, tied; safetensors keys without the "
     "`transformer.` prefix plus `h.N.attn.bias` mask buffers, like openai-community/gpt2."),
    ("gpt_neox", GPTNeoXForCausalLM, GPTNeoXConfig,
     dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
          vocab_size=VOCAB, max_position_embeddings=128, hidden_act="gelu",
          rotary_pct=0.25, rotary_emb_base=10000, layer_norm_eps=1e-5,
          use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=1,
          eos_token_id=0),
     False, "neox", [dict(use_parallel_residual=False)],
     "GPTNeoXForCausalLM (Pythia layout): parallel residual, rotary_pct 0.25 (4 of 16 dims), "
     "fused query_key_value interleaved per head, LayerNorm with bias, exact GELU, untied; "
     "classic config (rotary_pct, rotary_emb_base)."),
    ("gpt_neox_seq", GPTNeoXForCausalLM, GPTNeoXConfig,
     dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
          vocab_size=VOCAB, max_position_embeddings=128, hidden_act="gelu",
          rotary_pct=0.5, rotary_emb_base=10000, layer_norm_eps=1e-5,
          use_parallel_residual=False, tie_word_embeddings=False, bos_token_id=1,
          eos_token_id=0),
     False, "native", [],
     "GPTNeoXForCausalLM with use_parallel_residual false (sequential blocks), rotary_pct "
     "0.5; transformers-5 config layout (rope_parameters.partial_rotary_factor)."),
]


def write_reference(d, name, ids, logits, ins, outs, note):
    ref = dict(
        text=TEXT,
        tokens=[int(i) for i in ids],
        logits=f32_list(logits),
        hidden_mlp_down_in_max=ins,
        hidden_mlp_down_out_max=outs,
        note=note + " Tokens: tokenizer.json's encoding of `text`, no special tokens. Logits: "
             f"[position][vocab] float32 from transformers {transformers.__version__} (eager "
             "attention). hidden_mlp_down_in_max: per layer the entry of largest |x| of the "
             "down-projection input over [position, channel]; hidden_mlp_down_out_max: the same "
             "for what the MLP adds to the residual stream (post_feedforward_layernorm output "
             "where the family has one, else the down-projection output) over [position, row].",
    )
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f, separators=(",", ":"))
        f.write("\n")


def build(spec, seed_off, ids):
    name, cls, cfg_cls, kw, zero_norms, style, toggles, note = spec
    gen = torch.Generator().manual_seed(SEED + seed_off)
    cfg = cfg_cls(**kw)
    model = cls(cfg).to(torch.float32)
    init_weights(model, gen, zero_norms)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    d = os.path.join(OUT, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    model.save_pretrained(d, safe_serialization=True)
    for f in ("generation_config.json",):
        if os.path.exists(os.path.join(d, f)):
            os.remove(os.path.join(d, f))
    cp = os.path.join(d, "config.json")
    if style == "classic":
        rewrite(cp, classic_rope)
    elif style == "gemma3":
        rewrite(cp, classic_gemma3)
    elif style == "neox":
        rewrite(cp, classic_neox)
    elif style == "gpt2":
        classic_gpt2_names(d)
    shutil.copyfile(TOKENIZER, os.path.join(d, "tokenizer.json"))

    # Reload from disk exactly as a user would.
    re = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    re.eval()
    rc = re.config
    if name == "gemma3":
        assert rc.layer_types == ["sliding_attention", "full_attention"], rc.layer_types
        assert rc.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
        assert rc.rope_parameters["full_attention"]["rope_type"] == "linear"
    if name == "phi3":
        assert rc.rope_parameters["partial_rotary_factor"] == 0.75, rc.rope_parameters
    if name.startswith("gpt_neox"):
        want = 0.25 if name == "gpt_neox" else 0.5
        assert rc.rope_parameters["partial_rotary_factor"] == want, rc.rope_parameters
    logits, ins, outs = run_reference(re, ids)
    ref_state = {k: v for k, v in re.state_dict().items()}
    for t in toggles:
        c2 = copy.deepcopy(re.config)
        for k, v in t.items():
            setattr(c2, k, v)
        c2._attn_implementation = "eager"
        other = logits_of(cls, c2, ref_state, ids, strict=False)
        diff = float(np.abs(other - logits).max())
        print(f"  toggle {t}: max|dlogit| {diff:.3e}")
        assert diff > 1e-3, f"{name}: toggle {t} has no effect"
    write_reference(d, name, ids, logits, ins, outs, note)
    size = sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d))
    print(f"{name}: {len(ids)} tokens, logit std {logits.std():.3f}, {size / 1024:.0f} KiB, "
          f"files {sorted(os.listdir(d))}")
    assert size < 700 * 1024, (name, size)
    return re


# ------------------------------------------------------------------------------------------
# GGUF: a Gemma 3 written the way llama.cpp's converter writes one.
# ------------------------------------------------------------------------------------------


def gguf_tokenizer(w):
    """The tiny byte-level BPE as a `gpt2` GGUF vocabulary."""
    import gguf
    tj = json.load(open(TOKENIZER))
    vocab = tj["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["id"] for a in tj["added_tokens"]}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
             for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)


def build_gemma3_gguf(ids):
    import gguf
    name = "gemma3_gguf"
    kw = dict(COMMON, rms_norm_eps=1e-6, query_pre_attn_scalar=16, sliding_window=4,
              layer_types=["sliding_attention", "full_attention"],
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                  "rope_theta": 1000000.0},
                               "sliding_attention": {"rope_type": "default",
                                                     "rope_theta": 10000.0}})
    gen = torch.Generator().manual_seed(SEED + 100)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**kw)).to(torch.float32)
    init_weights(model, gen, True)
    model.tie_weights()
    model.eval()
    logits, ins, outs = run_reference(model, ids)

    d = os.path.join(OUT, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    path = os.path.join(d, "model.gguf")
    w = gguf.GGUFWriter(path, "gemma3")
    w.add_name("swk tiny gemma3 fixture")
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(160)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_key_length(16)
    w.add_value_length(16)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1000000.0)
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(8.0)
    w.add_sliding_window(4)
    w.add_uint32("gemma3.attention.sliding_window_pattern", 2)
    gguf_tokenizer(w)
    # llama.cpp names; Gemma norms are stored as (1 + w) so that llama.cpp can use a plain
    # RMSNorm. Q/K are not permuted (Gemma uses NeoX-style RoPE in llama.cpp).
    names = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    sd = model.state_dict()
    for k in sorted(sd):
        v = sd[k].detach().to(torch.float32).numpy()
        if k == "lm_head.weight":
            continue
        if k == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif k == "model.norm.weight":
            g = "output_norm.weight"
        else:
            parts = k.split(".")
            l, rest = parts[2], ".".join(parts[3:-1])
            g = f"blk.{l}.{names[rest]}.weight"
        if k.endswith("norm.weight"):
            v = v + 1.0
        w.add_tensor(g, np.ascontiguousarray(v))
    finish_gguf(w)
    write_reference(d, name, ids, logits, ins, outs,
                    "Gemma3ForCausalLM (query_pre_attn_scalar 16 = head_dim, layer 0 sliding with "
                    "window 4, layer 1 global with linear RoPE scaling 8) written as GGUF "
                    "(general.architecture gemma3, llama.cpp tensor names, norms stored as 1 + w, "
                    "gpt2 tokenizer from the tiny tokenizer.json).")
    size = sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d))
    print(f"{name}: {size / 1024:.0f} KiB")
    assert size < 700 * 1024


def main():
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    ids = Tokenizer.from_file(TOKENIZER).encode(TEXT).ids
    only = set(sys.argv[1:])
    for off, spec in enumerate(SPECS):
        if only and spec[0] not in only:
            continue
        build(spec, off + 1, ids)
    if not only or "gemma3_gguf" in only:
        build_gemma3_gguf(ids)


if __name__ == "__main__":
    sys.exit(main())
