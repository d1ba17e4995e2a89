//! GPU parity tests of the CUDA backend against the CPU backend (feature `cuda`).
//!
//! Every test skips, with a message saying why, when no CUDA device is usable, so
//! `cargo test --features cuda` passes on machines without a GPU. With `--features cuda-emu`
//! instead, the same tests run the backend's real code on swk's CPU emulator of the device
//! (`kernels/emu`, `src/backend/cuda/emu.rs`): that is how CI checks the backend on every
//! commit; only the timing tests skip there. On a GPU machine without
//! cargo, `scripts/gpu-check.sh run` runs this binary (copied by `scripts/gpu-check.sh
//! build`); `$SWK_FIXTURES` then points at the copied `tests/fixtures`.
//!
//! * logits: every tiny fixture, f32 weights (max rel err ≤ 1e-4, errors scaled by
//!   max(|ref|, 1) as in tests/forward.rs) and bf16 weights (≤ 1e-2 against the CPU on the
//!   same bf16-rounded weights; 5e-2 for `cublas-bf16`, which also rounds activations), for
//!   each GEMM engine available;
//! * spike statistics: same peak channel and position per layer as the CPU, values close;
//! * decode with the device KV cache equals prefill; perplexity scoring equals the CPU's;
//! * edits: EditGuard on device memory, one by one and batched, restored bit-exactly (device
//!   checksums);
//! * captured activations (`CudaModel::capture`): every hook point of every fixture, the same
//!   points as the CPU's hooks and values within 1e-4;
//! * `timing_7b` (ignored; run with `--ignored`): a timing table at Llama-2-7B shapes.
#![cfg(any(feature = "cuda", feature = "cuda-emu"))]

use std::path::PathBuf;
use std::time::Instant;

use swk::backend::cuda::{
    cublas_present, cuda_available, device_info, CudaKvCache, CudaModel, CudaOptions, GemmEngine,
    WeightDtype,
};
use swk::detect::{detect_with, DetectConfig};
use swk::edit::{EditGuard, EditOp, EditTarget, WeightEdit};
use swk::hooks::{HookKind, HookPoint, SpikeStats};
use swk::model::arch::{ForwardOptions, KvCache, Logits};
use swk::synth::{planted, random_llama, Plant, SynthSpec};
use swk::{Model, Result};

const FIXTURES: [&str; 23] = [
    "deepseek_v2",
    "deepseek_v3",
    "gemma",
    "gemma2",
    "gemma3",
    "gpt2",
    "gpt_neox",
    "gpt_neox_seq",
    "llama",
    "llama3_rope",
    "llama_bf16",
    "llama_f16",
    "llama_sharded",
    "mistral",
    "mixtral",
    "olmo",
    "olmo2",
    "olmoe",
    "phi3",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
];

/// Whether a device is usable; prints why not (the test then passes as skipped), or fails
/// when `$SWK_REQUIRE_GPU` is 1 (as `scripts/gpu-check.sh run` sets it on the GPU machine).
fn gpu() -> bool {
    if cuda_available() {
        return true;
    }
    let why = device_info().err().map(|e| e.to_string()).unwrap_or_default();
    if std::env::var("SWK_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("SWK_REQUIRE_GPU=1 and no CUDA device is usable: {why}");
    }
    eprintln!("SKIPPED: no CUDA device ({why})");
    false
}

/// Whether the device is swk's CPU emulator; says that timings are then skipped.
fn emulated() -> bool {
    if swk::backend::cuda::EMULATED {
        eprintln!("SKIPPED: timings mean nothing on the CPU emulator (feature cuda-emu)");
    }
    swk::backend::cuda::EMULATED
}

fn fixtures_root() -> PathBuf {
    std::env::var_os("SWK_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
}

fn load(name: &str) -> (Model, Vec<u32>) {
    let dir = fixtures_root().join("tiny").join(name);
    let m =
        Model::load(dir.to_str().expect("utf-8 path")).unwrap_or_else(|e| panic!("{name}: {e}"));
    let text = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json");
    let r: serde_json::Value = serde_json::from_str(&text).expect("json");
    let tokens =
        r["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    (m, tokens)
}

/// Largest |a - b| / max(|b|, floor).
fn max_rel_err(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / y.abs().max(floor)).fold(0.0, f32::max)
}

/// The engines this machine can run for `dtype`.
fn engines(dtype: WeightDtype) -> Vec<GemmEngine> {
    let mut v = vec![GemmEngine::Kernels];
    if cublas_present() {
        v.push(GemmEngine::Cublas);
        if dtype == WeightDtype::Bf16 {
            v.push(GemmEngine::CublasBf16);
            v.push(GemmEngine::Mma);
            v.push(GemmEngine::CublasSplit);
        }
    } else {
        eprintln!("note: libcublas not found; only swk's own GEMM kernels are tested");
    }
    v
}

/// [`engines`] for tests whose subject is not the product (streaming, graph capture): on the
/// emulator only swk's kernels and the dtype's default cuBLAS engine (each engine's own
/// numbers are checked by the logits tests), as every engine there costs CI minutes.
fn engines_brief(dtype: WeightDtype) -> Vec<GemmEngine> {
    let all = engines(dtype);
    match all.as_slice() {
        [first, .., last] if swk::backend::cuda::EMULATED && all.len() > 2 => vec![*first, *last],
        _ => all,
    }
}

/// A copy of `m` whose matrices are rounded to bf16 as the device stores them.
fn rounded_to_bf16(m: &Model) -> Model {
    rounded_to(m, WeightDtype::Bf16)
}

/// A copy of `m` whose matrices are rounded to `dtype` as the device stores them.
fn rounded_to(m: &Model, dtype: WeightDtype) -> Model {
    let mut w = m.weights.clone();
    let names: Vec<String> = w.names().map(str::to_string).collect();
    for n in names {
        let t = w.get_mut(&n).unwrap();
        // The device keeps GPT-2's learned positions, MoE routers and Qwen2-MoE's shared
        // expert gate in f32, like norms and biases.
        let f32_kept = n == "model.embed_positions.weight"
            || n.ends_with(".mlp.gate.weight")
            || n.ends_with(".shared_expert_gate.weight");
        if t.shape.len() == 2 && !f32_kept {
            for v in t.data.iter_mut() {
                *v = f32::from_bits(dtype.stored_bits(*v).expect("within the dtype's range"));
            }
        }
    }
    Model { config: m.config.clone(), weights: w, tokenizer: None, source: m.source.clone() }
}

/// A copy of `m` (weights and config; no tokenizer).
fn copy(m: &Model) -> Model {
    Model {
        config: m.config.clone(),
        weights: m.weights.clone(),
        tokenizer: None,
        source: m.source.clone(),
    }
}

fn cpu_logits(m: &Model, tokens: &[u32]) -> Vec<f32> {
    m.logits(tokens).expect("cpu forward")
}

fn cpu_stats(m: &Model, tokens: &[u32]) -> SpikeStats {
    let c = &m.config;
    let mut s = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
    m.forward(
        tokens,
        &mut KvCache::new(m),
        ForwardOptions { stats: Some(&mut s), logits: Logits::None, hooks: None },
    )
    .expect("cpu forward");
    s
}

#[test]
fn device_info_is_printed() {
    if !gpu() {
        return;
    }
    let info = device_info().unwrap();
    eprintln!("{info}");
    assert!(info.contains("cuda:0"));
}

#[test]
fn logits_match_cpu_f32_weights() {
    if !gpu() {
        return;
    }
    for name in FIXTURES {
        let (m, tokens) = load(name);
        let want = cpu_logits(&m, &tokens);
        for gemm in engines(WeightDtype::F32) {
            let g = CudaModel::new(
                &m,
                &CudaOptions { dtype: WeightDtype::F32, gemm, ..Default::default() },
            )
            .unwrap();
            let got = g.logits(&tokens).unwrap();
            let err = max_rel_err(&got, &want, 1.0);
            eprintln!("{name} f32 {}: max rel err {err:.2e}", gemm.name());
            assert!(err <= 1e-4, "{name} f32 {}: max rel err {err} > 1e-4", gemm.name());
        }
    }
}

#[test]
fn logits_match_cpu_bf16_weights() {
    if !gpu() {
        return;
    }
    let mut failures = Vec::new();
    for name in FIXTURES {
        let (m, tokens) = load(name);
        let want = cpu_logits(&rounded_to_bf16(&m), &tokens);
        for gemm in engines(WeightDtype::Bf16) {
            let g = CudaModel::new(
                &m,
                &CudaOptions { dtype: WeightDtype::Bf16, gemm, ..Default::default() },
            )
            .unwrap();
            let got = g.logits(&tokens).unwrap();
            let err = max_rel_err(&got, &want, 1.0);
            // cublas-bf16 also rounds every activation to bf16 before each product (seen on an
            // H200: 1.0e-2 on tiny/llama, 2.3e-2 on tiny/llama3_rope); the other engines keep
            // f32 activations (cublas-split: 1.9e-5 on tiny/llama).
            let tol = if gemm == GemmEngine::CublasBf16 { 5e-2 } else { 1e-2 };
            eprintln!("{name} bf16 {}: max rel err {err:.2e} (limit {tol:.0e})", gemm.name());
            if err > tol {
                failures.push(format!("{name} bf16 {}: max rel err {err} > {tol}", gemm.name()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// cublas-split's splitting and summing fused into the kernels around each product
/// ([`CudaModel::set_fused_launches`], the default) give the bits of the unfused launches on
/// every fixture: the logits of a prefill and of a decode step after it (RoPE at a later
/// position), and the spike statistics of both. (Phi-3's partial RoPE goes through the fused
/// q/k/v launch; the families with q/k/v biases, clamps or QK-norms through the unfused one.)
/// With q/k/v and gate/up each one product ([`CudaModel::set_grouped_products`], the
/// default): the same bits on the emulator, whose products are exact; on a GPU, where cuBLAS
/// may pick another kernel (and summation order) for the wider product, logits within 1e-4
/// (relative, floor 1) and statistics as [`assert_stats_match`] allows. The same for the
/// `mma` engine, whose grouped product may cut k into other slabs (so within 1e-4 on the
/// emulator too).
#[test]
fn fused_launches_equal_unfused_ones() {
    if !gpu() {
        return;
    }
    if !cublas_present() {
        eprintln!("skipped: no cuBLAS, so no cublas-split engine");
        return;
    }
    for (name, gemm) in
        FIXTURES.iter().flat_map(|n| [(n, GemmEngine::CublasSplit), (n, GemmEngine::Mma)])
    {
        let (m, tokens) = load(name);
        let opts = CudaOptions { dtype: WeightDtype::Bf16, gemm, ..Default::default() };
        let mut g = CudaModel::new(&m, &opts).unwrap();
        let name = format!("{name} {}", gemm.name());
        let run = |g: &CudaModel| {
            let c = g.config();
            let mut s = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
            let (head, last) = tokens.split_at(tokens.len() - 1);
            let mut cache = CudaKvCache::new(g);
            let mut logits = g.forward(head, &mut cache, Some(&mut s), Logits::All).unwrap();
            logits.extend(g.forward(last, &mut cache, Some(&mut s), Logits::All).unwrap());
            (logits, s)
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let grouped = run(&g);
        g.set_grouped_products(false);
        let fused = run(&g);
        g.set_fused_launches(false);
        let plain = run(&g);
        let same = |a: &SpikeStats, b: &SpikeStats| format!("{a:?}") == format!("{b:?}");
        assert!(bits(&fused.0) == bits(&plain.0), "{name}: the fused launches change the logits");
        assert!(same(&fused.1, &plain.1), "{name}: the fused launches change the statistics");
        if emulated() && gemm == GemmEngine::CublasSplit {
            assert!(bits(&grouped.0) == bits(&plain.0), "{name}: grouping changes the logits");
            assert!(same(&grouped.1, &plain.1), "{name}: grouping changes the statistics");
        } else {
            let err = max_rel_err(&grouped.0, &plain.0, 1.0);
            eprintln!("{name}: grouped products' logits vs one product per weight: {err:.2e}");
            assert!(err <= 1e-4, "{name}: grouped products' logits differ by {err}");
            assert_stats_match(&format!("{name} grouped"), &grouped.1, &plain.1);
        }
    }
}

/// f16 weights: on every fixture, the device's logits equal the CPU's on the same
/// f16-rounded weights within 1e-4 (both compute in f32), with swk's kernels (the default
/// for f16), the `mma` engine (f16 tensor cores on x's scaled two-term split) and cuBLAS
/// SGEMM on widened weights; the spike statistics too (swk's kernels, mma). The engines that
/// multiply bf16 inputs refuse f16 weights.
#[test]
fn logits_match_cpu_f16_weights() {
    if !gpu() {
        return;
    }
    for name in FIXTURES {
        let (m, tokens) = load(name);
        let rounded = rounded_to(&m, WeightDtype::F16);
        let want = cpu_logits(&rounded, &tokens);
        let mut gemms = vec![GemmEngine::Auto, GemmEngine::Mma];
        if cublas_present() {
            gemms.push(GemmEngine::Cublas);
        }
        for gemm in gemms {
            let opts = CudaOptions { dtype: WeightDtype::F16, gemm, ..Default::default() };
            let g = CudaModel::new(&m, &opts).unwrap();
            let c = &m.config;
            let mut stats = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
            let got = g
                .forward(&tokens, &mut CudaKvCache::new(&g), Some(&mut stats), Logits::All)
                .unwrap();
            let err = max_rel_err(&got, &want, 1.0);
            let at = format!("{name} f16 {}", g.gemm().name());
            eprintln!("{at}: max rel err {err:.2e}");
            assert!(err <= 1e-4, "{at}: max rel err {err} > 1e-4");
            if gemm == GemmEngine::Auto {
                assert_eq!(g.gemm(), GemmEngine::Kernels, "{name}: f16 runs on swk's kernels");
            }
            if gemm != GemmEngine::Cublas {
                assert_stats_match(&at, &stats, &cpu_stats(&rounded, &tokens));
            }
        }
    }
    let (m, _) = load("llama");
    for gemm in [GemmEngine::CublasBf16, GemmEngine::CublasSplit] {
        let opts = CudaOptions { dtype: WeightDtype::F16, gemm, ..Default::default() };
        let e = CudaModel::new(&m, &opts).err().expect("refused").to_string();
        assert!(e.contains("needs bf16 weights"), "{e}");
    }
}

/// A weight f16 cannot hold (beyond ±65504) refuses the f16 upload, naming the tensor; bf16
/// and f32 take it. An edit that would write one fails the same way, and the guard restores
/// every weight (device checksum unchanged), resident and streamed.
#[test]
fn f16_upload_refuses_values_past_its_range() {
    if !gpu() {
        return;
    }
    let (mut m, _) = load("llama");
    let name = "model.layers.1.mlp.down_proj.weight";
    m.weights.get_mut(name).unwrap().data[7] = 98304.0; // 1.5 · 2^16: a bf16, not an f16
    let opts = CudaOptions { dtype: WeightDtype::F16, ..Default::default() };
    let e = CudaModel::new(&m, &opts).err().expect("refused").to_string();
    assert!(e.contains(name) && e.contains("f16") && e.contains("65504"), "{e}");
    for dtype in [WeightDtype::Bf16, WeightDtype::F32] {
        let g = CudaModel::new(&m, &CudaOptions { dtype, ..Default::default() }).unwrap();
        assert_eq!(g.download(name).unwrap()[7], 98304.0, "{dtype:?}");
    }

    // An edit that would write such a value fails, and every weight comes back: one element,
    // a batch, a block; resident and streamed (the host overlay).
    let (m, _) = load("llama");
    let lazy = std::sync::Arc::new(swk::model::LazyModel::from_model(copy(&m)));
    let fine = WeightEdit::down_proj(1, 0, 0, EditOp::Scale(2.0));
    let failing = [
        vec![fine.clone(), WeightEdit::down_proj(1, 0, 1, EditOp::Set(1e6))],
        (0..4).map(|c| WeightEdit::down_proj(1, 2, c, EditOp::Set(-7e4))).collect(),
        vec![fine, WeightEdit::block(name, &[], EditOp::Scale(1e9))],
    ];
    for streamed in [false, true] {
        let mut g = if streamed {
            CudaModel::streamed(lazy.clone(), &opts).unwrap()
        } else {
            CudaModel::new(&m, &opts).unwrap()
        };
        let before = g.checksum().unwrap();
        for edits in &failing {
            let mut guard = EditGuard::new(&mut g);
            let e = guard.apply_all(edits).expect_err("refused").to_string();
            assert!(e.contains(name) && e.contains("f16"), "streamed {streamed}: {e}");
            drop(guard);
            assert_eq!(g.checksum().unwrap(), before, "streamed {streamed}: restored");
        }
    }
}

/// A random model in f16 holds the f16 rounding of the f32 model's values (same seed): the
/// device's f32 → f16 conversion is the host's.
#[test]
fn random_f16_weights_are_the_f32_ones_rounded() {
    if !gpu() {
        return;
    }
    let c = swk::synth::SynthSpec::tiny().config().unwrap();
    let opts = |dtype| CudaOptions { dtype, ..Default::default() };
    let a = CudaModel::random(&c, 7, &opts(WeightDtype::F32)).unwrap();
    let b = CudaModel::random(&c, 7, &opts(WeightDtype::F16)).unwrap();
    for name in ["model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"] {
        let (x, y) = (a.download(name).unwrap(), b.download(name).unwrap());
        assert_eq!(x.len(), y.len());
        for (i, (u, v)) in x.iter().zip(&y).enumerate() {
            assert_eq!(half::f16::from_f32(*u).to_f32(), *v, "{name}[{i}]");
        }
    }
}

/// The upload is bit-exact: the device checksum equals the host's for the same bits.
#[test]
fn upload_is_bit_exact() {
    if !gpu() {
        return;
    }
    let (m, _) = load("llama");
    for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
        let g = CudaModel::new(&m, &CudaOptions { dtype, ..Default::default() }).unwrap();
        assert_eq!(
            g.checksum().unwrap(),
            CudaModel::expected_checksum(&m, dtype).unwrap(),
            "{}",
            dtype.name()
        );
        let emb = g.download("model.embed_tokens.weight").unwrap();
        let host = &m.weights.get("model.embed_tokens.weight").unwrap().data;
        match dtype {
            WeightDtype::F32 => assert_eq!(&emb, host),
            WeightDtype::Bf16 => {
                assert!(emb.iter().zip(host).all(|(d, h)| *d == half::bf16::from_f32(*h).to_f32()))
            }
            WeightDtype::F16 => {
                assert!(emb.iter().zip(host).all(|(d, h)| *d == half::f16::from_f32(*h).to_f32()))
            }
        }
    }
}

#[test]
fn spike_stats_match_cpu() {
    if !gpu() {
        return;
    }
    for name in FIXTURES {
        let (m, tokens) = load(name);
        let want = cpu_stats(&m, &tokens);
        for gemm in engines(WeightDtype::F32) {
            let g = CudaModel::new(
                &m,
                &CudaOptions { dtype: WeightDtype::F32, gemm, ..Default::default() },
            )
            .unwrap();
            let c = &m.config;
            let mut got = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
            let out = g
                .forward(&tokens, &mut CudaKvCache::new(&g), Some(&mut got), Logits::None)
                .unwrap();
            assert!(out.is_empty());
            let ctx = format!("{name} {}", gemm.name());
            assert_stats_match(&ctx, &got, &want);
        }
    }
}

/// The device's spike statistics `a` agree with the CPU's `b`: per layer (and per routed
/// expert and shared expert of a mixture of experts) the same peak channels and positions,
/// every channel's signed maximum within 1e-4 (relative, floor 1) at the same position
/// unless a near tie (rounding may pick another; at most 1% of channels), the same routed
/// token counts, and router entropies and weight sums within 1e-4 (relative, floor 1: sums
/// of f32 softmax weights whose router logits differ in the last bits between summation
/// orders; seen on an H200: 1.0e-6 for an OLMoE expert's weight sum, swk's kernels). A
/// misrouted token moves a weight sum by its whole weight, orders of magnitude more.
fn assert_stats_match(ctx: &str, a: &SpikeStats, b: &SpikeStats) {
    assert_eq!(a.layers.len(), b.layers.len(), "{ctx}: layers");
    for (l, (x, y)) in a.layers.iter().zip(&b.layers).enumerate() {
        let ctx = format!("{ctx} layer {l}");
        assert_channels_match(&format!("{ctx} input"), &x.input, &y.input);
        assert_channels_match(&format!("{ctx} output"), &x.output, &y.output);
        assert_eq!(x.routed_tokens, y.routed_tokens, "{ctx}: routed tokens");
        let close = |u: f64, v: f64| (u - v).abs() <= 1e-4 * v.abs().max(1.0);
        assert!(close(x.router_entropy_sum, y.router_entropy_sum), "{ctx}: router entropy");
        assert_eq!(x.experts.len(), y.experts.len(), "{ctx}: experts");
        let shared = x.shared.iter().zip(&y.shared).map(|(u, v)| ("shared".to_string(), u, v));
        let experts = x.experts.iter().zip(&y.experts).enumerate();
        for (what, u, v) in experts.map(|(e, (u, v))| (format!("expert {e}"), u, v)).chain(shared) {
            let ctx = format!("{ctx} {what}");
            assert_eq!(u.selected, v.selected, "{ctx}: tokens");
            assert!(
                close(u.weight_sum, v.weight_sum),
                "{ctx}: {} vs {}",
                u.weight_sum,
                v.weight_sum
            );
            assert_channels_match(&format!("{ctx} input"), &u.input, &v.input);
            assert_channels_match(&format!("{ctx} output"), &u.output, &v.output);
        }
        assert_eq!(x.shared.is_some(), y.shared.is_some(), "{ctx}: shared expert");
    }
}

/// See [`assert_stats_match`].
fn assert_channels_match(ctx: &str, a: &[swk::hooks::ChannelMax], b: &[swk::hooks::ChannelMax]) {
    assert_eq!(a.len(), b.len(), "{ctx}: channels");
    let peak = |v: &[swk::hooks::ChannelMax]| {
        v.iter()
            .enumerate()
            .filter(|(_, m)| m.abs > 0.0)
            .max_by(|p, q| p.1.abs.total_cmp(&q.1.abs).then(q.0.cmp(&p.0)))
            .map(|(c, m)| (c, m.position))
    };
    assert_eq!(peak(a), peak(b), "{ctx}: peak (channel, position)");
    let mut moved = 0;
    for (x, y) in a.iter().zip(b) {
        let tol = 1e-4 * y.abs.max(1.0);
        if x.position == y.position {
            assert!((x.value - y.value).abs() <= tol, "{ctx}: {x:?} vs {y:?}");
        } else {
            assert!((x.abs - y.abs).abs() <= tol, "{ctx}: {x:?} vs {y:?}");
            moved += 1;
        }
    }
    assert!(moved * 100 <= a.len().max(1), "{ctx}: {moved} positions differ");
}

/// Every hook point of every layer, in forward order.
fn every_point(m: &Model) -> Vec<HookPoint> {
    (0..m.config.num_layers)
        .flat_map(|layer| HookKind::ALL.into_iter().map(move |kind| HookPoint { layer, kind }))
        .collect()
}

#[test]
fn captured_activations_match_cpu_hooks() {
    if !gpu() {
        return;
    }
    for name in FIXTURES {
        let (m, tokens) = load(name);
        let points = every_point(&m);
        let want = swk::analysis::capture(&m, &tokens, &points).unwrap();
        let g = CudaModel::new(&m, &CudaOptions { dtype: WeightDtype::F32, ..Default::default() })
            .unwrap();
        let got = g.capture(&tokens, &points).unwrap();
        // The same points as the CPU's hooks (a family without a point lacks it on both).
        let mut missing: Vec<String> =
            want.keys().filter(|p| !got.contains_key(p)).map(|p| p.to_string()).collect();
        let mut extra: Vec<String> =
            got.keys().filter(|p| !want.contains_key(p)).map(|p| p.to_string()).collect();
        missing.sort();
        extra.sort();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{name}: missing {missing:?}, extra {extra:?}"
        );
        assert!(
            want.keys().any(|p| p.kind == HookKind::AttnPattern),
            "{name}: the CPU hooks no attention pattern"
        );
        let mut worst = (0f32, String::new());
        for (p, w) in &want {
            let err = max_rel_err(&got[p], w, 1.0);
            if err > worst.0 {
                worst = (err, p.to_string());
            }
        }
        eprintln!("{name}: {} points, max rel err {:.2e} at {}", want.len(), worst.0, worst.1);
        assert!(worst.0 <= 1e-4, "{name}: {} differs by {} (> 1e-4)", worst.1, worst.0);
    }
    // A layer past the model is an error, not an empty map.
    let (m, tokens) = load("llama");
    let g = CudaModel::new(&m, &CudaOptions::default()).unwrap();
    let past = HookPoint { layer: m.config.num_layers, kind: HookKind::ResidPost };
    let e = g.capture(&tokens, &[past]).unwrap_err().to_string();
    assert!(e.contains("past the model"), "{e}");
}

/// The experts of a sparse layer run together (one launch per step for the layer, when each
/// has at most 16 rows) give what they give one at a time: bit-identical logits and spike
/// statistics with swk's kernels (the same gemv per expert); with cuBLAS, logits within 1e-4
/// (f32 weights, statistics too) or 1e-2 (bf16; 5e-2 for cublas-bf16, which rounds
/// activations); and the CPU's logits
/// within 1e-4 (f32), on every mixture-of-experts
/// fixture. A pass with more than 16 rows for an expert (64 tokens) is grouped too with swk's
/// kernels (tiled, bit-identical to one by one) and one by one with cuBLAS.
#[test]
fn grouped_experts_equal_one_by_one() {
    if !gpu() {
        return;
    }
    let moe = ["deepseek_v2", "deepseek_v3", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe"];
    for name in moe {
        let (m, tokens) = load(name);
        let short = &tokens[..tokens.len().min(8)];
        let want = cpu_logits(&m, short);
        for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
            for gemm in engines(dtype) {
                let at = format!("{name} {dtype:?} {}", gemm.name());
                let mut g =
                    CudaModel::new(&m, &CudaOptions { dtype, gemm, ..Default::default() }).unwrap();
                // Both ways route on the host, so that the products alone differ (device routing
                // against host routing: `device_routing_equals_host_routing`).
                g.set_device_routing(false);
                let run = |g: &CudaModel| {
                    let mut stats = SpikeStats::new(
                        m.config.num_layers,
                        m.config.intermediate_size,
                        m.config.hidden_size,
                    );
                    let logits = g
                        .forward(short, &mut CudaKvCache::new(g), Some(&mut stats), Logits::All)
                        .unwrap();
                    (logits, stats)
                };
                let (grouped, gs) = run(&g);
                assert!(g.grouped_expert_layers() > 0, "{at}: the experts ran grouped");
                g.set_grouped_experts(false);
                let before = g.grouped_expert_layers();
                let (single, ss) = run(&g);
                assert_eq!(g.grouped_expert_layers(), before, "{at}: one by one");
                if gemm == GemmEngine::Kernels {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                    assert_eq!(bits(&grouped), bits(&single), "{at}: logits");
                    assert_eq!(
                        format!("{:?}", gs.layers),
                        format!("{:?}", ss.layers),
                        "{at}: statistics"
                    );
                } else {
                    // cublas-bf16 also rounds the activations to bf16 (see the logits tests).
                    let tol = match (dtype, gemm) {
                        (WeightDtype::F32, _) => 1e-4,
                        (_, GemmEngine::CublasBf16) => 5e-2,
                        _ => 1e-2,
                    };
                    let err = max_rel_err(&grouped, &single, 1.0);
                    assert!(err <= tol, "{at}: grouped vs one by one {err}");
                    if dtype == WeightDtype::F32 {
                        assert_stats_match(&at, &gs, &ss);
                    }
                }
                if dtype == WeightDtype::F32 {
                    let err = max_rel_err(&grouped, &want, 1.0);
                    assert!(err <= 1e-4, "{at}: grouped vs cpu {err}");
                }
            }
        }
        // More than 16 rows for some expert: swk's kernels still group the experts (tiled
        // GEMMs, bit for bit the one-by-one values); cuBLAS takes them one at a time. Both
        // give the CPU's logits.
        let long: Vec<u32> = tokens.iter().cycle().take(64).copied().collect();
        let want = cpu_logits(&m, &long);
        for gemm in engines(WeightDtype::F32) {
            let at = format!("{name} 64 tokens {}", gemm.name());
            let opts = CudaOptions { dtype: WeightDtype::F32, gemm, ..Default::default() };
            let mut g = CudaModel::new(&m, &opts).unwrap();
            let got = g.logits(&long).unwrap();
            let err = max_rel_err(&got, &want, 1.0);
            assert!(err <= 1e-4, "{at} vs cpu {err}");
            if gemm == GemmEngine::Kernels {
                assert!(g.grouped_expert_layers() > 0, "{at}: the experts ran grouped");
                g.set_grouped_experts(false);
                let before = g.grouped_expert_layers();
                let single = g.logits(&long).unwrap();
                assert_eq!(g.grouped_expert_layers(), before, "{at}: one by one");
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                assert_eq!(bits(&got), bits(&single), "{at}: grouped vs one by one");
            } else {
                assert_eq!(g.grouped_expert_layers(), 0, "{at}: one expert at a time");
            }
        }
    }
}

/// A mixture of experts' sparse layers route on the device in passes of at most 16 tokens
/// ([`CudaModel::set_device_routing`], kernels/route.cu): the same logits and spike statistics
/// (router counters included) as routing on the host, for a prefill and decode steps, on
/// every MoE fixture and engine: bit for bit on the emulator, within rounding on a GPU (whose
/// `expf` and `log` may differ from the host's in the last bit). Such passes are CUDA graphs:
/// their replays give the same statistics.
#[test]
fn device_routing_equals_host_routing() {
    if !gpu() {
        return;
    }
    let emulated = swk::backend::cuda::EMULATED;
    let moe = [
        "deepseek_v2",
        "deepseek_v2_greedy",
        "deepseek_v3",
        "mixtral",
        "olmoe",
        "qwen2_moe",
        "qwen3_moe",
    ];
    for name in moe {
        let (m, tokens) = load(name);
        let prompt = &tokens[..tokens.len().min(9)];
        let c = &m.config;
        let new_stats = || SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
        // A 5-token prefill, then one token at a time.
        let run = |g: &CudaModel| {
            let (mut s, mut cache) = (new_stats(), CudaKvCache::new(g));
            let mut logits =
                g.forward(&prompt[..5], &mut cache, Some(&mut s), Logits::All).unwrap();
            for &t in &prompt[5..] {
                logits.extend(g.forward(&[t], &mut cache, Some(&mut s), Logits::All).unwrap());
            }
            (logits, s)
        };
        for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
            let mut gemms = engines_brief(dtype);
            if dtype == WeightDtype::Bf16 && cublas_present() && !gemms.contains(&GemmEngine::Mma) {
                gemms.push(GemmEngine::Mma);
            }
            for gemm in gemms {
                let at = format!("{name} {dtype:?} {}", gemm.name());
                let mut g =
                    CudaModel::new(&m, &CudaOptions { dtype, gemm, ..Default::default() }).unwrap();
                let before = g.device_routed_layers();
                let (dl, ds) = run(&g);
                assert!(g.device_routed_layers() > before, "{at}: routed on the device");
                g.set_device_routing(false);
                let before = g.device_routed_layers();
                let (hl, hs) = run(&g);
                assert_eq!(g.device_routed_layers(), before, "{at}: routed on the host");
                if emulated {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                    assert_eq!(bits(&dl), bits(&hl), "{at}: logits");
                    assert_eq!(format!("{:?}", ds.layers), format!("{:?}", hs.layers), "{at}");
                } else {
                    let err = max_rel_err(&dl, &hl, 1.0);
                    assert!(err <= 1e-4, "{at}: device vs host routing {err}");
                    assert_stats_match(&at, &ds, &hs);
                }
                // The prompt's statistics from a graph, captured then replayed.
                use swk::detect::DetectBackend;
                g.set_device_routing(true);
                let mut plain = new_stats();
                g.spike_stats(prompt, &mut plain).unwrap();
                g.set_graphs(true);
                let mut graphed = new_stats();
                for _ in 0..2 {
                    g.spike_stats(prompt, &mut graphed).unwrap();
                }
                assert_eq!(g.graph_error(), None, "{at}");
                assert_eq!(g.graphs_held(), 1, "{at}: the pass is a graph");
                if emulated {
                    let (a, b) = (format!("{:?}", graphed.layers), format!("{:?}", plain.layers));
                    assert_eq!(a, b, "{at}: graph replay");
                } else {
                    assert_stats_match(&format!("{at} graph"), &graphed, &plain);
                }
            }
        }
    }
}

/// Statistics accumulate over calls exactly as on the CPU (prefill then decode steps).
#[test]
fn spike_stats_accumulate_over_calls() {
    if !gpu() {
        return;
    }
    for name in ["llama", "qwen2_moe", "qwen3_moe"] {
        let (m, tokens) = load(name);
        let c = &m.config;
        let mut want = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
        let mut got = want.clone();
        let opts = CudaOptions { dtype: WeightDtype::F32, ..Default::default() };
        let g = CudaModel::new(&m, &opts).unwrap();
        let (mut cc, mut gc) = (KvCache::new(&m), CudaKvCache::new(&g));
        for chunk in [&tokens[..10], &tokens[10..11], &tokens[11..]] {
            m.forward(
                chunk,
                &mut cc,
                ForwardOptions { stats: Some(&mut want), logits: Logits::None, hooks: None },
            )
            .unwrap();
            g.forward(chunk, &mut gc, Some(&mut got), Logits::None).unwrap();
        }
        assert_stats_match(&format!("{name} accumulated"), &got, &want);
    }
}

/// Token-by-token decode through the device KV cache (which grows past its first
/// allocation) gives the prefill's logits, and the CPU's.
#[test]
fn decode_matches_prefill_and_cpu() {
    if !gpu() {
        return;
    }
    // Every family: decode exercises RoPE offsets, sliding windows, Gemma 3's local RoPE
    // and GPT-2's learned positions at pos0 > 0.
    for name in FIXTURES {
        let (m, tokens) = load(name);
        let v = m.config.vocab_size;
        let want = cpu_logits(&m, &tokens);
        for gemm in engines(WeightDtype::F32) {
            let g = CudaModel::new(
                &m,
                &CudaOptions { dtype: WeightDtype::F32, gemm, ..Default::default() },
            )
            .unwrap();
            let mut cache = CudaKvCache::new(&g);
            // A 5-token prefill, then one token at a time.
            let first = g.forward(&tokens[..5], &mut cache, None, Logits::Last).unwrap();
            let mut rows = vec![first];
            for &t in &tokens[5..] {
                rows.push(g.forward(&[t], &mut cache, None, Logits::Last).unwrap());
            }
            assert_eq!(cache.len(), tokens.len());
            assert!(cache.capacity() >= tokens.len());
            for (k, row) in rows.iter().enumerate() {
                let p = k + 4;
                let err = max_rel_err(row, &want[p * v..(p + 1) * v], 1.0);
                assert!(err <= 1e-4, "{name} {} position {p}: {err}", gemm.name());
            }
            // Clearing the cache starts over.
            cache.clear();
            let again = g.forward(&tokens, &mut cache, None, Logits::All).unwrap();
            assert!(max_rel_err(&again, &want, 1.0) <= 1e-4);
        }
    }
}

#[test]
fn perplexity_scoring_matches_cpu() {
    if !gpu() {
        return;
    }
    for name in ["llama", "qwen2", "qwen2_moe"] {
        let (m, tokens) = load(name);
        let (want, n) =
            swk::eval::ppl::score(&cpu_logits(&m, &tokens), &tokens, m.config.vocab_size);
        let g = CudaModel::new(&m, &CudaOptions { dtype: WeightDtype::F32, ..Default::default() })
            .unwrap();
        let (got, k) = g.score(&tokens, &mut CudaKvCache::new(&g)).unwrap();
        assert_eq!(n, k);
        assert!((got - want).abs() <= 1e-4 * want.abs(), "{name}: nll {got} vs {want}");
        let windows: Vec<Vec<u32>> = tokens.chunks(8).map(<[u32]>::to_vec).collect();
        let p = g.perplexity(&windows, 8, |_, _| {}).unwrap();
        assert_eq!(p.windows, windows.len());
        assert!(p.perplexity.is_finite() && p.perplexity > 1.0);
    }
}

/// A synthetic model big enough for several GEMM tiles, GQA and multi-block reductions.
fn medium() -> Model {
    let spec = SynthSpec {
        hidden: 256,
        intermediate: 704,
        layers: 3,
        heads: 8,
        kv_heads: 2,
        vocab: 1000,
        tie_embeddings: false,
    };
    random_llama(&spec, 42).expect("synthetic model")
}

/// Edits of [`medium`]'s weights: down_proj elements (zero, scale, set), a norm weight and an
/// embedding element.
fn medium_edits() -> [WeightEdit; 5] {
    [
        WeightEdit::down_proj(1, 17, 300, EditOp::Zero),
        WeightEdit::down_proj(1, 17, 301, EditOp::Scale(-1000.0)),
        WeightEdit::down_proj(2, 0, 0, EditOp::Set(55.5)),
        WeightEdit::new("model.layers.0.input_layernorm.weight", &[3], EditOp::Scale(40.0)),
        WeightEdit::new("model.embed_tokens.weight", &[7, 5], EditOp::Set(-3.25)),
    ]
}

/// Shapes of the planted models of the detection tests.
fn planted_spec() -> SynthSpec {
    SynthSpec {
        hidden: 96,
        intermediate: 256,
        layers: 5,
        heads: 6,
        kv_heads: 2,
        vocab: 320,
        tie_embeddings: false,
    }
}

#[test]
fn synthetic_model_matches_cpu() {
    if !gpu() {
        return;
    }
    let m = medium();
    let tokens: Vec<u32> = (0..150u32).map(|i| (i * 37 + 11) % 1000).collect();
    let want = cpu_logits(&m, &tokens);
    for gemm in engines(WeightDtype::F32) {
        let g = CudaModel::new(
            &m,
            &CudaOptions { dtype: WeightDtype::F32, gemm, ..Default::default() },
        )
        .unwrap();
        let err = max_rel_err(&g.logits(&tokens).unwrap(), &want, 1.0);
        eprintln!("synthetic f32 {}: max rel err {err:.2e}", gemm.name());
        assert!(err <= 1e-4, "{}: {err}", gemm.name());
    }
}

/// Edits through EditGuard on device memory: applied, visible to the forward pass, equal to
/// the same edits on the CPU, and restored bit-exactly (device checksum) when the guard drops.
#[test]
fn device_edits_restore_bit_exactly() {
    if !gpu() {
        return;
    }
    let m = medium();
    let tokens: Vec<u32> = (0..20u32).map(|i| (i * 101 + 7) % 1000).collect();
    let edits = medium_edits();
    for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
        let host = rounded_to(&m, dtype);
        let mut g = CudaModel::new(&m, &CudaOptions { dtype, ..Default::default() }).unwrap();
        let before = g.checksum().unwrap();
        assert_eq!(before, CudaModel::expected_checksum(&m, dtype).unwrap());
        let clean = g.logits(&tokens).unwrap();
        {
            let mut guard = EditGuard::new(&mut g);
            guard.apply_all(&edits).unwrap();
            for (r, e) in guard.log().iter().zip(&edits) {
                let now = f32::from_bits(guard.read_bits(&e.tensor, r.flat).unwrap());
                let stored = if e.tensor.ends_with("layernorm.weight") {
                    r.new
                } else {
                    f32::from_bits(dtype.stored_bits(r.new).unwrap())
                };
                assert_eq!(now.to_bits(), stored.to_bits(), "{e}");
            }
            assert_ne!(guard.checksum().unwrap(), before);
            let edited = guard.logits(&tokens).unwrap();
            assert_ne!(edited, clean, "the edits change the output");
            // The same weights on the CPU (the values the device stored: bf16-rounded there)
            // give the same logits.
            let stored: Vec<WeightEdit> = guard
                .log()
                .iter()
                .map(|r| {
                    let v = f32::from_bits(guard.read_bits(&r.edit.tensor, r.flat).unwrap());
                    WeightEdit::new(r.edit.tensor.clone(), &r.edit.index, EditOp::Set(v))
                })
                .collect();
            let mut cpu = host;
            let want = swk::edit::with_edits(&mut cpu, &stored, |m| m.logits(&tokens)).unwrap();
            let err = max_rel_err(&edited, &want, 1.0);
            assert!(err <= 1e-4, "{}: edited logits differ from the CPU's by {err}", dtype.name());
            // A failing edit (out of range) leaves the earlier ones logged for restore.
            assert!(guard.apply(&WeightEdit::down_proj(0, 10_000, 0, EditOp::Zero)).is_err());
        }
        assert_eq!(g.checksum().unwrap(), before, "{}: restored bit-exactly", dtype.name());
        assert_eq!(
            g.logits(&tokens).unwrap(),
            clean,
            "{}: same logits after restore",
            dtype.name()
        );
        // Tensors the forward pass does not read are refused, not silently ignored.
        assert!(g.shape_of("model.layers.0.self_attn.rotary_emb.inv_freq").is_err());
    }
}

/// Batched edits (`apply_all`: one gather and one scatter launch per run of one tensor; one
/// download and one upload per block edit) leave the device weights exactly as the same edits
/// leave the CPU's: a whole down_proj zeroed element by element, scales that hit elements
/// repeatedly, a norm weight, a row and whole tensors as block edits, and elements of
/// tensors that share a device buffer. The logs agree bit for bit (as stored), and restore
/// is bit-exact.
#[test]
fn batched_device_edits_match_the_cpu() {
    if !gpu() {
        return;
    }
    let m = medium();
    let (name, cols) = ("model.layers.1.mlp.down_proj.weight", 704);
    let mut edits: Vec<WeightEdit> = (0..256 * cols)
        .map(|f| WeightEdit::new(name, &[f / cols, f % cols], EditOp::Zero))
        .collect();
    edits.extend(
        (0..300).map(|k| WeightEdit::down_proj(2, k % 7, (k * 13) % 20, EditOp::Scale(-2.0))),
    );
    edits.push(WeightEdit::new("model.layers.0.input_layernorm.weight", &[3], EditOp::Scale(40.0)));
    // Block edits (a download and an upload each), overlapping element edits.
    edits.push(WeightEdit::block("model.layers.2.mlp.down_proj.weight", &[3], EditOp::Scale(0.25)));
    edits.push(WeightEdit::down_proj(2, 3, 5, EditOp::Set(7.0)));
    edits.push(WeightEdit::block("model.layers.0.mlp.up_proj.weight", &[], EditOp::Scale(-2.0)));
    edits.push(WeightEdit::block(
        "model.layers.0.post_attention_layernorm.weight",
        &[],
        EditOp::Zero,
    ));
    // Tensors that share a device buffer with others (a layer's q/k/v, gate/up), at an
    // offset into it: a batch of element edits, and a single one.
    let k_proj = "model.layers.1.self_attn.k_proj.weight";
    edits.extend(
        (0..40).map(|k| WeightEdit::new(k_proj, &[k % 9, (k * 7) % 50], EditOp::Scale(-2.0))),
    );
    edits.push(WeightEdit::new(
        "model.layers.2.self_attn.v_proj.weight",
        &[1, 2],
        EditOp::Set(3.5),
    ));
    for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
        let mut host = rounded_to(&m, dtype);
        let mut g = CudaModel::new(&m, &CudaOptions { dtype, ..Default::default() }).unwrap();
        let before = g.checksum().unwrap();
        {
            let mut guard = EditGuard::new(&mut g);
            let mut cpu = EditGuard::new(&mut host);
            guard.apply_all(&edits).unwrap();
            cpu.apply_all(&edits).unwrap();
            let want = CudaModel::expected_checksum(&cpu, dtype).unwrap();
            assert_eq!(guard.checksum().unwrap(), want, "{}: edited weights", dtype.name());
            assert_eq!(guard.log().len(), cpu.log().len());
            // The CPU keeps what it writes in f32, the device rounds bf16 and f16 matrices:
            // compare the logs as the device stores them. (Scales by powers of two commute
            // with that rounding, so repeated edits of one element agree too.)
            let stored = |t: &str, b: u32| -> u32 {
                if t.ends_with("layernorm.weight") {
                    b
                } else {
                    dtype.stored_bits(f32::from_bits(b)).unwrap()
                }
            };
            for (a, b) in guard.log().iter().zip(cpu.log()) {
                let t = &a.edit.tensor;
                let cpu_block: Vec<u32> = b.block_bits.iter().map(|&x| stored(t, x)).collect();
                assert_eq!(a.block_bits, cpu_block, "{}: block log of {}", dtype.name(), a.edit);
                let (a, b) = (
                    (a.flat, a.len, a.original_bits, stored(t, a.new.to_bits())),
                    (b.flat, b.len, stored(t, b.original_bits), stored(t, b.new.to_bits())),
                );
                assert_eq!(a, b, "{}: log", dtype.name());
            }
            assert_eq!(guard.restore_all().unwrap(), edits.len());
        }
        assert_eq!(g.checksum().unwrap(), before, "{}: restored bit-exactly", dtype.name());
    }
}

/// Detection on the device finds exactly what the CPU finds on planted models: the same
/// candidates (coordinates, iteration, token positions), the same confirmed set, perplexity
/// ratios within 1e-3 (f32 weights) or 5e-2 (bf16, against the CPU on the same bf16-rounded
/// weights), and every weight restored (device checksum unchanged).
#[test]
fn detection_matches_cpu_on_planted_models() {
    if !gpu() {
        return;
    }
    let spec = planted_spec();
    for seed in [3, 11] {
        let (m, truth) = planted(&spec, seed, &Plant::standard(&spec)).expect("planted");
        let prompts = [truth.prompt.clone()];
        let cfg = DetectConfig::default();
        let windows = swk::eval::ppl::windows(&m, &truth.confirm, cfg.confirm_context).unwrap();
        for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
            let mut host = rounded_to(&m, dtype);
            let want = detect_with(&mut host, &prompts, &windows, &cfg, |_, _, _| {}).unwrap();
            let mut g = CudaModel::new(&m, &CudaOptions { dtype, ..Default::default() }).unwrap();
            let before = g.checksum().unwrap();
            let got = detect_with(&mut g, &prompts, &windows, &cfg, |_, _, _| {}).unwrap();
            assert_eq!(g.checksum().unwrap(), before, "seed {seed} {}: restored", dtype.name());
            let tol = if dtype == WeightDtype::Bf16 { 5e-2 } else { 1e-3 };
            for (what, a, b) in [
                ("confirmed", &got.super_weights, &want.super_weights),
                ("rejected", &got.rejected, &want.rejected),
            ] {
                let key = |v: &Vec<swk::detect::SuperWeight>| -> Vec<_> {
                    v.iter()
                        .map(|s| {
                            (
                                s.layer,
                                s.row,
                                s.col,
                                s.iteration,
                                s.token_position,
                                s.output_token_position,
                            )
                        })
                        .collect()
                };
                assert_eq!(key(a), key(b), "seed {seed} {} {what}", dtype.name());
                for (x, y) in a.iter().zip(b.iter()) {
                    assert_eq!(x.value.to_bits(), y.value.to_bits());
                    let (rx, ry) = (x.perplexity_ratio.unwrap(), y.perplexity_ratio.unwrap());
                    assert!((rx / ry - 1.0).abs() <= tol, "ratio {rx} vs cpu {ry}");
                    assert!((x.input_activation / y.input_activation - 1.0).abs() <= tol as f32);
                }
            }
            assert!(!got.super_weights.is_empty(), "the planted super weight is confirmed");
            for p in &truth.super_weights {
                assert!(
                    got.super_weights
                        .iter()
                        .any(|s| (s.layer, s.row, s.col) == (p.layer, p.row, p.col)),
                    "seed {seed} {}: planted {:?} not confirmed on the device",
                    dtype.name(),
                    (p.layer, p.row, p.col)
                );
            }
            eprintln!(
                "detection seed {seed} {}: {} confirmed, {} rejected, baseline ppl {:.4} (cpu {:.4}), {:.3} s (cpu {:.3} s)",
                dtype.name(),
                got.super_weights.len(),
                got.rejected.len(),
                got.baseline_perplexity.unwrap(),
                want.baseline_perplexity.unwrap(),
                got.seconds,
                want.seconds
            );
        }
    }
}

/// Screening on the device (`screen_with`, its candidates from `detected_edits_with` on the
/// device) ranks what the CPU ranks on a planted model: the same raw candidates, the same
/// entries in the same order with the same sources and weight values (f32 weights: bit for
/// bit; bf16: the stored bf16 value), perplexities within 1e-4 (f32) or 5e-2 (bf16, against
/// the CPU on the same bf16-rounded weights), the planted super weight first, and every
/// weight restored (device checksum unchanged).
#[test]
fn screening_matches_cpu_on_a_planted_model() {
    use swk::analysis::screen::{largest_down_proj, screen_with, ScreenConfig};
    use swk::analysis::{detected_config, detected_edits_with};
    if !gpu() {
        return;
    }
    let spec = planted_spec();
    let (m, truth) = planted(&spec, 5, &Plant::standard(&spec)).expect("planted");
    let cfg = ScreenConfig { top_largest: 4, context: 16 };
    let windows = swk::eval::ppl::windows(&m, &truth.confirm, cfg.context).unwrap();
    let largest = largest_down_proj(&m, cfg.top_largest).unwrap();
    let inputs =
        swk::detect::DetectInputs { prompts: vec![truth.prompt.clone()], windows: Vec::new() };
    assert!(detected_config(true).skip_confirmation, "raw candidates need no windows");
    let sw = truth.super_weights[0];
    for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
        let mut host = rounded_to(&m, dtype);
        let cands = detected_edits_with(&mut host, &inputs, true, |_, _, _| {}).unwrap();
        let want = screen_with(&mut host, &windows, &cands, &largest, &cfg, |_, _, _| {}).unwrap();
        let mut g = CudaModel::new(&m, &CudaOptions { dtype, ..Default::default() }).unwrap();
        let before = g.checksum().unwrap();
        let got_cands = detected_edits_with(&mut g, &inputs, true, |_, _, _| {}).unwrap();
        assert_eq!(got_cands, cands, "{}: raw candidates", dtype.name());
        let got = screen_with(&mut g, &windows, &cands, &largest, &cfg, |_, _, _| {}).unwrap();
        assert_eq!(g.checksum().unwrap(), before, "{}: restored", dtype.name());
        let key = |r: &swk::analysis::screen::ScreenReport| -> Vec<_> {
            r.entries
                .iter()
                .map(|e| (e.rank, e.edit.to_string(), e.source, e.value.to_bits()))
                .collect()
        };
        assert_eq!(key(&got), key(&want), "{}: ranking", dtype.name());
        let tol = if dtype == WeightDtype::Bf16 { 5e-2 } else { 1e-4 };
        let rel = |a: f64, b: f64| (a / b - 1.0).abs();
        assert!(rel(got.baseline_perplexity, want.baseline_perplexity) <= tol);
        assert_eq!(got.tokens_scored, want.tokens_scored);
        for (x, y) in got.entries.iter().zip(&want.entries) {
            assert!(rel(x.perplexity, y.perplexity) <= tol, "{}: {x:?} vs {y:?}", dtype.name());
        }
        assert_eq!(got.entries[0].coords, Some((sw.layer, sw.row, sw.col)), "planted first");
        assert!(got.entries[0].ratio > 5.0, "{:?}", got.entries[0]);
        eprintln!(
            "screening {}: {} entries, top ratio {:.2} (cpu {:.2})",
            dtype.name(),
            got.entries.len(),
            got.entries[0].ratio,
            want.entries[0].ratio
        );
    }
}

/// Asserts two JSON values are equal, but for numbers, which may differ by `tol` relative
/// to max(|want|, 1) (`at`: where in the document, for the message).
fn assert_json_close(got: &serde_json::Value, want: &serde_json::Value, tol: f64, at: &str) {
    use serde_json::Value;
    match (got, want) {
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (a.as_f64().unwrap_or(f64::NAN), b.as_f64().unwrap_or(f64::NAN));
            assert!((a - b).abs() <= tol * b.abs().max(1.0), "{at}: {a} vs cpu {b}");
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{at}: lengths");
            for (k, (x, y)) in a.iter().zip(b).enumerate() {
                assert_json_close(x, y, tol, &format!("{at}[{k}]"));
            }
        }
        (Value::Object(a), Value::Object(b)) => {
            let (ka, kb): (Vec<&String>, Vec<&String>) = (a.keys().collect(), b.keys().collect());
            assert_eq!(ka, kb, "{at}: keys");
            for (k, x) in a {
                assert_json_close(x, &b[k], tol, &format!("{at}.{k}"));
            }
        }
        _ => assert_eq!(got, want, "{at}"),
    }
}

/// A research session on the device (`research_on`: every analysis there) records what the
/// CPU session records: the same super weights, screening ranking (ratios within 1e-4),
/// vocabulary KL (1e-3), cascade, trace and the quantization study (every number within
/// 1e-4, the rest equal), greedy continuations and multiple-choice scores (1e-4), says where
/// each analysis ran, and leaves every weight of both models restored.
/// The `swk research --device cuda` CLI names the device in session.json too.
#[test]
fn research_runs_on_the_device() {
    use swk::analysis::research::{research_inputs, research_on, Device, Inputs, ResearchConfig};
    if !gpu() {
        return;
    }
    let spec = planted_spec();
    let (mut m, truth) = planted(&spec, 7, &Plant::standard(&spec)).expect("planted");
    let cfg = ResearchConfig {
        top_largest: 3,
        screen_context: 16,
        max_new_tokens: 4,
        quantize: swk::analysis::quantize::StudyConfig {
            block_sizes: vec![64, 4096],
            context: 32,
            kl_positions: 16,
            ..Default::default()
        },
        ..Default::default()
    };
    let inputs = Inputs {
        prompts: vec![truth.prompt.clone()],
        prompt: truth.prompt.clone(),
        confirm: truth.confirm.clone(),
        text: truth.confirm.clone(),
        vocab_samples: vec![truth.confirm[..24].to_vec()],
        study: vec![],
        mc: ("planted".into(), planted_items(&truth)),
    };
    let dir = tempfile::tempdir().expect("tmp");
    let want = research_inputs(&mut m, "planted", &cfg, &inputs, dir.path(), |_, _, _| {})
        .expect("cpu session");
    let opts = CudaOptions { dtype: WeightDtype::F32, ..Default::default() };
    let mut g = CudaModel::new(&m, &opts).unwrap();
    let (before, host_before) = (g.checksum().unwrap(), m.weights.checksum());
    let device = Device { backend: &mut g, name: "cuda: test", streamed: false };
    let got = research_on(&mut m, Some(device), "planted", &cfg, &inputs, dir.path(), |_, _, _| {})
        .expect("device session");
    assert_eq!((g.checksum().unwrap(), m.weights.checksum()), (before, host_before), "restored");
    assert_eq!(got["errors"], serde_json::json!({}), "{}", got["errors"]);
    for (analysis, on) in got["device"].as_object().expect("device map") {
        assert_eq!(on, "cuda: test", "{analysis}");
    }
    assert_eq!(got["detect"]["device"], "cuda: test");
    let coords = |s: &serde_json::Value, list: &str, key: &str| -> Vec<String> {
        let v = s[list][key].as_array().cloned().unwrap_or_default();
        v.iter().map(|e| format!("{} {} {}", e["layer"], e["row"], e["col"])).collect()
    };
    let found = coords(&got, "detect", "super_weights");
    assert_eq!(found, coords(&want, "detect", "super_weights"), "confirmed");
    let sw = truth.super_weights[0];
    assert_eq!(found[0], format!("{} {} {}", sw.layer, sw.row, sw.col));
    let ranking = |s: &serde_json::Value| -> Vec<(String, f64)> {
        let v = s["screen"]["entries"].as_array().cloned().unwrap_or_default();
        v.iter().map(|e| (e["coords"].to_string(), e["ratio"].as_f64().unwrap_or(0.0))).collect()
    };
    let (a, b) = (ranking(&got), ranking(&want));
    assert!(!a.is_empty());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.0, y.0, "screening ranking");
        assert!((x.1 / y.1 - 1.0).abs() <= 1e-4, "ratio {} vs cpu {}", x.1, y.1);
    }
    let num = |s: &serde_json::Value, path: &[&str]| -> f64 {
        path.iter().fold(s, |v, k| &v[*k]).as_f64().unwrap_or(f64::NAN)
    };
    let (kg, kw) = (num(&got, &["vocab", "mean_kl"]), num(&want, &["vocab", "mean_kl"]));
    assert!(kw > 1.0 && (kg / kw - 1.0).abs() <= 1e-3, "vocab mean KL {kg} vs cpu {kw}");
    let top = |s: &serde_json::Value| s["vocab"]["prob_losers"][0]["id"].clone();
    assert_eq!(top(&got), top(&want), "the token losing most probability");
    let conts = |s: &serde_json::Value| -> Vec<String> {
        let v = s["compare_generate"]["prompts"][0]["continuations"].as_array().cloned();
        v.unwrap_or_default().iter().map(|c| format!("{} {}", c["label"], c["tokens"])).collect()
    };
    assert_eq!(conts(&got), conts(&want), "greedy continuations");
    assert_eq!(got["mc"]["baseline"]["acc"], want["mc"]["baseline"]["acc"]);
    assert_eq!(got["mc"]["edited"]["acc"], want["mc"]["edited"]["acc"]);
    let lps = |s: &serde_json::Value, run: &str| -> Vec<f64> {
        let items = s["mc"][run].as_array().cloned().unwrap_or_default();
        items
            .iter()
            .flat_map(|i| i["logprobs"].as_array().cloned().unwrap_or_default())
            .map(|x| x.as_f64().unwrap_or(f64::NAN))
            .collect()
    };
    for run in ["items_baseline", "items_edited"] {
        let (x, y) = (lps(&got, run), lps(&want, run));
        assert_eq!(x.len(), y.len());
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{run}: {a} vs cpu {b}");
        }
    }
    for analysis in ["trace", "cascade", "quantize_study"] {
        assert!(want[analysis].is_object(), "{analysis} ran on the CPU");
        assert_json_close(&got[analysis], &want[analysis], 1e-4, analysis);
    }
    let massive = &got["cascade"]["summary"][0]["massive_layers_base"];
    assert!(!massive.as_array().is_some_and(Vec::is_empty), "a massive activation: {massive}");

    // The CLI: `--device cuda` on the tiny fixture names the device in session.json.
    let llama = fixtures_root().join("tiny").join("llama");
    let out = dir.path().join("cli");
    let o = out.to_string_lossy().to_string();
    let more = ["--out", o.as_str(), "--threshold", "1", "--skip", "vocab,cascade,trace"];
    let skip = ["--skip", "compare-generate,quantize-study", "--json"];
    let more: Vec<&str> = more.iter().chain(&skip).copied().collect();
    swk_json(&["--device", "cuda", "research"], &llama, &more);
    let text = std::fs::read_to_string(out.join("session.json")).expect("session.json");
    let s: serde_json::Value = serde_json::from_str(&text).expect("json");
    let on = s["device"]["detect"].as_str().unwrap_or_default();
    assert!(on.starts_with("cuda"), "{}", s["device"]);
    assert_eq!(s["device"]["cascade"], on, "cascade runs on the device too");
    assert_eq!(s["device"]["quantize-study"], on, "layers resident: quantize-study too");
}

/// Cascade and trace on a bf16 device equal the CPU's on the same bf16-rounded weights: the
/// planted super weight's stored value exactly, the spike token and the layers where its
/// massive activation lives, every number within 1e-2 (bf16 weights, f32 activations); the
/// edited cascade leaves the device's weights restored.
#[test]
fn cascade_and_trace_match_cpu_with_bf16_weights() {
    use swk::analysis::{cascade, token_label, trace};
    if !gpu() {
        return;
    }
    let spec = planted_spec();
    let (m, truth) = planted(&spec, 11, &Plant::standard(&spec)).expect("planted");
    let mut rounded = rounded_to_bf16(&m);
    let mut g = CudaModel::new(&m, &CudaOptions::default()).unwrap();
    let before = g.checksum().unwrap();
    let tokens = &truth.prompt;
    let labels: Vec<String> = tokens.iter().map(|&t| token_label(&m, t)).collect();
    let sw = truth.super_weights[0];
    let edit = WeightEdit::down_proj(sw.layer, sw.row, sw.col, EditOp::Zero);
    let cfg = cascade::CascadeConfig::default();
    let want = cascade::cascade(&mut rounded, tokens, std::slice::from_ref(&edit), &cfg).unwrap();
    let got = cascade::cascade_with(&mut g, tokens, &labels, &[edit], &cfg).unwrap();
    assert_eq!(g.checksum().unwrap(), before, "restored");
    assert!(!want.summary[0].massive_layers_base.is_empty(), "a massive activation");
    let (gj, wj) = (serde_json::to_value(&got).unwrap(), serde_json::to_value(&want).unwrap());
    assert_json_close(&gj, &wj, 1e-2, "cascade");
    let want = trace::trace(&rounded, tokens, sw.layer, sw.row, sw.col).unwrap();
    let got = trace::trace_with(&g, tokens, &labels, (sw.layer, sw.row, sw.col)).unwrap();
    assert_eq!(got.weight.to_bits(), want.weight.to_bits(), "the stored bf16 value");
    assert_eq!(got.spike_position, want.spike_position);
    let (gj, wj) = (serde_json::to_value(&got).unwrap(), serde_json::to_value(&want).unwrap());
    assert_json_close(&gj, &wj, 1e-2, "trace");
}

/// The quantization study on the device (`quantize_study_with`: tensors read from the
/// device, quantized on the host, written back whole) equals the CPU's: with f32 weights the
/// same quantization statistics and perplexities and KLs within 1e-4; with bf16 weights the
/// same statistics as the CPU on the bf16-rounded weights (the inputs are the stored values)
/// and perplexities within 2e-2 (the quantized values are rounded to bf16 again as they are
/// stored). Every device weight comes back, also when a variant fails halfway.
#[test]
fn quantize_study_matches_cpu() {
    use swk::analysis::quantize::{
        linear_tensors, quantize_study, quantize_study_with, StudyConfig,
    };
    if !gpu() {
        return;
    }
    let spec = planted_spec();
    let (m, truth) = planted(&spec, 5, &Plant::standard(&spec)).expect("planted");
    let sw = truth.super_weights[0];
    let held = [WeightEdit::down_proj(sw.layer, sw.row, sw.col, EditOp::Zero)];
    let cfg = StudyConfig {
        bits: 3,
        block_sizes: vec![64, 4096],
        clip_z: Some(3.0),
        context: 32,
        only: None,
        kl_positions: 16,
    };
    let tensors = linear_tensors(&m, None);
    for (dtype, tol) in [(WeightDtype::F32, 1e-4), (WeightDtype::Bf16, 2e-2)] {
        let mut host = if dtype == WeightDtype::F32 { copy(&m) } else { rounded_to_bf16(&m) };
        let want = quantize_study(&mut host, &truth.confirm, &held, &cfg, |_, _, _| {}).unwrap();
        let mut g = CudaModel::new(&m, &CudaOptions { dtype, ..Default::default() }).unwrap();
        let before = g.checksum().unwrap();
        let windows = swk::eval::ppl::windows(&m, &truth.confirm, cfg.context).unwrap();
        let got =
            quantize_study_with(&mut g, &windows, &tensors, &held, &cfg, |_, _, _| {}).unwrap();
        assert_eq!(g.checksum().unwrap(), before, "{dtype:?}: restored");
        assert_eq!(got.tokens_scored, want.tokens_scored);
        let close = |a: f64, b: f64, tol: f64| (a - b).abs() <= tol * b.abs().max(1.0);
        assert!(close(got.baseline_perplexity, want.baseline_perplexity, tol));
        for (gr, wr) in got.rows.iter().zip(&want.rows) {
            for (gv, wv) in gr.variants.iter().zip(&wr.variants) {
                let at = format!("{dtype:?} block {} {}", gr.block_size, gv.name);
                let (gs, ws) = (&gv.stats, &wv.stats);
                assert_eq!(
                    (gs.tensors, gs.weights, gs.held_out, gs.clipped),
                    (ws.tensors, ws.weights, ws.held_out, ws.clipped),
                    "{at}"
                );
                assert!(close(gs.mse, ws.mse, 1e-9), "{at}: mse {} vs {}", gs.mse, ws.mse);
                eprintln!("{at}: ppl {:.4} vs cpu {:.4}", gv.perplexity, wv.perplexity);
                assert!(close(gv.perplexity, wv.perplexity, tol), "{at}");
                let (gk, wk) = (gv.mean_kl.unwrap_or(f64::NAN), wv.mean_kl.unwrap_or(f64::NAN));
                assert!((gk - wk).abs() <= tol.max(1e-3) * wk.max(1e-2), "{at}: KL {gk} vs {wk}");
            }
        }
        // A tensor the device lacks, after real ones: the variant fails, every tensor comes
        // back.
        let mut bad = tensors.clone();
        bad.push("model.layers.0.mlp.no_such.weight".into());
        let e = quantize_study_with(&mut g, &windows, &bad, &held, &cfg, |_, _, _| {});
        assert!(e.unwrap_err().to_string().contains("no_such"));
        assert_eq!(g.checksum().unwrap(), before, "{dtype:?}: restored after an error");
    }
}

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

/// Group screening on the device (`groups_with`: activations captured, writers read and
/// ablations run there) finds the planted three-member group as the CPU does: the same activations,
/// members, verdicts and minimal subsets, every ratio within 1e-4 (f32 weights), the same
/// number of perplexity runs, and every device weight restored.
#[test]
fn groups_match_cpu_on_a_planted_group() {
    use swk::analysis::groups::{groups, groups_with, GroupsConfig, Verdict};
    use swk::synth::{planted_group, PlantSite, SynthSpec};
    if !gpu() {
        return;
    }
    let spec = SynthSpec { layers: 5, ..SynthSpec::tiny() };
    let (h, i) = (spec.hidden, spec.intermediate);
    let row = h * 3 / 8 + 1;
    let site = |layer, col| PlantSite { layer, row, col, activation: -300.0, weight: 1.5 };
    let members = [site(1, i / 5 + 3), site(2, i / 2 + 1), site(3, i * 4 / 5 + 2)];
    let (mut m, truth) = planted_group(&spec, 5, &members, 4).unwrap();
    let cfg = GroupsConfig { context: truth.confirm.len(), ..Default::default() };
    let prompts = std::slice::from_ref(&truth.prompt);
    let want = groups(&mut m, prompts, &truth.confirm, &cfg, |_, _, _| {}).unwrap();
    let windows = swk::eval::ppl::windows(&m, &truth.confirm, cfg.context).unwrap();
    let opts = CudaOptions { dtype: WeightDtype::F32, ..Default::default() };
    let mut g = CudaModel::new(&m, &opts).unwrap();
    let before = g.checksum().unwrap();
    let got = groups_with(&mut g, prompts, &windows, &cfg, |_, _, _| {}).unwrap();
    assert_eq!(g.checksum().unwrap(), before, "restored");
    assert_eq!(got.groups, want.groups);
    assert_eq!(got.perplexity_runs, want.perplexity_runs);
    let rel = |a: f64, b: f64| (a / b - 1.0).abs();
    assert!(rel(got.baseline_perplexity, want.baseline_perplexity) <= 1e-4);
    assert_eq!(got.activations.len(), want.activations.len());
    for (x, y) in got.activations.iter().zip(&want.activations) {
        assert_eq!((x.activation.dim, x.verdict), (y.activation.dim, y.verdict));
        let coords = |a: &swk::analysis::groups::ActivationGroup| -> Vec<_> {
            a.members.iter().map(|m| (m.layer, m.row, m.col)).collect()
        };
        assert_eq!(coords(x), coords(y), "dim {}", x.activation.dim);
        for (a, b) in x.members.iter().zip(&y.members) {
            assert!(rel(a.single_ratio, b.single_ratio) <= 1e-4, "{a:?} vs {b:?}");
        }
        if let (Some(a), Some(b)) = (x.joint_ratio, y.joint_ratio) {
            assert!(rel(a, b) <= 1e-4, "joint {a} vs cpu {b}");
        }
        let minimal = |a: &swk::analysis::groups::ActivationGroup| {
            a.minimal.as_ref().map(|m| m.members.clone())
        };
        assert_eq!(minimal(x), minimal(y));
    }
    assert!(got.activations.iter().any(|a| a.activation.dim == row && a.verdict == Verdict::Group));
}

/// Multiple-choice items the planted super weight decides (its likely tokens against
/// unlikely ones), with multi-token continuations so the device's forked caches are used.
fn planted_items(truth: &swk::synth::PlantTruth) -> Vec<swk::eval::choice::TokenItem> {
    let likely = &truth.likely_tokens[0];
    let unlikely: Vec<u32> =
        (1..320).filter(|t| !likely.contains(t) && *t != truth.bos).take(3).collect();
    (0..3)
        .map(|k| swk::eval::choice::TokenItem {
            context: truth.confirm[..4 + k].to_vec(),
            continuations: vec![vec![likely[k % likely.len()], likely[0]], unlikely.clone()],
            lengths: vec![2, 3],
            label: 0,
        })
        .collect()
}

/// A super weight and a decoy planted ([`swk::synth::families::plant_arch`]) into the tiny
/// fixture of every family the device runs, as `tests/planted_arch.rs` plants them: detection
/// on the device confirms the super weight and rejects the decoy, as the CPU does, with the
/// same coordinates, token positions and weight value, and perplexity ratios within 1e-3
/// (f32 weights), and leaves the weights bit-identical.
#[test]
fn detection_matches_cpu_on_planted_families() {
    if !gpu() {
        return;
    }
    use swk::synth::families::{plant_arch, ArchPlant};
    use swk::synth::PlantSite;
    let names = [
        "gemma", "gemma2", "gemma3", "gpt2", "gpt_neox", "mistral", "olmo", "olmo2", "phi3",
        "qwen2", "qwen3",
    ];
    for name in names {
        let (m, _) = load(name);
        // GELU (un-gated) MLPs only make positive massive activations.
        let sign = if m.config.architecture.gated_mlp() { -1.0 } else { 1.0 };
        let site = PlantSite {
            layer: 0,
            row: 17,
            col: 101,
            activation: 900.0 * sign,
            weight: -1.5 * sign,
        };
        let decoy = PlantSite { layer: 1, row: 40, col: 60, activation: 600.0 * sign, weight: 1.0 };
        let plant = ArchPlant { decoy: Some(decoy), ..ArchPlant::single(site) };
        let (mut m, truth) = plant_arch(m, 7, &plant).unwrap();
        let cfg = DetectConfig::default();
        let windows = swk::eval::ppl::windows(&m, &truth.confirm, truth.confirm.len()).unwrap();
        let prompts = [truth.prompt.clone()];
        let want = detect_with(&mut m, &prompts, &windows, &cfg, |_, _, _| {}).unwrap();
        let opts = CudaOptions { dtype: WeightDtype::F32, ..Default::default() };
        let mut g = CudaModel::new(&m, &opts).unwrap();
        let before = g.checksum().unwrap();
        let got = detect_with(&mut g, &prompts, &windows, &cfg, |_, _, _| {}).unwrap();
        assert_eq!(g.checksum().unwrap(), before, "{name}: restored");
        let key = |v: &[swk::detect::SuperWeight]| -> Vec<_> {
            v.iter().map(|s| (s.layer, s.row, s.col, s.token_position, s.value.to_bits())).collect()
        };
        assert_eq!(key(&got.super_weights), key(&want.super_weights), "{name}: confirmed");
        assert_eq!(key(&got.rejected), key(&want.rejected), "{name}: rejected");
        let coords: Vec<_> = got.super_weights.iter().map(|s| (s.layer, s.row, s.col)).collect();
        assert_eq!(coords, [(0, 17, 101)], "{name}: the planted weight is confirmed");
        let rejected: Vec<_> = got.rejected.iter().map(|s| (s.layer, s.row, s.col)).collect();
        assert_eq!(rejected, [(1, 40, 60)], "{name}: the decoy is rejected");
        for (x, y) in got
            .super_weights
            .iter()
            .chain(&got.rejected)
            .zip(want.super_weights.iter().chain(&want.rejected))
        {
            let (a, b) = (x.perplexity_ratio.unwrap(), y.perplexity_ratio.unwrap());
            assert!((a / b - 1.0).abs() <= 1e-3, "{name}: ratio {a} vs cpu {b}");
        }
        eprintln!(
            "planted {name}: confirmed {coords:?} ratio {:.2} (cpu {:.2}), decoy ratio {:.3}",
            got.super_weights[0].perplexity_ratio.unwrap(),
            want.super_weights[0].perplexity_ratio.unwrap(),
            got.rejected[0].perplexity_ratio.unwrap()
        );
    }
}

/// A synthetic mixture of experts with a planted super expert ([`swk::synth::planted_moe`]):
/// detection on the device names the planted weight inside its expert, as the CPU does
/// (same coordinates, expert, positions and value; perplexity ratios within 1e-3 for f32
/// weights), the per-expert statistics agree, and the weights come back bit-identical.
#[test]
fn detection_matches_cpu_on_a_planted_super_expert() {
    if !gpu() {
        return;
    }
    let spec = planted_spec();
    let plant = Plant::standard(&spec);
    let (m, truth, site) = swk::synth::planted_moe(&spec, 11, &plant, 4, 2, 1).unwrap();
    let cfg = DetectConfig::default();
    let windows = swk::eval::ppl::windows(&m, &truth.confirm, cfg.confirm_context).unwrap();
    let prompts = [truth.prompt.clone()];
    let want = detect_with(&mut copy(&m), &prompts, &windows, &cfg, |_, _, _| {}).unwrap();
    let opts = CudaOptions { dtype: WeightDtype::F32, ..Default::default() };
    let mut g = CudaModel::new(&m, &opts).unwrap();
    assert!(!g.graphs(), "a mixture of experts routes on the host: no graphs");
    let stats = (device_stats(&g, &truth.prompt), cpu_stats(&m, &truth.prompt));
    assert_stats_match("planted moe", &stats.0, &stats.1);
    let before = g.checksum().unwrap();
    let got = detect_with(&mut g, &prompts, &windows, &cfg, |_, _, _| {}).unwrap();
    assert_eq!(g.checksum().unwrap(), before, "restored");
    let key = |v: &[swk::detect::SuperWeight]| -> Vec<_> {
        v.iter()
            .map(|s| (s.layer, s.expert, s.row, s.col, s.token_position, s.value.to_bits()))
            .collect()
    };
    assert_eq!(key(&got.super_weights), key(&want.super_weights), "confirmed");
    assert_eq!(key(&got.rejected), key(&want.rejected), "rejected");
    let sw = truth.super_weights[0];
    let planted = (sw.layer, Some(site.expert), sw.row, sw.col);
    assert!(
        got.super_weights.iter().any(|s| (s.layer, s.expert, s.row, s.col) == planted),
        "the planted weight {planted:?} is confirmed: {:?}",
        key(&got.super_weights)
    );
    for (x, y) in got.super_weights.iter().zip(&want.super_weights) {
        let (a, b) = (x.perplexity_ratio.unwrap(), y.perplexity_ratio.unwrap());
        assert!((a / b - 1.0).abs() <= 1e-3, "ratio {a} vs cpu {b}");
    }
    eprintln!(
        "planted super expert: confirmed {:?}, ratio {:.2} (cpu {:.2})",
        key(&got.super_weights),
        got.super_weights[0].perplexity_ratio.unwrap(),
        want.super_weights[0].perplexity_ratio.unwrap()
    );
}

/// `swk::analysis::experts` on the device (router statistics merged over samples, super
/// experts, ablation of a whole expert through batched device edits) reports what the CPU
/// reports on a planted super expert: the same routing counts, the same per-expert maxima
/// (channels, positions, values), the same super experts, ablation perplexities within 1e-3
/// (f32 weights); and the weights come back bit-identical.
#[test]
fn experts_match_cpu_on_a_planted_super_expert() {
    use swk::analysis::experts::{experts_with, ExpertsConfig};
    if !gpu() {
        return;
    }
    let spec = planted_spec();
    let plant = Plant::standard(&spec);
    let (m, truth, site) = swk::synth::planted_moe(&spec, 11, &plant, 4, 2, 1).unwrap();
    let cfg = ExpertsConfig { context: 16, ..Default::default() };
    let windows = swk::eval::ppl::windows(&m, &truth.confirm, cfg.context).unwrap();
    let samples =
        [truth.prompt.clone(), truth.confirm[..20].to_vec(), truth.confirm[20..].to_vec()];
    let want = experts_with(&mut copy(&m), &samples, &windows, &cfg, |_, _, _| {}).unwrap();
    let opts = CudaOptions { dtype: WeightDtype::F32, ..Default::default() };
    let mut g = CudaModel::new(&m, &opts).unwrap();
    let before = g.checksum().unwrap();
    let got = experts_with(&mut g, &samples, &windows, &cfg, |_, _, _| {}).unwrap();
    assert_eq!(g.checksum().unwrap(), before, "restored");
    let routing = |r: &swk::analysis::experts::ExpertsReport| -> Vec<_> {
        r.experts
            .iter()
            .map(|e| {
                let ins = (
                    e.max_input_col,
                    e.max_input_position,
                    e.max_output_row,
                    e.max_output_position,
                );
                (e.layer, e.expert, e.selected, ins)
            })
            .collect()
    };
    assert_eq!(routing(&got), routing(&want), "routing and spike channels");
    for (x, y) in got.experts.iter().zip(&want.experts) {
        assert!((x.mean_weight - y.mean_weight).abs() <= 1e-5, "{x:?} vs {y:?}");
        assert!((x.max_output - y.max_output).abs() <= 1e-4 * y.max_output.abs(), "{x:?} vs {y:?}");
        assert!((x.max_input - y.max_input).abs() <= 1e-4 * y.max_input.abs(), "{x:?} vs {y:?}");
    }
    let supers = |r: &swk::analysis::experts::ExpertsReport| -> Vec<_> {
        r.super_experts.iter().map(|s| (s.layer, s.expert, s.max_output_row)).collect()
    };
    assert_eq!(supers(&got), supers(&want));
    assert!(supers(&got).iter().any(|&(l, e, _)| (l, e) == (site.layer, site.expert)));
    let (a, b) = (got.baseline_perplexity.unwrap(), want.baseline_perplexity.unwrap());
    assert!((a / b - 1.0).abs() <= 1e-4, "baseline {a} vs cpu {b}");
    for (x, y) in got.super_experts.iter().zip(&want.super_experts) {
        let (a, b) = (x.ablated_perplexity.unwrap(), y.ablated_perplexity.unwrap());
        assert!((a / b - 1.0).abs() <= 1e-3, "ablated {a} vs cpu {b}");
    }
    let top = &got.super_experts[0];
    eprintln!(
        "experts on the device: super expert layer {} expert {}, ablated ppl x {:.2} (cpu x {:.2})",
        top.layer,
        top.expert,
        top.perplexity_ratio.unwrap(),
        want.super_experts[0].perplexity_ratio.unwrap()
    );
}

/// One pass's spike statistics on the device.
fn device_stats(g: &CudaModel, tokens: &[u32]) -> SpikeStats {
    let c = g.config();
    let mut s = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
    g.forward(tokens, &mut CudaKvCache::new(g), Some(&mut s), Logits::None).unwrap();
    s
}

/// CUDA graphs ([`CudaModel::set_graphs`]) replay the normal passes: spike positions equal and
/// values within 1e-5, confirmation NLL within 1e-9 (bit-identity is reported, not required:
/// cuBLAS may pick another algorithm under capture), in-place edits seen by the replays, and
/// the same detection on a planted model, with every engine (on the emulator,
/// [`engines_brief`]). A failed capture fails this test (with its reason).
#[test]
fn graph_replays_equal_normal_passes() {
    if !gpu() {
        return;
    }
    use swk::detect::DetectBackend;
    let spec = planted_spec();
    let (m, truth) = planted(&spec, 3, &Plant::standard(&spec)).expect("planted");
    let cfg = DetectConfig::default();
    let windows = swk::eval::ppl::windows(&m, &truth.confirm, cfg.confirm_context).unwrap();
    let c = m.config.clone();
    let new_stats = || SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
    for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
        for gemm in engines_brief(dtype) {
            let opts = CudaOptions { dtype, gemm, ..Default::default() };
            let mut g = CudaModel::new(&m, &opts).unwrap();
            let (mut plain, mut graphed) = (new_stats(), new_stats());
            g.spike_stats(&truth.prompt, &mut plain).unwrap();
            let p_plain = g.perplexity(&windows, 0, |_, _| {}).unwrap();
            g.set_graphs(true);
            for _ in 0..2 {
                g.spike_stats(&truth.prompt, &mut graphed).unwrap();
            }
            let p_graph = g.perplexity(&windows, 0, |_, _| {}).unwrap();
            assert_eq!(g.graph_error(), None, "{} {}", dtype.name(), gemm.name());
            assert!(g.graphs());
            // Same kernels on the same bits: identical unless cuBLAS picks another algorithm
            // under capture, so positions must match and values agree to 1e-5.
            let mut identical = true;
            for (a, b) in plain.layers.iter().zip(&graphed.layers) {
                for (x, y) in a.input.iter().chain(&a.output).zip(b.input.iter().chain(&b.output)) {
                    assert_eq!(x.position, y.position, "{} {}", dtype.name(), gemm.name());
                    assert!((x.value - y.value).abs() <= 1e-5 * y.value.abs().max(1.0));
                    identical &= x.value.to_bits() == y.value.to_bits();
                }
            }
            assert!((p_plain.nll_sum / p_graph.nll_sum - 1.0).abs() <= 1e-9, "{}", gemm.name());
            identical &= p_plain.nll_sum.to_bits() == p_graph.nll_sum.to_bits();
            // An in-place edit is seen by the replays (graphs read weights by address).
            let sw = &truth.super_weights[0];
            let edit = [WeightEdit::down_proj(sw.layer, sw.row, sw.col, EditOp::Zero)];
            let edited =
                swk::edit::with_edits(&mut g, &edit, |g| g.perplexity(&windows, 0, |_, _| {}))
                    .unwrap();
            g.set_graphs(false);
            let edited_plain =
                swk::edit::with_edits(&mut g, &edit, |g| g.perplexity(&windows, 0, |_, _| {}))
                    .unwrap();
            assert!((edited.nll_sum / edited_plain.nll_sum - 1.0).abs() <= 1e-9);
            assert!(edited.perplexity > 2.0 * p_plain.perplexity, "the planted weight matters");
            // Detection with graphs finds what it finds without.
            let prompts = [truth.prompt.clone()];
            let want = detect_with(&mut g, &prompts, &windows, &cfg, |_, _, _| {}).unwrap();
            g.set_graphs(true);
            let got = detect_with(&mut g, &prompts, &windows, &cfg, |_, _, _| {}).unwrap();
            let key = |v: &[swk::detect::SuperWeight]| -> Vec<_> {
                v.iter().map(|x| (x.layer, x.row, x.col, x.iteration)).collect()
            };
            assert_eq!(key(&got.super_weights), key(&want.super_weights));
            assert_eq!(key(&got.rejected), key(&want.rejected));
            for (x, y) in got.super_weights.iter().zip(&want.super_weights) {
                let (a, b) = (x.perplexity_ratio.unwrap(), y.perplexity_ratio.unwrap());
                assert!((a / b - 1.0).abs() <= 1e-6, "ratio {a} vs {b}");
            }
            eprintln!(
                "graphs {} {}: {}; detection {:.3} s (without graphs {:.3} s)",
                dtype.name(),
                gemm.name(),
                if identical { "bit-identical" } else { "within tolerance" },
                got.seconds,
                want.seconds
            );
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
    let root = fixtures_root().join("tiny");
    let mut sources: Vec<(String, PathBuf)> =
        // Safetensors checkpoints renamed at load (Gemma 3 multimodal, GPT-2, GPT-NeoX) are
        // refused by LazyModel (with a clear error); their GGUF files stream below.
        FIXTURES
            .iter()
            .filter(|n| !["gemma3", "gpt2", "gpt_neox", "gpt_neox_seq"].contains(n))
            .filter(|n| !load(n).0.config.architecture.is_moe())
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
    // Mixtures of experts stream from GGUF (their safetensors names are rewritten at load).
    // DeepSeek-V3's GGUF splits kv_b_proj (llama.cpp's attn_k_b/attn_v_b): it loads whole
    // only; V2's streams.
    for moe in
        ["mixtral_gguf", "olmoe_gguf", "qwen2_moe_gguf", "qwen3_moe_gguf", "deepseek_v2_gguf"]
    {
        sources.push((moe.into(), root.join(moe).join("model.gguf")));
    }
    for (name, path) in sources {
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

/// Run the `swk` binary ($SWK_BIN on the GPU machine: scripts/gpu-check.sh carries the binary
/// built here) and parse its `--json` output.
/// The `swk` binary: `$SWK_BIN` (on the GPU machine), else the one cargo built.
fn swk_bin() -> PathBuf {
    std::env::var_os("SWK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_swk")))
}

fn swk_json(args: &[&str], model: &std::path::Path, more: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(swk_bin())
        .args(args)
        .arg(model)
        .args(more)
        .output()
        .expect("run swk");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} {}: {stderr}", model.display());
    serde_json::from_slice(&out.stdout).expect("json report")
}

/// The `swk` binary on the device: `detect --device cuda` on a mixture of experts loads a
/// safetensors checkpoint whole (the streaming decision needs only its config; LazyModel
/// cannot stream these renamed checkpoints) and streams its GGUF with `--stream always`;
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
    let runs: [(&str, PathBuf); 2] = [
        ("auto", root.join("qwen2_moe")),
        ("always", root.join("mixtral_gguf").join("model.gguf")),
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

/// Under the emulator, every kernel gives bit-identical logits (prefill and a decode step) and
/// spike statistics when the threads of each block and the blocks of each grid run in reverse
/// order ([`swk::backend::cuda::emulate_in_reverse`]): a difference would be a race on a GPU
/// (threads exchanging data without a barrier, or blocks through memory). Skipped on a GPU.
#[test]
fn kernels_do_not_depend_on_thread_order() {
    if !gpu() {
        return;
    }
    if !swk::backend::cuda::EMULATED {
        eprintln!("SKIPPED: thread order is fixed only on the emulator");
        return;
    }
    struct Reverse;
    impl Drop for Reverse {
        fn drop(&mut self) {
            swk::backend::cuda::emulate_in_reverse(false);
        }
    }
    // Tile GEMMs and GEMVs (own kernels), block reductions (norms, attention), warp
    // shuffles, the MoE and MLA kernels.
    for name in ["llama", "gemma2", "gpt2", "olmo2", "phi3", "qwen2_moe", "deepseek_v2"] {
        let (m, tokens) = load(name);
        for gemm in [GemmEngine::Kernels, GemmEngine::Cublas] {
            let opts = CudaOptions { dtype: WeightDtype::Bf16, gemm, ..Default::default() };
            let g = CudaModel::new(&m, &opts).unwrap();
            let run = || {
                let c = &m.config;
                let mut stats = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
                let mut cache = CudaKvCache::new(&g);
                let mut out =
                    g.forward(&tokens, &mut cache, Some(&mut stats), Logits::All).unwrap();
                out.extend(g.forward(&tokens[..1], &mut cache, None, Logits::Last).unwrap());
                let bits: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                (bits, serde_json::to_string(&stats).unwrap())
            };
            let forward = run();
            let reverse = {
                let _undo = Reverse;
                assert!(swk::backend::cuda::emulate_in_reverse(true));
                run()
            };
            let ctx = format!("{name} {}", gemm.name());
            assert!(forward.0 == reverse.0, "{ctx}: logits depend on the thread order");
            assert!(forward.1 == reverse.1, "{ctx}: statistics depend on the thread order");
        }
    }
}

/// Errors, not panics, for bad input.
#[test]
fn bad_input_is_an_error() {
    if !gpu() {
        return;
    }
    let (m, _) = load("llama");
    let g = CudaModel::new(&m, &CudaOptions::default()).unwrap();
    let mut cache = CudaKvCache::new(&g);
    assert!(g.forward(&[100_000], &mut cache, None, Logits::All).is_err());
    assert!(g.forward(&[], &mut cache, None, Logits::All).unwrap().is_empty());
    let mut wrong = SpikeStats::new(1, 3, 3);
    assert!(g.forward(&[1], &mut cache, Some(&mut wrong), Logits::All).is_err());
    let other = CudaModel::new(&m, &CudaOptions::default()).unwrap();
    assert!(other.forward(&[1], &mut cache, None, Logits::All).is_err(), "cache of another model");
    let f32_model =
        CudaModel::new(&m, &CudaOptions { dtype: WeightDtype::F32, ..Default::default() }).unwrap();
    if cublas_present() {
        let mut f = f32_model;
        assert!(f.set_gemm(GemmEngine::CublasBf16).is_err(), "cublas-bf16 needs bf16 weights");
        assert!(f.set_gemm(GemmEngine::CublasSplit).is_err(), "cublas-split needs bf16 weights");
    }
    let e = CudaModel::new(
        &m,
        &CudaOptions { dtype: WeightDtype::F32, gemm: GemmEngine::Mma, ..Default::default() },
    );
    let e = e.err().expect("mma refuses f32 weights").to_string();
    assert!(e.contains("`mma` needs bf16 or f16 weights"), "{e}");
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Timing at Llama-2-7B shapes (random weights generated on the device; bf16, f32, then f16
/// with swk's kernels; `cublas-split` as it runs (split and sum fused, q/k/v and gate/up
/// grouped), then ungrouped, then unfused). Writes a Markdown table to stderr and, row by row (so a partial run
/// still leaves its rows), to `$SWK_TIMING_OUT` when set. Accuracy between engines is reported, never asserted: this
/// test measures; the parity tests above judge.
#[test]
#[ignore = "GPU timing at 7B shapes: run with --ignored on a GPU machine"]
fn timing_7b() -> Result<()> {
    if !gpu() || emulated() {
        return Ok(());
    }
    let out = std::env::var_os("SWK_TIMING_OUT").map(PathBuf::from);
    let mut table = String::new();
    let mut emit = |line: String| -> Result<()> {
        eprintln!("{line}");
        table.push_str(&line);
        table.push('\n');
        if let Some(p) = &out {
            std::fs::write(p, &table).map_err(|e| swk::Error::io(p.clone(), e))?;
        }
        Ok(())
    };
    let config = SynthSpec::llama2_7b().config()?;
    let prompt: Vec<u32> = (0..512u32).map(|i| (i * 7919 + 1) % 32000).collect();
    let dev = swk::backend::cuda::CudaDevice::new(0)?;
    let copy_rate = dev.measure_copy_rate(2 << 30, 10)?;
    let gemm_rate = if cublas_present() { dev.measure_bf16_gemm_rate(8192, 10)? } else { 0.0 };
    drop(dev);
    emit(format!("Llama-2-7B shapes, random weights; {}\n", device_info()?.replace('\n', "; ")))?;
    emit(format!(
        "Measured: device-to-device copy {:.0} GB/s (bytes read + written); cuBLAS bf16 GEMM 8192³ {:.0} TFLOP/s.\n",
        copy_rate / 1e9,
        gemm_rate / 1e12
    ))?;
    emit("| weights | gemm | fill s | prefill 512 ms | prefill tok/s | prefill+stats ms | decode ms/tok (ctx 512) | checksum ms | edit+restore ms | last-row logits vs first engine (max rel err) |".into())?;
    emit("|---|---|---|---|---|---|---|---|---|---|".into())?;
    // Linear-layer FLOPs per token (2 per weight of every matrix the tokens pass through).
    let c = &config;
    let per_layer = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        + c.num_heads * c.head_dim * c.hidden_size
        + 3 * c.hidden_size * c.intermediate_size;
    let linear_flops = 2.0 * (per_layer * c.num_layers + c.hidden_size * c.vocab_size) as f64;
    let mut roofline = Vec::new();
    for dtype in [WeightDtype::Bf16, WeightDtype::F32, WeightDtype::F16] {
        let t0 = Instant::now();
        let mut g =
            match CudaModel::random(&config, 1, &CudaOptions { dtype, ..Default::default() }) {
                Ok(g) => g,
                Err(e) => {
                    emit(format!("| {} | - | skipped: {e} | | | | | | | |", dtype.name()))?;
                    continue;
                }
            };
        let fill = t0.elapsed().as_secs_f64();
        let floor_ms = g.weight_bytes() as f64 / copy_rate * 1e3;
        let mut reference: Option<Vec<f32>> = None;
        // f16: swk's kernels, its default (cuBLAS would widen every weight on every pass), and
        // the tensor-core engine.
        let gemms = if dtype == WeightDtype::F16 {
            vec![GemmEngine::Kernels, GemmEngine::Mma]
        } else {
            engines(dtype)
        };
        // cublas-split also with a product per weight, and with its split and sum unfused (a
        // launch per step): the baselines of the grouped products and the fused launches.
        // (fused split, grouped products, label)
        let split_runs = [(true, false, " ungrouped"), (false, false, " unfused")];
        let runs = gemms.into_iter().flat_map(|gemm| {
            let more = if gemm == GemmEngine::CublasSplit { &split_runs[..] } else { &[] };
            std::iter::once((gemm, (true, true, ""))).chain(more.iter().map(move |r| (gemm, *r)))
        });
        for (gemm, (fused, grouped, label)) in runs {
            g.set_gemm(gemm)?;
            g.set_fused_launches(fused);
            g.set_grouped_products(grouped);
            let engine = format!("{}{label}", gemm.name());
            let mut cache = CudaKvCache::new(&g);
            g.forward(&prompt[..16], &mut cache, None, Logits::Last)?; // warm-up
            cache.clear();
            let t = Instant::now();
            let last = g.forward(&prompt, &mut cache, None, Logits::Last)?;
            let prefill = ms(t);
            let agree = match &reference {
                None => {
                    reference = Some(last.clone());
                    "(reference)".to_string()
                }
                Some(r) => format!("{:.2e}", max_rel_err(&last, r, 1.0)),
            };
            let n_dec = 32;
            let t = Instant::now();
            for k in 0..n_dec {
                g.forward(&[(k * 13 + 5) as u32], &mut cache, None, Logits::Last)?;
            }
            let decode = ms(t) / n_dec as f64;
            let mut stats =
                SpikeStats::new(config.num_layers, config.intermediate_size, config.hidden_size);
            let t = Instant::now();
            g.forward(&prompt, &mut CudaKvCache::new(&g), Some(&mut stats), Logits::None)?;
            g.synchronize()?;
            let with_stats = ms(t);
            // Detection forward: the paper's 9-token prompt with spike statistics, no logits;
            // best of 5 (and without statistics, for the hook overhead).
            let mut best = |with: bool| -> Result<f64> {
                let mut b = f64::INFINITY;
                for _ in 0..5 {
                    let t = Instant::now();
                    let s = if with { Some(&mut stats) } else { None };
                    g.forward(&prompt[..9], &mut CudaKvCache::new(&g), s, Logits::None)?;
                    g.synchronize()?;
                    b = b.min(ms(t));
                }
                Ok(b)
            };
            let det = best(true)?;
            let det_plain = best(false)?;
            // The same detection pass replayed from a CUDA graph (captured on the first call).
            g.set_graphs(true);
            let mut det_graph = f64::INFINITY;
            for _ in 0..6 {
                let t = Instant::now();
                swk::detect::DetectBackend::spike_stats(&g, &prompt[..9], &mut stats)?;
                g.synchronize()?;
                det_graph = det_graph.min(ms(t));
            }
            let graph_note = match g.graph_error() {
                Some(e) => format!("graph failed: {e}"),
                None => format!("{det_graph:.2} ({:.2}×)", det_graph / floor_ms),
            };
            g.set_graphs(false);
            // Perplexity throughput: one 512-token window scored on the device, best of 3.
            let mut ppl_ms = f64::INFINITY;
            for _ in 0..3 {
                let t = Instant::now();
                g.score(&prompt, &mut CudaKvCache::new(&g))?;
                ppl_ms = ppl_ms.min(ms(t));
            }
            let t = Instant::now();
            let sum = g.checksum()?;
            let checksum = ms(t);
            let t = Instant::now();
            {
                let mut guard = EditGuard::new(&mut g);
                guard.apply(&WeightEdit::down_proj(1, 2533, 7890, EditOp::Zero))?;
                guard.restore_all()?;
            }
            let edit = ms(t);
            let restored = if g.checksum()? == sum { "" } else { " RESTORE MISMATCH" };
            emit(format!(
                "| {} | {engine} | {fill:.1} | {prefill:.1} | {:.0} | {with_stats:.1} | {decode:.2} | {checksum:.1} | {edit:.2}{restored} | {agree} |",
                dtype.name(),
                512.0 / (prefill / 1e3)
            ))?;
            let row = format!(
                "| {} | {engine} | {:.2} | {det:.2} | {det_plain:.2} | {:+.1} % | {floor_ms:.2} | {:.2} | {graph_note} | {:.0} | {ppl_ms:.1} | {:.0} | {:.1} | {:.0} % |",
                dtype.name(),
                g.weight_bytes() as f64 / 1e9,
                (det / det_plain - 1.0) * 100.0,
                det / floor_ms,
                g.weight_bytes() as f64 / (det / 1e3) / 1e9,
                512.0 / (ppl_ms / 1e3),
                linear_flops * 512.0 / (ppl_ms / 1e3) / 1e12,
                if gemm_rate > 0.0 { linear_flops * 512.0 / (ppl_ms / 1e3) / gemm_rate * 100.0 } else { 0.0 },
            );
            // Printed now too, so a run cut off by its time limit still shows it in the log.
            eprintln!("roofline row: {row}");
            roofline.push(row);
        }
    }
    emit(String::new())?;
    emit("Detection forward (9-token prompt, spike statistics, no logits) against the bandwidth floor (weight bytes / measured copy rate), and perplexity throughput (one 512-token window, logits and NLL on the device) against the measured bf16 GEMM rate:\n".into())?;
    emit("| weights | gemm | weight GB | detect fwd ms | without stats ms | stats overhead | floor ms | × floor | graph replay ms (× floor) | achieved GB/s | ppl 512 ms | ppl tok/s | linear TFLOP/s | of bf16 GEMM rate |".into())?;
    emit("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|".into())?;
    for r in roofline {
        emit(r)?;
    }
    Ok(())
}

/// Timing of layer streaming at Llama-2-7B layer shapes (8 of its 32 layers, random weights
/// made on the host): a 9-token detection pass streamed vs resident, and the streamed bytes
/// per second, with the layers read from memory (`LazyModel::from_model`: f32, converted on
/// each read) and from a bf16 safetensors checkpoint written to a temporary directory (in the
/// page cache: its matrices copied as stored into bf16 slots). Appends to `$SWK_TIMING_OUT`.
/// Measures only.
#[test]
#[ignore = "GPU timing of streaming: run with --ignored on a GPU machine"]
fn timing_7b_streamed() -> Result<()> {
    if !gpu() || emulated() {
        return Ok(());
    }
    let spec = SynthSpec { layers: 8, ..SynthSpec::llama2_7b() };
    let t0 = Instant::now();
    let m = random_llama(&spec, 1)?;
    let fill = t0.elapsed().as_secs_f64();
    let prompt: Vec<u32> = (0..9u32).map(|i| (i * 7919 + 1) % 32000).collect();
    let c = m.config.clone();
    let mut lines = vec![
        String::new(),
        format!("Streaming, Llama-2-7B layer shapes, {} layers (host fill {fill:.1} s):", c.num_layers),
        String::new(),
        "| weights | resident pass ms | streamed pass ms | streamed ms/layer | host staging ms/layer (of it reading the tensors) | layer bytes | streamed GB/s |".into(),
        "|---|---|---|---|---|---|---|".into(),
    ];
    let memory = std::sync::Arc::new(swk::model::LazyModel::from_model(copy(&m)));
    let dir = tempfile::tempdir().map_err(|e| swk::Error::io(std::env::temp_dir(), e))?;
    swk::synth::save_llama(&m, dir.path(), WeightDtype::Bf16)?;
    let file = std::sync::Arc::new(swk::model::LazyModel::open(&dir.path().to_string_lossy())?);
    let cases = [
        ("memory", &memory, WeightDtype::Bf16),
        ("memory", &memory, WeightDtype::F32),
        ("bf16 file", &file, WeightDtype::Bf16),
    ];
    for (from, lazy, dtype) in cases {
        let opts = CudaOptions { dtype, ..Default::default() };
        let best = |g: &CudaModel| -> Result<f64> {
            g.forward(&prompt, &mut CudaKvCache::new(g), None, Logits::Last)?;
            let mut best = f64::INFINITY;
            for _ in 0..3 {
                let t = Instant::now();
                g.forward(&prompt, &mut CudaKvCache::new(g), None, Logits::Last)?;
                best = best.min(ms(t));
            }
            Ok(best)
        };
        // Resident: m itself (the file's norms and embedding are m's rounded to bf16; the
        // time does not depend on the values).
        let resident = best(&CudaModel::new(&m, &opts)?)?;
        let s = CudaModel::streamed(lazy.clone(), &opts)?;
        let streamed = best(&s)?;
        let layout = swk::backend::stream::SlotLayout::new(&c, 0, dtype);
        let layer_bytes = layout.bytes;
        let rate = (layer_bytes * c.num_layers) as f64 / (streamed / 1e3) / 1e9;
        // The host's part alone (read, convert, edits): what the streaming thread does per
        // layer while the device runs the previous one.
        let overlay = swk::backend::stream::Overlay::default();
        let mut staging = f64::INFINITY;
        for _ in 0..2 {
            let t = Instant::now();
            let staged = swk::backend::stream::stage_layer(lazy, 0, &layout, &overlay)?;
            staging = staging.min(ms(t));
            assert_eq!(staged.bytes.len(), layer_bytes);
        }
        let t = Instant::now();
        for e in &layout.entries {
            lazy.tensor(&format!("model.layers.0.{}", e.suffix))?;
        }
        let reading = ms(t);
        lines.push(format!(
            "| {} from {from} | {resident:.2} | {streamed:.2} | {:.2} | {staging:.2} ({reading:.2}) | {:.1} MB | {rate:.2} |",
            dtype.name(),
            streamed / c.num_layers as f64,
            layer_bytes as f64 / 1e6
        ));
    }
    append_timing(&(lines.join("\n") + "\n"))
}
/// Append `text` to `$SWK_TIMING_OUT` when set (and print it).
fn append_timing(text: &str) -> Result<()> {
    eprint!("{text}");
    if let Some(p) = std::env::var_os("SWK_TIMING_OUT").map(PathBuf::from) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(|e| swk::Error::io(p.clone(), e))?;
        f.write_all(text.as_bytes()).map_err(|e| swk::Error::io(p.clone(), e))?;
    }
    Ok(())
}

/// Timing of a mixture of experts at OLMoE-1B-7B shapes (16 layers, hidden 2048, 64 experts
/// of width 1024, top-8 routing, bf16 random weights made on the device): the detection
/// forward (9 tokens, spike statistics; routed on the device) against the floor of the bytes
/// it must read (every weight but the experts no token chose, over the measured copy rate),
/// also routed on the host (one download per layer), replayed from a CUDA graph, and with the
/// `mma` engine; and one 512-token perplexity window (also with swk's own GEMM kernels,
/// experts grouped and one by one). Appends to `$SWK_TIMING_OUT`. Measures only.
#[test]
#[ignore = "GPU timing of a mixture of experts at OLMoE-1B-7B shapes: run with --ignored on a GPU machine"]
fn timing_7b_moe() -> Result<()> {
    if !gpu() || emulated() {
        return Ok(());
    }
    let dir = std::env::temp_dir().join(format!("swk-olmoe-shapes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| swk::Error::io(dir.clone(), e))?;
    let config = serde_json::json!({
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "hidden_size": 2048,
        "intermediate_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16,
        "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 8,
        "norm_topk_prob": false, "vocab_size": 50304, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false
    });
    let path = dir.join("config.json");
    std::fs::write(&path, config.to_string()).map_err(|e| swk::Error::io(path.clone(), e))?;
    let c = swk::model::ModelConfig::from_hf_json(&path)?;
    let dev = swk::backend::cuda::CudaDevice::new(0)?;
    let copy_rate = dev.measure_copy_rate(2 << 30, 10)?;
    drop(dev);
    let g =
        CudaModel::random(&c, 1, &CudaOptions { dtype: WeightDtype::Bf16, ..Default::default() })?;
    let prompt: Vec<u32> = (0..512u32).map(|i| (i * 7919 + 1) % 50304).collect();
    let new_stats = || SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
    // One detection forward (9 tokens, statistics into `stats`), and the best of five.
    let detect = |g: &CudaModel, stats: &mut SpikeStats| -> Result<f64> {
        let t = Instant::now();
        g.forward(&prompt[..9], &mut CudaKvCache::new(g), Some(stats), Logits::None)?;
        g.synchronize()?;
        Ok(ms(t))
    };
    let best_detect = |g: &CudaModel| -> Result<f64> {
        (0..5).try_fold(f64::INFINITY, |best, _| Ok(best.min(detect(g, &mut new_stats())?)))
    };
    let mut first = new_stats();
    detect(&g, &mut first)?; // warm-up, and the experts the prompt reaches
    let det = best_detect(&g)?;
    let moe = c.family.moe.clone().ok_or_else(|| swk::Error::Invalid("not a MoE".into()))?;
    let expert_bytes = 3 * moe.expert_intermediate * c.hidden_size * 2;
    let chosen: usize =
        first.layers.iter().map(|l| l.experts.iter().filter(|e| e.selected > 0).count()).sum();
    let all = c.num_layers * moe.num_experts;
    let needed = g.weight_bytes() - (all - chosen) * expert_bytes;
    let floor = needed as f64 / copy_rate * 1e3;
    let mut ppl = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        g.score(&prompt, &mut CudaKvCache::new(&g))?;
        ppl = ppl.min(ms(t));
    }
    // The same detection forward routed on the host (a download and a synchronization per
    // sparse layer), and replayed from a CUDA graph (routed on the device), against the
    // device-routed launches above.
    let mut g = g;
    g.set_device_routing(false);
    let host_routed = best_detect(&g)?;
    g.set_device_routing(true);
    g.set_graphs(true);
    let graph_det = {
        use swk::detect::DetectBackend;
        let mut s = new_stats();
        g.spike_stats(&prompt[..9], &mut s)?; // capture
        (0..5).try_fold(f64::INFINITY, |best, _| -> Result<f64> {
            let t = Instant::now();
            g.spike_stats(&prompt[..9], &mut s)?;
            g.synchronize()?;
            Ok(best.min(ms(t)))
        })?
    };
    let graphed = if g.graphs_held() > 0 { "" } else { " (no graph)" };
    g.set_graphs(false);
    // The same detection forward with each expert's steps launched one expert at a time
    // (the path for experts with more than 16 rows), against the grouped launches above.
    g.set_grouped_experts(false);
    let one_by_one = best_detect(&g)?;
    // The 512-token window with swk's own GEMM kernels, which group the experts at any row
    // count (tiled), and one expert at a time: what grouping saves in a prefill.
    let engine = g.gemm();
    g.set_gemm(GemmEngine::Kernels)?;
    let mut kernels_ppl = [f64::INFINITY; 2];
    for (i, grouped) in [true, false].into_iter().enumerate() {
        g.set_grouped_experts(grouped);
        for _ in 0..2 {
            let t = Instant::now();
            g.score(&prompt, &mut CudaKvCache::new(&g))?;
            kernels_ppl[i] = kernels_ppl[i].min(ms(t));
        }
    }
    // The detection forward with the `mma` engine: the dense products and the experts'
    // grouped products on the tensor cores.
    g.set_grouped_experts(true);
    g.set_gemm(GemmEngine::Mma)?;
    let mma_det = best_detect(&g)?;
    g.set_gemm(engine)?;
    // Ablating one expert as `swk experts` does: every weight of its down_proj zeroed through
    // the restore log (one block edit: a download and an upload), then restored.
    let before = g.checksum()?;
    let t = Instant::now();
    let edits = swk::analysis::experts::ablation_edits(&g, 0, 0)?;
    let build = ms(t);
    let (apply, restore) = {
        let mut guard = EditGuard::new(&mut g);
        let t = Instant::now();
        guard.apply_all(&edits)?;
        let apply = ms(t);
        let t = Instant::now();
        guard.restore_all()?;
        (apply, ms(t))
    };
    let restored = if g.checksum()? == before { "" } else { " RESTORE MISMATCH" };
    let text = [
        String::new(),
        format!(
            "Mixture of experts, OLMoE-1B-7B shapes (64 experts, top-8), bf16 random weights, {:.2} GB; copy rate {:.0} GB/s; gemm {}:",
            g.weight_bytes() as f64 / 1e9,
            copy_rate / 1e9,
            g.gemm().name()
        ),
        String::new(),
        "| experts chosen (of all) | bytes needed GB | detect fwd ms (experts grouped, routed on the device) | floor ms | × floor | detect fwd ms: routed on the host / graph replay | detect fwd ms (experts one by one) | detect fwd ms, mma engine (× floor) | ppl 512 ms | ppl tok/s | ppl 512 ms, swk kernels: experts grouped / one by one | ablate 1 expert: weights, edit list / apply / restore ms |".into(),
        "|---|---|---|---|---|---|---|---|---|---|---|---|".into(),
        format!(
            "| {chosen} of {all} | {:.2} | {det:.2} | {floor:.2} | {:.2} | {host_routed:.2} / {graph_det:.2}{graphed} | {one_by_one:.2} | {mma_det:.2} ({:.2}×) | {ppl:.1} | {:.0} | {:.1} / {:.1} | {}, {build:.0} / {apply:.0} / {restore:.0}{restored} |",
            needed as f64 / 1e9,
            det / floor,
            mma_det / floor,
            512.0 / (ppl / 1e3),
            kernels_ppl[0],
            kernels_ppl[1],
            moe.expert_intermediate * c.hidden_size
        ),
    ]
    .join("\n")
        + "\n";
    append_timing(&text)
}
