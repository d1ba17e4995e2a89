//! The cascade: the massive activation a super weight writes into the residual stream, layer
//! by layer, with and without the edits.
//!
//! Per layer, the residual stream leaving the block (`hook_resid_post`) at the followed rows
//! (hidden dims; by default the rows the edits write) at every token position, and the massive
//! activations by Sun et al.'s criterion: `|a| > 100` and `|a| > 1000 ×` the median `|a|` of
//! that layer's residual stream (over all positions and dims).

use std::path::Path;

use serde::Serialize;

use crate::analysis::plot::{self, Series};
use crate::analysis::{down_proj_coords, median_abs, token_labels, CaptureBackend};
use crate::edit::{EditGuard, WeightEdit};
use crate::hooks::{HookKind, HookPoint};
use crate::{Error, Model, Result};

/// Settings of [`cascade`].
#[derive(Debug, Clone, Serialize)]
pub struct CascadeConfig {
    /// Hidden dims to follow (empty: the rows of the down_proj edits).
    pub rows: Vec<usize>,
    /// Massive activations listed per layer and run (the largest first).
    pub top_massive: usize,
    /// Criterion: |a| above this.
    pub min_abs: f32,
    /// Criterion: |a| above this multiple of the layer's median |a|.
    pub min_ratio: f32,
}

impl Default for CascadeConfig {
    fn default() -> Self {
        CascadeConfig { rows: Vec::new(), top_massive: 5, min_abs: 100.0, min_ratio: 1000.0 }
    }
}

/// One massive activation.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Massive {
    /// Token position.
    pub position: usize,
    /// The token there.
    pub token: String,
    /// Hidden dim.
    pub dim: usize,
    /// Signed value.
    pub value: f32,
    /// |value| over the layer's median |a|.
    pub ratio_to_median: f32,
}

/// The massive activations of one layer in one run.
#[derive(Debug, Clone, Serialize)]
pub struct LayerMassive {
    /// Median |a| over the layer's residual stream.
    pub median_abs: f32,
    /// Largest |a|.
    pub max_abs: f32,
    /// How many values meet the criterion.
    pub count: usize,
    /// The largest of them (up to `top_massive`).
    pub top: Vec<Massive>,
}

/// A followed row at one layer: its value at every token position.
#[derive(Debug, Clone, Serialize)]
pub struct RowValues {
    /// Hidden dim.
    pub row: usize,
    /// Values without the edits.
    pub base: Vec<f32>,
    /// Values with the edits.
    pub edited: Vec<f32>,
}

/// One layer of the cascade.
#[derive(Debug, Clone, Serialize)]
pub struct CascadeLayer {
    /// Block index (values are `blocks.{layer}.hook_resid_post`).
    pub layer: usize,
    /// Followed rows.
    pub rows: Vec<RowValues>,
    /// Massive activations without the edits.
    pub base: LayerMassive,
    /// Massive activations with the edits.
    pub edited: LayerMassive,
}

/// Where a followed row is massive.
#[derive(Debug, Clone, Serialize)]
pub struct RowSummary {
    /// Hidden dim.
    pub row: usize,
    /// Layers where the row meets the criterion at some position, without the edits.
    pub massive_layers_base: Vec<usize>,
    /// The same with the edits.
    pub massive_layers_edited: Vec<usize>,
    /// Largest |value| over layers and positions without the edits.
    pub peak_base: f32,
    /// The same with the edits.
    pub peak_edited: f32,
}

/// The cascade of massive activations.
#[derive(Debug, Clone, Serialize)]
pub struct CascadeReport {
    /// The edits.
    pub edits: Vec<WeightEdit>,
    /// Token ids of the prompt.
    pub token_ids: Vec<u32>,
    /// Their labels.
    pub tokens: Vec<String>,
    /// The settings.
    pub config: CascadeConfig,
    /// Per followed row.
    pub summary: Vec<RowSummary>,
    /// Per layer.
    pub layers: Vec<CascadeLayer>,
}

fn massive(h: usize, x: &[f32], labels: &[String], cfg: &CascadeConfig) -> LayerMassive {
    let median = median_abs(x);
    let limit = cfg.min_abs.max(cfg.min_ratio * median);
    let mut hits: Vec<(usize, f32)> =
        x.iter().enumerate().filter(|(_, a)| a.abs() > limit).map(|(i, &a)| (i, a)).collect();
    hits.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
    let count = hits.len();
    let top = hits
        .into_iter()
        .take(cfg.top_massive)
        .map(|(i, value)| Massive {
            position: i / h,
            token: labels[i / h].clone(),
            dim: i % h,
            value,
            ratio_to_median: if median > 0.0 { value.abs() / median } else { f32::INFINITY },
        })
        .collect();
    LayerMassive {
        median_abs: median,
        max_abs: x.iter().fold(0.0, |m, a| m.max(a.abs())),
        count,
        top,
    }
}

/// Follow the residual stream through every layer over `tokens`, with and without `edits`
/// (restored before returning).
pub fn cascade(
    model: &mut Model,
    tokens: &[u32],
    edits: &[WeightEdit],
    cfg: &CascadeConfig,
) -> Result<CascadeReport> {
    let labels = token_labels(model, tokens);
    cascade_with(model, tokens, &labels, edits, cfg)
}

/// [`cascade`] on any backend that captures activations (the CPU [`Model`], or the CUDA
/// backend's `CudaModel`), with the tokens' readable `labels` (see [`token_labels`]).
pub fn cascade_with<B: CaptureBackend>(
    model: &mut B,
    tokens: &[u32],
    labels: &[String],
    edits: &[WeightEdit],
    cfg: &CascadeConfig,
) -> Result<CascadeReport> {
    let c = model.model_config();
    let (n, h) = (c.num_layers, c.hidden_size);
    if labels.len() != tokens.len() {
        return Err(Error::Invalid(format!(
            "{} token labels for {} tokens",
            labels.len(),
            tokens.len()
        )));
    }
    if tokens.is_empty() {
        return Err(Error::Invalid("the prompt tokenizes to nothing".into()));
    }
    let mut cfg = cfg.clone();
    if cfg.rows.is_empty() {
        for (_, r, _) in edits.iter().filter_map(down_proj_coords) {
            if !cfg.rows.contains(&r) {
                cfg.rows.push(r);
            }
        }
    }
    if let Some(r) = cfg.rows.iter().find(|&&r| r >= h) {
        return Err(Error::Invalid(format!("row {r} is outside the hidden size {h}")));
    }
    let points: Vec<HookPoint> =
        (0..n).map(|layer| HookPoint { layer, kind: HookKind::ResidPost }).collect();
    let base = model.capture(tokens, &points)?;
    let edited = {
        let mut g = EditGuard::new(&mut *model);
        g.apply_all(edits)?;
        g.capture(tokens, &points)?
    };
    let get = |m: &std::collections::HashMap<HookPoint, Vec<f32>>, p: &HookPoint| {
        m.get(p).cloned().ok_or_else(|| Error::Backend(format!("{p} was not captured")))
    };
    let mut layers = Vec::with_capacity(n);
    for p in &points {
        let (xb, xe) = (get(&base, p)?, get(&edited, p)?);
        let column = |x: &[f32], r: usize| x.chunks(h).map(|row| row[r]).collect::<Vec<f32>>();
        layers.push(CascadeLayer {
            layer: p.layer,
            rows: cfg
                .rows
                .iter()
                .map(|&row| RowValues { row, base: column(&xb, row), edited: column(&xe, row) })
                .collect(),
            base: massive(h, &xb, labels, &cfg),
            edited: massive(h, &xe, labels, &cfg),
        });
    }
    let summary = cfg
        .rows
        .iter()
        .enumerate()
        .map(|(k, &row)| {
            let is_massive = |l: &LayerMassive, v: &[f32]| {
                let limit = cfg.min_abs.max(cfg.min_ratio * l.median_abs);
                v.iter().any(|a| a.abs() > limit)
            };
            let peak = |v: &[f32]| v.iter().fold(0f32, |m, a| m.max(a.abs()));
            RowSummary {
                row,
                massive_layers_base: layers
                    .iter()
                    .filter(|l| is_massive(&l.base, &l.rows[k].base))
                    .map(|l| l.layer)
                    .collect(),
                massive_layers_edited: layers
                    .iter()
                    .filter(|l| is_massive(&l.edited, &l.rows[k].edited))
                    .map(|l| l.layer)
                    .collect(),
                peak_base: layers.iter().map(|l| peak(&l.rows[k].base)).fold(0.0, f32::max),
                peak_edited: layers.iter().map(|l| peak(&l.rows[k].edited)).fold(0.0, f32::max),
            }
        })
        .collect();
    Ok(CascadeReport {
        edits: edits.to_vec(),
        token_ids: tokens.to_vec(),
        tokens: labels.to_vec(),
        config: cfg,
        summary,
        layers,
    })
}

/// Line plot across layers: the largest |value| over positions of each followed row, without
/// (thick) and with (thin) the edits, on a log scale, plus each run's layer median |a|.
pub fn plot(report: &CascadeReport, path: &Path) -> Result<()> {
    let peak = |v: &[f32]| v.iter().fold(0f32, |m, a| m.max(a.abs())) as f64;
    let mut series = Vec::new();
    for (k, &row) in report.config.rows.iter().enumerate() {
        for (edited, name) in [(false, "base"), (true, "edited")] {
            series.push(Series {
                name: format!("dim {row} ({name})"),
                points: report
                    .layers
                    .iter()
                    .map(|l| {
                        let r = &l.rows[k];
                        (l.layer as f64, peak(if edited { &r.edited } else { &r.base }))
                    })
                    .collect(),
                group: k,
                thin: edited,
            });
        }
    }
    let groups = report.config.rows.len();
    for (edited, name) in [(false, "base"), (true, "edited")] {
        series.push(Series {
            name: format!("median |a| ({name})"),
            points: report
                .layers
                .iter()
                .map(|l| {
                    let m = if edited { &l.edited } else { &l.base };
                    (l.layer as f64, m.median_abs as f64)
                })
                .collect(),
            group: groups,
            thin: edited,
        });
    }
    plot::line_chart(
        path,
        "Massive activations in the residual stream (hook_resid_post)",
        "layer",
        "max |activation| over positions",
        &series,
        true,
    )
}
