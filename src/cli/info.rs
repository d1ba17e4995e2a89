//! `swk info MODEL [--json]`.

use std::collections::BTreeMap;

use serde::Serialize;
use swk::model::{Format, ModelConfig};
use swk::Result;

/// Arguments of `swk info`.
#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face directory, or a hub id (org/name).
    model: String,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Info<'a> {
    model: &'a str,
    format: Format,
    architecture: &'static str,
    config: &'a ModelConfig,
    parameters: usize,
    dtypes: BTreeMap<String, String>,
    load_seconds: f64,
}

/// The tensor kind of an HF name: `model.layers.3.mlp.down_proj.weight` -> `mlp.down_proj.weight`.
fn kind(name: &str) -> String {
    match name.strip_prefix("model.layers.").and_then(|r| r.split_once('.')) {
        Some((_, rest)) => rest.to_string(),
        None => name.to_string(),
    }
}

pub fn run(a: Args) -> Result<()> {
    let m = super::load_model(&a.model, a.json)?;
    let mut dtypes: BTreeMap<String, String> = BTreeMap::new();
    for (name, t) in m.weights.iter() {
        let e = dtypes.entry(kind(name)).or_default();
        if !e.split(',').any(|d| d == t.source_dtype) {
            if !e.is_empty() {
                e.push(',');
            }
            e.push_str(&t.source_dtype);
        }
    }
    let info = Info {
        model: &a.model,
        format: m.source.format,
        architecture: m.config.architecture.name(),
        config: &m.config,
        parameters: m.weights.n_elements(),
        dtypes,
        load_seconds: m.source.load_seconds,
    };
    if a.json {
        return super::print_json(&info);
    }
    let c = &m.config;
    println!("model         {}", a.model);
    println!("format        {:?}", info.format);
    println!("architecture  {}", info.architecture);
    println!("layers        {}", c.num_layers);
    println!("hidden        {}", c.hidden_size);
    println!("intermediate  {}", c.intermediate_size);
    println!("heads         {} (kv {}, head_dim {})", c.num_heads, c.num_kv_heads, c.head_dim);
    println!("vocab         {}", c.vocab_size);
    println!("rope_theta    {}", c.rope_theta);
    println!("tied head     {}", c.tie_word_embeddings);
    if let Some(moe) = &c.family.moe {
        let sparse = moe.sparse_layers.iter().filter(|&&s| s).count();
        let shared = moe
            .shared_expert_intermediate
            .map_or(String::new(), |w| format!(", shared expert {w} wide"));
        println!(
            "experts       {} per MoE layer, top-{}{}, {} wide{shared}; {sparse} of {} layers sparse",
            moe.num_experts,
            moe.top_k,
            if moe.norm_topk_prob { " renormalized" } else { "" },
            moe.expert_intermediate,
            c.num_layers
        );
    }
    println!("parameters    {} ({:.1} M)", info.parameters, info.parameters as f64 / 1e6);
    println!("load time     {:.2} s", info.load_seconds);
    println!("dtypes:");
    for (k, v) in &info.dtypes {
        println!("  {k:<36} {v}");
    }
    Ok(())
}
