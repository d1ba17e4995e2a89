//! DeepSeek-V2/V3's multi-head latent attention on the device, mirroring
//! `model::arch::deepseek::mla`: the latent projections, RoPE on the rope dims only, and
//! per-head q, k, v zero-padded to `head_dim = max(d_nope + d_rope, d_v)` so that the
//! ordinary attention kernel and KV cache run it.
//!
//! ```text
//! q = q_b_proj(rmsnorm(q_a_proj(xn)))  or  q_proj(xn)            [t, heads·(d_nope + d_rope)]
//! [c | k_rope] = kv_a_proj_with_mqa(xn)                           [t, kv_lora_rank + d_rope]
//! [k_nope | v] per head = kv_b_proj(rmsnorm(c))                   [t, heads·(d_nope + d_v)]
//! rope(q's rope dims), rope(k_rope)        (interleaved pairs or halves, YaRN factor)
//! cache k = [k_nope | k_rope | 0], v = [v | 0]; query [q | 0]     (swk_copy_rows)
//! att = attention(...); o_proj(att's first d_v dims of each head)
//! ```

use super::driver::{CudaDevice, CudaSlice};
use super::linear::Scratch;
use super::model::{CudaModel, WeightRef};
use crate::model::arch::deepseek::{self, LATENT_NORM_EPS};
use crate::model::config::DeepseekParams;
use crate::model::ModelConfig;
use crate::{Error, Result};

/// The activation buffers of latent attention for up to `t` tokens.
pub(crate) struct MlaActs {
    /// q before padding `[t, heads·(d_nope + d_rope)]`.
    q: CudaSlice<f32>,
    /// q_a_proj's output `[t, q_lora_rank]`, when q is low-rank.
    qa: Option<CudaSlice<f32>>,
    /// kv_a_proj_with_mqa's output `[t, kv_lora_rank + d_rope]`.
    ckv: CudaSlice<f32>,
    /// Its latent part, normalized `[t, kv_lora_rank]`.
    latent: CudaSlice<f32>,
    /// kv_b_proj's output `[t, heads·(d_nope + d_v)]`.
    kv: CudaSlice<f32>,
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
            kv: dev.alloc::<f32>(t * nh * (nope + vd))?,
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
    /// from `w(suffix)`: writes the new keys and values into the cache (`[k, v, k_new,
    /// v_new]`: the layer's cache and its rows at pos0), the padded queries into `q`, the
    /// attention into `att` (its weights into `pattern` unless 0) and `o_proj`'s output into
    /// `proj` (`[q, att, proj, pattern]`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn mla_attention(
        &self,
        l: usize,
        w: &dyn Fn(&str) -> Result<WeightRef>,
        xn: u64,
        (t, pos0): (usize, usize),
        [kc, vc, k_new, v_new]: [u64; 4],
        [q, att, proj, pattern]: [u64; 4],
        ma: &MlaActs,
        sc: &mut Scratch,
    ) -> Result<()> {
        let c = &self.config;
        let d = deepseek::params(c)?;
        let dev = &self.dev;
        let (h, nh, hd) = (c.hidden_size, c.num_heads, c.head_dim);
        let (nope, rd, vd, kvr) =
            (d.qk_nope_head_dim, d.qk_rope_head_dim, d.v_head_dim, d.kv_lora_rank);
        let qk = nope + rd;
        let wt = |name: &str| w(&format!("self_attn.{name}.weight"));
        let eps = LATENT_NORM_EPS;
        let rope = self
            .mla_rope
            .as_ref()
            .ok_or_else(|| Error::Backend("latent attention without its rope".into()))?;
        let (qr, ckv, latent, kv, o_in) = (
            dev.ptr(&ma.q),
            dev.ptr(&ma.ckv),
            dev.ptr(&ma.latent),
            dev.ptr(&ma.kv),
            dev.ptr(&ma.o_in),
        );

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
        self.linear(xn, &wt("kv_a_proj_with_mqa")?, ckv, t, h, kvr + rd, sc)?;
        dev.copy_rows((ckv, kvr + rd, 1), (latent, kvr), t, kvr, kvr)?;
        dev.rmsnorm(latent, wt("kv_a_layernorm")?.f32_ptr()?, (latent, 0), t, kvr, eps, false)?;
        self.linear(latent, &wt("kv_b_proj")?, kv, t, kvr, nh * (nope + vd), sc)?;

        // RoPE on q's rope dims (per head) and on the rope key (one per token).
        let inv = dev.ptr(&rope.inv_freq);
        let (half, il) = (rd / 2, d.rope_interleave);
        dev.rope_at(qr, inv, (t, nh, qk, nope), half, pos0, il, rope.factor)?;
        dev.rope_at(ckv, inv, (t, 1, kvr + rd, kvr), half, pos0, il, rope.factor)?;

        // Padded per-head q, k = [k_nope | k_rope | 0] and v = [v | 0] into the cache rows.
        let rows = t * nh;
        dev.copy_rows((qr, qk, 1), (q, hd), rows, qk, hd)?;
        dev.copy_rows((kv, nope + vd, 1), (k_new, hd), rows, nope, hd)?;
        let k_rope = ckv + (kvr * 4) as u64;
        dev.copy_rows((k_rope, kvr + rd, nh), (k_new + (nope * 4) as u64, hd), rows, rd, rd)?;
        dev.copy_rows((kv + (nope * 4) as u64, nope + vd, 1), (v_new, hd), rows, vd, hd)?;

        let scale = c.attention_scale(l);
        dev.attention(q, kc, vc, (att, pattern, 0), t, pos0, nh, nh, hd, None, scale, None)?;
        dev.copy_rows((att, hd, 1), (o_in, vd), rows, vd, vd)?;
        self.linear(o_in, &wt("o_proj")?, proj, t, nh * vd, h, sc)
    }
}
