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

criterion_group!(benches, bench);
criterion_main!(benches);
