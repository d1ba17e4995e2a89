//! Host staging of one streamed layer (what the CUDA backend's streaming thread does per
//! layer while the device runs the previous one), at Llama-2-7B layer shapes:
//! - `bf16_file_to_bf16_slots`: a bf16 safetensors checkpoint into bf16 slots, the matrices
//!   copied as stored;
//! - `bf16_file_to_f32_slots`: the same file into f32 slots, every tensor converted;
//! - `memory_to_bf16_slots`: a model held in memory as f32 (`LazyModel::from_model`, what the
//!   GPU timing test streams) into bf16 slots, converted;
//! - `fp8_file_to_bf16_slots`: an FP8 checkpoint (DeepSeek-V3's format: E4M3 matrices with
//!   128 × 128 block scales) into bf16 slots, each matrix dequantized a row at a time.
//!
//! Each case twice: into a fresh buffer (`stage_layer`, whose zeroed pages the first write
//! faults in) and, `…_reused`, into one buffer kept from the last layer (`stage_part_into`),
//! as the CUDA backend's page-locked staging buffers are.
//!
//! The checkpoint (one layer, 405 MB; tiny shapes under `cargo test`) is written to a temporary directory first; its pages
//! stay in the page cache, so this times copying and converting, not the disk.

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use swk::backend::stream::{stage_layer, stage_part_into, LayerPart, Overlay, SlotLayout};
use swk::backend::WeightDtype;
use swk::model::LazyModel;
use swk::synth::{random_llama, save_llama, SynthSpec};
use swk::Model;

/// Write `model` to `dir` as an FP8 checkpoint: the layers' matrices as E4M3 codes (a fixed
/// pattern, no NaN: the values do not matter for timing) with 128 × 128 block scales, the
/// rest f32; `config` is the saved model's config.json.
fn save_fp8(model: &Model, config: &Path, dir: &Path) {
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in model.weights.iter() {
        let matrix = t.shape.len() == 2 && name.starts_with("model.layers.");
        if !matrix {
            let bytes = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push((name.to_string(), Dtype::F32, t.shape.clone(), bytes));
            continue;
        }
        let codes = (0..t.data.len()).map(|i| (i % 0x7f) as u8 | ((i & 0x80) as u8)).collect();
        tensors.push((name.to_string(), Dtype::F8_E4M3, t.shape.clone(), codes));
        let blocks = vec![t.shape[0].div_ceil(128), t.shape[1].div_ceil(128)];
        let scales = vec![1.0f32 / 448.0; blocks[0] * blocks[1]];
        let bytes = scales.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.push((format!("{name}_scale_inv"), Dtype::F32, blocks, bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).expect("view")))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).expect("saved");
    let text = std::fs::read_to_string(config).expect("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&text).expect("json");
    c["quantization_config"] =
        serde_json::json!({"quant_method": "fp8", "weight_block_size": [128, 128]});
    std::fs::write(dir.join("config.json"), c.to_string()).expect("config written");
}

fn bench(c: &mut Criterion) {
    // `cargo test` runs each bench once to see it works: small shapes there.
    let timing = std::env::args().any(|a| a == "--bench");
    let shapes = if timing { SynthSpec::llama2_7b() } else { SynthSpec::tiny() };
    let spec = SynthSpec { layers: 1, vocab: 256, ..shapes };
    let model = random_llama(&spec, 3).expect("random model");
    let dir = tempfile::tempdir().expect("temporary directory");
    save_llama(&model, dir.path(), WeightDtype::Bf16).expect("saved checkpoint");
    let file = LazyModel::open(dir.path().to_str().expect("utf-8 path")).expect("opened");
    let fp8_dir = tempfile::tempdir().expect("temporary directory");
    save_fp8(&model, &dir.path().join("config.json"), fp8_dir.path());
    let fp8 = LazyModel::open(fp8_dir.path().to_str().expect("utf-8 path")).expect("opened");
    let memory = LazyModel::from_model(model);
    let overlay = Overlay::default();
    let mut g = c.benchmark_group("stage_layer_7b");
    g.sample_size(10);
    let cases = [
        ("bf16_file_to_bf16_slots", &file, WeightDtype::Bf16),
        ("bf16_file_to_f32_slots", &file, WeightDtype::F32),
        ("memory_to_bf16_slots", &memory, WeightDtype::Bf16),
        ("fp8_file_to_bf16_slots", &fp8, WeightDtype::Bf16),
    ];
    for (name, lazy, dtype) in cases {
        let layout = SlotLayout::new(&lazy.config, 0, dtype);
        g.bench_function(name, |b| {
            b.iter(|| stage_layer(lazy, 0, &layout, &overlay).map(|s| s.bytes.len()))
        });
        let mut buf = vec![0u8; layout.bytes];
        g.bench_function(format!("{name}_reused"), |b| {
            b.iter(|| stage_part_into(lazy, 0, &layout, LayerPart::Whole, &overlay, &mut buf))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
