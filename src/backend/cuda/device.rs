//! The typed kernel launchers of a [`CudaDevice`], one per kernel of `kernels/*.cu` (see
//! there for the math), the cuBLAS products in swk's row-major terms, and the measured
//! copy and GEMM rates. The device itself (buffers, copies, launches, cuBLAS) is
//! `driver.rs` on a GPU and `emu.rs` under the CPU emulator: this file is shared by both,
//! so the emulator runs exactly the launches a GPU gets.

use super::driver::CudaDevice;
use super::kernels::{self, int, Launch};
use super::linear::Product;
use super::{be, BlasGemm};
use crate::backend::WeightDtype;
use crate::{Error, Result};

/// Launch kernel `$name` on the device's stream with the listed arguments (each pushed by
/// reference: addresses as u64, dimensions as i32/u64/f32/f64 values).
macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let name: &'static str = $name;
        let cfg: Launch = $cfg;
        let mut b = $dev.launcher(name)?;
        $( b.arg(&$arg); )+
        // SAFETY: each launcher passes exactly the kernel's parameter list, with buffers sized
        // for the launch by its caller.
        unsafe { b.launch(cfg) }.map_err(be(name))
    }};
}

impl CudaDevice {
    /// Measured device-to-device copy rate in bytes moved per second (read plus written), over
    /// `reps` copies of a `bytes`-byte buffer after one warm-up: the bandwidth against which
    /// memory-bound passes are judged.
    pub fn measure_copy_rate(&self, bytes: usize, reps: usize) -> Result<f64> {
        self.bind()?;
        let n = bytes / 4;
        let src = self.zeros::<u32>(n)?;
        let mut dst = self.zeros::<u32>(n)?;
        self.copy(&src, &mut dst, n)?;
        self.synchronize()?;
        let t = std::time::Instant::now();
        for _ in 0..reps.max(1) {
            self.copy(&src, &mut dst, n)?;
        }
        self.synchronize()?;
        Ok(2.0 * (n * 4) as f64 * reps.max(1) as f64 / t.elapsed().as_secs_f64())
    }

    /// Measured cuBLAS bf16 GEMM rate (bf16 inputs, f32 accumulation and output) in FLOP/s,
    /// on `n`×`n`×`n` products of random data, `reps` after one warm-up.
    pub fn measure_bf16_gemm_rate(&self, n: usize, reps: usize) -> Result<f64> {
        self.bind()?;
        let a = self.alloc::<u16>(n * n)?;
        let b = self.alloc::<u16>(n * n)?;
        let c = self.alloc::<f32>(n * n)?;
        self.fill_normal(self.ptr(&a), WeightDtype::Bf16, n * n, 1, 0.0, 1.0)?;
        self.fill_normal(self.ptr(&b), WeightDtype::Bf16, n * n, 2, 0.0, 1.0)?;
        let (pa, pb, pc) = (self.ptr(&a), self.ptr(&b), self.ptr(&c));
        self.gemm_bf16_inputs(pa, pb, pc, n, n, n)?;
        self.synchronize()?;
        let t = std::time::Instant::now();
        for _ in 0..reps.max(1) {
            self.gemm_bf16_inputs(pa, pb, pc, n, n, n)?;
        }
        self.synchronize()?;
        Ok(2.0 * (n as f64).powi(3) * reps.max(1) as f64 / t.elapsed().as_secs_f64())
    }

    /// x[t] = emb[tokens[t]] · scale for `rows` tokens, embedding width `h`, the table stored
    /// as `dtype`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn embed(
        &self,
        emb: u64,
        dtype: WeightDtype,
        tokens: u64,
        x: u64,
        rows: usize,
        h: usize,
        scale: f32,
    ) -> Result<()> {
        let (rows_i, h_i) = (int(rows, "rows")?, int(h, "hidden")?);
        let name = by_dtype(dtype, ["swk_embed_f32", "swk_embed_bf16", "swk_embed_f16"]);
        let l = kernels::elementwise((rows * h) as u64)?;
        launch!(self, name, l, emb, tokens, x, rows_i, h_i, scale)
    }

    /// out = rmsnorm(x) ⊙ w per row of width `n` (⊙ (1 + w) with `plus_one`, Gemma); `out`
    /// may be `x`. With `split != 0`, out's two bf16 terms also go there (`2 · rows · n`
    /// values: the `cublas-split` input of the next product).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rmsnorm(
        &self,
        x: u64,
        w: u64,
        (out, split): (u64, u64),
        rows: usize,
        n: usize,
        eps: f64,
        plus_one: bool,
    ) -> Result<()> {
        let (n_i, p1) = (int(n, "width")?, plus_one as i32);
        launch!(self, "swk_rmsnorm", kernels::per_row(rows)?, x, w, out, n_i, eps, p1, split)
    }

    /// x += y (whole, or the `cublas-split` terms), then [`Self::rmsnorm`] of x into `out`
    /// (and its split): one launch for a residual add and the norm after it. With `keys` not
    /// 0, y's spike statistics (rows at positions `pos0`..) go there as
    /// [`Self::add_residual`] reduces them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn add_rmsnorm(
        &self,
        x: u64,
        y: Product,
        w: u64,
        (out, split): (u64, u64),
        rows: usize,
        n: usize,
        eps: f64,
        plus_one: bool,
        (pos0, keys): (usize, u64),
    ) -> Result<()> {
        if y.row_stride(n) != n {
            return Err(Error::Backend("a residual add of a product with wider rows".into()));
        }
        let (n_i, p1, p) = (int(n, "width")?, plus_one as i32, int(pos0, "position")?);
        let (y, lo) = y.parts();
        let l = kernels::per_row(rows)?;
        launch!(self, "swk_add_rmsnorm", l, x, y, lo, w, out, n_i, eps, p1, split, p, keys)
    }

    /// out = (x - mean) / sqrt(var + eps) · w + b per row of width `n` (LayerNorm; `w` and
    /// `b` are device addresses, 0 for none: OLMo has neither); `out` may be `x`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn layernorm(
        &self,
        x: u64,
        w: u64,
        b: u64,
        out: u64,
        rows: usize,
        n: usize,
        eps: f64,
    ) -> Result<()> {
        let n_i = int(n, "width")?;
        launch!(self, "swk_layernorm", kernels::per_row(rows)?, x, w, b, out, n_i, eps)
    }

    /// x = cap · tanh(x / cap) over `n` elements (Gemma 2's final logits).
    pub(crate) fn softcap(&self, x: u64, n: usize, cap: f32) -> Result<()> {
        let n = n as u64;
        launch!(self, "swk_softcap", kernels::grid_stride(n)?, x, n, cap)
    }

    /// x = clamp(x, -c, c) over `n` elements (OLMo's `clip_qkv`).
    pub(crate) fn clamp(&self, x: u64, n: usize, c: f32) -> Result<()> {
        let n = n as u64;
        launch!(self, "swk_clamp", kernels::grid_stride(n)?, x, n, c)
    }

    /// RoPE in place on `rows` rows of `n_heads` heads, first row at `pos0`: pairs
    /// `(i, i + rot_half)` for `i < rot_half` of each head rotate (`rot_half = head_dim / 2`
    /// unless RoPE is partial).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rope(
        &self,
        x: u64,
        inv_freq: u64,
        rows: usize,
        n_heads: usize,
        head_dim: usize,
        rot_half: usize,
        pos0: usize,
    ) -> Result<()> {
        let [r, d, rh, p] = rope_args(rows, head_dim, rot_half, pos0)?;
        let h = int(n_heads, "heads")?;
        launch!(
            self,
            "swk_rope",
            kernels::elementwise((rows * n_heads * rot_half) as u64)?,
            x,
            inv_freq,
            r,
            h,
            d,
            rh,
            p
        )
    }

    /// q, k, v (`rows` rows of `n_heads`, `n_kv`, `n_kv` heads) out of their products (whole
    /// or `cublas-split` terms) into `q`, `k`, `v`, with q and k rotated as [`Self::rope`]
    /// rotates them, first row at `pos0`: one launch for what add_halves and rope do in five.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn qkv_rope(
        &self,
        from: [Product; 3],
        [q, k, v]: [u64; 3],
        inv_freq: u64,
        rows: usize,
        (n_heads, n_kv, head_dim): (usize, usize, usize),
        rot_half: usize,
        pos0: usize,
    ) -> Result<()> {
        let [r, d, rh, p] = rope_args(rows, head_dim, rot_half, pos0)?;
        let l = kernels::qkv_rope(rows, n_heads, n_kv, head_dim, rot_half)?;
        let [(qh, ql), (kh, kl), (vh, vl)] = from.map(Product::parts);
        let [q_ld, k_ld, v_ld] = [(from[0], n_heads), (from[1], n_kv), (from[2], n_kv)]
            .map(|(p, heads)| int(p.row_stride(heads * head_dim), "row stride"));
        let (q_ld, k_ld, v_ld) = (q_ld?, k_ld?, v_ld?);
        let (nh, nkv) = (int(n_heads, "heads")?, int(n_kv, "kv heads")?);
        launch!(
            self,
            "swk_qkv_rope",
            l,
            qh,
            ql,
            kh,
            kl,
            vh,
            vl,
            q,
            k,
            v,
            inv_freq,
            r,
            nh,
            nkv,
            d,
            rh,
            p,
            q_ld,
            k_ld,
            v_ld
        )
    }

    /// Causal attention of `rows` queries at `pos0..` against the cache: scores q·k · `scale`,
    /// soft-capped when `softcap` is set, within the sliding `window` when set; the weights
    /// also into `pattern` (`[rows, n_heads, pos0 + rows]`) unless it is 0, and out's two bf16
    /// terms into `split` unless it is 0 (the `cublas-split` input of o_proj).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention(
        &self,
        q: u64,
        kc: u64,
        vc: u64,
        (out, pattern, split): (u64, u64, u64),
        rows: usize,
        pos0: usize,
        n_heads: usize,
        n_kv: usize,
        hd: usize,
        window: Option<usize>,
        scale: f32,
        softcap: Option<f32>,
    ) -> Result<()> {
        let l = kernels::attention(rows, pos0, n_heads, hd, window, self.shared_limit)?;
        let (r, p, nh, nkv, d) = (
            int(rows, "rows")?,
            int(pos0, "position")?,
            int(n_heads, "heads")?,
            int(n_kv, "kv heads")?,
            int(hd, "head_dim")?,
        );
        let w = int(window.unwrap_or(0), "sliding window")?;
        let cap = softcap.unwrap_or(0.0);
        launch!(
            self,
            "swk_attention",
            l,
            q,
            kc,
            vc,
            out,
            pattern,
            r,
            p,
            nh,
            nkv,
            d,
            w,
            scale,
            cap,
            split
        )
    }

    /// out = act(gate) ⊙ up, or act(up) when `gate` is None (un-gated MLPs), the products
    /// whole or as the `cublas-split` terms; out's two bf16 terms also into `split` unless it
    /// is 0 (the down_proj's input). With `keys != 0`, per-column spike keys of out, the rows'
    /// positions `at`: (pos0, 0) for rows pos0, pos0 + 1, …; (_, pos) for the positions in the
    /// device array `pos` (`u32` per row: an expert's gathered tokens).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn act_mul(
        &self,
        gate: Option<Product>,
        up: Product,
        (out, split): (u64, u64),
        rows: usize,
        n: usize,
        at: (usize, u64),
        keys: u64,
        act: kernels::Activation,
    ) -> Result<()> {
        let (l, r, n_i, per_i, p) = column_launch(rows, n, at.0)?;
        let (pos, act) = (at.1, act as i32);
        let ((g, g_lo), (u, u_lo)) = (gate.map_or((0, 0), Product::parts), up.parts());
        let ld = up.row_stride(n);
        if gate.is_some_and(|g| g.row_stride(n) != ld) {
            return Err(Error::Backend("gate and up products with different row strides".into()));
        }
        let ld = int(ld, "row stride")?;
        launch!(
            self,
            "swk_act_mul",
            l,
            g,
            u,
            out,
            r,
            n_i,
            per_i,
            p,
            pos,
            keys,
            act,
            g_lo,
            u_lo,
            split,
            ld
        )
    }

    /// Per-column spike keys of y `[rows, n]` into `keys`, the rows' positions `at` as in
    /// [`Self::act_mul`] (an expert's down_proj output).
    pub(crate) fn column_max(
        &self,
        y: u64,
        rows: usize,
        n: usize,
        at: (usize, u64),
        keys: u64,
    ) -> Result<()> {
        let (l, r, n_i, per_i, p) = column_launch(rows, n, at.0)?;
        launch!(self, "swk_column_max", l, y, r, n_i, per_i, p, at.1, keys)
    }

    /// [`Self::act_mul`] (gated) for every group of rows `g` at once (the experts of a sparse
    /// layer): positions from `pos` (u32 per row), group i's keys at `keys + key_at[i]` (u32
    /// offsets in keys; `keys` 0: no statistics).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn act_mul_grouped(
        &self,
        gate: u64,
        up: u64,
        out: u64,
        g: &RowGroups,
        n: usize,
        pos: u64,
        (keys, key_at): (u64, u64),
        act: kernels::Activation,
    ) -> Result<()> {
        let (l, per) = kernels::column_stats_grouped(g.max_rows, n, g.count)?;
        let (n_i, per_i, act) = (int(n, "width")?, int(per, "rows per block")?, act as i32);
        let (row0, rows) = (g.row0, g.rows);
        launch!(
            self,
            "swk_act_mul_grouped",
            l,
            gate,
            up,
            out,
            row0,
            rows,
            n_i,
            per_i,
            pos,
            keys,
            key_at,
            act
        )
    }

    /// [`Self::column_max`] for every group of rows `g` at once, as
    /// [`Self::act_mul_grouped`] keys them.
    pub(crate) fn column_max_grouped(
        &self,
        y: u64,
        g: &RowGroups,
        n: usize,
        pos: u64,
        (keys, key_at): (u64, u64),
    ) -> Result<()> {
        let (l, per) = kernels::column_stats_grouped(g.max_rows, n, g.count)?;
        let (n_i, per_i) = (int(n, "width")?, int(per, "rows per block")?);
        let (row0, rows) = (g.row0, g.rows);
        launch!(self, "swk_column_max_grouped", l, y, row0, rows, n_i, per_i, pos, keys, key_at)
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

    /// Route `tokens` tokens (router logits `z` `[tokens, ne]`, the first at position `pos0`)
    /// to `k` of `ne` experts by `rule` (`bias`: V3's selection bias `[ne]`, 0: none), on the
    /// device (swk_moe_route, route.cu): the dispatch into `out`, with the groups of the
    /// grouped expert kernels (their weights' addresses from the layer's table `weights`,
    /// u64 `[3, ne]`), the router counters added at `tally` (0: none), `work` for the
    /// kernel's own arrays (layouts: moe.rs's `RouteLayout`). Expert e's spike keys:
    /// `first + e·stride` and `width` after that.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn moe_route(
        &self,
        z: u64,
        bias: u64,
        (tokens, ne, k, pos0): (usize, usize, usize, usize),
        rule: &kernels::RouteRule,
        (first, stride, width): (u32, u32, u32),
        (weights, work, out, tally): (u64, u64, u64, u64),
    ) -> Result<()> {
        let l = kernels::moe_route(tokens)?;
        let (t, ne_i, k_i, p) =
            (int(tokens, "tokens")?, int(ne, "experts")?, int(k, "top-k")?, int(pos0, "position")?);
        let (groups, keep) =
            (int(rule.n_group, "expert groups")?, int(rule.topk_group, "groups kept")?);
        let (scoring, renorm) = (rule.scoring as i32, rule.renorm as i32);
        // route.cu's SWK_GROUP_MAX and SWK_GROUP_TOP2_SUM (0: no groups).
        let group_score = match rule.group_score {
            crate::model::config::GroupScore::None => 0i32,
            crate::model::config::GroupScore::Max => 1,
            crate::model::config::GroupScore::Top2Sum => 2,
        };
        launch!(
            self,
            "swk_moe_route",
            l,
            z,
            bias,
            t,
            ne_i,
            k_i,
            p,
            scoring,
            groups,
            keep,
            group_score,
            renorm,
            rule.eps,
            rule.scale,
            first,
            stride,
            width,
            weights,
            work,
            out,
            tally
        )
    }

    /// out `[tokens, n]`: each token's sum of `k` expert output rows of `ys` (`slot`, u32
    /// `[tokens, k]`) times their weights (`w`, f32 `[tokens, k]`), in slot order from 0.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn moe_combine(
        &self,
        ys: u64,
        slot: u64,
        w: u64,
        out: u64,
        tokens: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        let (t, k_i, n_i) = (int(tokens, "tokens")?, int(k, "top-k")?, int(n, "width")?);
        let l = kernels::elementwise((tokens * n) as u64)?;
        launch!(self, "swk_moe_combine", l, ys, slot, w, out, t, k_i, n_i)
    }

    /// dst row r (stride `dst_stride`) = the first `cols` values of src row r / `repeat`
    /// (stride `src_stride`), zero-padded to `width`, for `rows` rows.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn copy_rows(
        &self,
        (src, src_stride, repeat): (u64, usize, usize),
        (dst, dst_stride): (u64, usize),
        rows: usize,
        cols: usize,
        width: usize,
    ) -> Result<()> {
        let (ss, rep) = (int(src_stride, "source stride")?, int(repeat, "repeat")?);
        let (ds, r) = (int(dst_stride, "destination stride")?, int(rows, "rows")?);
        let (c, w) = (int(cols, "columns")?, int(width, "width")?);
        let l = kernels::elementwise((rows * width) as u64)?;
        launch!(self, "swk_copy_rows", l, src, ss, rep, dst, ds, r, c, w)
    }

    /// RoPE of the `2 · half` dims at `at` of each `stride`-wide chunk of x (`heads` per row,
    /// row t at position pos0 + t), interleaved pairs or halves, cos/sin times `factor`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rope_at(
        &self,
        x: u64,
        inv_freq: u64,
        (rows, heads, stride, at): (usize, usize, usize, usize),
        half: usize,
        pos0: usize,
        interleave: bool,
        factor: f32,
    ) -> Result<()> {
        let (r, hs) = (int(rows, "rows")?, int(heads, "heads")?);
        let (st, a, hf) = (int(stride, "stride")?, int(at, "offset")?, int(half, "rope pairs")?);
        let (p, il) = (int(pos0, "position")?, interleave as i32);
        let l = kernels::elementwise((rows * heads * half) as u64)?;
        launch!(self, "swk_rope_at", l, x, inv_freq, r, hs, st, a, hf, p, il, factor)
    }

    /// out `[rows, n]` += sigmoid(z[row]) · y (Qwen2-MoE's gated shared expert).
    pub(crate) fn sigmoid_gate_add(
        &self,
        out: u64,
        y: u64,
        z: u64,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        let (r, n_i) = (int(rows, "rows")?, int(n, "width")?);
        let l = kernels::elementwise((rows * n) as u64)?;
        launch!(self, "swk_sigmoid_gate_add", l, out, y, z, r, n_i)
    }

    /// x += y (whole, or the `cublas-split` terms); with `keys != 0`, per-column spike keys
    /// of y.
    pub(crate) fn add_residual(
        &self,
        x: u64,
        y: Product,
        rows: usize,
        n: usize,
        pos0: usize,
        keys: u64,
    ) -> Result<()> {
        if y.row_stride(n) != n {
            return Err(Error::Backend("a residual add of a product with wider rows".into()));
        }
        let (l, r, n_i, per_i, p) = column_launch(rows, n, pos0)?;
        let (y, lo) = y.parts();
        launch!(self, "swk_add_residual", l, x, y, r, n_i, per_i, p, keys, lo)
    }

    /// y[t, o] += bias[o].
    pub(crate) fn add_bias(&self, y: u64, bias: u64, rows: usize, n: usize) -> Result<()> {
        let (r, n_i) = (int(rows, "rows")?, int(n, "width")?);
        launch!(self, "swk_add_bias", kernels::elementwise((rows * n) as u64)?, y, bias, r, n_i)
    }

    /// Per-row NLL of `targets` under `logits` `[rows, vocab]` into `out` (f64).
    pub(crate) fn nll(
        &self,
        logits: u64,
        targets: u64,
        out: u64,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        let v = int(vocab, "vocab")?;
        launch!(self, "swk_nll", kernels::per_row(rows)?, logits, targets, out, v)
    }

    /// f32 → bf16 (round to nearest even) of `n` elements.
    pub(crate) fn f32_to_bf16(&self, src: u64, dst: u64, n: usize) -> Result<()> {
        let n = n as u64;
        launch!(self, "swk_f32_to_bf16", kernels::grid_stride(n)?, src, dst, n)
    }

    /// Split `n` f32 values into bf16 hi and lo terms: `dst[..n]` = hi, `dst[n..2n]` = lo.
    pub(crate) fn split_bf16(&self, src: u64, dst: u64, n: usize) -> Result<()> {
        let n = n as u64;
        launch!(self, "swk_split_bf16", kernels::grid_stride(n)?, src, dst, n)
    }

    /// `y[i] = y2[i] + y2[n + i]` for `i < n`.
    pub(crate) fn add_halves(&self, y2: u64, y: u64, n: usize) -> Result<()> {
        let n = n as u64;
        launch!(self, "swk_add_halves", kernels::grid_stride(n)?, y2, y, n)
    }

    /// bf16 or f16 (`dtype`) → f32 (exact) of `n` elements.
    pub(crate) fn widen(&self, src: u64, dtype: WeightDtype, dst: u64, n: usize) -> Result<()> {
        let n = n as u64;
        let name = match dtype {
            WeightDtype::Bf16 => "swk_bf16_to_f32",
            WeightDtype::F16 => "swk_f16_to_f32",
            WeightDtype::F32 => {
                return Err(Error::Backend("widen: f32 weights need no widening".into()))
            }
        };
        launch!(self, name, kernels::grid_stride(n)?, src, dst, n)
    }

    /// f32 → f16 (round to nearest even; beyond ±65 504 to infinity) of `n` elements (the
    /// device conversion that `swk_fill_normal_f16` uses, tested against the host's).
    #[cfg(test)]
    pub(crate) fn f32_to_f16(&self, src: u64, dst: u64, n: usize) -> Result<()> {
        let n = n as u64;
        launch!(self, "swk_f32_to_f16", kernels::grid_stride(n)?, src, dst, n)
    }

    /// Fill `n` elements with `mean + std · N(0, 1)` from a counter-based hash of `seed`.
    pub(crate) fn fill_normal(
        &self,
        dst: u64,
        dtype: WeightDtype,
        n: usize,
        seed: u64,
        mean: f32,
        std: f32,
    ) -> Result<()> {
        let n = n as u64;
        let name =
            by_dtype(dtype, ["swk_fill_normal_f32", "swk_fill_normal_bf16", "swk_fill_normal_f16"]);
        launch!(self, name, kernels::grid_stride(n)?, dst, n, seed, mean, std)
    }

    /// Swap element `idx` of a weight buffer for `new_bits` (u32 for f32 storage, the low 16
    /// bits for a 2-byte dtype); the previous bits land in `old` (one u32 on the device).
    pub(crate) fn edit(
        &self,
        w: u64,
        dtype: WeightDtype,
        idx: usize,
        new_bits: u32,
        old: u64,
    ) -> Result<()> {
        let idx = idx as u64;
        let name = if dtype.is_half() { "swk_edit_u16" } else { "swk_edit_u32" };
        launch!(
            self,
            name,
            Launch { grid: (1, 1, 1), block: (32, 1, 1), shared_bytes: 0 },
            w,
            idx,
            new_bits,
            old
        )
    }

    /// `out[i] = w[idx[i]]` for `n` elements (u32 bits of f32 storage, or a 2-byte dtype's
    /// bits zero-extended).
    pub(crate) fn gather(
        &self,
        w: u64,
        dtype: WeightDtype,
        idx: u64,
        out: u64,
        n: usize,
    ) -> Result<()> {
        let n = n as u64;
        let name = if dtype.is_half() { "swk_gather_u16" } else { "swk_gather_u32" };
        launch!(self, name, kernels::grid_stride(n)?, w, idx, out, n)
    }

    /// `w[idx[i]] = bits[i]` for `n` elements at distinct indices (a 2-byte dtype: the low
    /// 16 bits).
    pub(crate) fn scatter(
        &self,
        w: u64,
        dtype: WeightDtype,
        idx: u64,
        bits: u64,
        n: usize,
    ) -> Result<()> {
        let n = n as u64;
        let name = if dtype.is_half() { "swk_scatter_u16" } else { "swk_scatter_u32" };
        launch!(self, name, kernels::grid_stride(n)?, w, idx, bits, n)
    }

    /// Add the checksum of `n` elements (u32 or u16 bits) into `*out` (one u64, zeroed first).
    pub(crate) fn checksum(&self, data: u64, u16_bits: bool, n: usize, out: u64) -> Result<()> {
        let n = n as u64;
        let name = if u16_bits { "swk_checksum_u16" } else { "swk_checksum_u32" };
        launch!(self, name, kernels::grid_stride(n)?, data, n, out)
    }

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

/// The variant of a kernel for weights stored as `dtype`, of its `[f32, bf16, f16]` names.
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

fn by_dtype(dtype: WeightDtype, [f32, bf16, f16]: [&'static str; 3]) -> &'static str {
    match dtype {
        WeightDtype::F32 => f32,
        WeightDtype::Bf16 => bf16,
        WeightDtype::F16 => f16,
    }
}

/// Groups of consecutive rows (the experts of a sparse layer), described on the device: u32
/// arrays of each group's first row (`row0`) and row count (`rows`).
pub(crate) struct RowGroups {
    /// Device address of the first rows.
    pub(crate) row0: u64,
    /// Device address of the row counts.
    pub(crate) rows: u64,
    /// How many groups.
    pub(crate) count: usize,
    /// The smallest row count.
    pub(crate) min_rows: usize,
    /// The largest row count.
    pub(crate) max_rows: usize,
}

/// The launch of a fused statistics kernel over `rows` × `n` (see
/// [`kernels::column_stats`]) and its int parameters: rows, width, rows per block, pos0.
/// RoPE's kernel arguments `[rows, head_dim, rot_half, pos0]`; an error unless the rotated
/// pairs fit the head.
fn rope_args(rows: usize, head_dim: usize, rot_half: usize, pos0: usize) -> Result<[i32; 4]> {
    if rot_half == 0 || 2 * rot_half > head_dim {
        return Err(Error::Backend(format!(
            "RoPE over {} of {head_dim} dims per head",
            2 * rot_half
        )));
    }
    Ok([
        int(rows, "rows")?,
        int(head_dim, "head_dim")?,
        int(rot_half, "rotary dims")?,
        int(pos0, "position")?,
    ])
}

fn column_launch(rows: usize, n: usize, pos0: usize) -> Result<(Launch, i32, i32, i32, i32)> {
    let (l, per) = kernels::column_stats(rows, n)?;
    Ok((
        l,
        int(rows, "rows")?,
        int(n, "width")?,
        int(per, "rows per block")?,
        int(pos0, "position")?,
    ))
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
                // Pre-activations of about 4, one outlier, and a repeated value (a tie).
                let pre: Vec<f32> = (0..rows * ld)
                    .map(|i| match i % 97 {
                        0 => 60.0,
                        1 | 2 => 2.5,
                        _ => next() * 4.0,
                    })
                    .collect();
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
                let bits = |v: Vec<f32>| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                let (ya, yb) = (
                    dev.download(&ya, 0, rows * n).unwrap(),
                    dev.download(&yb, 0, rows * n).unwrap(),
                );
                assert!(ya.iter().all(|v| v.is_finite()), "{what}: y not finite");
                let (ya, yb) = (bits(ya), bits(yb));
                let at = ya.iter().zip(&yb).position(|(a, b)| a != b);
                assert_eq!(at, None, "{what}: y differs at this index");
                let (ka, kb) =
                    (dev.download(&keys_a, 0, k).unwrap(), dev.download(&keys_b, 0, k).unwrap());
                assert!(ka.iter().all(|&key| key != 0), "{what}: a column without a key");
                let at = ka.iter().zip(&kb).position(|(a, b)| a != b);
                assert_eq!(at, None, "{what}: spike keys differ at this column");
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
        // Pre-activations of about 4, one outlier, and a repeated value (a tie).
        let mut pre = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|i| match i % 97 {
                    0 => 60.0,
                    1 | 2 => 2.5,
                    _ => next() * 4.0,
                })
                .collect()
        };
        let (gate, up) = (pre(total * k), pre(total * k));
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
            let bits = |v: Vec<f32>| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            let (ya, yb) = (
                dev.download(&ya, 0, (total + 1) * n).unwrap(),
                dev.download(&yb, 0, (total + 1) * n).unwrap(),
            );
            assert!(ya[..total * n].iter().all(|v| v.is_finite()), "{dtype:?}: y not finite");
            assert!(yb[total * n..].iter().all(|v| v.is_nan()), "{dtype:?}: a row past the groups");
            let (ya, yb) = (bits(ya), bits(yb));
            let at = ya.iter().zip(&yb).position(|(a, b)| a != b);
            assert_eq!(at, None, "{dtype:?}: y differs at this index");
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
            let at = ka.iter().zip(&kb).position(|(a, b)| a != b);
            assert_eq!(at, None, "{dtype:?}: spike keys differ at this index");
        }
        let too_many = RowGroups { row0: 0, rows: 0, count: 1, min_rows: 17, max_rows: 17 };
        let w = (0, WeightDtype::Bf16);
        let acts = (0, 0, Activation::Silu);
        assert!(dev.gemm_mma_act_grouped(acts, w, 0, &too_many, (n, k), 0, (0, 0)).is_err());
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

    /// The device's f32 → f16 and f32 → bf16 (`f32_to_f16_bits`, `f32_to_bf16_bits`: random
    /// weights, `cublas-bf16`'s activations) and their widenings (which every f16 and bf16
    /// kernel uses) are the host's (`half`, which uploads and edits use), bit for bit:
    /// special values, the range edges and 200 000 random f32 bit patterns; every 16-bit
    /// pattern widened. (NaN only as NaN.)
    #[test]
    fn device_half_conversions_are_the_hosts() {
        if !cuda_available() {
            eprintln!("skipped: no CUDA device");
            return;
        }
        let dev = CudaDevice::new(0).unwrap();
        let mut v: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            65504.0,
            65519.996,
            65520.0,
            -65520.0,
            1e6,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            6.1035156e-5, // the smallest normal f16
            6.1035152e-5, // just below: the largest subnormal after rounding
            5.9604645e-8, // the smallest subnormal, 2^-24
            2.9802322e-8, // 2^-25: a tie, to even (0)
            2.9802326e-8, // just above 2^-25: rounds up to 2^-24
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        v.extend((0..200_000).map(|_| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            f32::from_bits((seed >> 32) as u32)
        }));
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let (src, all_d) = (dev.upload(&v).unwrap(), dev.upload(&all).unwrap());
        for dtype in [WeightDtype::F16, WeightDtype::Bf16] {
            let dst = dev.zeros::<u16>(v.len()).unwrap();
            let (s, d) = (dev.ptr(&src), dev.ptr(&dst));
            match dtype {
                WeightDtype::F16 => dev.f32_to_f16(s, d, v.len()).unwrap(),
                _ => dev.f32_to_bf16(s, d, v.len()).unwrap(),
            }
            let got = dev.download(&dst, 0, v.len()).unwrap();
            for (x, g) in v.iter().zip(&got) {
                let back = f32::from_bits(dtype.decode(*g as u32));
                if x.is_nan() {
                    assert!(back.is_nan(), "{dtype:?} of NaN");
                } else {
                    let want = dtype.encode(*x).unwrap_or(0x7c00 | (x.to_bits() >> 16 & 0x8000));
                    assert_eq!(*g as u32, want, "{dtype:?} of {x:e} ({:#010x})", x.to_bits());
                }
            }
            let wide = dev.zeros::<f32>(all.len()).unwrap();
            dev.widen(dev.ptr(&all_d), dtype, dev.ptr(&wide), all.len()).unwrap();
            for (h, w) in all.iter().zip(dev.download(&wide, 0, all.len()).unwrap()) {
                let want = f32::from_bits(dtype.decode(*h as u32));
                let same = w.to_bits() == want.to_bits() || (w.is_nan() && want.is_nan());
                assert!(same, "{dtype:?} {h:#06x}");
            }
        }
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
