//! A sparse layer's routing: each token's experts and weights from the router logits, and
//! the dispatch the expert launches read (rows grouped by expert, each token's slots).
//!
//! Routing, two ways with the same results:
//! - **On the device** (`swk_moe_route`, kernels/route.cu; [`CudaModel::set_device_routing`])
//!   for passes of at most 16 tokens (detection prompts, decoding) of a resident model, or
//!   of at most 2048 (prefill, perplexity windows) with swk's own GEMM kernels: one
//!   launch writes the dispatch (rows, slots, weights, and the grouped kernels' groups: the
//!   experts with rows, their weights' addresses and keys, padded with empty groups to
//!   `min(experts, t·k)`, a count the host knows without the routes) and adds the router
//!   counters to the pass's key buffer. Nothing stops the device between the layer's
//!   kernels, so such passes can be CUDA graphs.
//! - **On the host** otherwise: one small download of z (a synchronization) per sparse layer,
//!   routing as the CPU does, then one upload of the dispatch (and the grouped experts'
//!   addresses); the counters in [`MoeActs`]'s tally.
//!

use super::driver::CudaSlice;
use super::kernels;
use super::model::{CudaModel, GemmEngine, WeightRef};
use super::moe::{key_offset, Experts, GroupedLaunch, MoeActs};
use crate::model::arch::{deepseek, moe};
use crate::model::config::MoeParams;
use crate::model::ModelConfig;
use crate::{Error, Result};

/// A sparse layer's routes as its launches read them: the device addresses of the
/// dispatch's arrays (see [`Dispatch`]) and how the experts run.
pub(super) struct Routed {
    pub(super) token: u64,
    pub(super) position: u64,
    pub(super) slot: u64,
    pub(super) weight: u64,
    pub(super) experts: Experts,
    /// The upload holding the host's dispatch, kept until the layer's launches are queued.
    pub(super) _upload: Option<CudaSlice<u8>>,
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

/// Where `swk_moe_route`'s arrays lie (route.cu) for `t` tokens, `ne` experts, top-`k` and
/// `n_group` expert groups.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct RouteLayout {
    t: usize,
    ne: usize,
    k: usize,
    n_group: usize,
}

impl RouteLayout {
    /// The layout for `t` tokens of a model with `c`'s routing rule and `p`'s experts.
    pub(super) fn of(c: &ModelConfig, p: &MoeParams, t: usize) -> Self {
        RouteLayout { t, ne: p.num_experts, k: p.top_k, n_group: route_rule(c, p).n_group }
    }

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
    pub(super) fn out_words(&self) -> usize {
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
    pub(super) fn work_words(&self) -> usize {
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

/// The most tokens of a pass whose sparse layers route on the device with swk's own GEMM
/// kernels, which group experts of any row count (the router is one block; see route.cu).
const ROUTE_MAX_TOKENS: usize = 2048;

impl CudaModel {
    /// Route a sparse layer on the device (on by default; see route.cu) for a resident model
    /// with its experts grouped ([`Self::set_grouped_experts`]), in passes of at most
    /// [`kernels::GEMV_MAX_ROWS`] tokens, or of at most 2048 with [`GemmEngine::Kernels`]
    /// (the other engines multiply an expert of more rows on its own, which needs its row
    /// count on the host): no download of the router logits, no synchronization and no
    /// upload per sparse layer, so CUDA graphs can hold such passes. Off, or for longer
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

    /// The most tokens of a pass whose sparse layers may route on the device with this
    /// engine (see [`Self::set_device_routing`]).
    pub(crate) fn device_route_limit(&self) -> usize {
        match self.gemm {
            GemmEngine::Kernels => ROUTE_MAX_TOKENS,
            _ => kernels::GEMV_MAX_ROWS,
        }
    }

    /// Whether the sparse layers of a pass of `t` tokens route on the device (see
    /// [`Self::set_device_routing`]).
    pub(crate) fn routes_on_device(&self, t: usize) -> bool {
        self.device_routing
            && self.grouped_experts
            && self.device_router.is_some()
            && (1..=self.device_route_limit()).contains(&t)
    }

    /// Route sparse layer `l`'s `t` tokens (first at `pos0`) on the device from the router
    /// logits in `ma`: one launch; the router counters into the pass's key buffer at `keys`
    /// (0: none). The experts then run grouped: the groups are the experts with rows, then
    /// empty ones up to `min(experts, t·k)`, which the host can size without the routes.
    pub(super) fn route_on_device(
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
            mma: self.grouped_mma(r.dtype, r.aligned, t <= kernels::GEMV_MAX_ROWS)?,
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
    /// `ma.tally`. `fetch` is handed the chosen experts before any of their products.
    pub(super) fn route_on_host(
        &self,
        l: usize,
        w: &dyn Fn(&str) -> Result<WeightRef>,
        (t, pos0): (usize, usize),
        ma: &MoeActs,
        fetch: &dyn Fn(&[usize]) -> Result<()>,
    ) -> Result<Routed> {
        let c = &self.config;
        let p = moe::params(c)?;
        let dev = &self.dev;
        let (ne, k) = (p.num_experts, p.top_k);
        let z = dev.download(&ma.router, 0, t * ne)?;
        let routes = host_routes(c, p, &z, self.router_bias.get(&l).map(Vec::as_slice));
        let d = Dispatch::new(&routes, ne, k, pos0)?;
        fetch(&d.experts.iter().map(|&(e, _, _)| e).collect::<Vec<_>>())?;
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

#[cfg(test)]
mod tests {
    use super::super::moe::LayerTally;
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
        // 20 and 100 tokens: more than the block's 16 warps (each routes every 16th token).
        for (renorm, t) in [(false, 5), (true, 20), (false, 100)] {
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
}
