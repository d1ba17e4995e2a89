//! `swk groups MODEL [--prompt TEXT]... [--text FILE] [--context N] [--per-layer K]
//! [--max-members N] [--decisive-ratio F] [--json] [--gpu-dtype auto|bf16|f16|f32]` (runs on
//! `--device cuda` too: captures, writers and ablations).

use std::path::PathBuf;

use swk::analysis::groups::{self, GroupsConfig, GroupsReport, Verdict};
use swk::eval::ppl;
use swk::{Model, Result};

use super::analysis::{read_text, Described};
use super::device::{Backend, DeviceOpts, GpuDtype};

/// Arguments of `swk groups`.
#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face directory, or a hub id (org/name).
    model: String,
    /// Prompts in which to find massive activations (default: detection's prompt).
    #[arg(long)]
    prompt: Vec<String>,
    /// Text for perplexity (default: the short confirmation text shipped with swk).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Perplexity window in text tokens.
    #[arg(long, default_value_t = 32)]
    context: usize,
    /// Writers kept per layer.
    #[arg(long, default_value_t = 2, value_name = "K")]
    per_layer: usize,
    /// Most writers per massive activation.
    #[arg(long, default_value_t = 8, value_name = "N")]
    max_members: usize,
    /// Perplexity ratio above which an ablation is decisive.
    #[arg(long, default_value_t = 2.0, value_name = "F")]
    decisive_ratio: f64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Weight storage on a CUDA device (`--device cuda`).
    #[arg(long, value_enum, default_value_t = GpuDtype::Auto)]
    gpu_dtype: GpuDtype,
}

pub fn run(a: Args, dev: DeviceOpts) -> Result<()> {
    let text = read_text(a.text.as_deref())?;
    let (backend, mut model, lazy) = super::device::load(&a.model, a.json, dev, a.gpu_dtype)?;
    let prompts =
        if a.prompt.is_empty() { vec![swk::detect::DEFAULT_PROMPT.to_string()] } else { a.prompt };
    let tok = model.tokenizer()?;
    let prompts = prompts.iter().map(|p| tok.encode(p, true)).collect::<Result<Vec<_>>>()?;
    let tokens = ppl::text_tokens(&model, &text)?;
    let cfg = GroupsConfig {
        context: a.context,
        per_layer: a.per_layer.max(1),
        max_members: a.max_members.max(1),
        decisive_ratio: a.decisive_ratio,
        ..Default::default()
    };
    let pb = super::bar(a.json, 1, "groups");
    let progress = super::stages(&pb);
    let (r, device) = match backend {
        Backend::Cpu => {
            (groups::groups(&mut model, &prompts, &tokens, &cfg, progress)?, "cpu".to_string())
        }
        Backend::Cuda => {
            let windows = ppl::windows(&model, &tokens, a.context)?;
            cuda_groups(&model, lazy, a.gpu_dtype, &prompts, &windows, &cfg, progress)?
        }
    };
    pb.finish_and_clear();
    if a.json {
        return super::print_json(&Described { device: &device, report: &r });
    }
    println!("device {device}");
    println!(
        "baseline perplexity {:.3} over {} tokens (windows of {}); {} massive activations, {} \
         groups; {} perplexity runs in {:.1} s",
        r.baseline_perplexity,
        r.tokens_scored,
        r.config.context,
        r.activations.len(),
        r.groups,
        r.perplexity_runs,
        r.seconds
    );
    for g in &r.activations {
        let m = &g.activation;
        let verdict = match g.verdict {
            Verdict::Group => "GROUP (jointly decisive, no member alone)",
            Verdict::Single => "a member is decisive alone",
            Verdict::NotDecisive => "not decisive even jointly",
            Verdict::NoWriters => "no down_proj writer",
        };
        let joint = g.joint_ratio.map_or("-".to_string(), |x| format!("{x:.3}"));
        println!(
            "dim {} pos {} (prompt {}): {:.2} after layer {} (first massive after layer {}, \
             {:.0}x median); joint ppl x {joint}: {verdict}",
            m.dim, m.position, m.prompt, m.value, m.peak_layer, m.first_layer, m.ratio_to_median
        );
        for w in &g.members {
            println!(
                "    layer {:>3} [{}, {}]  w {:>9.4}  x {:>10.3}  w*x {:>10.3}  alone ppl x {:.3}",
                w.layer, w.row, w.col, w.value, w.input, w.contribution, w.single_ratio
            );
        }
        if let Some(mg) = &g.minimal {
            println!("    minimal decisive subset {:?}: ppl x {:.3}", mg.members, mg.ratio);
        }
    }
    Ok(())
}

/// The groups (captures, writers and ablations) on CUDA device 0 (the layers streamed or
/// uploaded from `lazy`'s files when given); returns the report and a description of the
/// device.
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
fn cuda_groups(
    model: &Model,
    lazy: Option<super::device::Files>,
    dtype: GpuDtype,
    prompts: &[Vec<u32>],
    windows: &[Vec<u32>],
    cfg: &GroupsConfig,
    progress: impl FnMut(usize, usize, &str),
) -> Result<(GroupsReport, String)> {
    let (mut gpu, what) = super::device::cuda_session(model, lazy, dtype)?;
    Ok((groups::groups_with(&mut gpu, prompts, windows, cfg, progress)?, what))
}

#[cfg(not(any(feature = "cuda", feature = "cuda-emu")))]
fn cuda_groups(
    _: &Model,
    _: Option<super::device::Files>,
    _: GpuDtype,
    _: &[Vec<u32>],
    _: &[Vec<u32>],
    _: &GroupsConfig,
    _: impl FnMut(usize, usize, &str),
) -> Result<(GroupsReport, String)> {
    Err(swk::Error::Backend("built without the `cuda` feature".into()))
}
