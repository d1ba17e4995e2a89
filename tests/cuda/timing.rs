//! The GPU timing tables (ignored; `--ignored` on a GPU machine): Llama-2-7B shapes,
//! streaming, a mixture of experts at OLMoE-1B-7B shapes, and latent attention at
//! DeepSeek-V3 shapes.

use super::*;

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

/// Where the device time of three passes goes, kernel by kernel ([`CudaModel`]'s device
/// profile), with engine `gemm`: the detection forward (the first 9 tokens of `prompt`, spike
/// statistics, no logits), a perplexity window over all of `prompt`, and one decode step
/// after it. A Markdown section: each pass's wall time and its `top` most costly kernels.
fn profile_section(
    g: &mut CudaModel,
    gemm: GemmEngine,
    prompt: &[u32],
    top: usize,
) -> Result<String> {
    g.set_gemm(gemm)?;
    let c = g.config().clone();
    let mut stats = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
    g.forward(&prompt[..9], &mut CudaKvCache::new(g), Some(&mut stats), Logits::None)?; // warm-up
    g.score(prompt, &mut CudaKvCache::new(g))?;
    let mut text = format!("\nDevice profile, gemm {}:\n", gemm.name());
    let mut cache = CudaKvCache::new(g);
    let passes = [
        "detection forward (9 tokens, spike statistics)".to_string(),
        format!("perplexity window ({} tokens)", prompt.len()),
        "decode step after the window (1 token)".to_string(),
    ];
    for (i, what) in passes.iter().enumerate() {
        g.synchronize()?;
        g.device().start_profile();
        let t = Instant::now();
        match i {
            0 => drop(g.forward(
                &prompt[..9],
                &mut CudaKvCache::new(g),
                Some(&mut stats),
                Logits::None,
            )?),
            1 => drop(g.score(prompt, &mut cache)?),
            _ => drop(g.forward(&prompt[..1], &mut cache, None, Logits::Last)?),
        }
        g.synchronize()?;
        let wall = ms(t);
        let p = g.device().finish_profile()?;
        text += &format!(
            "\n{what}: wall {wall:.2} ms, {} launches timed, {:.2} ms of them; the {top} most costly kernels:\n\n{}",
            p.launches(),
            p.total_ms(),
            p.table(wall, top)
        );
    }
    Ok(text)
}

/// Device profiles at Llama-2-7B shapes (bf16 random weights made on the device): for the
/// engines `auto` chooses between (cublas-split, mma), where the time of a detection forward,
/// a 512-token perplexity window and a decode step goes, kernel by kernel; then the same at
/// 4096 tokens with attention in row blocks and splits, and a block per row; and the 512-token
/// passes of a mixture of experts at OLMoE-1B-7B shapes. Appends to
/// `$SWK_TIMING_OUT`. Measures only (profiling adds two events per launch).
#[test]
#[ignore = "GPU profile at 7B shapes: run with --ignored on a GPU machine"]
fn timing_profile() -> Result<()> {
    if !gpu() || emulated() {
        return Ok(());
    }
    let config = SynthSpec::llama2_7b().config()?;
    let prompt: Vec<u32> = (0..512u32).map(|i| (i * 7919 + 1) % 32000).collect();
    let opts = CudaOptions { dtype: WeightDtype::Bf16, ..Default::default() };
    let mut g = CudaModel::random(&config, 1, &opts)?;
    let mut gemms = vec![GemmEngine::Mma];
    if cublas_present() {
        gemms.insert(0, GemmEngine::CublasSplit);
    }
    for &gemm in &gemms {
        append_timing(&profile_section(&mut g, gemm, &prompt, 12)?)?;
    }
    // A 4096-token window and a decode step after it, attention in row blocks and splits,
    // then a block per query row.
    let long: Vec<u32> = (0..4096u32).map(|i| (i * 7919 + 1) % 32000).collect();
    for blocks in [true, false] {
        g.set_attention_blocks(blocks);
        let how = if blocks {
            "in blocks of 16 query rows (prefill) and split over blocks (decoding)"
        } else {
            "a block per query row"
        };
        append_timing(&format!("\n4096-token window, attention {how}:\n"))?;
        append_timing(&profile_section(&mut g, gemms[0], &long, 8)?)?;
    }
    g.set_attention_blocks(true);
    drop(g);
    // A mixture of experts at OLMoE-1B-7B shapes (routed on the device for the short passes).
    let moe = olmoe_shapes(16)?;
    let mut g = CudaModel::random(&moe, 1, &opts)?;
    let prompt: Vec<u32> = (0..512u32).map(|i| (i * 7919 + 1) % 50304).collect();
    append_timing("\nOLMoE-1B-7B shapes (16 layers, 64 experts, top-8):\n")?;
    append_timing(&profile_section(&mut g, gemms[0], &prompt, 12)?)?;
    Ok(())
}

/// [`profile_section`] runs on every device (the emulator included) at the tiny Llama's and
/// Qwen2-MoE's shapes: each pass's table lists kernels, and the perplexity window launches
/// more than a decode step.
#[test]
fn profile_sections_list_each_pass_kernels() {
    if !gpu() {
        return;
    }
    for name in ["llama", "qwen2_moe"] {
        let (m, tokens) = load(name);
        let mut g = CudaModel::new(&m, &CudaOptions::default()).unwrap();
        let text = profile_section(&mut g, GemmEngine::Mma, &tokens, 5).unwrap();
        eprintln!("{name}:{text}");
        let passes: Vec<&str> = text.lines().filter(|l| l.contains(" launches timed, ")).collect();
        assert_eq!(passes.len(), 3, "{name}: {text}");
        let launches: Vec<usize> = passes
            .iter()
            .map(|l| {
                let n = l.split(" launches timed").next().unwrap().rsplit(' ').next().unwrap();
                n.parse().unwrap()
            })
            .collect();
        assert!(launches.iter().all(|&n| n > 0), "{name}: {text}");
        assert!(launches[1] > launches[2], "{name}: the window launches more than a step: {text}");
        assert_eq!(text.matches("| (all launches) |").count(), 3, "{name}: {text}");
        assert!(text.contains("swk_gemm_mma"), "{name}: {text}");
    }
}

/// Timing of layer streaming at Llama-2-7B layer shapes (8 of its 32 layers, random weights
/// made on the host): a 9-token detection pass streamed vs resident, and the streamed bytes
/// per second, with the layers read from memory (`LazyModel::from_model`: f32, converted on
/// each read) and from a bf16 safetensors checkpoint written to a temporary directory (in the
/// page cache: its matrices copied as stored into bf16 slots); each staged in page-locked
/// buffers (the default) and in pageable memory; and the checkpoint uploaded whole
/// (`CudaModel::from_lazy`). Appends to `$SWK_TIMING_OUT`. Measures only.
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
        "| weights | resident pass ms | streamed pass ms | streamed ms/layer | host staging ms/layer (of it reading the tensors) | layer bytes | streamed GB/s | staged in pageable memory: pass ms (GB/s) |".into(),
        "|---|---|---|---|---|---|---|---|".into(),
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
        // The same passes with every layer staged in pageable memory (the driver's own
        // copy through its buffers, where page-locked staging is one DMA): from the file
        // only, whose staging is a copy (from memory, converting each layer bounds a pass).
        let pageable = if from == "memory" {
            None
        } else {
            let p = CudaModel::streamed(lazy.clone(), &opts)?;
            p.set_pinned_staging(0);
            Some(best(&p)?)
        };
        let pinned_share = s.streamed_pinned_bytes() as f64 / s.streamed_bytes().0.max(1) as f64;
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
        let pageable = pageable.map_or("-".to_string(), |p| {
            let rate = (layer_bytes * c.num_layers) as f64 / (p / 1e3) / 1e9;
            format!("{p:.2} ({rate:.2})")
        });
        lines.push(format!(
            "| {} from {from} | {resident:.2} | {streamed:.2}{} | {:.2} | {staging:.2} ({reading:.2}) | {:.1} MB | {rate:.2} | {pageable} |",
            dtype.name(),
            if pinned_share < 1.0 { format!(" ({:.0} % pinned)", pinned_share * 100.0) } else { String::new() },
            streamed / c.num_layers as f64,
            layer_bytes as f64 / 1e6
        ));
    }
    // The bf16 checkpoint uploaded whole (its matrices copied as stored), best of 2.
    let opts = CudaOptions { dtype: WeightDtype::Bf16, ..Default::default() };
    let mut load = f64::INFINITY;
    let mut bytes = 0;
    for _ in 0..2 {
        let t = Instant::now();
        let g = CudaModel::from_lazy(&file, &opts)?;
        g.synchronize()?;
        load = load.min(ms(t));
        bytes = g.weight_bytes();
    }
    lines.push(String::new());
    lines.push(format!(
        "Resident upload of the bf16 checkpoint (`CudaModel::from_lazy`, {:.2} GB): {load:.0} ms, {:.2} GB/s",
        bytes as f64 / 1e9,
        bytes as f64 / (load / 1e3) / 1e9
    ));
    append_timing(&(lines.join("\n") + "\n"))
}

/// Timing of a streamed mixture of experts at OLMoE-1B-7B layer shapes (2 of its 16 layers:
/// 64 experts of width 1024, top-8; random weights made on the host, streamed from memory into
/// bf16 slots): decoding one token a pass, each routed expert read once chosen (8 of 64 a
/// layer) against every layer read whole; ms per token and bytes read per token. Appends to
/// `$SWK_TIMING_OUT`. Measures only.
#[test]
#[ignore = "GPU timing of a streamed mixture of experts: run with --ignored on a GPU machine"]
fn timing_7b_streamed_moe() -> Result<()> {
    if !gpu() || emulated() {
        return Ok(());
    }
    let c = olmoe_shapes(2)?;
    // Random weights: N(0, 0.02), norms 1.
    let t0 = Instant::now();
    let (h, v) = (c.hidden_size, c.vocab_size);
    let mut shapes = vec![
        ("model.embed_tokens.weight".to_string(), vec![v, h], true),
        ("model.norm.weight".to_string(), vec![h], false),
        ("lm_head.weight".to_string(), vec![v, h], true),
    ];
    for l in 0..c.num_layers {
        for (suffix, shape, matrix) in swk::backend::stream::layer_plan(&c, l) {
            let random = matrix || suffix == "mlp.gate.weight";
            shapes.push((format!("model.layers.{l}.{suffix}"), shape, random));
        }
    }
    let mut weights = swk::model::Weights::new();
    for (name, shape, random) in shapes {
        let mut data = vec![1f32; shape.iter().product()];
        if random {
            swk::synth::fill_normal(&mut data, swk::synth::tensor_seed(1, &name), 0.0, 0.02);
        }
        weights.insert(name.clone(), swk::model::Tensor::new(&name, shape, data, "F32")?);
    }
    let fill = t0.elapsed().as_secs_f64();
    let source = swk::model::ModelSource {
        spec: "synthetic".into(),
        path: PathBuf::from("synthetic"),
        format: swk::model::Format::Safetensors,
        load_seconds: fill,
        name: None,
    };
    let m = Model { config: c.clone(), weights, tokenizer: None, source };
    let lazy = std::sync::Arc::new(swk::model::LazyModel::from_model(m));
    let opts = CudaOptions { dtype: WeightDtype::Bf16, ..Default::default() };
    let prompt: Vec<u32> = (0..9u32).map(|i| (i * 7919 + 1) % 50304).collect();
    let mut lines = vec![
        String::new(),
        format!(
            "Streamed mixture of experts, OLMoE-1B-7B layer shapes, {} layers, bf16 slots from memory (host fill {fill:.1} s):",
            c.num_layers
        ),
        String::new(),
        "| routed experts | decode ms/token | MB read/token | experts read alone/token |".into(),
        "|---|---|---|---|".into(),
    ];
    for select in [true, false] {
        let mut g = CudaModel::streamed(lazy.clone(), &opts)?;
        g.set_selective_experts(select);
        let mut best = f64::INFINITY;
        let mut per_token = (0.0, 0.0);
        for _ in 0..2 {
            let mut cache = CudaKvCache::new(&g);
            g.forward(&prompt, &mut cache, None, Logits::None)?;
            let before = g.streamed_bytes();
            let t = Instant::now();
            for &tok in &prompt[..8] {
                g.forward(&[tok], &mut cache, None, Logits::Last)?;
            }
            best = best.min(ms(t) / 8.0);
            let after = g.streamed_bytes();
            per_token = ((after.0 - before.0) as f64 / 8.0, (after.1 - before.1) as f64 / 8.0);
        }
        lines.push(format!(
            "| {} | {best:.2} | {:.1} | {:.0} |",
            if select { "read once chosen" } else { "read whole, ahead" },
            per_token.0 / 1e6,
            per_token.1
        ));
    }
    append_timing(&(lines.join("\n") + "\n"))
}

/// The config of OLMoE-1B-7B's shapes with `layers` layers (hidden 2048, 64 experts of width
/// 1024, top-8), read as `config.json` is.
fn olmoe_shapes(layers: usize) -> Result<swk::model::ModelConfig> {
    read_config(serde_json::json!({
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "hidden_size": 2048,
        "intermediate_size": 1024, "num_hidden_layers": layers, "num_attention_heads": 16,
        "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 8,
        "norm_topk_prob": false, "vocab_size": 50304, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false
    }))
}

/// `config` read as a `config.json` holding it is.
fn read_config(config: serde_json::Value) -> Result<swk::model::ModelConfig> {
    let dir = tempfile::tempdir().map_err(|e| swk::Error::io(std::env::temp_dir(), e))?;
    let path = dir.path().join("config.json");
    std::fs::write(&path, config.to_string()).map_err(|e| swk::Error::io(path.clone(), e))?;
    swk::model::ModelConfig::from_hf_json(&path)
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
/// `mma` engine; decoding (ms per token, routed on the device and on the host); and one
/// 512-token perplexity window (also with swk's own GEMM kernels,
/// experts grouped and one by one). Appends to `$SWK_TIMING_OUT`. Measures only.
#[test]
#[ignore = "GPU timing of a mixture of experts at OLMoE-1B-7B shapes: run with --ignored on a GPU machine"]
fn timing_7b_moe() -> Result<()> {
    if !gpu() || emulated() {
        return Ok(());
    }
    let c = olmoe_shapes(16)?;
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
    // Decoding 32 tokens after the 9-token prompt (logits of each step downloaded, as
    // generation does), ms per token, routed on the device and on the host.
    let decode = |g: &CudaModel| -> Result<f64> {
        let mut cache = CudaKvCache::new(g);
        g.forward(&prompt[..9], &mut cache, None, Logits::Last)?;
        g.synchronize()?;
        let t = Instant::now();
        for &tok in &prompt[9..41] {
            g.forward(&[tok], &mut cache, None, Logits::Last)?;
        }
        g.synchronize()?;
        Ok(ms(t) / 32.0)
    };
    let mut g = g;
    let decode_device = decode(&g)?;
    g.set_device_routing(false);
    let host_routed = best_detect(&g)?;
    let decode_host = decode(&g)?;
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
    // Grouped, the sparse layers route on the device (a 512-token pass: with swk's kernels
    // only), or on the host.
    let mut kernels_ppl = [f64::INFINITY; 3];
    for (i, (grouped, on_device)) in
        [(true, true), (true, false), (false, false)].into_iter().enumerate()
    {
        g.set_grouped_experts(grouped);
        g.set_device_routing(on_device);
        for _ in 0..2 {
            let t = Instant::now();
            g.score(&prompt, &mut CudaKvCache::new(&g))?;
            kernels_ppl[i] = kernels_ppl[i].min(ms(t));
        }
    }
    g.set_device_routing(true);
    // The detection forward with the `mma` engine: the dense products and the experts'
    // grouped products on the tensor cores.
    g.set_grouped_experts(true);
    g.set_gemm(GemmEngine::Mma)?;
    let mma_det = best_detect(&g)?;
    // Unfused: among others, the experts' activation a launch of its own (fused, the grouped
    // down product makes it).
    g.set_fused_launches(false);
    let mma_unfused = best_detect(&g)?;
    g.set_fused_launches(true);
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
        "| experts chosen (of all) | bytes needed GB | detect fwd ms (experts grouped, routed on the device) | floor ms | × floor | detect fwd ms: routed on the host / graph replay | decode ms/token: routed on the device / on the host | detect fwd ms (experts one by one) | detect fwd ms, mma engine (× floor) / launches unfused | ppl 512 ms | ppl tok/s | ppl 512 ms, swk kernels: experts grouped, routed on the device / on the host / one by one | ablate 1 expert: weights, edit list / apply / restore ms |".into(),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|".into(),
        format!(
            "| {chosen} of {all} | {:.2} | {det:.2} | {floor:.2} | {:.2} | {host_routed:.2} / {graph_det:.2}{graphed} | {decode_device:.2} / {decode_host:.2} | {one_by_one:.2} | {mma_det:.2} ({:.2}×) / {mma_unfused:.2} | {ppl:.1} | {:.0} | {:.1} / {:.1} / {:.1} | {}, {build:.0} / {apply:.0} / {restore:.0}{restored} |",
            needed as f64 / 1e9,
            det / floor,
            mma_det / floor,
            512.0 / (ppl / 1e3),
            kernels_ppl[0],
            kernels_ppl[1],
            kernels_ppl[2],
            moe.expert_intermediate * c.hidden_size
        ),
    ]
    .join("\n")
        + "\n";
    append_timing(&text)
}

/// The config of DeepSeek-V3's attention and dense-MLP shapes with `layers` layers, all dense
/// (hidden 7168, 128 heads, q_lora_rank 1536, kv_lora_rank 512, nope 128, rope 64, v 128),
/// read as `config.json` is.
fn deepseek_v3_shapes(layers: usize) -> Result<swk::model::ModelConfig> {
    read_config(serde_json::json!({
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
        "num_hidden_layers": layers, "first_k_dense_replace": layers,
        "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "vocab_size": 129280, "n_group": 8, "topk_group": 4,
        "norm_topk_prob": true, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": false
    }))
}

/// Latent attention at DeepSeek-V3's shapes (2 dense layers, bf16 random weights made on the
/// device; the KV cache holds the 576-wide latent rows, see `backend::cuda::mla`): decode ms
/// per token after 512 and 4096 positions, against the floor of the bytes a step reads (every
/// weight but the embedding, plus the cache) over the measured copy rate; and one 512-token
/// perplexity window. Appends to `$SWK_TIMING_OUT`. Measures only.
#[test]
#[ignore = "GPU timing of latent attention at DeepSeek-V3 shapes: run with --ignored on a GPU machine"]
fn timing_mla() -> Result<()> {
    use swk::backend::memory::kv_cache_bytes;
    if !gpu() || emulated() {
        return Ok(());
    }
    let c = deepseek_v3_shapes(2)?;
    let dev = swk::backend::cuda::CudaDevice::new(0)?;
    let copy_rate = dev.measure_copy_rate(2 << 30, 10)?;
    drop(dev);
    let g =
        CudaModel::random(&c, 1, &CudaOptions { dtype: WeightDtype::Bf16, ..Default::default() })?;
    let prompt: Vec<u32> = (0..4096 + 16u32).map(|i| (i * 7919 + 1) % 129280).collect();
    let embedding = c.vocab_size * c.hidden_size * 2;
    let mut rows = Vec::new();
    for ctx in [512usize, 4096] {
        let mut cache = CudaKvCache::new(&g);
        let t = Instant::now();
        g.forward(&prompt[..ctx], &mut cache, None, Logits::Last)?;
        g.synchronize()?;
        let prefill = ms(t);
        let t = Instant::now();
        for &tok in &prompt[ctx..ctx + 16] {
            g.forward(&[tok], &mut cache, None, Logits::Last)?;
        }
        g.synchronize()?;
        let step = ms(t) / 16.0;
        let bytes = g.weight_bytes() - embedding + kv_cache_bytes(&c, ctx + 8);
        let floor = bytes as f64 / copy_rate * 1e3;
        rows.push(format!(
            "| {ctx} | {:.1} | {prefill:.1} | {step:.2} | {floor:.2} | {:.2} |",
            kv_cache_bytes(&c, ctx) as f64 / 1e6,
            step / floor
        ));
    }
    let mut ppl = f64::INFINITY;
    for _ in 0..2 {
        let t = Instant::now();
        g.score(&prompt[..512], &mut CudaKvCache::new(&g))?;
        ppl = ppl.min(ms(t));
    }
    let text = [
        String::new(),
        format!(
            "Latent attention, DeepSeek-V3 shapes (2 dense layers), bf16 random weights, {:.2} GB; copy rate {:.0} GB/s; gemm {}; ppl 512 window {ppl:.1} ms:",
            g.weight_bytes() as f64 / 1e9,
            copy_rate / 1e9,
            g.gemm().name()
        ),
        String::new(),
        "| positions | KV cache MB | prefill ms | decode ms/token | floor ms | × floor |".into(),
        "|---|---|---|---|---|---|".into(),
    ]
    .into_iter()
    .chain(rows)
    .collect::<Vec<_>>()
    .join("\n")
        + "\n";
    append_timing(&text)
}
