//! `swk info MODEL [--json] [--config-only]`: what a model is, from its headers alone where
//! swk can open it lazily (any size, nothing read but metadata) or from its config.json alone,
//! and the device memory it takes on CUDA.

use std::collections::BTreeMap;

use serde::Serialize;
use swk::backend::memory::MemoryPlan;
use swk::backend::WeightDtype;
use swk::model::{Format, LazyModel, ModelConfig};
use swk::Result;

/// Arguments of `swk info`.
#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face directory, or a hub id (org/name).
    model: String,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Read config.json alone (a Hugging Face directory, or a hub id: nothing else is
    /// downloaded), to size a model before fetching its weights; parameters counted from the
    /// config's shapes, dtypes unknown. A GGUF file is read as without it (its headers).
    #[arg(long)]
    config_only: bool,
}

/// Pass lengths, in tokens, whose streamed bytes `info` reports: decoding one token, a
/// detection prompt, a perplexity window.
const PASS_TOKENS: [usize; 3] = [1, 9, 512];

#[derive(Serialize)]
struct Info<'a> {
    model: &'a str,
    format: Format,
    architecture: &'static str,
    config: &'a ModelConfig,
    parameters: usize,
    dtypes: BTreeMap<String, String>,
    /// Whether only the headers were read (`headers`), config.json alone (`config`,
    /// `--config-only`), or the whole model loaded (`whole`, for checkpoints swk cannot open
    /// lazily).
    read: &'static str,
    load_seconds: f64,
    /// Host memory the CPU backend holds the weights in (every tensor as f32).
    cpu_weight_bytes: usize,
    /// Device memory on the CUDA backend per weight dtype.
    memory: Vec<DeviceMemory>,
    /// The CUDA device this swk would run on, when one is usable.
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<Device>,
}

#[derive(Serialize)]
struct DeviceMemory {
    #[serde(flatten)]
    plan: MemoryPlan,
    /// At most the bytes a streamed pass of that many tokens copies to the device.
    pass_bytes: BTreeMap<usize, usize>,
}

#[derive(Serialize)]
struct Device {
    name: String,
    free_bytes: usize,
    /// Per weight dtype, what `--stream auto` does for short passes: `resident` or
    /// `streamed`.
    stream_auto: BTreeMap<&'static str, &'static str>,
    /// Per weight dtype kept resident, the most KV-cache positions (`ppl`'s window,
    /// `generate`'s new tokens) with which `--stream auto` still keeps it resident.
    resident_positions: BTreeMap<&'static str, usize>,
}

/// The tensor kind of an HF name: `model.layers.3.mlp.down_proj.weight` -> `mlp.down_proj.weight`.
fn kind(name: &str) -> String {
    match name.strip_prefix("model.layers.").and_then(|r| r.split_once('.')) {
        Some((_, rest)) => rest.to_string(),
        None => name.to_string(),
    }
}

/// Add `dtype` to the comma-separated dtypes of `name`'s kind.
fn note_dtype(dtypes: &mut BTreeMap<String, String>, name: &str, dtype: &str) {
    let e = dtypes.entry(kind(name)).or_default();
    if !e.split(',').any(|d| d == dtype) {
        if !e.is_empty() {
            e.push(',');
        }
        e.push_str(dtype);
    }
}

/// The model's description: from its headers (LazyModel), or loaded whole when it cannot be
/// opened lazily (safetensors checkpoints that loading rewrites).
struct Described {
    config: ModelConfig,
    format: Format,
    parameters: usize,
    dtypes: BTreeMap<String, String>,
    read: &'static str,
    load_seconds: f64,
}

fn describe(spec: &str, quiet: bool) -> Result<Described> {
    let mut dtypes = BTreeMap::new();
    if LazyModel::can_open(spec)? {
        let lazy = LazyModel::open(spec)?;
        swk::backend::memory::check_shapes(&lazy)?;
        let mut parameters = 0;
        for name in lazy.names() {
            parameters += lazy.shape(name)?.iter().product::<usize>();
            note_dtype(&mut dtypes, name, &lazy.source_dtype(name)?);
        }
        return Ok(Described {
            config: lazy.config.clone(),
            format: lazy.source.format,
            parameters,
            dtypes,
            read: "headers",
            load_seconds: lazy.source.load_seconds,
        });
    }
    let m = super::load_model(spec, quiet)?;
    for (name, t) in m.weights.iter() {
        note_dtype(&mut dtypes, name, &t.source_dtype);
    }
    Ok(Described {
        parameters: m.weights.n_elements(),
        format: m.source.format,
        dtypes,
        read: "whole",
        load_seconds: m.source.load_seconds,
        config: m.config,
    })
}

/// `--config-only`: the description from config.json alone.
fn describe_config(spec: &str, quiet: bool) -> Result<Described> {
    let start = std::time::Instant::now();
    let path = std::path::Path::new(spec);
    let config_path = if path.is_file() {
        return describe(spec, quiet);
    } else if path.is_dir() {
        path.join("config.json")
    } else if swk::io::hub::looks_like_hub_id(spec) {
        swk::io::hub::config(spec)?
    } else {
        return Err(swk::Error::NotFound {
            id: spec.to_string(),
            msg: "no such file or directory, and not a hub id of the form org/name".into(),
        });
    };
    let config = ModelConfig::from_hf_json(&config_path)?;
    Ok(Described {
        parameters: usize::try_from(config.parameter_count()).unwrap_or(usize::MAX),
        format: Format::Safetensors,
        dtypes: BTreeMap::new(),
        read: "config",
        load_seconds: start.elapsed().as_secs_f64(),
        config,
    })
}

const DTYPES: [WeightDtype; 3] = [WeightDtype::Bf16, WeightDtype::F16, WeightDtype::F32];

pub fn run(a: Args, dev: super::device::DeviceOpts) -> Result<()> {
    let d = if a.config_only {
        describe_config(&a.model, a.json)?
    } else {
        describe(&a.model, a.json)?
    };
    let memory: Vec<DeviceMemory> = DTYPES
        .iter()
        .map(|&dtype| {
            let plan = MemoryPlan::new(&d.config, dtype);
            let pass_bytes = PASS_TOKENS.iter().map(|&t| (t, plan.pass_bytes(t))).collect();
            DeviceMemory { plan, pass_bytes }
        })
        .collect();
    let device = super::device::free_memory(dev.device)?.map(|(name, free_bytes)| {
        let room = |m: &DeviceMemory| super::device::room_beside(m.plan.resident, free_bytes);
        let stream_auto = memory
            .iter()
            .map(|m| (m.plan.dtype, if room(m).is_some() { "resident" } else { "streamed" }))
            .collect();
        let resident_positions = memory
            .iter()
            .filter_map(|m| Some((m.plan.dtype, room(m)? / m.plan.kv_cache_per_token.max(1))))
            .collect();
        Device { name, free_bytes, stream_auto, resident_positions }
    });
    let info = Info {
        model: &a.model,
        format: d.format,
        architecture: d.config.architecture.name(),
        config: &d.config,
        parameters: d.parameters,
        dtypes: d.dtypes,
        read: d.read,
        load_seconds: d.load_seconds,
        cpu_weight_bytes: d.parameters.saturating_mul(4),
        memory,
        device,
    };
    if a.json {
        return super::print_json(&info);
    }
    print_text(&info);
    Ok(())
}

/// Bytes in decimal units (GB = 1e9 bytes).
fn size(bytes: usize) -> String {
    let b = bytes as f64;
    match bytes {
        1_000_000_000.. => format!("{:.2} GB", b / 1e9),
        1_000_000.. => format!("{:.2} MB", b / 1e6),
        1_000.. => format!("{:.2} kB", b / 1e3),
        _ => format!("{bytes} B"),
    }
}

fn print_text(info: &Info) {
    let c = info.config;
    println!("model         {}", info.model);
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
    let p = info.parameters as f64;
    let short = if p >= 1e9 { format!("{:.1} B", p / 1e9) } else { format!("{:.1} M", p / 1e6) };
    println!("parameters    {} ({short})", info.parameters);
    let read = match info.read {
        "headers" => "headers only",
        "config" => "config.json only (dtypes unknown)",
        _ => "whole model",
    };
    println!("read          {read} ({:.2} s)", info.load_seconds);
    if !info.dtypes.is_empty() {
        println!("dtypes:");
    }
    for (k, v) in &info.dtypes {
        println!("  {k:<36} {v}");
    }
    println!("CPU memory    {} (every weight as f32)", size(info.cpu_weight_bytes));
    println!(
        "CUDA device memory (from the shapes; GB = 1e9 bytes; a streamed pass copies at most):"
    );
    let passes: Vec<String> = PASS_TOKENS.iter().map(usize::to_string).collect();
    println!(
        "  {:<8} {:>11} {:>11} {:>11}   streamed pass, {} tokens   KV cache / token",
        "weights",
        "resident",
        "streamed",
        "(slot)",
        passes.join(" / ")
    );
    for m in &info.memory {
        let p = &m.plan;
        let passes: Vec<String> = m.pass_bytes.values().map(|&b| size(b)).collect();
        println!(
            "  {:<8} {:>11} {:>11} {:>11}   {}   {}",
            p.dtype,
            size(p.resident),
            size(p.streamed),
            size(p.slot),
            passes.join(" / "),
            size(p.kv_cache_per_token)
        );
    }
    if let Some(d) = &info.device {
        let auto: Vec<String> = d
            .stream_auto
            .iter()
            .map(|(k, v)| match d.resident_positions.get(k) {
                Some(n) => format!("{k} {v} up to {n} KV positions"),
                None => format!("{k} {v}"),
            })
            .collect();
        println!(
            "device        {} ({} free); --stream auto: {}",
            d.name,
            size(d.free_bytes),
            auto.join(", ")
        );
    }
}
