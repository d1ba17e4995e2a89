//! DeepSeek-V2/V3's multi-head latent attention on the device, computing what
//! `model::arch::deepseek::mla` computes in its absorbed form, so that the KV cache holds
//! per position only the normalized latent `c` and the rotated rope key (`kv_lora_rank +
//! d_rope` floats a layer: 576 on DeepSeek-V3, against 2 · 128 heads · 192 expanded), shared
//! by every head. kv_b_proj's rows for head n are `[W_UK_n (d_nope) | W_UV_n (d_v)]`, so
//! `q_nope·k_nope(s) = (q_nope·W_UK_n)·c(s)` and `Σ_s p_s v(s) = W_UV_n·(Σ_s p_s c(s))`:
//!
//! ```text
//! q = q_b_proj(rmsnorm(q_a_proj(xn)))  or  q_proj(xn)            [t, heads·(d_nope + d_rope)]
//! [c | k_rope] = kv_a_proj_with_mqa(xn)                           [t, kv_lora_rank + d_rope]
//! rope(q's rope dims), rope(k_rope)        (interleaved pairs or halves, YaRN factor)
//! cache row = [rmsnorm(c) | k_rope]                               (swk_copy_rows)
//! query per head = [q_nope·W_UK_n | q_rope]                       (swk_mla_absorb_q_*)
//! ctx = attention(query, keys = values = the cache rows)          (one kv head, swk_attention)
//! o_proj([W_UV_n·ctx_n[..kv_lora_rank] per head])                 (swk_mla_absorb_v_*)
//! ```
//!
//! The attention weights (`attn.hook_pattern`) and every output are the expanded form's up to
//! float rounding; the CPU backend keeps the expanded form, which the parity tests compare.

use super::driver::{CudaDevice, CudaSlice};
use super::kernels::AttentionShape;
use super::linear::Scratch;
use super::model::{CudaModel, WeightRef};
use crate::model::arch::deepseek::{self, LATENT_NORM_EPS};
use crate::model::config::DeepseekParams;
use crate::model::ModelConfig;
use crate::{Error, Result};

/// The activation buffers of latent attention for up to `t` tokens.
pub(crate) struct MlaActs {
    /// q `[t, heads·(d_nope + d_rope)]`.
    q: CudaSlice<f32>,
    /// q_a_proj's output `[t, q_lora_rank]`, when q is low-rank.
    qa: Option<CudaSlice<f32>>,
    /// kv_a_proj_with_mqa's output `[t, kv_lora_rank + d_rope]`.
    ckv: CudaSlice<f32>,
    /// Its latent part, normalized `[t, kv_lora_rank]`.
    latent: CudaSlice<f32>,
    /// o_proj's input `[t, heads·d_v]`.
    o_in: CudaSlice<f32>,
}

impl MlaActs {
    /// Buffers for `d`'s shapes, up to `t` tokens.
    pub(crate) fn alloc(
        dev: &CudaDevice,
        c: &ModelConfig,
        d: &DeepseekParams,
        t: usize,
    ) -> Result<Self> {
        let nh = c.num_heads;
        let (nope, rd, vd, kvr) =
            (d.qk_nope_head_dim, d.qk_rope_head_dim, d.v_head_dim, d.kv_lora_rank);
        Ok(MlaActs {
            q: dev.alloc::<f32>(t * nh * (nope + rd))?,
            qa: match d.q_lora_rank {
                Some(r) => Some(dev.alloc::<f32>(t * r)?),
                None => None,
            },
            ckv: dev.alloc::<f32>(t * (kvr + rd))?,
            latent: dev.alloc::<f32>(t * kvr)?,
            o_in: dev.alloc::<f32>(t * nh * vd)?,
        })
    }
}

/// The rope of latent attention on the device: inverse frequencies over `d_rope` dims and
/// the factor on cos and sin.
pub(crate) struct MlaRope {
    inv_freq: CudaSlice<f32>,
    factor: f32,
}

impl MlaRope {
    /// `c`'s rope (YaRN-blended when configured), uploaded; None unless DeepSeek.
    pub(crate) fn of(dev: &CudaDevice, c: &ModelConfig) -> Result<Option<Self>> {
        let Some(d) = &c.family.deepseek else { return Ok(None) };
        let r = deepseek::Rotary::new(c, d);
        Ok(Some(MlaRope { inv_freq: dev.upload(&r.inv_freq)?, factor: r.factor }))
    }
}

impl CudaModel {
    /// Layer `l`'s latent attention on `xn` (`[t, hidden]`, first token at `pos0`), weights
    /// from `w(suffix)`: writes the new cache rows (`[k, _, k_new, _]`: the layer's cache and
    /// its rows at pos0; latent attention keeps no values), the absorbed queries into `q_abs`
    /// and the attended rows into `ctx` (each `[t, heads, kv_lora_rank + d_rope]`), the
    /// attention weights into `pattern` unless 0, and `o_proj`'s output into `proj`
    /// (`[q_abs, ctx, proj, pattern]`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn mla_attention(
        &self,
        l: usize,
        w: &dyn Fn(&str) -> Result<WeightRef>,
        xn: u64,
        (t, pos0): (usize, usize),
        [kc, _, k_new, _]: [u64; 4],
        [q_abs, ctx, proj, pattern]: [u64; 4],
        ma: &MlaActs,
        sc: &mut Scratch,
    ) -> Result<()> {
        let c = &self.config;
        let d = deepseek::params(c)?;
        let dev = &self.dev;
        let (h, nh) = (c.hidden_size, c.num_heads);
        let (nope, rd, vd, kvr) =
            (d.qk_nope_head_dim, d.qk_rope_head_dim, d.v_head_dim, d.kv_lora_rank);
        let (qk, row) = (nope + rd, kvr + rd);
        let wt = |name: &str| w(&format!("self_attn.{name}.weight"));
        let eps = LATENT_NORM_EPS;
        let rope = self
            .mla_rope
            .as_ref()
            .ok_or_else(|| Error::Backend("latent attention without its rope".into()))?;
        let (qr, ckv, latent) = (dev.ptr(&ma.q), dev.ptr(&ma.ckv), dev.ptr(&ma.latent));
        let o_in = dev.ptr(&ma.o_in);

        // q, low-rank or not; the latent c and the shared rope key.
        match (d.q_lora_rank, &ma.qa) {
            (Some(r), Some(qa)) => {
                let qa = dev.ptr(qa);
                self.linear(xn, &wt("q_a_proj")?, qa, t, h, r, sc)?;
                dev.rmsnorm(qa, wt("q_a_layernorm")?.f32_ptr()?, (qa, 0), t, r, eps, false)?;
                self.linear(qa, &wt("q_b_proj")?, qr, t, r, nh * qk, sc)?;
            }
            _ => self.linear(xn, &wt("q_proj")?, qr, t, h, nh * qk, sc)?,
        }
        self.linear(xn, &wt("kv_a_proj_with_mqa")?, ckv, t, h, row, sc)?;
        dev.copy_rows((ckv, row, 1), (latent, kvr), t, kvr, kvr)?;
        dev.rmsnorm(latent, wt("kv_a_layernorm")?.f32_ptr()?, (latent, 0), t, kvr, eps, false)?;

        // RoPE on q's rope dims (per head) and on the rope key (one per token).
        let inv = dev.ptr(&rope.inv_freq);
        let (half, il) = (rd / 2, d.rope_interleave);
        dev.rope_at(qr, inv, (t, nh, qk, nope), half, pos0, il, rope.factor)?;
        dev.rope_at(ckv, inv, (t, 1, row, kvr), half, pos0, il, rope.factor)?;

        // The cache rows [rmsnorm(c) | k_rope]; the queries [q_nope·W_UK | q_rope] per head.
        dev.copy_rows((latent, kvr, 1), (k_new, row), t, kvr, kvr)?;
        let at = |p: u64, floats: usize| p + (floats * 4) as u64;
        dev.copy_rows((at(ckv, kvr), row, 1), (at(k_new, kvr), row), t, rd, rd)?;
        let kv_b = wt("kv_b_proj")?;
        check_kv_b(&kv_b, nh * (nope + vd), kvr)?;
        let dims = (nh, nope, vd, kvr);
        dev.mla_absorb_q((qr, qk), (kv_b.ptr, kv_b.dtype), (q_abs, row), t, dims)?;
        dev.copy_rows((at(qr, nope), qk, 1), (at(q_abs, kvr), row), t * nh, rd, rd)?;

        // Every head attends to the one shared row: keys and values are the cache itself
        // (the values' rope dims come along and are not read back).
        let scale = c.attention_scale(l);
        let shape = AttentionShape {
            rows: t,
            pos0,
            heads: nh,
            kv_heads: 1,
            head_dim: row,
            window: None,
            values_are_keys: true,
        };
        let part = |n| sc.attention(dev, n);
        dev.attention((q_abs, kc, kc), (ctx, pattern, 0), &shape, 1, (scale, None), part)?;
        dev.mla_absorb_v((ctx, row), (kv_b.ptr, kv_b.dtype), o_in, t, dims)?;
        self.linear(o_in, &wt("o_proj")?, proj, t, nh * vd, h, sc)
    }
}

/// An error unless `kv_b` is the `[rows, cols]` matrix the absorption kernels index.
fn check_kv_b(kv_b: &WeightRef, rows: usize, cols: usize) -> Result<()> {
    if kv_b.shape[..] != [rows, cols] {
        return Err(Error::tensor(
            &kv_b.name,
            format!("shape {:?}, latent attention needs [{rows}, {cols}]", kv_b.shape),
        ));
    }
    Ok(())
}
