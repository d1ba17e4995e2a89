//! `swk ppl MODEL (--text FILE | --dataset wikitext|FILE) [--context N] [--edit SPEC]...
//! [--json] [--gpu-dtype auto|bf16|f16|f32]`.

use std::path::PathBuf;

use super::device::GpuDtype;
use swk::edit::EditGuard;
use swk::eval::ppl;
use swk::{Error, Result};

/// Arguments of `swk ppl`.
#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face directory, or a hub id (org/name).
    model: String,
    /// The text file to score.
    #[arg(long, required_unless_present = "dataset", conflicts_with = "dataset")]
    text: Option<PathBuf>,
    /// A data set to score: `wikitext` (WikiText-2 raw test split from the Hugging Face
    /// cache) or a local .parquet/.jsonl (its `text` column) or text file.
    #[arg(long, value_name = "wikitext|FILE")]
    dataset: Option<String>,
    /// Window length in text tokens.
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Weight edit applied for this run (repeatable): zero:L,R,C, scale:L,R,C,F, set:L,R,C,V
    /// or TENSOR[R,C]=zero|xF|V. Restored afterwards.
    #[arg(long)]
    edit: Vec<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Weight storage on a CUDA device (`--device cuda`).
    #[arg(long, value_enum, default_value_t = GpuDtype::Auto)]
    gpu_dtype: GpuDtype,
}

pub fn run(a: Args, dev: super::device::DeviceOpts) -> Result<()> {
    let text = match (&a.text, &a.dataset) {
        (Some(p), _) => std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?,
        (None, Some(d)) => swk::eval::dataset::load_text(d)?,
        (None, None) => return Err(Error::Invalid("give --text FILE or --dataset NAME".into())),
    };
    let edits = super::parse_edits(&a.edit)?;
    let dev = dev.holding(a.context);
    let (backend, mut model, lazy) = super::device::load(&a.model, a.json, dev, a.gpu_dtype)?;
    let tokens = ppl::text_tokens(&model, &text)?;
    let pb = super::bar(a.json, tokens.len().div_ceil(a.context.max(1)) as u64, "perplexity");
    let progress = |done: usize, _: usize| pb.set_position(done as u64);
    let (r, log, device) = match backend {
        super::device::Backend::Cpu => {
            let mut m = EditGuard::new(&mut model);
            m.apply_all(&edits)?;
            let r = ppl::perplexity(&m, &tokens, a.context, progress)?;
            (r, m.log().to_vec(), "cpu".to_string())
        }
        super::device::Backend::Cuda => {
            cuda_perplexity(&model, lazy, a.gpu_dtype, &tokens, a.context, &edits, progress)?
        }
    };
    pb.finish_and_clear();
    if a.json {
        return super::print_json(&serde_json::json!({
            "perplexity": r.perplexity,
            "tokens_scored": r.tokens_scored,
            "nll_sum": r.nll_sum,
            "seconds": r.seconds,
            "context": r.context,
            "windows": r.windows,
            "dataset": a.dataset,
            "edits": log,
            "device": device,
        }));
    }
    for e in &log {
        if e.len > 1 {
            println!(
                "edit           {} ({} elements; first {} -> {})",
                e.edit, e.len, e.original, e.new
            );
        } else {
            println!("edit           {} ({} -> {})", e.edit, e.original, e.new);
        }
    }
    println!("perplexity     {:.4}", r.perplexity);
    println!("tokens scored  {}", r.tokens_scored);
    println!("nll sum        {:.4}", r.nll_sum);
    println!("windows        {} x {} tokens", r.windows, r.context);
    println!("seconds        {:.2}", r.seconds);
    Ok(())
}

#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
fn cuda_perplexity(
    model: &swk::Model,
    lazy: Option<super::device::Files>,
    dtype: GpuDtype,
    tokens: &[u32],
    context: usize,
    edits: &[swk::edit::WeightEdit],
    progress: impl FnMut(usize, usize),
) -> Result<(ppl::Perplexity, Vec<swk::edit::EditRecord>, String)> {
    let (mut gpu, device) = super::device::cuda_session(model, lazy, dtype)?;
    let mut g = EditGuard::new(&mut gpu);
    g.apply_all(edits)?;
    let windows = ppl::windows(model, tokens, context)?;
    Ok((g.perplexity(&windows, context, progress)?, g.log().to_vec(), device))
}

#[cfg(not(any(feature = "cuda", feature = "cuda-emu")))]
fn cuda_perplexity(
    _: &swk::Model,
    _: Option<super::device::Files>,
    _: GpuDtype,
    _: &[u32],
    _: usize,
    _: &[swk::edit::WeightEdit],
    _: impl FnMut(usize, usize),
) -> Result<(ppl::Perplexity, Vec<swk::edit::EditRecord>, String)> {
    Err(Error::Backend("built without the `cuda` feature".into()))
}
