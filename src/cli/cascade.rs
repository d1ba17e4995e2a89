//! `swk cascade MODEL [--prompt TEXT] [--row R]... [--top N] [--edit SPEC]...
//! [--from-detect FILE] [--json] [--out PLOT.svg] [--gpu-dtype auto|bf16|f16|f32]` (runs on `--device
//! cuda` too).

use std::path::PathBuf;

use swk::analysis::{self, cascade, token_labels, AnalysisBackend};
use swk::edit::WeightEdit;
use swk::Result;

use super::analysis::{edits_line, run_job, Described, EditSource, Fallback, Job, Target};
use super::device::{DeviceOpts, GpuDtype};

/// Arguments of `swk cascade`.
#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face directory, or a hub id (org/name).
    model: String,
    /// Prompt (tokenized with the model's special-token convention).
    #[arg(long, default_value = swk::detect::DEFAULT_PROMPT)]
    prompt: String,
    /// Hidden dim to follow (repeatable; default: the rows the edits write).
    #[arg(long)]
    row: Vec<usize>,
    /// Massive activations listed per layer.
    #[arg(long, default_value_t = 3)]
    top: usize,
    /// Massive-activation criterion: |a| above this.
    #[arg(long, default_value_t = 100.0)]
    min_abs: f32,
    /// Massive-activation criterion: |a| above this multiple of the layer's median |a|.
    #[arg(long, default_value_t = 1000.0)]
    min_ratio: f32,
    #[command(flatten)]
    edits: EditSource,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Write a line plot across layers (SVG, or PNG when named .png).
    #[arg(long, value_name = "PLOT.svg")]
    out: Option<PathBuf>,
    /// Also write the plot as PNG next to it (same name, .png).
    #[arg(long, requires = "out")]
    png: bool,
    /// Weight storage on a CUDA device (`--device cuda`).
    #[arg(long, value_enum, default_value_t = GpuDtype::Auto)]
    gpu_dtype: GpuDtype,
}

/// The cascade on a backend, with a spinner.
struct Cascade {
    tokens: Vec<u32>,
    labels: Vec<String>,
    cfg: cascade::CascadeConfig,
    quiet: bool,
}

impl Job for Cascade {
    type Out = cascade::CascadeReport;
    fn run<B: AnalysisBackend>(
        self,
        backend: &mut B,
        edits: Vec<WeightEdit>,
    ) -> Result<cascade::CascadeReport> {
        let sp = super::spinner(self.quiet, "cascade".into());
        let r = cascade::cascade_with(backend, &self.tokens, &self.labels, &edits, &self.cfg);
        sp.finish_and_clear();
        r
    }
}

pub fn run(a: Args, dev: DeviceOpts) -> Result<()> {
    if let Some(p) = &a.out {
        analysis::plot::check_path(p)?;
    }
    let (backend, mut model, lazy) = super::device::load(&a.model, a.json, dev, a.gpu_dtype)?;
    let tokens = model.tokenizer()?.encode(&a.prompt, true)?;
    let labels = token_labels(&model, &tokens);
    let cfg = cascade::CascadeConfig {
        rows: a.row.clone(),
        top_massive: a.top,
        min_abs: a.min_abs,
        min_ratio: a.min_ratio,
    };
    let job = Cascade { tokens, labels, cfg, quiet: a.json };
    let target = Target { backend, lazy, dtype: a.gpu_dtype, quiet: a.json };
    let (r, device) = run_job(&mut model, target, &a.edits, Fallback::Confirmed, job)?;
    if let Some(p) = &a.out {
        cascade::plot(&r, p)?;
        if a.png {
            cascade::plot(&r, &analysis::plot::png_sibling(p))?;
        }
    }
    if a.json {
        return super::print_json(&Described { device: &device, report: &r });
    }
    println!("device  {device}");
    println!("edits   {}", edits_line(&r.edits));
    println!("tokens  {}", r.tokens.join(" "));
    println!(
        "massive: |a| > {} and > {}x the layer's median |a| (hook_resid_post)",
        r.config.min_abs, r.config.min_ratio
    );
    let peak = |v: &[f32]| {
        let (p, a) =
            v.iter()
                .enumerate()
                .fold((0, 0f32), |b, (i, &x)| if x.abs() > b.1.abs() { (i, x) } else { b });
        format!("{a:.1}@{p}")
    };
    let mut header = format!("{:>5}", "layer");
    for row in &r.config.rows {
        header += &format!(" {:>14} {:>14}", format!("dim {row} base"), "edited");
    }
    header += &format!(
        " {:>9} {:>9} {:>5} {:>5}  top massive (base)",
        "med base", "med ed", "#base", "#ed"
    );
    println!("{header}");
    for l in &r.layers {
        let mut line = format!("{:>5}", l.layer);
        for rv in &l.rows {
            line += &format!(" {:>14} {:>14}", peak(&rv.base), peak(&rv.edited));
        }
        let top: Vec<String> =
            l.base.top.iter().map(|m| format!("{}@{} {:.0}", m.dim, m.position, m.value)).collect();
        line += &format!(
            " {:>9.3} {:>9.3} {:>5} {:>5}  {}",
            l.base.median_abs,
            l.edited.median_abs,
            l.base.count,
            l.edited.count,
            top.join(", ")
        );
        println!("{line}");
    }
    for s in &r.summary {
        println!(
            "\ndim {}: peak |a| {:.1} -> {:.1} with the edits; massive in layers {:?} -> {:?}",
            s.row, s.peak_base, s.peak_edited, s.massive_layers_base, s.massive_layers_edited
        );
    }
    if let Some(p) = &a.out {
        println!("\nplot written to {}", p.display());
    }
    Ok(())
}
