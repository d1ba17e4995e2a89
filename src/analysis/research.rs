//! The full research pipeline on one model: detect and confirm super weights, screen the
//! candidates, then run every analysis (vocab, cascade, trace, compare-generate,
//! quantize-study, and multiple choice when items are given) on the confirmed super weights,
//! collecting everything into one session
//! object (written as `session.json`, rendered by [`crate::report`]).
//!
//! The defaults are small so that a session on a 135M model takes about a minute on two
//! cores; [`ResearchConfig`] holds the knobs for real runs. A failing analysis is recorded
//! under `errors` and the others still run; an analysis that needs a super weight is
//! recorded under `skipped` when detection confirms none.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::analysis::{
    cascade, compare, down_proj_coords, quantize, screen, token_labels, trace, vocab,
    AnalysisBackend,
};
use crate::detect::{self, DetectConfig};
use crate::edit::{EditOp, WeightEdit};
use crate::eval::{choice, ppl};
use crate::{Error, Model, Result};

/// The analyses a session runs after detection, in order.
pub const ANALYSES: [&str; 7] =
    ["screen", "vocab", "cascade", "trace", "compare-generate", "quantize-study", "mc"];

/// Settings of a research session.
#[derive(Debug, Clone, Serialize)]
pub struct ResearchConfig {
    /// Detection and confirmation settings.
    pub detect: DetectConfig,
    /// Text for screening, vocabulary effects and the quantization study.
    pub text: String,
    /// Prompt for cascade, trace and compare-generate.
    pub prompt: String,
    /// Screen this many largest-|w| down_proj weights besides the candidates.
    pub top_largest: usize,
    /// Screening perplexity window (text tokens).
    pub screen_context: usize,
    /// Samples the text is cut into for vocabulary effects.
    pub vocab_samples: usize,
    /// Most tokens per vocabulary sample.
    pub vocab_context: usize,
    /// Tokens listed among the largest vocabulary shifts.
    pub vocab_top_k: usize,
    /// Greedy tokens per continuation in compare-generate.
    pub max_new_tokens: usize,
    /// Scale factors in compare-generate.
    pub factors: Vec<f32>,
    /// Quantization study settings.
    pub quantize: quantize::StudyConfig,
    /// Analyses not to run (names from [`ANALYSES`]).
    pub skip: Vec<String>,
    /// Also write each plot as PNG next to its SVG.
    pub png: bool,
}

impl Default for ResearchConfig {
    fn default() -> Self {
        ResearchConfig {
            detect: DetectConfig::default(),
            text: detect::DEFAULT_CONFIRM_TEXT.to_string(),
            prompt: detect::DEFAULT_PROMPT.to_string(),
            top_largest: 8,
            screen_context: 32,
            vocab_samples: 4,
            vocab_context: 64,
            vocab_top_k: 10,
            max_new_tokens: 8,
            factors: compare::CompareConfig::default().factors,
            quantize: quantize::StudyConfig {
                bits: 4,
                block_sizes: vec![64, 4096, 1 << 20],
                clip_z: Some(6.0),
                context: 64,
                only: None,
                kl_positions: 64,
            },
            skip: Vec::new(),
            png: false,
        }
    }
}

/// The swk version and, when known, the git commit it was built from (`SWK_GIT_COMMIT` at
/// build time, else `git rev-parse HEAD` in the source tree it was built in, if present).
pub fn provenance() -> (String, Option<String>) {
    let commit = option_env!("SWK_GIT_COMMIT").map(String::from).or_else(|| {
        let out = std::process::Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()?;
        let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
        (out.status.success() && !s.is_empty()).then_some(s)
    });
    (env!("CARGO_PKG_VERSION").to_string(), commit)
}

/// `v` as JSON through its text form, so f32 fields keep their shortest digits (as
/// `swk detect --json` prints them) instead of their f64 widening.
fn to_json(v: &impl Serialize) -> Result<Value> {
    let bad = |e: serde_json::Error| Error::Invalid(format!("session json: {e}"));
    serde_json::from_str(&serde_json::to_string(v).map_err(bad)?).map_err(bad)
}

/// The token sequences a session runs (built from [`ResearchConfig`]'s texts by
/// [`Inputs::from_config`], or given directly for a model without a tokenizer).
#[derive(Debug, Clone)]
pub struct Inputs {
    /// Detection prompts (with the model's special tokens).
    pub prompts: Vec<Vec<u32>>,
    /// The prompt of cascade, trace and compare-generate.
    pub prompt: Vec<u32>,
    /// Confirmation sequence (scored in windows of `detect.confirm_context`).
    pub confirm: Vec<u32>,
    /// Text for screening and the quantization study.
    pub text: Vec<u32>,
    /// Samples for vocabulary effects.
    pub vocab_samples: Vec<Vec<u32>>,
    /// Weights to study instead of the confirmed super weights (empty: the confirmed ones).
    pub study: Vec<WeightEdit>,
    /// Multiple-choice items (baseline vs edited accuracy; empty: the analysis is skipped)
    /// and the task or file they come from.
    pub mc: (String, Vec<crate::eval::choice::TokenItem>),
}

impl Inputs {
    /// Tokenize `cfg`'s prompts and texts with the model's tokenizer.
    pub fn from_config(model: &Model, cfg: &ResearchConfig) -> Result<Inputs> {
        let tok = model.tokenizer()?;
        Ok(Inputs {
            prompts: cfg
                .detect
                .prompts
                .iter()
                .map(|p| tok.encode(p, true))
                .collect::<Result<_>>()?,
            prompt: tok.encode(&cfg.prompt, true)?,
            confirm: tok.encode(&cfg.detect.confirm_text, false)?,
            text: crate::eval::ppl::text_tokens(model, &cfg.text)?,
            vocab_samples: crate::analysis::text_samples(
                model,
                &cfg.text,
                cfg.vocab_samples,
                cfg.vocab_context,
            )?,
            study: Vec::new(),
            mc: (String::new(), Vec::new()),
        })
    }
}

/// Run the session on `model` (named `spec` by the user) from `cfg`'s texts, studying `study`
/// (or, when empty, the confirmed super weights). See [`research_inputs`].
pub fn research(
    model: &mut Model,
    spec: &str,
    cfg: &ResearchConfig,
    study: &[WeightEdit],
    plot_dir: &Path,
    on_stage: impl FnMut(usize, usize, &str),
) -> Result<Value> {
    let mut inputs = Inputs::from_config(model, cfg)?;
    inputs.study = study.to_vec();
    research_inputs(model, spec, cfg, &inputs, plot_dir, on_stage)
}

/// Run the session on `inputs`. Plots are written as SVG into `plot_dir` (`vocab.svg`,
/// `cascade.svg`, `quantize-study.svg`; PNG too with `cfg.png`) and embedded in the session
/// under `plots`.
/// `on_stage(done, total, what)` reports progress.
pub fn research_inputs(
    model: &mut Model,
    spec: &str,
    cfg: &ResearchConfig,
    inputs: &Inputs,
    plot_dir: &Path,
    on_stage: impl FnMut(usize, usize, &str),
) -> Result<Value> {
    research_on::<Model>(model, None, spec, cfg, inputs, plot_dir, on_stage)
}

/// A backend that runs detection and screening for a session in place of the CPU model:
/// the weights of the same model (e.g. the CUDA backend's `CudaModel`), and its description
/// for the session's `device` field.
pub struct Device<'a, B> {
    /// The backend.
    pub backend: &'a mut B,
    /// What it is, e.g. `cuda: NVIDIA H100 (bf16 weights, cublas-split)`.
    pub name: &'a str,
    /// Whether its layers are streamed from the model's files: quantize-study, which rewrites
    /// every linear tensor, then runs on the CPU `model`.
    pub streamed: bool,
}

/// [`research_inputs`] with every analysis on `device` when given (but quantize-study when
/// the device streams its layers: see [`Device::streamed`]); the CPU `model`, which must hold
/// the same weights, tokenizes, names the tensors and runs what the device does not. The
/// session's `device` maps each analysis to where it ran.
pub fn research_on<B: AnalysisBackend>(
    model: &mut Model,
    mut device: Option<Device<'_, B>>,
    spec: &str,
    cfg: &ResearchConfig,
    inputs: &Inputs,
    plot_dir: &Path,
    mut on_stage: impl FnMut(usize, usize, &str),
) -> Result<Value> {
    for s in &cfg.skip {
        if !ANALYSES.contains(&s.as_str()) {
            return Err(Error::Invalid(format!(
                "--skip {s}: not an analysis ({})",
                ANALYSES.join(", ")
            )));
        }
    }
    let start = Instant::now();
    let (version, commit) = provenance();
    let total = 1 + ANALYSES.len();
    let mut timings = Map::new();
    let mut session = Map::new();
    session.insert("swk_version".into(), json!(version));
    session.insert("git_commit".into(), json!(commit));
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    session.insert("created_unix".into(), json!(created));
    session.insert("model".into(), json!(spec));
    let c = &model.config;
    session.insert(
        "model_info".into(),
        json!({
            "architecture": c.architecture.name(),
            "num_layers": c.num_layers,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "vocab_size": c.vocab_size,
            "parameters": c.parameter_count(),
        }),
    );
    session.insert("inputs".into(), to_json(cfg)?);
    let device_name = device.as_ref().map_or("cpu", |d| d.name).to_string();
    let streamed = device.as_ref().is_some_and(|d| d.streamed);
    let on_cpu = |analysis: &str| device.is_none() || (streamed && analysis == "quantize-study");
    let ran_on: Map<String, Value> = std::iter::once("detect")
        .chain(ANALYSES)
        .map(|a| {
            let on = if on_cpu(a) { "cpu" } else { device_name.as_str() };
            (a.to_string(), json!(on))
        })
        .collect();
    session.insert("device".into(), Value::Object(ran_on));

    on_stage(0, total, "detect");
    let t = Instant::now();
    let d = match device.as_mut() {
        Some(dev) => {
            let windows = if cfg.detect.skip_confirmation {
                Vec::new()
            } else {
                ppl::windows(model, &inputs.confirm, cfg.detect.confirm_context)?
            };
            detect::detect_with(dev.backend, &inputs.prompts, &windows, &cfg.detect, {
                |_, _, what| on_stage(0, total, what)
            })?
        }
        None => detect::detect_tokens(model, &inputs.prompts, &inputs.confirm, &cfg.detect, {
            |_, _, what| on_stage(0, total, what)
        })?,
    };
    let report = crate::detect_report::report(spec, model, &cfg.detect, &d, &device_name)?;
    let detect_json = to_json(&report)?;
    session.insert("super_weights".into(), detect_json["super_weights"].clone());
    session.insert("detect".into(), detect_json);
    timings.insert("detect".into(), json!(t.elapsed().as_secs_f64()));
    let mut confirmed = d.super_weights.clone();
    confirmed.sort_by(|a, b| {
        let r = |s: &detect::SuperWeight| s.perplexity_ratio.unwrap_or(0.0);
        r(b).total_cmp(&r(a))
    });
    let edits: Vec<WeightEdit> = if inputs.study.is_empty() {
        confirmed
            .iter()
            .map(|s| WeightEdit::down_proj(s.layer, s.row, s.col, EditOp::Zero))
            .collect()
    } else {
        inputs.study.clone()
    };
    let candidates: Vec<WeightEdit> = d
        .super_weights
        .iter()
        .chain(&d.rejected)
        .map(|s| WeightEdit::down_proj(s.layer, s.row, s.col, EditOp::Zero))
        .collect();
    session.insert("studied_edits".into(), to_json(&edits)?);

    let text_tokens = &inputs.text;
    let prompt_tokens = &inputs.prompt;
    let (mut errors, mut skipped, mut plots) = (Map::new(), Map::new(), Map::new());
    for (k, name) in ANALYSES.iter().enumerate() {
        on_stage(k + 1, total, name);
        if cfg.skip.iter().any(|s| s == name) {
            skipped.insert(name.to_string(), json!("skipped by --skip"));
            continue;
        }
        let needs_edits = *name != "screen";
        if needs_edits && edits.is_empty() {
            skipped.insert(name.to_string(), json!("no confirmed super weight to study"));
            continue;
        }
        if *name == "mc" && inputs.mc.1.is_empty() {
            skipped
                .insert(name.to_string(), json!("no multiple-choice items (--mc-task, --mc-data)"));
            continue;
        }
        if !needs_edits && candidates.is_empty() && cfg.top_largest == 0 {
            skipped.insert(name.to_string(), json!("no candidate to screen"));
            continue;
        }
        let t = Instant::now();
        let plot = plot_dir.join(format!("{name}.svg"));
        let mut plot_paths = vec![plot.clone()];
        if cfg.png {
            plot_paths.push(plot.with_extension("png"));
        }
        let outcome: Result<(Value, bool)> = match *name {
            "screen" => {
                let sc = screen::ScreenConfig {
                    top_largest: cfg.top_largest,
                    context: cfg.screen_context,
                };
                let step =
                    |_: usize, _: usize, w: &str| on_stage(k + 1, total, &format!("screen: {w}"));
                match device.as_mut() {
                    Some(dev) => (|| {
                        let largest = screen::largest_down_proj(model, sc.top_largest)?;
                        let windows = ppl::windows(model, text_tokens, sc.context)?;
                        screen::screen_with(dev.backend, &windows, &candidates, &largest, &sc, step)
                    })(),
                    None => screen::screen(model, text_tokens, &candidates, &sc, step),
                }
                .and_then(|r| Ok((to_json(&r)?, false)))
            }
            "vocab" => (|| {
                let samples = &inputs.vocab_samples;
                let vc = vocab::VocabConfig { top_k: cfg.vocab_top_k, include_all: false };
                let r = match device.as_mut() {
                    Some(dev) => {
                        let tok = model.tokenizer.as_ref();
                        vocab::vocab_effects_with(
                            dev.backend,
                            tok,
                            samples,
                            &edits,
                            &vc,
                            |_, _| {},
                        )?
                    }
                    None => vocab::vocab_effects(model, samples, &edits, &vc, |_, _| {})?,
                };
                for p in &plot_paths {
                    vocab::plot(&r, p)?;
                }
                Ok((to_json(&r)?, true))
            })(),
            "cascade" => (|| {
                let cc = cascade::CascadeConfig::default();
                let r = match device.as_mut() {
                    Some(dev) => {
                        let labels = token_labels(model, prompt_tokens);
                        cascade::cascade_with(dev.backend, prompt_tokens, &labels, &edits, &cc)?
                    }
                    None => cascade::cascade(model, prompt_tokens, &edits, &cc)?,
                };
                for p in &plot_paths {
                    cascade::plot(&r, p)?;
                }
                Ok((to_json(&r)?, true))
            })(),
            "trace" => (|| {
                let (l, r, c) = down_proj_coords(&edits[0])
                    .ok_or_else(|| Error::Invalid("the studied edit is not a down_proj".into()))?;
                let t = match device.as_ref() {
                    Some(dev) => {
                        let labels = token_labels(model, prompt_tokens);
                        trace::trace_with(&*dev.backend, prompt_tokens, &labels, (l, r, c))?
                    }
                    None => trace::trace(model, prompt_tokens, l, r, c)?,
                };
                Ok((to_json(&t)?, false))
            })(),
            "compare-generate" => (|| {
                let cc = compare::CompareConfig {
                    factors: cfg.factors.clone(),
                    max_new_tokens: cfg.max_new_tokens,
                };
                let prompts = vec![prompt_tokens.clone()];
                let r = match device.as_mut() {
                    Some(dev) => {
                        let tok = model.tokenizer.as_ref();
                        compare::compare_generate_with(dev.backend, tok, &prompts, &edits, &cc, {
                            |_, _| {}
                        })?
                    }
                    None => compare::compare_generate(model, &prompts, &edits, &cc, |_, _| {})?,
                };
                Ok((to_json(&r)?, false))
            })(),
            "mc" => {
                let (task, items) = (&inputs.mc.0, &inputs.mc.1);
                let step = |d: usize, t: usize| on_stage(k + 1, total, &format!("mc: {d}/{t}"));
                match device.as_mut() {
                    Some(dev) => choice::compare(dev.backend, task, items, &edits, step),
                    None => choice::compare(model, task, items, &edits, step),
                }
                .and_then(|r| Ok((to_json(&r)?, false)))
            }
            _ => (|| {
                let qc = &cfg.quantize;
                let step = |_: usize, _: usize, w: &str| {
                    on_stage(k + 1, total, &format!("quantize-study: {w}"))
                };
                let r = match device.as_mut().filter(|_| !streamed) {
                    Some(dev) => {
                        let windows = ppl::windows(model, text_tokens, qc.context)?;
                        let tensors = quantize::linear_tensors(model, qc.only.as_deref());
                        let (b, w, t) = (&mut *dev.backend, &windows, &tensors);
                        quantize::quantize_study_with(b, w, t, &edits, qc, step)?
                    }
                    None => quantize::quantize_study(model, text_tokens, &edits, qc, step)?,
                };
                for p in &plot_paths {
                    quantize::plot(&r, p)?;
                }
                Ok((to_json(&r)?, true))
            })(),
        };
        timings.insert(name.to_string(), json!(t.elapsed().as_secs_f64()));
        match outcome {
            Ok((v, has_plot)) => {
                session.insert(name.replace('-', "_"), v);
                if has_plot {
                    let svg = std::fs::read_to_string(&plot).map_err(|e| Error::io(&plot, e))?;
                    plots.insert(name.to_string(), json!(svg));
                }
            }
            Err(e) => {
                errors.insert(name.to_string(), json!(e.to_string()));
            }
        }
    }
    on_stage(total, total, "done");
    session.insert("plots".into(), Value::Object(plots));
    session.insert("errors".into(), Value::Object(errors));
    session.insert("skipped".into(), Value::Object(skipped));
    session.insert("timings".into(), Value::Object(timings));
    session.insert("total_seconds".into(), json!(start.elapsed().as_secs_f64()));
    Ok(Value::Object(session))
}
