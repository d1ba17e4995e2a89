//! swk's tokenizer against reference ids recorded with transformers
//! (tests/reference/make_tokenizer_fixtures.py), plus error handling on bad input.

use std::path::{Path, PathBuf};

use serde_json::Value;
use swk::io::gguf::GgufFile;
use swk::io::tokenizer::Tokenizer;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn load_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("ids array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// The SmolLM2 GGUF, or None (with a message) when it is not on this machine.
fn smollm2_path() -> Option<PathBuf> {
    let p = match std::env::var_os("SWK_TEST_MODEL") {
        Some(p) => PathBuf::from(p),
        None => {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(".models/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    if p.is_file() {
        Some(p)
    } else {
        eprintln!(
            "skipping: SmolLM2 GGUF not found at {} (set SWK_TEST_MODEL to run this test)",
            p.display()
        );
        None
    }
}

/// Check every case of a fixture file: ids with and without special tokens, and decoding.
fn check_cases(tok: &Tokenizer, fixture: &Value, ids_key: &str, special_key: &str, what: &str) {
    let cases = fixture["cases"].as_array().expect("cases");
    assert!(!cases.is_empty());
    for c in cases {
        let text = c["text"].as_str().expect("text");
        let want = ids(&c[ids_key]);
        let got = tok.encode(text, false).expect("encode");
        assert_eq!(got, want, "{what}: ids of {text:?}");
        if let Some(w) = c.get(special_key) {
            let got = tok.encode(text, true).expect("encode with special");
            assert_eq!(got, ids(w), "{what}: ids with special tokens of {text:?}");
        }
        let decoded = tok.decode(&want, false).expect("decode");
        assert_eq!(decoded, c["decoded"].as_str().expect("decoded"), "{what}: decode of {text:?}");
        let decoded = tok.decode(&want, true).expect("decode skip special");
        assert_eq!(
            decoded,
            c["decoded_skip_special"].as_str().expect("decoded_skip_special"),
            "{what}: decode (skip special) of {text:?}"
        );
    }
}

#[test]
fn smollm2_gguf_matches_reference_ids() {
    let Some(path) = smollm2_path() else { return };
    let g = GgufFile::open(&path).expect("open gguf");
    let tok = Tokenizer::from_gguf(&g).expect("tokenizer");
    let fx = load_json(&fixtures().join("smollm2_ids.json"));

    assert_eq!(tok.vocab_size(), 49152);
    assert!(!tok.adds_bos(), "SmolLM2 sets tokenizer.ggml.add_bos_token = false");
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_ids(), &[2]);
    assert_eq!(tok.token_str(1).as_deref(), Some("<|im_start|>"));
    assert_eq!(tok.token_str(216).as_deref(), Some("\u{120}"));
    assert_eq!(tok.token_str(49152), None);

    // swk follows llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json): every
    // \p{N} is split off. transformers' GGUF loader does not know "smollm" and keeps runs of
    // unicode numerals together, so `ids_digits` is the reference here.
    check_cases(&tok, &fx, "ids_digits", "ids_digits_with_special", "smollm2");
    for c in fx["cases"].as_array().expect("cases") {
        let text = c["text"].as_str().expect("text");
        // Byte-level BPE round-trips any text exactly.
        assert_eq!(tok.decode(&tok.encode(text, false).unwrap(), false).unwrap(), text);
        if c["digits_disagree"].as_bool() == Some(true) {
            eprintln!("note: transformers' GGUF tokenizer differs on {text:?} (numerals split)");
        }
    }

    // The chat markers are single special tokens, also without add_special.
    let chat = tok.encode("<|im_start|>user\nHi<|im_end|>\n", false).unwrap();
    assert_eq!(chat.first(), Some(&1));
    assert!(chat.contains(&2));
    assert_eq!(tok.decode(&chat, true).unwrap(), "user\nHi\n");

    // The shared model reference recorded by the model-reference script, when present.
    let shared =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2/reference.json");
    if shared.is_file() {
        let r = load_json(&shared);
        for c in r["tokenizer"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let text = c["text"].as_str().expect("text");
            let want = c.get("ids_split_digits").unwrap_or(&c["ids"]);
            assert_eq!(tok.encode(text, false).unwrap(), ids(want), "reference.json: {text:?}");
        }
    }
}

#[test]
fn spm_gguf_matches_transformers() {
    let path = fixtures().join("spm_tiny.gguf");
    let g = GgufFile::open(&path).expect("open gguf");
    let tok = Tokenizer::from_gguf(&g).expect("tokenizer");
    let fx = load_json(&fixtures().join("spm_ids.json"));
    assert_eq!(tok.vocab_size() as u64, fx["vocab_size"].as_u64().unwrap());
    assert!(tok.adds_bos());
    assert_eq!(tok.bos_id(), Some(1));
    let eot = fx["eot_id"].as_u64().unwrap() as u32;
    assert_eq!(tok.eos_ids(), &[2, eot], "eos then eot");
    assert_eq!(tok.token_str(3).as_deref(), Some("<0x00>"));
    assert_eq!(tok.token_str(13).as_deref(), Some("<0x0A>"));
    check_cases(&tok, &fx, "ids", "ids_with_special", "spm gguf");
    // Text without a leading space round-trips (byte fallback covers what the vocab lacks).
    for text in ["Hello world", "newline\nhere", "日本 🤗 ~{}", "multiple   spaces"] {
        assert_eq!(tok.decode(&tok.encode(text, false).unwrap(), false).unwrap(), text);
    }
}

#[test]
fn hf_spm_tokenizer_json_matches_transformers() {
    let tok = Tokenizer::from_file(&fixtures().join("hf_spm/tokenizer.json")).expect("tokenizer");
    let fx = load_json(&fixtures().join("hf_spm_ids.json"));
    assert!(tok.adds_bos(), "the post-processor prepends <s>");
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(
        tok.eos_ids(),
        ids(&fx["eos_ids"]).as_slice(),
        "tokenizer_config + generation_config"
    );
    assert_eq!(tok.vocab_size(), 421);
    assert_eq!(tok.token_str(1).as_deref(), Some("<s>"));
    check_cases(&tok, &fx, "ids", "ids_with_special", "hf_spm");

    // The GGUF and the tokenizer.json transformers saved from it agree.
    let g = GgufFile::open(fixtures().join("spm_tiny.gguf")).unwrap();
    let from_gguf = Tokenizer::from_gguf(&g).unwrap();
    for c in fx["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, true).unwrap(), from_gguf.encode(text, true).unwrap());
    }
}

#[test]
fn hf_bpe_tokenizer_json_matches_tokenizers() {
    let tok = Tokenizer::from_file(&fixtures().join("hf_bpe/tokenizer.json")).expect("tokenizer");
    let fx = load_json(&fixtures().join("hf_bpe_ids.json"));
    assert!(!tok.adds_bos());
    assert_eq!(tok.bos_id(), None);
    assert!(tok.eos_ids().is_empty());
    assert_eq!(tok.vocab_size() as u64, fx["vocab_size"].as_u64().unwrap());
    check_cases(&tok, &fx, "ids", "ids_with_special", "hf_bpe");
    for c in fx["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        assert_eq!(tok.decode(&tok.encode(text, false).unwrap(), false).unwrap(), text);
    }
}

/// A copy of a fixture directory's tokenizer.json with the given side files.
fn hf_dir_with(src: &str, side: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixtures().join(src).join("tokenizer.json"), dir.path().join("tokenizer.json"))
        .unwrap();
    for (name, text) in side {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

#[test]
fn tokenizer_config_overrides_the_post_processor() {
    // add_bos_token = false removes the BOS the post-processor adds.
    let dir = hf_dir_with("hf_spm", &[("tokenizer_config.json", r#"{"add_bos_token": false}"#)]);
    let tok = Tokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    assert!(!tok.adds_bos());
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.encode("hello world", true).unwrap(), tok.encode("hello world", false).unwrap());

    // add_bos_token = true on a tokenizer.json without post-processor prepends it; the
    // AddedToken-object form of bos_token and a plain-number eos_token_id are understood.
    let dir = hf_dir_with(
        "hf_bpe",
        &[
            (
                "tokenizer_config.json",
                r#"{"add_bos_token": true, "add_eos_token": true,
                    "bos_token": {"content": "<|endoftext|>", "special": true},
                    "eos_token": "<|endoftext|>"}"#,
            ),
            ("generation_config.json", r#"{"eos_token_id": 0}"#),
        ],
    );
    let tok = Tokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    assert!(tok.adds_bos());
    assert_eq!(tok.bos_id(), Some(0));
    assert_eq!(tok.eos_ids(), &[0]);
    let plain = tok.encode("hello world", false).unwrap();
    let with = tok.encode("hello world", true).unwrap();
    assert_eq!(with.len(), plain.len() + 2);
    assert_eq!((with[0], with[with.len() - 1]), (0, 0));
    assert_eq!(&with[1..with.len() - 1], plain.as_slice());
    assert_eq!(tok.decode(&with, true).unwrap(), "hello world");
}

// --- A minimal GGUF writer for synthetic vocabularies ------------------------------------

enum Kv {
    Str(&'static str),
    U32(u32),
    I32(i32),
    Bool(bool),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn write_gguf(path: &Path, kvs: &[(&str, Kv)]) {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend((kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        put_str(&mut b, k);
        match v {
            Kv::Str(s) => {
                b.extend(8u32.to_le_bytes());
                put_str(&mut b, s);
            }
            Kv::U32(x) => {
                b.extend(4u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            Kv::I32(x) => {
                b.extend(5u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            Kv::Bool(x) => {
                b.extend(7u32.to_le_bytes());
                b.push(*x as u8);
            }
            Kv::Strs(a) => {
                b.extend(9u32.to_le_bytes());
                b.extend(8u32.to_le_bytes());
                b.extend((a.len() as u64).to_le_bytes());
                for s in a {
                    put_str(&mut b, s);
                }
            }
            Kv::I32s(a) => {
                b.extend(9u32.to_le_bytes());
                b.extend(5u32.to_le_bytes());
                b.extend((a.len() as u64).to_le_bytes());
                for x in a {
                    b.extend(x.to_le_bytes());
                }
            }
        }
    }
    std::fs::write(path, b).unwrap();
}

/// GPT-2's byte-to-character table: printable Latin-1 bytes stand for themselves, the others
/// are given the characters from U+0100 on, in byte order.
fn byte_chars() -> Vec<char> {
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
            if printable {
                char::from_u32(b).unwrap()
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            }
        })
        .collect()
}

/// A small byte-level vocabulary: the 256 byte characters, a few merges, <|endoftext|>.
fn gpt2_vocab(pre: &'static str) -> Vec<(&'static str, Kv)> {
    let mut tokens: Vec<String> = byte_chars().into_iter().map(String::from).collect();
    let merges = ["Ġ 1", "h e", "l l", "he ll", "hell o", "1 2", "12 3"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    tokens.push("<|endoftext|>".into());
    let n = tokens.len();
    let mut types = vec![1; n];
    types[n - 1] = 3;
    vec![
        ("tokenizer.ggml.model", Kv::Str("gpt2")),
        ("tokenizer.ggml.pre", Kv::Str(pre)),
        ("tokenizer.ggml.tokens", Kv::Strs(tokens)),
        ("tokenizer.ggml.token_type", Kv::I32s(types)),
        ("tokenizer.ggml.merges", Kv::Strs(merges.iter().map(|s| s.to_string()).collect())),
        ("tokenizer.ggml.bos_token_id", Kv::U32(n as u32 - 1)),
        ("tokenizer.ggml.eos_token_id", Kv::U32(n as u32 - 1)),
        ("tokenizer.ggml.padding_token_id", Kv::I32(-1)),
    ]
}

fn gguf_tokenizer(kvs: &[(&str, Kv)]) -> (tempfile::TempDir, swk::Result<Tokenizer>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vocab.gguf");
    write_gguf(&path, kvs);
    let tok = GgufFile::open(&path).and_then(|g| Tokenizer::from_gguf(&g));
    (dir, tok)
}

#[test]
fn gguf_byte_level_pre_tokenizers() {
    let id = |t: &Tokenizer, s: &str| -> u32 {
        (0..t.vocab_size() as u32).find(|&i| t.token_str(i).as_deref() == Some(s)).unwrap()
    };
    // " 123": GPT-2 keeps " 123" together (and "Ġ 1" is the first merge), smollm/qwen2 split
    // every digit,
    // Llama 3 splits the space off and keeps up to three digits.
    for (pre, want, bos) in [
        ("gpt-2", vec!["hello", "Ġ1", "2", "3"], false),
        ("default", vec!["hello", "Ġ1", "2", "3"], false),
        ("smollm", vec!["hello", "Ġ", "1", "2", "3"], false),
        ("qwen2", vec!["hello", "Ġ", "1", "2", "3"], false),
        ("llama-bpe", vec!["hello", "Ġ", "123"], true),
        ("no-such-pre", vec!["hello", "Ġ1", "2", "3"], false),
    ] {
        let (_dir, tok) = gguf_tokenizer(&gpt2_vocab(pre));
        let tok = tok.unwrap_or_else(|e| panic!("{pre}: {e}"));
        let want: Vec<u32> = want.iter().map(|s| id(&tok, s)).collect();
        assert_eq!(tok.encode("hello 123", false).unwrap(), want, "pre {pre}");
        assert_eq!(tok.adds_bos(), bos, "pre {pre}: llama.cpp adds BOS for the Llama 3 family");
        assert_eq!(tok.decode(&want, false).unwrap(), "hello 123");
        let eot = tok.vocab_size() as u32 - 1;
        assert_eq!(tok.encode("<|endoftext|>hello", false).unwrap(), vec![eot, id(&tok, "hello")]);
        assert_eq!(tok.decode(&[eot, id(&tok, "hello")], true).unwrap(), "hello");
        let with = tok.encode("hello", true).unwrap();
        assert_eq!(with.first() == Some(&eot), bos);
    }
    // The metadata flag overrides the family default.
    let mut kvs = gpt2_vocab("llama-bpe");
    kvs.push(("tokenizer.ggml.add_bos_token", Kv::Bool(false)));
    let (_dir, tok) = gguf_tokenizer(&kvs);
    assert!(!tok.unwrap().adds_bos());
}

fn expect_err(kvs: &[(&str, Kv)], needles: &[&str]) {
    let (_dir, tok) = gguf_tokenizer(kvs);
    let msg = match tok {
        Ok(_) => panic!("expected an error mentioning {needles:?}"),
        Err(e) => e.to_string(),
    };
    assert!(msg.contains("vocab.gguf"), "error does not name the file: {msg}");
    for n in needles {
        assert!(msg.contains(n), "error {msg:?} does not mention {n:?}");
    }
}

#[test]
fn gguf_errors_are_clear() {
    expect_err(
        &[("tokenizer.ggml.model", Kv::Str("gpt2")), ("tokenizer.ggml.merges", Kv::Strs(vec![]))],
        &["tokenizer.ggml.tokens"],
    );
    expect_err(&[("general.architecture", Kv::Str("llama"))], &["tokenizer.ggml.model"]);
    let mut kvs = gpt2_vocab("gpt-2");
    kvs[0] = ("tokenizer.ggml.model", Kv::Str("bert"));
    expect_err(&kvs, &["unsupported", "bert"]);
    let mut kvs = gpt2_vocab("gpt-2");
    kvs.retain(|(k, _)| *k != "tokenizer.ggml.merges");
    expect_err(&kvs, &["tokenizer.ggml.merges"]);
    let mut kvs = gpt2_vocab("gpt-2");
    kvs.push(("tokenizer.ggml.eot_token_id", Kv::U32(1_000_000)));
    expect_err(&kvs, &["eot_token_id", "outside the vocabulary"]);
    let mut kvs = gpt2_vocab("gpt-2");
    kvs[3] = ("tokenizer.ggml.token_type", Kv::I32s(vec![1, 1]));
    expect_err(&kvs, &["token_type", "entries"]);
    let mut kvs = gpt2_vocab("gpt-2");
    kvs[4] = ("tokenizer.ggml.merges", Kv::Strs(vec!["q z".into()]));
    expect_err(&kvs, &["merges"]);
    let mut kvs = gpt2_vocab("gpt-2");
    kvs[2] = ("tokenizer.ggml.tokens", Kv::I32s(vec![1, 2, 3]));
    expect_err(&kvs, &["tokenizer.ggml.tokens"]);
    expect_err(
        &[
            ("tokenizer.ggml.model", Kv::Str("llama")),
            ("tokenizer.ggml.tokens", Kv::Strs(vec!["<unk>".into(), "a".into()])),
        ],
        &["scores"],
    );
}

#[test]
fn tokenizer_json_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("tokenizer.json");
    for text in ["{\"version\": \"1.0\", \"model\": ", "{\"model\": 5}", "", "\u{0}\u{1}garbage"] {
        std::fs::write(&bad, text).unwrap();
        let msg = Tokenizer::from_file(&bad).expect_err("corrupt tokenizer.json").to_string();
        assert!(msg.contains("tokenizer.json"), "error does not name the file: {msg}");
    }
    let missing = dir.path().join("nope/tokenizer.json");
    let msg = Tokenizer::from_file(&missing).expect_err("missing file").to_string();
    assert!(msg.contains("nope"), "{msg}");

    // A corrupt side file is reported, naming it.
    let dir = hf_dir_with("hf_bpe", &[("generation_config.json", "{oops")]);
    let msg = Tokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap_err().to_string();
    assert!(msg.contains("generation_config.json"), "{msg}");
}

#[test]
fn decode_rejects_ids_outside_the_vocabulary() {
    let tok = Tokenizer::from_file(&fixtures().join("hf_bpe/tokenizer.json")).unwrap();
    let msg = tok.decode(&[1, u32::MAX], false).unwrap_err().to_string();
    assert!(msg.contains("4294967295"), "{msg}");
    assert_eq!(tok.token_str(u32::MAX), None);
    let g = GgufFile::open(fixtures().join("spm_tiny.gguf")).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    assert!(tok.decode(&[421], false).is_err());
    assert_eq!(tok.decode(&[], false).unwrap(), "");
}
