"""What the fixture scripts of tests/reference/ share: where the tiny fixtures live, their
vocabulary size and reference text, float32 values as JSON, and reference logits.

The scripts run as `python tests/reference/NAME.py`, so this directory is on sys.path."""

import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "tiny")
TOKENIZER = os.path.join(OUT, "llama", "tokenizer.json")

VOCAB = 320
TEXT = "The crew checked the sails, then the boat left."


def f32_list(a):
    """float32 array -> nested Python floats whose JSON text is the shortest string that
    round-trips to the same float32 (parse it as f32 to get the exact value back)."""
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 0:
        return float(str(a[()]))
    return [f32_list(x) for x in a]


def logits_of(cls, cfg, state, ids, strict=True):
    """float32 logits of `ids` from a fresh `cls(cfg)` holding `state` (eval mode, no cache);
    tied embeddings re-tied after loading."""
    import torch

    m = cls(cfg).to(torch.float32).eval()
    m.load_state_dict(state, strict=strict)
    if cfg.tie_word_embeddings:
        m.tie_weights()
    with torch.no_grad():
        return m(torch.tensor([ids]), use_cache=False).logits[0].numpy()


def finish_gguf(w):
    """Write a GGUFWriter's header, metadata and tensors, and close its file."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
