//! Data sets for perplexity: WikiText-2 resolved through a (temporary, offline) Hugging Face
//! cache as parquet, local parquet/JSONL/text files, and the errors when they are missing.

mod common;

use std::process::Command;

use swk::eval::dataset::{self, WIKITEXT2_TEST};

const ROWS: [&str; 4] =
    ["", " = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 is a tactical game . \n"];

#[test]
fn wikitext_from_the_hub_cache() {
    let dir = tempfile::tempdir().expect("tmp");
    let hub = dir.path().join("hub");
    let bytes = common::parquet_strings("text", &ROWS);
    assert_eq!(&bytes[..4], b"PAR1");
    common::hub_dataset_cache(&hub, WIKITEXT2_TEST.repo, &[(WIKITEXT2_TEST.file, bytes)]);
    let cache = hf_hub::Cache::new(hub.clone());
    let text = dataset::load_text_in(&cache, "wikitext", false).expect("wikitext");
    assert_eq!(text, ROWS.join("\n\n"));
    assert!(text.contains("Senjō"), "UTF-8 survives the round trip");

    // Absent from an empty cache, downloads off: the error names the repo, file and a fix.
    let empty = tempfile::tempdir().expect("tmp");
    let e = dataset::load_text_in(&hf_hub::Cache::new(empty.path().into()), "wikitext", false)
        .expect_err("missing")
        .to_string();
    for want in ["Salesforce/wikitext", WIKITEXT2_TEST.file, "huggingface-cli download", "HF_HOME"]
    {
        assert!(e.contains(want), "{want} not in: {e}");
    }
    let e = dataset::load_text_in(&cache, "c4-nope", false).expect_err("unknown").to_string();
    assert!(e.contains("c4-nope") && e.contains("wikitext"), "{e}");
}

#[test]
fn local_files_parquet_jsonl_and_text() {
    let dir = tempfile::tempdir().expect("tmp");
    let pq = dir.path().join("t.parquet");
    std::fs::write(&pq, common::parquet_strings("text", &["a", "b"])).expect("write");
    assert_eq!(dataset::read_text_file(&pq).expect("parquet"), "a\n\nb");
    let jl = dir.path().join("t.jsonl");
    std::fs::write(&jl, "{\"text\": \"x\"}\n\n{\"text\": \"y\"}\n").expect("write");
    assert_eq!(dataset::read_text_file(&jl).expect("jsonl"), "x\n\ny");
    let txt = dir.path().join("t.txt");
    std::fs::write(&txt, "plain words").expect("write");
    let cache = hf_hub::Cache::new(dir.path().join("hub"));
    let got = dataset::load_text_in(&cache, txt.to_str().expect("utf-8"), false).expect("text");
    assert_eq!(got, "plain words");
    // Wrong column, bad JSON line, not parquet: errors name the file and the problem.
    let other = dir.path().join("o.parquet");
    std::fs::write(&other, common::parquet_strings("sentence", &["a"])).expect("write");
    let e = dataset::read_text_file(&other).expect_err("no text column").to_string();
    assert!(e.contains("o.parquet") && e.contains("`text`") && e.contains("sentence"), "{e}");
    std::fs::write(&jl, "{\"text\": \"x\"}\n{oops\n").expect("write");
    let e = dataset::read_text_file(&jl).expect_err("bad line").to_string();
    assert!(e.contains("t.jsonl") && e.contains("line 2"), "{e}");
    let fake = dir.path().join("fake.parquet");
    std::fs::write(&fake, "not parquet at all").expect("write");
    let e = dataset::read_text_file(&fake).expect_err("not parquet").to_string();
    assert!(e.contains("fake.parquet") && e.contains("parquet"), "{e}");
}

/// `swk ppl --dataset wikitext` reads the cache named by HF_HOME and scores the same tokens
/// as `--text` on the joined rows; offline and absent, it fails naming the file.
#[test]
fn ppl_cli_dataset() {
    let dir = tempfile::tempdir().expect("tmp");
    let rows: Vec<String> = (0..6).map(|i| format!(" the light of day {i} . \n")).collect();
    let rows: Vec<&str> = rows.iter().map(String::as_str).collect();
    common::hub_dataset_cache(
        &dir.path().join("hub"),
        WIKITEXT2_TEST.repo,
        &[(WIKITEXT2_TEST.file, common::parquet_strings("text", &rows))],
    );
    let txt = dir.path().join("joined.txt");
    std::fs::write(&txt, rows.join("\n\n")).expect("write");
    let model = common::fixture("tiny/llama");
    let run = |home: &std::path::Path, args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_swk"))
            .arg("ppl")
            .arg(&model)
            .args(args)
            .args(["--context", "16", "--json"])
            .env("HF_HOME", home)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .expect("run swk");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string(), {
            String::from_utf8_lossy(&out.stderr).to_string()
        })
    };
    let (ok, out, err) = run(dir.path(), &["--dataset", "wikitext"]);
    assert!(ok, "{err}");
    let ds: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(ds["dataset"], "wikitext");
    let (ok, out, err) = run(dir.path(), &["--text", txt.to_str().expect("utf-8")]);
    assert!(ok, "{err}");
    let plain: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(ds["nll_sum"], plain["nll_sum"]);
    assert!(ds["tokens_scored"].as_u64().expect("count") > 20);
    let empty = tempfile::tempdir().expect("tmp");
    let (ok, _, err) = run(empty.path(), &["--dataset", "wikitext"]);
    assert!(
        !ok && err.contains(WIKITEXT2_TEST.file) && err.contains("Salesforce/wikitext"),
        "{err}"
    );
    let (ok, _, err) = run(empty.path(), &[]);
    assert!(!ok && err.contains("--text"), "{err}");
}
