//! Planted super weights in a dense model of any family swk runs (Llama, Mistral, Qwen2/3,
//! Gemma 1/2/3, Phi-3, OLMo 1/2, GPT-2, GPT-NeoX), through the family's own tensors.
//!
//! [`super::planted`] builds a Llama whose super weight feeds an attention sink at BOS. Its
//! calibration mirrors Llama's RMSNorm and attention by hand, which does not carry over to
//! LayerNorm, post-norms, QK-norm or soft-capping. This module keeps the part that makes a
//! super weight a super weight (one down-projection weight writing a massive activation into
//! one hidden dim, which the model's predictions depend on) and routes the dependence the
//! shortest way, straight to the LM head, so that it works the same in every family:
//!
//! * **Reserved dims.** A *source* dim `s` and the planted row `r`. Every token embedding
//!   holds `γ = 1` in `s` and 0 in `r`; learned positions (GPT-2) hold 0 in both. Every
//!   `o_proj` / `down_proj` row (and bias entry) of `s` and `r` is zero except the planted
//!   entries, so without the super weight `r` is exactly 0 in the residual stream, at every
//!   position and in every layer. No projection reads `r`: its column is zeroed in every q, k,
//!   v, fused qkv, gate, up and fused gate_up weight, so the activation reaches only the final
//!   norm and the LM head (and, through the norms, shrinks everything else).
//! * **Super weight.** Channel `c` of layer `L` reads only `s` (its gate and up rows, or the
//!   GELU MLP's up row with a zero bias) with gains that give the requested activation `A` at
//!   the first prompt token: `down_proj[r, c] = w` writes about `A · w` into `r` at every
//!   position (exactly there), and the rest of column `c` shrinks by `0.5 / |A|`, so the
//!   channel leaks about half its random weights into other dims. GELU cannot make a large
//!   negative activation, so GPT-2 and GPT-NeoX need `A > 0`.
//! * **Post-norm families** (Gemma 2/3, OLMo 2) normalize what the MLP writes: there the
//!   `post_feedforward_layernorm` gain of `r` is scaled so that the block writes `A · w` into
//!   `r` (what detection's output statistic sees for these families).
//! * **LM head** (untied if the model ties it): column `r` raises a small *likely* token set
//!   by `ln(vocab) + 5` nats on average over the confirmation sequence, which is likely tokens
//!   only. Its perplexity is about the set size with the super weight and about the
//!   vocabulary size without it. A final-logit soft-cap below 30 (the tiny Gemma 2 fixture uses
//!   3) would flatten that gap, so it is raised to 30 (Gemma 2's real value).
//!
//! * **Decoy** (optional, after the first site): a channel in a later layer reading `r`
//!   (so it fires only while the super weight does, like [`super::planted`]'s decoy), planted
//!   the same way into a reserved row of its own that no projection and no LM-head column
//!   reads. It spikes like a super weight, so detection names it, but its only effect is
//!   through the final norm, where it dilutes `r` and everything else: zeroing it leaves the
//!   perplexity within a few percent, so confirmation rejects it.
//!
//! A *group* is several sites sharing the row `r` in different layers, each planted the same
//! way in layer order: the final norm saturates on `r`, so removing any one member leaves the
//! others' write and the prediction; removing all of them empties `r`. A later member is
//! calibrated with the earlier ones in place, whose massive `r` dominates its norm's scale, so
//! without them its normalized source grows (about 11x on the tiny GPT-2 and GPT-NeoX) and it
//! writes more, not less, as long as that value keeps its sign. In a LayerNorm two things
//! could flip it, both seen on the tiny GPT-2 (layer 1 of a group in layers 0 and 1):
//!
//! * the norm's **bias** β: the centered source `(γ − μ)/σ` is 0.13 next to `r` and about 1.5
//!   without it, so with `w = 0.96, β = −0.19` the norm's output goes from −0.06 to
//!   +1.1 .. +1.4, and the GELU channel, calibrated on the negative value, drops from 900 to 0
//!   (zeroing the layer-0 member alone raised the perplexity 83x). So a channel reading the
//!   source dim (super weight or member) cancels β with its own up bias (`−up · β`), making
//!   its pre-activation proportional to the centered source. The decoy, which reads `r`, keeps
//!   a zero up bias (β is negligible next to `r`'s normalized value).
//! * the **mean** μ, which includes `r / hidden`: the centered source stays positive only if
//!   the planted value `A · w` is negative (or below `γ · hidden`); a positive one is refused.
//!
//! [`plant_arch`] therefore checks, by a forward pass per member, that each member after the
//! first still fires at every prompt position, with its sign and at least half its
//! activation, when the members before it are zeroed, and refuses the plant otherwise.
//!
//! Every gain is measured on the model being built, with hooks (the gate or up output for the
//! gain, the down_proj input for the activation, the MLP's write for post-norm gains, the
//! logits for the head), never by re-deriving a family's norm by hand.
//!
//! Not planted here: the attention sink at BOS and backups (see [`super::planted`] for those
//! on Llama). MoE families are refused.

use std::collections::BTreeSet;

use serde::Serialize;

use super::plant::plant_err;
use super::{mix, PlantSite, PlantedWeight, SplitMix64};
use crate::hooks::{HookKind, HookPoint, Hooks};
use crate::model::arch::{ForwardOptions, KvCache, Logits};
use crate::model::Architecture;
use crate::{Model, Result};

/// Source feature every token embedding carries in the source dim.
const GAMMA: f32 = 1.0;
/// Mean logit advantage of likely tokens, beyond `ln(vocab)`.
const GAP_OVER_LN_VOCAB: f64 = 5.0;
/// Lowest final-logit soft-cap kept (below it the likely tokens' gap would be flattened).
const MIN_FINAL_SOFTCAP: f64 = 30.0;

/// What [`plant_arch`] plants.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArchPlant {
    /// The super weight, or the members of a group: one shared row, distinct layers in
    /// increasing order.
    pub sites: Vec<PlantSite>,
    /// A spike that does not matter: reads the sites' row, in a later layer of its own, and
    /// writes a row of its own.
    pub decoy: Option<PlantSite>,
    /// Size of the likely token set.
    pub likely: usize,
    /// Length of the suggested detection prompt.
    pub prompt_len: usize,
    /// Length of the suggested confirmation sequence (score it as one window).
    pub confirm_len: usize,
}

impl ArchPlant {
    /// One super weight at `site`, 4 likely tokens, a 12-token prompt, 32 confirmation tokens.
    pub fn single(site: PlantSite) -> Self {
        ArchPlant { sites: vec![site], decoy: None, likely: 4, prompt_len: 12, confirm_len: 32 }
    }
}

/// The ground truth of [`plant_arch`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArchTruth {
    /// The planted weights (position: the first prompt token, where gains were calibrated).
    pub super_weights: Vec<PlantedWeight>,
    /// The decoy (detection should reject it), if planted.
    pub decoy: Option<PlantedWeight>,
    /// Hidden dim every token carries `γ` in, read by the planted channels.
    pub source_dim: usize,
    /// Suggested detection prompt (random tokens).
    pub prompt: Vec<u32>,
    /// Suggested confirmation sequence (likely tokens).
    pub confirm: Vec<u32>,
    /// The likely token set.
    pub likely_tokens: Vec<u32>,
}

/// `model.layers.{l}.{what}` (full tensor name, `.weight` / `.bias` included in `what`).
fn name(l: usize, what: &str) -> String {
    format!("model.layers.{l}.{what}")
}

/// Projections that read the residual stream (their column `r` is zeroed).
const READERS: [&str; 7] = [
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.qkv_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.gate_up_proj.weight",
];

/// The LayerNorm bias feeding the un-gated (GELU) MLPs (GPT-2, GPT-NeoX); the gated families'
/// norms have none.
const MLP_NORM_BIAS: &str = "post_attention_layernorm.bias";

/// Projections that write the residual stream (their rows `r` and `s` are zeroed).
const WRITERS: [&str; 2] = ["self_attn.o_proj", "mlp.down_proj"];

/// Activations at `point` for `tokens` (`[tokens, width]`), by a forward pass.
fn capture(model: &Model, tokens: &[u32], point: HookPoint) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    {
        let mut hooks = Hooks::new();
        hooks.add(point, |_, a| out.extend_from_slice(a.data));
        let opts =
            ForwardOptions { hooks: Some(&mut hooks), logits: Logits::None, ..Default::default() };
        model.forward(tokens, &mut KvCache::new(model), opts)?;
    }
    if out.is_empty() {
        return Err(plant_err(format!("no activations at {point:?}")));
    }
    Ok(out)
}

/// Whether `a`'s MLP normalizes its output before the residual add.
fn post_norm(a: Architecture) -> bool {
    matches!(a, Architecture::Gemma2 | Architecture::Gemma3 | Architecture::Olmo2)
}

/// Set the rows of channel `c` in layer `l` that make its pre-activation(s) read only dim
/// `src`, with gains `gate` (gated MLPs) and `up`; with `cancel_bias`, a GELU channel's up
/// bias cancels the MLP norm's bias of `src`, otherwise it is 0.
fn set_channel_rows(
    model: &mut Model,
    l: usize,
    c: usize,
    (src, cancel_bias): (usize, bool),
    gate: f32,
    up: f32,
) -> Result<()> {
    let h = model.config.hidden_size;
    let i = model.config.intermediate_size;
    let w = &mut model.weights;
    let mut set_row = |tensor: &str, row: usize, value: f32| -> Result<()> {
        let d = &mut w.get_mut(&name(l, tensor))?.data;
        let row = &mut d[row * h..(row + 1) * h];
        row.fill(0.0);
        row[src] = value;
        Ok(())
    };
    if model.config.architecture == Architecture::Phi3 {
        set_row("mlp.gate_up_proj.weight", c, gate)?;
        set_row("mlp.gate_up_proj.weight", i + c, up)?;
    } else if model.config.architecture.gated_mlp() {
        set_row("mlp.gate_proj.weight", c, gate)?;
        set_row("mlp.up_proj.weight", c, up)?;
    } else {
        set_row("mlp.up_proj.weight", c, up)?;
        // The MLP's LayerNorm adds its bias β to the normalized source; with `cancel_bias` the
        // channel's own up bias cancels it (see the module docs on groups).
        let beta = match w.get(&name(l, MLP_NORM_BIAS)) {
            Ok(b) if cancel_bias => b.data[src],
            _ => 0.0,
        };
        if let Ok(b) = w.get_mut(&name(l, "mlp.up_proj.bias")) {
            b.data[c] = -up * beta;
        }
    }
    Ok(())
}

/// Plant one site reading `src` (the source dim, whose norm bias the channel cancels, or the
/// planted row for the decoy); gains calibrated on `prompt[0]` in the model as it is.
fn plant_site(
    model: &mut Model,
    s: &PlantSite,
    (src, cancel_bias): (usize, bool),
    reserved: &[usize],
    prompt: &[u32],
) -> Result<()> {
    let gated = model.config.architecture.gated_mlp();
    let (h, i) = (model.config.hidden_size, model.config.intermediate_size);
    let at = |kind| HookPoint { layer: s.layer, kind };
    // 1. Unit gains: the gate (or up) output of channel c is the normalized source value.
    set_channel_rows(model, s.layer, s.col, (src, cancel_bias), 1.0, 1.0)?;
    let xn = capture(model, prompt, at(HookKind::MlpPre))?[s.col] as f64;
    if !(xn.is_finite() && xn.abs() > 1e-6) {
        return Err(plant_err(format!("layer {}: nothing to read in dim {src}", s.layer)));
    }
    // 2. Gains: gate at z (an activation near its linear regime), up scaled to the target.
    let act = s.activation as f64;
    let z = act.abs().sqrt().max(6.0);
    let (gate, mut up) = if gated { (z / xn, act.signum() / xn) } else { (0.0, act / xn) };
    set_channel_rows(model, s.layer, s.col, (src, cancel_bias), gate as f32, up as f32)?;
    for _ in 0..2 {
        let got = capture(model, prompt, at(HookKind::MlpPost))?[s.col] as f64;
        if !(got.is_finite() && got.abs() > 1e-6 && got.signum() == act.signum()) {
            return Err(plant_err(format!(
                "layer {}: channel {} reaches {got}, not the sign of {act}",
                s.layer, s.col
            )));
        }
        up *= act / got;
        set_channel_rows(model, s.layer, s.col, (src, cancel_bias), gate as f32, up as f32)?;
    }
    // 3. down_proj: the planted entry, reserved rows empty, the rest of the column shrunk.
    let shrink = (0.5 / act.abs()) as f32;
    let down = &mut model.weights.get_mut(&name(s.layer, "mlp.down_proj.weight"))?.data;
    for row in 0..h {
        let x = &mut down[row * i + s.col];
        *x = if reserved.contains(&row) { 0.0 } else { *x * shrink };
    }
    down[s.row * i + s.col] = s.weight;
    // 4. Post-norm families: the post-MLP norm's gain of r sets what the block writes.
    if post_norm(model.config.architecture) {
        let target = act * s.weight as f64;
        let got = capture(model, prompt, at(HookKind::MlpOut))?[s.row] as f64;
        if !(got.is_finite() && got.abs() > 1e-6) {
            return Err(plant_err(format!("layer {}: the post-MLP norm writes {got}", s.layer)));
        }
        let one_plus = model.config.architecture != Architecture::Olmo2;
        let norm =
            &mut model.weights.get_mut(&name(s.layer, "post_feedforward_layernorm.weight"))?;
        let g = norm.data[s.row] as f64 + if one_plus { 1.0 } else { 0.0 };
        let g = g * target / got;
        norm.data[s.row] = (g - if one_plus { 1.0 } else { 0.0 }) as f32;
    }
    Ok(())
}

/// Check that every group member after the first still fires, with the sign and at least half
/// the size of its activation, at every prompt position, with the members before it zeroed:
/// otherwise removing an earlier member would silence it and the plant would not be a group.
fn check_members_alone(model: &mut Model, sites: &[PlantSite], prompt: &[u32]) -> Result<()> {
    let i = model.config.intermediate_size;
    let mut sites = sites.to_vec();
    sites.sort_by_key(|s| s.layer);
    let entry = |s: &PlantSite| (name(s.layer, "mlp.down_proj.weight"), s.row * i + s.col);
    for (k, s) in sites.iter().enumerate().skip(1) {
        for e in &sites[..k] {
            let (t, at) = entry(e);
            model.weights.get_mut(&t)?.data[at] = 0.0;
        }
        let got = capture(model, prompt, HookPoint { layer: s.layer, kind: HookKind::MlpPost });
        for e in &sites[..k] {
            let (t, at) = entry(e);
            model.weights.get_mut(&t)?.data[at] = e.weight;
        }
        let act = s.activation as f64;
        for (p, a) in got?.chunks(i).enumerate() {
            let a = a[s.col] as f64;
            if !(a.is_finite() && a.signum() == act.signum() && a.abs() >= act.abs() / 2.0) {
                return Err(plant_err(format!(
                    "group member in layer {} (channel {}) reaches {a} at prompt position {p} \
                     without the members before it, not about {act}: its normalized source \
                     changes sign without them (a LayerNorm centers it on the mean, which a \
                     positive planted value, activation · weight, moves past it)",
                    s.layer, s.col
                )));
            }
        }
    }
    Ok(())
}

/// Plant `plant`'s super weight (or group) into `model`, a dense model of any family swk runs
/// (typically random weights, e.g. a tiny test fixture), choosing the source dim, likely
/// tokens and sequences from `seed`. The tokenizer is dropped (token ids lose their meaning).
/// See the [module docs](self) for the mechanism. Errors on MoE models, sites outside the
/// model, planted channels sharing a layer, members with different rows, a decoy writing the
/// super weight's row or not after it, a negative activation in a GELU (un-gated) MLP, or a
/// group member that does not fire without the members before it.
pub fn plant_arch(mut model: Model, seed: u64, plant: &ArchPlant) -> Result<(Model, ArchTruth)> {
    let c = model.config.clone();
    let arch = c.architecture;
    if arch.is_moe() {
        return Err(plant_err(format!(
            "{} is a mixture of experts; plant a dense model",
            arch.name()
        )));
    }
    let first = *plant.sites.first().ok_or_else(|| plant_err("no site to plant"))?;
    let (h, i, vocab) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let mut layers = BTreeSet::new();
    for s in plant.sites.iter().chain(&plant.decoy) {
        if s.layer >= c.num_layers || s.row >= h || s.col >= i {
            return Err(plant_err(format!(
                "site ({}, {}, {}) is outside the model ({} layers, hidden {h}, intermediate {i})",
                s.layer, s.row, s.col, c.num_layers
            )));
        }
        if !layers.insert(s.layer) {
            return Err(plant_err("planted channels must use distinct layers"));
        }
        if !(s.activation.is_finite()
            && s.activation.abs() >= 1.0
            && s.weight.is_finite()
            && s.weight != 0.0)
        {
            return Err(plant_err(
                "sites need a finite activation (|a| >= 1) and a non-zero weight",
            ));
        }
        if !arch.gated_mlp() && s.activation < 0.0 {
            return Err(plant_err(format!(
                "{}'s GELU MLP cannot make a negative activation ({})",
                arch.name(),
                s.activation
            )));
        }
    }
    if plant.likely == 0
        || plant.likely > vocab / 4
        || plant.prompt_len < 2
        || plant.confirm_len < 2
    {
        return Err(plant_err("need 1..=vocab/4 likely tokens and sequences of at least 2 tokens"));
    }
    if plant.sites.iter().any(|s| s.row != first.row) {
        return Err(plant_err("the sites (super weight or group members) must share one row"));
    }
    let r = first.row;
    let decoy_row = plant.decoy.map(|d| d.row);
    if decoy_row == Some(r) {
        return Err(plant_err("the decoy must write a row of its own"));
    }
    let first_layer = plant.sites.iter().map(|s| s.layer).min().unwrap_or(0);
    if plant.decoy.is_some_and(|d| d.layer <= first_layer) {
        return Err(plant_err("the decoy reads the super weight's row: put it in a later layer"));
    }
    let mut rng = SplitMix64::new(mix(seed, 0x706c_616e_7461_7263));
    let src = loop {
        let d = rng.below(h);
        if d != r && Some(d) != decoy_row {
            break d;
        }
    };
    let reserved: Vec<usize> = [r, src].into_iter().chain(decoy_row).collect();
    let mut pool: Vec<u32> = (0..vocab as u32).collect();
    rng.shuffle(&mut pool);
    let likely = pool[..plant.likely].to_vec();
    let prompt: Vec<u32> = (0..plant.prompt_len).map(|_| rng.below(vocab) as u32).collect();
    let confirm: Vec<u32> =
        (0..plant.confirm_len).map(|_| likely[rng.below(likely.len())]).collect();

    // Untie the head: the embedding's column r must stay empty for the inputs.
    if !model.weights.contains("lm_head.weight") {
        let e = model.weights.get("model.embed_tokens.weight")?.clone();
        model.weights.insert("lm_head.weight", e);
    }
    model.config.tie_word_embeddings = false;
    if let Some(cap) = model.config.family.final_logit_softcapping.as_mut() {
        *cap = cap.max(MIN_FINAL_SOFTCAP);
    }
    model.tokenizer = None;

    let w = &mut model.weights;
    for row in w.get_mut("model.embed_tokens.weight")?.data.chunks_mut(h) {
        row[r] = 0.0;
        row[src] = GAMMA;
    }
    if let Ok(p) = w.get_mut("model.embed_positions.weight") {
        for row in p.data.chunks_mut(h) {
            row[r] = 0.0;
            row[src] = 0.0;
        }
    }
    for l in 0..c.num_layers {
        for what in READERS {
            if let Ok(t) = w.get_mut(&name(l, what)) {
                for row in t.data.chunks_mut(h) {
                    row[r] = 0.0;
                }
            }
        }
        for what in WRITERS {
            let t = w.get_mut(&name(l, &format!("{what}.weight")))?;
            let cols = t.shape.get(1).copied().unwrap_or(0);
            for &d in &reserved {
                t.data[d * cols..(d + 1) * cols].fill(0.0);
            }
            if let Ok(b) = w.get_mut(&name(l, &format!("{what}.bias"))) {
                for &d in &reserved {
                    b.data[d] = 0.0;
                }
            }
        }
    }
    if let Ok(b) = w.get_mut("model.norm.bias") {
        b.data[r] = 0.0;
    }

    // In layer order; the decoy reads r, so it comes after the first site.
    let mut all: Vec<(PlantSite, (usize, bool))> =
        plant.sites.iter().map(|&s| (s, (src, true))).collect();
    all.extend(plant.decoy.map(|d| (d, (r, false))));
    all.sort_by_key(|(s, _)| s.layer);
    for (s, from) in &all {
        plant_site(&mut model, s, *from, &reserved, &prompt)?;
    }
    check_members_alone(&mut model, &plant.sites, &prompt)?;

    // LM head: measure the final normalized value of r (the logit of a probe token whose head
    // row is e_r, soft-cap off), then give the likely tokens `gap / mean` in column r.
    let head = &mut model.weights.get_mut("lm_head.weight")?.data;
    for row in head.chunks_mut(h) {
        row[r] = 0.0;
    }
    let probe = likely[0] as usize;
    let saved = head[probe * h..(probe + 1) * h].to_vec();
    head[probe * h..(probe + 1) * h].fill(0.0);
    head[probe * h + r] = 1.0;
    let cap = model.config.family.final_logit_softcapping.take();
    let logits = model.forward(
        &confirm,
        &mut KvCache::new(&model),
        ForwardOptions { logits: Logits::All, ..Default::default() },
    );
    model.config.family.final_logit_softcapping = cap;
    let logits = logits?;
    let n = confirm.len() - 1;
    let mean = (0..n).map(|p| logits[p * vocab + probe] as f64).sum::<f64>() / n as f64;
    if !(mean.is_finite() && mean.abs() > 1e-3) {
        return Err(plant_err(format!("the planted row reaches the LM head as {mean}")));
    }
    let gap = (vocab as f64).ln() + GAP_OVER_LN_VOCAB;
    let head = &mut model.weights.get_mut("lm_head.weight")?.data;
    head[probe * h..(probe + 1) * h].copy_from_slice(&saved);
    for &t in &likely {
        head[t as usize * h + r] = (gap / mean) as f32;
    }

    crate::model::arch::validate(&model)?;
    model.source.name = Some(format!("planted-{}-seed-{seed}", arch.name()));
    let planted = |s: &PlantSite| PlantedWeight {
        layer: s.layer,
        row: s.row,
        col: s.col,
        value: s.weight,
        input: s.activation,
        output: s.activation * s.weight,
        position: 0,
        iteration: 1,
    };
    let mut sites = plant.sites.clone();
    sites.sort_by_key(|s| s.layer);
    let truth = ArchTruth {
        super_weights: sites.iter().map(planted).collect(),
        decoy: plant.decoy.as_ref().map(planted),
        source_dim: src,
        prompt,
        confirm,
        likely_tokens: likely,
    };
    Ok((model, truth))
}
