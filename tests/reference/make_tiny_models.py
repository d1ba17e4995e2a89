#!/usr/bin/env python3
"""Build the tiny random-weight reference models under tests/fixtures/tiny/.

For every model directory this writes:
  config.json            HF config (see README for the two config styles used)
  model.safetensors      weights (or model-0000x-of-0000y.safetensors + index for llama_sharded)
  tokenizer.json         a tiny byte-level BPE trained here (identical in every directory)
  reference.json         input text, token ids, float32 logits from transformers, and the
                         mlp.down_proj activation maxima per layer

Every number is deterministic: weights come from a seeded torch.Generator, the tokenizer is
trained on the fixed corpus below, and the script checks the transformers logits against an
independent numpy forward pass before writing anything.

Run:  /work/ref/venv/bin/python tests/reference/make_tiny_models.py
"""

import copy
import hashlib
import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fixture_common import f32_list  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "tiny")

SEED = 20240611
VOCAB_SIZE = 320
SPECIAL_TOKENS = ["<|endoftext|>", "<s>"]  # ids 0 and 1

# Training text for the tiny tokenizer (written for this fixture).
CORPUS = [
    "The small boat left the harbor early in the morning, while the water was still calm "
    "and the gulls were circling over the fishing nets. The crew checked the ropes, the sails "
    "and the engine, then turned the bow toward the open sea.",
    "A good garden needs sunlight, water and patience. Tomatoes grow best in warm soil, beans "
    "climb any pole they can find, and the herbs by the kitchen door are picked almost every day "
    "for soup, salad and bread.",
    "In the old town there is a bakery that opens at five. The baker has made the same round "
    "loaves for thirty years, and people line up in the street before the shutters go up. "
    "On Sundays the line is longer than the street itself.",
    "Mountains change the weather around them. Moist air rises along the slopes, cools, and "
    "falls as rain or snow on one side, while the other side stays dry. That is why a short "
    "drive across a pass can take you from green forests to bare brown hills.",
    "The library keeps its maps in long flat drawers. Some show roads that no longer exist, "
    "others show rivers that have moved, and a few were drawn by hand by travelers who wanted "
    "to remember where they had been and what they had seen there.",
    "Numbers such as 12, 345 and 2024 appear in dates, prices and scores. Counting is one of "
    "the first things children learn: one, two, three, four, five, six, seven, eight, nine, ten.",
]

# Texts fed to the models. The llama3_rope text is longer so that positions go beyond
# original_max_position_embeddings (32) of its rope scaling.
TEXT_SHORT = "The crew checked the sails, then the boat left."
TEXT_LONG = "The small boat left the harbor early in the morning, while the water was calm."

BASE = dict(
    hidden_size=64,
    intermediate_size=160,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB_SIZE,
    bos_token_id=1,
    eos_token_id=0,
    pad_token_id=None,
    hidden_act="silu",
)


def build_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.token_to_id("<s>") == 1
    return tok


def init_weights(model, gen, std=0.08):
    """Deterministic random init, in sorted parameter-name order."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))


def make_model(kind, gen, **extra):
    cfg_kw = dict(BASE)
    cfg_kw.update(extra)
    if kind == "llama":
        cfg = LlamaConfig(**cfg_kw)
        model = LlamaForCausalLM(cfg)
    elif kind == "mistral":
        cfg = MistralConfig(**cfg_kw)
        model = MistralForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = Qwen2Config(**cfg_kw)
        model = Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    model = model.to(torch.float32)
    init_weights(model, gen)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    return model


def legacy_config(path, dtype_name):
    """Rewrite a transformers-5 config.json into the classic layout that nearly every
    checkpoint on the Hub uses: top-level rope_theta and rope_scaling (null when unscaled),
    torch_dtype instead of dtype."""
    with open(path) as f:
        cfg = json.load(f)
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    if rp.get("rope_type", "default") == "default":
        cfg["rope_scaling"] = None
    else:
        cfg["rope_scaling"] = rp
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = dtype_name
    cfg = dict(sorted(cfg.items()))
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


# ----------------------------------------------------------------------------------------
# Independent numpy forward pass (float64), used only to cross-check transformers.
# ----------------------------------------------------------------------------------------


def np_inv_freq(cfg):
    d = cfg["head_dim"]
    theta = cfg["rope_theta"]
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    sc = cfg.get("rope_scaling")
    if sc and sc.get("rope_type") == "llama3":
        factor = sc["factor"]
        lo, hi = sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        lo_wl, hi_wl = old / lo, old / hi
        wl = 2 * np.pi / inv
        out = np.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv / factor + smooth * inv
        med = (wl >= hi_wl) & (wl <= lo_wl)
        inv = np.where(med, smoothed, out)
    return inv


def np_forward(w, cfg, ids, sliding_window=None):
    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg["rms_norm_eps"]) * g

    def rope(x, pos, inv):  # x: [T, H, D], rotate-half convention (first half / second half)
        ang = pos[:, None] * inv[None, :]  # [T, D/2]
        cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
        sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
        h = x.shape[-1] // 2
        rot = np.concatenate([-x[..., h:], x[..., :h]], -1)
        return x * cos + rot * sin

    g = lambda k: w[k].astype(np.float64)
    T = len(ids)
    H, KV, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    inv = np_inv_freq(cfg)
    pos = np.arange(T, dtype=np.float64)
    mask = np.tril(np.ones((T, T), dtype=bool))
    if sliding_window is not None:
        qi, ki = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
        mask &= (qi - ki) < sliding_window
    x = g("model.embed_tokens.weight")[ids]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        h = rms(x, g(p + "input_layernorm.weight"))

        def lin(name, inp):
            y = inp @ g(p + name + ".weight").T
            if (p + name + ".bias") in w:
                y = y + g(p + name + ".bias")
            return y

        q = lin("self_attn.q_proj", h).reshape(T, H, D)
        k = lin("self_attn.k_proj", h).reshape(T, KV, D)
        v = lin("self_attn.v_proj", h).reshape(T, KV, D)
        q, k = rope(q, pos, inv), rope(k, pos, inv)
        rep = H // KV
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)  # head h uses kv head h // rep
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(D)
        s = np.where(mask[None], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = np.einsum("hts,shd->thd", s, v).reshape(T, H * D)
        x = x + lin("self_attn.o_proj", a)
        h = rms(x, g(p + "post_attention_layernorm.weight"))
        gate = lin("mlp.gate_proj", h)
        up = lin("mlp.up_proj", h)
        x = x + lin("mlp.down_proj", gate / (1 + np.exp(-gate)) * up)
    x = rms(x, g("model.norm.weight"))
    head = "lm_head.weight" if "lm_head.weight" in w else "model.embed_tokens.weight"
    return x @ g(head).T


# ----------------------------------------------------------------------------------------


def run_reference(model, ids):
    """Forward in float32 with hooks on every mlp.down_proj; returns logits and maxima."""
    rec = {}
    hooks = []
    for l, layer in enumerate(model.model.layers):

        def hook(mod, inp, out, l=l):
            rec[l] = (inp[0][0].detach().clone(), out[0].detach().clone())

        hooks.append(layer.mlp.down_proj.register_forward_hook(hook))
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits[0]
    for h in hooks:
        h.remove()
    ins, outs = [], []
    for l in range(len(model.model.layers)):
        xin, xout = rec[l]
        pi, ci = np.unravel_index(int(xin.abs().argmax()), tuple(xin.shape))
        po, ro = np.unravel_index(int(xout.abs().argmax()), tuple(xout.shape))
        ins.append(
            dict(layer=l, value=f32_list(xin[pi, ci].numpy()), abs=f32_list(xin[pi, ci].abs().numpy()),
                 position=int(pi), channel=int(ci))
        )
        outs.append(
            dict(layer=l, value=f32_list(xout[po, ro].numpy()), abs=f32_list(xout[po, ro].abs().numpy()),
                 position=int(po), row=int(ro))
        )
    return logits.numpy().astype(np.float32), ins, outs


def file_sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)

    tok = build_tokenizer()
    tok_path = os.path.join(OUT, "tokenizer.json.tmp")
    tok.save(tok_path)

    short_ids = tok.encode(TEXT_SHORT).ids
    long_ids = tok.encode(TEXT_LONG).ids
    print(f"tokenizer: vocab {tok.get_vocab_size()}, short text {len(short_ids)} tokens, "
          f"long text {len(long_ids)} tokens")
    assert 36 <= len(long_ids) <= 128 and len(short_ids) > 8

    llama_common = dict(num_hidden_layers=2, max_position_embeddings=128, rms_norm_eps=1e-5)
    specs = [
        # name, kind, config extras, text, seed offset, config style, note
        ("llama", "llama",
         dict(llama_common, tie_word_embeddings=True, rope_theta=10000.0), TEXT_SHORT, 1, "legacy",
         "LlamaForCausalLM, 2 layers, tied embeddings (no lm_head.weight tensor), rope_theta 10000, "
         "GQA 4 query heads / 2 kv heads, head_dim 16."),
        ("llama3_rope", "llama",
         dict(num_hidden_layers=2, max_position_embeddings=256, rms_norm_eps=1e-5,
              tie_word_embeddings=False, rope_theta=500000.0,
              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
         TEXT_LONG, 2, "legacy",
         "Llama with llama3 rope scaling (factor 8, low 1, high 4, original max 32), rope_theta "
         "500000, untied lm_head; the text is longer than 32 tokens."),
        ("mistral", "mistral",
         dict(num_hidden_layers=2, max_position_embeddings=128, rms_norm_eps=1e-5,
              tie_word_embeddings=False, rope_theta=10000.0, sliding_window=4),
         TEXT_SHORT, 3, "legacy",
         "MistralForCausalLM, sliding_window 4, untied. transformers' mask: query i attends key j "
         "iff j <= i and i - j < 4 (the token itself plus the 3 previous ones)."),
        ("qwen2", "qwen2",
         dict(num_hidden_layers=2, max_position_embeddings=128, rms_norm_eps=1e-6,
              tie_word_embeddings=False, rope_theta=1000000.0, use_sliding_window=False),
         TEXT_SHORT, 4, "native",
         "Qwen2ForCausalLM: q/k/v have random non-zero biases (o_proj and the MLP have none), "
         "rms_norm_eps 1e-6, rope_theta 1e6, untied. config.json is in the transformers-5 "
         "layout (rope_parameters {rope_theta, rope_type}, dtype) rather than the classic one."),
    ]

    built = {}
    for name, kind, extra, text, seed_off, style, note in specs:
        gen = torch.Generator().manual_seed(SEED + seed_off)
        model = make_model(kind, gen, **extra)
        built[name] = (model, kind, extra, text, style, note)

    # Variants of the tied llama model.
    variants = [
        ("llama_sharded", "llama", torch.float32, "200KB",
         "Same weights as `llama`, saved in shards (model-0000x-of-0000y.safetensors + "
         "model.safetensors.index.json). Logits equal those of `llama`."),
        ("llama_f16", "llama", torch.float16, None,
         "The `llama` weights rounded to float16 and stored as F16; reference logits computed in "
         "float32 after upcasting the stored F16 weights back to f32."),
        ("llama_bf16", "llama", torch.bfloat16, None,
         "The `llama` weights rounded to bfloat16 and stored as BF16; reference logits computed "
         "in float32 after upcasting the stored BF16 weights back to f32."),
    ]

    jobs = [(name, built[name][0], torch.float32, None, name) for name, *_ in specs]
    jobs += [(vname, built[src][0], dt, shard, src) for vname, src, dt, shard, _ in variants]
    vnotes = {v[0]: v[4] for v in variants}

    summary = {}
    for name, model, dtype, shard, src in jobs:
        _, kind, extra, text, style, note = built[src]
        if name in vnotes:
            note = vnotes[name]
        d = os.path.join(OUT, name)
        os.makedirs(d)
        m = model
        if dtype != torch.float32:
            m = copy.deepcopy(model).to(dtype)
            m.config.dtype = dtype
        kw = dict(safe_serialization=True)
        if shard:
            kw["max_shard_size"] = shard
        m.save_pretrained(d, **kw)
        cfg_path = os.path.join(d, "config.json")
        if style == "legacy":
            legacy_config(cfg_path, {torch.float32: "float32", torch.float16: "float16",
                                     torch.bfloat16: "bfloat16"}[dtype])
        shutil.copyfile(tok_path, os.path.join(d, "tokenizer.json"))
        for f in ("generation_config.json",):
            p = os.path.join(d, f)
            if os.path.exists(p):
                os.remove(p)

        # Reload from disk exactly as a user would, upcast to f32, run eager attention.
        re = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
        re.eval()
        rc = re.config
        if src == "llama3_rope":
            assert rc.rope_parameters["rope_type"] == "llama3", rc.rope_parameters
        if src == "mistral":
            assert rc.sliding_window == 4
        ids = Tokenizer.from_file(os.path.join(d, "tokenizer.json")).encode(text).ids
        logits, ins, outs = run_reference(re, ids)

        # Cross-check with the independent numpy forward on the weights as stored.
        sd = {k: v.detach().to(torch.float32).numpy() for k, v in re.state_dict().items()}
        if rc.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        ncfg = dict(head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=rc.num_hidden_layers, rms_norm_eps=rc.rms_norm_eps,
                    rope_theta=rc.rope_parameters["rope_theta"],
                    rope_scaling=rc.rope_parameters if rc.rope_parameters.get("rope_type") == "llama3" else None)
        sw = 4 if src == "mistral" else None
        ref = np_forward(sd, ncfg, ids, sliding_window=sw)
        err = float(np.abs(ref - logits).max())
        print(f"{name}: {len(ids)} tokens, numpy-vs-transformers max|dlogit| = {err:.2e}, "
              f"logit std {logits.std():.3f}")
        assert err < 2e-4, (name, err)
        if src == "mistral":
            nowin = np_forward(sd, ncfg, ids, sliding_window=None)
            assert np.abs(nowin - logits).max() > 1e-2, "sliding window has no effect"
            for other in (3, 5):
                assert np.abs(np_forward(sd, ncfg, ids, sliding_window=other) - logits).max() > 1e-3

        ref_json = dict(
            text=text,
            tokens=[int(i) for i in ids],
            logits=f32_list(logits),
            hidden_mlp_down_in_max=ins,
            hidden_mlp_down_out_max=outs,
            note=note + " Tokens are tokenizer.json's encoding of `text` with no special tokens "
                 "added. Logits: [position][vocab] float32 from transformers "
                 f"{transformers.__version__} (eager attention, float32). "
                 "hidden_mlp_down_in_max: per layer, the entry of largest |x| of the input of "
                 "mlp.down_proj over [position, channel] (value is signed); "
                 "hidden_mlp_down_out_max: same for its output over [position, row].",
        )
        with open(os.path.join(d, "reference.json"), "w") as f:
            json.dump(ref_json, f, separators=(",", ":"))
            f.write("\n")
        size = sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d))
        summary[name] = dict(files=sorted(os.listdir(d)), bytes=size)
        print(f"  files {sorted(os.listdir(d))}, {size/1024:.0f} KiB")

    os.remove(tok_path)
    for name in summary:
        print(name, file_sha(os.path.join(OUT, name, "reference.json"))[:16])


if __name__ == "__main__":
    sys.exit(main())
