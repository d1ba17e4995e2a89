//! `swk screen MODEL [--text FILE] [--context N] [--top-largest K] [--edit SPEC]...
//! [--from-detect FILE] [--json]`.

use std::path::PathBuf;

use swk::analysis::screen;
use swk::eval::ppl;
use swk::Result;

use super::analysis::{read_text, EditSource};

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
}

pub fn run(a: Args) -> Result<()> {
    let text = read_text(a.text.as_deref())?;
    let mut model = super::load_model(&a.model, a.json)?;
    let candidates = a.edits.resolve(&mut model, a.json, true)?;
    let tokens = ppl::text_tokens(&model, &text)?;
    let cfg = screen::ScreenConfig { top_largest: a.top_largest, context: a.context };
    let pb = super::bar(a.json, 1, "screen");
    let r = screen::screen(&mut model, &tokens, &candidates, &cfg, |done, total, what| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
        pb.set_message(what.to_string());
    })?;
    pb.finish_and_clear();
    if a.json {
        return super::print_json(&r);
    }
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
