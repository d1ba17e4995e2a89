//! The `swk` binary with `--device cuda` against `--device cpu`.

use super::*;

/// `vocab`, `compare-generate`, `mc`, `cascade`, `trace` and `quantize-study` with `--device
/// cuda` (f32 weights) report what the CPU reports on the tiny fixture with an edit: the
/// vocabulary KL within 1e-3, the same greedy tokens, multiple-choice log-probabilities
/// within 1e-4, cascade, trace and quantization reports equal but for numbers within 1e-4;
/// each JSON names its device. quantize-study refuses streamed layers.
#[test]
fn cli_analyses_run_on_the_device() {
    if !gpu() {
        return;
    }
    let llama = fixtures_root().join("tiny").join("llama");
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("items.jsonl");
    let items = [
        r#"{"context": "The cat sat on the", "choices": ["mat", "moon"], "label": 0}"#,
        r#"{"context": "One, two,", "choices": [" three", " blue sky"], "label": 0}"#,
    ];
    std::fs::write(&data, items.join("\n")).expect("write items");
    let data = data.to_string_lossy().to_string();
    let edit = ["--edit", "scale:0,3,5,40", "--gpu-dtype", "f32", "--json"];
    let runs: [(&str, Vec<&str>); 6] = [
        ("vocab", vec!["--samples", "2", "--context", "16"]),
        ("compare-generate", vec!["--prompt", "Once upon", "--max-new-tokens", "4"]),
        ("mc", vec!["--data", data.as_str()]),
        ("cascade", vec!["--prompt", "Once upon a time", "--min-abs", "0.5", "--min-ratio", "2"]),
        ("trace", vec!["--prompt", "Once upon a time"]),
        ("quantize-study", vec!["--block-size", "64", "--block-size", "1024", "--context", "16"]),
    ];
    for (cmd, args) in &runs {
        let more: Vec<&str> = args.iter().chain(&edit).copied().collect();
        let got = swk_json(&["--device", "cuda", cmd], &llama, &more);
        let want = swk_json(&["--device", "cpu", cmd], &llama, &more);
        assert!(got["device"].as_str().unwrap_or_default().starts_with("cuda"), "{cmd}: {got}");
        assert_eq!(want["device"], "cpu", "{cmd}");
        match *cmd {
            "vocab" => {
                let kl = |r: &serde_json::Value| r["mean_kl"].as_f64().unwrap_or(f64::NAN);
                let (a, b) = (kl(&got), kl(&want));
                assert!(b > 0.0 && (a / b - 1.0).abs() <= 1e-3, "vocab KL {a} vs cpu {b}");
            }
            "compare-generate" => {
                let toks = |r: &serde_json::Value| r["prompts"][0]["continuations"].to_string();
                let strip = |v: &serde_json::Value| -> Vec<String> {
                    let c = v["prompts"][0]["continuations"].as_array().cloned();
                    c.unwrap_or_default().iter().map(|c| c["tokens"].to_string()).collect()
                };
                assert_eq!(strip(&got), strip(&want), "{} vs {}", toks(&got), toks(&want));
            }
            "cascade" | "trace" | "quantize-study" => {
                let report = |r: &serde_json::Value| {
                    let mut r = r.clone();
                    r.as_object_mut().map(|o| o.remove("device"));
                    r
                };
                assert_json_close(&report(&got), &report(&want), 1e-4, cmd);
                if *cmd == "quantize-study" {
                    // It rewrites every linear tensor: layers streamed from the file would not do.
                    let args = ["--device", "cuda", "--stream", "always", cmd];
                    let o = std::process::Command::new(swk_bin())
                        .args(args)
                        .arg(&llama)
                        .args(&more)
                        .output()
                        .expect("run swk");
                    let err = String::from_utf8_lossy(&o.stderr);
                    assert!(!o.status.success() && err.contains("resident"), "{err}");
                }
            }
            _ => {
                for run in ["items_baseline", "items_edited"] {
                    let lps = |r: &serde_json::Value| -> Vec<f64> {
                        let items = r[run].as_array().cloned().unwrap_or_default();
                        items
                            .iter()
                            .flat_map(|i| i["logprobs"].as_array().cloned().unwrap_or_default())
                            .map(|x| x.as_f64().unwrap_or(f64::NAN))
                            .collect()
                    };
                    let (a, b) = (lps(&got), lps(&want));
                    assert_eq!(a.len(), 4, "{run}: {got}");
                    for (x, y) in a.iter().zip(&b) {
                        assert!((x - y).abs() <= 1e-4 * y.abs().max(1.0), "{run}: {x} vs {y}");
                    }
                }
            }
        }
    }
}

/// The `swk` binary on the device: `detect --device cuda` on a mixture of experts loads a
/// safetensors checkpoint whole with `--stream auto` (it fits), and streams its GGUF and
/// Mixtral's renamed safetensors checkpoint with `--stream always`;
/// `experts --device cuda` on the streamed GGUF reports the CPU's routing and super experts;
/// `screen --device cuda` on a streamed GGUF ranks as the CPU does, and `trace` and `cascade`
/// there report what the CPU reports. `--gpu-dtype f16` finds the f32 run's candidates, and
/// the default `auto` keeps an f16 checkpoint's weights exact. `--gpu-gemm` picks the engine.
#[test]
fn cli_detects_on_the_device() {
    if !gpu() {
        return;
    }
    let root = fixtures_root().join("tiny");
    let runs: [(&str, PathBuf); 3] = [
        ("auto", root.join("qwen2_moe")),
        ("always", root.join("mixtral_gguf").join("model.gguf")),
        ("always", root.join("mixtral")),
    ];
    for (stream, model) in &runs {
        let r = swk_json(
            &["--device", "cuda", "--stream", stream, "detect"],
            model,
            &["--threshold", "1", "--max-iterations", "1", "--json"],
        );
        let device = r["device"].as_str().unwrap_or_default();
        assert!(device.starts_with("cuda"), "{}: device {device}", model.display());
        assert_eq!(device.contains("layers streamed"), *stream == "always", "{device}");
    }
    // `--gpu-dtype auto` keeps a checkpoint's own f16 or bf16 (judged on every matrix, from
    // the files' headers when the layers are read from them), else bf16.
    // A mix (llama_bf16 with its embedding stored in f16): bf16, though the tensors the host
    // keeps (the embedding) are all f16.
    let mixed = tempfile::tempdir().unwrap();
    f16_embedding(&root.join("llama_bf16"), mixed.path());
    let auto = [
        ("llama_f16", root.join("llama_f16"), "f16"),
        ("llama_bf16", root.join("llama_bf16"), "bf16"),
        ("llama", root.join("llama"), "bf16"),
        ("mixed", mixed.path().to_path_buf(), "bf16"),
    ];
    for (name, model, want) in auto {
        let text = model.join("config.json");
        for stream in ["never", "always"] {
            let more = ["--text", text.to_str().unwrap(), "--context", "16", "--json"];
            let r = swk_json(&["--device", "cuda", "--stream", stream, "ppl"], &model, &more);
            let device = r["device"].as_str().unwrap_or_default();
            assert!(device.contains(&format!("({want} weights")), "{name} {stream}: {device}");
        }
    }
    // f16 weights (swk's kernels), resident and streamed: the same candidates as f32 weights
    // on the device (a low threshold, so that there are some). Candidates only: confirming
    // each (one perplexity run apiece, checked above and by the library's tests) is 98 % of
    // such a run's time on the emulator.
    let args = ["--threshold", "0.5", "--max-iterations", "2", "--no-confirm", "--json"];
    let dense = root.join("qwen2_gguf").join("model.gguf");
    let coords = |dtype: &str, stream: &str| {
        let args: Vec<&str> = args.iter().copied().chain(["--gpu-dtype", dtype]).collect();
        let r = swk_json(&["--device", "cuda", "--stream", stream, "detect"], &dense, &args);
        let found: Vec<String> = ["super_weights", "rejected"]
            .iter()
            .flat_map(|k| r[k].as_array().cloned().unwrap_or_default())
            .map(|w| format!("{} {} {}", w["layer"], w["row"], w["col"]))
            .collect();
        (r["device"].as_str().unwrap_or_default().to_string(), found)
    };
    let (_, want) = coords("f32", "never");
    assert!(!want.is_empty(), "candidates at threshold 0.5");
    for stream in ["never", "always"] {
        let (device, got) = coords("f16", stream);
        assert!(device.contains("f16 weights, kernels"), "{device}");
        assert_eq!(got, want, "f16 vs f32 weights, --stream {stream}");
    }
    // `--gpu-gemm`: the tensor-core engine finds cublas-split's candidates on bf16 weights,
    // and the report names the engine; it refuses f32 weights.
    let engine = |gemm: &str| {
        let args: Vec<&str> = args.iter().copied().chain(["--gpu-dtype", "bf16"]).collect();
        let r = swk_json(&["--device", "cuda", "--gpu-gemm", gemm, "detect"], &dense, &args);
        let device = r["device"].as_str().unwrap_or_default().to_string();
        assert!(device.contains(&format!("(bf16 weights, {gemm})")), "{device}");
        ["super_weights", "rejected"]
            .iter()
            .flat_map(|k| r[k].as_array().cloned().unwrap_or_default())
            .map(|w| format!("{} {} {}", w["layer"], w["row"], w["col"]))
            .collect::<Vec<_>>()
    };
    let split = engine("cublas-split");
    assert!(!split.is_empty(), "candidates at threshold 0.5");
    assert_eq!(engine("mma"), split, "--gpu-gemm mma vs cublas-split");
    let out = std::process::Command::new(swk_bin())
        .args(["--device", "cuda", "--gpu-gemm", "mma", "detect"])
        .arg(&dense)
        .args(["--gpu-dtype", "f32", "--no-confirm"])
        .output()
        .expect("run swk");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mma on f32 weights ran");
    assert!(stderr.contains("GEMM engine `mma` needs bf16 or f16 weights"), "{stderr}");
    // The default `--gpu-dtype auto` keeps a checkpoint's own 16-bit storage: an f16
    // checkpoint's candidates carry exactly the CPU's (the file's) weight values, resident
    // and streamed; bf16 and f32 checkpoints are stored as bf16.
    let report = |device: &[&str], model: &PathBuf| {
        let args = ["--threshold", "0.5", "--max-iterations", "2", "--no-confirm", "--json"];
        let r = swk_json(&[device, &["detect"]].concat(), model, &args);
        let found: Vec<String> = ["super_weights", "rejected"]
            .iter()
            .flat_map(|k| r[k].as_array().cloned().unwrap_or_default())
            .map(|w| format!("{} {} {} {}", w["layer"], w["row"], w["col"], w["value"]))
            .collect();
        (r["device"].as_str().unwrap_or_default().to_string(), found)
    };
    let f16 = root.join("llama_f16");
    let (_, cpu) = report(&["--device", "cpu"], &f16);
    assert!(!cpu.is_empty(), "candidates at threshold 0.5");
    for stream in ["never", "always"] {
        let (device, got) = report(&["--device", "cuda", "--stream", stream], &f16);
        assert!(device.contains("(f16 weights"), "auto on an f16 checkpoint: {device}");
        assert_eq!(got, cpu, "auto on an f16 checkpoint, --stream {stream}: exact values");
    }
    for name in ["llama_bf16", "llama"] {
        let (device, _) = report(&["--device", "cuda"], &root.join(name));
        assert!(device.contains("(bf16 weights"), "auto on {name}: {device}");
    }

    let more = ["--router-samples", "3", "--gpu-dtype", "f32", "--json"];
    let gguf = &runs[1].1;
    let got = swk_json(&["--device", "cuda", "--stream", "always", "experts"], gguf, &more);
    let want = swk_json(&["--device", "cpu", "experts"], gguf, &more);
    assert!(got["device"].as_str().unwrap_or_default().contains("layers streamed"), "{got}");
    assert_eq!(want["device"], "cpu");
    let picks = |r: &serde_json::Value, what: &str| -> Vec<String> {
        r[what]
            .as_array()
            .expect(what)
            .iter()
            .map(|e| format!("{} {} {}", e["layer"], e["expert"], e["selected"]))
            .collect()
    };
    assert_eq!(picks(&got, "experts"), picks(&want, "experts"), "routing");
    let supers = |r: &serde_json::Value| -> Vec<(String, f64)> {
        let v = r["super_experts"].as_array().expect("super_experts");
        v.iter()
            .map(|s| {
                (
                    format!("{} {}", s["layer"], s["expert"]),
                    s["perplexity_ratio"].as_f64().unwrap_or(f64::NAN),
                )
            })
            .collect()
    };
    let (g, w) = (supers(&got), supers(&want));
    assert!(!w.is_empty(), "the fixture has a super expert");
    assert_eq!(
        g.iter().map(|s| &s.0).collect::<Vec<_>>(),
        w.iter().map(|s| &s.0).collect::<Vec<_>>()
    );
    for ((_, a), (_, b)) in g.iter().zip(&w) {
        assert!((a / b - 1.0).abs() <= 1e-3, "ablation ratio {a} vs cpu {b}");
    }

    // `screen --device cuda` on a streamed GGUF (the largest |w| read from the file) ranks
    // what the CPU ranks.
    let qwen2 = root.join("qwen2_gguf").join("model.gguf");
    let more = ["--top-largest", "3", "--edit", "zero:1,0,0", "--context", "16"];
    let more: Vec<&str> = more.iter().copied().chain(["--gpu-dtype", "f32", "--json"]).collect();
    let got = swk_json(&["--device", "cuda", "--stream", "always", "screen"], &qwen2, &more);
    let want = swk_json(&["--device", "cpu", "screen"], &qwen2, &more);
    assert!(got["device"].as_str().unwrap_or_default().contains("layers streamed"), "{got}");
    assert_eq!(want["device"], "cpu");
    let entries = |r: &serde_json::Value| -> Vec<(String, String, f64)> {
        let v = r["entries"].as_array().expect("entries");
        v.iter()
            .map(|e| {
                let p = e["perplexity"].as_f64().unwrap_or(f64::NAN);
                (e["edit"].to_string(), e["source"].to_string(), p)
            })
            .collect()
    };
    let (g, w) = (entries(&got), entries(&want));
    assert_eq!(g.len(), 4, "one candidate and the 3 largest: {got}");
    for (a, b) in g.iter().zip(&w) {
        assert_eq!((&a.0, &a.1), (&b.0, &b.1), "ranking");
        assert!((a.2 / b.2 - 1.0).abs() <= 1e-4, "perplexity {} vs cpu {}", a.2, b.2);
    }

    // `trace` and `cascade` on the streamed GGUF: activations captured from streamed layers,
    // whole gate/up tensors read once from the file; the CPU's reports within 1e-4.
    let prompt = ["--prompt", "Once upon a time", "--gpu-dtype", "f32", "--json"];
    for (cmd, more) in
        [("trace", vec!["--weight", "1,0,0"]), ("cascade", vec!["--edit", "zero:1,0,0"])]
    {
        let more: Vec<&str> = more.into_iter().chain(prompt).collect();
        let mut got = swk_json(&["--device", "cuda", "--stream", "always", cmd], &qwen2, &more);
        let mut want = swk_json(&["--device", "cpu", cmd], &qwen2, &more);
        let device = got.as_object_mut().and_then(|o| o.remove("device")).unwrap_or_default();
        assert!(device.as_str().unwrap_or_default().contains("layers streamed"), "{device}");
        want.as_object_mut().map(|o| o.remove("device"));
        assert_json_close(&got, &want, 1e-4, cmd);
    }
}

/// Copy the bf16 checkpoint in `src` to `dst` with its embedding stored as f16.
fn f16_embedding(src: &std::path::Path, dst: &std::path::Path) {
    use safetensors::tensor::TensorView;
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            if name != "model.embed_tokens.weight" {
                return (name, t.dtype(), t.shape().to_vec(), t.data().to_vec());
            }
            let data = t.data().chunks(2).flat_map(|b| {
                let v = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
                half::f16::from_f32(v).to_le_bytes()
            });
            (name, safetensors::Dtype::F16, t.shape().to_vec(), data.collect())
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dst.join("model.safetensors")).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
}

/// `--stream auto` counts the KV cache a run holds with the weights: `ppl` with a window
/// whose cache cannot fit the device streams the layers (the tiny Llama's 512 bytes a
/// position, a billion positions: 512 GB), a short window keeps them resident, and the two
/// score the same text alike (one window each, the whole text); `swk info` names the longest
/// window that stays resident. `generate`'s JSON names its device too.
#[test]
fn stream_auto_counts_the_kv_cache() {
    if !gpu() {
        return;
    }
    let model = fixtures_root().join("tiny/llama");
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "The crew checked the sails, then the boat left.").unwrap();
    let text = text.to_str().unwrap();
    let ppl = |context: &str| {
        let args = ["--device", "cuda", "--stream", "auto", "ppl"];
        swk_json(&args, &model, &["--text", text, "--context", context, "--json"])
    };
    let (long, short) = (ppl("1000000000"), ppl("64"));
    let streamed =
        |j: &serde_json::Value| j["device"].as_str().unwrap().contains("layers streamed");
    assert!(streamed(&long) && !streamed(&short), "{long} {short}");
    assert_eq!((long["windows"].as_u64(), short["windows"].as_u64()), (Some(1), Some(1)));
    let rel = (long["nll_sum"].as_f64().unwrap() / short["nll_sum"].as_f64().unwrap() - 1.0).abs();
    assert!(rel < 1e-5, "streamed {long} vs resident {short}");

    // On the emulator (whose free memory is exact), `swk info` tells the boundary: a window
    // of `resident_positions` stays resident, one more position streams.
    if swk::backend::cuda::EMULATED {
        let device = short["device"].as_str().unwrap();
        let dtype = device.split(" weights").next().unwrap().rsplit('(').next().unwrap();
        let info = swk_json(&["--device", "cuda", "info"], &model, &["--json"]);
        let most = info["device"]["resident_positions"][dtype].as_u64().unwrap();
        assert_eq!(info["device"]["stream_auto"][dtype], "resident", "{info}");
        assert!(!streamed(&ppl(&most.to_string())), "{dtype}: {most} positions");
        assert!(streamed(&ppl(&(most + 1).to_string())), "{dtype}: {} positions", most + 1);
    }

    let generate = |n: &str| {
        let args = ["--device", "cuda", "--stream", "auto", "generate"];
        swk_json(&args, &model, &["--prompt", "The crew", "--max-new-tokens", n, "--json"])
    };
    let g = generate("3");
    assert!(!streamed(&g) && g["device"].as_str().unwrap().starts_with("cuda:"), "{g}");
}

/// `--profile` prints, when the command ends, the device time of the run kernel by kernel:
/// for a `ppl` on the device, a table whose launches include the attention and norm kernels
/// and whose timed launches fit in the wall time; for the same run on the CPU, that no
/// device ran. The command's own output is unchanged.
#[test]
fn cli_profile_reports_device_time_per_kernel() {
    if !gpu() {
        return;
    }
    let llama = fixtures_root().join("tiny").join("llama");
    let text = llama.join("config.json");
    let run = |device: &str, profile: bool| {
        let mut args = vec!["--device", device, "ppl"];
        args.extend(["--context", "16", "--json"]);
        if profile {
            args.push("--profile");
        }
        let out = std::process::Command::new(swk_bin())
            .args(&args)
            .arg(&llama)
            .arg("--text")
            .arg(&text)
            .output()
            .expect("run swk");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "swk {args:?}: {err}");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        (json["perplexity"].as_f64().unwrap_or(f64::NAN), err)
    };
    let (plain, quiet) = run("cuda", false);
    assert!(!quiet.contains("device profile"), "{quiet}");
    let (ppl, err) = run("cuda", true);
    assert_eq!(ppl, plain, "--profile changes the result");
    let head = err.lines().find(|l| l.starts_with("device profile")).expect(&err);
    let num = |after: &str| -> f64 {
        let rest = head.split(after).nth(1).expect(head).trim_start();
        rest.split(' ').next().unwrap_or("").parse().expect(head)
    };
    let (launches, timed, wall) = (num("--profile): "), num("timed, "), num("of the run's "));
    assert!(launches > 0.0 && timed > 0.0 && timed <= wall, "{head}");
    for kernel in ["| swk_rmsnorm |", "| swk_nll |", "| (all launches) |"] {
        assert!(err.contains(kernel), "no {kernel} in:\n{err}");
    }
    let (cpu, err) = run("cpu", true);
    assert!((cpu / ppl - 1.0).abs() < 1e-3, "cpu {cpu} vs cuda {ppl}");
    assert!(err.contains("device profile (--profile): no CUDA device ran"), "{err}");
}
