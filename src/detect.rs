//! Super weight detection: the method of Yu et al. 2024, made robust.
//!
//! 1. One forward pass per prompt with spike statistics on every MLP down-projection.
//! 2. A layer whose largest |input| (column `col`) and largest |output| (row `row`) both exceed
//!    the threshold yields the candidate `down_proj.weight[row, col]`.
//! 3. Zero the candidates, run again, repeat until nothing new spikes (the paper's iteration);
//!    everything is restored afterwards.
//! 4. Causal confirmation: zero each candidate alone and measure perplexity on a short text;
//!    a candidate is confirmed only when perplexity grows by more than `confirm_ratio`. Late
//!    layer spikes that merely cancel the massive activation are reported as rejected.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use serde::Serialize;

use crate::confirm::Confirmer;
use crate::edit::{EditGuard, EditOp, EditTarget, WeightEdit};
use crate::eval::ppl;
use crate::hooks::SpikeStats;
use crate::model::arch::{ForwardOptions, KvCache, Logits};
use crate::model::{Architecture, ModelConfig};
use crate::{Error, Model, Result};

/// What detection needs from a backend: the CPU [`Model`], or the CUDA backend's
/// `CudaModel` (feature `cuda`). Edits go through [`EditTarget`], so every zeroing is logged
/// and restored by an [`EditGuard`].
pub trait DetectBackend: EditTarget {
    /// The unedited confirmation state (the CPU keeps residual streams and KV caches).
    type Baseline: ConfirmBaseline;
    /// The model's hyper-parameters.
    fn model_config(&self) -> &ModelConfig;
    /// One forward pass over `tokens` from an empty cache, with spike statistics (`stats` is
    /// reset first).
    fn spike_stats(&self, tokens: &[u32], stats: &mut SpikeStats) -> Result<()>;
    /// Row `row` of `layer`'s down_proj weight, as f32.
    fn down_proj_row(&self, layer: usize, row: usize) -> Result<Vec<f32>>;
    /// A checksum of every weight's bits (backend-specific; equal before and after a run
    /// proves every edit was restored).
    fn weights_checksum(&self) -> Result<u64>;
    /// Score the confirmation windows (each fed whole, every token after the first scored)
    /// without edits.
    fn confirm_baseline(&self, windows: &[Vec<u32>]) -> Result<Self::Baseline>;
    /// Perplexity of the baseline's windows with `edits` applied (restored before returning).
    fn confirm_with(&mut self, base: &Self::Baseline, edits: &[WeightEdit]) -> Result<f64>;
}

/// The unedited scores of the confirmation windows.
pub trait ConfirmBaseline {
    /// Perplexity without edits.
    fn baseline_perplexity(&self) -> f64;
    /// Tokens scored.
    fn tokens_scored(&self) -> usize;
}

impl ConfirmBaseline for Confirmer {
    fn baseline_perplexity(&self) -> f64 {
        Confirmer::baseline_perplexity(self)
    }
    fn tokens_scored(&self) -> usize {
        Confirmer::tokens_scored(self)
    }
}

impl DetectBackend for Model {
    type Baseline = Confirmer;
    fn model_config(&self) -> &ModelConfig {
        &self.config
    }
    fn spike_stats(&self, tokens: &[u32], stats: &mut SpikeStats) -> Result<()> {
        collect_stats(self, tokens, stats)
    }
    fn down_proj_row(&self, layer: usize, row: usize) -> Result<Vec<f32>> {
        let name = Model::down_proj_name(layer);
        let w = self.weights.get(&name)?;
        let cols = w.shape.get(1).copied().unwrap_or(0);
        w.data
            .get(row * cols..(row + 1) * cols)
            .map(<[f32]>::to_vec)
            .ok_or_else(|| Error::tensor(&name, format!("row {row} out of range")))
    }
    fn weights_checksum(&self) -> Result<u64> {
        Ok(self.weights.checksum())
    }
    fn confirm_baseline(&self, windows: &[Vec<u32>]) -> Result<Confirmer> {
        Confirmer::from_windows(self, windows.to_vec())
    }
    fn confirm_with(&mut self, base: &Confirmer, edits: &[WeightEdit]) -> Result<f64> {
        base.perplexity_with(self, edits)
    }
}

/// The paper's default prompt.
pub const DEFAULT_PROMPT: &str = "Apple Inc. is a worldwide tech company.";

/// The confirmation text shipped with swk (short, so confirmation is fast).
pub const DEFAULT_CONFIRM_TEXT: &str = include_str!("../data/confirm.txt");

/// Detection settings.
#[derive(Debug, Clone, Serialize)]
pub struct DetectConfig {
    /// Prompts to run (each tokenized with the model's special-token convention).
    pub prompts: Vec<String>,
    /// Spike threshold on |activation| (paper: 50).
    pub threshold: f32,
    /// Most zero-and-rerun iterations per prompt.
    pub max_iterations: usize,
    /// Text for causal confirmation.
    pub confirm_text: String,
    /// Perplexity ratio above which a candidate is confirmed.
    pub confirm_ratio: f64,
    /// Window length (tokens) for confirmation perplexity. Short windows by default: a super
    /// weight's massive activation sits on each sequence's first tokens and feeds the attention
    /// sink, so many short sequences measure its removal sharply, and run fast.
    pub confirm_context: usize,
    /// Skip causal confirmation (report raw candidates, none confirmed).
    pub skip_confirmation: bool,
}

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            prompts: vec![DEFAULT_PROMPT.to_string()],
            threshold: 50.0,
            max_iterations: 10,
            confirm_text: DEFAULT_CONFIRM_TEXT.to_string(),
            confirm_ratio: 2.0,
            confirm_context: 32,
            skip_confirmation: false,
        }
    }
}

/// A detected candidate, confirmed or not.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SuperWeight {
    /// Layer index.
    pub layer: usize,
    /// Row of `down_proj.weight` (hidden / output dim).
    pub row: usize,
    /// Column of `down_proj.weight` (intermediate / input dim).
    pub col: usize,
    /// The routed expert whose down_proj holds it, in a mixture-of-experts layer (then
    /// `tensor` is `model.layers.L.mlp.experts.E.down_proj.weight`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert: Option<usize>,
    /// Whether it is in the always-on shared experts' down_proj of a mixture-of-experts layer
    /// (DeepSeek's `mlp.shared_experts`, Qwen2-MoE's `mlp.shared_expert`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub shared_expert: bool,
    /// HF tensor name.
    pub tensor: String,
    /// The weight's value.
    pub value: f32,
    /// Signed down_proj input at column `col` (largest |x| of the layer).
    pub input_activation: f32,
    /// Signed down_proj output at row `row` (largest |y| of the layer).
    pub output_activation: f32,
    /// Token position of the input spike.
    pub token_position: usize,
    /// Token position of the output spike.
    pub output_token_position: usize,
    /// |input| over the median per-channel max |input| of the layer.
    pub input_ratio_to_median: f32,
    /// |output| over the median per-row max |output| of the layer.
    pub output_ratio_to_median: f32,
    /// Iteration (1-based) in which it was first found.
    pub iteration: usize,
    /// Prompt index (0-based) where it was first found.
    pub prompt: usize,
    /// How many prompts it fired on.
    pub prompts_fired: usize,
    /// Whether zeroing it alone raised perplexity by more than the confirm ratio.
    pub confirmed: bool,
    /// Perplexity with it zeroed over the baseline (None when confirmation was skipped).
    pub perplexity_ratio: Option<f64>,
}

/// Per-layer maxima of the first pass of the first prompt (the paper's plot data).
#[derive(Debug, Clone, Serialize)]
pub struct LayerMaxima {
    /// Layer index.
    pub layer: usize,
    /// Signed largest-|x| down_proj input.
    pub input: f32,
    /// Its column.
    pub input_col: usize,
    /// Its token position.
    pub input_position: usize,
    /// In a sparse layer of a mixture of experts: the routed expert whose down_proj input it
    /// is (the largest over the experts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_expert: Option<usize>,
    /// In a sparse layer: whether it is the shared experts' down_proj input.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub input_shared: bool,
    /// Signed largest-|y| down_proj output (a sparse layer: of what the block writes).
    pub output: f32,
    /// Its row.
    pub output_row: usize,
    /// Its token position.
    pub output_position: usize,
}

/// The outcome of a detection run.
#[derive(Debug, Clone, Serialize)]
pub struct Detection {
    /// Confirmed super weights (all candidates when confirmation was skipped).
    pub super_weights: Vec<SuperWeight>,
    /// Spikes whose removal did not matter.
    pub rejected: Vec<SuperWeight>,
    /// First-pass per-layer maxima of the first prompt.
    pub layers: Vec<LayerMaxima>,
    /// Confirmation perplexity without edits.
    pub baseline_perplexity: Option<f64>,
    /// Tokens scored in the confirmation text.
    pub confirm_tokens: usize,
    /// Weight checksum before the run (equal to after: every edit was restored).
    pub weights_checksum: String,
    /// Wall time.
    pub seconds: f64,
}

/// Which down_proj of a layer: the dense MLP's, a routed expert's, or the shared experts'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    Dense,
    Expert(usize),
    Shared,
}

impl Part {
    fn expert(self) -> Option<usize> {
        match self {
            Part::Expert(e) => Some(e),
            _ => None,
        }
    }
}

/// One raw spike found in a pass.
struct Spike {
    layer: usize,
    part: Part,
    row: usize,
    col: usize,
    input: f32,
    output: f32,
    in_pos: usize,
    out_pos: usize,
    in_ratio: f32,
    out_ratio: f32,
}

/// Per-layer candidates of one statistics pass that are not in `fired` yet.
///
/// The paper's rule: row = argmax |output|, col = argmax |input|. Zeroing `W[row, col]` does not
/// change that layer's input, so when the rule names a weight already zeroed while the output
/// row still spikes, the column is re-attributed to the largest remaining contribution
/// `max|x_c| · |W[row, c]|` among spiking input channels. This finds several super weights
/// sharing a row (llama-13b's (2, 2231, 2278) and (2, 2231, 6939)).
fn new_spikes<B: DetectBackend>(
    model: &B,
    stats: &SpikeStats,
    threshold: f32,
    fired: &BTreeSet<Key>,
) -> Result<Vec<Spike>> {
    let mut out = Vec::new();
    for (layer, s) in stats.layers.iter().enumerate() {
        expert_spikes(layer, s, threshold, fired, &mut out);
        let (Some(i), Some(o)) = (s.input_peak(), s.output_peak()) else { continue };
        if i.max.abs <= threshold || o.max.abs <= threshold {
            continue;
        }
        let row = o.channel;
        let mut col = i.channel;
        if fired.contains(&(layer, Part::Dense, row, col)) {
            let w_row = model.down_proj_row(layer, row)?;
            let best = s
                .input
                .iter()
                .zip(&w_row)
                .enumerate()
                .filter(|(_, (x, _))| x.abs > threshold)
                .map(|(c, (x, w))| (c, x.abs * w.abs()))
                .filter(|&(_, contribution)| contribution > 0.0)
                .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
            match best {
                Some((c, _)) if !fired.contains(&(layer, Part::Dense, row, c)) => col = c,
                _ => continue,
            }
        }
        let x = s.input[col];
        let ratio = |v: f32, m: f32| if m > 0.0 { v / m } else { f32::INFINITY };
        out.push(Spike {
            layer,
            part: Part::Dense,
            row,
            col,
            input: x.value,
            output: o.max.value,
            in_pos: x.position,
            out_pos: o.max.position,
            in_ratio: ratio(x.abs, s.input_median()),
            out_ratio: ratio(o.max.abs, s.output_median()),
        });
    }
    Ok(out)
}

/// A candidate's identity: layer, which down_proj, row, column.
type Key = (usize, Part, usize, usize);

/// The paper's rule inside each routed expert of a mixture-of-experts layer: row = argmax of
/// the expert's |down_proj output|, col = argmax of its |down_proj input|, both above the
/// threshold; weights already zeroed are not named again.
fn expert_spikes(
    layer: usize,
    s: &crate::hooks::LayerSpikes,
    threshold: f32,
    fired: &BTreeSet<Key>,
    out: &mut Vec<Spike>,
) {
    let peak = |v: &[crate::hooks::ChannelMax]| {
        v.iter().copied().enumerate().max_by(|a, b| a.1.abs.total_cmp(&b.1.abs).then(b.0.cmp(&a.0)))
    };
    let median = |v: &[crate::hooks::ChannelMax]| {
        let mut a: Vec<f32> = v.iter().map(|m| m.abs).collect();
        a.sort_by(f32::total_cmp);
        a.get(a.len() / 2).copied().unwrap_or(0.0)
    };
    let parts = s.experts.iter().enumerate().map(|(e, es)| (Part::Expert(e), es));
    for (part, es) in parts.chain(s.shared.iter().map(|es| (Part::Shared, es))) {
        let (Some((col, x)), Some((row, y))) = (peak(&es.input), peak(&es.output)) else {
            continue;
        };
        if x.abs <= threshold || y.abs <= threshold || fired.contains(&(layer, part, row, col)) {
            continue;
        }
        let ratio = |v: f32, m: f32| if m > 0.0 { v / m } else { f32::INFINITY };
        out.push(Spike {
            layer,
            part,
            row,
            col,
            input: x.value,
            output: y.value,
            in_pos: x.position,
            out_pos: y.position,
            in_ratio: ratio(x.abs, median(&es.input)),
            out_ratio: ratio(y.abs, median(&es.output)),
        });
    }
}

/// The zero edit of a candidate: `down_proj[row, col]` of the layer, of its routed expert, or
/// of its shared experts (named per family).
fn zero_edit(arch: Architecture, layer: usize, part: Part, row: usize, col: usize) -> WeightEdit {
    let tensor = match part {
        Part::Dense => Model::down_proj_name(layer),
        Part::Expert(e) => crate::model::arch::moe::expert_name(layer, e, "down_proj"),
        Part::Shared => crate::model::arch::moe::shared_down_name(arch, layer),
    };
    WeightEdit::new(tensor, &[row, col], EditOp::Zero)
}

/// Run one stats-collecting forward pass over `tokens`.
pub fn collect_stats(model: &Model, tokens: &[u32], stats: &mut SpikeStats) -> Result<()> {
    stats.reset();
    let mut cache = KvCache::new(model);
    model.forward(
        tokens,
        &mut cache,
        ForwardOptions { stats: Some(stats), logits: Logits::None, hooks: None },
    )?;
    Ok(())
}

/// Find super weight candidates (without confirmation): the paper's iterative method over
/// every prompt. The model's weights are restored before this returns.
pub fn find_candidates<B: DetectBackend>(
    model: &mut B,
    prompts: &[Vec<u32>],
    cfg: &DetectConfig,
) -> Result<(Vec<SuperWeight>, Vec<LayerMaxima>)> {
    let c = model.model_config().clone();
    let mut stats = SpikeStats::new(c.num_layers, c.intermediate_size, c.hidden_size);
    let mut found: BTreeMap<Key, SuperWeight> = BTreeMap::new();
    let mut layers = Vec::new();
    for (pi, tokens) in prompts.iter().enumerate() {
        if tokens.is_empty() {
            return Err(Error::Invalid(format!("prompt {pi} tokenizes to nothing")));
        }
        let mut guard = EditGuard::new(&mut *model);
        let mut fired_here = BTreeSet::new();
        for iteration in 1..=cfg.max_iterations.max(1) {
            guard.spike_stats(tokens, &mut stats)?;
            if pi == 0 && iteration == 1 {
                layers = layer_maxima(&stats);
            }
            let new = new_spikes(&*guard, &stats, cfg.threshold, &fired_here)?;
            fired_here.extend(new.iter().map(|s| (s.layer, s.part, s.row, s.col)));
            if new.is_empty() {
                break;
            }
            for s in new {
                let edit = zero_edit(c.architecture, s.layer, s.part, s.row, s.col);
                let value = guard.apply(&edit)?.original;
                let key = (s.layer, s.part, s.row, s.col);
                match found.get_mut(&key) {
                    Some(sw) => sw.prompts_fired += 1,
                    None => {
                        found.insert(
                            key,
                            SuperWeight {
                                layer: s.layer,
                                row: s.row,
                                col: s.col,
                                expert: s.part.expert(),
                                shared_expert: s.part == Part::Shared,
                                tensor: edit.tensor.clone(),
                                value,
                                input_activation: s.input,
                                output_activation: s.output,
                                token_position: s.in_pos,
                                output_token_position: s.out_pos,
                                input_ratio_to_median: s.in_ratio,
                                output_ratio_to_median: s.out_ratio,
                                iteration,
                                prompt: pi,
                                prompts_fired: 1,
                                confirmed: false,
                                perplexity_ratio: None,
                            },
                        );
                    }
                }
            }
        }
    }
    Ok((found.into_values().collect(), layers))
}

fn layer_maxima(stats: &SpikeStats) -> Vec<LayerMaxima> {
    stats
        .layers
        .iter()
        .enumerate()
        .filter_map(|(layer, s)| {
            // A sparse layer's down_proj inputs are its experts'.
            let (i, part) = match s.moe_input_peak() {
                Some((p, Some(e))) => (p, Part::Expert(e)),
                Some((p, None)) => (p, Part::Shared),
                None => (s.input_peak()?, Part::Dense),
            };
            let o = s.output_peak()?;
            Some(LayerMaxima {
                layer,
                input: i.max.value,
                input_col: i.channel,
                input_position: i.max.position,
                input_expert: part.expert(),
                input_shared: part == Part::Shared,
                output: o.max.value,
                output_row: o.channel,
                output_position: o.max.position,
            })
        })
        .collect()
}

/// The token inputs of a detection run.
#[derive(Debug, Clone)]
pub struct DetectInputs {
    /// The prompts, encoded with the model's special-token convention.
    pub prompts: Vec<Vec<u32>>,
    /// The confirmation text in perplexity windows (BOS added per the tokenizer; empty when
    /// confirmation is skipped).
    pub windows: Vec<Vec<u32>>,
}

/// Tokenize `cfg`'s prompts and confirmation text with the model's tokenizer.
pub fn detect_inputs(model: &Model, cfg: &DetectConfig) -> Result<DetectInputs> {
    let tok = model.tokenizer()?;
    let prompts = cfg.prompts.iter().map(|p| tok.encode(p, true)).collect::<Result<Vec<_>>>()?;
    let windows = if cfg.skip_confirmation {
        Vec::new()
    } else {
        ppl::windows(model, &tok.encode(&cfg.confirm_text, false)?, cfg.confirm_context)?
    };
    Ok(DetectInputs { prompts, windows })
}

/// Detect super weights with the model's tokenizer: prompts are encoded with its special-token
/// convention, the confirmation text as the perplexity protocol does. `on_step(done, total,
/// what)` reports progress.
pub fn detect(
    model: &mut Model,
    cfg: &DetectConfig,
    on_step: impl FnMut(usize, usize, &str),
) -> Result<Detection> {
    let inputs = detect_inputs(model, cfg)?;
    detect_with(model, &inputs.prompts, &inputs.windows, cfg, on_step)
}

/// Detect super weights from token ids: candidates over `prompts`, then causal confirmation
/// on `confirm` in windows of `cfg.confirm_context` (unless `cfg.skip_confirmation`).
/// `cfg.prompts` and `cfg.confirm_text` are not used here.
pub fn detect_tokens(
    model: &mut Model,
    prompts: &[Vec<u32>],
    confirm: &[u32],
    cfg: &DetectConfig,
    on_step: impl FnMut(usize, usize, &str),
) -> Result<Detection> {
    let windows = if cfg.skip_confirmation {
        Vec::new()
    } else {
        ppl::windows(model, confirm, cfg.confirm_context)?
    };
    detect_with(model, prompts, &windows, cfg, on_step)
}

/// Detection on any backend: candidates over `prompts` (token ids), then causal confirmation
/// over the perplexity `windows` (each scored whole; see [`ppl::windows`]). The weights'
/// checksum is compared before and after: a changed weight is an error.
pub fn detect_with<B: DetectBackend>(
    model: &mut B,
    prompts: &[Vec<u32>],
    windows: &[Vec<u32>],
    cfg: &DetectConfig,
    mut on_step: impl FnMut(usize, usize, &str),
) -> Result<Detection> {
    let start = Instant::now();
    let checksum = model.weights_checksum()?;
    let (mut candidates, layers) = find_candidates(model, prompts, cfg)?;
    let mut baseline = None;
    let mut confirm_tokens = 0;
    if !cfg.skip_confirmation && !candidates.is_empty() {
        let total = candidates.len() + 1;
        on_step(0, total, "baseline perplexity");
        let confirmer = model.confirm_baseline(windows)?;
        confirm_tokens = confirmer.tokens_scored();
        let base = confirmer.baseline_perplexity();
        baseline = Some(base);
        for (k, sw) in candidates.iter_mut().enumerate() {
            on_step(k + 1, total, &format!("zeroing layer {} [{}, {}]", sw.layer, sw.row, sw.col));
            let edit = WeightEdit::new(sw.tensor.clone(), &[sw.row, sw.col], EditOp::Zero);
            let ratio = model.confirm_with(&confirmer, &[edit])? / base;
            sw.perplexity_ratio = Some(ratio);
            sw.confirmed = ratio > cfg.confirm_ratio;
        }
        on_step(total, total, "done");
    }
    let after = model.weights_checksum()?;
    if after != checksum {
        return Err(Error::Backend(format!(
            "weights changed during detection (checksum {checksum:016x} -> {after:016x})"
        )));
    }
    let (super_weights, rejected) = if cfg.skip_confirmation {
        (candidates, Vec::new())
    } else {
        candidates.into_iter().partition(|c| c.confirmed)
    };
    Ok(Detection {
        super_weights,
        rejected,
        layers,
        baseline_perplexity: baseline,
        confirm_tokens,
        weights_checksum: format!("{checksum:016x}"),
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::{ChannelMax, ExpertSpikes};

    fn at(value: f32, position: usize) -> ChannelMax {
        ChannelMax { value, abs: value.abs(), position }
    }

    /// A sparse layer's input maximum is the largest over its experts' down_proj inputs, with
    /// the expert named; a dense layer's is its own.
    #[test]
    fn layer_maxima_of_a_sparse_layer_name_the_expert() {
        let mut stats = SpikeStats::new(3, 4, 2);
        stats.layers[0].input[1] = at(-7.0, 3);
        let expert = |inputs: &[ChannelMax]| ExpertSpikes {
            input: inputs.to_vec(),
            output: vec![at(1.0, 0); 2],
            ..Default::default()
        };
        for l in &mut stats.layers {
            l.output[0] = at(2.0, 1);
        }
        stats.layers[1].experts =
            vec![expert(&[at(3.0, 0), at(0.5, 1)]), expert(&[at(0.1, 0), at(-9.0, 2)])];
        stats.layers[2].experts = vec![expert(&[at(3.0, 0), at(0.0, 0)])];
        stats.layers[2].shared = Some(expert(&[at(0.0, 0), at(0.0, 0), at(-4.0, 5)]));
        let m = layer_maxima(&stats);
        let got: Vec<_> = m
            .iter()
            .map(|l| (l.input, l.input_col, l.input_position, l.input_expert, l.input_shared))
            .collect();
        assert_eq!(
            got,
            [(-7.0, 1, 3, None, false), (-9.0, 1, 2, Some(1), false), (-4.0, 2, 5, None, true)]
        );
        let json = serde_json::to_value(&m).unwrap();
        assert!(json[0].get("input_expert").is_none() && json[0].get("input_shared").is_none());
        assert_eq!(json[1]["input_expert"], 1);
        assert_eq!(json[2]["input_shared"], true);
    }
}
