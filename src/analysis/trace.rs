//! The arithmetic of one super weight `down_proj.weight[row, col]` of `layer` on a prompt.
//!
//! * The down_proj input channel `col` at every token: gate (`mlp.hook_pre`), up
//!   (`mlp.hook_pre_linear`), `silu(gate)` and `silu(gate)·up` (`mlp.hook_post`); the token
//!   carrying the largest |input| is the spike token.
//! * At the spike token: the product `w·x` against the sum of the rest of row `row`
//!   (`Σ_{j≠col} W[row, j]·x_j`), and the hook's `hook_mlp_out[row]`.
//! * Amplification: the MLP input is `rmsnorm(resid_mid)` with O(1) entries; the gate and up
//!   projections and their product turn it into the spike. Gains are reported relative to the
//!   RMS of the normalized input, with the input dims that drive gate and up the most.
//! * Attention sink: for every later layer, the mean attention weight (over heads and later
//!   query positions) on the spike token, from `attn.hook_pattern`.

use serde::Serialize;

use crate::analysis::{median_abs, read_values, token_labels, CaptureBackend};
use crate::hooks::{HookKind, HookPoint};
use crate::{Error, Model, Result};

/// The down_proj input channel at one token.
#[derive(Debug, Clone, Serialize)]
pub struct PositionTrace {
    /// Token position.
    pub position: usize,
    /// The token.
    pub token: String,
    /// Gate pre-activation.
    pub gate: f32,
    /// Up projection.
    pub up: f32,
    /// `silu(gate)`.
    pub silu_gate: f32,
    /// `silu(gate)·up`, the down_proj input.
    pub activation: f32,
}

/// One input dim's share of a gate or up pre-activation.
#[derive(Debug, Clone, Serialize)]
pub struct Contribution {
    /// Hidden dim of the normalized MLP input.
    pub dim: usize,
    /// Normalized input value there.
    pub normed_input: f32,
    /// Weight `W[col, dim]`.
    pub weight: f32,
    /// Their product.
    pub product: f32,
}

/// From the normalized MLP input to the spike, at the spike token.
#[derive(Debug, Clone, Serialize)]
pub struct Amplification {
    /// RMS of the residual stream entering the MLP norm (`hook_resid_mid`).
    pub resid_rms: f32,
    /// RMS of the normalized MLP input.
    pub normed_rms: f32,
    /// Largest |normalized input| and its dim.
    pub normed_max_abs: f32,
    /// Dim of that maximum.
    pub normed_max_dim: usize,
    /// |gate| / normed RMS.
    pub gate_gain: f32,
    /// |up| / normed RMS.
    pub up_gain: f32,
    /// |silu(gate)·up| / normed RMS.
    pub spike_gain: f32,
    /// Median |input| of channel `col` at the other tokens.
    pub median_other_positions: f32,
    /// |spike| over that median.
    pub ratio_to_other_positions: f32,
    /// L2 norm of `gate_proj.weight[col]`.
    pub gate_row_norm: f32,
    /// Median L2 norm of the layer's gate rows.
    pub gate_row_norm_median: f32,
    /// L2 norm of `up_proj.weight[col]`.
    pub up_row_norm: f32,
    /// Median L2 norm of the layer's up rows.
    pub up_row_norm_median: f32,
}

/// Attention on the spike token in one later layer.
#[derive(Debug, Clone, Serialize)]
pub struct SinkLayer {
    /// Layer.
    pub layer: usize,
    /// Mean weight on the spike token over heads and later query positions.
    pub mean_weight: f32,
    /// The head attending to it the most.
    pub max_head: usize,
    /// That head's mean weight on it.
    pub max_head_weight: f32,
    /// Fraction of (head, query) pairs whose most-attended key is the spike token.
    pub argmax_fraction: f32,
}

/// The trace of one super weight.
#[derive(Debug, Clone, Serialize)]
pub struct TraceReport {
    /// Layer.
    pub layer: usize,
    /// Row (hidden dim written).
    pub row: usize,
    /// Column (down_proj input channel).
    pub col: usize,
    /// `down_proj.weight[row, col]`.
    pub weight: f32,
    /// Prompt token ids.
    pub token_ids: Vec<u32>,
    /// Their labels.
    pub tokens: Vec<String>,
    /// Position of the largest |down_proj input| in channel `col`.
    pub spike_position: usize,
    /// The token there.
    pub spike_token: String,
    /// Channel `col` at every token.
    pub positions: Vec<PositionTrace>,
    /// `w · x` at the spike token.
    pub product: f32,
    /// `Σ_{j≠col} W[row, j]·x_j` at the spike token (f64 sum).
    pub rest_of_row: f32,
    /// `product + rest_of_row`.
    pub row_output: f32,
    /// `hook_mlp_out[row]` at the spike token (the forward pass's own value).
    pub mlp_out_row: f32,
    /// `product / row_output`.
    pub product_share: f32,
    /// Residual stream at `row` before the MLP (`hook_resid_mid`).
    pub resid_before: f32,
    /// And after (`hook_resid_post`).
    pub resid_after: f32,
    /// From the normalized input to the spike.
    pub amplification: Amplification,
    /// Input dims driving the gate the most.
    pub gate_contributors: Vec<Contribution>,
    /// Input dims driving the up projection the most.
    pub up_contributors: Vec<Contribution>,
    /// Attention on the spike token in every later layer.
    pub attention: Vec<SinkLayer>,
    /// The later layers attending to it the most (by mean weight), up to 5.
    pub top_sink_layers: Vec<usize>,
}

fn rms(x: &[f32]) -> f32 {
    (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / x.len().max(1) as f64).sqrt() as f32
}

fn contributors(xn: &[f32], w: &[f32], k: usize) -> Vec<Contribution> {
    let mut c: Vec<Contribution> = xn
        .iter()
        .zip(w)
        .enumerate()
        .map(|(dim, (&x, &w))| Contribution { dim, normed_input: x, weight: w, product: x * w })
        .collect();
    c.sort_by(|a, b| b.product.abs().total_cmp(&a.product.abs()));
    c.truncate(k);
    c
}

/// Trace `down_proj.weight[row, col]` of `layer` over `tokens` (one forward pass).
pub fn trace(
    model: &Model,
    tokens: &[u32],
    layer: usize,
    row: usize,
    col: usize,
) -> Result<TraceReport> {
    let labels = token_labels(model, tokens);
    trace_with(model, tokens, &labels, (layer, row, col))
}

/// [`trace`] on any backend that captures activations (the CPU [`Model`], or the CUDA
/// backend's `CudaModel`), with the tokens' readable `labels` (see [`token_labels`]). Weights
/// are read through the backend: on a bf16 device, its stored values.
pub fn trace_with<B: CaptureBackend>(
    model: &B,
    tokens: &[u32],
    labels: &[String],
    (layer, row, col): (usize, usize, usize),
) -> Result<TraceReport> {
    let c = model.model_config();
    let (n, h, inter, nh) = (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads);
    if labels.len() != tokens.len() {
        return Err(Error::Invalid(format!(
            "{} token labels for {} tokens",
            labels.len(),
            tokens.len()
        )));
    }
    if layer >= n || row >= h || col >= inter {
        return Err(Error::Invalid(format!(
            "({layer}, {row}, {col}) is outside the model ({n} layers, hidden {h}, intermediate {inter})"
        )));
    }
    if tokens.is_empty() {
        return Err(Error::Invalid("the prompt tokenizes to nothing".into()));
    }
    let t = tokens.len();
    let at = |kind| HookPoint { layer, kind };
    let mut points: Vec<HookPoint> = [
        HookKind::ResidMid,
        HookKind::MlpPre,
        HookKind::MlpPreLinear,
        HookKind::MlpPost,
        HookKind::MlpOut,
        HookKind::ResidPost,
    ]
    .into_iter()
    .map(at)
    .collect();
    points.extend((layer + 1..n).map(|l| HookPoint { layer: l, kind: HookKind::AttnPattern }));
    let acts = model.capture(tokens, &points)?;
    let get = |p: HookPoint| {
        acts.get(&p).map(Vec::as_slice).ok_or_else(|| Error::Backend(format!("{p} not captured")))
    };
    let (mid, gate, up, post) = (
        get(at(HookKind::ResidMid))?,
        get(at(HookKind::MlpPre))?,
        get(at(HookKind::MlpPreLinear))?,
        get(at(HookKind::MlpPost))?,
    );
    let (out, resid_post) = (get(at(HookKind::MlpOut))?, get(at(HookKind::ResidPost))?);

    let silu = |g: f32| g / (1.0 + (-g).exp());
    let positions: Vec<PositionTrace> = (0..t)
        .map(|p| {
            let g = gate[p * inter + col];
            PositionTrace {
                position: p,
                token: labels[p].clone(),
                gate: g,
                up: up[p * inter + col],
                silu_gate: silu(g),
                activation: post[p * inter + col],
            }
        })
        .collect();
    let s = (0..t)
        .max_by(|&a, &b| positions[a].activation.abs().total_cmp(&positions[b].activation.abs()))
        .unwrap_or(0);
    let spike = &positions[s];

    // Row `row` of down_proj against the input at the spike token.
    let wrow = &model.down_proj_row(layer, row)?;
    let x = &post[s * inter..(s + 1) * inter];
    let weight = wrow[col];
    let product = weight * x[col];
    let rest: f64 = (0..inter).filter(|&j| j != col).map(|j| wrow[j] as f64 * x[j] as f64).sum();
    let row_output = product + rest as f32;

    // The normalized MLP input at the spike token.
    let norm_name = format!("model.layers.{layer}.post_attention_layernorm.weight");
    let norm = read_values(model, &norm_name, 0, h)?;
    let xm = &mid[s * h..(s + 1) * h];
    let resid_rms = rms(xm);
    let inv = 1.0 / ((resid_rms as f64).powi(2) + c.rms_norm_eps).sqrt();
    let xn: Vec<f32> =
        xm.iter().zip(&norm).map(|(&v, &g)| (g as f64 * v as f64 * inv) as f32).collect();
    let normed_rms = rms(&xn);
    let (normed_max_dim, normed_max_abs) = xn
        .iter()
        .enumerate()
        .map(|(d, v)| (d, v.abs()))
        .fold((0, 0f32), |best, cur| if cur.1 > best.1 { cur } else { best });
    let others: Vec<f32> = (0..t).filter(|&p| p != s).map(|p| positions[p].activation).collect();
    let median_other = median_abs(&others);
    // gate_proj and up_proj, whole ([intermediate, hidden]): their row norms, and row `col`.
    let mlp_weight = |name: &str| -> Result<Vec<f32>> {
        let name = format!("model.layers.{layer}.mlp.{name}.weight");
        let shape = model.shape_of(&name)?;
        if shape != [inter, h] {
            return Err(Error::tensor(&name, format!("shape {shape:?}, not [{inter}, {h}]")));
        }
        read_values(model, &name, 0, inter * h)
    };
    let (wg, wu) = (mlp_weight("gate_proj")?, mlp_weight("up_proj")?);
    let row_norms = |m: &[f32]| -> (f32, f32) {
        let norms: Vec<f32> = m.chunks(h).map(|r| rms(r) * (h as f32).sqrt()).collect();
        (norms[col], median_abs(&norms))
    };
    let (gate_row_norm, gate_row_norm_median) = row_norms(&wg);
    let (up_row_norm, up_row_norm_median) = row_norms(&wu);
    let gain = |v: f32| if normed_rms > 0.0 { v.abs() / normed_rms } else { f32::INFINITY };
    let amplification = Amplification {
        resid_rms,
        normed_rms,
        normed_max_abs,
        normed_max_dim,
        gate_gain: gain(spike.gate),
        up_gain: gain(spike.up),
        spike_gain: gain(spike.activation),
        median_other_positions: median_other,
        ratio_to_other_positions: if median_other > 0.0 {
            spike.activation.abs() / median_other
        } else {
            f32::INFINITY
        },
        gate_row_norm,
        gate_row_norm_median,
        up_row_norm,
        up_row_norm_median,
    };
    let gate_contributors = contributors(&xn, &wg[col * h..(col + 1) * h], 5);
    let up_contributors = contributors(&xn, &wu[col * h..(col + 1) * h], 5);

    // Attention on the spike token in later layers.
    let queries: Vec<usize> = if s + 1 < t { (s + 1..t).collect() } else { vec![s] };
    let mut attention = Vec::new();
    for l in layer + 1..n {
        let pat = get(HookPoint { layer: l, kind: HookKind::AttnPattern })?;
        let kv = t;
        let mut per_head = vec![0f32; nh];
        let mut argmax_hits = 0usize;
        for &q in &queries {
            for (hd, acc) in per_head.iter_mut().enumerate() {
                let w = &pat[(q * nh + hd) * kv..][..kv];
                *acc += w[s];
                let top = (0..kv).max_by(|&a, &b| w[a].total_cmp(&w[b])).unwrap_or(0);
                argmax_hits += usize::from(top == s);
            }
        }
        per_head.iter_mut().for_each(|v| *v /= queries.len() as f32);
        let (max_head, max_head_weight) = per_head
            .iter()
            .copied()
            .enumerate()
            .fold((0, f32::MIN), |best, cur| if cur.1 > best.1 { cur } else { best });
        attention.push(SinkLayer {
            layer: l,
            mean_weight: per_head.iter().sum::<f32>() / nh as f32,
            max_head,
            max_head_weight,
            argmax_fraction: argmax_hits as f32 / (queries.len() * nh) as f32,
        });
    }
    let mut order: Vec<&SinkLayer> = attention.iter().collect();
    order.sort_by(|a, b| b.mean_weight.total_cmp(&a.mean_weight));
    let top_sink_layers = order.iter().take(5).map(|a| a.layer).collect();

    Ok(TraceReport {
        layer,
        row,
        col,
        weight,
        token_ids: tokens.to_vec(),
        tokens: positions.iter().map(|p| p.token.clone()).collect(),
        spike_position: s,
        spike_token: spike.token.clone(),
        product,
        rest_of_row: rest as f32,
        row_output,
        mlp_out_row: out[s * h + row],
        product_share: if row_output != 0.0 { product / row_output } else { f32::NAN },
        resid_before: mid[s * h + row],
        resid_after: resid_post[s * h + row],
        amplification,
        gate_contributors,
        up_contributors,
        attention,
        top_sink_layers,
        positions,
    })
}
