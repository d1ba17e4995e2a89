//! `swk research MODEL... --out DIR [settings]`: the whole pipeline per model, a session.json
//! and a self-contained report.html each; with several models, a comparison of their super
//! weights (comparison.json, comparison.md, comparison.html).

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};
use swk::analysis::research::{self, ResearchConfig};
use swk::eval::choice;
use swk::{report, Error, Model, Result};

use super::device::{Backend, DeviceOpts, GpuDtype};

/// Arguments of `swk research`.
#[derive(clap::Args)]
pub struct Args {
    /// Models (.gguf files, Hugging Face directories or hub ids); several make a comparison.
    #[arg(required = true)]
    models: Vec<String>,
    /// Output directory (created).
    #[arg(long)]
    out: PathBuf,
    /// Prompt for cascade, trace and compare-generate.
    #[arg(long, default_value = swk::detect::DEFAULT_PROMPT)]
    prompt: String,
    /// Text for confirmation, screening, vocab and the quantization study (default: the short
    /// confirmation text shipped with swk).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Spike threshold of detection.
    #[arg(long, default_value_t = 50.0)]
    threshold: f32,
    /// Screen this many largest-|w| down_proj weights besides the detection candidates.
    #[arg(long, default_value_t = 8)]
    top_largest: usize,
    /// Samples of the text for vocabulary effects.
    #[arg(long, default_value_t = 4)]
    vocab_samples: usize,
    /// Greedy tokens per continuation in compare-generate.
    #[arg(long, default_value_t = 8)]
    max_new_tokens: usize,
    /// Bits of the quantization study.
    #[arg(long, default_value_t = 4)]
    bits: u32,
    /// Block sizes of the quantization study (repeatable; default 64, 4096, 2^20).
    #[arg(long)]
    block_size: Vec<usize>,
    /// Quantize only the linear tensors whose name contains this (e.g. down_proj).
    #[arg(long, value_name = "SUBSTRING")]
    quant_only: Option<String>,
    /// Analyses to skip (repeatable or comma-separated): screen, vocab, cascade, trace,
    /// compare-generate, quantize-study, mc.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// Study these weight edits instead of the confirmed super weights (repeatable):
    /// zero:L,R,C, scale:L,R,C,F, set:L,R,C,V or TENSOR[R,C]=zero|xF|V.
    #[arg(long)]
    edit: Vec<String>,
    /// Perplexity ratio above which detection confirms a candidate.
    #[arg(long, default_value_t = 2.0)]
    confirm_ratio: f64,
    /// Multiple-choice task for baseline vs edited accuracy (hellaswag, arc-easy,
    /// arc-challenge, piqa; from the Hugging Face cache).
    #[arg(long, conflicts_with = "mc_data")]
    mc_task: Option<String>,
    /// Multiple-choice items from a local .jsonl or .parquet instead.
    #[arg(long, value_name = "FILE")]
    mc_data: Option<PathBuf>,
    /// Multiple-choice items scored (the first N).
    #[arg(long, default_value_t = 50, value_name = "N")]
    mc_limit: usize,
    /// Also write each plot as PNG next to its SVG.
    #[arg(long)]
    png: bool,
    /// Print what was written as one JSON object.
    #[arg(long)]
    json: bool,
    /// Weight storage on a CUDA device (`--device cuda`: every analysis runs there, except
    /// quantize-study when the layers are streamed).
    #[arg(long, value_enum, default_value_t = GpuDtype::Auto)]
    gpu_dtype: GpuDtype,
}

impl Args {
    fn config(&self) -> Result<ResearchConfig> {
        let mut cfg = ResearchConfig {
            prompt: self.prompt.clone(),
            top_largest: self.top_largest,
            vocab_samples: self.vocab_samples,
            max_new_tokens: self.max_new_tokens,
            skip: self.skip.clone(),
            png: self.png,
            ..ResearchConfig::default()
        };
        cfg.detect.threshold = self.threshold;
        cfg.detect.confirm_ratio = self.confirm_ratio;
        if let Some(p) = &self.text {
            let t = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            cfg.text = t.clone();
            cfg.detect.confirm_text = t;
        }
        cfg.quantize.bits = self.bits;
        cfg.quantize.only = self.quant_only.clone();
        if !self.block_size.is_empty() {
            cfg.quantize.block_sizes = self.block_size.clone();
        }
        Ok(cfg)
    }
}

/// A directory-friendly name for `spec`: its file stem, letters, digits, `-`, `_`, `.` only.
fn slug(spec: &str) -> String {
    let base = Path::new(spec.trim_end_matches('/'))
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| spec.to_string());
    let s: String = base
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' })
        .collect();
    if s.is_empty() {
        "model".into()
    } else {
        s
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let s = serde_json::to_string_pretty(v)
        .map_err(|e| Error::Json { path: path.to_path_buf(), source: e })?;
    write(path, &s)
}

/// Run one model's session into `dir`; returns the session.
fn one(
    a: &Args,
    spec: &str,
    cfg: &ResearchConfig,
    dir: &Path,
    tag: &str,
    backend: Backend,
    dev: DeviceOpts,
) -> Result<Value> {
    let quiet = a.json;
    let t = Instant::now();
    let mut model = super::load_model(spec, quiet)?;
    let load = t.elapsed().as_secs_f64();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut inputs = research::Inputs::from_config(&model, cfg)?;
    inputs.study = super::parse_edits(&a.edit)?;
    let limit = Some(a.mc_limit);
    let items = match (&a.mc_task, &a.mc_data) {
        (Some(t), _) => Some((t.clone(), choice::task_items(choice::Task::parse(t)?, limit)?)),
        (None, Some(p)) => Some((p.display().to_string(), choice::read_items(p, limit)?)),
        (None, None) => None,
    };
    if let Some((name, items)) = items {
        let tok = items.iter().map(|i| choice::tokenize(&model, i)).collect::<Result<_>>()?;
        inputs.mc = (name, tok);
    }
    let pb = super::bar(quiet, (research::ANALYSES.len() + 1) as u64, "research");
    let progress = |done: usize, total: usize, what: &str| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
        pb.set_message(format!("{tag}{what}"));
    };
    let mut session = match backend {
        Backend::Cpu => research::research_inputs(&mut model, spec, cfg, &inputs, dir, progress)?,
        Backend::Cuda => {
            let lazy = super::device::stream_files(spec, dev.stream, a.gpu_dtype)?;
            cuda_research(&mut model, lazy, a.gpu_dtype, spec, cfg, &inputs, dir, progress)?
        }
    };
    pb.finish_and_clear();
    session["timings"]["load"] = json!(load);
    write_json(&dir.join("session.json"), &session)?;
    write(&dir.join("report.html"), &report::session_html(&session))?;
    Ok(session)
}

pub fn run(a: Args, dev: DeviceOpts) -> Result<()> {
    let cfg = a.config()?;
    let backend = super::device::choose(dev.device, a.json)?;
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    if a.models.len() == 1 {
        let s = one(&a, &a.models[0], &cfg, &a.out, "", backend, dev)?;
        return finish(&a, &[s], std::slice::from_ref(&a.out), None);
    }
    // A model that fails (unreadable, no tokenizer, ...) is reported; the others still run.
    let (mut sessions, mut dirs, mut failed) = (Vec::new(), Vec::new(), Vec::new());
    for (i, spec) in a.models.iter().enumerate() {
        let dir = a.out.join(format!("{}-{}", i + 1, slug(spec)));
        let tag = format!("[{}/{}] {spec}: ", i + 1, a.models.len());
        match one(&a, spec, &cfg, &dir, &tag, backend, dev) {
            Ok(s) => {
                sessions.push(s);
                dirs.push(dir);
            }
            Err(e) => {
                if !a.json {
                    eprintln!("swk: research on {spec} failed: {e}");
                }
                failed.push((spec.clone(), e.to_string()));
            }
        }
    }
    let links: Vec<String> = dirs
        .iter()
        .map(|d| {
            let name = d.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            format!("{name}/report.html")
        })
        .collect();
    let rows: Vec<Value> = sessions
        .iter()
        .flat_map(|s| {
            let model = s["model"].clone();
            s["super_weights"].as_array().cloned().unwrap_or_default().into_iter().map(
                move |mut sw| {
                    sw["model"] = model.clone();
                    sw
                },
            )
        })
        .collect();
    let comparison = json!({
        "models": a.models,
        "sessions": links.iter().map(|l| l.replace("report.html", "session.json")).collect::<Vec<_>>(),
        "super_weights": rows,
        "table": {"header": report::COMPARISON_HEADER, "rows": report::comparison_rows(&sessions)},
        "summary": {"header": report::SUMMARY_HEADER, "rows": report::summary_rows(&sessions)},
        "failed": failed.iter().map(|(m, e)| json!({"model": m, "error": e})).collect::<Vec<_>>(),
    });
    write_json(&a.out.join("comparison.json"), &comparison)?;
    write(&a.out.join("comparison.md"), &report::comparison_markdown(&sessions, &failed))?;
    let html = report::comparison_html(&sessions, &links, &failed);
    write(&a.out.join("comparison.html"), &html)?;
    finish(&a, &sessions, &dirs, Some(&comparison))?;
    if failed.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = failed.iter().map(|(m, e)| format!("{m}: {e}")).collect();
    Err(Error::Invalid(format!(
        "research failed for {} of {} models ({}); the others' results and the comparison are in {}",
        failed.len(),
        a.models.len(),
        list.join("; "),
        a.out.display()
    )))
}

fn finish(a: &Args, sessions: &[Value], dirs: &[PathBuf], cmp: Option<&Value>) -> Result<()> {
    if a.json {
        return super::print_json(&json!({
            "out": a.out,
            "sessions": dirs.iter().map(|d| d.join("session.json")).collect::<Vec<_>>(),
            "reports": dirs.iter().map(|d| d.join("report.html")).collect::<Vec<_>>(),
            "comparison": cmp.map(|_| a.out.join("comparison.json")),
        }));
    }
    print!("{}", report::comparison_markdown(sessions, &[]));
    for (s, d) in sessions.iter().zip(dirs) {
        let errors = s["errors"].as_object().map_or(0, |o| o.len());
        println!(
            "\n{}: {} and {} ({:.1} s{})",
            s["model"].as_str().unwrap_or("?"),
            d.join("session.json").display(),
            d.join("report.html").display(),
            s["total_seconds"].as_f64().unwrap_or(0.0),
            if errors > 0 { format!(", {errors} analysis error(s)") } else { String::new() }
        );
    }
    if cmp.is_some() {
        println!("\ncomparison: {}", a.out.join("comparison.html").display());
    }
    Ok(())
}

/// The session on CUDA device 0 (the layers streamed from `lazy` when given; quantize-study
/// then on the CPU `model`).
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
#[allow(clippy::too_many_arguments)]
fn cuda_research(
    model: &mut Model,
    lazy: Option<super::device::Files>,
    dtype: GpuDtype,
    spec: &str,
    cfg: &ResearchConfig,
    inputs: &research::Inputs,
    dir: &Path,
    progress: impl FnMut(usize, usize, &str),
) -> Result<Value> {
    let streamed = lazy.as_ref().is_some_and(|f| f.streamed);
    let (mut gpu, name) = super::device::cuda_session(model, lazy, dtype)?;
    let device = research::Device { backend: &mut gpu, name: &name, streamed };
    research::research_on(model, Some(device), spec, cfg, inputs, dir, progress)
}

#[cfg(not(any(feature = "cuda", feature = "cuda-emu")))]
#[allow(clippy::too_many_arguments)]
fn cuda_research(
    _: &mut Model,
    _: Option<super::device::Files>,
    _: GpuDtype,
    _: &str,
    _: &ResearchConfig,
    _: &research::Inputs,
    _: &Path,
    _: impl FnMut(usize, usize, &str),
) -> Result<Value> {
    Err(Error::Backend("built without the `cuda` feature".into()))
}
