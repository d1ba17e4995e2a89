//! The matrix products of the forward pass, `y = x·Wᵀ`, with the model's [`GemmEngine`]
//! (cuBLAS in f32, bf16 or two-term bf16, or swk's own kernels), and the scratch buffers
//! they and the pass keep between calls.
//!
//! The two-term engine (`cublas-split`) splits its input into bf16 hi and lo terms, multiplies
//! the stacked `[hi; lo]` rows once, and adds the two halves of the result. When the model
//! fuses them ([`CudaModel::set_fused_launches`], on by default), the kernels on either side do
//! that work: the norm, attention or activation before a product writes the terms beside its
//! f32 output ([`CudaModel::split_target`]), and the kernel after it adds the halves as it
//! reads them ([`Product::Halves`]). The values are the same bits; the launches are fewer.

use super::driver::{CudaDevice, CudaSlice, PinnedHostSlice};
use super::kernels::{self, MmaInput};
use super::model::{CudaModel, GemmEngine, WeightDtype, WeightRef};
use crate::{Error, Result};

/// Elements of the f32 scratch used to widen bf16 weights for cuBLAS SGEMM (128 MiB).
const WIDEN_SCRATCH: usize = 1 << 25;

impl CudaModel {
    /// y `[rows, n_out]` = x `[rows, n_in]` · Wᵀ with the configured engine.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn linear(
        &self,
        x: u64,
        w: &WeightRef,
        y: u64,
        rows: usize,
        n_in: usize,
        n_out: usize,
        sc: &mut Scratch,
    ) -> Result<()> {
        self.linear_from(x, None, w, y, rows, n_in, n_out, sc)
    }

    /// Several products of one input (q/k/v; gate/up): `outs` = (weight, y, n_out). With
    /// `cublas-split` the input is split into its bf16 terms once for all of them.
    pub(crate) fn linears(
        &self,
        x: u64,
        outs: &[(WeightRef, u64, usize)],
        rows: usize,
        n_in: usize,
        sc: &mut Scratch,
    ) -> Result<()> {
        self.products(Input { x, split: None }, outs, rows, n_in, sc, false).map(drop)
    }

    /// [`Self::linears`] from `input`, returning where each result lies: with `halves` and
    /// the two-term engine on a bf16 weight, the halves are left in the two-term scratch
    /// (one region per product, all live until the next products) for the kernel that reads
    /// them to add; otherwise each product is written whole at its `y`.
    pub(crate) fn products(
        &self,
        input: Input,
        outs: &[(WeightRef, u64, usize)],
        rows: usize,
        n_in: usize,
        sc: &mut Scratch,
        halves: bool,
    ) -> Result<Vec<Product>> {
        if outs.iter().all(|(w, _, n_out)| self.mma_fits(w, rows, n_in, *n_out)) {
            return self.mma_products(input.x, outs, rows, n_in, sc, halves);
        }
        let two_term = self.two_term();
        let split = match input.split {
            Some(s) => Some(s),
            None if two_term => {
                let x16 = sc.x16(&self.dev, 2 * rows * n_in)?;
                self.dev.split_bf16(input.x, x16, rows * n_in)?;
                Some(x16)
            }
            None => None,
        };
        let kept = |w: &WeightRef| halves && two_term && w.dtype == WeightDtype::Bf16;
        // Weights back to back on the device (a layer's q/k/v or gate/up, see
        // model::buffer_groups; Phi-3's fused projections): one product for all.
        let grouped = self.grouped_products && outs.iter().all(|(w, _, _)| kept(w));
        if let Some(n_all) = adjacent(outs, n_in).filter(|_| grouped && outs.len() > 1) {
            let x16 = split.ok_or_else(|| Error::Backend("no two-term input".into()))?;
            let y2 = sc.y2(&self.dev, 2 * rows * n_all)?;
            self.dev.gemm_bf16_inputs(x16, outs[0].0.ptr, y2, 2 * rows, n_all, n_in)?;
            let lo = y2 + (rows * n_all * 4) as u64;
            let halves = |at: u64| Product::Halves(y2 + at, lo + at, n_all);
            return Ok(column_offsets(outs).map(halves).collect());
        }
        // The regions of the halves kept, reserved at once so that none moves; each starts
        // 256-byte aligned, as a fresh buffer does (cuBLAS may choose its kernel by alignment).
        let region = |n_out: usize| (2 * rows * n_out).next_multiple_of(64);
        let total: usize = outs.iter().filter(|(w, _, _)| kept(w)).map(|o| region(o.2)).sum();
        let y2 = if total > 0 { sc.y2(&self.dev, total)? } else { 0 };
        let mut at = y2;
        let mut out = Vec::with_capacity(outs.len());
        for (w, y, n_out) in outs {
            if !kept(w) {
                self.linear_from(input.x, split, w, *y, rows, n_in, *n_out, sc)?;
                out.push(Product::Whole(*y));
                continue;
            }
            check_shape(w, n_in, *n_out)?;
            let x16 = split.ok_or_else(|| Error::Backend("no two-term input".into()))?;
            self.dev.gemm_bf16_inputs(x16, w.ptr, at, 2 * rows, *n_out, n_in)?;
            let half = (rows * n_out * 4) as u64;
            out.push(Product::Halves(at, at + half, *n_out));
            at += (region(*n_out) * 4) as u64;
        }
        Ok(out)
    }

    /// Whether the tensor-core product takes `w` at `rows` rows: the `mma` engine, a bf16 or
    /// f16 weight `[n_out, n_in]` (n_in a multiple of 8, 16-byte aligned), at most
    /// [`kernels::MMA_MAX_ROWS`] rows.
    fn mma_fits(&self, w: &WeightRef, rows: usize, n_in: usize, n_out: usize) -> bool {
        self.gemm == GemmEngine::Mma
            && w.dtype.is_half()
            && (1..=kernels::MMA_MAX_ROWS).contains(&rows)
            && n_in % 8 == 0
            && w.ptr % 16 == 0
            && w.shape == [n_out, n_in]
    }

    /// [`Self::products`] on the tensor cores: each written whole at its `y`, or, when `keep`
    /// allows and the weights lie back to back (grouped products), all in one launch into the
    /// product scratch, their rows side by side.
    fn mma_products(
        &self,
        x: u64,
        outs: &[(WeightRef, u64, usize)],
        rows: usize,
        n_in: usize,
        sc: &mut Scratch,
        keep: bool,
    ) -> Result<Vec<Product>> {
        let grouped = self.grouped_products && keep && outs.len() > 1;
        if let Some(n_all) = adjacent(outs, n_in).filter(|_| grouped) {
            let y = sc.y2(&self.dev, rows * n_all)?;
            let x = MmaInput::rows(x, n_in);
            self.mma(x, &outs[0].0, (y, n_all), (rows, n_all, n_in), sc)?;
            return Ok(column_offsets(outs).map(|at| Product::Rows(y + at, n_all)).collect());
        }
        let mut out = Vec::with_capacity(outs.len());
        for (w, y, n_out) in outs {
            self.mma(MmaInput::rows(x, n_in), w, (*y, *n_out), (rows, *n_out, n_in), sc)?;
            out.push(Product::Whole(*y));
        }
        Ok(out)
    }

    /// The MLP's down projection `[rows, n_out]` into y on the tensor cores, its input, the
    /// activation `act` of the gate and up products (rows `n_in` wide), made as the product
    /// reads it, and its spike keys into `keys` (rows at positions from `pos0`; 0: none):
    /// one launch instead of the activation's and the product's. False, launching nothing,
    /// when the product is not the tensor cores' or a product is left in halves; the caller
    /// then makes the activation itself.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn mma_activated(
        &self,
        (gate, up): (Product, Product),
        act: kernels::Activation,
        w: &WeightRef,
        y: u64,
        rows: usize,
        (n_in, n_out): (usize, usize),
        (pos0, keys): (usize, u64),
        sc: &mut Scratch,
    ) -> Result<bool> {
        let ((g, g_lo), (u, u_lo)) = (gate.parts(), up.parts());
        let ld = up.row_stride(n_in);
        if !self.mma_fits(w, rows, n_in, n_out) || g_lo != 0 || u_lo != 0 {
            return Ok(false);
        }
        if gate.row_stride(n_in) != ld {
            return Err(Error::Backend("gate and up products with different row strides".into()));
        }
        let x = MmaInput { x: u, gate: g, ld, act: Some(act), keys: (pos0, keys) };
        self.mma(x, w, (y, n_out), (rows, n_out, n_in), sc)?;
        Ok(true)
    }

    /// One tensor-core product into y (rows `ldy` apart), with its partial sums and counters
    /// from the scratch.
    fn mma(
        &self,
        x: MmaInput,
        w: &WeightRef,
        (y, ldy): (u64, usize),
        (rows, n, k): (usize, usize, usize),
        sc: &mut Scratch,
    ) -> Result<()> {
        let plan = self.dev.mma_plan(rows, n, k)?;
        let ws = match plan.slabs {
            1 => (0, 0),
            s => sc.mma(&self.dev, s * rows * n, plan.launch.grid.0 as usize)?,
        };
        self.dev.gemm_mma(x, (w.ptr, w.dtype), y, ldy, (rows, n, k), &plan, ws)
    }

    /// [`Self::products`] of one weight.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn product(
        &self,
        input: Input,
        w: WeightRef,
        y: u64,
        rows: usize,
        (n_in, n_out): (usize, usize),
        sc: &mut Scratch,
        halves: bool,
    ) -> Result<Product> {
        let mut p = self.products(input, &[(w, y, n_out)], rows, n_in, sc, halves)?;
        p.pop().ok_or_else(|| Error::Backend("a product went missing".into()))
    }

    /// Where the kernel producing the next product's input (`n` values) writes its two-term
    /// split when the split is fused ([`Self::set_fused_launches`] and `cublas-split`): the
    /// two-term input scratch; 0 (write none) otherwise.
    pub(crate) fn split_target(&self, sc: &mut Scratch, n: usize) -> Result<u64> {
        if self.fuses_split() {
            sc.x16(&self.dev, 2 * n)
        } else {
            Ok(0)
        }
    }

    /// Whether the norms, attention and activations write the two-term split and the kernels
    /// after the products add its halves (see the module's documentation).
    pub(crate) fn fuses_split(&self) -> bool {
        self.fused_launches && self.two_term()
    }

    /// Whether products may be left where the engine puts them for the kernel after them to
    /// read (cublas-split's halves; a group's shared rows with it or with `mma`), when no
    /// hook point reads them in between (see [`Self::set_fused_launches`]).
    pub(crate) fn keeps_products(&self) -> bool {
        self.fused_launches && (self.two_term() || self.gemm == GemmEngine::Mma)
    }

    /// Whether the products the tensor cores do not take use the two-term engine:
    /// `cublas-split`, and `mma` on bf16 weights (on f16 weights, its longer products are
    /// swk's kernels').
    fn two_term(&self) -> bool {
        match self.gemm {
            GemmEngine::CublasSplit => true,
            GemmEngine::Mma => self.dtype() == WeightDtype::Bf16,
            _ => false,
        }
    }

    /// [`Self::linear`], reusing `split` (x already split into bf16 hi/lo terms) when given.
    #[allow(clippy::too_many_arguments)]
    fn linear_from(
        &self,
        x: u64,
        split: Option<u64>,
        w: &WeightRef,
        y: u64,
        rows: usize,
        n_in: usize,
        n_out: usize,
        sc: &mut Scratch,
    ) -> Result<()> {
        check_shape(w, n_in, n_out)?;
        match (w.dtype, self.gemm) {
            (dtype, GemmEngine::Kernels) => {
                self.dev.gemm_kernel(x, w.ptr, dtype, y, rows, n_out, n_in)
            }
            (WeightDtype::F32, _) => self.dev.sgemm(x, w.ptr, y, rows, n_out, n_in, n_out),
            (WeightDtype::Bf16, GemmEngine::CublasBf16) => {
                let x16 = sc.x16(&self.dev, rows * n_in)?;
                self.dev.f32_to_bf16(x, x16, rows * n_in)?;
                self.dev.gemm_bf16_inputs(x16, w.ptr, y, rows, n_out, n_in)
            }
            (_, GemmEngine::Mma) if self.mma_fits(w, rows, n_in, n_out) => {
                self.mma(MmaInput::rows(x, n_in), w, (y, n_out), (rows, n_out, n_in), sc)
            }
            // f16 weights past the tensor-core product's rows: swk's kernels, f16's default.
            (WeightDtype::F16, GemmEngine::Mma) => {
                self.dev.gemm_kernel(x, w.ptr, w.dtype, y, rows, n_out, n_in)
            }
            (WeightDtype::Bf16, GemmEngine::CublasSplit | GemmEngine::Mma) => {
                let x16 = match split {
                    Some(x16) => x16,
                    None => {
                        let x16 = sc.x16(&self.dev, 2 * rows * n_in)?;
                        self.dev.split_bf16(x, x16, rows * n_in)?;
                        x16
                    }
                };
                let y2 = sc.y2(&self.dev, 2 * rows * n_out)?;
                self.dev.gemm_bf16_inputs(x16, w.ptr, y2, 2 * rows, n_out, n_in)?;
                self.dev.add_halves(y2, y, rows * n_out)
            }
            (dtype, _) => {
                // Widen a band of W's rows to f32, multiply into the matching band of y's columns.
                let wide = sc.wide(&self.dev, n_out, n_in)?;
                for (o0, oc) in kernels::widen_chunks(n_out, n_in, WIDEN_SCRATCH) {
                    let band = w.ptr + (o0 * n_in * dtype.bytes()) as u64;
                    self.dev.widen(band, dtype, wide, oc * n_in)?;
                    self.dev.sgemm(x, wide, y + (o0 * 4) as u64, rows, oc, n_in, n_out)?;
                }
                Ok(())
            }
        }
    }
}

/// Error unless `w` is `[n_out, n_in]`.
fn check_shape(w: &WeightRef, n_in: usize, n_out: usize) -> Result<()> {
    if w.shape != [n_out, n_in] {
        return Err(Error::tensor(
            &w.name,
            format!("expected shape [{n_out}, {n_in}] on the device, found {:?}", w.shape),
        ));
    }
    Ok(())
}

/// The summed width of `outs` when their weights lie back to back on the device, in order,
/// each `[n_out, n_in]` in one dtype: one matrix of that many rows.
fn adjacent(outs: &[(WeightRef, u64, usize)], n_in: usize) -> Option<usize> {
    let (first, _, _) = outs.first()?;
    let mut end = first.ptr;
    for (w, _, n_out) in outs {
        if w.ptr != end || w.dtype != first.dtype || w.shape != [*n_out, n_in] {
            return None;
        }
        end += (n_out * n_in * w.dtype.bytes()) as u64;
    }
    Some(outs.iter().map(|o| o.2).sum())
}

/// Byte offsets of each of `outs`' columns in a row of their group's product (one f32 per
/// column, the members side by side in order).
fn column_offsets(outs: &[(WeightRef, u64, usize)]) -> impl Iterator<Item = u64> + '_ {
    outs.iter().scan(0u64, |col, (_, _, n_out)| {
        let at = *col;
        *col += 4 * *n_out as u64;
        Some(at)
    })
}

/// Where a product's result lies on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Product {
    /// Written whole at this address (rows of its width).
    Whole(u64),
    /// Written whole at this address, rows `ld` elements apart (one of a group computed as
    /// one product).
    Rows(u64, usize),
    /// The two-term engine's halves W·hi and W·lo at these addresses, for the kernel that
    /// reads the product to add; rows `ld` elements apart (wider than the product when it is
    /// one of a group computed as one product).
    Halves(u64, u64, usize),
}

impl Product {
    /// (the result or its hi half, the lo half or 0): the kernels' `y, y_lo` arguments.
    pub(crate) fn parts(self) -> (u64, u64) {
        match self {
            Product::Whole(y) | Product::Rows(y, _) => (y, 0),
            Product::Halves(hi, lo, _) => (hi, lo),
        }
    }
    /// Elements from one row to the next, for a product `width` wide.
    pub(crate) fn row_stride(self, width: usize) -> usize {
        match self {
            Product::Whole(_) => width,
            Product::Rows(_, ld) | Product::Halves(_, _, ld) => ld,
        }
    }
}

/// A product's input: f32 rows at `x`, and their two-term split when a kernel already wrote
/// it beside them (see [`CudaModel::split_target`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Input {
    pub(crate) x: u64,
    pub(crate) split: Option<u64>,
}

impl Input {
    /// `x`, with the split at `split` unless it is 0.
    pub(crate) fn new(x: u64, split: u64) -> Self {
        Input { x, split: (split != 0).then_some(split) }
    }
}

/// Scratch buffers of the GEMM paths, allocated on first use and kept by the model.
#[derive(Default)]
pub(crate) struct Scratch {
    wide: Option<CudaSlice<f32>>,
    xf: Option<CudaSlice<f32>>,
    x16: Option<CudaSlice<u16>>,
    y2: Option<CudaSlice<f32>>,
    partial: Option<CudaSlice<f32>>,
    counters: Option<CudaSlice<u32>>,
    attention: Option<CudaSlice<f32>>,
    pub(crate) keys: Option<PinnedHostSlice<u64>>,
}

impl Scratch {
    /// The split attention's partial results, at least `want` f32.
    pub(crate) fn attention(&mut self, dev: &CudaDevice, want: usize) -> Result<u64> {
        if self.attention.as_ref().is_none_or(|b| b.len() < want) {
            self.attention = Some(dev.alloc::<f32>(want)?);
        }
        Ok(self.attention.as_ref().map_or(0, |b| dev.ptr(b)))
    }
    /// The f32 widening scratch for a `[n_out, n_in]` weight: at most [`WIDEN_SCRATCH`]
    /// elements (fewer for small weights), but always at least one row.
    fn wide(&mut self, dev: &CudaDevice, n_out: usize, n_in: usize) -> Result<u64> {
        let want = (n_out * n_in).min(WIDEN_SCRATCH).max(n_in);
        if self.wide.as_ref().is_none_or(|b| b.len() < want) {
            self.wide =
                Some(dev.alloc::<f32>(want.max(self.wide.as_ref().map_or(0, |b| b.len())))?);
        }
        Ok(self.wide.as_ref().map_or(0, |b| dev.ptr(b)))
    }
    /// The final-norm output of at least `want` elements.
    pub(crate) fn xf(&mut self, dev: &CudaDevice, want: usize) -> Result<u64> {
        if self.xf.as_ref().is_none_or(|b| b.len() < want) {
            self.xf = Some(dev.alloc::<f32>(want)?);
        }
        Ok(self.xf.as_ref().map_or(0, |b| dev.ptr(b)))
    }
    /// The stacked two-term product scratch of at least `want` elements.
    fn y2(&mut self, dev: &CudaDevice, want: usize) -> Result<u64> {
        if self.y2.as_ref().is_none_or(|b| b.len() < want) {
            self.y2 = Some(dev.alloc::<f32>(want)?);
        }
        Ok(self.y2.as_ref().map_or(0, |b| dev.ptr(b)))
    }
    /// The tensor-core product's partial sums (at least `sums` f32) and its counters (at
    /// least `ranges`, zero: each launch leaves them as it found them).
    fn mma(&mut self, dev: &CudaDevice, sums: usize, ranges: usize) -> Result<(u64, u64)> {
        if self.partial.as_ref().is_none_or(|b| b.len() < sums) {
            self.partial = Some(dev.alloc::<f32>(sums)?);
        }
        if self.counters.as_ref().is_none_or(|b| b.len() < ranges) {
            self.counters = Some(dev.zeros::<u32>(ranges)?);
        }
        let partial = self.partial.as_ref().map_or(0, |b| dev.ptr(b));
        Ok((partial, self.counters.as_ref().map_or(0, |b| dev.ptr(b))))
    }
    /// The bf16 activation scratch of at least `want` elements.
    fn x16(&mut self, dev: &CudaDevice, want: usize) -> Result<u64> {
        if self.x16.as_ref().is_none_or(|b| b.len() < want) {
            self.x16 = Some(dev.alloc::<u16>(want)?);
        }
        Ok(self.x16.as_ref().map_or(0, |b| dev.ptr(b)))
    }
}
