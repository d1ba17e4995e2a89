//! `swk compare-generate MODEL [--prompt TEXT]... [--factor F]... [--max-new-tokens N]
//! [--edit SPEC]... [--from-detect FILE] [--json] [--gpu-dtype auto|bf16|f16|f32]` (runs on `--device
//! cuda` too).

use swk::analysis::{compare, AnalysisBackend};
use swk::edit::WeightEdit;
use swk::io::tokenizer::Tokenizer;
use swk::Result;

use super::analysis::{edits_line, run_job, Described, EditSource, Fallback, Job, Target};
use super::device::{DeviceOpts, GpuDtype};

/// Prompts used when none is given (the paper's "Summer is hot. Winter is" among them).
const DEFAULT_PROMPTS: [&str; 4] = [
    "Summer is hot. Winter is",
    "The capital of France is",
    "Apple Inc. is a worldwide tech company.",
    "Once upon a time, there was a",
];

/// Arguments of `swk compare-generate`.
#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face directory, or a hub id (org/name).
    model: String,
    /// Prompt (repeatable; default: four short prompts).
    #[arg(long)]
    prompt: Vec<String>,
    /// Scale factor for the edited weights (repeatable; 0 zeroes them; default 0, 0.5, 2, 3).
    #[arg(long)]
    factor: Vec<f32>,
    /// Tokens to generate at most per continuation.
    #[arg(long, default_value_t = 24)]
    max_new_tokens: usize,
    #[command(flatten)]
    edits: EditSource,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Weight storage on a CUDA device (`--device cuda`).
    #[arg(long, value_enum, default_value_t = GpuDtype::Auto)]
    gpu_dtype: GpuDtype,
}

/// The continuations on a backend, with a progress bar.
struct Generate {
    tok: Tokenizer,
    prompts: Vec<Vec<u32>>,
    cfg: compare::CompareConfig,
    quiet: bool,
}

impl Job for Generate {
    type Out = compare::CompareReport;
    fn run<B: AnalysisBackend>(
        self,
        backend: &mut B,
        edits: Vec<WeightEdit>,
    ) -> Result<compare::CompareReport> {
        let pb = super::bar(self.quiet, 1, "generating");
        let (tok, prompts) = (Some(&self.tok), &self.prompts);
        let r = compare::compare_generate_with(
            backend,
            tok,
            prompts,
            &edits,
            &self.cfg,
            super::steps(&pb),
        )?;
        pb.finish_and_clear();
        Ok(r)
    }
}

pub fn run(a: Args, dev: DeviceOpts) -> Result<()> {
    let (backend, mut model, lazy) = super::device::load(&a.model, a.json, dev, a.gpu_dtype)?;
    let texts: Vec<String> = if a.prompt.is_empty() {
        DEFAULT_PROMPTS.iter().map(|s| s.to_string()).collect()
    } else {
        a.prompt.clone()
    };
    let tok = model.tokenizer()?.clone();
    let prompts = texts.iter().map(|p| tok.encode(p, true)).collect::<Result<Vec<_>>>()?;
    let mut cfg = compare::CompareConfig { max_new_tokens: a.max_new_tokens, ..Default::default() };
    if !a.factor.is_empty() {
        cfg.factors = a.factor.clone();
    }
    let job = Generate { tok, prompts, cfg, quiet: a.json };
    let target = Target { backend, lazy, dtype: a.gpu_dtype, quiet: a.json };
    let (r, device) = run_job(&mut model, target, &a.edits, Fallback::Confirmed, job)?;
    if a.json {
        return super::print_json(&Described { device: &device, report: &r });
    }
    println!("device {device}");
    println!("edited weights: {} (scaled by each factor)", edits_line(&r.edits));
    for (text, p) in texts.iter().zip(&r.prompts) {
        println!("\nprompt: {text}");
        println!("{:>9} {:>7} {:>8}  continuation", "variant", "p(1st)", "mean lp");
        for c in &p.continuations {
            println!(
                "{:>9} {:>7.3} {:>8.3}  {}",
                c.label,
                c.first_token_prob,
                c.mean_logprob,
                c.text.replace('\n', "\\n")
            );
        }
    }
    Ok(())
}
