//! Named hook points (TransformerLens style), the hook registry, and spike statistics.
//!
//! A hook sees an activation `[tokens, width]` at one point of one layer and may rewrite it.
//! With no hook registered the forward pass only checks an empty list.

use std::fmt;

use serde::Serialize;

use crate::{Error, Result};

/// Where in a block a hook fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum HookKind {
    /// `blocks.{l}.hook_resid_pre`: residual stream entering the block.
    ResidPre,
    /// `blocks.{l}.attn.hook_pattern`: attention weights after softmax, read-only (rewriting
    /// them changes nothing). Rows are query tokens; each row holds `n_heads` runs of
    /// `pos0 + rows` weights, one per key position: `data[t * cols + h * kv + j]` with
    /// `kv = cols / n_heads` is the weight head `h` of the query at `pos0 + t` puts on key `j`
    /// (0 outside the causal or sliding window). Computed only when a hook is registered here.
    AttnPattern,
    /// `blocks.{l}.hook_attn_out`: attention output (after o_proj).
    AttnOut,
    /// `blocks.{l}.hook_resid_mid`: residual stream after the attention add.
    ResidMid,
    /// `blocks.{l}.mlp.hook_pre`: gate projection output (before SiLU).
    MlpPre,
    /// `blocks.{l}.mlp.hook_pre_linear`: up projection output.
    MlpPreLinear,
    /// `blocks.{l}.mlp.hook_post`: down_proj input, `silu(gate) ⊙ up`.
    MlpPost,
    /// `blocks.{l}.hook_mlp_out`: down_proj output.
    MlpOut,
    /// `blocks.{l}.hook_resid_post`: residual stream leaving the block.
    ResidPost,
}

impl HookKind {
    /// All kinds, in forward order.
    pub const ALL: [HookKind; 9] = [
        HookKind::ResidPre,
        HookKind::AttnPattern,
        HookKind::AttnOut,
        HookKind::ResidMid,
        HookKind::MlpPre,
        HookKind::MlpPreLinear,
        HookKind::MlpPost,
        HookKind::MlpOut,
        HookKind::ResidPost,
    ];
    /// The name suffix after `blocks.{l}.`.
    pub fn suffix(self) -> &'static str {
        match self {
            HookKind::ResidPre => "hook_resid_pre",
            HookKind::AttnPattern => "attn.hook_pattern",
            HookKind::AttnOut => "hook_attn_out",
            HookKind::ResidMid => "hook_resid_mid",
            HookKind::MlpPre => "mlp.hook_pre",
            HookKind::MlpPreLinear => "mlp.hook_pre_linear",
            HookKind::MlpPost => "mlp.hook_post",
            HookKind::MlpOut => "hook_mlp_out",
            HookKind::ResidPost => "hook_resid_post",
        }
    }
}

/// One hook point: a kind at a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct HookPoint {
    /// Block index.
    pub layer: usize,
    /// Position within the block.
    pub kind: HookKind,
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blocks.{}.{}", self.layer, self.kind.suffix())
    }
}

impl std::str::FromStr for HookPoint {
    type Err = Error;
    /// Parse `blocks.{l}.hook_resid_pre` and friends.
    fn from_str(s: &str) -> Result<Self> {
        let bad =
            || Error::Invalid(format!("`{s}` is not a hook name (e.g. blocks.3.mlp.hook_post)"));
        let rest = s.strip_prefix("blocks.").ok_or_else(bad)?;
        let (layer, suffix) = rest.split_once('.').ok_or_else(bad)?;
        let layer = layer.parse().map_err(|_| bad())?;
        let kind = HookKind::ALL.into_iter().find(|k| k.suffix() == suffix).ok_or_else(bad)?;
        Ok(HookPoint { layer, kind })
    }
}

/// An activation handed to a hook: `rows` tokens of `cols` values, row-major, the first row at
/// absolute position `pos0`.
pub struct Activation<'a> {
    /// The values (rewrite them to intervene).
    pub data: &'a mut [f32],
    /// Number of token rows.
    pub rows: usize,
    /// Width of a row.
    pub cols: usize,
    /// Absolute position of row 0.
    pub pos0: usize,
}

/// A hook function.
pub type HookFn<'f> = Box<dyn FnMut(HookPoint, &mut Activation<'_>) + Send + 'f>;

/// Registered hooks.
#[derive(Default)]
pub struct Hooks<'f> {
    entries: Vec<(HookPoint, HookFn<'f>)>,
}

impl<'f> Hooks<'f> {
    /// No hooks.
    pub fn new() -> Self {
        Hooks { entries: Vec::new() }
    }
    /// Register `f` at `point`.
    pub fn add(
        &mut self,
        point: HookPoint,
        f: impl FnMut(HookPoint, &mut Activation<'_>) + Send + 'f,
    ) {
        self.entries.push((point, Box::new(f)));
    }
    /// Register `f` at a point given by name.
    pub fn add_named(
        &mut self,
        name: &str,
        f: impl FnMut(HookPoint, &mut Activation<'_>) + Send + 'f,
    ) -> Result<()> {
        self.add(name.parse()?, f);
        Ok(())
    }
    /// Whether any hook is registered at `point`.
    pub fn has(&self, point: HookPoint) -> bool {
        self.entries.iter().any(|(p, _)| *p == point)
    }
    /// Whether no hook is registered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Run the hooks registered at `point`, in registration order.
    pub fn run(&mut self, point: HookPoint, act: &mut Activation<'_>) {
        for (p, f) in self.entries.iter_mut() {
            if *p == point {
                f(point, act);
            }
        }
    }
}

/// The largest |value| seen in one channel, with its signed value and token position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ChannelMax {
    /// Signed value at the maximum.
    pub value: f32,
    /// |value| (0 when nothing was seen).
    pub abs: f32,
    /// Absolute token position of the maximum.
    pub position: usize,
}

/// Statistics of one routed expert of a mixture-of-experts layer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExpertSpikes {
    /// Tokens routed to this expert (each token counts once per expert it chose).
    pub selected: u64,
    /// Sum of the routing weights these tokens gave it.
    pub weight_sum: f64,
    /// Per column of the expert's down_proj: max |x| over the tokens routed to it.
    pub input: Vec<ChannelMax>,
    /// Per row of the expert's down_proj: max |y| (before the routing weight).
    pub output: Vec<ChannelMax>,
}

impl ExpertSpikes {
    /// Fold in another run's statistics of the same expert (see [`SpikeStats::merge`]).
    pub fn merge(&mut self, other: &ExpertSpikes) {
        self.selected += other.selected;
        self.weight_sum += other.weight_sum;
        merge_channels(&mut self.input, &other.input);
        merge_channels(&mut self.output, &other.output);
    }
}

/// Per channel, keep the larger |value| (`a`'s on ties); `a` grows to `b`'s length.
fn merge_channels(a: &mut Vec<ChannelMax>, b: &[ChannelMax]) {
    if a.len() < b.len() {
        a.resize(b.len(), ChannelMax::default());
    }
    for (x, y) in a.iter_mut().zip(b) {
        if y.abs > x.abs {
            *x = *y;
        }
    }
}

/// Spike statistics of one layer's MLP down-projection `y = x · Wᵀ`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LayerSpikes {
    /// Per input channel (column of W): max |x|. Empty-valued in a mixture-of-experts layer
    /// (see `experts`).
    pub input: Vec<ChannelMax>,
    /// Per output row (hidden dim): max |y| of what the MLP writes into the residual stream.
    pub output: Vec<ChannelMax>,
    /// Per routed expert, in a mixture-of-experts layer (filled by the forward pass; empty
    /// otherwise).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub experts: Vec<ExpertSpikes>,
    /// The always-on shared experts' down_proj of a mixture-of-experts layer: DeepSeek's
    /// `model.layers.L.mlp.shared_experts.down_proj.weight`, Qwen2-MoE's
    /// `mlp.shared_expert.down_proj.weight` (output before its sigmoid gate); every token
    /// counts, weight 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared: Option<ExpertSpikes>,
    /// Tokens the router of a mixture-of-experts layer has seen.
    pub routed_tokens: u64,
    /// Sum over those tokens of the entropy (nats) of the router's softmax.
    pub router_entropy_sum: f64,
}

/// The strongest channel of a layer: index, and its [`ChannelMax`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Peak {
    /// Channel index (column for inputs, row for outputs).
    pub channel: usize,
    /// The maximum.
    pub max: ChannelMax,
}

impl LayerSpikes {
    /// The channel of `v` with the largest |value| (the first of equals), if any.
    pub fn peak(v: &[ChannelMax]) -> Option<Peak> {
        let mut best: Option<Peak> = None;
        for (channel, m) in v.iter().enumerate() {
            if best.is_none_or(|b| m.abs > b.max.abs) {
                best = Some(Peak { channel, max: *m });
            }
        }
        best
    }
    /// The input channel with the largest |x| of the layer's down_proj (empty-valued in a
    /// sparse layer of a mixture of experts; see [`Self::moe_input_peak`]).
    pub fn input_peak(&self) -> Option<Peak> {
        Self::peak(&self.input)
    }
    /// The largest |x| over the down_proj inputs of every routed expert and the shared
    /// experts of a sparse layer: (peak, its expert or None for the shared experts). None in
    /// a dense layer.
    pub fn moe_input_peak(&self) -> Option<(Peak, Option<usize>)> {
        let routed = self.experts.iter().enumerate().map(|(e, es)| (Some(e), es));
        routed
            .chain(self.shared.iter().map(|es| (None, es)))
            .filter_map(|(e, es)| Some((Self::peak(&es.input)?, e)))
            .filter(|(p, _)| p.max.abs > 0.0)
            .fold(None, |best: Option<(Peak, Option<usize>)>, c| match best {
                Some(b) if b.0.max.abs >= c.0.max.abs => Some(b),
                _ => Some(c),
            })
    }
    /// The output row with the largest |y|.
    pub fn output_peak(&self) -> Option<Peak> {
        Self::peak(&self.output)
    }
    /// Median over input channels of their max |x| (the layer's typical activation scale).
    pub fn input_median(&self) -> f32 {
        median(self.input.iter().map(|m| m.abs))
    }
    /// Median over output rows of their max |y|.
    pub fn output_median(&self) -> f32 {
        median(self.output.iter().map(|m| m.abs))
    }
}

fn median(v: impl Iterator<Item = f32>) -> f32 {
    let mut v: Vec<f32> = v.collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f32::total_cmp);
    v[v.len() / 2]
}

/// Spike statistics for every layer, accumulated over forward passes until [`reset`].
///
/// [`reset`]: SpikeStats::reset
#[derive(Debug, Clone, Default, Serialize)]
pub struct SpikeStats {
    /// One entry per layer.
    pub layers: Vec<LayerSpikes>,
}

impl SpikeStats {
    /// Empty statistics for `layers` layers of `intermediate` inputs and `hidden` outputs.
    pub fn new(layers: usize, intermediate: usize, hidden: usize) -> Self {
        SpikeStats {
            layers: (0..layers)
                .map(|_| LayerSpikes {
                    input: vec![ChannelMax::default(); intermediate],
                    output: vec![ChannelMax::default(); hidden],
                    ..Default::default()
                })
                .collect(),
        }
    }
    /// Fold in statistics of further forward passes, as if they had run after the ones in
    /// `self` without a reset: per channel the larger |value| (the earlier one on ties),
    /// router counters summed. Layers and channels missing on either side count as unseen.
    pub fn merge(&mut self, other: &SpikeStats) {
        if self.layers.len() < other.layers.len() {
            self.layers.resize_with(other.layers.len(), LayerSpikes::default);
        }
        for (a, b) in self.layers.iter_mut().zip(&other.layers) {
            merge_channels(&mut a.input, &b.input);
            merge_channels(&mut a.output, &b.output);
            if a.experts.len() < b.experts.len() {
                a.experts.resize_with(b.experts.len(), ExpertSpikes::default);
            }
            for (x, y) in a.experts.iter_mut().zip(&b.experts) {
                x.merge(y);
            }
            if let Some(y) = &b.shared {
                a.shared.get_or_insert_with(ExpertSpikes::default).merge(y);
            }
            a.routed_tokens += b.routed_tokens;
            a.router_entropy_sum += b.router_entropy_sum;
        }
    }

    /// Forget everything seen.
    pub fn reset(&mut self) {
        for l in &mut self.layers {
            l.input.fill(ChannelMax::default());
            l.output.fill(ChannelMax::default());
            l.experts.clear();
            l.shared = None;
            l.routed_tokens = 0;
            l.router_entropy_sum = 0.0;
        }
    }
}
