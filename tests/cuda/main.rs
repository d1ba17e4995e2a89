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
//!   same bf16-rounded weights; 5e-2 for `cublas-bf16`, which also rounds activations, and
//!   may so move a near-tied token to another expert: that token's position alone may then
//!   exceed it), for each GEMM engine available;
//! * spike statistics: same peak channel and position per layer as the CPU, values close;
//! * decode with the device KV cache equals prefill; perplexity scoring equals the CPU's;
//! * edits: EditGuard on device memory, one by one and batched, restored bit-exactly (device
//!   checksums);
//! * captured activations (`CudaModel::capture`): every hook point of every fixture, the same
//!   points as the CPU's hooks and values within 1e-4;
//! * `timing_7b` (ignored; run with `--ignored`): a timing table at Llama-2-7B shapes.
//!
//! The tests, by module: `forward` (logits, statistics, captures, decoding, perplexity), `moe`,
//! `edits`, `analyses` (detection and the analyses on planted models), `cli`, `graphs`,
//! `streaming`, `timing`. The helpers they share are here.
#![cfg(any(feature = "cuda", feature = "cuda-emu"))]

use std::path::PathBuf;
use std::time::Instant;

use swk::backend::cuda::{
    cublas_present, cuda_available, device_info, CudaKvCache, CudaModel, CudaOptions, GemmEngine,
    WeightDtype,
};
use swk::backend::stream::LayerPart;
use swk::detect::{detect_with, DetectConfig};
use swk::edit::{EditGuard, EditOp, EditTarget, WeightEdit};
use swk::hooks::{HookKind, HookPoint, SpikeStats};
use swk::model::arch::{ForwardOptions, KvCache, Logits};
use swk::synth::{planted, random_llama, Plant, SynthSpec};
use swk::{Model, Result};

mod analyses;
mod cli;
mod edits;
mod forward;
mod graphs;
mod moe;
mod streaming;
mod timing;

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

/// Largest |a - b| / max(|b|, floor); infinite where either holds a NaN.
fn max_rel_err(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let err = |(x, y): (&f32, &f32)| (x - y).abs() / y.abs().max(floor);
    // f32::max skips NaN: a NaN or an infinity on either side counts as an infinite error.
    a.iter().zip(b).map(err).fold(0.0, |m, e| if e.is_nan() { f32::INFINITY } else { m.max(e) })
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
