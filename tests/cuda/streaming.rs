//! Streamed models (layers read from the files on every pass) against the resident upload.

use super::*;

/// Every fixture LazyModel opens (name, path): the safetensors checkpoints not rewritten at
/// load, and the GGUF files.
fn lazy_sources() -> Vec<(String, PathBuf)> {
    let root = fixtures_root().join("tiny");
    let mut sources: Vec<(String, PathBuf)> =
        // Safetensors checkpoints rewritten at load (Gemma 3 multimodal, GPT-2, GPT-NeoX) are
        // refused by LazyModel (with a clear error); their GGUF files stream below. Mixtures
        // of experts stream from both (Mixtral's renamed and OLMoE's fused experts included).
        FIXTURES
            .iter()
            .filter(|n| !["gemma3", "gpt2", "gpt_neox", "gpt_neox_seq"].contains(n))
            .map(|n| (n.to_string(), root.join(n)))
            .collect();
    sources.push(("qwen2_gguf".into(), root.join("qwen2_gguf/model.gguf")));
    sources.push(("phi3_gguf".into(), root.join("phi3_gguf/model.gguf")));
    sources.push(("olmo_gguf".into(), root.join("olmo_gguf/model.gguf")));
    sources.push(("olmo2_gguf".into(), root.join("olmo2_gguf/model.gguf")));
    sources.push(("gemma2_gguf".into(), root.join("gemma2_gguf/model.gguf")));
    sources.push(("gemma3_gguf".into(), root.join("gemma3_gguf/model.gguf")));
    sources.push(("gpt2_gguf".into(), root.join("gpt2_gguf/model.gguf")));
    sources.push(("gpt_neox_gguf".into(), root.join("gpt_neox_gguf/model.gguf")));
    // DeepSeek-V3's GGUF splits kv_b_proj (llama.cpp's attn_k_b/attn_v_b), rebuilt per read.
    for moe in [
        "mixtral_gguf",
        "olmoe_gguf",
        "qwen2_moe_gguf",
        "qwen3_moe_gguf",
        "deepseek_v2_gguf",
        "deepseek_v3_gguf",
    ] {
        sources.push((moe.into(), root.join(moe).join("model.gguf")));
    }
    sources
}

/// A model uploaded whole from its files a buffer group at a time ([`CudaModel::from_lazy`])
/// is the upload of the loaded model ([`CudaModel::new`]): the same weight checksum and
/// bit-identical logits, for every fixture LazyModel opens, in f32 and bf16.
#[test]
fn upload_from_files_equals_upload_of_the_loaded_model() {
    if !gpu() {
        return;
    }
    for (name, path) in lazy_sources() {
        let path = path.to_str().expect("utf-8 path").to_string();
        let m = Model::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let lazy = swk::model::LazyModel::open(&path).unwrap();
        let tokens: Vec<u32> =
            (0..12u32).map(|i| (i * 37 + 5) % m.config.vocab_size as u32).collect();
        for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
            let opts = CudaOptions { dtype, gemm: GemmEngine::Kernels, ..Default::default() };
            let loaded = CudaModel::new(&m, &opts).unwrap();
            let files = CudaModel::from_lazy(&lazy, &opts).unwrap();
            assert!(!files.is_streamed(), "{name}");
            assert_eq!(files.checksum().unwrap(), loaded.checksum().unwrap(), "{name} {dtype:?}");
            let (a, b) = (files.logits(&tokens).unwrap(), loaded.logits(&tokens).unwrap());
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            assert_eq!(bits(&a), bits(&b), "{name} {dtype:?}: logits");
        }
    }
}

/// A streamed model ([`CudaModel::streamed`]: layers read from the files for every pass,
/// through one device slot) computes what the resident upload computes: logits and spike
/// statistics within 1e-6 (the same kernels on the same bits; reported when bit-identical),
/// for safetensors fixtures and a GGUF, in every dtype and with every engine (on the emulator,
/// [`engines_brief`]).
#[test]
fn streamed_model_equals_resident_upload() {
    if !gpu() {
        return;
    }
    for (name, path) in lazy_sources() {
        let path = path.to_str().expect("utf-8 path").to_string();
        let m = Model::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let lazy = std::sync::Arc::new(swk::model::LazyModel::open(&path).unwrap());
        let tokens: Vec<u32> =
            (0..24u32).map(|i| (i * 37 + 5) % m.config.vocab_size as u32).collect();
        for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
            // f16: its default engine (swk's kernels); the widening path is tested resident.
            let gemms = if dtype == WeightDtype::F16 {
                vec![GemmEngine::Auto]
            } else {
                engines_brief(dtype)
            };
            for gemm in gemms {
                let opts = CudaOptions { dtype, gemm, ..Default::default() };
                let resident = CudaModel::new(&m, &opts).unwrap();
                let streamed = CudaModel::streamed(lazy.clone(), &opts).unwrap();
                assert!(streamed.is_streamed() && !resident.is_streamed());
                let (a, b) = (streamed.logits(&tokens).unwrap(), resident.logits(&tokens).unwrap());
                let err = max_rel_err(&a, &b, 1.0);
                let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
                eprintln!(
                    "streamed {name} {} {}: max rel err {err:.2e}{}",
                    dtype.name(),
                    gemm.name(),
                    if same { " (bit-identical)" } else { "" }
                );
                assert!(err <= 1e-6, "{name} {} {}: {err}", dtype.name(), gemm.name());
                // Perplexity: the streamed model scores windows together, layer-major.
                let long: Vec<u32> =
                    (0..70u32).map(|i| (i * 53 + 3) % m.config.vocab_size as u32).collect();
                let windows = swk::eval::ppl::windows(&m, &long, 9).unwrap();
                let ps = streamed.perplexity(&windows, 9, |_, _| {}).unwrap();
                let pr = resident.perplexity(&windows, 9, |_, _| {}).unwrap();
                assert_eq!(ps.tokens_scored, pr.tokens_scored);
                let rel = (ps.nll_sum / pr.nll_sum - 1.0).abs();
                assert!(rel <= 1e-6, "{name}: streamed nll {} vs {}", ps.nll_sum, pr.nll_sum);
                // Decode through the KV cache: each pass streams every layer again.
                let mut cache = CudaKvCache::new(&streamed);
                let mut last = Vec::new();
                for &t in &tokens[..6] {
                    last = streamed.forward(&[t], &mut cache, None, Logits::Last).unwrap();
                }
                let want = resident
                    .forward(&tokens[..6], &mut CudaKvCache::new(&resident), None, Logits::Last)
                    .unwrap();
                assert!(max_rel_err(&last, &want, 1.0) <= 1e-4, "{name}: streamed decode");
                let c = &m.config;
                let new_stats =
                    || SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
                let (mut sa, mut sb) = (new_stats(), new_stats());
                streamed
                    .forward(&tokens, &mut CudaKvCache::new(&streamed), Some(&mut sa), Logits::None)
                    .unwrap();
                resident
                    .forward(&tokens, &mut CudaKvCache::new(&resident), Some(&mut sb), Logits::None)
                    .unwrap();
                assert_stats_match(&format!("streamed {name}"), &sa, &sb);
            }
        }
    }
}

/// Edits of a streamed model live in the host overlay: the edited logits equal the resident
/// model's with the same edits, reads see the stored values, and restoring empties the
/// overlay (checksum back to the unedited one). Layers streamed from memory (converted from
/// f32) and from a checkpoint saved in the slots' dtype (copied as stored, the edits written
/// into the copy).
#[test]
fn streamed_edits_restore_bit_exactly() {
    if !gpu() {
        return;
    }
    let m = medium();
    let tokens: Vec<u32> = (0..20u32).map(|i| (i * 101 + 7) % 1000).collect();
    let edits = medium_edits();
    let memory = std::sync::Arc::new(swk::model::LazyModel::from_model(copy(&m)));
    let dir = tempfile::tempdir().unwrap();
    for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
        let saved = dir.path().join(dtype.name());
        swk::synth::save_llama(&m, &saved, dtype).unwrap();
        let file = std::sync::Arc::new(
            swk::model::LazyModel::open(saved.to_str().expect("utf-8 path")).unwrap(),
        );
        // The checkpoint holds every tensor in `dtype`, norms included: its own resident
        // upload is the reference.
        let loaded = Model::load(saved.to_str().expect("utf-8 path")).unwrap();
        let opts = CudaOptions { dtype, ..Default::default() };
        for (from, lazy, model) in [("memory", &memory, &m), ("file", &file, &loaded)] {
            let what = format!("{} from {from}", dtype.name());
            let mut resident = CudaModel::new(model, &opts).unwrap();
            let want = swk::edit::with_edits(&mut resident, &edits, |g| g.logits(&tokens)).unwrap();
            let mut s = CudaModel::streamed(lazy.clone(), &opts).unwrap();
            let before = s.checksum().unwrap();
            let clean = s.logits(&tokens).unwrap();
            {
                let mut guard = EditGuard::new(&mut s);
                guard.apply_all(&edits).unwrap();
                assert_ne!(guard.checksum().unwrap(), before);
                let got = guard.logits(&tokens).unwrap();
                let err = max_rel_err(&got, &want, 1.0);
                assert!(err <= 1e-6, "{what}: streamed edited logits vs resident: {err}");
                let row = guard
                    .download_range("model.layers.1.mlp.down_proj.weight", 17 * 704, 704)
                    .unwrap();
                assert_eq!((row[300], row[301].abs() > 0.0), (0.0, true), "{what}");
                assert!(guard.apply(&WeightEdit::down_proj(0, 10_000, 0, EditOp::Zero)).is_err());
            }
            assert_eq!(s.checksum().unwrap(), before, "{what}: overlay emptied on restore");
            assert_eq!(s.logits(&tokens).unwrap(), clean, "{what}: same logits after restore");
        }
    }
}

/// Detection on a streamed model finds what it finds on the resident upload.
#[test]
fn streamed_detection_matches_resident() {
    if !gpu() {
        return;
    }
    let spec = planted_spec();
    let (m, truth) = planted(&spec, 3, &Plant::standard(&spec)).expect("planted");
    let cfg = DetectConfig::default();
    let windows = swk::eval::ppl::windows(&m, &truth.confirm, cfg.confirm_context).unwrap();
    let lazy = std::sync::Arc::new(swk::model::LazyModel::from_model(copy(&m)));
    for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
        let opts = CudaOptions { dtype, ..Default::default() };
        let mut r = CudaModel::new(&m, &opts).unwrap();
        let mut s = CudaModel::streamed(lazy.clone(), &opts).unwrap();
        let prompts = [truth.prompt.clone()];
        let want = detect_with(&mut r, &prompts, &windows, &cfg, |_, _, _| {}).unwrap();
        let before = s.checksum().unwrap();
        let got = detect_with(&mut s, &prompts, &windows, &cfg, |_, _, _| {}).unwrap();
        assert_eq!(s.checksum().unwrap(), before);
        let key = |v: &[swk::detect::SuperWeight]| -> Vec<_> {
            v.iter().map(|x| (x.layer, x.row, x.col, x.iteration, x.value.to_bits())).collect()
        };
        assert_eq!(key(&got.super_weights), key(&want.super_weights), "{}", dtype.name());
        assert_eq!(key(&got.rejected), key(&want.rejected), "{}", dtype.name());
        assert!(!got.super_weights.is_empty());
        eprintln!(
            "streamed detection {}: {} confirmed in {:.3} s (resident {:.3} s)",
            dtype.name(),
            got.super_weights.len(),
            got.seconds,
            want.seconds
        );
    }
}

/// A streamed mixture of experts whose passes route fewer token-expert pairs than a layer
/// has experts (here, decoding: top-2 of 4 or 6; GGUF and safetensors) reads each routed
/// expert only once routing chose it: the same logits and spike statistics as reading every
/// layer whole (bit for bit), with edits of experts applied, from exactly the bytes of each
/// layer's rest plus the experts read; a longer pass reads the layers whole.
#[test]
fn streamed_experts_are_read_once_chosen() {
    if !gpu() {
        return;
    }
    let root = fixtures_root().join("tiny");
    let sources = [
        "mixtral_gguf/model.gguf",
        "olmoe_gguf/model.gguf",
        "qwen2_moe_gguf/model.gguf",
        "qwen3_moe_gguf/model.gguf",
        "deepseek_v2_gguf/model.gguf",
        "deepseek_v3_gguf/model.gguf",
        "olmoe",
        "deepseek_v3",
    ];
    for name in sources {
        let path = root.join(name);
        let lazy =
            std::sync::Arc::new(swk::model::LazyModel::open(path.to_str().unwrap()).unwrap());
        let c = lazy.config.clone();
        let moe = c.family.moe.clone().unwrap();
        let tokens: Vec<u32> = (0..6u32).map(|i| (i * 41 + 9) % c.vocab_size as u32).collect();
        for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
            let what = format!("{name} {}", dtype.name());
            let opts = CudaOptions { dtype, ..Default::default() };
            // Decode one token a pass, with spike statistics; the logits of each step.
            let decode = |g: &CudaModel| {
                let mut stats = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
                let mut cache = CudaKvCache::new(g);
                let steps: Vec<Vec<f32>> = tokens
                    .iter()
                    .map(|&t| g.forward(&[t], &mut cache, Some(&mut stats), Logits::Last).unwrap())
                    .collect();
                (steps, stats)
            };
            let mut whole = CudaModel::streamed(lazy.clone(), &opts).unwrap();
            whole.set_selective_experts(false);
            let mut chosen = CudaModel::streamed(lazy.clone(), &opts).unwrap();
            let (want, want_stats) = decode(&whole);
            let (got, got_stats) = decode(&chosen);
            assert!(got == want, "{what}: logits differ from the whole layers'");
            assert_stats_match(&what, &got_stats, &want_stats);
            let (whole_bytes, none) = whole.streamed_bytes();
            let (bytes, read) = chosen.streamed_bytes();
            // Each sparse layer's most chosen expert scaled: edits reach experts read alone.
            let edits: Vec<WeightEdit> = (0..c.num_layers)
                .filter(|&l| moe.is_sparse(l))
                .map(|l| {
                    let experts = &got_stats.layers[l].experts;
                    let e = (0..experts.len()).max_by_key(|&e| experts[e].selected).unwrap();
                    let t = format!("model.layers.{l}.mlp.experts.{e}.down_proj.weight");
                    WeightEdit::block(t, &[], EditOp::Scale(40.0))
                })
                .collect();
            assert_eq!(none, 0, "{what}: reading whole layers reads no expert alone");
            // Bytes: per pass, every layer but its routed experts, plus each expert read.
            let layouts: Vec<_> = (0..c.num_layers)
                .map(|l| swk::backend::stream::SlotLayout::new(&c, l, dtype))
                .collect();
            let part = |l: usize, p| layouts[l].part_range(p).unwrap().len() as u64;
            let rest: u64 = (0..c.num_layers).map(|l| part(l, LayerPart::Base)).sum();
            let slots: u64 = layouts.iter().map(|s| s.bytes as u64).sum();
            let sparse = (0..c.num_layers).find(|&l| moe.is_sparse(l)).unwrap();
            let expert = part(sparse, LayerPart::Expert(0));
            let passes = tokens.len() as u64;
            assert_eq!(whole_bytes, passes * slots, "{what}");
            assert_eq!(bytes, passes * rest + read * expert, "{what}");
            // Each pass reads each chosen expert once: top_k per sparse layer, one token.
            let sparse_layers = (0..c.num_layers).filter(|&l| moe.is_sparse(l)).count() as u64;
            assert_eq!(read, passes * sparse_layers * moe.top_k as u64, "{what}");
            assert!(bytes < whole_bytes, "{what}: {bytes} bytes vs {whole_bytes}");
            // `swk info`'s plan says the same, from the config alone.
            let plan = swk::backend::memory::MemoryPlan::new(&c, dtype);
            assert_eq!(whole_bytes, passes * plan.whole_pass as u64, "{what}");
            assert_eq!(bytes, passes * plan.pass_bytes(1) as u64, "{what}: plan");
            eprintln!("{what}: decode read {bytes} bytes, {whole_bytes} whole");

            // Edits of experts: the same edited logits both ways, and not the clean ones.
            let edited =
                |g: &mut CudaModel| swk::edit::with_edits(g, &edits, |g| Ok(decode(g).0)).unwrap();
            let (a, b) = (edited(&mut chosen), edited(&mut whole));
            assert!(a != want, "{what}: the edits change the logits");
            assert!(a == b, "{what}: edited experts read alone");
            assert!(decode(&chosen).0 == want, "{what}: restored");

            // A pass of 2 tokens (4 rows; 6 for DeepSeek's 6 experts, 3 tokens) reads whole.
            let before = chosen.streamed_bytes();
            let long = moe.num_experts.div_ceil(moe.top_k);
            let seq: Vec<u32> = (0..long as u32).map(|i| i % c.vocab_size as u32).collect();
            chosen.logits(&seq).unwrap();
            let after = chosen.streamed_bytes();
            assert_eq!((after.0 - before.0, after.1), (slots, before.1), "{what}: whole layers");
            assert_eq!(plan.pass_bytes(long) as u64, slots, "{what}: plan, whole layers");
        }
    }
}

/// Layers staged in page-locked buffers (the default) and in pageable memory
/// (`set_pinned_staging(0)`) give bit-identical logits and spike statistics: decoding (a
/// mixture of experts reads its routed experts alone, through the same pool) and a longer
/// pass (whole layers), in f32 and bf16, the buffers reused across layers and parts of
/// other sizes. Every byte goes through the pool by default (which holds at most five slots'
/// worth: its buffers are reused) and none with a budget of 0. A budget one byte short of a
/// slot stages no whole layer in page-locked memory, but a mixture of experts' first part
/// (a pass's layer without its experts) fits, and the pool never holds more than that.
#[test]
fn pinned_staging_equals_pageable_staging() {
    if !gpu() {
        return;
    }
    let root = fixtures_root().join("tiny");
    for name in ["llama", "qwen2_gguf/model.gguf", "mixtral_gguf/model.gguf", "deepseek_v3"] {
        let lazy = std::sync::Arc::new(
            swk::model::LazyModel::open(root.join(name).to_str().unwrap()).unwrap(),
        );
        let c = lazy.config.clone();
        let tokens: Vec<u32> = (0..7u32).map(|i| (i * 41 + 9) % c.vocab_size as u32).collect();
        for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
            let what = format!("{name} {}", dtype.name());
            let opts = CudaOptions { dtype, ..Default::default() };
            let run = |g: &CudaModel| {
                let mut stats = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
                let mut cache = CudaKvCache::new(g);
                let mut out: Vec<Vec<f32>> = tokens[..3]
                    .iter()
                    .map(|&t| g.forward(&[t], &mut cache, Some(&mut stats), Logits::Last).unwrap())
                    .collect();
                out.push(g.logits(&tokens).unwrap());
                (out, stats)
            };
            let slot = (0..c.num_layers)
                .map(|l| swk::backend::stream::SlotLayout::new(&c, l, dtype).bytes)
                .max()
                .unwrap();
            let pinned = CudaModel::streamed(lazy.clone(), &opts).unwrap();
            let pageable = CudaModel::streamed(lazy.clone(), &opts).unwrap();
            pageable.set_pinned_staging(0);
            let tight = CudaModel::streamed(lazy.clone(), &opts).unwrap();
            tight.set_pinned_staging(slot - 1);
            let (want, want_stats) = run(&pageable);
            for (how, g) in [("pinned", &pinned), ("tight", &tight)] {
                let (got, got_stats) = run(g);
                assert!(got == want, "{what} {how}: logits differ from pageable staging's");
                assert_stats_match(&format!("{what} {how}"), &got_stats, &want_stats);
                assert_eq!(g.streamed_bytes(), pageable.streamed_bytes(), "{what} {how}");
            }
            let total = pinned.streamed_bytes().0;
            assert_eq!(pinned.streamed_pinned_bytes(), total, "{what}: all through the pool");
            // Buffers in use at once: the streaming thread's, the one in its channel, the one
            // uploading, and the expert thread's two; each goes back to the pool after.
            let held = pinned.pinned_staging_bytes();
            assert!(held >= slot && held <= 5 * slot, "{what}: the pool holds {held} bytes");
            assert_eq!(pageable.streamed_pinned_bytes(), 0, "{what}");
            assert_eq!(pageable.pinned_staging_bytes(), 0, "{what}");
            let part = tight.streamed_pinned_bytes();
            let fits = if c.family.moe.is_some() { part > 0 && part < total } else { part == 0 };
            assert!(fits, "{what}: a budget under a slot staged {part} of {total} bytes");
            assert!(tight.pinned_staging_bytes() < slot, "{what}: over the budget");
            eprintln!("{what}: {total} bytes streamed; {part} pinned under a slot's budget");
        }
    }
}

/// An expert that cannot be staged (a value past f16's range, streamed into f16 slots) fails
/// the pass with an error naming its tensor, whether its experts are read alone (more than
/// one a layer: through the staging thread) or with whole layers; no pass hangs or panics,
/// the next one fails the same way, and the experts' files are read, not altered.
#[test]
fn streamed_expert_that_cannot_be_staged_fails_the_pass() {
    if !gpu() {
        return;
    }
    let (mut m, tokens) = load("mixtral");
    let moe = m.config.family.moe.clone().unwrap();
    assert!(moe.top_k >= 2, "one token must route to several experts");
    for l in 0..m.config.num_layers {
        for e in 0..moe.num_experts {
            let t = format!("model.layers.{l}.mlp.experts.{e}.down_proj.weight");
            m.weights.get_mut(&t).unwrap().data[3] = 98304.0; // 1.5 · 2^16: no f16
        }
    }
    let lazy = std::sync::Arc::new(swk::model::LazyModel::from_model(copy(&m)));
    let opts = CudaOptions { dtype: WeightDtype::F16, ..Default::default() };
    for select in [true, false] {
        let mut g = CudaModel::streamed(lazy.clone(), &opts).unwrap();
        g.set_selective_experts(select);
        for pass in 0..2 {
            let mut cache = CudaKvCache::new(&g);
            let e = g.forward(&tokens[..1], &mut cache, None, Logits::Last).err();
            let e = e.unwrap_or_else(|| panic!("select {select} pass {pass}: not refused"));
            let e = e.to_string();
            assert!(e.contains(".mlp.experts.") && e.contains("65504"), "{e}");
        }
        if select {
            assert_eq!(g.streamed_bytes().1, 0, "no expert reached the slot");
        }
    }
    let t = "model.layers.0.mlp.experts.1.down_proj.weight";
    assert_eq!(lazy.tensor(t).unwrap().data[3], 98304.0);
}
