//! Host staging of one streamed layer (what the CUDA backend's streaming thread does per
//! layer while the device runs the previous one), at Llama-2-7B layer shapes:
//! - `bf16_file_to_bf16_slots`: a bf16 safetensors checkpoint into bf16 slots, the matrices
//!   copied as stored;
//! - `bf16_file_to_f32_slots`: the same file into f32 slots, every tensor converted;
//! - `memory_to_bf16_slots`: a model held in memory as f32 (`LazyModel::from_model`, what the
//!   GPU timing test streams) into bf16 slots, converted.
//!
//! The checkpoint (one layer, 405 MB; tiny shapes under `cargo test`) is written to a temporary directory first; its pages
//! stay in the page cache, so this times copying and converting, not the disk.

use criterion::{criterion_group, criterion_main, Criterion};
use swk::backend::stream::{stage_layer, Overlay, SlotLayout};
use swk::backend::WeightDtype;
use swk::model::LazyModel;
use swk::synth::{random_llama, save_llama, SynthSpec};

fn bench(c: &mut Criterion) {
    // `cargo test` runs each bench once to see it works: small shapes there.
    let timing = std::env::args().any(|a| a == "--bench");
    let shapes = if timing { SynthSpec::llama2_7b() } else { SynthSpec::tiny() };
    let spec = SynthSpec { layers: 1, vocab: 256, ..shapes };
    let model = random_llama(&spec, 3).expect("random model");
    let dir = tempfile::tempdir().expect("temporary directory");
    save_llama(&model, dir.path(), WeightDtype::Bf16).expect("saved checkpoint");
    let file = LazyModel::open(dir.path().to_str().expect("utf-8 path")).expect("opened");
    let memory = LazyModel::from_model(model);
    let overlay = Overlay::default();
    let mut g = c.benchmark_group("stage_layer_7b");
    g.sample_size(10);
    let cases = [
        ("bf16_file_to_bf16_slots", &file, WeightDtype::Bf16),
        ("bf16_file_to_f32_slots", &file, WeightDtype::F32),
        ("memory_to_bf16_slots", &memory, WeightDtype::Bf16),
    ];
    for (name, lazy, dtype) in cases {
        let layout = SlotLayout::new(&lazy.config, 0, dtype);
        g.bench_function(name, |b| {
            b.iter(|| stage_layer(lazy, 0, &layout, &overlay).map(|s| s.bytes.len()))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
