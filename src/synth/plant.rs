//! Small Llama models with planted super weights whose coordinates are known ([`planted`]),
//! a planted super expert ([`planted_moe`]) and a planted group ([`planted_group`]), for
//! testing detection end to end.
//!
//! # The planted mechanism
//!
//! [`planted`] builds a Llama whose super weights behave like the published ones: they fire
//! on the first token (a BOS token), write a massive activation into one hidden dim, and that
//! activation steers every later prediction through an attention sink.
//!
//! * **Reserved dims.** A few hidden dims are reserved: a *bias* dim, a *query* dim, the rows
//!   of the planted weights and one *copy* dim per super weight. Ordinary tokens carry nothing
//!   in them except a shared constant `γ` in the query dim; only the BOS token carries `β` in
//!   the bias dim. Every `o_proj` and `down_proj` row of a reserved dim is zero except the
//!   planted entries, so reserved dims stay exactly zero at non-BOS positions.
//! * **Super weights.** In layer `L₁` the gate and up rows of intermediate channel `c₁` read
//!   only the bias dim, with gains chosen so that `silu(gate)·up` at BOS hits the requested
//!   activation (e.g. −900); `down_proj[r₁, c₁]` (e.g. 1.5) writes the massive activation
//!   (−1350) into row `r₁`, and the rest of column `c₁` is tiny. Further super weights form a
//!   chain: super weight `k` reads row `r₍ₖ₋₁₎` (at BOS) and writes row `rₖ`, so zeroing the
//!   first silences all of them, as zeroing Llama-7B's super weight does.
//! * **Attention sink.** In the copy layer, head 0 has one query feature reading the query dim
//!   (constant at every position) and one key feature reading `r₁`, which is non-zero only at
//!   BOS: with the massive activation present every position attends to BOS. The head's
//!   values read `rₖ` and `o_proj` writes them into copy dim `k`. Without the super weight the
//!   keys and values are exactly zero and nothing is copied.
//! * **LM head** (untied): copy dim `k` raises the logits of a small "likely" token set `Sₖ`
//!   by `ln(vocab) + 5` nats on average. The suggested confirmation sequence is BOS followed
//!   by likely tokens: its perplexity is about `|S|` with the super weights and about the
//!   vocabulary size with any of them zeroed (that super weight's likely tokens become
//!   unlikely). It must be scored as one window: a window without BOS has no sink.
//! * **Decoy** (the paper's known false positive): a late layer, after the copy layer, whose
//!   gate and up read `r₁` and whose `down_proj` writes an opposite-signed spike back into
//!   `r₁` (or into another reserved dim nobody reads). Both its input and output exceed the
//!   threshold, but it only changes BOS's own residual after the sink was read, so zeroing it
//!   leaves the perplexity unchanged.
//! * **Backup** (for the iteration of the method): a channel in a layer after `L₁` that also
//!   reads the bias dim. While the massive activation dominates BOS's RMSNorm the bias dim is
//!   normalized away and the backup stays silent; once the super weight is zeroed it spikes,
//!   so detection finds it in iteration 2. It writes into a dim nobody reads, so it is
//!   rejected by confirmation (and does not mask the super weight's own confirmation).
//!
//! Every gain is calibrated on the model being built, in causal (layer) order: a forward pass
//! measures the normalized value a planted row will read, so the planted activations hit
//! their targets to within rounding for any shape and seed.
//!
//! [`super::families::plant_arch`] plants super weights (and groups) in the other dense families, through
//! their own tensors, with a simpler mechanism that needs no hand-derived norm.
//!
//! A backup that is found in iteration 2 *and* confirmed is impossible with single-weight
//! confirmation: whatever only spikes once another weight is zeroed is, with that weight in
//! place, below the threshold, and zeroing it alone changes next to nothing.

use std::collections::BTreeSet;

use serde::Serialize;

use super::{fill_normal, random_llama, tensor_seed, SplitMix64, SynthSpec, LINEAR_STD};
use crate::hooks::{HookKind, HookPoint, Hooks};
use crate::model::arch::{self, ForwardOptions, KvCache, Logits};
use crate::model::{Architecture, Model, Tensor, Weights};
use crate::{Error, Result};

/// One planted MLP channel: `down_proj.weight[row, col]` of `layer`, fed an activation of
/// about `activation` at BOS, so that it writes about `activation · weight` into `row`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PlantSite {
    /// Layer index.
    pub layer: usize,
    /// Row of `down_proj.weight` (hidden dim written).
    pub row: usize,
    /// Column of `down_proj.weight` (intermediate channel).
    pub col: usize,
    /// Target signed `silu(gate)·up` at BOS (its magnitude should be well above 50).
    pub activation: f32,
    /// The value of `down_proj.weight[row, col]` (stored exactly).
    pub weight: f32,
}

/// What to plant in a synthetic model. See the [module docs](self) for the mechanism.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plant {
    /// Super weights, in increasing layer order: the first reads BOS's bias dim, each next one
    /// reads the previous one's row. Rows must be distinct.
    pub super_weights: Vec<PlantSite>,
    /// A channel that only spikes once the first super weight is zeroed (found in iteration
    /// 2, rejected by confirmation). Its layer must come after the first super weight's.
    pub backup: Option<PlantSite>,
    /// A late spike that does not matter: reads the first super weight's row, writes `row`
    /// (the first super weight's row to cancel part of the massive activation, as in the
    /// paper, or a dim of its own). Its layer must come after `copy_layer`.
    pub decoy: Option<PlantSite>,
    /// The layer whose attention head 0 copies the massive activations to every position;
    /// after every super weight's layer.
    pub copy_layer: usize,
    /// The BOS token id (the only token carrying the bias).
    pub bos: u32,
    /// Size of each super weight's likely token set.
    pub likely_per_weight: usize,
    /// Length of the suggested detection prompt (BOS included).
    pub prompt_len: usize,
    /// Length of the suggested confirmation sequence (BOS included). Keep it within one
    /// perplexity window (detection's default confirmation context is 32 tokens): windows after
    /// the first start without BOS, and without BOS there is no sink.
    pub confirm_len: usize,
}

impl Plant {
    /// A plant that fits `spec` (at least 4 layers, 16 hidden dims): one super weight in layer
    /// 1 (activation −900, weight 1.5), a backup in layer 2, the copy head in the second-last
    /// layer, and a decoy in the last layer cancelling a third of the massive activation.
    pub fn standard(spec: &SynthSpec) -> Plant {
        let (h, i, l) = (spec.hidden, spec.intermediate, spec.layers);
        let sw = PlantSite {
            layer: 1,
            row: h * 3 / 8 + 1,
            col: i * 2 / 3 + 5,
            activation: -900.0,
            weight: 1.5,
        };
        Plant {
            super_weights: vec![sw],
            backup: Some(PlantSite {
                layer: 2,
                row: h / 2 + 3,
                col: i / 4 + 2,
                activation: 600.0,
                weight: 1.25,
            }),
            decoy: Some(PlantSite {
                layer: l.saturating_sub(1),
                row: sw.row,
                col: i / 3 + 1,
                activation: 450.0,
                weight: 1.0,
            }),
            copy_layer: l.saturating_sub(2),
            bos: 0,
            likely_per_weight: 4,
            prompt_len: 12,
            confirm_len: 32,
        }
    }
}

/// A planted coordinate and what detection should report for it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PlantedWeight {
    /// Layer index.
    pub layer: usize,
    /// Row of `down_proj.weight`.
    pub row: usize,
    /// Column of `down_proj.weight`.
    pub col: usize,
    /// Exact value of `down_proj.weight[row, col]`.
    pub value: f32,
    /// Designed signed down_proj input at BOS (approximate; the sign is exact).
    pub input: f32,
    /// Designed signed down_proj output at BOS, `input · value` (approximate).
    pub output: f32,
    /// Token position of the spikes (0: BOS).
    pub position: usize,
    /// Detection iteration in which it should appear (1, or 2 for a backup).
    pub iteration: usize,
}

impl PlantedWeight {
    fn from_site(s: &PlantSite, iteration: usize) -> Self {
        PlantedWeight {
            layer: s.layer,
            row: s.row,
            col: s.col,
            value: s.weight,
            input: s.activation,
            output: s.activation * s.weight,
            position: 0,
            iteration,
        }
    }
}

/// The ground truth of a planted model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlantTruth {
    /// Super weights (confirmed by a correct detector).
    pub super_weights: Vec<PlantedWeight>,
    /// The decoy (a spike a correct detector rejects), if planted.
    pub decoy: Option<PlantedWeight>,
    /// The backup (found in iteration 2, rejected), if planted.
    pub backup: Option<PlantedWeight>,
    /// BOS token id.
    pub bos: u32,
    /// Suggested detection prompt: BOS, then random tokens.
    pub prompt: Vec<u32>,
    /// Suggested confirmation sequence: BOS, then likely tokens. Score it as one window.
    pub confirm: Vec<u32>,
    /// Each super weight's likely token set.
    pub likely_tokens: Vec<Vec<u32>>,
    /// Hidden dim carrying the bias at BOS.
    pub bias_dim: usize,
    /// Hidden dim carrying the constant query feature at every position.
    pub query_dim: usize,
    /// Hidden dim receiving each super weight's copied activation.
    pub copy_dims: Vec<usize>,
    /// Layer of the sink head.
    pub copy_layer: usize,
}

/// Bias at BOS in the bias dim.
const BETA: f32 = 2.0;
/// Constant query feature of every token.
const GAMMA: f32 = 0.5;
/// Query feature of the sink head at the weakest position of the confirmation sequence.
const Q_FEATURE: f64 = 4.0;
/// Attention score of BOS in the sink head (other positions score exactly 0).
const SINK_SCORE: f64 = 16.0;
/// Value the sink head copies into each copy dim.
const COPY: f32 = 10.0;
/// Mean logit advantage of likely tokens over the confirmation sequence, beyond `ln(vocab)`
/// (so that the likely set keeps most of the probability mass for any vocabulary size).
const GAP_OVER_LN_VOCAB: f64 = 5.0;

pub(super) fn plant_err(msg: impl Into<String>) -> Error {
    Error::Invalid(format!("plant: {}", msg.into()))
}

fn validate_plant(spec: &SynthSpec, p: &Plant) -> Result<()> {
    spec.validate()?;
    if spec.tie_embeddings {
        return Err(plant_err("needs an untied LM head (tie_embeddings = false)"));
    }
    let n = p.super_weights.len();
    let first = p.super_weights.first().ok_or_else(|| plant_err("no super weight to plant"))?;
    let hd = spec.head_dim();
    if hd < 4 || n > hd {
        return Err(plant_err(format!(
            "head_dim {hd} must be at least 4 and at least the number of super weights"
        )));
    }
    let all: Vec<(&str, &PlantSite)> = p
        .super_weights
        .iter()
        .map(|s| ("super weight", s))
        .chain(p.backup.iter().map(|s| ("backup", s)))
        .chain(p.decoy.iter().map(|s| ("decoy", s)))
        .collect();
    let mut layers = BTreeSet::new();
    for (what, s) in &all {
        if s.layer >= spec.layers || s.row >= spec.hidden || s.col >= spec.intermediate {
            return Err(plant_err(format!(
                "{what} ({}, {}, {}) is outside the model ({} layers, hidden {}, intermediate {})",
                s.layer, s.row, s.col, spec.layers, spec.hidden, spec.intermediate
            )));
        }
        let ok = s.activation.is_finite()
            && s.activation.abs() >= 1.0
            && s.weight.is_finite()
            && s.weight != 0.0;
        if !ok {
            return Err(plant_err(format!(
                "{what} needs a finite activation (|a| >= 1) and a non-zero finite weight"
            )));
        }
        if !layers.insert(s.layer) {
            return Err(plant_err(format!("two planted channels share layer {}", s.layer)));
        }
    }
    if p.super_weights.windows(2).any(|w| w[0].layer >= w[1].layer) {
        return Err(plant_err("super weights must be in increasing layer order"));
    }
    let mut rows = BTreeSet::new();
    for s in p.super_weights.iter().chain(&p.backup) {
        if !rows.insert(s.row) {
            return Err(plant_err(format!("row {} is planted twice", s.row)));
        }
    }
    if let Some(d) = &p.decoy {
        if d.row != first.row && rows.contains(&d.row) {
            return Err(plant_err(
                "the decoy must write the first super weight's row or a row of its own",
            ));
        }
        if d.layer <= p.copy_layer {
            return Err(plant_err("the decoy's layer must come after the copy layer"));
        }
        rows.insert(d.row);
    }
    if let Some(b) = &p.backup {
        if b.layer <= first.layer {
            return Err(plant_err("the backup's layer must come after the first super weight's"));
        }
    }
    let last = p.super_weights.last().map_or(0, |s| s.layer);
    if p.copy_layer <= last || p.copy_layer >= spec.layers {
        return Err(plant_err(format!(
            "copy layer {} must come after every super weight (last in layer {last}) and exist",
            p.copy_layer
        )));
    }
    if rows.len() + 2 + n > spec.hidden / 2 {
        return Err(plant_err(format!(
            "hidden {} is too narrow for {} reserved dims",
            spec.hidden,
            rows.len() + 2 + n
        )));
    }
    if p.bos as usize >= spec.vocab {
        return Err(plant_err(format!("BOS {} is outside the vocabulary ({})", p.bos, spec.vocab)));
    }
    if p.likely_per_weight == 0 || n * p.likely_per_weight + 1 > spec.vocab / 2 {
        return Err(plant_err(
            "likely token sets must be non-empty and cover under half the vocabulary",
        ));
    }
    if p.prompt_len < 2 || p.confirm_len < 2 {
        return Err(plant_err("prompt and confirmation need at least 2 tokens"));
    }
    Ok(())
}

/// The tensor `name`'s data, mutably (a missing tensor is an internal error of this module).
fn data_mut<'w>(w: &'w mut Weights, name: &str) -> Result<&'w mut Vec<f32>> {
    Ok(&mut w.get_mut(name)?.data)
}

fn layer_name(l: usize, what: &str) -> String {
    format!("model.layers.{l}.{what}.weight")
}

/// The residual stream at `point` for `tokens` (`[tokens, hidden]`), by a forward pass.
fn residual(model: &Model, tokens: &[u32], point: HookPoint) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    {
        let mut hooks = Hooks::new();
        hooks.add(point, |_, a| out.extend_from_slice(a.data));
        let opts =
            ForwardOptions { hooks: Some(&mut hooks), logits: Logits::None, ..Default::default() };
        model.forward(tokens, &mut KvCache::new(model), opts)?;
    }
    Ok(out)
}

/// Dim `dim` of each row of `x` after RMSNorm with weights `norm`, in f64.
fn normed(x: &[f32], norm: &[f32], eps: f64, dim: usize) -> Vec<f64> {
    let h = norm.len();
    x.chunks(h)
        .map(|row| {
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / h as f64;
            norm[dim] as f64 * row[dim] as f64 / (ms + eps).sqrt()
        })
        .collect()
}

/// What the channel of layer `layer` reading `src` sees at BOS: dim `src` of the MLP's
/// normalized input.
fn mlp_input_at_bos(model: &Model, bos: u32, layer: usize, src: usize) -> Result<f64> {
    let x = residual(model, &[bos], HookPoint { layer, kind: HookKind::ResidMid })?;
    let norm = &model.weights.get(&layer_name(layer, "post_attention_layernorm"))?.data;
    let v = normed(&x, norm, model.config.rms_norm_eps, src)[0];
    if !(v.is_finite() && v.abs() > 1e-6) {
        return Err(plant_err(format!("layer {layer}: nothing to read in dim {src} at BOS")));
    }
    Ok(v)
}

/// Plant one channel: the gate and up rows of `s.col` read only `src`, whose normalized value
/// at BOS is `xn`, with gains that give `silu(gate)·up = s.activation` there;
/// `down_proj[s.row, s.col] = s.weight`; the rest of the column shrinks so that the channel
/// leaks about 0.01 into other dims.
fn plant_channel(
    w: &mut Weights,
    s: &PlantSite,
    src: usize,
    xn: f64,
    reserved: &BTreeSet<usize>,
) -> Result<()> {
    let h = w.get(&layer_name(s.layer, "post_attention_layernorm"))?.data.len();
    let act = s.activation as f64;
    let z = act.abs().sqrt().max(4.0);
    let silu = z / (1.0 + (-z).exp());
    for (what, value) in [("mlp.gate_proj", z / xn), ("mlp.up_proj", act / silu / xn)] {
        let d = data_mut(w, &layer_name(s.layer, what))?;
        let row = &mut d[s.col * h..(s.col + 1) * h];
        row.fill(0.0);
        row[src] = value as f32;
    }
    let shrink = (0.5 / act.abs()) as f32;
    let down = data_mut(w, &layer_name(s.layer, "mlp.down_proj"))?;
    let inter = down.len() / h;
    for r in 0..h {
        let x = &mut down[r * inter + s.col];
        *x = if reserved.contains(&r) { 0.0 } else { *x * shrink };
    }
    down[s.row * inter + s.col] = s.weight;
    Ok(())
}

/// One planting step; steps run in causal order so that each is calibrated on the model as
/// its layer will see it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    /// The sink head (attention comes before the MLP of its layer).
    Copy,
    /// Super weight `k`.
    Super(usize),
    /// The backup.
    Backup,
    /// The decoy.
    Decoy,
}

/// A model with planted super weights, a decoy and a backup as `plant` asks, over random
/// weights from `seed`, and the ground truth. See the [module docs](self) for the design.
///
/// Every gain is calibrated on the model itself (a forward pass on BOS, or on the suggested
/// confirmation sequence for the sink head and the LM head), so the planted activations hit
/// their targets to within rounding. Errors when the plant does not fit the shapes (tied
/// embeddings, colliding or out-of-range sites, too narrow a model).
pub fn planted(spec: &SynthSpec, seed: u64, plant: &Plant) -> Result<(Model, PlantTruth)> {
    validate_plant(spec, plant)?;
    let mut model = random_llama(spec, seed)?;
    let c = model.config.clone();
    let (h, inter, hd, vocab) = (c.hidden_size, c.intermediate_size, c.head_dim, c.vocab_size);
    let qd = c.num_heads * hd;
    let eps = c.rms_norm_eps;
    let sws = &plant.super_weights;
    let n = sws.len();
    let (r1, bos) = (sws[0].row, plant.bos);
    let mut rng = SplitMix64::new(tensor_seed(seed, "plant"));

    // Reserved dims: planted rows, then bias, query and copy dims drawn from the rest.
    let mut reserved: BTreeSet<usize> =
        sws.iter().chain(&plant.backup).chain(&plant.decoy).map(|s| s.row).collect();
    let mut free: Vec<usize> = (0..h).filter(|d| !reserved.contains(d)).collect();
    rng.shuffle(&mut free);
    let (bias_dim, query_dim) = (free[0], free[1]);
    let copy_dims = free[2..2 + n].to_vec();
    reserved.extend(free[..2 + n].iter().copied());

    // Likely token sets and the suggested sequences.
    let mut pool: Vec<u32> = (0..vocab as u32).filter(|&t| t != bos).collect();
    rng.shuffle(&mut pool);
    let likely: Vec<Vec<u32>> =
        pool.chunks(plant.likely_per_weight).take(n).map(<[u32]>::to_vec).collect();
    let mut prompt = vec![bos];
    while prompt.len() < plant.prompt_len {
        let t = rng.below(vocab) as u32;
        if t != bos {
            prompt.push(t);
        }
    }
    let all_likely: Vec<u32> = likely.iter().flatten().copied().collect();
    let mut confirm = vec![bos];
    while confirm.len() < plant.confirm_len {
        confirm.push(all_likely[rng.below(all_likely.len())]);
    }

    let w = &mut model.weights;
    // Embeddings: reserved dims empty, the shared query feature, the bias on BOS only.
    let emb = data_mut(w, "model.embed_tokens.weight")?;
    for row in emb.chunks_mut(h) {
        for &r in &reserved {
            row[r] = 0.0;
        }
        row[query_dim] = GAMMA;
    }
    emb[bos as usize * h + bias_dim] = BETA;
    // Nothing but planted entries writes a reserved dim.
    for l in 0..c.num_layers {
        let o = data_mut(w, &layer_name(l, "self_attn.o_proj"))?;
        for &r in &reserved {
            o[r * qd..(r + 1) * qd].fill(0.0);
        }
        let d = data_mut(w, &layer_name(l, "mlp.down_proj"))?;
        for &r in &reserved {
            d[r * inter..(r + 1) * inter].fill(0.0);
        }
    }

    let mut steps: Vec<(usize, Step)> = vec![(plant.copy_layer, Step::Copy)];
    steps.extend(sws.iter().enumerate().map(|(k, s)| (s.layer, Step::Super(k))));
    steps.extend(plant.backup.iter().map(|s| (s.layer, Step::Backup)));
    steps.extend(plant.decoy.iter().map(|s| (s.layer, Step::Decoy)));
    steps.sort();
    for (layer, step) in steps {
        match step {
            Step::Super(k) => {
                let src = if k == 0 { bias_dim } else { sws[k - 1].row };
                let xn = mlp_input_at_bos(&model, bos, layer, src)?;
                plant_channel(&mut model.weights, &sws[k], src, xn, &reserved)?;
            }
            Step::Decoy => {
                let xn = mlp_input_at_bos(&model, bos, layer, r1)?;
                if let Some(d) = &plant.decoy {
                    plant_channel(&mut model.weights, d, r1, xn, &reserved)?;
                }
            }
            Step::Backup => {
                // Calibrated as it fires: with the first super weight zeroed.
                let name = layer_name(sws[0].layer, "mlp.down_proj");
                let flat = r1 * inter + sws[0].col;
                data_mut(&mut model.weights, &name)?[flat] = 0.0;
                let xn = mlp_input_at_bos(&model, bos, layer, bias_dim);
                data_mut(&mut model.weights, &name)?[flat] = sws[0].weight;
                if let Some(b) = &plant.backup {
                    plant_channel(&mut model.weights, b, bias_dim, xn?, &reserved)?;
                }
            }
            Step::Copy => {
                // Query feature everywhere, key feature only at BOS, values = the rows rₖ.
                let x = residual(&model, &confirm, HookPoint { layer, kind: HookKind::ResidPre })?;
                let w = &mut model.weights;
                let norm = w.get(&layer_name(layer, "input_layernorm"))?.data.clone();
                let q_min = normed(&x, &norm, eps, query_dim)[1..]
                    .iter()
                    .copied()
                    .fold(f64::INFINITY, f64::min);
                let at_bos = |d: usize| normed(&x[..h], &norm, eps, d)[0];
                let r1_bos = at_bos(r1);
                if !(q_min > 1e-3 && r1_bos.abs() > 1e-3) {
                    return Err(plant_err(format!(
                        "copy layer {layer}: no query or key feature to read"
                    )));
                }
                for what in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] {
                    data_mut(w, &layer_name(layer, what))?[..hd * h].fill(0.0);
                }
                let a = hd / 2 - 1;
                data_mut(w, &layer_name(layer, "self_attn.q_proj"))?[a * h + query_dim] =
                    (Q_FEATURE / q_min) as f32;
                data_mut(w, &layer_name(layer, "self_attn.k_proj"))?[a * h + r1] =
                    (SINK_SCORE * (hd as f64).sqrt() / Q_FEATURE / r1_bos) as f32;
                for (j, s) in sws.iter().enumerate() {
                    data_mut(w, &layer_name(layer, "self_attn.v_proj"))?[j * h + s.row] =
                        (1.0 / at_bos(s.row)) as f32;
                    data_mut(w, &layer_name(layer, "self_attn.o_proj"))?[copy_dims[j] * qd + j] =
                        COPY;
                }
            }
        }
    }

    // LM head: copy dim k raises Sₖ's logits by `gap` on average over the confirmation sequence.
    let gap = (vocab as f64).ln() + GAP_OVER_LN_VOCAB;
    let x = residual(
        &model,
        &confirm,
        HookPoint { layer: c.num_layers - 1, kind: HookKind::ResidPost },
    )?;
    let final_norm = model.weights.get("model.norm.weight")?.data.clone();
    let head = data_mut(&mut model.weights, "lm_head.weight")?;
    for (set, &dim) in likely.iter().zip(&copy_dims) {
        let xf = normed(&x, &final_norm, eps, dim);
        let mean = xf[1..].iter().sum::<f64>() / (xf.len() - 1) as f64;
        if mean.is_nan() || mean <= 1e-3 {
            return Err(plant_err("the copy head does not reach the output"));
        }
        for t in 0..vocab {
            head[t * h + dim] = 0.0;
        }
        for &t in set {
            head[t as usize * h + dim] = (gap / mean) as f32;
        }
    }

    arch::validate(&model)?;
    let truth = PlantTruth {
        super_weights: sws.iter().map(|s| PlantedWeight::from_site(s, 1)).collect(),
        decoy: plant.decoy.as_ref().map(|s| PlantedWeight::from_site(s, 1)),
        backup: plant.backup.as_ref().map(|s| PlantedWeight::from_site(s, 2)),
        bos,
        prompt,
        confirm,
        likely_tokens: likely,
        bias_dim,
        query_dim,
        copy_dims,
        copy_layer: plant.copy_layer,
    };
    Ok((model, truth))
}

/// Where [`planted_moe`] puts the super expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SuperExpertSite {
    /// The MoE layer (the first super weight's layer).
    pub layer: usize,
    /// The expert holding the planted channel.
    pub expert: usize,
}

/// A mixture-of-experts model with a planted *super expert*: [`planted`]'s model (same spec,
/// seed and plant) whose first super weight's layer becomes a sparse layer of `experts`
/// experts with top-`top_k` renormalized routing (a Qwen2-MoE without shared expert or
/// biases; the other layers stay dense, so it runs exactly like the Llama elsewhere).
///
/// Expert `expert` is the original dense MLP, planted channel included, so it alone writes
/// the massive activation; the other experts are random (`N(0, 0.02)`) with their
/// reserved-dim rows of down_proj zeroed. The router is random except that the super expert's
/// row reads the bias dim (present only at BOS) with a gain that gives it a logit of 12 there:
/// BOS always routes to it with a weight within 1e-4 of 1, and the massive activation
/// matches the dense model's.
pub fn planted_moe(
    spec: &SynthSpec,
    seed: u64,
    plant: &Plant,
    experts: usize,
    top_k: usize,
    expert: usize,
) -> Result<(Model, PlantTruth, SuperExpertSite)> {
    if top_k == 0 || top_k > experts || expert >= experts {
        return Err(plant_err(format!(
            "expert {expert} and top-{top_k} do not fit {experts} experts"
        )));
    }
    let (mut model, truth) = planted(spec, seed, plant)?;
    let layer = truth.super_weights[0].layer;
    let (h, i) = (spec.hidden, spec.intermediate);
    let mut reserved: BTreeSet<usize> = truth.copy_dims.iter().copied().collect();
    reserved.extend([truth.bias_dim, truth.query_dim]);
    reserved.extend(truth.super_weights.iter().map(|s| s.row));
    reserved.extend(truth.backup.iter().chain(&truth.decoy).map(|s| s.row));

    // The router reads the bias dim at BOS through post_attention_layernorm.
    let xn = mlp_input_at_bos(&model, truth.bos, layer, truth.bias_dim)?;
    let w = &mut model.weights;
    let p = format!("model.layers.{layer}.mlp");
    for e in 0..experts {
        for (what, shape) in [("gate_proj", [i, h]), ("up_proj", [i, h]), ("down_proj", [h, i])] {
            let dense = format!("{p}.{what}.weight");
            let name = format!("{p}.experts.{e}.{what}.weight");
            let data = if e == expert {
                w.get(&dense)?.data.clone()
            } else {
                let mut d = vec![0f32; i * h];
                fill_normal(&mut d, tensor_seed(seed, &name), 0.0, LINEAR_STD);
                if what == "down_proj" {
                    for &r in &reserved {
                        d[r * i..(r + 1) * i].fill(0.0);
                    }
                }
                d
            };
            w.insert(name.clone(), Tensor::new(&name, shape.to_vec(), data, "F32")?);
        }
    }
    for what in ["gate_proj", "up_proj", "down_proj"] {
        w.remove(&format!("{p}.{what}.weight"));
    }
    let router = format!("{p}.gate.weight");
    let mut r = vec![0f32; experts * h];
    fill_normal(&mut r, tensor_seed(seed, &router), 0.0, LINEAR_STD);
    for e in 0..experts {
        for &d in &reserved {
            r[e * h + d] = 0.0;
        }
    }
    r[expert * h + truth.bias_dim] = (12.0 / xn) as f32;
    w.insert(router.clone(), Tensor::new(&router, vec![experts, h], r, "F32")?);

    let c = &mut model.config;
    c.architecture = Architecture::Qwen2Moe;
    c.family.moe = Some(crate::model::config::MoeParams {
        num_experts: experts,
        top_k,
        expert_intermediate: i,
        norm_topk_prob: true,
        shared_expert_intermediate: None,
        sparse_layers: (0..spec.layers).map(|l| l == layer).collect(),
    });
    model.source.name = Some(format!("synthetic-moe-seed-{seed}"));
    arch::validate(&model)?;
    Ok((model, truth, SuperExpertSite { layer, expert }))
}

/// A Llama whose massive activation is written *jointly* by several down_proj weights in
/// different layers: [`planted`]'s mechanism with `members[0]` as its only super weight (no
/// backup, no decoy, copy head in `copy_layer`), then every further member planted like it:
/// reading BOS's bias dim and writing the same row. Members must share the row, sit in
/// increasing layers before `copy_layer`, and use distinct layers.
///
/// The sink head reads the row through RMSNorm, so it needs the activation to be present but
/// hardly cares how large it is: zeroing any one member leaves the others' writes (and a
/// later member, no longer normalized away by the massive activation, fires harder), and the
/// perplexity barely moves; zeroing all of them empties the row and the sink, and the
/// perplexity rises to about the vocabulary size. Returns the model, the truth (its
/// `super_weights` are the members) and nothing else planted.
pub fn planted_group(
    spec: &SynthSpec,
    seed: u64,
    members: &[PlantSite],
    copy_layer: usize,
) -> Result<(Model, PlantTruth)> {
    let first = *members.first().ok_or_else(|| plant_err("no group member to plant"))?;
    if members.windows(2).any(|w| w[0].layer >= w[1].layer || w[1].row != first.row) {
        return Err(plant_err("group members must share one row, in increasing layers"));
    }
    let last = members.last().map_or(0, |m| m.layer);
    if copy_layer <= last {
        return Err(plant_err("the copy layer must come after every group member"));
    }
    let plant = Plant {
        super_weights: vec![first],
        backup: None,
        decoy: None,
        copy_layer,
        ..Plant::standard(spec)
    };
    let (mut model, mut truth) = planted(spec, seed, &plant)?;
    let mut reserved: BTreeSet<usize> = truth.copy_dims.iter().copied().collect();
    reserved.extend([truth.bias_dim, truth.query_dim, first.row]);
    for m in &members[1..] {
        if m.col >= spec.intermediate {
            return Err(plant_err(format!("column {} is outside the model", m.col)));
        }
        let xn = mlp_input_at_bos(&model, truth.bos, m.layer, truth.bias_dim)?;
        plant_channel(&mut model.weights, m, truth.bias_dim, xn, &reserved)?;
    }
    truth.super_weights = members.iter().map(|m| PlantedWeight::from_site(m, 1)).collect();
    arch::validate(&model)?;
    Ok((model, truth))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plant_validation_rejects_bad_plants() {
        let spec = SynthSpec { layers: 5, ..SynthSpec::tiny() };
        assert!(planted(&spec, 0, &Plant::standard(&spec)).is_ok());
        let tied = SynthSpec { tie_embeddings: true, ..spec.clone() };
        assert!(planted(&tied, 0, &Plant::standard(&tied)).is_err());
        let mut p = Plant::standard(&spec);
        p.super_weights[0].col = spec.intermediate;
        assert!(planted(&spec, 0, &p).is_err());
        let mut p = Plant::standard(&spec);
        p.copy_layer = 1;
        assert!(planted(&spec, 0, &p).is_err());
    }
}
