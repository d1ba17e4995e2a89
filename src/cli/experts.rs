//! `swk experts MODEL [--router-samples N] [--text FILE] [--sample-len N] [--context N]
//! [--no-ablate] [--json] [--gpu-dtype auto|bf16|f16|f32]` (runs on `--device cuda` too).

use std::path::PathBuf;

use swk::analysis::experts::{self, ExpertsConfig, ExpertsReport};
use swk::analysis::text_samples;
use swk::eval::ppl;
use swk::Result;

use super::analysis::read_text;
use super::device::{Backend, DeviceOpts, GpuDtype};

/// Arguments of `swk experts`.
#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face directory, or a hub id (org/name) of a mixture-of-experts
    /// model.
    model: String,
    /// Sample sequences cut from the text for the router statistics.
    #[arg(long, default_value_t = 8, value_name = "N")]
    router_samples: usize,
    /// Text for the samples and the ablation perplexity (default: the short confirmation text
    /// shipped with swk).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Most tokens per sample.
    #[arg(long, default_value_t = 64)]
    sample_len: usize,
    /// Perplexity window (text tokens) of the ablation runs.
    #[arg(long, default_value_t = 32)]
    context: usize,
    /// Skip the ablation of super experts (router and spike statistics only).
    #[arg(long)]
    no_ablate: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Weight storage on a CUDA device (`--device cuda`).
    #[arg(long, value_enum, default_value_t = GpuDtype::Auto)]
    gpu_dtype: GpuDtype,
}

/// The JSON output: the report and the backend that produced it.
#[derive(serde::Serialize)]
struct Output<'a> {
    /// `cpu`, or `cuda: NAME (DTYPE weights, ENGINE[, layers streamed])`.
    device: &'a str,
    #[serde(flatten)]
    report: &'a ExpertsReport,
}

pub fn run(a: Args, dev: DeviceOpts) -> Result<()> {
    if a.router_samples == 0 {
        return Err(swk::Error::Invalid("--router-samples must be at least 1".into()));
    }
    let text = read_text(a.text.as_deref())?;
    let (backend, mut model, lazy) = super::device::load(&a.model, a.json, dev, a.gpu_dtype)?;
    // Refuse a dense model before uploading it to a device.
    swk::model::arch::moe::params(&model.config)?;
    let samples = text_samples(&model, &text, a.router_samples, a.sample_len)?;
    let windows = if a.no_ablate {
        Vec::new()
    } else {
        ppl::windows(&model, &ppl::text_tokens(&model, &text)?, a.context)?
    };
    let cfg = ExpertsConfig { context: a.context, ablate: !a.no_ablate, ..Default::default() };
    let pb = super::bar(a.json, 1, "experts");
    let progress = super::stages(&pb);
    let (r, device) = match backend {
        Backend::Cpu => {
            (experts::experts_with(&mut model, &samples, &windows, &cfg, progress)?, "cpu".into())
        }
        Backend::Cuda => {
            cuda_experts(&model, lazy, &samples, &windows, &cfg, a.gpu_dtype, progress)?
        }
    };
    pb.finish_and_clear();
    if a.json {
        return super::print_json(&Output { device: &device, report: &r });
    }
    println!("device {device}");
    println!("{} samples, {} tokens, top-{} routing", r.samples, r.tokens, r.top_k);
    println!("{:>5} {:>8} {:>13} {:>7}", "layer", "tokens", "entropy/max", "unused");
    for l in &r.layers {
        println!(
            "{:>5} {:>8} {:>6.3}/{:<6.3} {:>7}",
            l.layer, l.tokens, l.mean_entropy, l.max_entropy, l.unused_experts
        );
    }
    println!(
        "{:>5} {:>6} {:>8} {:>6} {:>10} {:>6} {:>4} {:>10} {:>6} {:>4}",
        "layer", "expert", "selected", "freq", "max in", "col", "pos", "max out", "row", "pos"
    );
    for e in &r.experts {
        println!(
            "{:>5} {:>6} {:>8} {:>6.3} {:>10.3} {:>6} {:>4} {:>10.3} {:>6} {:>4}",
            e.layer,
            e.expert,
            e.selected,
            e.frequency,
            e.max_input,
            e.max_input_col,
            e.max_input_position,
            e.max_output,
            e.max_output_row,
            e.max_output_position
        );
    }
    println!(
        "super experts (max |down_proj out| > P{} = {:.3} and > {} x max {:.3}): {}",
        r.config.percentile,
        r.percentile_threshold,
        r.config.fraction_of_max,
        r.overall_max,
        r.super_experts.len()
    );
    if let Some(b) = r.baseline_perplexity {
        println!(
            "baseline perplexity {b:.3} over {} tokens; ablation: {}",
            r.tokens_scored, r.ablation
        );
    }
    for s in &r.super_experts {
        let ratio = s.perplexity_ratio.map_or("-".to_string(), |x| format!("{x:.3}"));
        println!(
            "  layer {} expert {}: max out {:.3} (row {}, pos {}), {:.3} of max, ppl x {ratio}",
            s.layer,
            s.expert,
            s.max_output,
            s.max_output_row,
            s.max_output_position,
            s.fraction_of_max
        );
    }
    Ok(())
}

/// [`experts::experts_with`] on CUDA device 0; returns the report and a description of the
/// device.
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
fn cuda_experts(
    model: &swk::Model,
    lazy: Option<super::device::Files>,
    samples: &[Vec<u32>],
    windows: &[Vec<u32>],
    cfg: &ExpertsConfig,
    dtype: GpuDtype,
    progress: impl FnMut(usize, usize, &str),
) -> Result<(ExpertsReport, String)> {
    let (mut gpu, what) = super::device::cuda_session(model, lazy, dtype)?;
    Ok((experts::experts_with(&mut gpu, samples, windows, cfg, progress)?, what))
}

#[cfg(not(any(feature = "cuda", feature = "cuda-emu")))]
fn cuda_experts(
    _: &swk::Model,
    _: Option<super::device::Files>,
    _: &[Vec<u32>],
    _: &[Vec<u32>],
    _: &ExpertsConfig,
    _: GpuDtype,
    _: impl FnMut(usize, usize, &str),
) -> Result<(ExpertsReport, String)> {
    Err(swk::Error::Backend("built without the `cuda` feature".into()))
}
