//! `swk generate MODEL --prompt TEXT [--max-new-tokens N] [--gpu-dtype auto|bf16|f16|f32]`.

use std::io::Write;

use super::device::GpuDtype;
use swk::edit::EditGuard;
use swk::eval::generate;
use swk::Result;

/// Arguments of `swk generate`.
#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face directory, or a hub id (org/name).
    model: String,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
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
    let edits = super::parse_edits(&a.edit)?;
    let dev = dev.holding(a.max_new_tokens);
    let (backend, mut model, lazy) = super::device::load(&a.model, a.json, dev, a.gpu_dtype)?;
    let tok = model.tokenizer()?.clone();
    let prompt = tok.encode(&a.prompt, true)?;
    if let Some(limit) = model.config.position_limit() {
        if prompt.len() + a.max_new_tokens > limit {
            eprintln!(
                "swk: note: {} has {limit} learned positions: at most {} new tokens after the \
                 prompt's {}",
                model.config.architecture.name(),
                limit.saturating_sub(prompt.len()),
                prompt.len()
            );
        }
    }
    let start = std::time::Instant::now();
    let mut shown = String::new();
    let mut so_far = Vec::new();
    if !a.json {
        print!("{}", a.prompt);
    }
    let on_token = |id| {
        if a.json {
            return;
        }
        so_far.push(id);
        if let Ok(text) = tok.decode(&so_far, true) {
            print!("{}", text.get(shown.len()..).unwrap_or(""));
            let _ = std::io::stdout().flush();
            shown = text;
        }
    };
    let (ids, log, device) = match backend {
        super::device::Backend::Cpu => {
            let mut m = EditGuard::new(&mut model);
            m.apply_all(&edits)?;
            let ids = generate::greedy(&m, &prompt, a.max_new_tokens, on_token)?;
            (ids, m.log().to_vec(), "cpu".to_string())
        }
        super::device::Backend::Cuda => {
            cuda_greedy(&model, lazy, a.gpu_dtype, &prompt, a.max_new_tokens, &edits, on_token)?
        }
    };
    let text = tok.decode(&ids, true)?;
    if a.json {
        return super::print_json(&serde_json::json!({
            "prompt": a.prompt,
            "prompt_tokens": prompt,
            "tokens": ids,
            "text": text,
            "seconds": start.elapsed().as_secs_f64(),
            "edits": log,
            "device": device,
        }));
    }
    println!();
    Ok(())
}

#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
fn cuda_greedy(
    model: &swk::Model,
    lazy: Option<super::device::Files>,
    dtype: GpuDtype,
    prompt: &[u32],
    max_new: usize,
    edits: &[swk::edit::WeightEdit],
    on_token: impl FnMut(u32),
) -> Result<(Vec<u32>, Vec<swk::edit::EditRecord>, String)> {
    let stops = model.tokenizer()?.eos_ids().to_vec();
    let (mut gpu, device) = super::device::cuda_session(model, lazy, dtype)?;
    let mut g = EditGuard::new(&mut gpu);
    g.apply_all(edits)?;
    Ok((g.greedy(prompt, max_new, &stops, on_token)?, g.log().to_vec(), device))
}

#[cfg(not(any(feature = "cuda", feature = "cuda-emu")))]
fn cuda_greedy(
    _: &swk::Model,
    _: Option<super::device::Files>,
    _: GpuDtype,
    _: &[u32],
    _: usize,
    _: &[swk::edit::WeightEdit],
    _: impl FnMut(u32),
) -> Result<(Vec<u32>, Vec<swk::edit::EditRecord>, String)> {
    Err(swk::Error::Backend("built without the `cuda` feature".into()))
}
