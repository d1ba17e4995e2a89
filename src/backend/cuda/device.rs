//! The typed kernel launchers of a [`CudaDevice`], one per kernel of `kernels/*.cu` (see
//! there for the math; the products' launchers are products.rs), and the measured copy and
//! GEMM rates. The device itself (buffers, copies, launches, cuBLAS) is
//! `driver.rs` on a GPU and `emu.rs` under the CPU emulator: this file is shared by both,
//! so the emulator runs exactly the launches a GPU gets.

use super::driver::CudaDevice;
use super::kernels::{self, int, Launch};
use super::linear::Product;
use crate::backend::WeightDtype;
use crate::{Error, Result};

/// Launch kernel `$name` on the device's stream with the listed arguments (each pushed by
/// reference: addresses as u64, dimensions as i32/u64/f32/f64 values).
macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let name: &'static str = $name;
        let cfg: $crate::backend::cuda::kernels::Launch = $cfg;
        let mut b = $dev.launcher(name)?;
        $( b.arg(&$arg); )+
        // SAFETY: each launcher passes exactly the kernel's parameter list, with buffers sized
        // for the launch by its caller.
        unsafe { b.launch(cfg) }.map_err($crate::backend::cuda::be(name))
    }};
}
pub(super) use launch;

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

    /// Causal attention of `s.rows` queries at `s.pos0..` against the cache `(kc, vc)` with
    /// `n_kv` heads: scores q·k · `scale`, soft-capped when `softcap` is set, within the
    /// sliding window when set; the weights also into `pattern` (`[rows, heads, pos0 + rows]`)
    /// unless it is 0, and out's two bf16 terms into `split` unless it is 0 (the
    /// `cublas-split` input of o_proj). A split decode asks `partial` for that many f32 of
    /// scratch ([`kernels::attention`] says which kernels run).
    pub(crate) fn attention(
        &self,
        (q, kc, vc): (u64, u64, u64),
        (out, pattern, split): (u64, u64, u64),
        s: &kernels::AttentionShape,
        n_kv: usize,
        (scale, softcap): (f32, Option<f32>),
        partial: impl FnOnce(usize) -> Result<u64>,
    ) -> Result<()> {
        if (kc == vc) != s.values_are_keys {
            return Err(Error::Backend(format!(
                "attention: values_are_keys is {} but the key and value caches are {}",
                s.values_are_keys,
                if kc == vc { "one buffer" } else { "two buffers" }
            )));
        }
        let limits = kernels::AttentionLimits {
            shared: self.shared_limit,
            blocks: pattern == 0
                && self.attention_blocks.load(std::sync::atomic::Ordering::Relaxed),
            split_keys: self.split_keys,
            narrow_rows: self.narrow_rows,
        };
        let plan = kernels::attention(s, &limits)?;
        let (r, p, nh, nkv, d) = (
            int(s.rows, "rows")?,
            int(s.pos0, "position")?,
            int(s.heads, "heads")?,
            int(n_kv, "kv heads")?,
            int(s.head_dim, "head_dim")?,
        );
        let w = int(s.window.unwrap_or(0), "sliding window")?;
        let (cap, tile) = (softcap.unwrap_or(0.0), int(plan.tile, "attention tile")?);
        let (kernel, l) = (plan.kernel, plan.launch);
        let part = match plan.split {
            Some(sp) => partial(sp.partial_floats(s))?,
            None => 0,
        };
        let chunk = int(plan.split.map_or(0, |sp| sp.chunk), "keys per split")?;
        match kernel {
            "swk_attention_rows" | "swk_attention_rows_wide" => {
                let g = int(plan.group, "heads a block")?;
                launch!(
                    self, kernel, l, q, kc, vc, out, pattern, r, p, nh, nkv, d, w, scale, cap,
                    split, tile, g, chunk, part
                )?
            }
            "swk_attention_split" => launch!(
                self, kernel, l, q, kc, vc, part, r, p, nh, nkv, d, w, scale, cap, tile, chunk
            )?,
            _ => launch!(
                self, kernel, l, q, kc, vc, out, pattern, r, p, nh, nkv, d, w, scale, cap, split,
                tile
            )?,
        }
        let Some(sp) = plan.split else { return Ok(()) };
        let splits = int(sp.splits, "splits")?;
        launch!(self, "swk_attention_merge", sp.merge, part, out, split, r, nh, d, splits)
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

    /// Route `tokens` tokens (router logits `z` `[tokens, ne]`, the first at position `pos0`)
    /// to `k` of `ne` experts by `rule` (`bias`: V3's selection bias `[ne]`, 0: none), on the
    /// device (swk_moe_route, route.cu): the dispatch into `out`, with the groups of the
    /// grouped expert kernels (their weights' addresses from the layer's table `weights`,
    /// u64 `[3, ne]`), the router counters added at `tally` (0: none), `work` for the
    /// kernel's own arrays (layouts: route.rs's `RouteLayout`). Expert e's spike keys:
    /// `first + e·stride` and `width` after that. More than [`kernels::ROUTE_MAX_WARPS`]
    /// tokens are routed by `swk_moe_route_tokens` over many blocks first.
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
        let launches = kernels::moe_route(tokens)?;
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
        let entropy = i32::from(tally != 0);
        if let Some(l) = launches.tokens {
            launch!(
                self,
                "swk_moe_route_tokens",
                l,
                z,
                bias,
                t,
                ne_i,
                k_i,
                scoring,
                groups,
                keep,
                group_score,
                renorm,
                rule.eps,
                rule.scale,
                work,
                entropy
            )?;
        }
        let routed = i32::from(launches.tokens.is_some());
        launch!(
            self,
            "swk_moe_route",
            launches.dispatch,
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
            tally,
            routed
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

    /// Latent attention's query absorption (kernels/mla.cu): for each of `rows · heads` rows
    /// of `q` (`q_stride` apart, `d_nope` first), `out` (`out_stride` apart) gets q_nope ·
    /// W_UK, W_UK the head's first `d_nope` rows of `kv_b` (`[heads · (d_nope + d_v), kvr]`,
    /// stored as `dtype`). `dims` = `(heads, d_nope, d_v, kvr)`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn mla_absorb_q(
        &self,
        (q, q_stride): (u64, usize),
        (kv_b, dtype): (u64, WeightDtype),
        (out, out_stride): (u64, usize),
        rows: usize,
        dims: (usize, usize, usize, usize),
    ) -> Result<()> {
        let (qs, os) = (int(q_stride, "query stride")?, int(out_stride, "output stride")?);
        let [r, hs, nope, vd, kvr] = mla_dims(rows, dims)?;
        let l = kernels::mla_absorb_q(rows, dims.0, dims.3)?;
        let names = ["swk_mla_absorb_q_f32", "swk_mla_absorb_q_bf16", "swk_mla_absorb_q_f16"];
        launch!(self, by_dtype(dtype, names), l, q, qs, kv_b, out, os, r, hs, nope, vd, kvr)
    }

    /// Latent attention's value absorption (kernels/mla.cu): for each of `rows · heads` rows
    /// of the attended latents `ctx` (`ctx_stride` apart), `out` (`[rows, heads · d_v]`) gets
    /// W_UV · ctx, W_UV the head's last `d_v` rows of `kv_b`. `dims` as for
    /// [`Self::mla_absorb_q`].
    pub(crate) fn mla_absorb_v(
        &self,
        (ctx, ctx_stride): (u64, usize),
        (kv_b, dtype): (u64, WeightDtype),
        out: u64,
        rows: usize,
        dims: (usize, usize, usize, usize),
    ) -> Result<()> {
        let cs = int(ctx_stride, "latent stride")?;
        let [r, hs, nope, vd, kvr] = mla_dims(rows, dims)?;
        let l = kernels::mla_absorb_v(rows, dims.0, dims.2)?;
        let names = ["swk_mla_absorb_v_f32", "swk_mla_absorb_v_bf16", "swk_mla_absorb_v_f16"];
        launch!(self, by_dtype(dtype, names), l, ctx, cs, kv_b, out, r, hs, nope, vd, kvr)
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

/// The variant of a kernel for weights stored as `dtype`, of its `[f32, bf16, f16]` names.
pub(super) fn by_dtype(dtype: WeightDtype, [f32, bf16, f16]: [&'static str; 3]) -> &'static str {
    match dtype {
        WeightDtype::F32 => f32,
        WeightDtype::Bf16 => bf16,
        WeightDtype::F16 => f16,
    }
}

/// The absorption kernels' `[rows, heads, d_nope, d_v, kvr]` as kernel ints.
fn mla_dims(rows: usize, (heads, nope, vd, kvr): (usize, usize, usize, usize)) -> Result<[i32; 5]> {
    Ok([
        int(rows, "rows")?,
        int(heads, "heads")?,
        int(nope, "qk_nope_head_dim")?,
        int(vd, "v_head_dim")?,
        int(kvr, "kv_lora_rank")?,
    ])
}

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

/// The launch of a fused statistics kernel over `rows` × `n` (see
/// [`kernels::column_stats`]) and its int parameters: rows, width, rows per block, pos0.
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
}
