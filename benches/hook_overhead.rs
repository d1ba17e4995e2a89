//! Cost of the fused spike statistics (detection's hook overhead) on a synthetic Llama with
//! larger shapes than SmolLM2 (hidden 2048, intermediate 5632, 4 layers — TinyLlama-sized
//! blocks), for a 9-token detection prompt and a 128-token window. Target: overhead <= 2 %.

use criterion::{criterion_group, criterion_main, Criterion};
use swk::hooks::SpikeStats;
use swk::model::arch::{ForwardOptions, KvCache, Logits};
use swk::synth::{random_llama, SynthSpec};

fn bench(c: &mut Criterion) {
    let spec = SynthSpec {
        hidden: 2048,
        intermediate: 5632,
        layers: 4,
        heads: 32,
        kv_heads: 4,
        vocab: 32000,
        tie_embeddings: false,
    };
    let m = match random_llama(&spec, 7) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            return;
        }
    };
    let mut g = c.benchmark_group("synthetic_2048x5632_hook_overhead");
    g.sample_size(10);
    for n in [9usize, 128] {
        let tokens: Vec<u32> = (0..n as u32).map(|i| (i * 131 + 7) % spec.vocab as u32).collect();
        g.bench_function(format!("{n}_tokens_plain"), |b| {
            b.iter(|| {
                let mut cache = KvCache::new(&m);
                m.forward(
                    &tokens,
                    &mut cache,
                    ForwardOptions { logits: Logits::None, ..Default::default() },
                )
                .map(|l| l.len())
            })
        });
        let mut stats = SpikeStats::new(spec.layers, spec.intermediate, spec.hidden);
        g.bench_function(format!("{n}_tokens_spike_stats"), |b| {
            b.iter(|| {
                let mut cache = KvCache::new(&m);
                stats.reset();
                m.forward(
                    &tokens,
                    &mut cache,
                    ForwardOptions { logits: Logits::None, stats: Some(&mut stats), hooks: None },
                )
                .map(|l| l.len())
            })
        });
    }
    g.finish();
}

/// The same comparison on a CUDA device (feature `cuda`) at Llama-2-7B shapes with bf16
/// weights generated on the device: a 9-token detection prompt and a 512-token window, with
/// and without the fused statistics, and the capture of every block's residual stream
/// (`CudaModel::capture`, what cascade reads). Skips, saying why, without a device.
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
fn bench_cuda(c: &mut Criterion) {
    use swk::backend::cuda::{cuda_available, CudaKvCache, CudaModel, CudaOptions, GemmEngine};
    use swk::hooks::{HookKind, HookPoint};
    if !cuda_available() {
        eprintln!("SKIPPED cuda hook overhead: no CUDA device");
        return;
    }
    let config = match SynthSpec::llama2_7b().config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            return;
        }
    };
    // The default engine, what `swk` runs (`cublas-split` for bf16 weights with libcublas,
    // else swk's kernels).
    let gemm = GemmEngine::Auto;
    let g = match CudaModel::random(&config, 1, &CudaOptions { gemm, ..Default::default() }) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("SKIPPED cuda hook overhead: {e}");
            return;
        }
    };
    eprintln!("cuda hook overhead: GEMM engine {}", g.gemm().name());
    let mut group = c.benchmark_group(format!("cuda_7b_bf16_{}_hook_overhead", gemm.name()));
    group.sample_size(20);
    group.measurement_time(std::time::Duration::from_secs(3));
    group.warm_up_time(std::time::Duration::from_secs(1));
    for n in [9usize, 512] {
        let tokens: Vec<u32> = (0..n as u32).map(|i| (i * 131 + 7) % 32000).collect();
        let run = |stats: Option<&mut SpikeStats>| {
            let r = g.forward(&tokens, &mut CudaKvCache::new(&g), stats, Logits::None);
            g.synchronize().and(r).map(|l| l.len())
        };
        group.bench_function(format!("{n}_tokens_plain"), |b| b.iter(|| run(None)));
        let mut stats =
            SpikeStats::new(config.num_layers, config.intermediate_size, config.hidden_size);
        group.bench_function(format!("{n}_tokens_spike_stats"), |b| {
            b.iter(|| {
                stats.reset();
                run(Some(&mut stats))
            })
        });
        // What `swk cascade` reads: the residual stream leaving every block, downloaded.
        let points: Vec<HookPoint> = (0..config.num_layers)
            .map(|layer| HookPoint { layer, kind: HookKind::ResidPost })
            .collect();
        group.bench_function(format!("{n}_tokens_capture_resid_post"), |b| {
            b.iter(|| g.capture(&tokens, &points).map(|c| c.len()))
        });
    }
    group.finish();
}

#[cfg(not(any(feature = "cuda", feature = "cuda-emu")))]
fn bench_cuda(_: &mut Criterion) {}

criterion_group!(benches, bench, bench_cuda);
criterion_main!(benches);
