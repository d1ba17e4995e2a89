//! The sparse MLP of a mixture-of-experts layer on the device (Mixtral, OLMoE, Qwen2-MoE,
//! Qwen3-MoE, DeepSeek-V2/V3), mirroring `model::arch::moe::sparse_mlp` and
//! `model::arch::deepseek::sparse_mlp`:
//!
//! ```text
//! z = m·W_routerᵀ                                   (device; downloaded, [t, experts])
//! routes = moe::route(z) per token                  (host: softmax, top-k, renormalize;
//!                                                    DeepSeek: deepseek::route, its groups,
//!                                                    sigmoid scores and selection bias)
//! rows = each expert's tokens, experts ascending    (host; uploaded as indices)
//! xs = m[rows]                                      (gather)
//! per expert e with tokens: a = silu(xs·W_gateᵀ) ⊙ (xs·W_upᵀ)   (+ its input keys)
//!                           y_e = a·W_downᵀ                      (+ its output keys)
//! out[tok] = Σ_e w_e · y_e[tok]                     (experts ascending, from 0)
//! Qwen2-MoE: out += sigmoid(m·w_gateᵀ) · shared(m)  (+ the shared expert's keys)
//! DeepSeek:  out += shared(m)
//! ```
//!
//! When every expert has at most 16 rows (detection prompts, decoding), or at any row count
//! with swk's own GEMM kernels, the per-expert steps run for all experts at once: one launch
//! each for gate, up, the activation, down and the output keys (`swk_gemv_grouped_*` for
//! experts of at most 16 rows, plus `swk_gemm_grouped_*` when some have more;
//! `swk_act_mul_grouped`, `swk_column_max_grouped`), in place of about 4 to 10 launches per
//! expert; [`CudaModel::set_grouped_experts`] turns it off. With cuBLAS, experts with more
//! rows (prefill, perplexity windows) are multiplied one at a time.
//!
//! Routing on the host costs one small download (and a synchronization) per sparse layer,
//! then one upload of the dispatch (and the grouped experts' addresses), and makes passes of
//! these models unfit for CUDA graphs. The per-expert statistics and the router counters
//! land in the same [`SpikeStats`] fields as on the CPU.

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
/// layer then each expert's `[expert_intermediate]` inputs and `[hidden]` outputs, then the
/// shared expert's `[shared_intermediate]` and `[hidden]`.
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

    /// Merge one pass's keys (`keys`, this layout) and router tallies into `stats`.
    pub(crate) fn merge(&self, keys: &[u64], tally: &[LayerTally], stats: &mut [LayerSpikes]) {
        use rayon::prelude::*;
        let h = self.h;
        stats.par_iter_mut().enumerate().for_each(|(l, s)| {
            let (di, dout) = self.dense(l);
            kernels::merge_spike_keys(&mut s.input, &keys[di..dout]);
            kernels::merge_spike_keys(&mut s.output, &keys[dout..dout + h]);
            let (Some((ne, ei, si)), true) = (self.moe, self.sparse[l]) else { return };
            let Some(t) = tally.get(l).filter(|t| t.routed_tokens > 0) else { return };
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

/// The activation buffers of the sparse layers for up to `t` tokens.
pub(crate) struct MoeActs {
    /// Router logits `[t, experts]`.
    router: CudaSlice<f32>,
    /// Gathered expert inputs `[t·k, hidden]`.
    xs: CudaSlice<f32>,
    /// Expert gate, up and activation `[t·k, expert_intermediate]`.
    gate: CudaSlice<f32>,
    up: CudaSlice<f32>,
    act: CudaSlice<f32>,
    /// Expert outputs `[t·k, hidden]`, before their routing weights.
    ys: CudaSlice<f32>,
    /// What the block writes `[t, hidden]`.
    pub(crate) out: CudaSlice<f32>,
    /// The shared expert's gate, up and activation `[t, shared]`, output `[t, hidden]` and
    /// gate logit `[t]` (Qwen2-MoE).
    shared: Option<[CudaSlice<f32>; 5]>,
    /// Per layer, the counters of the pass (when statistics are gathered).
    pub(crate) tally: Option<Mutex<Vec<LayerTally>>>,
}

impl MoeActs {
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
        Ok(MoeActs {
            router: dev.alloc::<f32>(t * m.num_experts)?,
            xs: dev.alloc::<f32>(rows * h)?,
            gate: dev.alloc::<f32>(rows * ei)?,
            up: dev.alloc::<f32>(rows * ei)?,
            act: dev.alloc::<f32>(rows * ei)?,
            ys: dev.alloc::<f32>(rows * h)?,
            out: dev.alloc::<f32>(t * h)?,
            shared,
            tally: stats.then(|| Mutex::new(vec![LayerTally::default(); c.num_layers])),
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
    }

    /// How many sparse layers, over all passes since the upload, ran their experts grouped
    /// (see [`Self::set_grouped_experts`]): which path a timing measured.
    pub fn grouped_expert_layers(&self) -> u64 {
        self.grouped_layers.load(std::sync::atomic::Ordering::Relaxed)
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
        let (h, ei) = (self.config.hidden_size, moe::params(&self.config)?.expert_intermediate);
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
            for (j, what) in ["gate_proj", "up_proj", "down_proj"].iter().enumerate() {
                let wr = w(&format!("mlp.experts.{e}.{what}.weight"))?;
                let want = if j == 2 { [h, ei] } else { [ei, h] };
                if wr.shape != want {
                    return Err(Error::tensor(
                        &wr.name,
                        format!("expected shape {want:?} on the device, found {:?}", wr.shape),
                    ));
                }
                if *dtype.get_or_insert(wr.dtype) != wr.dtype {
                    return Ok(None);
                }
                ptrs[j * g + i] = wr.ptr;
            }
            let (ki, ko) = self.key_layout.expert(l, e);
            let offset = |k: usize| {
                u32::try_from(k).map_err(|_| Error::Backend(format!("spike key {k} past u32")))
            };
            meta[i] = r0 as u32;
            meta[g + i] = n as u32;
            (meta[2 * g + i], meta[3 * g + i]) = (offset(ki)?, offset(ko)?);
        }
        let dtype = dtype.unwrap_or(super::WeightDtype::F32);
        // The `mma` engine's tensor-core product where it applies, else swk's kernels.
        let aligned = ptrs.iter().all(|p| p % 16 == 0);
        let mma = self.gemm == GemmEngine::Mma
            && dtype.is_half()
            && small
            && h % 8 == 0
            && ei % 8 == 0
            && aligned;
        Ok(Some(GroupedExperts { ptrs, meta, dtype, rows: (min_rows, max_rows), mma }))
    }

    /// The routed experts of a sparse layer together, as `plan` lays them out (see moe.cu;
    /// with the `mma` engine, mma.cu's grouped product): one launch each for gate, up, the
    /// activation (with its input keys), down and the output keys. `pp`, `mp`: the device
    /// addresses of the plan's weight addresses and metadata; `pos`: of the rows' positions.
    fn experts_grouped(
        &self,
        plan: &GroupedExperts,
        (pp, mp): (u64, u64),
        ma: &MoeActs,
        pos: u64,
        keys: u64,
    ) -> Result<()> {
        let dev = &self.dev;
        let (h, ei) = (self.config.hidden_size, moe::params(&self.config)?.expert_intermediate);
        let (g, dtype) = (plan.ptrs.len() / 3, plan.dtype);
        let (min_rows, max_rows) = plan.rows;
        let groups =
            RowGroups { row0: mp, rows: mp + (4 * g) as u64, count: g, min_rows, max_rows };
        let (key_in, key_out) = ((keys, mp + (8 * g) as u64), (keys, mp + (12 * g) as u64));
        let (xs, ys) = (dev.ptr(&ma.xs), dev.ptr(&ma.ys));
        let (gate, up, act) = (dev.ptr(&ma.gate), dev.ptr(&ma.up), dev.ptr(&ma.act));
        let product = |x: u64, w: u64, y: u64, n: usize, k: usize| {
            if plan.mma {
                dev.gemm_mma_grouped(x, (w, dtype), y, &groups, n, k)
            } else {
                dev.gemm_grouped(x, w, dtype, y, &groups, n, k)
            }
        };
        product(xs, pp, gate, ei, h)?;
        product(xs, pp + (8 * g) as u64, up, ei, h)?;
        dev.act_mul_grouped(gate, up, act, &groups, ei, pos, key_in, Activation::Silu)?;
        product(act, pp + (16 * g) as u64, ys, h, ei)?;
        if keys != 0 {
            dev.column_max_grouped(ys, &groups, h, pos, key_out)?;
        }
        self.grouped_layers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
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

        // Route on the host, as the CPU does, from the device's router logits.
        self.linear(m, &w("mlp.gate.weight")?, dev.ptr(&ma.router), t, h, ne, sc)?;
        let z = dev.download(&ma.router, 0, t * ne)?;
        let routes: Vec<moe::Route> = match &c.family.deepseek {
            Some(ds) => {
                let bias = self.router_bias.get(&l).map(Vec::as_slice);
                z.chunks(ne).map(|z| deepseek::route(z, bias, ds, p)).collect()
            }
            None => z.chunks(ne).map(|z| moe::route(z, k, p.norm_topk_prob)).collect(),
        };
        let d = Dispatch::new(&routes, ne, k, pos0)?;
        let grouped = if self.grouped_experts { self.grouped_plan(l, w, &d)? } else { None };
        // One upload: the dispatch's indices and weights, and the grouped experts' plan (with
        // where its arrays lie in the upload).
        let mut up = Packed::default();
        let (token, position) = (up.push(&d.token), up.push(&d.position));
        let (slot, weight) = (up.push(&d.slot), up.push(&d.weight));
        let grouped = grouped.map(|g| {
            let at = (up.push(&g.ptrs), up.push(&g.meta));
            (g, at)
        });
        let packed = dev.upload(&up.bytes)?;
        let base = dev.ptr(&packed);
        let position = base + position;

        // Each expert on its tokens' rows: all at once when each has few rows, else one by one.
        dev.embed(m, super::WeightDtype::F32, base + token, dev.ptr(&ma.xs), t * k, h, 1.0)?;
        if let Some((g, (pp, mp))) = &grouped {
            self.experts_grouped(g, (base + pp, base + mp), ma, position, keys)?;
        } else {
            for &(e, r0, n) in &d.experts {
                let wt = |what: &str| w(&format!("mlp.experts.{e}.{what}.weight"));
                let (g, u, a) = (f(&ma.gate, r0, ei), f(&ma.up, r0, ei), f(&ma.act, r0, ei));
                let (xs, ys) = (f(&ma.xs, r0, h), f(&ma.ys, r0, h));
                let at = (0, position + (r0 * 4) as u64);
                let (ki, ko) = self.key_layout.expert(l, e);
                self.linears(xs, &[(wt("gate_proj")?, g, ei), (wt("up_proj")?, u, ei)], n, h, sc)?;
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
        let out = dev.ptr(&ma.out);
        dev.moe_combine(dev.ptr(&ma.ys), base + slot, base + weight, out, t, k, h)?;

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

        // The router counters, as moe::routed_experts keeps them.
        if let Some(tally) = &ma.tally {
            let mut all = tally.lock().unwrap_or_else(|p| p.into_inner());
            let lt = &mut all[l];
            if lt.selected.len() != ne {
                (lt.selected, lt.weight_sum) = (vec![0; ne], vec![0.0; ne]);
            }
            lt.routed_tokens += t as u64;
            lt.entropy_sum += routes.iter().map(|r| r.entropy).sum::<f64>();
            for &(e, r0, n) in &d.experts {
                lt.selected[e] += n as u64;
                lt.weight_sum[e] += d.row_weight[r0..r0 + n].iter().map(|&w| w as f64).sum::<f64>();
            }
        }
        Ok(())
    }
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

    #[test]
    fn key_layout_places_experts_after_the_dense_keys() {
        let c = crate::Model::load(&super::super::tiny_fixture("qwen2_moe")).unwrap().config;
        let m = c.family.moe.clone().unwrap();
        let (i, h, ei, si) = (c.intermediate_size, c.hidden_size, m.expert_intermediate, 48);
        assert_eq!(m.shared_expert_intermediate, Some(si));
        let k = KeyLayout::of(&c);
        let per = i + h + m.num_experts * (ei + h) + si + h;
        assert_eq!(k.total, c.num_layers * per);
        assert_eq!(k.dense(1), (per, per + i));
        assert_eq!(k.expert(1, 0), (per + i + h, per + i + h + ei));
        assert_eq!(k.expert(1, 3).0, per + i + h + 3 * (ei + h));
        assert_eq!(k.shared(1), (2 * per - si - h, 2 * per - h));
        // Qwen3-MoE's layer 0 is dense: its keys are the dense MLP's only.
        let c = crate::Model::load(&super::super::tiny_fixture("qwen3_moe")).unwrap().config;
        let k = KeyLayout::of(&c);
        let m = c.family.moe.clone().unwrap();
        assert_eq!(k.dense(1).0, c.intermediate_size + c.hidden_size);
        assert_eq!(
            k.total,
            2 * (c.intermediate_size + c.hidden_size)
                + m.num_experts * (m.expert_intermediate + c.hidden_size)
        );
    }
}
