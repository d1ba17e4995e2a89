//! `swk quantize-study MODEL [--text FILE] [--context N] [--bits B] [--block-size N]...
//! [--clip-z Z | --no-clip] [--edit SPEC]... [--from-detect FILE] [--json] [--out PLOT.svg]`.

use std::path::PathBuf;

use swk::analysis::{self, quantize};
use swk::eval::ppl;
use swk::Result;

use super::analysis::{edits_line, read_text, EditSource};

/// Arguments of `swk quantize-study`.
#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face directory, or a hub id (org/name).
    model: String,
    /// Text for perplexity (default: the short confirmation text shipped with swk).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Perplexity window in text tokens.
    #[arg(long, default_value_t = 128)]
    context: usize,
    /// Bits per weight.
    #[arg(long, default_value_t = 4)]
    bits: u32,
    /// Block size (repeatable; default 64 to 2^20 in steps of 4x).
    #[arg(long)]
    block_size: Vec<usize>,
    /// Z-score of |w| above which weights are clipped in the clipping variants.
    #[arg(long, default_value_t = 6.0)]
    clip_z: f32,
    /// Skip the clipping variants.
    #[arg(long)]
    no_clip: bool,
    /// Quantize only the linear tensors whose name contains this (e.g. down_proj).
    #[arg(long, value_name = "SUBSTRING")]
    only: Option<String>,
    /// The weights to hold out (default: the super weights `swk detect` confirms).
    #[command(flatten)]
    edits: EditSource,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Write a plot of perplexity against block size (SVG, or PNG when named .png).
    #[arg(long, value_name = "PLOT.svg")]
    out: Option<PathBuf>,
    /// Also write the plot as PNG next to it (same name, .png).
    #[arg(long, requires = "out")]
    png: bool,
}

pub fn run(a: Args) -> Result<()> {
    if let Some(p) = &a.out {
        analysis::plot::check_path(p)?;
    }
    let text = read_text(a.text.as_deref())?;
    let mut model = super::load_model(&a.model, a.json)?;
    let held = a.edits.resolve(&mut model, a.json, false)?;
    let tokens = ppl::text_tokens(&model, &text)?;
    let mut cfg = quantize::StudyConfig {
        bits: a.bits,
        clip_z: (!a.no_clip).then_some(a.clip_z),
        context: a.context,
        only: a.only.clone(),
        ..Default::default()
    };
    if !a.block_size.is_empty() {
        cfg.block_sizes = a.block_size.clone();
    }
    let pb = super::bar(a.json, 1, "quantize");
    let r = quantize::quantize_study(&mut model, &tokens, &held, &cfg, super::stages(&pb))?;
    pb.finish_and_clear();
    if let Some(p) = &a.out {
        quantize::plot(&r, p)?;
        if a.png {
            quantize::plot(&r, &analysis::plot::png_sibling(p))?;
        }
    }
    if a.json {
        return super::print_json(&r);
    }
    println!("held out: {}", edits_line(&r.held_out));
    println!(
        "RTN asymmetric min-max, {} bits, {}; perplexity over {} tokens (windows of {})",
        r.config.bits,
        r.config.only.as_ref().map_or("all linear weights of the blocks".to_string(), |o| format!(
            "linear weights matching `{o}`"
        )),
        r.tokens_scored,
        r.config.context
    );
    println!("unquantized perplexity {:.3}", r.baseline_perplexity);
    let names: Vec<String> = r
        .rows
        .first()
        .map(|row| row.variants.iter().map(|v| v.name.clone()).collect())
        .unwrap_or_default();
    println!("cells: perplexity (x unquantized) / mean KL(unquantized || quantized) in nats");
    let mut header = format!("{:>10}", "block");
    for n in &names {
        header += &format!(" {n:>26}");
    }
    println!("{header}");
    for row in &r.rows {
        let mut line = format!("{:>10}", row.block_size);
        for v in &row.variants {
            let kl = v.mean_kl.map_or("-".to_string(), |k| format!("{k:.4}"));
            line += &format!(" {:>26}", format!("{:.3} ({:.2}x) / {kl}", v.perplexity, v.ratio));
        }
        println!("{line}");
    }
    if let Some(z) = r.config.clip_z {
        println!("(+clip: |w| clipped above mean + {z} std of |w| in each block)");
    }
    if let Some(p) = &a.out {
        println!("\nplot written to {}", p.display());
    }
    Ok(())
}
