//! Mixtures of experts: grouped experts against one at a time, routing on the device against
//! routing on the host.

use super::*;

/// The experts of a sparse layer run together (one launch per step for the layer, when each
/// has at most 16 rows) give what they give one at a time: bit-identical logits and spike
/// statistics with swk's kernels (the same gemv per expert); with cuBLAS, logits within 1e-4
/// (f32 weights, statistics too) or 1e-2 (bf16; 5e-2 for cublas-bf16, which rounds
/// activations); and the CPU's logits
/// within 1e-4 (f32), on every mixture-of-experts
/// fixture. A pass with more than 16 rows for an expert (64 tokens) is grouped too with swk's
/// kernels (tiled, bit-identical to one by one) and one by one with cuBLAS. With the `mma`
/// engine, the grouped down product that makes the activation itself gives the bits of
/// the activation's own launch.
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
                if gemm == GemmEngine::Mma {
                    // The down product makes the experts' activation itself; unfused, a launch
                    // of its own makes it: the same bits.
                    g.set_fused_launches(false);
                    let (plain, ps) = run(&g);
                    g.set_fused_launches(true);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                    assert_eq!(bits(&grouped), bits(&plain), "{at}: fused activation, logits");
                    let (a, b) = (format!("{:?}", gs.layers), format!("{:?}", ps.layers));
                    assert_eq!(a, b, "{at}: fused activation, statistics");
                }
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
/// their replays give the same statistics. A 40-token pass routes on the device with swk's
/// own GEMM kernels (in the 4-expert fixtures some expert then has more than 16 rows), on
/// the host with cuBLAS.
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
                assert_same_routing(&at, (&dl, &ds), (&hl, &hs));
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
        // A longer pass: on the device with swk's kernels only.
        let long: Vec<u32> = tokens.iter().cycle().take(40).copied().collect();
        for gemm in engines_brief(WeightDtype::F32) {
            let at = format!("{name} 40 tokens {}", gemm.name());
            let opts = CudaOptions { dtype: WeightDtype::F32, gemm, ..Default::default() };
            let mut g = CudaModel::new(&m, &opts).unwrap();
            let pass = |g: &CudaModel| {
                let mut s = new_stats();
                let logits =
                    g.forward(&long, &mut CudaKvCache::new(g), Some(&mut s), Logits::All).unwrap();
                (logits, s)
            };
            let before = g.device_routed_layers();
            let (dl, ds) = pass(&g);
            let routed = g.device_routed_layers() > before;
            assert_eq!(routed, gemm == GemmEngine::Kernels, "{at}: routed on the device");
            g.set_device_routing(false);
            let (hl, hs) = pass(&g);
            assert_same_routing(&at, (&dl, &ds), (&hl, &hs));
        }
    }
}

/// Assert a pass routed on the device gave the host-routed pass's logits and statistics: bit
/// for bit on the emulator; on a GPU (whose `expf` and `log` may differ from the host's in
/// the last bit) logits within 1e-4 and statistics as `assert_stats_match` compares them.
fn assert_same_routing(at: &str, (dl, ds): (&[f32], &SpikeStats), (hl, hs): (&[f32], &SpikeStats)) {
    if swk::backend::cuda::EMULATED {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        assert_eq!(bits(dl), bits(hl), "{at}: logits");
        assert_eq!(format!("{:?}", ds.layers), format!("{:?}", hs.layers), "{at}");
    } else {
        let err = max_rel_err(dl, hl, 1.0);
        assert!(err <= 1e-4, "{at}: device vs host routing {err}");
        assert_stats_match(at, ds, hs);
    }
}
