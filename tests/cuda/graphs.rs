//! CUDA graphs replaying the normal passes.

use super::*;

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
