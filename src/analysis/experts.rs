//! Router statistics and super experts of mixture-of-experts models (Su et al. 2025, arXiv
//! 2507.23279).
//!
//! 1. Forward passes over sample sequences with spike statistics: per MoE layer and expert,
//!    how many tokens chose it (selection frequency), the sum of their routing weights, the
//!    router's mean entropy per layer, and inside each expert's down-projection the largest
//!    |input| (column, position) and the largest |output| (row, position; before the routing
//!    weight).
//! 2. Super experts, the paper's criterion: an expert whose max |down_proj output| is above the
//!    99.5th percentile of the max outputs of all experts of all MoE layers *and* above 0.1 ×
//!    the largest of them.
//! 3. Ablation: each super expert's output is zeroed (every weight of its down_proj set to 0,
//!    restored afterwards). The router is left alone: the expert keeps its top-k slot and the
//!    other experts keep their routing weights; only its contribution disappears. Perplexity
//!    of a text with the ablation over the baseline is the expert's impact; the re-runs start
//!    at the expert's layer on the CPU ([`crate::confirm::Confirmer`]).

use serde::Serialize;

use crate::detect::{ConfirmBaseline, DetectBackend};
use crate::edit::{EditOp, EditTarget, WeightEdit};
use crate::eval::ppl;
use crate::hooks::SpikeStats;
use crate::model::arch::moe;
use crate::{Error, Model, Result};

/// Settings of [`experts`].
#[derive(Debug, Clone, Serialize)]
pub struct ExpertsConfig {
    /// Percentile (of all experts' max |down_proj output|) a super expert must exceed.
    pub percentile: f64,
    /// Fraction of the overall max a super expert must exceed too.
    pub fraction_of_max: f64,
    /// Perplexity window (text tokens) of the ablation runs.
    pub context: usize,
    /// Measure the perplexity impact of ablating each super expert.
    pub ablate: bool,
}

impl Default for ExpertsConfig {
    fn default() -> Self {
        ExpertsConfig { percentile: 99.5, fraction_of_max: 0.1, context: 32, ablate: true }
    }
}

/// One expert's router and spike statistics.
#[derive(Debug, Clone, Serialize)]
pub struct ExpertStat {
    /// Layer index.
    pub layer: usize,
    /// Expert index.
    pub expert: usize,
    /// Tokens that chose this expert.
    pub selected: u64,
    /// `selected` over the layer's routed tokens (sums to top-k over a layer's experts).
    pub frequency: f64,
    /// `selected` over all selections of the layer (sums to 1 over a layer's experts).
    pub share: f64,
    /// Mean routing weight over the tokens that chose it (0 when none did).
    pub mean_weight: f64,
    /// Signed largest |down_proj input|.
    pub max_input: f32,
    /// Its column.
    pub max_input_col: usize,
    /// Its token position.
    pub max_input_position: usize,
    /// Signed largest |down_proj output| (before the routing weight).
    pub max_output: f32,
    /// Its row (hidden dim).
    pub max_output_row: usize,
    /// Its token position.
    pub max_output_position: usize,
}

/// Router summary of one MoE layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerRouting {
    /// Layer index.
    pub layer: usize,
    /// Tokens routed.
    pub tokens: u64,
    /// Mean entropy (nats) of the router's softmax.
    pub mean_entropy: f64,
    /// `ln(experts)`, the entropy of uniform routing.
    pub max_entropy: f64,
    /// Experts never chosen.
    pub unused_experts: usize,
}

/// A super expert and, when measured, its ablation impact.
#[derive(Debug, Clone, Serialize)]
pub struct SuperExpert {
    /// Layer index.
    pub layer: usize,
    /// Expert index.
    pub expert: usize,
    /// The tensor zeroed to ablate it.
    pub tensor: String,
    /// Signed largest |down_proj output|.
    pub max_output: f32,
    /// Its row.
    pub max_output_row: usize,
    /// Its token position.
    pub max_output_position: usize,
    /// `max |output|` over the overall max.
    pub fraction_of_max: f64,
    /// Perplexity with the expert's output zeroed.
    pub ablated_perplexity: Option<f64>,
    /// Over the baseline.
    pub perplexity_ratio: Option<f64>,
}

/// The report of [`experts`].
#[derive(Debug, Clone, Serialize)]
pub struct ExpertsReport {
    /// The settings.
    pub config: ExpertsConfig,
    /// How an expert is ablated.
    pub ablation: &'static str,
    /// Sample sequences run.
    pub samples: usize,
    /// Tokens over all samples.
    pub tokens: usize,
    /// Experts each token chooses.
    pub top_k: usize,
    /// Per MoE layer.
    pub layers: Vec<LayerRouting>,
    /// Per MoE layer and expert, in layer then expert order.
    pub experts: Vec<ExpertStat>,
    /// The percentile threshold over all experts' max |down_proj output|.
    pub percentile_threshold: f64,
    /// The largest |down_proj output| of any expert.
    pub overall_max: f64,
    /// Experts meeting both criteria, largest output first.
    pub super_experts: Vec<SuperExpert>,
    /// Perplexity without ablation (when ablations were measured).
    pub baseline_perplexity: Option<f64>,
    /// Tokens scored by the ablation perplexity.
    pub tokens_scored: usize,
}

/// The `p`-th percentile (0–100) of `v`, linear interpolation between order statistics
/// (numpy's default). 0 for an empty slice.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = (p / 100.0).clamp(0.0, 1.0) * (s.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (rank - lo as f64)
}

/// The edit that zeroes every weight of expert `e`'s down_proj in layer `l` (its output
/// ablated): one block edit, logged as the tensor's original bits.
pub fn ablation_edits<T: EditTarget + ?Sized>(
    model: &T,
    l: usize,
    e: usize,
) -> Result<Vec<WeightEdit>> {
    let name = moe::expert_name(l, e, "down_proj");
    if model.shape_of(&name)?.len() != 2 {
        return Err(Error::tensor(&name, "not a matrix"));
    }
    Ok(vec![WeightEdit::block(name, &[], EditOp::Zero)])
}

/// Router statistics over `samples` (each run from an empty cache), super experts, and, when
/// `cfg.ablate`, each super expert's perplexity impact on `text` (token ids, in windows of
/// `cfg.context`), on the CPU. Weights are restored before this returns. `on_step(done,
/// total, what)` reports progress.
pub fn experts(
    model: &mut Model,
    samples: &[Vec<u32>],
    text: &[u32],
    cfg: &ExpertsConfig,
    on_step: impl FnMut(usize, usize, &str),
) -> Result<ExpertsReport> {
    let windows = if cfg.ablate { ppl::windows(model, text, cfg.context)? } else { Vec::new() };
    experts_with(model, samples, &windows, cfg, on_step)
}

/// [`experts`] on any backend (the CPU [`Model`], or the CUDA backend's `CudaModel`), with
/// the ablation text already cut into perplexity windows (see [`ppl::windows`]).
pub fn experts_with<B: DetectBackend>(
    model: &mut B,
    samples: &[Vec<u32>],
    windows: &[Vec<u32>],
    cfg: &ExpertsConfig,
    mut on_step: impl FnMut(usize, usize, &str),
) -> Result<ExpertsReport> {
    let c = model.model_config().clone();
    let moe_cfg = moe::params(&c)?.clone();
    if samples.iter().all(|s| s.is_empty()) {
        return Err(Error::Invalid("no sample tokens to route".into()));
    }
    let mut stats = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
    let mut one = stats.clone();
    for (k, s) in samples.iter().enumerate() {
        on_step(k, samples.len(), "routing samples");
        if s.is_empty() {
            continue;
        }
        model.spike_stats(s, &mut one)?;
        stats.merge(&one);
    }
    let tokens: usize = samples.iter().map(Vec::len).sum();

    let mut layers = Vec::new();
    let mut list = Vec::new();
    for (l, s) in stats.layers.iter().enumerate() {
        if !moe_cfg.is_sparse(l) || s.experts.is_empty() {
            continue;
        }
        let routed = s.routed_tokens.max(1) as f64;
        let picks: u64 = s.experts.iter().map(|e| e.selected).sum();
        layers.push(LayerRouting {
            layer: l,
            tokens: s.routed_tokens,
            mean_entropy: s.router_entropy_sum / routed,
            max_entropy: (moe_cfg.num_experts as f64).ln(),
            unused_experts: s.experts.iter().filter(|e| e.selected == 0).count(),
        });
        for (e, es) in s.experts.iter().enumerate() {
            let peak = |v: &[crate::hooks::ChannelMax]| {
                v.iter()
                    .enumerate()
                    .max_by(|a, b| a.1.abs.total_cmp(&b.1.abs).then(b.0.cmp(&a.0)))
                    .map(|(i, m)| (i, *m))
                    .unwrap_or_default()
            };
            let (ic, im) = peak(&es.input);
            let (or, om) = peak(&es.output);
            list.push(ExpertStat {
                layer: l,
                expert: e,
                selected: es.selected,
                frequency: es.selected as f64 / routed,
                share: es.selected as f64 / picks.max(1) as f64,
                mean_weight: if es.selected > 0 { es.weight_sum / es.selected as f64 } else { 0.0 },
                max_input: im.value,
                max_input_col: ic,
                max_input_position: im.position,
                max_output: om.value,
                max_output_row: or,
                max_output_position: om.position,
            });
        }
    }
    let maxima: Vec<f64> = list.iter().map(|e| e.max_output.abs() as f64).collect();
    let threshold = percentile(&maxima, cfg.percentile);
    let overall = maxima.iter().copied().fold(0.0, f64::max);
    let mut supers: Vec<SuperExpert> = list
        .iter()
        .filter(|e| {
            let m = e.max_output.abs() as f64;
            m > threshold && m > cfg.fraction_of_max * overall
        })
        .map(|e| SuperExpert {
            layer: e.layer,
            expert: e.expert,
            tensor: moe::expert_name(e.layer, e.expert, "down_proj"),
            max_output: e.max_output,
            max_output_row: e.max_output_row,
            max_output_position: e.max_output_position,
            fraction_of_max: e.max_output.abs() as f64 / overall.max(f64::MIN_POSITIVE),
            ablated_perplexity: None,
            perplexity_ratio: None,
        })
        .collect();
    supers.sort_by(|a, b| b.max_output.abs().total_cmp(&a.max_output.abs()));

    let (mut baseline, mut scored) = (None, 0);
    if cfg.ablate && !supers.is_empty() {
        let total = supers.len() + 1;
        on_step(0, total, "baseline perplexity");
        let base = model.confirm_baseline(windows)?;
        baseline = Some(base.baseline_perplexity());
        scored = base.tokens_scored();
        for (k, s) in supers.iter_mut().enumerate() {
            on_step(k + 1, total, &format!("ablating layer {} expert {}", s.layer, s.expert));
            let edits = ablation_edits(model, s.layer, s.expert)?;
            let p = model.confirm_with(&base, &edits)?;
            s.ablated_perplexity = Some(p);
            s.perplexity_ratio = Some(p / base.baseline_perplexity());
        }
    }
    Ok(ExpertsReport {
        config: cfg.clone(),
        ablation: "output zeroed: every weight of the expert's down_proj set to 0; the router \
                   still selects it and the other experts keep their weights",
        samples: samples.len(),
        tokens,
        top_k: moe_cfg.top_k,
        layers,
        experts: list,
        percentile_threshold: threshold,
        overall_max: overall,
        super_experts: supers,
        baseline_perplexity: baseline,
        tokens_scored: scored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_interpolates_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(percentile(&v, 50.0), 3.0);
        assert_eq!(percentile(&v, 100.0), 5.0);
        assert!((percentile(&v, 99.5) - 4.98).abs() < 1e-12);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
