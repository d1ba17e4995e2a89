//! The report of `swk detect --json`: a [`Detection`] with each super weight's agreement with
//! the catalog. `swk research` embeds the same object in its session.

use serde::Serialize;

use crate::catalog::{self, Agreement};
use crate::detect::{DetectConfig, Detection, LayerMaxima, SuperWeight};
use crate::{Model, Result};

/// A detected weight and whether the catalog agrees.
#[derive(Debug, Serialize)]
pub struct Reported<'a> {
    /// The detected weight (its fields flattened into the object).
    #[serde(flatten)]
    pub sw: &'a SuperWeight,
    /// What the catalog says about its coordinates.
    pub catalog: Agreement,
}

/// The whole report (the README documents its schema).
#[derive(Debug, Serialize)]
pub struct DetectReport<'a> {
    /// The model as the user named it.
    pub model: &'a str,
    /// Its architecture.
    pub architecture: &'static str,
    /// The backend that ran detection: `cpu`, or `cuda: NAME (DTYPE weights, ENGINE)`.
    pub device: String,
    /// Spike threshold.
    pub threshold: f32,
    /// Prompts run.
    pub prompts: &'a [String],
    /// Confirmed super weights.
    pub super_weights: Vec<Reported<'a>>,
    /// Rejected spikes.
    pub rejected: Vec<Reported<'a>>,
    /// Catalog entries for this model.
    pub catalog_entries: Vec<catalog::Entry>,
    /// Confirmation perplexity without edits.
    pub baseline_perplexity: Option<f64>,
    /// Tokens scored in confirmation.
    pub confirm_tokens: usize,
    /// Per-layer maxima of the first pass.
    pub layers: &'a [LayerMaxima],
    /// Weight checksum (restored bit-exact).
    pub weights_checksum: &'a str,
    /// Wall time of detection.
    pub seconds: f64,
}

/// The report of detection `d` on `model` (named `spec` by the user) with settings `cfg`,
/// run on `device` (see [`DetectReport::device`]).
pub fn report<'a>(
    spec: &'a str,
    model: &Model,
    cfg: &'a DetectConfig,
    d: &'a Detection,
    device: &str,
) -> Result<DetectReport<'a>> {
    let names = model.source.names();
    let entries = catalog::lookup(&names.iter().map(String::as_str).collect::<Vec<_>>())?;
    // The catalog lists dense down_proj coordinates only.
    let tag = |sw: &'a SuperWeight| Reported {
        sw,
        catalog: match (sw.expert, sw.shared_expert) {
            (None, false) => catalog::agreement(&entries, sw.layer, sw.row, sw.col),
            _ => Agreement::Unknown,
        },
    };
    Ok(DetectReport {
        model: spec,
        architecture: model.config.architecture.name(),
        device: device.to_string(),
        threshold: cfg.threshold,
        prompts: &cfg.prompts,
        super_weights: d.super_weights.iter().map(tag).collect(),
        rejected: d.rejected.iter().map(tag).collect(),
        catalog_entries: entries.clone(),
        baseline_perplexity: d.baseline_perplexity,
        confirm_tokens: d.confirm_tokens,
        layers: &d.layers,
        weights_checksum: &d.weights_checksum,
        seconds: d.seconds,
    })
}
