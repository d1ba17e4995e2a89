//! swk's tokenizer: a thin wrapper over the `tokenizers` crate with the model's special-token
//! conventions (BOS, end-of-generation ids), built from a Hugging Face `tokenizer.json` or from
//! the vocabulary a GGUF file embeds under `tokenizer.ggml.*`.
//!
//! # GGUF vocabularies
//!
//! * `tokenizer.ggml.model = "gpt2"`: byte-level BPE. The vocabulary and `tokenizer.ggml.merges`
//!   are used as stored; the pre-tokenizer follows `tokenizer.ggml.pre`:
//!   - `default`, `gpt-2`, `gpt2`, `mpt`, `olmo`, `jais`: the GPT-2 regex;
//!   - `smollm`, `starcoder`, `refact`, `command-r`, `codeshell`, `exaone`: every `\p{N}` on its
//!     own, then the GPT-2 regex (as llama.cpp does, and as these models' own `tokenizer.json`
//!     do with `Digits(individual_digits)`);
//!   - `llama3`, `llama-v3`, `llama-bpe`, `falcon3`, `falcon-h1`, `lfm2`, `midm-2.0`,
//!     `smaug-bpe`, `dbrx`: the Llama 3 regex, with `ignore_merges` (a pre-token that is itself a
//!     vocabulary entry is taken whole, as in Llama 3's `tokenizer.json` and llama.cpp);
//!   - `qwen2`, `deepseek-r1-qwen`, `stablelm2`, `megrez`: the Qwen2 regex;
//!   - anything else: the GPT-2 regex, with a warning on stderr.
//! * `tokenizer.ggml.model = "llama"`: SentencePiece-style BPE with byte fallback (`<0x0A>`
//!   tokens). Merges come from `tokenizer.ggml.merges` when present, otherwise they are rebuilt
//!   from the scores the way transformers' GGUF converter does: every split of a token into two
//!   vocabulary tokens is a merge, ranked by the score of the merged token. Spaces become `▁` and
//!   a `▁` is prepended to the start of the text when `tokenizer.ggml.add_space_prefix` (default
//!   true) and the text does not already start with a space (transformers' `Metaspace`
//!   "first" scheme). Decoding reverses this (`▁` → space, byte fallback, strip one leading
//!   space).
//!
//! Control tokens (`token_type` 3) and the unknown token become special tokens (recognized whole
//! in the text, skipped by `decode(.., true)`); user-defined tokens (4) become non-special added
//! tokens.

use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Decoder, SplitDelimiterBehavior};

use crate::io::gguf::{GgufFile, GgufValue};
use crate::{Error, Result};

/// The Llama 3 pre-tokenizer regex (from Llama 3's `tokenizer.json`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Qwen2 pre-tokenizer regex (from Qwen2's `tokenizer.json`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (`tokenizer.ggml.token_type`).
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// The SentencePiece word-boundary marker.
const SPM_SPACE: char = '\u{2581}';

/// A text tokenizer with the model's special-token conventions.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The file it was built from (for error messages).
    source: PathBuf,
    /// Token strings by id, as the GGUF stores them (None: ask `inner`).
    tokens: Option<Vec<String>>,
    /// One past the largest token id.
    vocab_size: usize,
    /// Ids of special tokens (skipped by `decode(.., true)`).
    special: HashSet<u32>,
    bos: Option<u32>,
    eos: Vec<u32>,
    add_bos: bool,
    /// How `encode(.., true)` adjusts what `inner`'s post-processor produces.
    fix: SpecialFix,
}

/// Adjustments to `inner.encode(.., true)` so that it follows the model's convention when the
/// `tokenizer.json` post-processor and `tokenizer_config.json` disagree (or, for GGUF, when there
/// is no post-processor at all).
#[derive(Clone, Copy, Debug, Default)]
struct SpecialFix {
    prepend: Option<u32>,
    strip_first: Option<u32>,
    append: Option<u32>,
    strip_last: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

/// Run a `tokenizers` constructor, turning a panic inside the dependency into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> tokenizers::Result<T>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: the tokenizers library panicked on this input")),
    }
}

impl Tokenizer {
    /// From a tokenizer.json (path used in errors). add_bos is derived: whether encoding with
    /// special tokens prepends BOS (the post-processor), unless a `tokenizer_config.json` next
    /// to it sets `add_bos_token` (which transformers also lets override the post-processor).
    ///
    /// Side files read when present: `tokenizer_config.json` (`add_bos_token`, `add_eos_token`,
    /// `bos_token`, `eos_token`) and `generation_config.json` (`eos_token_id`, a number or a
    /// list). Truncation and padding stored in the `tokenizer.json` are switched off.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let mut inner =
            guarded("not a valid tokenizer.json", || tokenizers::Tokenizer::from_bytes(&bytes))
                .map_err(|m| Error::format(path, m))?;
        inner
            .with_truncation(None)
            .map_err(|e| Error::format(path, format!("cannot disable truncation: {e}")))?;
        inner.with_padding(None);

        let dir = path.parent().unwrap_or(Path::new("."));
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = read_json_opt(&cfg_path)?;
        let gen_path = dir.join("generation_config.json");
        let gen = read_json_opt(&gen_path)?;

        let lookup = |what: &str, file: &Path, v: Option<&serde_json::Value>| -> Option<u32> {
            let name = v.and_then(token_content)?;
            let id = inner.token_to_id(name);
            if id.is_none() {
                eprintln!(
                    "warning: {}: {what} `{name}` is not in the vocabulary of {}; ignored",
                    file.display(),
                    path.display()
                );
            }
            id
        };
        let cfg_bos = cfg.as_ref().and_then(|c| lookup("bos_token", &cfg_path, c.get("bos_token")));
        let cfg_eos = cfg.as_ref().and_then(|c| lookup("eos_token", &cfg_path, c.get("eos_token")));
        let cfg_flag = |key: &str| -> Result<Option<bool>> {
            match cfg.as_ref().and_then(|c| c.get(key)) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::Bool(b)) => Ok(Some(*b)),
                Some(v) => Err(Error::config(&cfg_path, format!("`{key}` is {v}, not a bool"))),
            }
        };
        let cfg_add_bos = cfg_flag("add_bos_token")?;
        let cfg_add_eos = cfg_flag("add_eos_token")?;

        let vocab = inner.get_vocab(true);
        let vocab_size = vocab.values().max().map_or(0, |&m| m as usize + 1);
        let special: HashSet<u32> = inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect();

        let mut eos = Vec::new();
        if let Some(id) = cfg_eos {
            eos.push(id);
        }
        if let Some(v) = gen.as_ref().and_then(|g| g.get("eos_token_id")) {
            let ids: Vec<&serde_json::Value> = match v {
                serde_json::Value::Array(a) => a.iter().collect(),
                serde_json::Value::Null => Vec::new(),
                v => vec![v],
            };
            for v in ids {
                match v.as_u64().and_then(|id| u32::try_from(id).ok()) {
                    Some(id) if (id as usize) < vocab_size => {
                        if !eos.contains(&id) {
                            eos.push(id);
                        }
                    }
                    _ => eprintln!(
                        "warning: {}: eos_token_id {v} is not a token id of {}; ignored",
                        gen_path.display(),
                        path.display()
                    ),
                }
            }
        }

        // What the post-processor adds around a sequence.
        let (prefix, suffix) = probe_specials(&inner);
        let bos = cfg_bos.or_else(|| prefix.first().copied());
        let post_bos = bos.filter(|b| prefix.first() == Some(b));
        let add_bos = cfg_add_bos.unwrap_or(post_bos.is_some()) && bos.is_some();
        let mut fix = SpecialFix::default();
        match (add_bos, post_bos) {
            (true, None) if prefix.is_empty() => fix.prepend = bos,
            (false, Some(b)) => fix.strip_first = Some(b),
            _ => {}
        }
        let eos_tok = cfg_eos.or_else(|| eos.first().copied());
        let post_eos = eos_tok.filter(|e| suffix.last() == Some(e));
        match (cfg_add_eos, post_eos) {
            (Some(true), None) if suffix.is_empty() => fix.append = eos_tok,
            (Some(false), Some(e)) => fix.strip_last = Some(e),
            _ => {}
        }

        Ok(Tokenizer {
            inner,
            source: path.to_path_buf(),
            tokens: None,
            vocab_size,
            special,
            bos,
            eos,
            add_bos,
            fix,
        })
    }

    /// From the GGUF's embedded vocab (tokenizer.ggml.*).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path();
        let cfg = |msg: String| Error::config(path, msg);
        let model = match g.get("tokenizer.ggml.model") {
            None => {
                return Err(cfg("missing `tokenizer.ggml.model`: the file has no tokenizer".into()))
            }
            Some(v) => {
                v.as_str().ok_or_else(|| cfg("`tokenizer.ggml.model` is not a string".into()))?
            }
        };
        if model != "gpt2" && model != "llama" {
            return Err(cfg(format!(
                "unsupported tokenizer.ggml.model `{model}`; supported: gpt2 (byte-level BPE), \
                 llama (SentencePiece BPE)"
            )));
        }
        let tokens: Vec<String> = array(g, "tokenizer.ggml.tokens")?
            .ok_or_else(|| cfg("missing `tokenizer.ggml.tokens`".into()))?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| cfg(format!("`tokenizer.ggml.tokens`[{i}] is not a string")))
            })
            .collect::<Result<_>>()?;
        let n = tokens.len();
        if n == 0 {
            return Err(cfg("`tokenizer.ggml.tokens` is empty".into()));
        }
        if u32::try_from(n).is_err() {
            return Err(cfg(format!("`tokenizer.ggml.tokens` has {n} entries, too many")));
        }
        let types: Option<Vec<i64>> = array(g, "tokenizer.ggml.token_type")?
            .map(|a| {
                if a.len() != n {
                    return Err(cfg(format!(
                        "`tokenizer.ggml.token_type` has {} entries for {n} tokens",
                        a.len()
                    )));
                }
                a.iter()
                    .enumerate()
                    .map(|(i, v)| {
                        int(v).ok_or_else(|| {
                            cfg(format!("`tokenizer.ggml.token_type`[{i}] is not an integer"))
                        })
                    })
                    .collect()
            })
            .transpose()?;
        let scores: Option<Vec<f32>> = array(g, "tokenizer.ggml.scores")?
            .map(|a| {
                if a.len() != n {
                    return Err(cfg(format!(
                        "`tokenizer.ggml.scores` has {} entries for {n} tokens",
                        a.len()
                    )));
                }
                a.iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.as_f64().map(|s| s as f32).ok_or_else(|| {
                            cfg(format!("`tokenizer.ggml.scores`[{i}] is not a number"))
                        })
                    })
                    .collect()
            })
            .transpose()?;
        let merges: Option<Vec<(String, String)>> = array(g, "tokenizer.ggml.merges")?
            .map(|a| {
                a.iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.as_str()
                            .and_then(|s| s.split_once(' '))
                            .map(|(l, r)| (l.to_owned(), r.to_owned()))
                            .ok_or_else(|| {
                                cfg(format!(
                                    "`tokenizer.ggml.merges`[{i}] is not a string \"left right\""
                                ))
                            })
                    })
                    .collect()
            })
            .transpose()?;

        let bos = token_id(g, "tokenizer.ggml.bos_token_id", n)?;
        let eos_id = token_id(g, "tokenizer.ggml.eos_token_id", n)?;
        let eot = token_id(g, "tokenizer.ggml.eot_token_id", n)?;
        let eom = token_id(g, "tokenizer.ggml.eom_token_id", n)?;
        let unk = token_id(g, "tokenizer.ggml.unknown_token_id", n)?;
        let add_bos_key = flag(g, "tokenizer.ggml.add_bos_token")?;
        let add_eos = flag(g, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let add_space_prefix = flag(g, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
        let pre = match g.get("tokenizer.ggml.pre") {
            None => None,
            Some(v) => {
                Some(v.as_str().ok_or_else(|| cfg("`tokenizer.ggml.pre` is not a string".into()))?)
            }
        };

        // Token ids by string; for duplicated strings the last id wins (as a dict built in order).
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();

        let (mut inner, add_bos_default) = if model == "gpt2" {
            let merges = merges.ok_or_else(|| {
                cfg("`tokenizer.ggml.model` is gpt2 but `tokenizer.ggml.merges` is missing".into())
            })?;
            build_byte_level(path, vocab, merges, pre)?
        } else {
            let merges = match (merges, &scores) {
                (Some(m), _) => m,
                (None, Some(s)) => spm_merges(&tokens, s),
                (None, None) => {
                    return Err(cfg("a llama (SentencePiece) vocabulary needs \
                         `tokenizer.ggml.scores` or `tokenizer.ggml.merges`"
                        .into()))
                }
            };
            let unk_tok = unk.map(|id| tokens[id as usize].clone());
            (build_spm(path, vocab, merges, unk_tok, add_space_prefix)?, true)
        };

        // Special and added tokens.
        let mut special = HashSet::new();
        let mut specials = Vec::new();
        let mut user = Vec::new();
        if let Some(types) = &types {
            for (id, (tok, &ty)) in tokens.iter().zip(types).enumerate() {
                match ty {
                    TYPE_CONTROL | TYPE_UNKNOWN => {
                        special.insert(id as u32);
                        specials.push(AddedToken::from(tok.clone(), true).normalized(false));
                    }
                    TYPE_USER_DEFINED => {
                        user.push(AddedToken::from(tok.clone(), false).normalized(false))
                    }
                    _ => {}
                }
            }
        }
        for id in [bos, eos_id, eot, eom, unk].into_iter().flatten() {
            if special.insert(id) {
                specials
                    .push(AddedToken::from(tokens[id as usize].clone(), true).normalized(false));
            }
        }
        // Added tokens whose string is a vocabulary entry keep that entry's id; skip empty
        // strings, which cannot be matched in text.
        specials.retain(|t| !t.content.is_empty());
        user.retain(|t| !t.content.is_empty());
        inner.add_special_tokens(&specials);
        inner.add_tokens(&user);

        let mut eos = Vec::new();
        for id in [eos_id, eot, eom].into_iter().flatten() {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        let add_bos = add_bos_key.unwrap_or(add_bos_default) && bos.is_some();
        let fix = SpecialFix {
            prepend: if add_bos { bos } else { None },
            append: if add_eos { eos_id } else { None },
            ..SpecialFix::default()
        };
        Ok(Tokenizer {
            inner,
            source: path.to_path_buf(),
            tokens: Some(tokens),
            vocab_size: n,
            special,
            bos,
            eos,
            add_bos,
            fix,
        })
    }

    /// Token ids of `text`. With add_special=false: no BOS/EOS added (special-token strings like
    /// "<|im_start|>" in the text are still recognized as their single id). With
    /// add_special=true: BOS (and EOS) as the model's convention says, see [`Self::adds_bos`].
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, add_special).map_err(|e| {
            Error::Tokenizer(format!("{}: cannot encode text: {e}", self.source.display()))
        })?;
        let mut ids = enc.get_ids().to_vec();
        if add_special {
            let f = self.fix;
            if f.strip_first.is_some() && ids.first() == f.strip_first.as_ref() {
                ids.remove(0);
            }
            if f.strip_last.is_some() && ids.last() == f.strip_last.as_ref() {
                ids.pop();
            }
            if let Some(b) = f.prepend {
                ids.insert(0, b);
            }
            if let Some(e) = f.append {
                ids.push(e);
            }
        }
        Ok(ids)
    }

    /// Text of ids (special tokens skipped when skip_special). An id outside the vocabulary is
    /// an error.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let mut toks = Vec::with_capacity(ids.len());
        for &id in ids {
            let tok = self.token_str(id).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: cannot decode id {id}: not a token of this vocabulary ({} tokens)",
                    self.source.display(),
                    self.vocab_size
                ))
            })?;
            if !(skip_special && self.special.contains(&id)) {
                toks.push(tok);
            }
        }
        match self.inner.get_decoder() {
            Some(d) => d.decode(toks).map_err(|e| {
                Error::Tokenizer(format!("{}: cannot decode: {e}", self.source.display()))
            }),
            None => Ok(toks.join(" ")),
        }
    }

    /// Whether the model's convention adds BOS at the start of a sequence by default (what
    /// `encode(text, true)` does).
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// The beginning-of-sequence token id, when the model declares one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// All end-of-generation ids: eos, plus eot/eom if declared (GGUF), or the
    /// `generation_config.json` eos ids (tokenizer.json). Possibly empty.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Number of token ids (one past the largest id, added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The raw vocab string of a token (e.g. `Ġthe`, `▁the`, `<0x0A>`), for reports.
    pub fn token_str(&self, id: u32) -> Option<String> {
        match &self.tokens {
            Some(t) => t.get(id as usize).cloned(),
            None => self.inner.id_to_token(id),
        }
    }
}

/// A GGUF metadata array, or None when the key is absent.
fn array<'a>(g: &'a GgufFile, key: &str) -> Result<Option<&'a [GgufValue]>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_array()
            .map(Some)
            .ok_or_else(|| Error::config(g.path(), format!("`{key}` is not an array"))),
    }
}

/// An integer metadata value, signed or not.
fn int(v: &GgufValue) -> Option<i64> {
    match *v {
        GgufValue::I8(x) => Some(x.into()),
        GgufValue::I16(x) => Some(x.into()),
        GgufValue::I32(x) => Some(x.into()),
        GgufValue::I64(x) => Some(x),
        _ => v.as_u64().and_then(|x| i64::try_from(x).ok()),
    }
}

/// An optional token id: absent or negative (llama.cpp's "none") is None; out of range is an
/// error.
fn token_id(g: &GgufFile, key: &str, n: usize) -> Result<Option<u32>> {
    let Some(v) = g.get(key) else { return Ok(None) };
    match int(v) {
        Some(id) if id < 0 => Ok(None),
        Some(id) if (id as u64) < n as u64 => Ok(Some(id as u32)),
        Some(id) => Err(Error::config(
            g.path(),
            format!("`{key}` = {id} is outside the vocabulary ({n} tokens)"),
        )),
        None => Err(Error::config(g.path(), format!("`{key}` is not an integer"))),
    }
}

/// An optional bool metadata value.
fn flag(g: &GgufFile, key: &str) -> Result<Option<bool>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| Error::config(g.path(), format!("`{key}` is not a bool"))),
    }
}

/// The byte-level pre-tokenizer families swk knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PreKind {
    Gpt2,
    Gpt2Digits,
    Llama3,
    Qwen2,
}

/// The pre-tokenizer family for a `tokenizer.ggml.pre` value, and whether it was recognized.
fn pre_kind(pre: Option<&str>) -> (PreKind, bool) {
    match pre {
        None | Some("default" | "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais") => {
            (PreKind::Gpt2, true)
        }
        Some("smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone") => {
            (PreKind::Gpt2Digits, true)
        }
        Some(
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "lfm2" | "midm-2.0"
            | "smaug-bpe" | "dbrx",
        ) => (PreKind::Llama3, true),
        Some("qwen2" | "deepseek-r1-qwen" | "stablelm2" | "megrez") => (PreKind::Qwen2, true),
        Some(_) => (PreKind::Gpt2, false),
    }
}

/// Byte-level BPE ("gpt2"). Returns the tokenizer and whether the pre-tokenizer family adds BOS
/// by default (llama.cpp's rule for the Llama 3 family).
fn build_byte_level(
    path: &Path,
    vocab: Vocab,
    merges: Vec<(String, String)>,
    pre: Option<&str>,
) -> Result<(tokenizers::Tokenizer, bool)> {
    let (kind, known) = pre_kind(pre);
    if !known {
        eprintln!(
            "warning: {}: unknown tokenizer.ggml.pre `{}`; using the GPT-2 pre-tokenizer regex, \
             ids may differ from the original tokenizer",
            path.display(),
            pre.unwrap_or_default()
        );
    }
    let bpe = guarded("cannot build the BPE model from tokenizer.ggml.tokens/merges", || {
        BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(kind == PreKind::Llama3)
            .build()
    })
    .map_err(|m| Error::format(path, m))?;
    let byte_level =
        |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        guarded("cannot compile the pre-tokenizer regex", || {
            Split::new(SplitPattern::Regex(re.to_owned()), SplitDelimiterBehavior::Isolated, false)
        })
        .map(PreTokenizerWrapper::Split)
        .map_err(|m| Error::format(path, m))
    };
    let pre_tok = match kind {
        PreKind::Gpt2 => byte_level(true),
        PreKind::Gpt2Digits => PreTokenizerWrapper::Sequence(PreSequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level(true),
        ])),
        PreKind::Llama3 => PreTokenizerWrapper::Sequence(PreSequence::new(vec![
            split(LLAMA3_SPLIT)?,
            byte_level(false),
        ])),
        PreKind::Qwen2 => PreTokenizerWrapper::Sequence(PreSequence::new(vec![
            split(QWEN2_SPLIT)?,
            byte_level(false),
        ])),
    };
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(pre_tok));
    tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    Ok((tok, kind == PreKind::Llama3 && !matches!(pre, Some("smaug-bpe" | "dbrx"))))
}

/// SentencePiece-style BPE ("llama") with byte fallback.
fn build_spm(
    path: &Path,
    vocab: Vocab,
    merges: Vec<(String, String)>,
    unk: Option<String>,
    add_space_prefix: bool,
) -> Result<tokenizers::Tokenizer> {
    let bpe = guarded("cannot build the BPE model from tokenizer.ggml.tokens/scores", || {
        let mut b =
            BPE::builder().vocab_and_merges(vocab, merges).fuse_unk(true).byte_fallback(true);
        if let Some(u) = unk {
            b = b.unk_token(u);
        }
        b.build()
    })
    .map_err(|m| Error::format(path, m))?;
    let scheme = if add_space_prefix { PrependScheme::First } else { PrependScheme::Never };
    let replace = guarded("cannot build the decoder", || Replace::new(SPM_SPACE.to_string(), " "))
        .map_err(|m| Error::format(path, m))?;
    let mut decoders = vec![
        DecoderWrapper::Replace(replace),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if add_space_prefix {
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Metaspace(Metaspace::new(
        SPM_SPACE, scheme, false,
    ))));
    tok.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(decoders))));
    Ok(tok)
}

/// Merges implied by a scored vocabulary (what transformers' GGUF converter does when a file
/// stores no merges): every split of a token into two vocabulary tokens is a merge; merges are
/// ranked by the merged token's score (best first), then by the character lengths of the left
/// and right pieces (longer first), then in vocabulary order.
fn spm_merges(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    // Last id / score wins for a duplicated string; iteration follows first appearance.
    let mut id_of: HashMap<&str, u32> = HashMap::with_capacity(tokens.len());
    let mut score_of: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    let mut order = Vec::with_capacity(tokens.len());
    for (i, (t, &s)) in tokens.iter().zip(scores).enumerate() {
        id_of.insert(t, i as u32);
        if score_of.insert(t, s).is_none() {
            order.push(t.as_str());
        }
    }
    // (left, right, score, left chars, right chars)
    let mut merges: Vec<(&str, &str, f32, usize, usize)> = Vec::new();
    let mut local = Vec::new();
    for t in order {
        let score = score_of.get(t).copied().unwrap_or(f32::NEG_INFINITY);
        // A total order for the sort: NaN ranks last, -0 equals 0.
        let score = if score.is_nan() { f32::NEG_INFINITY } else { score + 0.0 };
        local.clear();
        for (idx, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(idx);
            if let (Some(&li), Some(&ri)) = (id_of.get(l), id_of.get(r)) {
                local.push((li, ri, l, r));
            }
        }
        local.sort_by_key(|&(li, ri, _, _)| (li, ri));
        for &(_, _, l, r) in &local {
            merges.push((l, r, score, l.chars().count(), r.chars().count()));
        }
    }
    merges.sort_by(|a, b| b.2.total_cmp(&a.2).then(b.3.cmp(&a.3)).then(b.4.cmp(&a.4)));
    merges.into_iter().map(|(l, r, ..)| (l.to_owned(), r.to_owned())).collect()
}

/// A JSON file if it exists.
fn read_json_opt(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| Error::Json { path: path.to_path_buf(), source })
}

/// A special token's string in `tokenizer_config.json`: a string or an AddedToken object.
fn token_content(v: &serde_json::Value) -> Option<&str> {
    match v {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()),
        _ => None,
    }
}

/// The ids the post-processor puts before and after a sequence, found by encoding a probe text
/// with and without special tokens.
fn probe_specials(tok: &tokenizers::Tokenizer) -> (Vec<u32>, Vec<u32>) {
    for probe in ["a", "Hello", "0", " ", "."] {
        let (Ok(with), Ok(without)) = (tok.encode_fast(probe, true), tok.encode_fast(probe, false))
        else {
            continue;
        };
        let (with, without) = (with.get_ids(), without.get_ids());
        if without.is_empty() {
            continue;
        }
        if let Some(k) = (0..=with.len().saturating_sub(without.len()))
            .find(|&k| with.get(k..k + without.len()) == Some(without))
        {
            return (with[..k].to_vec(), with[k + without.len()..].to_vec());
        }
        return (Vec::new(), Vec::new());
    }
    (Vec::new(), Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The merges rebuilt from the fixture GGUF's scores are exactly the ones transformers
    /// derived and saved (ties in score included).
    #[test]
    fn spm_merges_match_transformers() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer");
        let g = GgufFile::open(dir.join("spm_tiny.gguf")).unwrap();
        let strings = |key: &str| -> Vec<String> {
            g.get(key)
                .unwrap()
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().into())
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens");
        let scores: Vec<f32> = g
            .get("tokenizer.ggml.scores")
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let ours = spm_merges(&tokens, &scores);

        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("hf_spm/tokenizer.json")).unwrap())
                .unwrap();
        let theirs: Vec<(String, String)> = json["model"]["merges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => {
                    let (l, r) = s.split_once(' ').unwrap();
                    (l.to_owned(), r.to_owned())
                }
                m => (m[0].as_str().unwrap().to_owned(), m[1].as_str().unwrap().to_owned()),
            })
            .collect();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn pre_tokenizer_names() {
        assert_eq!(pre_kind(Some("smollm")), (PreKind::Gpt2Digits, true));
        assert_eq!(pre_kind(Some("llama-bpe")), (PreKind::Llama3, true));
        assert_eq!(pre_kind(Some("qwen2")), (PreKind::Qwen2, true));
        assert_eq!(pre_kind(Some("gpt-2")), (PreKind::Gpt2, true));
        assert_eq!(pre_kind(None), (PreKind::Gpt2, true));
        assert_eq!(pre_kind(Some("something-new")), (PreKind::Gpt2, false));
    }
}
