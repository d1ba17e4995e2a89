//! Research analyses of super weights: what removing them does to the vocabulary, how their
//! massive activation cascades through the residual stream, the arithmetic of one spike,
//! generation with them zeroed or scaled, super-outlier-aware quantization and screening of
//! candidates by perplexity impact.
//!
//! Every analysis takes the edits to study as `&[WeightEdit]` (usually: zero the super weights
//! that detection confirms, see [`detected_edits`]), restores every weight before it returns,
//! and returns a serde-serializable report. [`plot`] draws the reports as SVG charts.

pub mod cascade;
pub mod compare;
pub mod experts;
pub mod groups;
pub mod plot;
pub mod quantize;
pub mod research;
pub mod screen;
pub mod trace;
pub mod vocab;

use std::collections::HashMap;

use crate::detect::{self, DetectBackend, DetectConfig, DetectInputs};
use crate::edit::{EditOp, WeightEdit};
use crate::eval::logits::LogitsBackend;
use crate::hooks::{HookPoint, Hooks};
use crate::model::arch::{ForwardOptions, KvCache, Logits};
use crate::{Error, Model, Result};

/// `(layer, row, col)` when `edit` targets a layer's MLP down-projection weight.
pub fn down_proj_coords(edit: &WeightEdit) -> Option<(usize, usize, usize)> {
    let layer = edit.tensor.strip_prefix("model.layers.")?.strip_suffix(".mlp.down_proj.weight")?;
    match edit.index[..] {
        [row, col] => Some((layer.parse().ok()?, row, col)),
        _ => None,
    }
}

/// Zero edits of the super weights listed in a `swk detect --json` report: its
/// `super_weights`, and its `rejected` spikes too when `include_rejected`.
pub fn edits_from_detect_json(text: &str, include_rejected: bool) -> Result<Vec<WeightEdit>> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::Invalid(format!("detection report is not JSON: {e}")))?;
    let mut lists = vec!["super_weights"];
    if include_rejected {
        lists.push("rejected");
    }
    let mut out = Vec::new();
    for list in lists {
        let items = v.get(list).and_then(|x| x.as_array()).ok_or_else(|| {
            Error::Invalid(format!(
                "detection report has no `{list}` array (use swk detect --json)"
            ))
        })?;
        for (k, sw) in items.iter().enumerate() {
            let field = |name: &str| {
                sw.get(name).and_then(|x| x.as_u64()).map(|x| x as usize).ok_or_else(|| {
                    Error::Invalid(format!("detection report: {list}[{k}] has no integer `{name}`"))
                })
            };
            let (l, r, c) = (field("layer")?, field("row")?, field("col")?);
            // An expert's weight names its tensor (`mlp.experts.E.down_proj`).
            match sw.get("tensor").and_then(|t| t.as_str()) {
                Some(t) if sw.get("expert").is_some_and(|e| !e.is_null()) => {
                    out.push(WeightEdit::new(t, &[r, c], EditOp::Zero))
                }
                _ => out.push(WeightEdit::down_proj(l, r, c, EditOp::Zero)),
            }
        }
    }
    Ok(out)
}

/// Run detection with its defaults and return zero edits of the confirmed super weights,
/// strongest (largest perplexity ratio) first, or, when `candidates` is set, of every raw
/// candidate without confirming any (what screening ranks), in layer order.
pub fn detected_edits(
    model: &mut Model,
    candidates: bool,
    on_step: impl FnMut(usize, usize, &str),
) -> Result<Vec<WeightEdit>> {
    let inputs = detect::detect_inputs(model, &detected_config(candidates))?;
    detected_edits_with(model, &inputs, candidates, on_step)
}

/// The detection settings of [`detected_edits`]: the defaults, without confirmation when
/// `candidates`.
pub fn detected_config(candidates: bool) -> DetectConfig {
    DetectConfig { skip_confirmation: candidates, ..DetectConfig::default() }
}

/// [`detected_edits`] on any backend (the CPU [`Model`], or the CUDA backend's `CudaModel`),
/// with the prompts and windows of [`detected_config`] tokenized already (see
/// [`detect::detect_inputs`]).
pub fn detected_edits_with<B: DetectBackend>(
    model: &mut B,
    inputs: &DetectInputs,
    candidates: bool,
    on_step: impl FnMut(usize, usize, &str),
) -> Result<Vec<WeightEdit>> {
    let cfg = detected_config(candidates);
    let mut found =
        detect::detect_with(model, &inputs.prompts, &inputs.windows, &cfg, on_step)?.super_weights;
    found.sort_by(|a, b| {
        let r = |s: &detect::SuperWeight| s.perplexity_ratio.unwrap_or(0.0);
        r(b).total_cmp(&r(a))
    });
    Ok(found.iter().map(|s| WeightEdit::new(&s.tensor, &[s.row, s.col], EditOp::Zero)).collect())
}

/// Sequences for an analysis over a text: its tokens (no special tokens) cut into at most
/// `samples` pieces of at most `context` tokens, each preceded by BOS when the tokenizer adds
/// BOS by default (as the perplexity protocol feeds them).
pub fn text_samples(
    model: &Model,
    text: &str,
    samples: usize,
    context: usize,
) -> Result<Vec<Vec<u32>>> {
    let tokens = crate::eval::ppl::text_tokens(model, text)?;
    if tokens.len() < 2 {
        return Err(Error::Invalid("the text is too short (fewer than 2 tokens)".into()));
    }
    let samples = samples.max(1);
    let len = tokens.len().div_ceil(samples).clamp(2, context.max(2));
    let mut w = crate::eval::ppl::windows(model, &tokens, len)?;
    w.retain(|s| s.len() >= 2);
    w.truncate(samples);
    Ok(w)
}

/// A backend that copies activations out of a forward pass at hook points, read-only: the
/// CPU [`Model`] (through its hooks) and the CUDA backend's `CudaModel`. What the analyses
/// that look inside a pass (cascade, trace) run on.
pub trait CaptureBackend: DetectBackend {
    /// The activations at `points` of one forward pass over `tokens` from an empty cache:
    /// `[tokens, width]` per point (see [`crate::hooks::HookKind`]); a point the family does
    /// not have at that layer is absent.
    fn capture(&self, tokens: &[u32], points: &[HookPoint])
        -> Result<HashMap<HookPoint, Vec<f32>>>;
}

/// Everything the analyses ask of a backend: detection, edits and perplexity
/// ([`DetectBackend`]), logits ([`LogitsBackend`]) and activations ([`CaptureBackend`]).
/// Implemented for every type that has all three (the CPU [`Model`], `CudaModel`).
pub trait AnalysisBackend: DetectBackend + LogitsBackend + CaptureBackend {}

impl<T: DetectBackend + LogitsBackend + CaptureBackend> AnalysisBackend for T {}

impl CaptureBackend for Model {
    fn capture(
        &self,
        tokens: &[u32],
        points: &[HookPoint],
    ) -> Result<HashMap<HookPoint, Vec<f32>>> {
        capture(self, tokens, points)
    }
}

/// `len` values of `tensor` from flat offset `start`, read through `backend` as f32 (a bf16
/// device's stored values, widened).
pub fn read_values<B: crate::edit::EditTarget + ?Sized>(
    backend: &B,
    tensor: &str,
    start: usize,
    len: usize,
) -> Result<Vec<f32>> {
    Ok(backend.read_range(tensor, start, len)?.into_iter().map(f32::from_bits).collect())
}

/// Capture the activations at `points` for one forward pass over `tokens` (from an empty
/// cache, no logits): `[tokens, width]` per point.
pub fn capture(
    model: &Model,
    tokens: &[u32],
    points: &[HookPoint],
) -> Result<HashMap<HookPoint, Vec<f32>>> {
    let store = std::sync::Mutex::new(HashMap::new());
    {
        let mut hooks = Hooks::new();
        for &p in points {
            let store = &store;
            hooks.add(p, move |p, a| {
                if let Ok(mut s) = store.lock() {
                    s.insert(p, a.data.to_vec());
                }
            });
        }
        let opts = ForwardOptions { hooks: Some(&mut hooks), stats: None, logits: Logits::None };
        model.forward(tokens, &mut KvCache::new(model), opts)?;
    }
    store.into_inner().map_err(|_| Error::Backend("activation capture panicked".into()))
}

/// A readable label of token `id`: its decoded text (Debug-quoted, so spaces and newlines
/// show), or `#id` when the model has no tokenizer.
pub fn token_label(model: &Model, id: u32) -> String {
    token_label_with(model.tokenizer.as_ref(), id)
}

/// [`token_label`] of every token of `tokens`.
pub fn token_labels(model: &Model, tokens: &[u32]) -> Vec<String> {
    tokens.iter().map(|&t| token_label(model, t)).collect()
}

/// [`token_label`] with `tok` (None: `#id`).
pub fn token_label_with(tok: Option<&crate::io::tokenizer::Tokenizer>, id: u32) -> String {
    match tok.map(|t| t.decode(&[id], false)) {
        Some(Ok(s)) => format!("{s:?}"),
        _ => format!("#{id}"),
    }
}

/// `log_softmax(logits)` in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let lse = log_sum_exp(logits);
    logits.iter().map(|&l| l as f64 - lse).collect()
}

/// `ln Σ exp(logits)` in f64.
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    max + logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln()
}

/// Median of `|x|` over `x` (0 for an empty slice).
pub fn median_abs(x: &[f32]) -> f32 {
    let mut v: Vec<f32> = x.iter().map(|a| a.abs()).collect();
    if v.is_empty() {
        return 0.0;
    }
    let mid = v.len() / 2;
    *v.select_nth_unstable_by(mid, f32::total_cmp).1
}
