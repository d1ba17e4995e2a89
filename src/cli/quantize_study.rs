//! `swk quantize-study MODEL [--text FILE] [--context N] [--bits B] [--block-size N]...
//! [--clip-z Z | --no-clip] [--edit SPEC]... [--from-detect FILE] [--json] [--out PLOT.svg]
//! [--gpu-dtype auto|bf16|f16|f32]` (runs on `--device cuda` too, with the model resident there).

use std::path::PathBuf;

use swk::analysis::{self, quantize, AnalysisBackend};
use swk::edit::WeightEdit;
use swk::eval::ppl;
use swk::{Error, Result};

use super::analysis::{
    edits_line, read_text, run_job, Described, EditSource, Fallback, Job, Target,
};
use super::device::{DeviceOpts, GpuDtype};

/// Arguments of `swk quantize-study`.
#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face directory, or a hub id (org/name).
    model: String,
    /// Text for perplexity (default: the short confirmation text shipped with swk).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Perplexity window in text tokens.
    #[arg(long, default_value_t = 128)]
    context: usize,
    /// Bits per weight.
    #[arg(long, default_value_t = 4)]
    bits: u32,
    /// Block size (repeatable; default 64 to 2^20 in steps of 4x).
    #[arg(long)]
    block_size: Vec<usize>,
    /// Z-score of |w| above which weights are clipped in the clipping variants.
    #[arg(long, default_value_t = 6.0)]
    clip_z: f32,
    /// Skip the clipping variants.
    #[arg(long)]
    no_clip: bool,
    /// Quantize only the linear tensors whose name contains this (e.g. down_proj).
    #[arg(long, value_name = "SUBSTRING")]
    only: Option<String>,
    /// The weights to hold out (default: the super weights `swk detect` confirms).
    #[command(flatten)]
    edits: EditSource,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Write a plot of perplexity against block size (SVG, or PNG when named .png).
    #[arg(long, value_name = "PLOT.svg")]
    out: Option<PathBuf>,
    /// Also write the plot as PNG next to it (same name, .png).
    #[arg(long, requires = "out")]
    png: bool,
    /// Weight storage on a CUDA device (`--device cuda`); quantized values are stored so.
    #[arg(long, value_enum, default_value_t = GpuDtype::Auto)]
    gpu_dtype: GpuDtype,
}

/// The study on a backend, with a progress bar.
struct Study {
    windows: Vec<Vec<u32>>,
    tensors: Vec<String>,
    cfg: quantize::StudyConfig,
    quiet: bool,
}

impl Job for Study {
    type Out = quantize::QuantStudy;
    fn run<B: AnalysisBackend>(
        self,
        backend: &mut B,
        held: Vec<WeightEdit>,
    ) -> Result<quantize::QuantStudy> {
        let pb = super::bar(self.quiet, 1, "quantize");
        let (w, t) = (&self.windows, &self.tensors);
        let r = quantize::quantize_study_with(backend, w, t, &held, &self.cfg, super::stages(&pb));
        pb.finish_and_clear();
        r
    }
}

pub fn run(a: Args, dev: DeviceOpts) -> Result<()> {
    if let Some(p) = &a.out {
        analysis::plot::check_path(p)?;
    }
    let text = read_text(a.text.as_deref())?;
    let (backend, mut model, lazy) = super::device::load_whole(&a.model, a.json, dev, a.gpu_dtype)?;
    if lazy.is_some() {
        return Err(Error::Invalid(
            "quantize-study rewrites every linear weight, so it needs the model resident on the \
             device; it does not run with layers streamed (use --stream never, or --device cpu)"
                .into(),
        ));
    }
    let tokens = ppl::text_tokens(&model, &text)?;
    let mut cfg = quantize::StudyConfig {
        bits: a.bits,
        clip_z: (!a.no_clip).then_some(a.clip_z),
        context: a.context,
        only: a.only.clone(),
        ..Default::default()
    };
    if !a.block_size.is_empty() {
        cfg.block_sizes = a.block_size.clone();
    }
    let windows = ppl::windows(&model, &tokens, cfg.context)?;
    let tensors = quantize::linear_tensors(&model, cfg.only.as_deref());
    let job = Study { windows, tensors, cfg, quiet: a.json };
    let target = Target { backend, lazy, dtype: a.gpu_dtype, quiet: a.json };
    let (r, device) = run_job(&mut model, target, &a.edits, Fallback::Confirmed, job)?;
    if let Some(p) = &a.out {
        quantize::plot(&r, p)?;
        if a.png {
            quantize::plot(&r, &analysis::plot::png_sibling(p))?;
        }
    }
    if a.json {
        return super::print_json(&Described { device: &device, report: &r });
    }
    println!("device   {device}");
    println!("held out: {}", edits_line(&r.held_out));
    println!(
        "RTN asymmetric min-max, {} bits, {}; perplexity over {} tokens (windows of {})",
        r.config.bits,
        r.config.only.as_ref().map_or("all linear weights of the blocks".to_string(), |o| format!(
            "linear weights matching `{o}`"
        )),
        r.tokens_scored,
        r.config.context
    );
    println!("unquantized perplexity {:.3}", r.baseline_perplexity);
    let names: Vec<String> = r
        .rows
        .first()
        .map(|row| row.variants.iter().map(|v| v.name.clone()).collect())
        .unwrap_or_default();
    println!("cells: perplexity (x unquantized) / mean KL(unquantized || quantized) in nats");
    let mut header = format!("{:>10}", "block");
    for n in &names {
        header += &format!(" {n:>26}");
    }
    println!("{header}");
    for row in &r.rows {
        let mut line = format!("{:>10}", row.block_size);
        for v in &row.variants {
            let kl = v.mean_kl.map_or("-".to_string(), |k| format!("{k:.4}"));
            line += &format!(" {:>26}", format!("{:.3} ({:.2}x) / {kl}", v.perplexity, v.ratio));
        }
        println!("{line}");
    }
    if let Some(z) = r.config.clip_z {
        println!("(+clip: |w| clipped above mean + {z} std of |w| in each block)");
    }
    if let Some(p) = &a.out {
        println!("\nplot written to {}", p.display());
    }
    Ok(())
}
