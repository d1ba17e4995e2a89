//! The `swk` binary end to end: JSON outputs, edit flags, clear errors with a failing exit.

mod common;

use std::process::Command;

use swk::backend::memory::MemoryPlan;
use swk::backend::WeightDtype;

fn swk(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_swk")).args(args).output().expect("run swk");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn tiny() -> String {
    common::fixture("tiny/llama").to_str().unwrap().to_string()
}

#[test]
fn info_json() {
    let (ok, out, err) = swk(&["info", &tiny(), "--json"]);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["architecture"], "llama");
    assert_eq!(j["format"], "safetensors");
    assert_eq!(j["config"]["num_layers"], 2);
    assert_eq!(j["dtypes"]["mlp.down_proj.weight"], "F32");
}

/// `swk info` reads only the headers of every fixture it can open lazily (every GGUF, and
/// safetensors but GPT-2's, GPT-NeoX's and Gemma 3's), and reports the same parameter count
/// and stored dtypes as loading the model whole; its CUDA memory plan is the library's, with
/// the bytes of short streamed passes.
#[test]
fn info_reads_headers_and_matches_loading() {
    let root = common::fixture("tiny");
    let mut dirs: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).collect();
    dirs.sort();
    let mut lazily = 0;
    for dir in dirs {
        let gguf = dir.join("model.gguf");
        let spec = if gguf.is_file() { gguf } else { dir.clone() };
        if !spec.join("config.json").is_file() && !spec.is_file() {
            continue;
        }
        let spec = spec.to_str().unwrap();
        let (ok, out, err) = swk(&["info", spec, "--json"]);
        assert!(ok, "{spec}: {err}");
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        let m = swk::Model::load(spec).unwrap();
        assert_eq!(j["parameters"], m.weights.n_elements(), "{spec}");
        assert_eq!(j["cpu_weight_bytes"], 4 * m.weights.n_elements(), "{spec}: f32 in RAM");
        // The count from the config's shapes alone (`--config-only`) is the same.
        assert_eq!(m.config.parameter_count(), m.weights.n_elements() as u64, "{spec}");
        let mut dtypes = std::collections::BTreeMap::<String, Vec<String>>::new();
        for (name, t) in m.weights.iter() {
            let kind = match name.strip_prefix("model.layers.").and_then(|r| r.split_once('.')) {
                Some((_, rest)) => rest.to_string(),
                None => name.to_string(),
            };
            let v = dtypes.entry(kind).or_default();
            if !v.contains(&t.source_dtype) {
                v.push(t.source_dtype.clone());
            }
        }
        let got: std::collections::BTreeMap<String, Vec<String>> = j["dtypes"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let mut d: Vec<String> =
                    v.as_str().unwrap().split(',').map(str::to_string).collect();
                d.sort();
                (k.clone(), d)
            })
            .collect();
        dtypes.values_mut().for_each(|v| v.sort());
        assert_eq!(got, dtypes, "{spec}");
        use swk::model::Architecture::{Gemma3, Gpt2, GptNeoX};
        let whole =
            !spec.ends_with(".gguf") && matches!(m.config.architecture, Gpt2 | GptNeoX | Gemma3);
        assert_eq!(j["read"], if whole { "whole" } else { "headers" }, "{spec}");
        lazily += usize::from(!whole);
        let dtypes = [WeightDtype::Bf16, WeightDtype::F16, WeightDtype::F32];
        for (mem, dtype) in j["memory"].as_array().unwrap().iter().zip(dtypes) {
            let plan = MemoryPlan::new(&m.config, dtype);
            assert_eq!(mem["dtype"], dtype.name());
            assert_eq!(mem["resident"], plan.resident, "{spec}");
            assert_eq!(mem["streamed"], plan.streamed, "{spec}");
            assert_eq!(mem["slot"], plan.slot, "{spec}");
            for t in [1, 9, 512] {
                assert_eq!(mem["pass_bytes"][t.to_string()], plan.pass_bytes(t), "{spec} {t}");
            }
            assert!(plan.streamed < plan.resident || m.config.num_layers == 1, "{spec}");
            // f32 rows per layer: latent attention's one shared [c | k_rope], else keys and
            // values of every KV head.
            let c = &m.config;
            let row = match &c.family.deepseek {
                Some(d) => d.kv_lora_rank + d.qk_rope_head_dim,
                None => 2 * c.num_kv_heads * c.head_dim,
            };
            assert_eq!(mem["kv_cache_per_token"], c.num_layers * row * 4, "{spec}");
        }
    }
    assert!(lazily >= 30, "{lazily} fixtures opened lazily");
    // Every weight of the Llama fixture is one the forward pass reads: f32 resident bytes
    // are 4 per parameter.
    let (_, out, _) = swk(&["info", &tiny(), "--json"]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["memory"][2]["resident"], 4 * j["parameters"].as_u64().unwrap());
}

/// `swk info` refuses a config that does not describe its weights (read from the headers,
/// nothing would notice otherwise), naming the file and the tensor, and sizes nothing.
#[test]
fn info_refuses_a_config_its_tensors_contradict() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(common::fixture("tiny/llama").join(f), dir.path().join(f)).unwrap();
    }
    let path = dir.path().join("config.json");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cases = [
        ("hidden_size", serde_json::json!(1u64 << 40), "model.embed_tokens.weight"),
        ("intermediate_size", serde_json::json!(100), "mlp.gate_proj.weight"),
        ("num_hidden_layers", serde_json::json!(3), "model.layers.2."),
    ];
    for (key, value, tensor) in cases {
        let mut c = config.clone();
        c[key] = value;
        std::fs::write(&path, c.to_string()).unwrap();
        let (ok, out, err) = swk(&["info", dir.path().to_str().unwrap(), "--json"]);
        assert!(!ok && out.is_empty(), "{key}: {out}");
        assert!(err.contains("config.json") || err.contains(dir.path().to_str().unwrap()), "{err}");
        assert!(err.contains(tensor), "{key}: {err}");
    }
}

/// `swk info --config-only` sizes a model from config.json alone: a directory without
/// weights, and a hub id whose cache holds only config.json (offline, so nothing else could
/// be fetched). Parameters and memory plan equal those read from the model's headers.
#[test]
fn info_from_the_config_alone() {
    let json = |out: &str| -> serde_json::Value { serde_json::from_str(out).unwrap() };
    for name in ["llama", "deepseek_v3", "qwen3_moe", "mixtral", "gemma2", "phi3"] {
        let src = common::fixture(&format!("tiny/{name}"));
        let (ok, full, err) = swk(&["info", src.to_str().unwrap(), "--json"]);
        assert!(ok, "{err}");
        let full = json(&full);
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
        let d = dir.path().to_str().unwrap();
        let (ok, _, err) = swk(&["info", d, "--json"]);
        assert!(!ok && err.contains(d), "{name} without weights: {err}");
        let (ok, out, err) = swk(&["info", d, "--config-only", "--json"]);
        assert!(ok, "{name}: {err}");
        let j = json(&out);
        assert_eq!(j["read"], "config", "{name}");
        assert_eq!(j["parameters"], full["parameters"], "{name}");
        assert_eq!(j["memory"], full["memory"], "{name}");
        assert_eq!(j["dtypes"], serde_json::json!({}), "{name}");
    }

    let home = tempfile::tempdir().unwrap();
    let src = common::fixture("tiny/deepseek_v3");
    let config = std::fs::read(src.join("config.json")).unwrap();
    common::hub_model_cache(&home.path().join("hub"), "tiny/deepseek", &[("config.json", config)]);
    let offline = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_swk"))
            .args(args)
            .env("HF_HOME", home.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let (ok, out, err) = offline(&["info", "tiny/deepseek", "--config-only", "--json"]);
    assert!(ok, "{err}");
    let (_, full, _) = swk(&["info", src.to_str().unwrap(), "--json"]);
    assert_eq!(json(&out)["memory"], json(&full)["memory"]);
    let (ok, _, err) = offline(&["info", "tiny/deepseek", "--json"]);
    assert!(!ok && err.contains("tiny/deepseek") && err.contains("not in the Hugging Face cache"));
    let (ok, _, err) = offline(&["info", "nobody/nothing", "--config-only"]);
    assert!(!ok && err.contains("nobody/nothing") && err.contains("no config.json"), "{err}");
}

#[test]
fn ppl_json_with_and_without_edits() {
    let text = common::fixture("tiny/llama/reference.json");
    let dir = tempfile::tempdir().unwrap();
    let txt = dir.path().join("t.txt");
    let r = common::json("tiny/llama/reference.json");
    std::fs::write(&txt, r["text"].as_str().unwrap().repeat(3)).unwrap();
    let txt = txt.to_str().unwrap();
    let (ok, out, err) = swk(&["ppl", &tiny(), "--text", txt, "--context", "16", "--json"]);
    assert!(ok, "{err}");
    let base: serde_json::Value = serde_json::from_str(&out).unwrap();
    for key in ["perplexity", "tokens_scored", "nll_sum", "seconds"] {
        assert!(base.get(key).is_some(), "missing {key}");
    }
    let (ok, out, err) = swk(&[
        "ppl",
        &tiny(),
        "--text",
        txt,
        "--context",
        "16",
        "--json",
        "--edit",
        "model.embed_tokens.weight[10,3]=x100",
    ]);
    assert!(ok, "{err}");
    let edited: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_ne!(base["nll_sum"], edited["nll_sum"]);
    assert_eq!(edited["edits"][0]["edit"]["tensor"], "model.embed_tokens.weight");
    assert!(text.is_file());
}

#[test]
fn bad_edit_specs_fail_clearly() {
    let txt = common::fixture("text/ppl.txt");
    for (spec, want) in [
        ("zero:0,999,0", "out of range"),
        ("zero:7,0,0", "not found"),
        ("scale:0,1,2", "expected 4"),
        ("nope", "expected zero:L,R,C"),
        ("model.norm.weight[1,2]=zero", "dimensions"),
    ] {
        let (ok, _, err) = swk(&["ppl", &tiny(), "--text", txt.to_str().unwrap(), "--edit", spec]);
        assert!(!ok, "{spec} should fail");
        assert!(err.contains("swk: error:") && err.contains(want), "{spec}: {err}");
    }
}

#[test]
fn detect_json_schema() {
    let (ok, out, err) =
        swk(&["detect", &tiny(), "--json", "--threshold", "0.5", "--max-iterations", "2"]);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    for key in [
        "model",
        "architecture",
        "super_weights",
        "rejected",
        "seconds",
        "layers",
        "weights_checksum",
    ] {
        assert!(j.get(key).is_some(), "missing {key}");
    }
    // A low threshold makes every layer spike: every candidate carries the documented keys.
    let all: Vec<&serde_json::Value> = j["super_weights"]
        .as_array()
        .unwrap()
        .iter()
        .chain(j["rejected"].as_array().unwrap())
        .collect();
    assert!(!all.is_empty());
    for sw in all {
        for key in [
            "layer",
            "row",
            "col",
            "tensor",
            "value",
            "input_activation",
            "output_activation",
            "token_position",
            "iteration",
            "confirmed",
            "perplexity_ratio",
            "catalog",
        ] {
            assert!(sw.get(key).is_some(), "candidate missing {key}: {sw}");
        }
    }
}

/// `--profile` without a CUDA run says why it has no device profile, after the command's own
/// output, which it leaves as it is.
#[test]
fn profile_without_a_device_says_so() {
    let (ok, out, err) = swk(&["--device", "cpu", "--profile", "catalog", "--json"]);
    assert!(ok, "{err}");
    let (_, plain, _) = swk(&["--device", "cpu", "catalog", "--json"]);
    assert_eq!(out, plain);
    let why = if cfg!(any(feature = "cuda", feature = "cuda-emu")) {
        "device profile (--profile): no CUDA device ran"
    } else {
        "device profile (--profile): this swk has no CUDA support (build with --features cuda)"
    };
    assert!(err.contains(why), "{err}");
}

#[test]
fn catalog_lists_published_weights() {
    let (ok, out, err) = swk(&["catalog", "--json"]);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let llama7b =
        j.as_array().unwrap().iter().find(|e| e["model"] == "huggyllama/llama-7b").unwrap();
    assert_eq!(llama7b["coordinates"][0], serde_json::json!([2, 3968, 7003]));
    assert!(llama7b["source"].as_str().unwrap().contains("Yu et al."));
}

#[test]
fn catalog_lookup_matches_and_contradicts() {
    use swk::catalog::{agreement, lookup, Agreement};
    let e = lookup(&["/models/Mistral-7B-v0.1"]).unwrap();
    assert_eq!(e.len(), 1);
    assert_eq!(agreement(&e, 1, 2070, 7310), Agreement::Matches);
    assert_eq!(agreement(&e, 1, 2070, 7311), Agreement::Contradicts);
    assert_eq!(agreement(&lookup(&["SmolLM2-135M"]).unwrap(), 1, 2, 3), Agreement::Unknown);
}

#[test]
fn generate_json() {
    let (ok, out, err) =
        swk(&["generate", &tiny(), "--prompt", "the light", "--max-new-tokens", "5", "--json"]);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        j["tokens"].as_array().unwrap().len() <= 5 && !j["tokens"].as_array().unwrap().is_empty()
    );
}

/// GPT-2's learned positions bound generation: the CLI says so and stops there.
#[test]
fn generate_stops_at_learned_positions() {
    let gpt2 = common::fixture("tiny/gpt2");
    let args = ["generate", gpt2.to_str().unwrap(), "--prompt", "the light", "--json"];
    let (ok, out, err) = swk(&[&args[..], &["--max-new-tokens", "100"]].concat());
    assert!(ok, "{err}");
    assert!(err.contains("gpt2 has 64 learned positions"), "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (p, t) =
        (j["prompt_tokens"].as_array().unwrap().len(), j["tokens"].as_array().unwrap().len());
    assert!(p + t <= 64 && p > 0 && t > 0, "{p} + {t}");
}

#[test]
fn missing_model_fails_clearly() {
    let (ok, _, err) = swk(&["info", "/no/such/model.gguf"]);
    assert!(!ok);
    assert!(err.contains("/no/such/model.gguf"), "{err}");
}

/// `--stream` only changes how CUDA holds the layers: on the CPU the numbers are the same, and
/// without a usable device `--device cuda --stream always` is a clear error, not a panic.
#[test]
fn stream_flag_is_accepted_and_cuda_without_a_device_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let txt = dir.path().join("t.txt");
    let r = common::json("tiny/llama/reference.json");
    std::fs::write(&txt, r["text"].as_str().unwrap().repeat(3)).unwrap();
    let txt = txt.to_str().unwrap();
    let base = ["ppl", &tiny(), "--text", txt, "--context", "16", "--json"];
    let (ok, plain, err) = swk(&[&["--device", "cpu"], &base[..]].concat());
    assert!(ok, "{err}");
    for mode in ["auto", "always", "never"] {
        let (ok, out, err) = swk(&[&["--device", "cpu", "--stream", mode], &base[..]].concat());
        assert!(ok, "{mode}: {err}");
        let (a, b): (serde_json::Value, serde_json::Value) =
            (serde_json::from_str(&out).unwrap(), serde_json::from_str(&plain).unwrap());
        assert_eq!(a["nll_sum"], b["nll_sum"], "{mode}");
    }
    let (ok, _, err) = swk(&["--stream", "sometimes", "info", &tiny()]);
    assert!(!ok && err.contains("sometimes"), "{err}");
    // `report` runs no model: `--device cuda` is refused, saying why.
    let (ok, _, err) = swk(&["--device", "cuda", "report", &tiny()]);
    assert!(!ok && err.contains("runs no model"), "{err}");
    if std::env::var_os("SWK_REQUIRE_GPU").is_none() {
        let (ok, _, err) = swk(&[&["--device", "cuda", "--stream", "always"], &base[..]].concat());
        if !ok {
            assert!(err.contains("cuda") || err.contains("CUDA"), "{err}");
            assert!(!err.contains("panicked"), "{err}");
        }
    }
}
