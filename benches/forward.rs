//! Forward-pass benchmarks on the real SmolLM2-135M-Instruct (skipped when absent):
//! a 9-token prompt (detection-sized) and 512 tokens (perplexity-window-sized), each with and
//! without fused spike statistics (the hook overhead).

use criterion::{criterion_group, criterion_main, Criterion};
use swk::hooks::SpikeStats;
use swk::model::arch::{ForwardOptions, KvCache, Logits};
use swk::Model;

fn model() -> Option<Model> {
    let p = std::env::var("SWK_TEST_MODEL").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/.models/SmolLM2-135M-Instruct.Q4_1.gguf").to_string()
    });
    if !std::path::Path::new(&p).is_file() {
        eprintln!("SKIPPED: {p} absent (scripts/fetch-models.sh)");
        return None;
    }
    Model::load(&p).ok()
}

fn bench(c: &mut Criterion) {
    let Some(m) = model() else { return };
    let cfg = &m.config;
    let mut g = c.benchmark_group("smollm2_forward");
    g.sample_size(10);
    for n in [9usize, 512] {
        let tokens: Vec<u32> =
            (0..n as u32).map(|i| (i * 37 + 11) % cfg.vocab_size as u32).collect();
        let logits = if n == 9 { Logits::None } else { Logits::All };
        g.bench_function(format!("{n}_tokens"), |b| {
            b.iter(|| {
                let mut cache = KvCache::new(&m);
                m.forward(&tokens, &mut cache, ForwardOptions { logits, ..Default::default() })
                    .map(|l| l.len())
            })
        });
        let mut stats = SpikeStats::new(cfg.num_layers, cfg.intermediate_size, cfg.hidden_size);
        g.bench_function(format!("{n}_tokens_with_spike_stats"), |b| {
            b.iter(|| {
                let mut cache = KvCache::new(&m);
                stats.reset();
                m.forward(
                    &tokens,
                    &mut cache,
                    ForwardOptions { logits, stats: Some(&mut stats), hooks: None },
                )
                .map(|l| l.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
