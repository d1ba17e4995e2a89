//! `swk compare-generate MODEL [--prompt TEXT]... [--factor F]... [--max-new-tokens N]
//! [--edit SPEC]... [--from-detect FILE] [--json]`.

use swk::analysis::compare;
use swk::Result;

use super::analysis::{edits_line, EditSource};

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
}

pub fn run(a: Args) -> Result<()> {
    let mut model = super::load_model(&a.model, a.json)?;
    let edits = a.edits.resolve(&mut model, a.json, false)?;
    let texts: Vec<String> = if a.prompt.is_empty() {
        DEFAULT_PROMPTS.iter().map(|s| s.to_string()).collect()
    } else {
        a.prompt.clone()
    };
    let tok = model.tokenizer()?;
    let prompts = texts.iter().map(|p| tok.encode(p, true)).collect::<Result<Vec<_>>>()?;
    let mut cfg = compare::CompareConfig { max_new_tokens: a.max_new_tokens, ..Default::default() };
    if !a.factor.is_empty() {
        cfg.factors = a.factor.clone();
    }
    let pb = super::bar(a.json, 1, "generating");
    let r = compare::compare_generate(&mut model, &prompts, &edits, &cfg, |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    if a.json {
        return super::print_json(&r);
    }
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
