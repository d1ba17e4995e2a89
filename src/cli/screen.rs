//! `swk screen MODEL [--text FILE] [--context N] [--top-largest K] [--edit SPEC]...
//! [--from-detect FILE] [--json] [--gpu-dtype auto|bf16|f16|f32]` (runs on `--device cuda` too).

use std::borrow::Cow;
use std::path::PathBuf;

use swk::analysis::screen::{self, ScreenConfig, ScreenReport};
use swk::analysis::AnalysisBackend;
use swk::edit::WeightEdit;
use swk::eval::ppl;
use swk::{Model, Result};

use super::analysis::{read_text, run_job, Described, EditSource, Fallback, Job, Target};
use super::device::{DeviceOpts, GpuDtype};

/// Arguments of `swk screen`.
#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face directory, or a hub id (org/name).
    model: String,
    /// Text for perplexity (default: the short confirmation text shipped with swk).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Perplexity window in text tokens (short windows measure first-token effects sharply).
    #[arg(long, default_value_t = 32)]
    context: usize,
    /// Also screen the K largest-|w| down_proj weights of the model.
    #[arg(long, default_value_t = 0, value_name = "K")]
    top_largest: usize,
    /// Candidates (default: every raw candidate of detection, without confirmation; a
    /// report's rejected spikes are included).
    #[command(flatten)]
    edits: EditSource,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Weight storage on a CUDA device (`--device cuda`).
    #[arg(long, value_enum, default_value_t = GpuDtype::Auto)]
    gpu_dtype: GpuDtype,
}

/// The ranking on a backend, with a progress bar.
struct Screening {
    windows: Vec<Vec<u32>>,
    largest: Vec<WeightEdit>,
    cfg: ScreenConfig,
    quiet: bool,
}

impl Job for Screening {
    type Out = ScreenReport;
    fn run<B: AnalysisBackend>(
        self,
        backend: &mut B,
        candidates: Vec<WeightEdit>,
    ) -> Result<ScreenReport> {
        let pb = super::bar(self.quiet, 1, "screen");
        let (windows, largest) = (&self.windows, &self.largest);
        let r = screen::screen_with(
            backend,
            windows,
            &candidates,
            largest,
            &self.cfg,
            super::stages(&pb),
        )?;
        pb.finish_and_clear();
        Ok(r)
    }
}

pub fn run(a: Args, dev: DeviceOpts) -> Result<()> {
    let text = read_text(a.text.as_deref())?;
    let (backend, mut model, lazy) = super::device::load(&a.model, a.json, dev, a.gpu_dtype)?;
    let tokens = ppl::text_tokens(&model, &text)?;
    let largest = match &lazy {
        None => screen::largest_down_proj(&model, a.top_largest)?,
        // Layers in the files (streamed or uploaded from them): read each down_proj there.
        Some(f) => screen::largest_down_proj_by(&model.config, a.top_largest, |l| {
            Ok(Cow::Owned(f.lazy.tensor(&Model::down_proj_name(l))?.data))
        })?,
    };
    let job = Screening {
        windows: ppl::windows(&model, &tokens, a.context)?,
        largest,
        cfg: ScreenConfig { top_largest: a.top_largest, context: a.context },
        quiet: a.json,
    };
    let target = Target { backend, lazy, dtype: a.gpu_dtype, quiet: a.json };
    let (r, device) = run_job(&mut model, target, &a.edits, Fallback::Candidates, job)?;
    if a.json {
        return super::print_json(&Described { device: &device, report: &r });
    }
    println!("device {device}");
    println!(
        "baseline perplexity {:.3} over {} tokens (windows of {})",
        r.baseline_perplexity, r.tokens_scored, r.config.context
    );
    println!(
        "{:>4} {:>5} {:>6} {:>6} {:>10} {:>10} {:>11} {:>9}",
        "rank", "layer", "row", "col", "value", "ppl", "ppl x", "source"
    );
    for e in &r.entries {
        let (l, row, col) = match e.coords {
            Some((l, r, c)) => (l.to_string(), r.to_string(), c.to_string()),
            None => (e.edit.to_string(), String::new(), String::new()),
        };
        println!(
            "{:>4} {:>5} {:>6} {:>6} {:>10.4} {:>10.3} {:>11.3} {:>9}",
            e.rank,
            l,
            row,
            col,
            e.value,
            e.perplexity,
            e.ratio,
            format!("{:?}", e.source).to_lowercase()
        );
    }
    Ok(())
}
