//! `swk vocab MODEL [--text FILE] [--samples N] [--context N] [--top-k K] [--edit SPEC]...
//! [--from-detect FILE] [--json] [--out PLOT.svg] [--gpu-dtype auto|bf16|f16|f32]` (runs on `--device
//! cuda` too).

use std::path::PathBuf;

use swk::analysis::{self, vocab, AnalysisBackend};
use swk::edit::WeightEdit;
use swk::io::tokenizer::Tokenizer;
use swk::Result;

use super::analysis::{
    edits_line, read_text, run_job, Described, EditSource, Fallback, Job, Target,
};
use super::device::{DeviceOpts, GpuDtype};

/// Arguments of `swk vocab`.
#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face directory, or a hub id (org/name).
    model: String,
    /// Text to run (default: the short confirmation text shipped with swk).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Number of samples the text is cut into.
    #[arg(long, default_value_t = 16)]
    samples: usize,
    /// Most text tokens per sample.
    #[arg(long, default_value_t = 128)]
    context: usize,
    /// Tokens listed among the largest gains and losses.
    #[arg(long, default_value_t = 15)]
    top_k: usize,
    /// Include every token id's mean log-probability change in the JSON.
    #[arg(long)]
    all_tokens: bool,
    #[command(flatten)]
    edits: EditSource,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Write a bar chart of the probability shifts (SVG, or PNG when named .png).
    #[arg(long, value_name = "PLOT.svg")]
    out: Option<PathBuf>,
    /// Also write the plot as PNG next to it (same name, .png).
    #[arg(long, requires = "out")]
    png: bool,
    /// Weight storage on a CUDA device (`--device cuda`).
    #[arg(long, value_enum, default_value_t = GpuDtype::Auto)]
    gpu_dtype: GpuDtype,
}

/// The vocabulary effects on a backend, with a progress bar.
struct Effects {
    tok: Option<Tokenizer>,
    samples: Vec<Vec<u32>>,
    cfg: vocab::VocabConfig,
    quiet: bool,
}

impl Job for Effects {
    type Out = vocab::VocabReport;
    fn run<B: AnalysisBackend>(
        self,
        backend: &mut B,
        edits: Vec<WeightEdit>,
    ) -> Result<vocab::VocabReport> {
        let pb = super::bar(self.quiet, self.samples.len() as u64, "vocabulary effects");
        let (tok, samples) = (self.tok.as_ref(), &self.samples);
        let r = vocab::vocab_effects_with(backend, tok, samples, &edits, &self.cfg, |done, _| {
            pb.set_position(done as u64)
        })?;
        pb.finish_and_clear();
        Ok(r)
    }
}

pub fn run(a: Args, dev: DeviceOpts) -> Result<()> {
    if let Some(p) = &a.out {
        analysis::plot::check_path(p)?;
    }
    let text = read_text(a.text.as_deref())?;
    let (backend, mut model, lazy) = super::device::load(&a.model, a.json, dev, a.gpu_dtype)?;
    let samples = analysis::text_samples(&model, &text, a.samples, a.context)?;
    let cfg = vocab::VocabConfig { top_k: a.top_k, include_all: a.all_tokens };
    let job = Effects { tok: model.tokenizer.clone(), samples, cfg, quiet: a.json };
    let target = Target { backend, lazy, dtype: a.gpu_dtype, quiet: a.json };
    let (r, device) = run_job(&mut model, target, &a.edits, Fallback::Confirmed, job)?;
    if let Some(p) = &a.out {
        vocab::plot(&r, p)?;
        if a.png {
            vocab::plot(&r, &analysis::plot::png_sibling(p))?;
        }
    }
    if a.json {
        return super::print_json(&Described { device: &device, report: &r });
    }
    println!("device             {device}");
    println!("edits              {}", edits_line(&r.edits));
    println!("samples            {} ({} positions)", r.samples, r.positions);
    println!("mean KL(base||ed)  {:.4} nats (max {:.4})", r.mean_kl, r.max_kl);
    println!("top-1 agreement    {:.1} %", 100.0 * r.top1_agreement);
    println!("perplexity         {:.3} -> {:.3}", r.base_perplexity, r.edited_perplexity);
    println!("mean |d log p|     {:.4} nats over the vocabulary", r.mean_abs_logprob_change);
    let table = |title: &str, list: &[vocab::TokenShift]| {
        println!("\n{title}");
        println!(
            "{:>8} {:>22} {:>10} {:>10} {:>10} {:>7}",
            "id", "token", "d log p", "p base", "p edited", "x"
        );
        for t in list {
            let x = if t.mean_prob_base > 0.0 {
                t.mean_prob_edited / t.mean_prob_base
            } else {
                f64::INFINITY
            };
            println!(
                "{:>8} {:>22} {:>10.4} {:>10.6} {:>10.6} {:>7.2}",
                t.id,
                clip(&t.token, 22),
                t.mean_logprob_change,
                t.mean_prob_base,
                t.mean_prob_edited,
                x
            );
        }
    };
    table("gaining the most probability", &r.prob_gainers);
    table("losing the most probability", &r.prob_losers);
    table("largest mean log-probability gain", &r.gainers);
    table("largest mean log-probability loss", &r.losers);
    if !r.target_losers.is_empty() {
        println!("\nnext tokens of the text losing the most log-likelihood");
        println!("{:>8} {:>22} {:>6} {:>10}", "id", "token", "count", "d log p");
        for t in &r.target_losers {
            println!(
                "{:>8} {:>22} {:>6} {:>10.4}",
                t.id,
                clip(&t.token, 22),
                t.count,
                t.mean_logprob_change
            );
        }
    }
    if let Some(p) = &a.out {
        println!("\nplot written to {}", p.display());
    }
    Ok(())
}

/// At most `n` characters of `s`.
pub fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}
