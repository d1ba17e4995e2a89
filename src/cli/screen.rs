//! `swk screen MODEL [--text FILE] [--context N] [--top-largest K] [--edit SPEC]...
//! [--from-detect FILE] [--json] [--gpu-dtype bf16|f32]` (runs on `--device cuda` too).

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;

use swk::analysis;
use swk::analysis::screen::{self, ScreenConfig, ScreenReport};
use swk::detect::{self, DetectBackend, DetectInputs};
use swk::edit::WeightEdit;
use swk::eval::ppl;
use swk::model::LazyModel;
use swk::{Model, Result};

use super::analysis::{read_text, EditSource};
use super::device::{Backend, DeviceOpts, GpuDtype};

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
    #[arg(long, value_enum, default_value_t = GpuDtype::Bf16)]
    gpu_dtype: GpuDtype,
}

/// The JSON output: the report and the backend that produced it.
#[derive(serde::Serialize)]
struct Output<'a> {
    /// `cpu`, or `cuda: NAME (DTYPE weights, ENGINE[, layers streamed])`.
    device: &'a str,
    #[serde(flatten)]
    report: &'a ScreenReport,
}

/// What a screening run needs besides the backend.
struct Job {
    windows: Vec<Vec<u32>>,
    given: Option<Vec<WeightEdit>>,
    largest: Vec<WeightEdit>,
    cfg: ScreenConfig,
    quiet: bool,
}

pub fn run(a: Args, dev: DeviceOpts) -> Result<()> {
    let text = read_text(a.text.as_deref())?;
    let bf16 = a.gpu_dtype == GpuDtype::Bf16;
    let (backend, mut model, lazy) = super::device::load(&a.model, a.json, dev, bf16)?;
    let tokens = ppl::text_tokens(&model, &text)?;
    let largest = match &lazy {
        None => screen::largest_down_proj(&model, a.top_largest)?,
        // Layers streamed: read each down_proj from the files.
        Some(lz) => screen::largest_down_proj_by(&model.config, a.top_largest, |l| {
            Ok(Cow::Owned(lz.tensor(&Model::down_proj_name(l))?.data))
        })?,
    };
    let job = Job {
        windows: ppl::windows(&model, &tokens, a.context)?,
        given: a.edits.given(true)?,
        largest,
        cfg: ScreenConfig { top_largest: a.top_largest, context: a.context },
        quiet: a.json,
    };
    // Without given candidates, detection's raw candidates (tokenized here, detected on the
    // backend that screens them).
    let inputs = match job.given {
        Some(_) => None,
        None => Some(detect::detect_inputs(&model, &analysis::detected_config(true))?),
    };
    let (r, device) = match backend {
        Backend::Cpu => {
            let candidates = candidates(&mut model, inputs.as_ref(), &job)?;
            (screen_on(&mut model, &candidates, &job)?, "cpu".to_string())
        }
        Backend::Cuda => cuda_screen(&model, lazy, inputs.as_ref(), &job, a.gpu_dtype)?,
    };
    if a.json {
        return super::print_json(&Output { device: &device, report: &r });
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

/// The given candidates, or those detection finds on `backend` (from `inputs`).
fn candidates<B: DetectBackend>(
    backend: &mut B,
    inputs: Option<&DetectInputs>,
    job: &Job,
) -> Result<Vec<WeightEdit>> {
    match inputs {
        Some(inputs) => super::analysis::detect_edits(backend, inputs, job.quiet, true),
        None => Ok(job.given.clone().unwrap_or_default()),
    }
}

/// [`screen::screen_with`] of `candidates` on `backend`, with a progress bar.
fn screen_on<B: DetectBackend>(
    backend: &mut B,
    candidates: &[WeightEdit],
    job: &Job,
) -> Result<ScreenReport> {
    let pb = super::bar(job.quiet, 1, "screen");
    let r = screen::screen_with(
        backend,
        &job.windows,
        candidates,
        &job.largest,
        &job.cfg,
        |done, total, what| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
            pb.set_message(what.to_string());
        },
    )?;
    pb.finish_and_clear();
    Ok(r)
}

/// Screening on CUDA device 0 (detection too, when no candidates were given); returns the
/// report and a description of the device.
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
fn cuda_screen(
    model: &Model,
    lazy: Option<Arc<LazyModel>>,
    inputs: Option<&DetectInputs>,
    job: &Job,
    dtype: GpuDtype,
) -> Result<(ScreenReport, String)> {
    let (mut gpu, what) = super::device::cuda_session(model, lazy, dtype)?;
    let candidates = candidates(&mut gpu, inputs, job)?;
    Ok((screen_on(&mut gpu, &candidates, job)?, what))
}

#[cfg(not(any(feature = "cuda", feature = "cuda-emu")))]
fn cuda_screen(
    _: &Model,
    _: Option<Arc<LazyModel>>,
    _: Option<&DetectInputs>,
    _: &Job,
    _: GpuDtype,
) -> Result<(ScreenReport, String)> {
    Err(swk::Error::Backend("built without the `cuda` feature".into()))
}
