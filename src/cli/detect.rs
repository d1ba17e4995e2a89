//! `swk detect MODEL [--prompt TEXT]... [--threshold F] [--max-iterations N]
//! [--confirm-text FILE] [--confirm-ratio F] [--json] [--out FILE]`.

use std::path::PathBuf;

use swk::detect::{self, DetectConfig, Detection};
use swk::detect_report::DetectReport;
use swk::{Error, Result};

use super::device::GpuDtype;

/// Arguments of `swk detect`.
#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face directory, or a hub id (org/name).
    model: String,
    /// Prompt to probe with (repeatable; default: the paper's "Apple Inc. ..." prompt).
    #[arg(long)]
    prompt: Vec<String>,
    /// Spike threshold on |activation|.
    #[arg(long, default_value_t = 50.0)]
    threshold: f32,
    /// Most zero-and-rerun iterations per prompt.
    #[arg(long, default_value_t = 10)]
    max_iterations: usize,
    /// Text for causal confirmation (default: the short text shipped with swk).
    #[arg(long)]
    confirm_text: Option<PathBuf>,
    /// Perplexity ratio above which a candidate counts as confirmed.
    #[arg(long, default_value_t = 2.0)]
    confirm_ratio: f64,
    /// Skip causal confirmation (report every spike as the paper does).
    #[arg(long)]
    no_confirm: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Weight storage on a CUDA device (`--device cuda`): auto keeps an f16 or bf16
    /// checkpoint's values exact (else bf16, half of f32's memory); f32 matches the CPU
    /// backend's numbers most closely.
    #[arg(long, value_enum, default_value_t = GpuDtype::Auto)]
    gpu_dtype: GpuDtype,
}

pub fn run(a: Args, dev: super::device::DeviceOpts) -> Result<()> {
    let mut cfg = DetectConfig {
        threshold: a.threshold,
        max_iterations: a.max_iterations,
        confirm_ratio: a.confirm_ratio,
        skip_confirmation: a.no_confirm,
        ..DetectConfig::default()
    };
    if !a.prompt.is_empty() {
        cfg.prompts = a.prompt.clone();
    }
    if let Some(p) = &a.confirm_text {
        cfg.confirm_text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
    }
    let (backend, mut m, lazy) = super::device::load(&a.model, a.json, dev, a.gpu_dtype)?;
    let pb = super::bar(a.json, 1, "detect");
    let progress = super::stages(&pb);
    let (d, device): (Detection, String) = match backend {
        super::device::Backend::Cpu => (detect::detect(&mut m, &cfg, progress)?, "cpu".into()),
        super::device::Backend::Cuda => cuda_detect(&m, lazy, &cfg, a.gpu_dtype, progress)?,
    };
    pb.finish_and_clear();
    let report = swk::detect_report::report(&a.model, &m, &cfg, &d, &device)?;
    if let Some(out) = &a.out {
        let s = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::Json { path: out.clone(), source: e })?;
        std::fs::write(out, s).map_err(|e| Error::io(out, e))?;
    }
    if a.json {
        return super::print_json(&report);
    }
    print_table(&report, &cfg);
    Ok(())
}

fn print_table(r: &DetectReport<'_>, cfg: &DetectConfig) {
    println!(
        "model {} ({}), threshold {}, {} prompt(s), device {}",
        r.model,
        r.architecture,
        r.threshold,
        r.prompts.len(),
        r.device
    );
    if let Some(b) = r.baseline_perplexity {
        println!(
            "confirmation: baseline perplexity {b:.3} over {} tokens, confirm ratio > {}",
            r.confirm_tokens, cfg.confirm_ratio
        );
    }
    let header = format!(
        "{:>5} {:>6} {:>6} {:>10} {:>10} {:>10} {:>4} {:>4} {:>6} {:>9} {:>11}",
        "layer",
        "row",
        "col",
        "weight",
        "input",
        "output",
        "pos",
        "iter",
        "fired",
        "ppl x",
        "catalog"
    );
    for (title, list) in [
        ("super weights (confirmed)", &r.super_weights),
        ("rejected spikes (zeroing did not matter)", &r.rejected),
    ] {
        println!("\n{title}: {}", list.len());
        if list.is_empty() {
            continue;
        }
        println!("{header}");
        for x in list {
            let s = x.sw;
            let ratio = s.perplexity_ratio.map_or("-".to_string(), |p| format!("{p:.2}"));
            // An expert's weight shows as `layer.eE`, a shared expert's as `layer.sh`.
            let layer = match (s.expert, s.shared_expert) {
                (Some(e), _) => format!("{}.e{e}", s.layer),
                (None, true) => format!("{}.sh", s.layer),
                (None, false) => s.layer.to_string(),
            };
            println!(
                "{:>5} {:>6} {:>6} {:>10.4} {:>10.2} {:>10.2} {:>4} {:>4} {:>3}/{:<2} {:>9} {:>11}",
                layer,
                s.row,
                s.col,
                s.value,
                s.input_activation,
                s.output_activation,
                s.token_position,
                s.iteration,
                s.prompts_fired,
                r.prompts.len(),
                ratio,
                format!("{:?}", x.catalog).to_lowercase()
            );
        }
    }
    for e in &r.catalog_entries {
        println!("\ncatalog: {} lists {:?} ({})", e.model, e.coordinates, e.source);
    }
    println!("\n{:.2} s; weights checksum {} (restored bit-exact)", r.seconds, r.weights_checksum);
}

/// Detection on CUDA device 0; returns the detection and a description of the device.
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
fn cuda_detect(
    model: &swk::Model,
    lazy: Option<super::device::Files>,
    cfg: &DetectConfig,
    dtype: GpuDtype,
    progress: impl FnMut(usize, usize, &str),
) -> Result<(Detection, String)> {
    let inputs = detect::detect_inputs(model, cfg)?;
    let (mut gpu, what) = super::device::cuda_session(model, lazy, dtype)?;
    Ok((detect::detect_with(&mut gpu, &inputs.prompts, &inputs.windows, cfg, progress)?, what))
}

#[cfg(not(any(feature = "cuda", feature = "cuda-emu")))]
fn cuda_detect(
    _: &swk::Model,
    _: Option<super::device::Files>,
    _: &DetectConfig,
    _: GpuDtype,
    _: impl FnMut(usize, usize, &str),
) -> Result<(Detection, String)> {
    Err(Error::Backend("built without the `cuda` feature".into()))
}
