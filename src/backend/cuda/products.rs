//! The products' launchers of a [`CudaDevice`]: swk's GEMM and gemv kernels (kernels/gemm.cu),
//! alone and grouped by expert, the `mma` engine's tensor-core products (kernels/mma.cu) and
//! the cuBLAS products in swk's row-major terms. Shared, as device.rs, by a GPU and the CPU
//! emulator.

use super::device::{by_dtype, launch, RowGroups};
use super::driver::CudaDevice;
use super::kernels::{self, int};
use super::BlasGemm;
use crate::backend::WeightDtype;
use crate::{Error, Result};

impl CudaDevice {
    /// y = x · Wᵀ with swk's own kernels: `[rows, k] · [n, k]ᵀ → [rows, n]`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_kernel(
        &self,
        x: u64,
        w: u64,
        dtype: WeightDtype,
        y: u64,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let (r, n_i, k_i) = (int(rows, "rows")?, int(n, "out features")?, int(k, "in features")?);
        let (name, l) = if rows <= kernels::GEMV_MAX_ROWS {
            let name = by_dtype(dtype, ["swk_gemv_f32", "swk_gemv_bf16", "swk_gemv_f16"]);
            (name, kernels::gemv(rows, n)?)
        } else {
            let name = by_dtype(dtype, ["swk_gemm_f32", "swk_gemm_bf16", "swk_gemm_f16"]);
            (name, kernels::gemm_tiled(rows, n)?)
        };
        launch!(self, name, l, x, w, y, r, n_i, k_i)
    }

    /// y = x·W_iᵀ for every group of rows i of `g` at once, W_i at the device address `w[i]`
    /// (`w`: u64 per group; every W_i `[n, k]`, stored as `dtype`); each group's
    /// values are bit for bit those [`Self::gemm_kernel`] gives it alone. `pair` (not 0):
    /// two weights per group (an expert's gate and up, `w` `[2, groups]`), the second's
    /// products at `y + pair` floats (common.cuh's `pair_group`): one launch for both.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_grouped(
        &self,
        x: u64,
        w: u64,
        dtype: WeightDtype,
        (y, pair): (u64, u64),
        g: &RowGroups,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let weights = g.count * if pair == 0 { 1 } else { 2 };
        let launches = kernels::gemm_grouped((g.min_rows, g.max_rows), n, weights)?;
        let (n_i, k_i) = (int(n, "out features")?, int(k, "in features")?);
        let (row0, rows) = (g.row0, g.rows);
        // The two kernels write the rows of disjoint groups.
        if let Some(l) = launches.gemv {
            let names = ["swk_gemv_grouped_f32", "swk_gemv_grouped_bf16", "swk_gemv_grouped_f16"];
            launch!(self, by_dtype(dtype, names), l, x, w, row0, rows, y, n_i, k_i, pair)?;
        }
        if let Some(l) = launches.tiles {
            let names = ["swk_gemm_grouped_f32", "swk_gemm_grouped_bf16", "swk_gemm_grouped_f16"];
            launch!(self, by_dtype(dtype, names), l, x, w, row0, rows, y, n_i, k_i, pair)?;
        }
        Ok(())
    }

    /// How the `mma` engine's tensor-core product covers `rows` × `n` × `k` on this device
    /// (see [`kernels::mma`]: about two blocks per multiprocessor).
    pub(crate) fn mma_plan(&self, rows: usize, n: usize, k: usize) -> Result<kernels::MmaPlan> {
        kernels::mma(rows, n, k, 2 * self.sm_count())
    }

    /// The `mma` engine's tensor-core product (`swk_gemm_mma_bf16` / `_f16`): y (rows `ldy` apart)
    /// = x `[rows, k]` · Wᵀ for a bf16 or f16 W `[n, k]` (16-byte aligned), as `plan` covers it, x
    /// as [`kernels::MmaInput`] describes it (its activation's spike keys too); with more than one
    /// slab, `partial` holds `slabs × rows × n` f32 and `counters` one zeroed u32 per column range
    /// (the kernel leaves them zero).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_mma(
        &self,
        x: kernels::MmaInput,
        (w, dtype): (u64, WeightDtype),
        y: u64,
        ldy: usize,
        (rows, n, k): (usize, usize, usize),
        plan: &kernels::MmaPlan,
        (partial, counters): (u64, u64),
    ) -> Result<()> {
        if w % 16 != 0 || ldy < n || (plan.slabs > 1 && (partial == 0 || counters == 0)) {
            return Err(Error::Backend(format!(
                "the tensor-core product needs 16-byte aligned weights, rows at least n apart and, \
                 over {} slabs, partial sums and counters",
                plan.slabs
            )));
        }
        if x.ld < k {
            return Err(Error::Backend(format!("x's rows are {} apart, under k = {k}", x.ld)));
        }
        let (r, n_i, k_i) = (int(rows, "rows")?, int(n, "out features")?, int(k, "in features")?);
        let (ld, slab) = (int(ldy, "row stride")?, int(plan.slab, "slab")?);
        let stage = int(plan.stage, "stage")?;
        let Some(act) = x.act else {
            if x.ld != k {
                return Err(Error::Backend(format!("x's rows are {} apart, not k = {k}", x.ld)));
            }
            let kernel = mma_kernel(dtype, ["swk_gemm_mma_bf16", "swk_gemm_mma_f16"])?;
            let (xv, l) = (x.x, plan.launch);
            return launch!(
                self, kernel, l, xv, w, y, partial, counters, r, n_i, k_i, ld, slab, stage
            );
        };
        let (up, gate, ldx, act) = (x.x, x.gate, int(x.ld, "x's row stride")?, act as i32);
        let (pos0, keys) = (int(x.keys.0, "position")?, x.keys.1);
        launch!(
            self,
            mma_kernel(dtype, ["swk_gemm_mma_act_bf16", "swk_gemm_mma_act_f16"])?,
            plan.launch,
            up,
            gate,
            ldx,
            act,
            w,
            y,
            partial,
            counters,
            r,
            n_i,
            k_i,
            ld,
            slab,
            stage,
            pos0,
            keys
        )
    }

    /// [`Self::gemm_grouped`] on the tensor cores (the `mma` engine): every W_i `[n, k]` bf16
    /// or f16 as `dtype` says (16-byte aligned, k a multiple of 8), every group of at most
    /// [`kernels::MMA_MAX_ROWS`] rows; each group's values within float rounding of
    /// [`Self::gemm_mma`]'s (its sum is cut into other ranges of k). `pair` as there.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_mma_grouped(
        &self,
        x: u64,
        (w, dtype): (u64, WeightDtype),
        (y, pair): (u64, u64),
        g: &RowGroups,
        n: usize,
        k: usize,
    ) -> Result<()> {
        if g.max_rows > kernels::MMA_MAX_ROWS {
            return Err(Error::Backend(format!(
                "the grouped tensor-core product takes groups of at most {} rows, not {}",
                kernels::MMA_MAX_ROWS,
                g.max_rows
            )));
        }
        let weights = g.count * if pair == 0 { 1 } else { 2 };
        let (l, stage) = kernels::mma_grouped(n, k, weights)?;
        let (n_i, k_i, s) = (int(n, "out features")?, int(k, "in features")?, int(stage, "stage")?);
        let (row0, rows) = (g.row0, g.rows);
        let name = mma_kernel(dtype, ["swk_gemm_mma_grouped_bf16", "swk_gemm_mma_grouped_f16"])?;
        launch!(self, name, l, x, w, y, row0, rows, n_i, k_i, s, pair)
    }

    /// [`Self::gemm_mma_grouped`] (one weight per group) of the groups' activation
    /// act(gate) · up (`gate` 0: act(up); both `[.., k]`), made as the product stages it
    /// (`swk_gemm_mma_act_grouped_*`): a sparse layer's down products without an activation
    /// launch or buffer. Spike keys as [`Self::act_mul_grouped`] folds them: positions from
    /// `pos`, group i's at `keys + key_at[i]` (`keys` 0: none).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_mma_act_grouped(
        &self,
        (gate, up, act): (u64, u64, kernels::Activation),
        (w, dtype): (u64, WeightDtype),
        y: u64,
        g: &RowGroups,
        (n, k): (usize, usize),
        pos: u64,
        (keys, key_at): (u64, u64),
    ) -> Result<()> {
        if g.max_rows > kernels::MMA_MAX_ROWS {
            return Err(Error::Backend(format!(
                "the grouped tensor-core product takes groups of at most {} rows, not {}",
                kernels::MMA_MAX_ROWS,
                g.max_rows
            )));
        }
        let (l, stage) = kernels::mma_grouped(n, k, g.count)?;
        let (n_i, k_i, s) = (int(n, "out features")?, int(k, "in features")?, int(stage, "stage")?);
        let (row0, rows, act) = (g.row0, g.rows, act as i32);
        let name =
            mma_kernel(dtype, ["swk_gemm_mma_act_grouped_bf16", "swk_gemm_mma_act_grouped_f16"])?;
        launch!(self, name, l, up, gate, act, w, y, row0, rows, n_i, k_i, s, pos, keys, key_at)
    }

    /// cuBLAS: y[t, o0 + j] = Σ_i x[t, i] · W[j, i] for j < n (W f32 `[n, k]`), row stride of
    /// y `ldy` (so a chunk of W's rows fills a band of y's columns).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn sgemm(
        &self,
        x: u64,
        w: u64,
        y: u64,
        rows: usize,
        n: usize,
        k: usize,
        ldy: usize,
    ) -> Result<()> {
        let (m_i, n_i, k_i, ld) =
            (int(n, "out features")?, int(rows, "rows")?, int(k, "in features")?, int(ldy, "ldy")?);
        // Column-major view: yᵀ (n × rows, ld ldy) = Wᵀᵀ · xᵀ with W as (k × n, ld k)
        // transposed and x as (k × rows, ld k).
        self.blas_gemm_tn(&BlasGemm {
            m: m_i,
            n: n_i,
            k: k_i,
            a: w,
            lda: k_i,
            b: x,
            ldb: k_i,
            c: y,
            ldc: ld,
            bf16_inputs: false,
        })
    }

    /// cuBLAS GemmEx with bf16 inputs (W `[n, k]` and x `[rows, k]` as bf16 bits), f32 output
    /// and f32 accumulation: y `[rows, n]`.
    pub(crate) fn gemm_bf16_inputs(
        &self,
        x16: u64,
        w16: u64,
        y: u64,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let (m_i, n_i, k_i) = (int(n, "out features")?, int(rows, "rows")?, int(k, "in features")?);
        self.blas_gemm_tn(&BlasGemm {
            m: m_i,
            n: n_i,
            k: k_i,
            a: w16,
            lda: k_i,
            b: x16,
            ldb: k_i,
            c: y,
            ldc: m_i,
            bf16_inputs: true,
        })
    }
}

/// The tensor-core kernel for `dtype` of `[bf16, f16]`; an error for f32 weights.
fn mma_kernel(dtype: WeightDtype, [bf16, f16]: [&'static str; 2]) -> Result<&'static str> {
    match dtype {
        WeightDtype::Bf16 => Ok(bf16),
        WeightDtype::F16 => Ok(f16),
        WeightDtype::F32 => {
            Err(Error::Backend("the tensor-core product takes bf16 or f16 weights".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::driver::{cuda_available, CudaDevice};
    use super::*;

    /// Uniform values in [-1, 1) from an xorshift generator seeded with `seed`.
    fn uniform(mut seed: u64) -> impl FnMut() -> f32 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
    }

    /// `swk_gemv_grouped_*` and `swk_gemm_grouped_*` give each group of rows, bit for bit,
    /// what its own `swk_gemv_*` / `swk_gemm_*` launch gives (groups of 1 to 16 rows next to
    /// groups of several row and column tiles), and each within 1e-5 (relative to the
    /// row's largest |y|) of the f64 product of the stored (f32, bf16 or f16) weights; rows
    /// past the groups stay untouched. Two weights per group in one launch (`pair`) give the
    /// two launches' bits.
    #[test]
    fn grouped_gemm_equals_each_groups_own_launch() {
        if !cuda_available() {
            eprintln!("skipped: no CUDA device");
            return;
        }
        let dev = CudaDevice::new(0).unwrap();
        // k = 37: the gemv's element-wise path (rows not 16-byte aligned); k = 200: its
        // 16-byte vector steps and a ragged last step.
        for k in [37usize, 200] {
            grouped_gemm_case(&dev, 150, k);
        }
    }

    fn grouped_gemm_case(dev: &CudaDevice, n: usize, k: usize) {
        let rows = [3usize, 130, 8, 9, 70, 1, 16, 17];
        let total: usize = rows.iter().sum();
        let mut next = uniform(0x2545_f491_4f6c_dd1d);
        let x: Vec<f32> = (0..(total + 2) * k).map(|_| next()).collect();
        let ws: Vec<Vec<f32>> = rows.iter().map(|_| (0..n * k).map(|_| next()).collect()).collect();
        let row0: Vec<u32> =
            rows.iter().scan(0u32, |at, &r| Some(std::mem::replace(at, *at + r as u32))).collect();
        let count: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let xd = dev.upload(&x).unwrap();
        for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
            let stored: Vec<Vec<f32>> = ws
                .iter()
                .map(|w| w.iter().map(|&v| f32::from_bits(dtype.stored_bits(v).unwrap())).collect())
                .collect();
            let raw: Vec<Vec<u16>> = stored
                .iter()
                .map(|w| w.iter().map(|&v| dtype.encode(v).unwrap() as u16).collect())
                .collect();
            // Each group's weight in its own buffer, as the experts' are; the buffers outlive
            // the launches.
            let held16: Vec<_> = raw.iter().map(|b| dev.upload(b).unwrap()).collect();
            let held32: Vec<_> = stored.iter().map(|w| dev.upload(w).unwrap()).collect();
            let addrs: Vec<u64> = (0..rows.len())
                .map(|g| if dtype.is_half() { dev.ptr(&held16[g]) } else { dev.ptr(&held32[g]) })
                .collect();
            let (ad, r0d, rd) = (
                dev.upload(&addrs).unwrap(),
                dev.upload(&row0).unwrap(),
                dev.upload(&count).unwrap(),
            );
            let y = dev.zeros::<f32>((total + 2) * n).unwrap();
            let groups = RowGroups {
                row0: dev.ptr(&r0d),
                rows: dev.ptr(&rd),
                count: rows.len(),
                min_rows: 1,
                max_rows: 130,
            };
            let px = dev.ptr(&xd);
            dev.gemm_grouped(px, dev.ptr(&ad), dtype, (dev.ptr(&y), 0), &groups, n, k).unwrap();
            let got = dev.download(&y, 0, (total + 2) * n).unwrap();
            assert!(got[total * n..].iter().all(|&v| v == 0.0), "rows past the groups written");
            // Two weights per group in one launch (the second: the next group's weight) give
            // what two launches give.
            let g_n = rows.len();
            let second: Vec<u64> = (0..g_n).map(|g| addrs[(g + 1) % g_n]).collect();
            let both = dev.upload(&[addrs.clone(), second.clone()].concat()).unwrap();
            let (sd, half) = (dev.upload(&second).unwrap(), (total + 2) * n);
            let (y2, alone) =
                (dev.zeros::<f32>(2 * half).unwrap(), dev.zeros::<f32>(half).unwrap());
            let pair = (dev.ptr(&y2), half as u64);
            dev.gemm_grouped(px, dev.ptr(&both), dtype, pair, &groups, n, k).unwrap();
            dev.gemm_grouped(px, dev.ptr(&sd), dtype, (dev.ptr(&alone), 0), &groups, n, k).unwrap();
            let (paired, alone) =
                (dev.download(&y2, 0, 2 * half).unwrap(), dev.download(&alone, 0, half).unwrap());
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&paired[..half]), bits(&got), "paired: the first weights ({dtype:?})");
            assert_eq!(bits(&paired[half..]), bits(&alone), "paired: the second ({dtype:?})");
            for (g, &r) in rows.iter().enumerate() {
                let at = row0[g] as usize;
                let alone = dev.zeros::<f32>(r * n).unwrap();
                let xg = dev.ptr(&xd) + (at * k * 4) as u64;
                dev.gemm_kernel(xg, addrs[g], dtype, dev.ptr(&alone), r, n, k).unwrap();
                let alone = dev.download(&alone, 0, r * n).unwrap();
                let mine = &got[at * n..(at + r) * n];
                let same = mine.iter().zip(&alone).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "group {g} ({r} rows, {dtype:?}, k {k}) differs from its own launch");
                if r <= kernels::GEMV_MAX_ROWS {
                    // The gemv's value for a row does not depend on the rows beside it.
                    let last = dev.zeros::<f32>(n).unwrap();
                    let xl = xg + ((r - 1) * k * 4) as u64;
                    dev.gemm_kernel(xl, addrs[g], dtype, dev.ptr(&last), 1, n, k).unwrap();
                    let last = dev.download(&last, 0, n).unwrap();
                    let same = mine[(r - 1) * n..]
                        .iter()
                        .zip(&last)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "group {g}: its last row alone differs ({dtype:?}, k {k})");
                }
                for t in 0..r {
                    let xr = &x[(at + t) * k..(at + t + 1) * k];
                    let want: Vec<f64> = (0..n)
                        .map(|o| {
                            let wr = &stored[g][o * k..(o + 1) * k];
                            xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum()
                        })
                        .collect();
                    let scale = want.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
                    for (o, w) in want.iter().enumerate() {
                        let err = (mine[t * n + o] as f64 - w).abs() / scale;
                        assert!(err <= 1e-5, "group {g} row {t} col {o} (k {k}): {err:.2e}");
                    }
                }
            }
        }
    }

    /// `swk_gemm_mma_bf16` and `_f16` (the `mma` engine) against the f64 product of the stored
    /// weights, within 1e-5 of Σ|x·w| per value (x's two bf16 terms hold about 16 of its bits, its
    /// two f16 terms 22 after the row's scaling; among values of about 1, an outlier of 1500 and
    /// one of -2e5, beyond f16's range, and a row of values near 1e-6): 1, 8, 9 and 16 rows (one
    /// and two tiles of 8), n not a multiple of 16, k a multiple of 8 but not of 32, one slab and
    /// several (a ragged last one), slabs staged in one round and in several, y rows wider than n
    /// (the gaps untouched). A second launch gives the same bits (the counters were left at zero);
    /// on the emulator, so does the reversed order of threads and blocks (the last block to finish
    /// adds the slabs). The grouped kernels: each group of rows (16, 3, 0, 1 and 9, each with its
    /// own weight, k staged in two rounds) within the same bound, rows past the groups untouched;
    /// two weights per group in one launch give the two launches' bits.
    #[test]
    fn mma_products_match_f64() {
        if !cuda_available() {
            eprintln!("skipped: no CUDA device");
            return;
        }
        let dev = CudaDevice::new(0).unwrap();
        let mut next = uniform(0x853c_49e6_748f_ea9b);
        let shapes = [
            (1, 150, 200),
            (8, 150, 64),
            (9, 150, 200),
            (16, 40, 1000),
            (9, 1500, 1504),
            (3, 520, 200),
            (5, 100, 3000),
        ];
        if super::super::EMULATED {
            // The emulator's 2 multiprocessors: one slab staged in one round and in several,
            // several slabs each staged in one round and in several.
            let plans: Vec<_> =
                shapes.iter().map(|&(r, n, k)| dev.mma_plan(r, n, k).unwrap()).collect();
            for (slabs, rounds) in [(false, false), (false, true), (true, false), (true, true)] {
                let seen = plans.iter().any(|p| (p.slabs > 1, p.slab > p.stage) == (slabs, rounds));
                assert!(seen, "no plan with several slabs {slabs}, several rounds {rounds}");
            }
        }
        for dtype in [WeightDtype::Bf16, WeightDtype::F16] {
            for (rows, n, k) in shapes {
                let x = mma_input(rows, k, &mut next);
                let w = mma_weights(dtype, n * k, &mut next);
                mma_case(&dev, dtype, &x, &w, (rows, n, k));
            }
            mma_grouped_case(&dev, dtype, &mut next);
        }
    }

    /// `swk_gemm_mma_act_*` (the down product making the MLP's activation as it stages it)
    /// against `swk_act_mul` then `swk_gemm_mma_*`: the same bits in y and the same spike keys,
    /// for SiLU, GELU-tanh and GELU, gated (gate and up side by side, rows 2k apart) and not,
    /// bf16 and f16 weights, one slab and several, several column ranges (only the first
    /// range's blocks fold the keys), rows at positions from 5.
    #[test]
    fn mma_activation_equals_act_then_product() {
        use super::super::linear::Product;
        use kernels::Activation;
        if !cuda_available() {
            eprintln!("skipped: no CUDA device");
            return;
        }
        let dev = CudaDevice::new(0).unwrap();
        let mut next = uniform(0x2545_f491_4f6c_dd1d);
        let cases = [
            (9, 300, 200, Activation::Silu, true),
            (16, 150, 1504, Activation::GeluTanh, true),
            (3, 200, 96, Activation::Gelu, true),
            (1, 130, 520, Activation::Silu, false),
        ];
        for dtype in [WeightDtype::Bf16, WeightDtype::F16] {
            for (rows, n, k, act, gated) in cases {
                let ld = if gated { 2 * k } else { k };
                let pre = pre_activations(rows * ld, &mut next);
                let w = mma_weights(dtype, n * k, &mut next);
                let (pd, wd) = (dev.upload(&pre).unwrap(), dev.upload(&w).unwrap());
                let (gate, up) = match gated {
                    true => (dev.ptr(&pd), dev.ptr(&pd) + (k * 4) as u64),
                    false => (0, dev.ptr(&pd)),
                };
                let plan = dev.mma_plan(rows, n, k).unwrap();
                let (slabs, cols) = (plan.slabs, plan.launch.grid.0 as usize);
                let partial = dev.alloc::<f32>(slabs * rows * n).unwrap();
                let counters = dev.zeros::<u32>(cols).unwrap();
                let ws = (dev.ptr(&partial), dev.ptr(&counters));
                let wt = (dev.ptr(&wd), dtype);
                let pos0 = 5;
                // The activation launch, then the product of what it wrote.
                let a = dev.alloc::<f32>(rows * k).unwrap();
                let (keys_a, keys_b) = (dev.zeros::<u64>(k).unwrap(), dev.zeros::<u64>(k).unwrap());
                let (ya, yb) =
                    (dev.alloc::<f32>(rows * n).unwrap(), dev.alloc::<f32>(rows * n).unwrap());
                let g = gated.then_some(Product::Rows(gate, ld));
                let at = (pos0, 0);
                let u = Product::Rows(up, ld);
                dev.act_mul(g, u, (dev.ptr(&a), 0), rows, k, at, dev.ptr(&keys_a), act).unwrap();
                let x = kernels::MmaInput::rows(dev.ptr(&a), k);
                dev.gemm_mma(x, wt, dev.ptr(&ya), n, (rows, n, k), &plan, ws).unwrap();
                // The one launch.
                let keys = (pos0, dev.ptr(&keys_b));
                let x = kernels::MmaInput { x: up, gate, ld, act: Some(act), keys };
                dev.gemm_mma(x, wt, dev.ptr(&yb), n, (rows, n, k), &plan, ws).unwrap();
                let what =
                    format!("{dtype:?} {act:?} gated {gated}, {rows} × {n} × {k}, {slabs} slabs");
                let (ya, yb) = (
                    dev.download(&ya, 0, rows * n).unwrap(),
                    dev.download(&yb, 0, rows * n).unwrap(),
                );
                assert!(ya.iter().all(|v| v.is_finite()), "{what}: y not finite");
                let (ka, kb) =
                    (dev.download(&keys_a, 0, k).unwrap(), dev.download(&keys_b, 0, k).unwrap());
                assert!(ka.iter().all(|&key| key != 0), "{what}: a column without a key");
                assert_same_bits(&what, (&ya, &yb), (&ka, &kb));
            }
        }
    }

    /// `swk_gemm_mma_act_grouped_*` (a sparse layer's down products making the experts'
    /// activation as they stage it) against `swk_act_mul_grouped` then
    /// `swk_gemm_mma_grouped_*`: the same bits in y and the same spike keys in each group's
    /// own key range, bf16 and f16 weights, groups of 16, 3, 0, 1 and 9 rows (the empty one
    /// launches nothing), three column ranges (only the first folds the keys), k staged in two
    /// rounds, positions from an array (tokens repeat across groups, as routed rows do); rows
    /// past the groups untouched.
    #[test]
    fn mma_grouped_activation_equals_act_then_product() {
        use kernels::Activation;
        if !cuda_available() {
            eprintln!("skipped: no CUDA device");
            return;
        }
        let dev = CudaDevice::new(0).unwrap();
        let mut next = uniform(0x9e37_79b9_7f4a_7c15);
        let (n, k) = (300usize, 1000usize);
        let rows = [16usize, 3, 0, 1, 9];
        let total: usize = rows.iter().sum();
        let row0: Vec<u32> =
            rows.iter().scan(0u32, |at, &r| Some(std::mem::replace(at, *at + r as u32))).collect();
        let count: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        // Each group's keys at its own offset, with a gap between groups.
        let key_at: Vec<u32> = (0..rows.len() as u32).map(|g| g * (k as u32 + 7)).collect();
        let key_len = rows.len() * (k + 7);
        let pos: Vec<u32> = (0..total as u32).map(|r| 3 + (r * 5) % 11).collect();
        let (gate, up) =
            (pre_activations(total * k, &mut next), pre_activations(total * k, &mut next));
        for dtype in [WeightDtype::Bf16, WeightDtype::F16] {
            let held: Vec<_> = rows
                .iter()
                .map(|_| dev.upload(&mma_weights(dtype, n * k, &mut next)).unwrap())
                .collect();
            let addrs: Vec<u64> = held.iter().map(|b| dev.ptr(b)).collect();
            let (gd, ud, ad) =
                (dev.upload(&gate).unwrap(), dev.upload(&up).unwrap(), dev.upload(&addrs).unwrap());
            let (r0d, rd) = (dev.upload(&row0).unwrap(), dev.upload(&count).unwrap());
            let (pd, kad) = (dev.upload(&pos).unwrap(), dev.upload(&key_at).unwrap());
            let groups = RowGroups {
                row0: dev.ptr(&r0d),
                rows: dev.ptr(&rd),
                count: rows.len(),
                min_rows: 0,
                max_rows: 16,
            };
            let (keys_a, keys_b) =
                (dev.zeros::<u64>(key_len).unwrap(), dev.zeros::<u64>(key_len).unwrap());
            let (ya, yb) = (
                dev.upload(&vec![f32::NAN; (total + 1) * n]).unwrap(),
                dev.upload(&vec![f32::NAN; (total + 1) * n]).unwrap(),
            );
            let (g, u, w) = (dev.ptr(&gd), dev.ptr(&ud), (dev.ptr(&ad), dtype));
            // The activation launch, then the product of what it wrote.
            let a = dev.alloc::<f32>(total * k).unwrap();
            let keys = (dev.ptr(&keys_a), dev.ptr(&kad));
            let act = Activation::Silu;
            dev.act_mul_grouped(g, u, dev.ptr(&a), &groups, k, dev.ptr(&pd), keys, act).unwrap();
            dev.gemm_mma_grouped(dev.ptr(&a), w, (dev.ptr(&ya), 0), &groups, n, k).unwrap();
            // The one launch.
            let keys = (dev.ptr(&keys_b), dev.ptr(&kad));
            dev.gemm_mma_act_grouped(
                (g, u, act),
                w,
                dev.ptr(&yb),
                &groups,
                (n, k),
                dev.ptr(&pd),
                keys,
            )
            .unwrap();
            let (ya, yb) = (
                dev.download(&ya, 0, (total + 1) * n).unwrap(),
                dev.download(&yb, 0, (total + 1) * n).unwrap(),
            );
            assert!(ya[..total * n].iter().all(|v| v.is_finite()), "{dtype:?}: y not finite");
            assert!(yb[total * n..].iter().all(|v| v.is_nan()), "{dtype:?}: a row past the groups");
            let (ka, kb) = (
                dev.download(&keys_a, 0, key_len).unwrap(),
                dev.download(&keys_b, 0, key_len).unwrap(),
            );
            for (gi, &r) in rows.iter().enumerate() {
                let range = &ka[key_at[gi] as usize..key_at[gi] as usize + k];
                assert!(
                    range.iter().all(|&key| (key != 0) == (r > 0)),
                    "{dtype:?}: group {gi}'s keys"
                );
            }
            assert_same_bits(&format!("{dtype:?}"), (&ya, &yb), (&ka, &kb));
        }
        let too_many = RowGroups { row0: 0, rows: 0, count: 1, min_rows: 17, max_rows: 17 };
        let w = (0, WeightDtype::Bf16);
        let acts = (0, 0, Activation::Silu);
        assert!(dev.gemm_mma_act_grouped(acts, w, 0, &too_many, (n, k), 0, (0, 0)).is_err());
    }

    /// Pre-activations of about 4, one outlier (60) and a repeated value (2.5: a tie) every
    /// 97.
    fn pre_activations(len: usize, next: &mut impl FnMut() -> f32) -> Vec<f32> {
        (0..len)
            .map(|i| match i % 97 {
                0 => 60.0,
                1 | 2 => 2.5,
                _ => next() * 4.0,
            })
            .collect()
    }

    /// Assert two launches' outputs (`y`) and spike keys are the same bits.
    fn assert_same_bits(what: &str, (ya, yb): (&[f32], &[f32]), (ka, kb): (&[u64], &[u64])) {
        let at = ya.iter().zip(yb).position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(at, None, "{what}: y differs at this index");
        let at = ka.iter().zip(kb).position(|(a, b)| a != b);
        assert_eq!(at, None, "{what}: spike keys differ at this index");
    }

    /// `rows` × `k` inputs of about 1, with outliers (1500, -2e5) and, in row 1, values near
    /// 1e-6.
    fn mma_input(rows: usize, k: usize, next: &mut impl FnMut() -> f32) -> Vec<f32> {
        (0..rows * k)
            .map(|i| match i {
                3 => 1500.0,
                5 => -2e5,
                _ if i / k == 1 => next() * 1e-6,
                _ => next(),
            })
            .collect()
    }

    /// `count` weights of about 0.1 stored as `dtype`, as raw 16-bit patterns.
    fn mma_weights(dtype: WeightDtype, count: usize, next: &mut impl FnMut() -> f32) -> Vec<u16> {
        (0..count).map(|_| dtype.encode(next() * 0.1).unwrap() as u16).collect()
    }

    /// Assert `got[t * ldy + o]` is within 1e-5 of Σ|x·w| of the f64 product of rows `t` of
    /// x (`[.., k]`) and `w` (`dtype` bits, `[n, k]`), for t in `rows`.
    #[allow(clippy::too_many_arguments)]
    fn assert_mma_rows(
        got: &[f32],
        ldy: usize,
        x: &[f32],
        w: &[u16],
        dtype: WeightDtype,
        rows: std::ops::Range<usize>,
        (n, k): (usize, usize),
        what: &str,
    ) {
        for t in rows {
            for o in 0..n {
                let (mut want, mut size) = (0f64, 0f64);
                for i in 0..k {
                    let wv = f32::from_bits(dtype.decode(w[o * k + i] as u32)) as f64;
                    want += x[t * k + i] as f64 * wv;
                    size += (x[t * k + i] as f64 * wv).abs();
                }
                let err = (got[t * ldy + o] as f64 - want).abs() / size.max(1e-30);
                assert!(err <= 1e-5, "{what} {dtype:?}: y[{t}, {o}] off by {err:.2e}");
            }
        }
    }

    fn mma_case(
        dev: &CudaDevice,
        dtype: WeightDtype,
        x: &[f32],
        w: &[u16],
        (rows, n, k): (usize, usize, usize),
    ) {
        let ldy = n + 3;
        let (xd, wd) = (dev.upload(x).unwrap(), dev.upload(w).unwrap());
        let plan = dev.mma_plan(rows, n, k).unwrap();
        let (slabs, cols) = (plan.slabs, plan.launch.grid.0 as usize);
        let partial = dev.alloc::<f32>(slabs * rows * n).unwrap();
        let counters = dev.zeros::<u32>(cols).unwrap();
        let run = || {
            let y = dev.upload(&vec![f32::NAN; rows * ldy]).unwrap();
            let ws = (dev.ptr(&partial), dev.ptr(&counters));
            let w = (dev.ptr(&wd), dtype);
            dev.gemm_mma(
                kernels::MmaInput::rows(dev.ptr(&xd), k),
                w,
                dev.ptr(&y),
                ldy,
                (rows, n, k),
                &plan,
                ws,
            )
            .unwrap();
            dev.download(&y, 0, rows * ldy).unwrap()
        };
        let got = run();
        let at = format!("{rows} × {n} × {k}, {slabs} slabs");
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&run()), bits(&got), "a second launch ({at}, {dtype:?})");
        if super::super::emulate_in_reverse(true) {
            let reversed = run();
            super::super::emulate_in_reverse(false);
            assert_eq!(bits(&reversed), bits(&got), "reversed order ({at}, {dtype:?})");
        }
        assert_eq!(dev.download(&counters, 0, cols).unwrap(), vec![0; cols]);
        for t in 0..rows {
            assert!(got[t * ldy + n..(t + 1) * ldy].iter().all(|v| v.is_nan()), "gap written");
        }
        assert_mma_rows(&got, ldy, x, w, dtype, 0..rows, (n, k), &at);
    }

    fn mma_grouped_case(dev: &CudaDevice, dtype: WeightDtype, next: &mut impl FnMut() -> f32) {
        let (n, k) = (150usize, 1000usize);
        let rows = [16usize, 3, 0, 1, 9];
        let total: usize = rows.iter().sum();
        let row0: Vec<u32> =
            rows.iter().scan(0u32, |at, &r| Some(std::mem::replace(at, *at + r as u32))).collect();
        let x = mma_input(total, k, next);
        let ws: Vec<Vec<u16>> = rows.iter().map(|_| mma_weights(dtype, n * k, next)).collect();
        let held: Vec<_> = ws.iter().map(|w| dev.upload(w).unwrap()).collect();
        let addrs: Vec<u64> = held.iter().map(|b| dev.ptr(b)).collect();
        let count: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let (xd, ad) = (dev.upload(&x).unwrap(), dev.upload(&addrs).unwrap());
        let (r0d, rd) = (dev.upload(&row0).unwrap(), dev.upload(&count).unwrap());
        let y = dev.upload(&vec![f32::NAN; (total + 1) * n]).unwrap();
        let groups = RowGroups {
            row0: dev.ptr(&r0d),
            rows: dev.ptr(&rd),
            count: rows.len(),
            min_rows: 0,
            max_rows: 16,
        };
        let (px, pa, py) = (dev.ptr(&xd), (dev.ptr(&ad), dtype), (dev.ptr(&y), 0));
        dev.gemm_mma_grouped(px, pa, py, &groups, n, k).unwrap();
        let got = dev.download(&y, 0, (total + 1) * n).unwrap();
        assert!(got[total * n..].iter().all(|v| v.is_nan()), "a row past the groups written");
        // Two weights per group in one launch (the second: the next group's weight) give what
        // two launches give.
        let g_n = rows.len();
        let second: Vec<u64> = (0..g_n).map(|g| addrs[(g + 1) % g_n]).collect();
        let both = dev.upload(&[addrs.clone(), second.clone()].concat()).unwrap();
        let (sd, half) = (dev.upload(&second).unwrap(), (total + 1) * n);
        let y2 = dev.upload(&vec![f32::NAN; 2 * half]).unwrap();
        let alone = dev.upload(&vec![f32::NAN; half]).unwrap();
        let pair = (dev.ptr(&y2), half as u64);
        dev.gemm_mma_grouped(px, (dev.ptr(&both), dtype), pair, &groups, n, k).unwrap();
        dev.gemm_mma_grouped(px, (dev.ptr(&sd), dtype), (dev.ptr(&alone), 0), &groups, n, k)
            .unwrap();
        let (paired, alone) =
            (dev.download(&y2, 0, 2 * half).unwrap(), dev.download(&alone, 0, half).unwrap());
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&paired[..half]), bits(&got), "paired: the first weights ({dtype:?})");
        assert_eq!(bits(&paired[half..]), bits(&alone), "paired: the second ({dtype:?})");
        for (g, &r) in rows.iter().enumerate() {
            let at = row0[g] as usize;
            // Group g's rows against its own weight.
            let mine = &got[at * n..(at + r) * n];
            let xg = &x[at * k..(at + r) * k];
            assert_mma_rows(mine, n, xg, &ws[g], dtype, 0..r, (n, k), &format!("group {g}"));
        }
        let too_many = RowGroups { max_rows: 17, ..groups };
        assert!(dev.gemm_mma_grouped(px, pa, py, &too_many, n, k).is_err());
    }

    /// Timing, measures only (run with `--ignored` on a GPU machine): swk's gemv at
    /// Llama-2-7B shapes for 1 to 16 rows, in GB/s of weights read and f32 GFMA/s, beside
    /// cuBLAS's bf16-input product of twice the rows (what `cublas-split` runs for bf16
    /// weights), and the `mma` engine's tensor-core product (bf16). Each the mean of 20
    /// back-to-back launches after one warm-up. Appended to
    /// `$SWK_TIMING_OUT` when set.
    #[test]
    #[ignore = "GPU timing: run with --ignored on a GPU machine"]
    fn gemv_rates() {
        if !cuda_available() || super::super::EMULATED {
            eprintln!("skipped: needs a real CUDA device");
            return;
        }
        let dev = CudaDevice::new(0).unwrap();
        let mean_us = |f: &dyn Fn()| -> f64 {
            f();
            dev.synchronize().unwrap();
            let t = std::time::Instant::now();
            for _ in 0..20 {
                f();
            }
            dev.synchronize().unwrap();
            t.elapsed().as_secs_f64() * 1e6 / 20.0
        };
        let mut lines = vec![
            String::new(),
            "swk_gemv_* at Llama-2-7B shapes (mean of 20 launches; GB/s of weights read, f32 GFMA/s), \
             beside cuBLAS bf16 GemmEx on twice the rows (cublas-split's product):"
                .to_string(),
            String::new(),
            "| weights | n × k | rows | gemv µs | GB/s | GFMA/s | cuBLAS bf16, 2 × rows: µs | GB/s | mma µs | GB/s |".into(),
            "|---|---|---|---|---|---|---|---|---|---|".into(),
        ];
        // The products of a 7B layer, and q/k/v and gate/up fused into one product each.
        let shapes =
            [(4096usize, 4096usize), (11008, 4096), (4096, 11008), (12288, 4096), (22016, 4096)];
        let (max_rows, max_dim) = (kernels::GEMV_MAX_ROWS, 22016 * 4096);
        let x = dev.alloc::<f32>(max_rows * 11008).unwrap();
        let x16 = dev.alloc::<u16>(2 * max_rows * 11008).unwrap();
        let y = dev.alloc::<f32>(2 * max_rows * 22016).unwrap();
        let mut blas9 = std::collections::BTreeMap::new();
        let mut mma9 = std::collections::BTreeMap::new();
        // The tensor-core product's partial sums and counters, for the largest plan here.
        let partial = dev.alloc::<f32>(kernels::MMA_MAX_ROWS * 16 * 22016).unwrap();
        let counters = dev.zeros::<u32>(22016usize.div_ceil(kernels::MMA_COLS)).unwrap();
        let ws = (dev.ptr(&partial), dev.ptr(&counters));
        dev.fill_normal(dev.ptr(&x), WeightDtype::F32, max_rows * 11008, 3, 0.0, 1.0).unwrap();
        dev.fill_normal(dev.ptr(&x16), WeightDtype::Bf16, 2 * max_rows * 11008, 4, 0.0, 1.0)
            .unwrap();
        for dtype in [WeightDtype::Bf16, WeightDtype::F32, WeightDtype::F16] {
            let w = dev.alloc::<u8>(max_dim * dtype.bytes()).unwrap();
            dev.fill_normal(dev.ptr(&w), dtype, max_dim, 5, 0.0, 0.02).unwrap();
            for (n, k) in shapes {
                for rows in [1usize, 4, 9, 16] {
                    let (px, pw, py) = (dev.ptr(&x), dev.ptr(&w), dev.ptr(&y));
                    let us = mean_us(&|| dev.gemm_kernel(px, pw, dtype, py, rows, n, k).unwrap());
                    let bytes = (n * k * dtype.bytes()) as f64;
                    let fma = (rows * n * k) as f64;
                    let blas = if dtype == WeightDtype::Bf16 && dev.has_cublas() {
                        let p16 = dev.ptr(&x16);
                        let b =
                            mean_us(&|| dev.gemm_bf16_inputs(p16, pw, py, 2 * rows, n, k).unwrap());
                        if rows == 9 {
                            blas9.insert((n, k), b);
                        }
                        format!("{b:.1} | {:.0}", bytes / b / 1e3)
                    } else {
                        "- | -".to_string()
                    };
                    let mma = if dtype == WeightDtype::Bf16 {
                        let plan = dev.mma_plan(rows, n, k).unwrap();
                        assert!(plan.slabs * rows * n <= partial.len(), "partial sums too small");
                        let m = mean_us(&|| {
                            dev.gemm_mma(
                                kernels::MmaInput::rows(px, k),
                                (pw, dtype),
                                py,
                                n,
                                (rows, n, k),
                                &plan,
                                ws,
                            )
                            .unwrap()
                        });
                        if rows == 9 {
                            mma9.insert((n, k), m);
                        }
                        format!("{m:.1} | {:.0}", bytes / m / 1e3)
                    } else {
                        "- | -".to_string()
                    };
                    lines.push(format!(
                        "| {} | {n} × {k} | {rows} | {us:.1} | {:.0} | {:.0} | {blas} | {mma} |",
                        dtype.name(),
                        bytes / us / 1e3,
                        fma / us / 1e3
                    ));
                }
            }
        }
        if blas9.len() == shapes.len() {
            // A detection pass's products (9 tokens, so 18 rows split): 32 layers of q, k, v,
            // o (4096 × 4096), gate, up (11008 × 4096) and down (4096 × 11008); fused, q/k/v
            // and gate/up as one product each. Against the pass's time, the rest is the
            // other kernels.
            let t = |n: usize, k: usize| blas9[&(n, k)];
            let apart = 32.0 * (4.0 * t(4096, 4096) + 2.0 * t(11008, 4096) + t(4096, 11008));
            let fused = 32.0 * (t(12288, 4096) + t(4096, 4096) + t(22016, 4096) + t(4096, 11008));
            lines.push(String::new());
            lines.push(format!(
                "cuBLAS bf16 products of a 9-token 7B detection pass (32 layers, 18 split rows): \
                 {:.2} ms as 7 products per layer, {:.2} ms with q/k/v and gate/up fused (4).",
                apart / 1e3,
                fused / 1e3
            ));
        }
        if dev.has_cublas() {
            // The mma plan's blocks per multiprocessor (the engine uses 2), at 9 rows.
            lines.push(String::new());
            lines.push(format!(
                "mma at 9 rows by target blocks per multiprocessor ({} SMs): µs (slabs)",
                dev.sm_count()
            ));
            lines.push(String::new());
            lines.push("| n × k | 1 | 2 | 4 | 8 |".into());
            lines.push("|---|---|---|---|---|".into());
            let w = dev.alloc::<u16>(max_dim).unwrap();
            dev.fill_normal(dev.ptr(&w), WeightDtype::Bf16, max_dim, 5, 0.0, 0.02).unwrap();
            let (px, pw, py) = (dev.ptr(&x), dev.ptr(&w), dev.ptr(&y));
            for (n, k) in shapes {
                let cells: Vec<String> = [1usize, 2, 4, 8]
                    .iter()
                    .map(|per| {
                        let plan = kernels::mma(9, n, k, per * dev.sm_count()).unwrap();
                        assert!(plan.slabs * 9 * n <= partial.len(), "partial sums too small");
                        let m = mean_us(&|| {
                            dev.gemm_mma(
                                kernels::MmaInput::rows(px, k),
                                (pw, WeightDtype::Bf16),
                                py,
                                n,
                                (9, n, k),
                                &plan,
                                ws,
                            )
                            .unwrap()
                        });
                        format!("{m:.1} ({})", plan.slabs)
                    })
                    .collect();
                lines.push(format!("| {n} × {k} | {} |", cells.join(" | ")));
            }
        }
        if mma9.len() == shapes.len() {
            let t = |n: usize, k: usize| mma9[&(n, k)];
            let fused = 32.0 * (t(12288, 4096) + t(4096, 4096) + t(22016, 4096) + t(4096, 11008));
            let bytes = 32.0 * 2.0 * 4096.0 * (12288.0 + 4096.0 + 22016.0 + 11008.0);
            lines.push(format!(
                "mma products of the same pass (q/k/v and gate/up grouped, 9 rows): {:.2} ms, \
                 {:.0} GB/s of weights.",
                fused / 1e3,
                bytes / fused / 1e3
            ));
        }
        let text = lines.join("\n") + "\n";
        eprint!("{text}");
        if let Some(p) = std::env::var_os("SWK_TIMING_OUT") {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(p).unwrap();
            f.write_all(text.as_bytes()).unwrap();
        }
    }
}
