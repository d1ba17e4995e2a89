//! The sparse MLP of a mixture-of-experts layer on the device (Mixtral, OLMoE, Qwen2-MoE,
//! Qwen3-MoE, DeepSeek-V2/V3), mirroring `model::arch::moe::sparse_mlp` and
//! `model::arch::deepseek::sparse_mlp`:
//!
//! ```text
//! z = m·W_routerᵀ                                   (device, [t, experts])
//! routes = moe::route(z) per token                  (softmax, top-k, renormalize;
//!                                                    DeepSeek: deepseek::route, its groups,
//!                                                    sigmoid scores and selection bias)
//! rows = each expert's tokens, experts ascending    (the dispatch)
//! xs = m[rows]                                      (gather)
//! per expert e with tokens: a = silu(xs·W_gateᵀ) ⊙ (xs·W_upᵀ)   (+ its input keys)
//!                           y_e = a·W_downᵀ                      (+ its output keys)
//! out[tok] = Σ_e w_e · y_e[tok]                     (experts ascending, from 0)
//! Qwen2-MoE: out += sigmoid(m·w_gateᵀ) · shared(m)  (+ the shared expert's keys)
//! DeepSeek:  out += shared(m)
//! ```
//!
//! Routing, two ways with the same results:
//! - **On the device** (`swk_moe_route`, kernels/route.cu; [`CudaModel::set_device_routing`])
//!   for passes of at most 16 tokens (detection prompts, decoding) of a resident model: one
//!   launch writes the dispatch (rows, slots, weights, and the grouped kernels' groups: the
//!   experts with rows, their weights' addresses and keys, padded with empty groups to
//!   `min(experts, t·k)`, a count the host knows without the routes) and adds the router
//!   counters to the pass's key buffer. Nothing stops the device between the layer's
//!   kernels, so such passes can be CUDA graphs.
//! - **On the host** otherwise: one small download of z (a synchronization) per sparse layer,
//!   routing as the CPU does, then one upload of the dispatch (and the grouped experts'
//!   addresses); the counters in [`MoeActs`]'s tally.
//!
//! When every expert has at most 16 rows, or at any row count with swk's own GEMM kernels,
//! the per-expert steps run for all experts at once: one launch each for gate and up
//! together, the activation, down and the output keys (`swk_gemv_grouped_*` for experts of
//! at most 16 rows, plus `swk_gemm_grouped_*` when some have more; `swk_act_mul_grouped`,
//! `swk_column_max_grouped`), in place of about 4 to 10 launches per expert;
//! [`CudaModel::set_grouped_experts`] turns it off (and routing on the device with it). With
//! cuBLAS, experts with more rows (prefill, perplexity windows) are multiplied one at a
//! time. The per-expert statistics and the router counters land in the same [`SpikeStats`]
//! fields as on the CPU.

use std::sync::Mutex;

use super::device::RowGroups;
use super::driver::{CudaDevice, CudaSlice};
use super::kernels::{self, Activation};
use super::linear::{Product, Scratch};
use super::model::{CudaModel, GemmEngine, WeightRef};
use crate::hooks::{ChannelMax, ExpertSpikes, LayerSpikes};
use crate::model::arch::{deepseek, moe};
use crate::model::config::MoeParams;
use crate::model::ModelConfig;
use crate::{Error, Result};

/// The grouped experts of a sparse layer, host side ([`CudaModel::grouped_plan`]).
struct GroupedExperts {
    /// The experts' gate, then up, then down weights' device addresses (`[3, experts]`).
    ptrs: Vec<u64>,
    /// The experts' first rows, row counts, input keys and output keys (`[4, experts]`).
    meta: Vec<u32>,
    /// The weights' dtype.
    dtype: super::WeightDtype,
    /// The smallest and largest row count.
    rows: (usize, usize),
    /// Whether the `mma` engine's grouped product takes them.
    mma: bool,
}

/// Grouped experts as their launches read them ([`CudaModel::experts_grouped`]).
struct GroupedLaunch {
    /// How many groups of rows, an expert each (the device router pads them with empty ones).
    count: usize,
    /// Device address of the weights' addresses, `[3, count]` (gate, up, down).
    ptrs: u64,
    /// Device address of the u32 metadata `[4, count]`: first rows, row counts, input keys,
    /// output keys.
    meta: u64,
    /// The weights' dtype.
    dtype: super::WeightDtype,
    /// Bounds of the row counts (smallest, largest).
    rows: (usize, usize),
    /// Whether the `mma` engine's grouped product takes them.
    mma: bool,
}

/// How a sparse layer's experts run: grouped, or one at a time as (expert, first row, rows).
enum Experts {
    Grouped(GroupedLaunch),
    OneByOne(Vec<(usize, usize, usize)>),
}

/// A sparse layer's routes as its launches read them: the device addresses of the
/// dispatch's arrays (see [`Dispatch`]) and how the experts run.
struct Routed {
    token: u64,
    position: u64,
    slot: u64,
    weight: u64,
    experts: Experts,
    /// The upload holding the host's dispatch, kept until the layer's launches are queued.
    _upload: Option<CudaSlice<u8>>,
}

/// Host arrays packed for one upload, each at an 8-byte aligned byte offset.
#[derive(Default)]
struct Packed {
    bytes: Vec<u8>,
}

impl Packed {
    /// Append `v`; returns its byte offset.
    fn push<T: bytemuck::Pod>(&mut self, v: &[T]) -> u64 {
        let at = self.bytes.len().next_multiple_of(8);
        self.bytes.resize(at, 0);
        self.bytes.extend_from_slice(bytemuck::cast_slice(v));
        at as u64
    }
}

/// Where each layer's spike keys lie in a pass's key buffer: the dense MLP's (or, in a sparse
/// layer, what the block writes) `[intermediate]` inputs then `[hidden]` outputs; in a sparse
/// layer then each expert's `[expert_intermediate]` inputs and `[hidden]` outputs, the
/// shared expert's `[shared_intermediate]` and `[hidden]`, and the device router's counter
/// words `[2 + 2·experts]` (route.cu's `tally`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct KeyLayout {
    /// Per layer, its first key.
    base: Vec<usize>,
    /// Keys in all.
    pub(crate) total: usize,
    i: usize,
    h: usize,
    /// (experts, expert width, shared width) of a mixture of experts.
    moe: Option<(usize, usize, Option<usize>)>,
    sparse: Vec<bool>,
}

impl KeyLayout {
    /// The layout of `c`'s layers.
    pub(crate) fn of(c: &ModelConfig) -> Self {
        let (i, h) = (c.intermediate_size, c.hidden_size);
        let moe = c.family.moe.as_ref();
        let sparse: Vec<bool> =
            (0..c.num_layers).map(|l| moe.is_some_and(|m| m.is_sparse(l))).collect();
        let per_sparse = moe.map_or(0, |m| {
            m.num_experts * (m.expert_intermediate + h)
                + m.shared_expert_intermediate.map_or(0, |si| si + h)
                + 2
                + 2 * m.num_experts
        });
        let mut base = Vec::with_capacity(c.num_layers);
        let mut total = 0;
        for &s in &sparse {
            base.push(total);
            total += i + h + if s { per_sparse } else { 0 };
        }
        let moe = moe.map(|m| (m.num_experts, m.expert_intermediate, m.shared_expert_intermediate));
        KeyLayout { base, total, i, h, moe, sparse }
    }

    /// Key indices of layer `l`'s dense down_proj input and output (a sparse layer's output is
    /// what the block writes).
    pub(crate) fn dense(&self, l: usize) -> (usize, usize) {
        (self.base[l], self.base[l] + self.i)
    }

    /// Whether layer `l` routes to experts.
    pub(crate) fn is_sparse(&self, l: usize) -> bool {
        self.sparse.get(l).copied().unwrap_or(false)
    }

    /// Key indices of expert `e`'s down_proj input and output in sparse layer `l`.
    fn expert(&self, l: usize, e: usize) -> (usize, usize) {
        let ei = self.moe.map_or(0, |m| m.1);
        let first = self.base[l] + self.i + self.h + e * (ei + self.h);
        (first, first + ei)
    }

    /// Key indices of the shared expert's down_proj input and output in sparse layer `l`.
    fn shared(&self, l: usize) -> (usize, usize) {
        let (ne, ei, si) = self.moe.map_or((0, 0, None), |m| m);
        let first = self.base[l] + self.i + self.h + ne * (ei + self.h);
        (first, first + si.unwrap_or(0))
    }

    /// Index of the first of sparse layer `l`'s router counter words (after its experts' and
    /// shared expert's keys).
    fn tally(&self, l: usize) -> usize {
        let (ne, ei, si) = self.moe.map_or((0, 0, None), |m| m);
        self.base[l] + self.i + self.h + ne * (ei + self.h) + si.map_or(0, |si| si + self.h)
    }

    /// Merge one pass's keys (`keys`, this layout, the device router's counters included) and
    /// the host router's tallies into `stats`.
    pub(crate) fn merge(&self, keys: &[u64], tally: &[LayerTally], stats: &mut [LayerSpikes]) {
        use rayon::prelude::*;
        let h = self.h;
        stats.par_iter_mut().enumerate().for_each(|(l, s)| {
            let (di, dout) = self.dense(l);
            kernels::merge_spike_keys(&mut s.input, &keys[di..dout]);
            kernels::merge_spike_keys(&mut s.output, &keys[dout..dout + h]);
            let (Some((ne, ei, si)), true) = (self.moe, self.sparse[l]) else { return };
            let mut t = tally.get(l).cloned().unwrap_or_default();
            let words = self.tally(l);
            t.absorb(&LayerTally::from_words(&keys[words..words + 2 + 2 * ne], ne));
            if t.routed_tokens == 0 {
                return;
            }
            if s.experts.len() != ne {
                s.experts = (0..ne).map(|_| empty_spikes(ei, h)).collect();
            }
            for (e, es) in s.experts.iter_mut().enumerate() {
                let (xi, yo) = self.expert(l, e);
                kernels::merge_spike_keys(&mut es.input, &keys[xi..yo]);
                kernels::merge_spike_keys(&mut es.output, &keys[yo..yo + h]);
                es.selected += t.selected[e];
                es.weight_sum += t.weight_sum[e];
            }
            if let Some(si) = si {
                let sh = s.shared.get_or_insert_with(|| empty_spikes(si, h));
                let (xi, yo) = self.shared(l);
                kernels::merge_spike_keys(&mut sh.input, &keys[xi..yo]);
                kernels::merge_spike_keys(&mut sh.output, &keys[yo..yo + h]);
                sh.selected += t.routed_tokens;
                sh.weight_sum += t.routed_tokens as f64;
            }
            s.routed_tokens += t.routed_tokens;
            s.router_entropy_sum += t.entropy_sum;
        });
    }
}

fn empty_spikes(inputs: usize, outputs: usize) -> ExpertSpikes {
    ExpertSpikes {
        input: vec![ChannelMax::default(); inputs],
        output: vec![ChannelMax::default(); outputs],
        ..Default::default()
    }
}

/// The host's counters of one sparse layer in one pass, as `moe::routed_experts` keeps them.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct LayerTally {
    /// Tokens routed.
    pub(crate) routed_tokens: u64,
    /// Sum of their router entropies (nats).
    pub(crate) entropy_sum: f64,
    /// Per expert, tokens routed to it.
    pub(crate) selected: Vec<u64>,
    /// Per expert, the sum of those tokens' routing weights (in token order).
    pub(crate) weight_sum: Vec<f64>,
}

impl LayerTally {
    /// Count one call's `routes` (dispatched as `d`) over `ne` experts, as
    /// `moe::routed_experts` keeps its counters.
    fn add(&mut self, routes: &[moe::Route], d: &Dispatch, ne: usize) {
        if self.selected.len() != ne {
            (self.selected, self.weight_sum) = (vec![0; ne], vec![0.0; ne]);
        }
        self.routed_tokens += routes.len() as u64;
        self.entropy_sum += routes.iter().map(|r| r.entropy).sum::<f64>();
        for &(e, r0, n) in &d.experts {
            self.selected[e] += n as u64;
            self.weight_sum[e] += d.row_weight[r0..r0 + n].iter().map(|&w| w as f64).sum::<f64>();
        }
    }

    /// The device router's counter words of one layer over `ne` experts (route.cu's `tally`).
    fn from_words(w: &[u64], ne: usize) -> Self {
        LayerTally {
            routed_tokens: w[0],
            entropy_sum: f64::from_bits(w[1]),
            selected: w[2..2 + ne].to_vec(),
            weight_sum: w[2 + ne..2 + 2 * ne].iter().map(|&b| f64::from_bits(b)).collect(),
        }
    }

    /// Add `o`'s counters (none when it routed no token).
    fn absorb(&mut self, o: &LayerTally) {
        if o.routed_tokens == 0 {
            return;
        }
        if self.routed_tokens == 0 {
            *self = o.clone();
            return;
        }
        self.routed_tokens += o.routed_tokens;
        self.entropy_sum += o.entropy_sum;
        self.selected.iter_mut().zip(&o.selected).for_each(|(a, b)| *a += b);
        self.weight_sum.iter_mut().zip(&o.weight_sum).for_each(|(a, b)| *a += b);
    }
}

/// Where `swk_moe_route`'s arrays lie (route.cu) for `t` tokens, `ne` experts, top-`k` and
/// `n_group` expert groups.
#[derive(Debug, Clone, Copy, PartialEq)]
struct RouteLayout {
    t: usize,
    ne: usize,
    k: usize,
    n_group: usize,
}

impl RouteLayout {
    /// The grouped expert kernels' groups: at most this many experts have rows.
    fn groups(&self) -> usize {
        self.ne.min(self.t * self.k)
    }

    /// u32 words of the dispatch before the groups' weight addresses: token, position, slot
    /// and weight `[t·k]` each, then the groups' first rows, row counts, input keys and output
    /// keys `[groups]` each; rounded up to 8 bytes.
    fn meta_end(&self) -> usize {
        (4 * self.t * self.k + 4 * self.groups()).next_multiple_of(2)
    }

    /// u32 words of the dispatch: [`Self::meta_end`], then the groups' weight addresses
    /// `[3, groups]` (u64).
    fn out_words(&self) -> usize {
        self.meta_end() + 6 * self.groups()
    }

    /// Byte offset of the dispatch's array `i` (0 token, 1 position, 2 slot, 3 weight; 4 the
    /// groups' metadata).
    fn at(&self, i: usize) -> u64 {
        (i * self.t * self.k * 4) as u64
    }

    /// Byte offset of the groups' weight addresses.
    fn weights(&self) -> u64 {
        (self.meta_end() * 4) as u64
    }

    /// 8-byte words of the kernel's work arrays: per token its entropy (f64); per token and
    /// expert an entropy term (f64), a score and a choice value (f32); per token and group a
    /// group score (f32); per token its k picks (u32) and weights (f32); per expert its rows
    /// and first row (u32).
    fn work_words(&self) -> usize {
        let (t, ne, k, g) = (self.t, self.ne, self.k, self.n_group);
        (8 * t + 8 * t * ne + 8 * t * ne + 4 * t * g + 8 * t * k + 8 * ne).div_ceil(8)
    }
}

/// `c`'s routing rule as `swk_moe_route` takes it: `moe::route`'s, or DeepSeek's.
fn route_rule(c: &ModelConfig, p: &MoeParams) -> kernels::RouteRule {
    use crate::model::config::GroupScore;
    use kernels::{RouteRule, RouteScoring};
    match &c.family.deepseek {
        Some(d) => RouteRule {
            scoring: if d.sigmoid {
                RouteScoring::DeepseekSigmoid
            } else {
                RouteScoring::DeepseekSoftmax
            },
            n_group: d.n_group.max(1),
            topk_group: d.topk_group,
            group_score: d.group_score,
            renorm: p.norm_topk_prob,
            eps: 1e-20,
            scale: d.routed_scaling_factor as f32,
        },
        None => RouteRule {
            scoring: RouteScoring::Softmax,
            n_group: 1,
            topk_group: 1,
            group_score: GroupScore::None,
            renorm: p.norm_topk_prob,
            eps: 0.0,
            scale: 1.0,
        },
    }
}

/// What routing on the device needs of a resident mixture of experts, built once at upload:
/// per sparse layer its experts' gate, up and down weights' device addresses (`[3, experts]`,
/// what the grouped products read) and V3's selection bias.
pub(crate) struct DeviceRouter {
    layers: std::collections::BTreeMap<usize, (CudaSlice<u64>, Option<CudaSlice<f32>>)>,
    rule: kernels::RouteRule,
    dtype: super::WeightDtype,
    /// Whether every expert weight is 16-byte aligned (the `mma` grouped product's need).
    aligned: bool,
}

impl DeviceRouter {
    /// `m`'s router on the device. None for a dense or streamed model (a streamed layer's
    /// weights move into the slot each pass), or when its experts' weights differ in dtype.
    pub(crate) fn build(m: &CudaModel) -> Result<Option<Self>> {
        let c = &m.config;
        let Some(p) = c.family.moe.as_ref() else { return Ok(None) };
        if m.is_streamed() {
            return Ok(None);
        }
        let ne = p.num_experts;
        let (mut layers, mut dtype, mut aligned) = (std::collections::BTreeMap::new(), None, true);
        for l in (0..c.num_layers).filter(|&l| p.is_sparse(l)) {
            let mut ptrs = vec![0u64; 3 * ne];
            for e in 0..ne {
                let w = |suffix: &str| m.layer_weight(l, suffix, None);
                for (j, wr) in m.expert_weights(&w, e)?.iter().enumerate() {
                    if *dtype.get_or_insert(wr.dtype) != wr.dtype {
                        return Ok(None);
                    }
                    aligned &= wr.ptr % 16 == 0;
                    ptrs[j * ne + e] = wr.ptr;
                }
            }
            let bias = match m.router_bias.get(&l) {
                Some(b) => Some(m.dev.upload(b)?),
                None => None,
            };
            layers.insert(l, (m.dev.upload(&ptrs)?, bias));
        }
        let dtype = dtype.unwrap_or(super::WeightDtype::F32);
        Ok(Some(DeviceRouter { layers, rule: route_rule(c, p), dtype, aligned }))
    }
}

/// The activation buffers of the sparse layers for up to `t` tokens.
pub(crate) struct MoeActs {
    /// Router logits `[t, experts]`.
    router: CudaSlice<f32>,
    /// Gathered expert inputs `[t·k, hidden]`.
    xs: CudaSlice<f32>,
    /// Expert gate then up `[2, t·k, expert_intermediate]` (one buffer: the grouped
    /// products write both in one launch).
    gate_up: CudaSlice<f32>,
    /// Expert activation `[t·k, expert_intermediate]`.
    act: CudaSlice<f32>,
    /// Expert outputs `[t·k, hidden]`, before their routing weights.
    ys: CudaSlice<f32>,
    /// What the block writes `[t, hidden]`.
    pub(crate) out: CudaSlice<f32>,
    /// The shared expert's gate, up and activation `[t, shared]`, output `[t, hidden]` and
    /// gate logit `[t]` (Qwen2-MoE).
    shared: Option<[CudaSlice<f32>; 5]>,
    /// Per layer, the host router's counters of the pass (when statistics are gathered).
    pub(crate) tally: Option<Mutex<Vec<LayerTally>>>,
    /// The device router's dispatch (u32 words) and work arrays, for passes of at most
    /// [`kernels::GEMV_MAX_ROWS`] tokens.
    route: Option<(CudaSlice<u32>, CudaSlice<u64>)>,
}

impl MoeActs {
    /// Device address of the experts' gate products.
    fn gate(&self, dev: &CudaDevice) -> u64 {
        dev.ptr(&self.gate_up)
    }

    /// Device address of the experts' up products (after the gate products).
    fn up(&self, dev: &CudaDevice) -> u64 {
        self.gate(dev) + (self.gate_up.len() / 2 * 4) as u64
    }

    /// Buffers for a mixture of experts with `m`'s shapes, up to `t` tokens; router counters
    /// when `stats`.
    pub(crate) fn alloc(
        dev: &CudaDevice,
        c: &ModelConfig,
        m: &MoeParams,
        t: usize,
        stats: bool,
    ) -> Result<Self> {
        let (h, ei, rows) = (c.hidden_size, m.expert_intermediate, t * m.top_k);
        let shared = match m.shared_expert_intermediate {
            Some(si) => Some([
                dev.alloc::<f32>(t * si)?,
                dev.alloc::<f32>(t * si)?,
                dev.alloc::<f32>(t * si)?,
                dev.alloc::<f32>(t * h)?,
                dev.alloc::<f32>(t)?,
            ]),
            None => None,
        };
        let route = if t <= kernels::GEMV_MAX_ROWS {
            let n_group = route_rule(c, m).n_group;
            let at = RouteLayout { t, ne: m.num_experts, k: m.top_k, n_group };
            Some((dev.alloc::<u32>(at.out_words())?, dev.alloc::<u64>(at.work_words())?))
        } else {
            None
        };
        Ok(MoeActs {
            router: dev.alloc::<f32>(t * m.num_experts)?,
            xs: dev.alloc::<f32>(rows * h)?,
            gate_up: dev.alloc::<f32>(2 * rows * ei)?,
            act: dev.alloc::<f32>(rows * ei)?,
            ys: dev.alloc::<f32>(rows * h)?,
            out: dev.alloc::<f32>(t * h)?,
            shared,
            tally: stats.then(|| Mutex::new(vec![LayerTally::default(); c.num_layers])),
            route,
        })
    }
}

/// One pass's routing of a sparse layer, laid out for the device.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Dispatch {
    /// Per gathered row, its token (rows grouped by expert, experts ascending, tokens
    /// ascending within one).
    pub(crate) token: Vec<u32>,
    /// Per gathered row, its position (`pos0 + token`).
    pub(crate) position: Vec<u32>,
    /// Per token, its `k` rows by ascending expert (`[t, k]`).
    pub(crate) slot: Vec<u32>,
    /// The routing weights of `slot`.
    pub(crate) weight: Vec<f32>,
    /// Per gathered row, its routing weight.
    pub(crate) row_weight: Vec<f32>,
    /// (expert, first row, rows) of each expert with tokens.
    pub(crate) experts: Vec<(usize, usize, usize)>,
}

impl Dispatch {
    /// Lay out `routes` (one per token, `k` experts each, first token at `pos0`) over `ne`
    /// experts. Errors when a route names an expert out of range or a count other than `k`.
    pub(crate) fn new(routes: &[moe::Route], ne: usize, k: usize, pos0: usize) -> Result<Self> {
        let t = routes.len();
        let mut by_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); ne];
        for (tok, r) in routes.iter().enumerate() {
            if r.experts.len() != k || r.experts.iter().any(|&e| e >= ne) {
                return Err(Error::Backend(format!(
                    "token {tok} routed to {:?} (top-{k} of {ne} experts)",
                    r.experts
                )));
            }
            for (&e, &w) in r.experts.iter().zip(&r.weights) {
                by_expert[e].push((tok, w));
            }
        }
        let mut d = Dispatch {
            token: Vec::with_capacity(t * k),
            position: Vec::with_capacity(t * k),
            slot: vec![0; t * k],
            weight: vec![0.0; t * k],
            row_weight: Vec::with_capacity(t * k),
            experts: Vec::new(),
        };
        let mut filled = vec![0usize; t];
        for (e, picks) in by_expert.iter().enumerate() {
            if picks.is_empty() {
                continue;
            }
            d.experts.push((e, d.token.len(), picks.len()));
            for &(tok, w) in picks {
                let s = tok * k + filled[tok];
                filled[tok] += 1;
                d.slot[s] = d.token.len() as u32;
                d.weight[s] = w;
                d.token.push(tok as u32);
                d.row_weight.push(w);
                d.position.push((pos0 + tok) as u32);
            }
        }
        Ok(d)
    }
}

impl CudaModel {
    /// Run the routed experts of a sparse layer together (one launch per step for the whole
    /// layer; on by default) when each has at most [`kernels::GEMV_MAX_ROWS`] rows (detection
    /// prompts, decoding), or at any row count with [`GemmEngine::Kernels`]; or always one
    /// expert at a time (`false`). Both give the same values within float rounding
    /// (bit-identical with [`GemmEngine::Kernels`]).
    pub fn set_grouped_experts(&mut self, on: bool) {
        self.grouped_experts = on;
        self.forget_graphs();
    }

    /// How many sparse layers, over all passes since the upload, ran their experts grouped
    /// (see [`Self::set_grouped_experts`]): which path a timing measured.
    pub fn grouped_expert_layers(&self) -> u64 {
        self.grouped_layers.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Route a sparse layer on the device when every expert gets at most
    /// [`kernels::GEMV_MAX_ROWS`] rows (passes of at most that many tokens; on by default;
    /// see route.cu), for a resident model with its experts grouped
    /// ([`Self::set_grouped_experts`]): no download of the router logits, no synchronization
    /// and no upload per sparse layer, so CUDA graphs can hold such passes. Off, or for longer
    /// passes: the host routes from the downloaded logits, as the CPU does. Both give the same
    /// routes, values and counters (bit for bit on the emulator; a GPU's `expf` may differ
    /// from the host's in the last bit).
    pub fn set_device_routing(&mut self, on: bool) {
        self.device_routing = on;
        self.forget_graphs();
    }

    /// How many sparse layers, over all passes since the upload, routed on the device (see
    /// [`Self::set_device_routing`]; a replayed graph's layers are counted once, at capture).
    pub fn device_routed_layers(&self) -> u64 {
        self.device_routed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the sparse layers of a pass of `t` tokens route on the device (see
    /// [`Self::set_device_routing`]).
    pub(crate) fn routes_on_device(&self, t: usize) -> bool {
        self.device_routing
            && self.grouped_experts
            && self.device_router.is_some()
            && (1..=kernels::GEMV_MAX_ROWS).contains(&t)
    }

    /// Expert `e`'s gate, up and down weights of the layer `w` reads, their shapes checked.
    pub(crate) fn expert_weights(
        &self,
        w: &dyn Fn(&str) -> Result<WeightRef>,
        e: usize,
    ) -> Result<[WeightRef; 3]> {
        let (h, ei) = (self.config.hidden_size, moe::params(&self.config)?.expert_intermediate);
        let get = |what: &str, want: [usize; 2]| {
            let wr = w(&format!("mlp.experts.{e}.{what}.weight"))?;
            if wr.shape != want {
                return Err(Error::tensor(
                    &wr.name,
                    format!("expected shape {want:?} on the device, found {:?}", wr.shape),
                ));
            }
            Ok(wr)
        };
        Ok([get("gate_proj", [ei, h])?, get("up_proj", [ei, h])?, get("down_proj", [h, ei])?])
    }

    /// Whether grouped experts' products run on the tensor cores: the `mma` engine, 2-byte
    /// weights at 16-byte aligned addresses, widths multiples of 8, at most 16 rows each
    /// (`small`).
    fn grouped_mma(&self, dtype: super::WeightDtype, aligned: bool, small: bool) -> Result<bool> {
        let (h, ei) = (self.config.hidden_size, moe::params(&self.config)?.expert_intermediate);
        Ok(self.gemm == GemmEngine::Mma
            && dtype.is_half()
            && small
            && h % 8 == 0
            && ei % 8 == 0
            && aligned)
    }

    /// The host side of running the routed experts of sparse layer `l` together (see
    /// [`Self::experts_grouped`]): each expert's weights' addresses and its rows' metadata,
    /// when all their weights share one dtype and either every expert of `d` has at most
    /// [`kernels::GEMV_MAX_ROWS`] rows or the engine is swk's kernels (which group any row
    /// count; cuBLAS multiplies longer prefills one expert at a time). None otherwise.
    fn grouped_plan(
        &self,
        l: usize,
        w: &dyn Fn(&str) -> Result<WeightRef>,
        d: &Dispatch,
    ) -> Result<Option<GroupedExperts>> {
        let min_rows = d.experts.iter().map(|&(_, _, n)| n).min().unwrap_or(0);
        let max_rows = d.experts.iter().map(|&(_, _, n)| n).max().unwrap_or(0);
        let small = max_rows <= kernels::GEMV_MAX_ROWS;
        if min_rows == 0 || !(small || self.gemm == GemmEngine::Kernels) {
            return Ok(None);
        }
        // Per expert: its gate, up and down weights' addresses; its rows; its keys.
        let g = d.experts.len();
        let mut ptrs = vec![0u64; 3 * g];
        let mut meta = vec![0u32; 4 * g];
        let mut dtype = None;
        for (i, &(e, r0, n)) in d.experts.iter().enumerate() {
            for (j, wr) in self.expert_weights(w, e)?.iter().enumerate() {
                if *dtype.get_or_insert(wr.dtype) != wr.dtype {
                    return Ok(None);
                }
                ptrs[j * g + i] = wr.ptr;
            }
            let (ki, ko) = self.key_layout.expert(l, e);
            meta[i] = r0 as u32;
            meta[g + i] = n as u32;
            (meta[2 * g + i], meta[3 * g + i]) = (key_offset(ki)?, key_offset(ko)?);
        }
        let dtype = dtype.unwrap_or(super::WeightDtype::F32);
        let aligned = ptrs.iter().all(|p| p % 16 == 0);
        let mma = self.grouped_mma(dtype, aligned, small)?;
        Ok(Some(GroupedExperts { ptrs, meta, dtype, rows: (min_rows, max_rows), mma }))
    }

    /// The routed experts of a sparse layer together, as `g` lays them out (see moe.cu; with
    /// the `mma` engine, mma.cu's grouped product): one launch each for gate and up together,
    /// the activation (with its input keys), down and the output keys; with the `mma` engine
    /// and fused launches ([`CudaModel::set_fused_launches`]) the down product makes the
    /// activation and its keys itself. `pos`: the device address of the rows' positions.
    fn experts_grouped(&self, g: &GroupedLaunch, ma: &MoeActs, pos: u64, keys: u64) -> Result<()> {
        let dev = &self.dev;
        let (h, ei) = (self.config.hidden_size, moe::params(&self.config)?.expert_intermediate);
        let (n, mp, pp, dtype) = (g.count as u64, g.meta, g.ptrs, g.dtype);
        let (min_rows, max_rows) = g.rows;
        let groups = RowGroups { row0: mp, rows: mp + 4 * n, count: g.count, min_rows, max_rows };
        let (key_in, key_out) = ((keys, mp + 8 * n), (keys, mp + 12 * n));
        let (xs, ys) = (dev.ptr(&ma.xs), dev.ptr(&ma.ys));
        let (gate, up, act) = (ma.gate(dev), ma.up(dev), dev.ptr(&ma.act));
        let product = |x: u64, w: u64, y: (u64, u64), n: usize, k: usize| {
            if g.mma {
                dev.gemm_mma_grouped(x, (w, dtype), y, &groups, n, k)
            } else {
                dev.gemm_grouped(x, w, dtype, y, &groups, n, k)
            }
        };
        // Gate and up in one launch (their weights' addresses lie side by side), then down.
        product(xs, pp, (gate, (up - gate) / 4), ei, h)?;
        let down = (pp + 16 * n, dtype);
        if g.mma && self.fused_launches {
            // The tensor cores' down product makes the activation as it stages it.
            let acts = (gate, up, Activation::Silu);
            dev.gemm_mma_act_grouped(acts, down, ys, &groups, (h, ei), pos, key_in)?;
        } else {
            dev.act_mul_grouped(gate, up, act, &groups, ei, pos, key_in, Activation::Silu)?;
            product(act, down.0, (ys, 0), h, ei)?;
        }
        if keys != 0 {
            dev.column_max_grouped(ys, &groups, h, pos, key_out)?;
        }
        self.grouped_layers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Route sparse layer `l`'s `t` tokens (first at `pos0`) on the device from the router
    /// logits in `ma`: one launch; the router counters into the pass's key buffer at `keys`
    /// (0: none). The experts then run grouped: the groups are the experts with rows, then
    /// empty ones up to `min(experts, t·k)`, which the host can size without the routes.
    fn route_on_device(
        &self,
        l: usize,
        r: &DeviceRouter,
        (out, work): &(CudaSlice<u32>, CudaSlice<u64>),
        (t, pos0): (usize, usize),
        ma: &MoeActs,
        keys: u64,
    ) -> Result<Routed> {
        let dev = &self.dev;
        let p = moe::params(&self.config)?;
        let (h, ei, ne, k) =
            (self.config.hidden_size, p.expert_intermediate, p.num_experts, p.top_k);
        let (ptrs, bias) = r
            .layers
            .get(&l)
            .ok_or_else(|| Error::Backend(format!("layer {l} has no router on the device")))?;
        let at = RouteLayout { t, ne, k, n_group: r.rule.n_group };
        // The kernel adds e·stride to the first expert's keys in u32: the last must fit.
        let first = key_offset(self.key_layout.expert(l, 0).0)?;
        key_offset(self.key_layout.expert(l, ne.saturating_sub(1)).1)?;
        let (stride, width) = (key_offset(ei + h)?, key_offset(ei)?);
        let tally = if keys == 0 { 0 } else { keys + (self.key_layout.tally(l) * 8) as u64 };
        let (o, bias) = (dev.ptr(out), bias.as_ref().map_or(0, |b| dev.ptr(b)));
        let bufs = (dev.ptr(ptrs), dev.ptr(work), o, tally);
        dev.moe_route(
            dev.ptr(&ma.router),
            bias,
            (t, ne, k, pos0),
            &r.rule,
            (first, stride, width),
            bufs,
        )?;
        self.device_routed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let grouped = GroupedLaunch {
            count: at.groups(),
            ptrs: o + at.weights(),
            meta: o + at.at(4),
            dtype: r.dtype,
            rows: (0, t),
            mma: self.grouped_mma(r.dtype, r.aligned, true)?,
        };
        Ok(Routed {
            token: o + at.at(0),
            position: o + at.at(1),
            slot: o + at.at(2),
            weight: o + at.at(3),
            experts: Experts::Grouped(grouped),
            _upload: None,
        })
    }

    /// Route sparse layer `l`'s `t` tokens (first at `pos0`) on the host, as the CPU does,
    /// from the router logits in `ma` (downloaded: a synchronization), and upload the
    /// dispatch (and the grouped experts' plan) in one copy; the router counters into
    /// `ma.tally`.
    fn route_on_host(
        &self,
        l: usize,
        w: &dyn Fn(&str) -> Result<WeightRef>,
        (t, pos0): (usize, usize),
        ma: &MoeActs,
    ) -> Result<Routed> {
        let c = &self.config;
        let p = moe::params(c)?;
        let dev = &self.dev;
        let (ne, k) = (p.num_experts, p.top_k);
        let z = dev.download(&ma.router, 0, t * ne)?;
        let routes = host_routes(c, p, &z, self.router_bias.get(&l).map(Vec::as_slice));
        let d = Dispatch::new(&routes, ne, k, pos0)?;
        let grouped = if self.grouped_experts { self.grouped_plan(l, w, &d)? } else { None };
        // One upload: the dispatch's indices and weights, and the grouped experts' plan.
        let mut up = Packed::default();
        let (token, position) = (up.push(&d.token), up.push(&d.position));
        let (slot, weight) = (up.push(&d.slot), up.push(&d.weight));
        let grouped = grouped.map(|g| (up.push(&g.ptrs), up.push(&g.meta), g));
        let packed = dev.upload(&up.bytes)?;
        let base = dev.ptr(&packed);
        let experts = match grouped {
            Some((pp, mp, g)) => Experts::Grouped(GroupedLaunch {
                count: g.ptrs.len() / 3,
                ptrs: base + pp,
                meta: base + mp,
                dtype: g.dtype,
                rows: g.rows,
                mma: g.mma,
            }),
            None => Experts::OneByOne(d.experts.clone()),
        };

        if let Some(tally) = &ma.tally {
            tally.lock().unwrap_or_else(|p| p.into_inner())[l].add(&routes, &d, ne);
        }
        Ok(Routed {
            token: base + token,
            position: base + position,
            slot: base + slot,
            weight: base + weight,
            experts,
            _upload: Some(packed),
        })
    }

    /// Layer `l`'s sparse MLP on `m` (`[t, hidden]`, first token at `pos0`) into `ma.out`,
    /// weights from `w(suffix)`; spike keys into the pass's key buffer at `keys` (0: none), laid
    /// out per [`KeyLayout`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn sparse_mlp(
        &self,
        l: usize,
        w: &dyn Fn(&str) -> Result<WeightRef>,
        m: u64,
        (t, pos0): (usize, usize),
        ma: &MoeActs,
        keys: u64,
        sc: &mut Scratch,
    ) -> Result<()> {
        let c = &self.config;
        let p = moe::params(c)?;
        let dev = &self.dev;
        let (h, ei, ne, k) = (c.hidden_size, p.expert_intermediate, p.num_experts, p.top_k);
        let f =
            |b: &CudaSlice<f32>, row: usize, width: usize| dev.ptr(b) + (row * width * 4) as u64;
        let key = |i: usize| if keys == 0 { 0 } else { keys + (i * 8) as u64 };

        // The router's logits, then the routes: on the device when it can (no
        // synchronization), else on the host.
        self.linear(m, &w("mlp.gate.weight")?, dev.ptr(&ma.router), t, h, ne, sc)?;
        let routed = match (&self.device_router, &ma.route) {
            (Some(r), Some(bufs)) if self.routes_on_device(t) => {
                self.route_on_device(l, r, bufs, (t, pos0), ma, keys)?
            }
            _ => self.route_on_host(l, w, (t, pos0), ma)?,
        };

        // Each expert on its tokens' rows: all at once when each has few rows, else one by one.
        dev.embed(m, super::WeightDtype::F32, routed.token, dev.ptr(&ma.xs), t * k, h, 1.0)?;
        match &routed.experts {
            Experts::Grouped(g) => self.experts_grouped(g, ma, routed.position, keys)?,
            Experts::OneByOne(list) => {
                for &(e, r0, n) in list {
                    let wt = |what: &str| w(&format!("mlp.experts.{e}.{what}.weight"));
                    let at_row = (r0 * ei * 4) as u64;
                    let (g, u) = (ma.gate(dev) + at_row, ma.up(dev) + at_row);
                    let a = f(&ma.act, r0, ei);
                    let (xs, ys) = (f(&ma.xs, r0, h), f(&ma.ys, r0, h));
                    let at = (0, routed.position + (r0 * 4) as u64);
                    let (ki, ko) = self.key_layout.expert(l, e);
                    let gu = [(wt("gate_proj")?, g, ei), (wt("up_proj")?, u, ei)];
                    self.linears(xs, &gu, n, h, sc)?;
                    dev.act_mul(
                        Some(Product::Whole(g)),
                        Product::Whole(u),
                        (a, 0),
                        n,
                        ei,
                        at,
                        key(ki),
                        Activation::Silu,
                    )?;
                    self.linear(a, &wt("down_proj")?, ys, n, ei, h, sc)?;
                    if keys != 0 {
                        dev.column_max(ys, n, h, at, key(ko))?;
                    }
                }
            }
        }
        let out = dev.ptr(&ma.out);
        dev.moe_combine(dev.ptr(&ma.ys), routed.slot, routed.weight, out, t, k, h)?;

        // The shared expert on every token: DeepSeek's added as it is, Qwen2-MoE's gated by
        // sigmoid(m·w_gateᵀ).
        if let (Some(si), Some([g, u, a, y, z])) = (p.shared_expert_intermediate, &ma.shared) {
            let ds = c.architecture.is_deepseek();
            let part = if ds { "shared_experts" } else { "shared_expert" };
            let wt = |what: &str| w(&format!("mlp.{part}.{what}.weight"));
            let (g, u, a, y, z) = (dev.ptr(g), dev.ptr(u), dev.ptr(a), dev.ptr(y), dev.ptr(z));
            let (ki, ko) = self.key_layout.shared(l);
            self.linears(m, &[(wt("gate_proj")?, g, si), (wt("up_proj")?, u, si)], t, h, sc)?;
            dev.act_mul(
                Some(Product::Whole(g)),
                Product::Whole(u),
                (a, 0),
                t,
                si,
                (pos0, 0),
                key(ki),
                Activation::Silu,
            )?;
            self.linear(a, &wt("down_proj")?, y, t, si, h, sc)?;
            if keys != 0 {
                dev.column_max(y, t, h, (pos0, 0), key(ko))?;
            }
            if ds {
                dev.add_residual(out, Product::Whole(y), t, h, pos0, 0)?;
            } else {
                self.linear(m, &w("mlp.shared_expert_gate.weight")?, z, t, h, 1, sc)?;
                dev.sigmoid_gate_add(out, y, z, t, h)?;
            }
        }
        Ok(())
    }
}

/// Each token's route from router logits `z` (`[t, experts]`), as the CPU routes (`bias`:
/// DeepSeek-V3's selection bias).
fn host_routes(c: &ModelConfig, p: &MoeParams, z: &[f32], bias: Option<&[f32]>) -> Vec<moe::Route> {
    let ne = p.num_experts;
    match &c.family.deepseek {
        Some(ds) => z.chunks(ne).map(|z| deepseek::route(z, bias, ds, p)).collect(),
        None => z.chunks(ne).map(|z| moe::route(z, p.top_k, p.norm_topk_prob)).collect(),
    }
}

/// A spike key's index as the u32 offset the grouped kernels take.
fn key_offset(k: usize) -> Result<u32> {
    u32::try_from(k).map_err(|_| Error::Backend(format!("spike key {k} past u32")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(experts: &[usize], weights: &[f32]) -> moe::Route {
        moe::Route { experts: experts.to_vec(), weights: weights.to_vec(), entropy: 0.0 }
    }

    #[test]
    fn dispatch_groups_rows_by_expert_and_keeps_each_tokens_experts_ascending() {
        // Token 0 → experts 2, 0; token 1 → 0, 1; token 2 → 2, 1.
        let routes =
            [route(&[2, 0], &[0.7, 0.3]), route(&[0, 1], &[0.6, 0.4]), route(&[2, 1], &[0.5, 0.5])];
        let d = Dispatch::new(&routes, 4, 2, 10).unwrap();
        assert_eq!(d.token, vec![0, 1, 1, 2, 0, 2]);
        assert_eq!(d.position, vec![10, 11, 11, 12, 10, 12]);
        assert_eq!(d.experts, vec![(0, 0, 2), (1, 2, 2), (2, 4, 2)]);
        // Token 0's rows: expert 0 (row 0, weight 0.3), then expert 2 (row 4, weight 0.7).
        assert_eq!(d.slot, vec![0, 4, 1, 2, 3, 5]);
        assert_eq!(d.weight, vec![0.3, 0.7, 0.6, 0.4, 0.5, 0.5]);
        assert_eq!(d.row_weight, vec![0.3, 0.6, 0.4, 0.5, 0.7, 0.5]);
        assert!(Dispatch::new(&[route(&[4, 0], &[0.5, 0.5])], 4, 2, 0).is_err());
        assert!(Dispatch::new(&[route(&[1], &[1.0])], 4, 2, 0).is_err());
    }

    /// Roughly normal values (a sum of four uniforms) times `scale`, from an xorshift seed.
    fn logits(mut seed: u64, n: usize, scale: f32) -> Vec<f32> {
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        (0..n).map(|_| scale * (next() + next() + next() + next())).collect()
    }

    /// `swk_moe_route` against the host's routes and `Dispatch::new` for `c`'s rule: `t`
    /// tokens of random logits, token 0 all ties, token 1 in tied pairs and token 2 with
    /// every score but one 0 (when `t` > 2); two calls into
    /// one tally, then one without. Bit for bit on the emulator; on a GPU (whose `expf` and
    /// `log` may round differently) the same choices and rows, weights and sums within 1e-6.
    fn router_case(c: &ModelConfig, bias: Option<&[f32]>, t: usize, seed: u64) {
        use super::super::driver::CudaDevice;
        let dev = CudaDevice::new(0).unwrap();
        let p = c.family.moe.as_ref().unwrap();
        let (ne, k, pos0) = (p.num_experts, p.top_k, 7);
        let rule = route_rule(c, p);
        let at = RouteLayout { t, ne, k, n_group: rule.n_group };
        let (first, stride, width) = (1000u32, 37u32, 11u32);
        // The layer's table of weight addresses (the kernel copies them into the groups).
        let table: Vec<u64> = (0..3 * ne as u64).map(|i| 0x1000 + 16 * i).collect();
        let table_d = dev.upload(&table).unwrap();
        let work = dev.alloc::<u64>(at.work_words()).unwrap();
        let out = dev.upload(&vec![u32::MAX; at.out_words()]).unwrap();
        let tally = dev.zeros::<u64>(2 + 2 * ne).unwrap();
        let bias_d = bias.map(|b| dev.upload(b).unwrap());
        let exact = super::super::EMULATED;
        let close = |a: f64, b: f64| {
            if exact {
                a.to_bits() == b.to_bits()
            } else {
                (a - b).abs() <= 1e-6 * b.abs().max(1e-30)
            }
        };
        let mut want = LayerTally::default();
        for call in 0..3u64 {
            let at_ = format!("{:?} t {t} call {call}", rule);
            let mut z = logits(seed + call, t * ne, 2.0);
            z[..ne].fill(0.5);
            if t > 2 {
                (0..ne).for_each(|e| z[ne + e] = (e / 2) as f32 * 0.25);
                // Token 2: one expert takes all; the others' scores are 0 (no entropy terms).
                (0..ne).for_each(|e| z[2 * ne + e] = if e == 3 { 200.0 } else { -200.0 });
            }
            let zd = dev.upload(&z).unwrap();
            let tp = if call < 2 { dev.ptr(&tally) } else { 0 };
            let bufs = (dev.ptr(&table_d), dev.ptr(&work), dev.ptr(&out), tp);
            let bp = bias_d.as_ref().map_or(0, |b| dev.ptr(b));
            dev.moe_route(dev.ptr(&zd), bp, (t, ne, k, pos0), &rule, (first, stride, width), bufs)
                .unwrap();
            let got = dev.download(&out, 0, at.out_words()).unwrap();
            let routes = host_routes(c, p, &z, bias);
            let d = Dispatch::new(&routes, ne, k, pos0).unwrap();
            if call < 2 {
                want.add(&routes, &d, ne);
            }
            let tk = t * k;
            assert_eq!(got[..tk], d.token, "{at_}: tokens");
            assert_eq!(got[tk..2 * tk], d.position, "{at_}: positions");
            assert_eq!(got[2 * tk..3 * tk], d.slot, "{at_}: slots");
            for (g, w) in got[3 * tk..4 * tk].iter().zip(&d.weight) {
                assert!(close(f32::from_bits(*g) as f64, *w as f64), "{at_}: weight {g} vs {w}");
            }
            // The groups: the experts with rows (ascending), then empty ones.
            let g = at.groups();
            assert_eq!(g, ne.min(t * k));
            let meta = &got[4 * tk..4 * tk + 4 * g];
            let ptrs: Vec<u64> = got[at.meta_end()..at.out_words()]
                .chunks(2)
                .map(|w| w[0] as u64 | (w[1] as u64) << 32)
                .collect();
            for i in 0..g {
                let (row0, rows, ki, ko, w) = match d.experts.get(i) {
                    Some(&(e, r0, n)) => {
                        let ki = first + e as u32 * stride;
                        let w = [table[e], table[ne + e], table[2 * ne + e]];
                        (r0 as u32, n as u32, ki, ki + width, w)
                    }
                    None => ((t * k) as u32, 0, 0, 0, [0; 3]),
                };
                let got = (meta[i], meta[g + i], meta[2 * g + i], meta[3 * g + i]);
                assert_eq!(got, (row0, rows, ki, ko), "{at_}: group {i}");
                assert_eq!([ptrs[i], ptrs[g + i], ptrs[2 * g + i]], w, "{at_}: group {i} weights");
            }
            let words = dev.download(&tally, 0, 2 + 2 * ne).unwrap();
            let got = LayerTally::from_words(&words, ne);
            assert_eq!(got.routed_tokens, want.routed_tokens, "{at_}: tokens routed");
            assert_eq!(got.selected, want.selected, "{at_}: tokens per expert");
            assert!(close(got.entropy_sum, want.entropy_sum), "{at_}: entropy");
            for (a, b) in got.weight_sum.iter().zip(&want.weight_sum) {
                assert!(close(*a, *b), "{at_}: weight sum {a} vs {b}");
            }
        }
    }

    /// The device router (kernels/route.cu) routes as the host does, for `moe::route`
    /// (softmax; renormalized or not) and DeepSeek's rules (V2 greedy and group-limited with
    /// softmax scores, V3's sigmoid scores with selection bias and top-2-sum groups, sigmoid
    /// without groups), with more tokens than the block's warps too.
    #[test]
    fn device_router_routes_as_the_host() {
        if !super::super::driver::cuda_available() {
            eprintln!("skipped: no CUDA device");
            return;
        }
        use crate::model::config::GroupScore;
        let base = crate::Model::load(&super::super::tiny_fixture("qwen2_moe")).unwrap().config;
        for (renorm, t) in [(false, 5), (true, 20)] {
            let mut c = base.clone();
            let m = c.family.moe.as_mut().unwrap();
            (m.num_experts, m.top_k, m.norm_topk_prob) = (60, 4, renorm);
            router_case(&c, None, t, 11);
        }
        let ds = crate::Model::load(&super::super::tiny_fixture("deepseek_v3")).unwrap().config;
        let bias = logits(5, 64, 0.05);
        let cases = [
            // (sigmoid, groups, n_group, topk_group, experts, k, renorm, bias, tokens)
            (false, GroupScore::None, 1, 1, 64, 6, false, false, 16),
            (false, GroupScore::Max, 8, 3, 64, 6, true, false, 9),
            (true, GroupScore::Top2Sum, 8, 4, 64, 8, true, true, 16),
            (true, GroupScore::None, 1, 1, 40, 3, true, false, 3),
        ];
        for (sigmoid, group_score, n_group, topk_group, ne, k, renorm, with_bias, t) in cases {
            let mut c = ds.clone();
            let d = c.family.deepseek.as_mut().unwrap();
            (d.sigmoid, d.group_score, d.n_group, d.topk_group) =
                (sigmoid, group_score, n_group, topk_group);
            d.routed_scaling_factor = 2.5;
            let m = c.family.moe.as_mut().unwrap();
            (m.num_experts, m.top_k, m.norm_topk_prob) = (ne, k, renorm);
            router_case(&c, with_bias.then_some(&bias[..ne]), t, 23);
        }
    }

    #[test]
    fn key_layout_places_experts_after_the_dense_keys() {
        let c = crate::Model::load(&super::super::tiny_fixture("qwen2_moe")).unwrap().config;
        let m = c.family.moe.clone().unwrap();
        let (i, h, ei, si) = (c.intermediate_size, c.hidden_size, m.expert_intermediate, 48);
        assert_eq!(m.shared_expert_intermediate, Some(si));
        let k = KeyLayout::of(&c);
        let words = 2 + 2 * m.num_experts;
        let per = i + h + m.num_experts * (ei + h) + si + h + words;
        assert_eq!(k.total, c.num_layers * per);
        assert_eq!(k.dense(1), (per, per + i));
        assert_eq!(k.expert(1, 0), (per + i + h, per + i + h + ei));
        assert_eq!(k.expert(1, 3).0, per + i + h + 3 * (ei + h));
        assert_eq!(k.shared(1), (2 * per - words - si - h, 2 * per - words - h));
        assert_eq!(k.tally(1), 2 * per - words);
        // Qwen3-MoE's layer 0 is dense: its keys are the dense MLP's only.
        let c = crate::Model::load(&super::super::tiny_fixture("qwen3_moe")).unwrap().config;
        let k = KeyLayout::of(&c);
        let m = c.family.moe.clone().unwrap();
        assert_eq!(k.dense(1).0, c.intermediate_size + c.hidden_size);
        assert_eq!(
            k.total,
            2 * (c.intermediate_size + c.hidden_size)
                + m.num_experts * (m.expert_intermediate + c.hidden_size)
                + 2
                + 2 * m.num_experts
        );
        assert_eq!(k.tally(1), k.total - 2 - 2 * m.num_experts);
    }
}
