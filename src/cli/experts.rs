//! `swk experts MODEL [--router-samples N] [--text FILE] [--sample-len N] [--context N]
//! [--no-ablate] [--json]`.

use std::path::PathBuf;

use swk::analysis::{experts, text_samples};
use swk::eval::ppl;
use swk::Result;

use super::analysis::read_text;

/// Arguments of `swk experts`.
#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face directory, or a hub id (org/name) of a mixture-of-experts
    /// model.
    model: String,
    /// Sample sequences cut from the text for the router statistics.
    #[arg(long, default_value_t = 8, value_name = "N")]
    router_samples: usize,
    /// Text for the samples and the ablation perplexity (default: the short confirmation text
    /// shipped with swk).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Most tokens per sample.
    #[arg(long, default_value_t = 64)]
    sample_len: usize,
    /// Perplexity window (text tokens) of the ablation runs.
    #[arg(long, default_value_t = 32)]
    context: usize,
    /// Skip the ablation of super experts (router and spike statistics only).
    #[arg(long)]
    no_ablate: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    if a.router_samples == 0 {
        return Err(swk::Error::Invalid("--router-samples must be at least 1".into()));
    }
    let text = read_text(a.text.as_deref())?;
    let mut model = super::load_model(&a.model, a.json)?;
    let samples = text_samples(&model, &text, a.router_samples, a.sample_len)?;
    let tokens = ppl::text_tokens(&model, &text)?;
    let cfg =
        experts::ExpertsConfig { context: a.context, ablate: !a.no_ablate, ..Default::default() };
    let pb = super::bar(a.json, 1, "experts");
    let r = experts::experts(&mut model, &samples, &tokens, &cfg, |done, total, what| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
        pb.set_message(what.to_string());
    })?;
    pb.finish_and_clear();
    if a.json {
        return super::print_json(&r);
    }
    println!("{} samples, {} tokens, top-{} routing", r.samples, r.tokens, r.top_k);
    println!("{:>5} {:>8} {:>13} {:>7}", "layer", "tokens", "entropy/max", "unused");
    for l in &r.layers {
        println!(
            "{:>5} {:>8} {:>6.3}/{:<6.3} {:>7}",
            l.layer, l.tokens, l.mean_entropy, l.max_entropy, l.unused_experts
        );
    }
    println!(
        "{:>5} {:>6} {:>8} {:>6} {:>10} {:>6} {:>4} {:>10} {:>6} {:>4}",
        "layer", "expert", "selected", "freq", "max in", "col", "pos", "max out", "row", "pos"
    );
    for e in &r.experts {
        println!(
            "{:>5} {:>6} {:>8} {:>6.3} {:>10.3} {:>6} {:>4} {:>10.3} {:>6} {:>4}",
            e.layer,
            e.expert,
            e.selected,
            e.frequency,
            e.max_input,
            e.max_input_col,
            e.max_input_position,
            e.max_output,
            e.max_output_row,
            e.max_output_position
        );
    }
    println!(
        "super experts (max |down_proj out| > P{} = {:.3} and > {} x max {:.3}): {}",
        r.config.percentile,
        r.percentile_threshold,
        r.config.fraction_of_max,
        r.overall_max,
        r.super_experts.len()
    );
    if let Some(b) = r.baseline_perplexity {
        println!(
            "baseline perplexity {b:.3} over {} tokens; ablation: {}",
            r.tokens_scored, r.ablation
        );
    }
    for s in &r.super_experts {
        let ratio = s.perplexity_ratio.map_or("-".to_string(), |x| format!("{x:.3}"));
        println!(
            "  layer {} expert {}: max out {:.3} (row {}, pos {}), {:.3} of max, ppl x {ratio}",
            s.layer,
            s.expert,
            s.max_output,
            s.max_output_row,
            s.max_output_position,
            s.fraction_of_max
        );
    }
    Ok(())
}
