//! The matrix products of the forward pass, `y = x·Wᵀ`, with the model's [`GemmEngine`]
//! (cuBLAS in f32, bf16 or two-term bf16, or swk's own kernels), and the scratch buffers
//! they and the pass keep between calls.

use super::driver::{CudaDevice, CudaSlice, PinnedHostSlice};
use super::kernels;
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
        let split = if self.gemm == GemmEngine::CublasSplit {
            let x16 = sc.x16(&self.dev, 2 * rows * n_in)?;
            self.dev.split_bf16(x, x16, rows * n_in)?;
            Some(x16)
        } else {
            None
        };
        for (w, y, n_out) in outs {
            self.linear_from(x, split, w, *y, rows, n_in, *n_out, sc)?;
        }
        Ok(())
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
        if w.shape != [n_out, n_in] {
            return Err(Error::tensor(
                &w.name,
                format!("expected shape [{n_out}, {n_in}] on the device, found {:?}", w.shape),
            ));
        }
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
            (WeightDtype::Bf16, GemmEngine::CublasSplit) => {
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

/// Scratch buffers of the GEMM paths, allocated on first use and kept by the model.
#[derive(Default)]
pub(crate) struct Scratch {
    wide: Option<CudaSlice<f32>>,
    xf: Option<CudaSlice<f32>>,
    x16: Option<CudaSlice<u16>>,
    y2: Option<CudaSlice<f32>>,
    pub(crate) keys: Option<PinnedHostSlice<u64>>,
}

impl Scratch {
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
    /// The bf16 activation scratch of at least `want` elements.
    fn x16(&mut self, dev: &CudaDevice, want: usize) -> Result<u64> {
        if self.x16.as_ref().is_none_or(|b| b.len() < want) {
            self.x16 = Some(dev.alloc::<u16>(want)?);
        }
        Ok(self.x16.as_ref().map_or(0, |b| dev.ptr(b)))
    }
}
