//! `swk cascade MODEL [--prompt TEXT] [--row R]... [--top N] [--edit SPEC]...
//! [--from-detect FILE] [--json] [--out PLOT.svg]`.

use std::path::PathBuf;

use swk::analysis::{self, cascade};
use swk::Result;

use super::analysis::{edits_line, EditSource};

/// Arguments of `swk cascade`.
#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face directory, or a hub id (org/name).
    model: String,
    /// Prompt (tokenized with the model's special-token convention).
    #[arg(long, default_value = swk::detect::DEFAULT_PROMPT)]
    prompt: String,
    /// Hidden dim to follow (repeatable; default: the rows the edits write).
    #[arg(long)]
    row: Vec<usize>,
    /// Massive activations listed per layer.
    #[arg(long, default_value_t = 3)]
    top: usize,
    /// Massive-activation criterion: |a| above this.
    #[arg(long, default_value_t = 100.0)]
    min_abs: f32,
    /// Massive-activation criterion: |a| above this multiple of the layer's median |a|.
    #[arg(long, default_value_t = 1000.0)]
    min_ratio: f32,
    #[command(flatten)]
    edits: EditSource,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Write a line plot across layers (SVG, or PNG when named .png).
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
    let mut model = super::load_model(&a.model, a.json)?;
    let edits = a.edits.resolve(&mut model, a.json, false)?;
    let tokens = model.tokenizer()?.encode(&a.prompt, true)?;
    let cfg = cascade::CascadeConfig {
        rows: a.row.clone(),
        top_massive: a.top,
        min_abs: a.min_abs,
        min_ratio: a.min_ratio,
    };
    let sp = super::spinner(a.json, "cascade".into());
    let r = cascade::cascade(&mut model, &tokens, &edits, &cfg)?;
    sp.finish_and_clear();
    if let Some(p) = &a.out {
        cascade::plot(&r, p)?;
        if a.png {
            cascade::plot(&r, &analysis::plot::png_sibling(p))?;
        }
    }
    if a.json {
        return super::print_json(&r);
    }
    println!("edits   {}", edits_line(&r.edits));
    println!("tokens  {}", r.tokens.join(" "));
    println!(
        "massive: |a| > {} and > {}x the layer's median |a| (hook_resid_post)",
        r.config.min_abs, r.config.min_ratio
    );
    let peak = |v: &[f32]| {
        let (p, a) =
            v.iter()
                .enumerate()
                .fold((0, 0f32), |b, (i, &x)| if x.abs() > b.1.abs() { (i, x) } else { b });
        format!("{a:.1}@{p}")
    };
    let mut header = format!("{:>5}", "layer");
    for row in &r.config.rows {
        header += &format!(" {:>14} {:>14}", format!("dim {row} base"), "edited");
    }
    header += &format!(
        " {:>9} {:>9} {:>5} {:>5}  top massive (base)",
        "med base", "med ed", "#base", "#ed"
    );
    println!("{header}");
    for l in &r.layers {
        let mut line = format!("{:>5}", l.layer);
        for rv in &l.rows {
            line += &format!(" {:>14} {:>14}", peak(&rv.base), peak(&rv.edited));
        }
        let top: Vec<String> =
            l.base.top.iter().map(|m| format!("{}@{} {:.0}", m.dim, m.position, m.value)).collect();
        line += &format!(
            " {:>9.3} {:>9.3} {:>5} {:>5}  {}",
            l.base.median_abs,
            l.edited.median_abs,
            l.base.count,
            l.edited.count,
            top.join(", ")
        );
        println!("{line}");
    }
    for s in &r.summary {
        println!(
            "\ndim {}: peak |a| {:.1} -> {:.1} with the edits; massive in layers {:?} -> {:?}",
            s.row, s.peak_base, s.peak_edited, s.massive_layers_base, s.massive_layers_edited
        );
    }
    if let Some(p) = &a.out {
        println!("\nplot written to {}", p.display());
    }
    Ok(())
}
