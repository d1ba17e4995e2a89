//! Screening: rank candidate weights by how much perplexity grows when each one alone is
//! edited (zeroed, by default). On the CPU each edited run repeats only the blocks from the
//! edited layer on ([`Confirmer`](crate::confirm::Confirmer)'s partial re-runs); any
//! [`DetectBackend`] (the CUDA backend too) screens through [`screen_with`]. Candidates can
//! include the largest-|w| down_proj weights of the whole model, the naive guess at what
//! matters.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rayon::prelude::*;
use serde::Serialize;

use crate::analysis::down_proj_coords;
use crate::detect::{ConfirmBaseline, DetectBackend};
use crate::edit::{EditOp, WeightEdit};
use crate::eval::ppl;
use crate::model::ModelConfig;
use crate::{Error, Model, Result};

/// Settings of [`screen`].
#[derive(Debug, Clone, Serialize)]
pub struct ScreenConfig {
    /// Also screen this many largest-|w| down_proj weights (zeroed).
    pub top_largest: usize,
    /// Perplexity window (text tokens; short windows measure first-token effects sharply).
    pub context: usize,
}

impl Default for ScreenConfig {
    fn default() -> Self {
        ScreenConfig { top_largest: 0, context: 32 }
    }
}

/// Where a screened weight came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Given as a candidate.
    Candidate,
    /// Among the largest-|w| down_proj weights.
    Largest,
}

/// One screened weight.
#[derive(Debug, Clone, Serialize)]
pub struct ScreenEntry {
    /// 1-based rank by perplexity ratio.
    pub rank: usize,
    /// The edit applied alone.
    pub edit: WeightEdit,
    /// `(layer, row, col)` when it is a down_proj weight.
    pub coords: Option<(usize, usize, usize)>,
    /// The weight's value.
    pub value: f32,
    /// Why it was screened.
    pub source: Source,
    /// Perplexity with the edit.
    pub perplexity: f64,
    /// Over the baseline.
    pub ratio: f64,
}

/// The ranking.
#[derive(Debug, Clone, Serialize)]
pub struct ScreenReport {
    /// The settings.
    pub config: ScreenConfig,
    /// Perplexity without edits.
    pub baseline_perplexity: f64,
    /// Tokens scored.
    pub tokens_scored: usize,
    /// Largest ratio first.
    pub entries: Vec<ScreenEntry>,
}

/// The `k` largest-|w| down_proj weights of the model, largest first, as zero edits.
pub fn largest_down_proj(model: &Model, k: usize) -> Result<Vec<WeightEdit>> {
    largest_down_proj_by(&model.config, k, |l| {
        Ok(Cow::Borrowed(model.weights.get(&Model::down_proj_name(l))?.data.as_slice()))
    })
}

/// [`largest_down_proj`] of a model of `config`'s shapes whose layer-`l` down_proj weight
/// `read(l)` gives (from memory, or from the files of a model too large to load whole).
/// Layers are read in parallel; ties go to the lower layer, then the lower flat index.
pub fn largest_down_proj_by<'a>(
    config: &ModelConfig,
    k: usize,
    read: impl Fn(usize) -> Result<Cow<'a, [f32]>> + Sync,
) -> Result<Vec<WeightEdit>> {
    if k == 0 {
        return Ok(Vec::new());
    }
    let inter = config.intermediate_size;
    let per_layer: Vec<Vec<(u32, usize, usize)>> = (0..config.num_layers)
        .into_par_iter()
        .map(|l| {
            let w = read(l)?;
            // |w| of a float orders like its bits once the sign is cleared.
            let mut heap: BinaryHeap<Reverse<(u32, usize)>> = BinaryHeap::with_capacity(k + 1);
            for (i, v) in w.iter().enumerate() {
                let key = v.to_bits() & 0x7fff_ffff;
                if heap.len() < k {
                    heap.push(Reverse((key, i)));
                } else if heap.peek().is_some_and(|Reverse((m, _))| key > *m) {
                    heap.pop();
                    heap.push(Reverse((key, i)));
                }
            }
            Ok(heap.into_iter().map(|Reverse((key, i))| (key, l, i)).collect())
        })
        .collect::<Result<_>>()?;
    let mut all: Vec<(u32, usize, usize)> = per_layer.into_iter().flatten().collect();
    all.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    all.truncate(k);
    Ok(all
        .into_iter()
        .map(|(_, l, i)| WeightEdit::down_proj(l, i / inter, i % inter, EditOp::Zero))
        .collect())
}

/// Rank `candidates` (each applied alone), plus the `cfg.top_largest` largest-|w| down_proj
/// weights zeroed, by the perplexity of `tokens` in windows of `cfg.context`. Duplicates
/// (same tensor and index) are screened once. `on_step(done, total, what)` reports progress.
pub fn screen(
    model: &mut Model,
    tokens: &[u32],
    candidates: &[WeightEdit],
    cfg: &ScreenConfig,
    on_step: impl FnMut(usize, usize, &str),
) -> Result<ScreenReport> {
    let largest = largest_down_proj(model, cfg.top_largest)?;
    let windows = ppl::windows(model, tokens, cfg.context)?;
    screen_with(model, &windows, candidates, &largest, cfg, on_step)
}

/// [`screen`] on any backend (the CPU [`Model`], or the CUDA backend's `CudaModel`), with the
/// text already cut into perplexity windows (see [`ppl::windows`]) and the largest-|w|
/// weights already chosen (`largest`, see [`largest_down_proj_by`]; `cfg.top_largest` is
/// only recorded). Each weight's value is read from the backend: on a bf16 device, the
/// stored bf16 value. Every edit is restored before the next one runs.
pub fn screen_with<B: DetectBackend>(
    model: &mut B,
    windows: &[Vec<u32>],
    candidates: &[WeightEdit],
    largest: &[WeightEdit],
    cfg: &ScreenConfig,
    mut on_step: impl FnMut(usize, usize, &str),
) -> Result<ScreenReport> {
    let mut list: Vec<(WeightEdit, Source)> = Vec::new();
    let tagged = candidates
        .iter()
        .map(|e| (e, Source::Candidate))
        .chain(largest.iter().map(|e| (e, Source::Largest)));
    for (e, src) in tagged {
        if !list.iter().any(|(x, _)| x.tensor == e.tensor && x.index == e.index) {
            list.push((e.clone(), src));
        }
    }
    if list.is_empty() {
        return Err(Error::Invalid("nothing to screen (no candidates)".into()));
    }
    let total = list.len() + 1;
    on_step(0, total, "baseline perplexity");
    let baseline = model.confirm_baseline(windows)?;
    let base = baseline.baseline_perplexity();
    let mut entries = Vec::with_capacity(list.len());
    for (k, (edit, source)) in list.into_iter().enumerate() {
        on_step(k + 1, total, &edit.to_string());
        let flat = edit.flat_index(&model.shape_of(&edit.tensor)?)?;
        let value = f32::from_bits(model.read_bits(&edit.tensor, flat)?);
        let p = model.confirm_with(&baseline, std::slice::from_ref(&edit))?;
        entries.push(ScreenEntry {
            rank: 0,
            coords: down_proj_coords(&edit),
            edit,
            value,
            source,
            perplexity: p,
            ratio: p / base,
        });
    }
    on_step(total, total, "done");
    entries.sort_by(|a, b| b.ratio.total_cmp(&a.ratio));
    for (i, e) in entries.iter_mut().enumerate() {
        e.rank = i + 1;
    }
    Ok(ScreenReport {
        config: cfg.clone(),
        baseline_perplexity: base,
        tokens_scored: baseline.tokens_scored(),
        entries,
    })
}
