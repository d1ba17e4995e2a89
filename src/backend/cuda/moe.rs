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
//! The routes and the dispatch are route.rs's: made on the device for short passes of a
//! resident model, else on the host.
//!
//! When every expert has at most 16 rows, or at any row count with swk's own GEMM kernels,
//! the per-expert steps run for all experts at once: one launch each for gate and up
//! together, the activation, down and the output keys (`swk_gemv_grouped_*` for experts of
//! at most 16 rows, plus `swk_gemm_grouped_*` when some have more; `swk_act_mul_grouped`,
//! `swk_column_max_grouped`; with the `mma` engine, `swk_gemm_mma_grouped_*`, whose down
//! product makes the activation itself), in place of about 4 to 10 launches per expert;
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
use super::route::{Dispatch, RouteLayout};
use crate::hooks::{ChannelMax, ExpertSpikes, LayerSpikes};
use crate::model::arch::moe;
use crate::model::config::MoeParams;
use crate::model::ModelConfig;
use crate::{Error, Result};

/// The grouped experts of a sparse layer, host side ([`CudaModel::grouped_plan`]).
pub(super) struct GroupedExperts {
    /// The experts' gate, then up, then down weights' device addresses (`[3, experts]`).
    pub(super) ptrs: Vec<u64>,
    /// The experts' first rows, row counts, input keys and output keys (`[4, experts]`).
    pub(super) meta: Vec<u32>,
    /// The weights' dtype.
    pub(super) dtype: super::WeightDtype,
    /// The smallest and largest row count.
    pub(super) rows: (usize, usize),
    /// Whether the `mma` engine's grouped product takes them.
    pub(super) mma: bool,
}

/// Grouped experts as their launches read them ([`CudaModel::experts_grouped`]).
pub(super) struct GroupedLaunch {
    /// How many groups of rows, an expert each (the device router pads them with empty ones).
    pub(super) count: usize,
    /// Device address of the weights' addresses, `[3, count]` (gate, up, down).
    pub(super) ptrs: u64,
    /// Device address of the u32 metadata `[4, count]`: first rows, row counts, input keys,
    /// output keys.
    pub(super) meta: u64,
    /// The weights' dtype.
    pub(super) dtype: super::WeightDtype,
    /// Bounds of the row counts (smallest, largest).
    pub(super) rows: (usize, usize),
    /// Whether the `mma` engine's grouped product takes them.
    pub(super) mma: bool,
}

/// How a sparse layer's experts run: grouped, or one at a time as (expert, first row, rows).
pub(super) enum Experts {
    Grouped(GroupedLaunch),
    OneByOne(Vec<(usize, usize, usize)>),
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
    pub(super) fn expert(&self, l: usize, e: usize) -> (usize, usize) {
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
    pub(super) fn tally(&self, l: usize) -> usize {
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
    pub(super) fn add(&mut self, routes: &[moe::Route], d: &Dispatch, ne: usize) {
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
    pub(super) fn from_words(w: &[u64], ne: usize) -> Self {
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

/// The activation buffers of the sparse layers for up to `t` tokens.
pub(crate) struct MoeActs {
    /// Router logits `[t, experts]`.
    pub(super) router: CudaSlice<f32>,
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
    /// The device router's dispatch (u32 words) and work arrays, for passes that route on
    /// the device ([`CudaModel::device_route_limit`]).
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
    /// when `stats`; the device router's arrays when `t` is at most `route_limit`.
    pub(crate) fn alloc(
        dev: &CudaDevice,
        c: &ModelConfig,
        m: &MoeParams,
        (t, route_limit): (usize, usize),
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
        let route = if t <= route_limit {
            let at = RouteLayout::of(c, m, t);
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
    pub(super) fn grouped_mma(
        &self,
        dtype: super::WeightDtype,
        aligned: bool,
        small: bool,
    ) -> Result<bool> {
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
    pub(super) fn grouped_plan(
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

    /// Layer `l`'s sparse MLP on `m` (`[t, hidden]`, first token at `pos0`) into `ma.out`,
    /// weights from `w(suffix)`; spike keys into the pass's key buffer at `keys` (0: none), laid
    /// out per [`KeyLayout`]. `fetch(experts)` brings routed experts into place once routing
    /// has chosen them (a streamed layer read selectively; else it does nothing).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn sparse_mlp(
        &self,
        l: usize,
        w: &dyn Fn(&str) -> Result<WeightRef>,
        m: u64,
        (t, pos0): (usize, usize),
        ma: &MoeActs,
        keys: u64,
        fetch: &dyn Fn(&[usize]) -> Result<()>,
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
            _ => self.route_on_host(l, w, (t, pos0), ma, fetch)?,
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
            let (gp, up, act, down) =
                (Product::Whole(g), Product::Whole(u), Activation::Silu, wt("down_proj")?);
            // The tensor cores' down product makes the activation as it reads it.
            let at = (pos0, key(ki));
            if !(self.fused_launches
                && self.mma_activated((gp, up), act, &down, y, t, (si, h), at, sc)?)
            {
                dev.act_mul(Some(gp), up, (a, 0), t, si, (pos0, 0), key(ki), act)?;
                self.linear(a, &down, y, t, si, h, sc)?;
            }
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

/// A spike key's index as the u32 offset the grouped kernels take.
pub(super) fn key_offset(k: usize) -> Result<u32> {
    u32::try_from(k).map_err(|_| Error::Backend(format!("spike key {k} past u32")))
}

#[cfg(test)]
mod tests {
    use super::*;

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
