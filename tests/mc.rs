//! Multiple-choice evaluation: the task schemas (hand-written fixtures in tests/fixtures/mc),
//! lm-eval's metrics, a planted model whose super weight decides the answers, and SmolLM2
//! (skipped when absent) on trivially easy items.

mod common;

use std::process::Command;

use swk::edit::{EditOp, WeightEdit};
use swk::eval::choice::{self, Item, Task, TokenItem};
use swk::synth::{planted, Plant, SynthSpec};

fn fixture(name: &str) -> std::path::PathBuf {
    common::fixture(&format!("mc/{name}"))
}

#[test]
fn native_schemas_follow_lm_eval() {
    let h = choice::read_items(&fixture("hellaswag.jsonl"), None).expect("hellaswag");
    assert_eq!(h[0].context, "Roof shingle removal: A man is sitting on a roof. He");
    assert_eq!(h[0].choices[3], "starts pulling up roofing on a roof.");
    assert_eq!(h[0].label, 3, "string labels parse");
    // " [title]" becomes ". ", bracketed tags go, double spaces collapse, ctx_b capitalized.
    assert_eq!(
        h[1].context,
        "Making a sandwich: How to make a sandwich. Take two slices of bread. Put them on a plate."
    );
    assert_eq!(h[1].choices[0], " Spread butter on one slice.");
    let arc = choice::read_items(&fixture("arc.jsonl"), None).expect("arc");
    assert_eq!(arc[0].context, "Question: Which object is a source of light?\nAnswer:");
    assert_eq!((arc[0].label, arc[0].choices[1].as_str()), (1, "the Sun"));
    assert_eq!(arc[1].label, 0, "numeric answer keys");
    let piqa = choice::read_items(&fixture("piqa.jsonl"), Some(1)).expect("piqa");
    assert_eq!(piqa.len(), 1, "--limit");
    assert_eq!(
        piqa[0],
        Item {
            context: "Question: To keep ice cream from melting,\nAnswer:".into(),
            choices: vec!["put it in the freezer.".into(), "put it in the oven.".into()],
            label: 0
        }
    );
    let easy = choice::read_items(&fixture("easy.jsonl"), None).expect("easy");
    assert_eq!(easy.len(), 10);
    assert_eq!(easy[5].choices[easy[5].label], "E");
    assert_eq!(Task::parse("ARC_Challenge").expect("task"), Task::ArcChallenge);
    assert!(Task::parse("mmlu").expect_err("unknown").to_string().contains("hellaswag"));
}

#[test]
fn bad_items_fail_naming_the_file_and_row() {
    let dir = tempfile::tempdir().expect("tmp");
    for (body, want) in [
        (r#"{"context": "a", "choices": ["x", "y"], "label": 2}"#, "label 2 but 2 choices"),
        (r#"{"context": "a", "choices": ["x"], "label": 0}"#, "at least 2"),
        (r#"{"prompt": "a"}"#, "unknown schema (columns: prompt)"),
        (r#"{"goal": "g", "sol1": "a", "sol2": "b", "label": ""}"#, "unlabelled"),
        (
            r#"{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "C"}"#,
            "answerKey `C`",
        ),
    ] {
        let p = dir.path().join("bad.jsonl");
        std::fs::write(
            &p,
            format!("{{\"context\": \"ok\", \"choices\": [\"a\", \"b\"], \"label\": 1}}\n{body}\n"),
        )
        .expect("write");
        let e = choice::read_items(&p, None).expect_err(want).to_string();
        assert!(e.contains("bad.jsonl") && e.contains("row 1") && e.contains(want), "{e}");
    }
    let e = choice::read_items(&dir.path().join("x.csv"), None).expect_err("csv").to_string();
    assert!(e.contains("x.csv") && e.contains(".jsonl or .parquet"), "{e}");
}

#[test]
fn standard_error_is_lm_evals() {
    let (m, se) = choice::mean_stderr(&[true, false, true, true]);
    assert_eq!(m, 0.75);
    // Sample variance 0.25 (n - 1 = 3), over n = 4: stderr 0.25.
    assert!((se.expect("n > 1") - 0.25).abs() < 1e-12);
    assert_eq!(choice::mean_stderr(&[true]), (1.0, None));
    assert_eq!(choice::mean_stderr(&[true, true]).1, Some(0.0));
}

/// Tasks resolve through the hub cache as parquet: PIQA's flat columns (labels as strings),
/// ARC's nested struct of lists.
#[test]
fn task_from_the_hub_cache() {
    let dir = tempfile::tempdir().expect("tmp");
    let hub = Task::Piqa.hub_file();
    let bytes = common::parquet_string_columns(&[
        ("goal", &["Open a jar", "Cool soup"]),
        ("sol1", &["twist the lid", "heat it"]),
        ("sol2", &["hit it with a hammer", "blow on it"]),
        ("label", &["0", "1"]),
    ]);
    common::hub_dataset_cache(dir.path(), hub.repo, &[(hub.file, bytes)]);
    let cache = hf_hub::Cache::new(dir.path().into());
    let items = choice::task_items_in(&cache, Task::Piqa, None, false).expect("piqa");
    assert_eq!(items.len(), 2);
    assert_eq!(items[1].context, "Question: Cool soup\nAnswer:");
    assert_eq!((items[1].label, items[1].choices[1].as_str()), (1, "blow on it"));
    let e = choice::task_items_in(&cache, Task::ArcEasy, None, false).expect_err("absent");
    let e = e.to_string();
    assert!(e.contains("allenai/ai2_arc") && e.contains("ARC-Easy/test-00000-of-00001.parquet"));
    // ARC's nested columns (a struct of two lists) read like its JSONL.
    let arc = Task::ArcChallenge.hub_file();
    let bytes = common::parquet_arc(&[
        ("Which is a liquid?", &["rock", "water", "wood"], &["A", "B", "C"], "B"),
        ("What melts ice?", &["heat", "cold"], &["1", "2"], "1"),
    ]);
    common::hub_dataset_cache(dir.path(), arc.repo, &[(arc.file, bytes)]);
    let items = choice::task_items_in(&cache, Task::ArcChallenge, None, false).expect("arc");
    assert_eq!(
        items,
        vec![
            Item {
                context: "Question: Which is a liquid?\nAnswer:".into(),
                choices: vec!["rock".into(), "water".into(), "wood".into()],
                label: 1
            },
            Item {
                context: "Question: What melts ice?\nAnswer:".into(),
                choices: vec!["heat".into(), "cold".into()],
                label: 0
            },
        ]
    );
}

/// The planted super weight makes the model predict its likely tokens after BOS: a choice of
/// likely tokens wins; zeroing the super weight changes every score and loses that margin.
#[test]
fn planted_super_weight_decides_the_scores() {
    let spec = SynthSpec {
        hidden: 96,
        intermediate: 256,
        layers: 5,
        heads: 6,
        kv_heads: 2,
        vocab: 320,
        tie_embeddings: false,
    };
    let (mut model, truth) = planted(&spec, 21, &Plant::standard(&spec)).expect("plant");
    let sw = truth.super_weights[0];
    let likely = &truth.likely_tokens[0];
    let unlikely: Vec<u32> =
        (1..spec.vocab as u32).filter(|t| !likely.contains(t) && *t != truth.bos).take(3).collect();
    let items: Vec<TokenItem> = (0..4)
        .map(|k| TokenItem {
            context: truth.confirm[..4 + k].to_vec(),
            continuations: vec![
                unlikely[..2].to_vec(),
                vec![likely[k % likely.len()], likely[(k + 1) % likely.len()]],
            ],
            lengths: vec![2, 2],
            label: 1,
        })
        .collect();
    let before = model.weights.checksum();
    let edit = WeightEdit::down_proj(sw.layer, sw.row, sw.col, EditOp::Zero);
    let r = choice::compare(&mut model, "planted", &items, &[edit], |_, _| {}).expect("compare");
    assert_eq!(model.weights.checksum(), before, "restored");
    assert_eq!(r.baseline.acc, 1.0, "{r:?}");
    assert_eq!(r.edits.len(), 1);
    let edited = r.edited.as_ref().expect("edited run");
    assert_eq!(edited.n, 4);
    for (b, e) in r.items_baseline.iter().zip(&r.items_edited) {
        let margin = |s: &choice::ItemScore| s.logprobs[1] - s.logprobs[0];
        assert!(margin(b) > 5.0, "likely tokens win by nats: {b:?}");
        assert!(margin(e) < margin(b) - 5.0, "the margin collapses: {b:?} -> {e:?}");
        assert!(b.logprobs.iter().zip(&e.logprobs).all(|(x, y)| x != y));
    }
}

/// SmolLM2 on trivially easy items; one item's scores equal log-probabilities read from a
/// plain full-sequence forward pass.
#[test]
fn smollm2_easy_items_and_direct_logprobs() {
    let Some(model) = common::smollm2_model() else { return };
    let start = std::time::Instant::now();
    let items = choice::read_items(&fixture("easy.jsonl"), None).expect("easy");
    let tok: Vec<TokenItem> =
        items.iter().map(|i| choice::tokenize(model, i).expect("tokenize")).collect();
    let t = model.tokenizer().expect("tokenizer");
    assert_eq!(t.decode(&tok[0].continuations[0], false).expect("decode"), " Thursday");
    assert_eq!(t.decode(&tok[0].context, false).expect("decode"), items[0].context);
    let (scores, m) = choice::evaluate(model, &tok, |_, _| {}).expect("evaluate");
    println!(
        "SmolLM2 easy: acc {:.2} ± {:?}, acc_norm {:.2} ({:.1} s)",
        m.acc,
        m.acc_stderr,
        m.acc_norm,
        start.elapsed().as_secs_f64()
    );
    assert_eq!(m.n, 10);
    assert!(m.acc >= 0.9, "{scores:?}");
    assert!((0.0..=1.0).contains(&m.acc_norm));
    // Direct: feed context + continuation at once, sum the continuation's log-probs.
    let it = &tok[2];
    let vocab = model.config.vocab_size;
    for (c, cont) in it.continuations.iter().enumerate() {
        let full: Vec<u32> = it.context.iter().chain(cont).copied().collect();
        let logits = model.logits(&full).expect("forward");
        let direct: f64 = (0..cont.len())
            .map(|j| {
                let p = it.context.len() + j - 1;
                swk::analysis::log_softmax(&logits[p * vocab..][..vocab])[cont[j] as usize]
            })
            .sum();
        let got = scores[2].logprobs[c];
        assert!((got - direct).abs() < 2e-3 * direct.abs().max(1.0), "{got} vs {direct}");
        assert!(got < 0.0);
    }
    // The native fixtures tokenize and score too.
    for f in ["hellaswag.jsonl", "arc.jsonl", "piqa.jsonl"] {
        let items = choice::read_items(&fixture(f), None).expect(f);
        let tok: Vec<TokenItem> =
            items.iter().map(|i| choice::tokenize(model, i).expect("tokenize")).collect();
        let (s, m) = choice::evaluate(model, &tok, |_, _| {}).expect(f);
        assert_eq!(s.len(), items.len());
        assert!(s.iter().all(|x| x.logprobs.iter().all(|l| l.is_finite() && *l < 0.0)));
        println!("SmolLM2 {f}: acc {:.2}, acc_norm {:.2}", m.acc, m.acc_norm);
    }
}

/// `swk mc` on the tiny fixture model: baseline and edited metrics in JSON.
#[test]
fn mc_cli_json() {
    let model = common::fixture("tiny/llama");
    let out = Command::new(env!("CARGO_BIN_EXE_swk"))
        .arg("mc")
        .arg(&model)
        .arg("--data")
        .arg(fixture("easy.jsonl"))
        .args(["--limit", "4", "--edit", "zero:1,3,7", "--json"])
        .output()
        .expect("run swk");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(j["baseline"]["n"], 4);
    assert_eq!(j["items_baseline"].as_array().expect("items").len(), 4);
    assert_eq!(j["items_baseline"][0]["logprobs"].as_array().expect("scores").len(), 3);
    assert!(j["edited"]["acc"].as_f64().is_some());
    assert_eq!(j["edits"][0]["edit"]["tensor"], "model.layers.1.mlp.down_proj.weight");
    let out = Command::new(env!("CARGO_BIN_EXE_swk"))
        .args(["mc", "x", "--task", "nope"])
        .output()
        .expect("run swk");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown task `nope`"));
}
