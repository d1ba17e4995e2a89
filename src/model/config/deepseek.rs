//! DeepSeek-V2/V3 hyper-parameters: MLA shapes, routing, YaRN, read from `config.json` and
//! llama.cpp `deepseek2` GGUF metadata.

use serde::Serialize;
use serde_json::Value;

use super::{Architecture, Hf, ModelConfig, MoeParams};
use crate::io::gguf::GgufFile;
use crate::{Error, Result};

/// How a DeepSeek router ranks groups of experts before its top-k.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupScore {
    /// No groups: top-k over all experts (DeepSeek-V2 `topk_method: greedy`).
    #[default]
    None,
    /// A group scores its best expert (DeepSeek-V2 `group_limited_greedy`).
    Max,
    /// A group scores the sum of its two best experts (DeepSeek-V3, llama.cpp).
    Top2Sum,
}

/// DeepSeek-V2/V3 hyper-parameters: multi-head latent attention and the router.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DeepseekParams {
    /// Rank of the query compression (`q_a_proj`); `None` for a plain `q_proj`.
    pub q_lora_rank: Option<usize>,
    /// Rank of the key/value compression (`kv_a_proj_with_mqa` minus the rope key).
    pub kv_lora_rank: usize,
    /// Per-head query/key dims without RoPE.
    pub qk_nope_head_dim: usize,
    /// Per-head query/key dims with RoPE (the key's are shared by all heads).
    pub qk_rope_head_dim: usize,
    /// Per-head value dims.
    pub v_head_dim: usize,
    /// RoPE rotates interleaved pairs `(2i, 2i+1)` (DeepSeek's layout) rather than halves.
    pub rope_interleave: bool,
    /// Router scores are `sigmoid(logits)` (V3) rather than `softmax(logits)` (V2).
    pub sigmoid: bool,
    /// How expert groups are ranked (groups off when `None` or `n_group` is 1).
    pub group_score: GroupScore,
    /// Expert groups (`n_group`).
    pub n_group: usize,
    /// Groups kept per token (`topk_group`).
    pub topk_group: usize,
    /// Factor on the routing weights (`routed_scaling_factor`).
    pub routed_scaling_factor: f64,
    /// Number of always-on shared experts (`n_shared_experts`), fused into one MLP.
    pub n_shared_experts: usize,
    /// YaRN RoPE scaling (`rope_scaling` / `rope_parameters` of type `yarn`), if any.
    pub yarn: Option<Yarn>,
}

/// YaRN RoPE scaling as transformers computes it for DeepSeek: frequencies blended between
/// `θ^(-2i/d)` and `θ^(-2i/d) / factor` by a linear ramp over the dims between the
/// `beta_fast`/`beta_slow` correction dims, rotated parts scaled by `attention_factor`
/// (default `mscale(factor, mscale) / mscale(factor, mscale_all_dim)`), and the softmax
/// scale multiplied by `mscale(factor, mscale_all_dim)²` when `mscale_all_dim` is set, with
/// `mscale(s, m) = 0.1 · m · ln(s) + 1` for `s > 1`, else 1.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Yarn {
    /// Context extension factor.
    pub factor: f64,
    /// Context length before extension.
    pub original_max_position_embeddings: f64,
    /// Rotations bounding the extrapolated (high-frequency) dims.
    pub beta_fast: f64,
    /// Rotations bounding the interpolated (low-frequency) dims.
    pub beta_slow: f64,
    /// `mscale`, if given.
    pub mscale: Option<f64>,
    /// `mscale_all_dim`, if given.
    pub mscale_all_dim: Option<f64>,
    /// An explicit `attention_factor`, if given.
    pub attention_factor: Option<f64>,
    /// Whether the correction range is rounded outwards to whole dims (`truncate`, default).
    pub truncate: bool,
}

impl Yarn {
    /// `0.1 · m · ln(s) + 1` for `s > 1`, else 1.
    pub fn mscale(s: f64, m: f64) -> f64 {
        if s <= 1.0 {
            1.0
        } else {
            0.1 * m * s.ln() + 1.0
        }
    }
    /// The factor on the rotated dims of q and k (on cos and sin).
    pub fn attention_factor(&self) -> f64 {
        if let Some(a) = self.attention_factor {
            return a;
        }
        match (self.mscale, self.mscale_all_dim) {
            (Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => {
                Self::mscale(self.factor, m) / Self::mscale(self.factor, ma)
            }
            _ => Self::mscale(self.factor, 1.0),
        }
    }
    /// The factor on the softmax scale: `mscale(factor, mscale_all_dim)²`, or 1.
    pub fn softmax_factor(&self) -> f64 {
        match self.mscale_all_dim {
            Some(ma) if ma != 0.0 => Self::mscale(self.factor, ma).powi(2),
            _ => 1.0,
        }
    }
    /// Inverse frequencies of `dim` rotated dims with base `theta`.
    pub fn inv_freq(&self, theta: f64, dim: usize) -> Vec<f32> {
        let d = dim as f64;
        let corr = |rot: f64| {
            d * (self.original_max_position_embeddings / (rot * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * theta.ln())
        };
        let (mut low, mut high) = (corr(self.beta_fast), corr(self.beta_slow));
        if self.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let (low, high) = (low.max(0.0), high.min(d - 1.0));
        let high = if low == high { high + 0.001 } else { high };
        (0..dim / 2)
            .map(|i| {
                let pos_freq = theta.powf((2 * i) as f64 / d) as f32;
                let extra = 1.0 / pos_freq;
                let inter = 1.0 / (self.factor as f32 * pos_freq);
                let ramp = (((i as f64 - low) / (high - low)) as f32).clamp(0.0, 1.0);
                let keep = 1.0 - ramp;
                inter * (1.0 - keep) + extra * keep
            })
            .collect()
    }
}

impl ModelConfig {
    /// MLA heads: every query head has its own key and value (`num_kv_heads = num_heads`),
    /// `head_dim` is the wider of the query/key width `qk_nope + qk_rope` and `v_head_dim`
    /// (the KV cache pads the narrower to it), no partial-rotary setting, and scores scaled by
    /// `(qk_nope + qk_rope)^-1/2`.
    pub(super) fn set_mla_shapes(&mut self, d: DeepseekParams) {
        let qk = d.qk_nope_head_dim + d.qk_rope_head_dim;
        self.num_kv_heads = self.num_heads;
        self.head_dim = qk.max(d.v_head_dim);
        self.family.rotary_dim = None;
        let m = d.yarn.as_ref().map_or(1.0, Yarn::softmax_factor);
        self.family.query_pre_attn_scalar = Some(qk as f64 / (m * m));
    }
    /// [`ModelConfig::parameter_count`] of a DeepSeek model: MLA projections and norms, dense
    /// MLPs in the leading layers, then router (plus V3's selection bias), routed and shared
    /// experts.
    pub(super) fn deepseek_parameter_count(&self, d: &DeepseekParams) -> u64 {
        let u = |v: usize| v as u64;
        let (h, nh, v) = (u(self.hidden_size), u(self.num_heads), u(self.vocab_size));
        let (nope, rope, vd, kvr) =
            (u(d.qk_nope_head_dim), u(d.qk_rope_head_dim), u(d.v_head_dim), u(d.kv_lora_rank));
        let q = match d.q_lora_rank {
            Some(r) => h * u(r) + u(r) + u(r) * nh * (nope + rope),
            None => h * nh * (nope + rope),
        };
        let attn = q + h * (kvr + rope) + kvr + kvr * nh * (nope + vd) + nh * vd * h;
        let dense_mlp = 3 * h * u(self.intermediate_size);
        let blocks: u64 = (0..self.num_layers)
            .map(|l| {
                let mlp = match &self.family.moe {
                    Some(m) if m.is_sparse(l) => {
                        let (ne, ei) = (u(m.num_experts), u(m.expert_intermediate));
                        let bias = if d.sigmoid { ne } else { 0 };
                        let shared = m.shared_expert_intermediate.map_or(0, |si| 3 * h * u(si));
                        ne * h + bias + ne * 3 * h * ei + shared
                    }
                    _ => dense_mlp,
                };
                attn + mlp + 2 * h
            })
            .sum();
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + blocks + h + head
    }
}

/// The DeepSeek-V2/V3 keys of a `config.json`, with transformers 5.24's defaults and
/// semantics: `n_routed_experts`, `num_experts_per_tok`, `moe_intermediate_size`,
/// `n_shared_experts` (fused into one shared MLP `n_shared_experts · moe_intermediate_size`
/// wide), `first_k_dense_replace` dense layers first, `routed_scaling_factor`; V2 routes by
/// softmax with `topk_method` `greedy` or `group_limited_greedy` and never renormalizes (its
/// router ignores `norm_topk_prob`); V3 by sigmoid with `n_group`/`topk_group` groups and
/// `norm_topk_prob`. MLA: `q_lora_rank` (null: plain `q_proj`), `kv_lora_rank`,
/// `qk_nope_head_dim`, `qk_rope_head_dim`, `v_head_dim`, V3's `rope_interleave`.
pub(super) fn deepseek_hf(
    hf: &Hf<'_>,
    architecture: Architecture,
    num_layers: usize,
) -> Result<(MoeParams, DeepseekParams)> {
    let v3 = architecture == Architecture::DeepseekV3;
    let num_experts = hf.usize_or(&["n_routed_experts"], Some(if v3 { 256 } else { 64 }))?;
    let num_experts = super::check_expert_count(hf.path, "n_routed_experts", num_experts)?;
    let top_k = hf.usize_or(&["num_experts_per_tok"], if v3 { Some(8) } else { None })?;
    let expert_intermediate =
        hf.usize_or(&["moe_intermediate_size"], Some(if v3 { 2048 } else { 1407 }))?;
    let n_shared = hf.usize_or(&["n_shared_experts"], Some(if v3 { 1 } else { 2 }))?;
    let dense = match hf.get("first_k_dense_replace") {
        None => {
            if v3 {
                3
            } else {
                0
            }
        }
        Some(v) => v.as_u64().ok_or_else(|| {
            Error::config(hf.path, "`first_k_dense_replace` must be a non-negative integer")
        })? as usize,
    };
    let (group_score, n_group, topk_group) = if v3 {
        (
            GroupScore::Top2Sum,
            hf.usize_or(&["n_group"], Some(8))?,
            hf.usize_or(&["topk_group"], Some(4))?,
        )
    } else {
        match hf.get("topk_method").and_then(Value::as_str).unwrap_or("greedy") {
            "greedy" => (GroupScore::None, 1, 1),
            "group_limited_greedy" => (
                GroupScore::Max,
                hf.usize_or(&["n_group"], None)?,
                hf.usize_or(&["topk_group"], None)?,
            ),
            other => {
                return Err(Error::config(
                    hf.path,
                    format!(
                        "topk_method `{other}` is not supported (greedy, group_limited_greedy)"
                    ),
                ))
            }
        }
    };
    if top_k > num_experts || num_experts % n_group != 0 || topk_group > n_group {
        return Err(Error::config(
            hf.path,
            format!(
                "top-{top_k} of {num_experts} experts in {n_group} groups, {topk_group} kept: \
                 inconsistent"
            ),
        ));
    }
    if group_score != GroupScore::None && topk_group * (num_experts / n_group) < top_k {
        return Err(Error::config(
            hf.path,
            format!(
                "{topk_group} groups of {} experts hold fewer than top-{top_k}",
                num_experts / n_group
            ),
        ));
    }
    let moe = MoeParams {
        num_experts,
        top_k,
        expert_intermediate,
        norm_topk_prob: v3 && hf.bool_or("norm_topk_prob", true),
        shared_expert_intermediate: Some(n_shared * expert_intermediate),
        sparse_layers: (0..num_layers).map(|l| l >= dense).collect(),
    };
    let q_lora_rank = match hf.j.get("q_lora_rank") {
        None => Some(1536),
        Some(Value::Null) => None,
        Some(_) => hf.usize_opt(&["q_lora_rank"])?,
    };
    let d = DeepseekParams {
        q_lora_rank,
        kv_lora_rank: hf.usize_or(&["kv_lora_rank"], Some(512))?,
        qk_nope_head_dim: hf.usize_or(&["qk_nope_head_dim"], Some(128))?,
        qk_rope_head_dim: hf.usize_or(&["qk_rope_head_dim"], Some(64))?,
        v_head_dim: hf.usize_or(&["v_head_dim"], Some(128))?,
        // transformers' V2 rotates the interleaved pairs; V3 when rope_interleave (default).
        rope_interleave: !v3 || hf.bool_or("rope_interleave", true),
        sigmoid: v3,
        group_score,
        n_group,
        topk_group,
        routed_scaling_factor: hf.f64_opt(&["routed_scaling_factor"])?.unwrap_or(if v3 {
            2.5
        } else {
            1.0
        }),
        n_shared_experts: n_shared,
        yarn: deepseek_yarn(hf)?,
    };
    if d.qk_rope_head_dim % 2 != 0 {
        return Err(Error::config(hf.path, "qk_rope_head_dim must be even for RoPE"));
    }
    Ok((moe, d))
}

/// DeepSeek's RoPE scaling from `rope_scaling` (classic) or `rope_parameters`
/// (transformers 5): none, or YaRN.
fn deepseek_yarn(hf: &Hf<'_>) -> Result<Option<Yarn>> {
    let Some(rs) = hf.get("rope_scaling").or_else(|| hf.get("rope_parameters")) else {
        return Ok(None);
    };
    let ty = rs.get("rope_type").or_else(|| rs.get("type")).and_then(Value::as_str).unwrap_or("");
    let num = |key: &str| rs.get(key).filter(|v| !v.is_null()).and_then(Value::as_f64);
    match ty {
        "default" | "" => Ok(None),
        "yarn" => {
            let need = |key: &str| {
                num(key).ok_or_else(|| {
                    Error::config(
                        hf.path,
                        format!("yarn rope scaling: `{key}` missing or not a number"),
                    )
                })
            };
            Ok(Some(Yarn {
                factor: need("factor")?,
                original_max_position_embeddings: need("original_max_position_embeddings")?,
                beta_fast: num("beta_fast").filter(|&b| b != 0.0).unwrap_or(32.0),
                beta_slow: num("beta_slow").filter(|&b| b != 0.0).unwrap_or(1.0),
                mscale: num("mscale"),
                mscale_all_dim: num("mscale_all_dim"),
                attention_factor: num("attention_factor"),
                truncate: rs.get("truncate").and_then(Value::as_bool).unwrap_or(true),
            }))
        }
        other => Err(Error::config(
            hf.path,
            format!("DeepSeek rope scaling `{other}` is not supported (yarn)"),
        )),
    }
}

/// The DeepSeek keys of llama.cpp's `deepseek2` GGUF metadata: `attention.q_lora_rank`
/// (absent: plain `attn_q`), `attention.kv_lora_rank`, `attention.key_length` /
/// `value_length` (or their `_mla` variants), `rope.dimension_count`,
/// `leading_dense_block_count`, `expert_shared_count`, `expert_weights_scale`,
/// `expert_weights_norm`, `expert_gating_func` (2 = sigmoid), `expert_group_count` and
/// `expert_group_used_count` (groups ranked by the sum of their two best scores, as llama.cpp
/// does). The generic MoE keys were read already.
pub(super) fn deepseek_gguf(g: &GgufFile, cfg: &mut ModelConfig) -> Result<()> {
    let path = g.path();
    let arch = "deepseek2";
    let key = |s: &str| format!("{arch}.{s}");
    let opt = |s: &str| -> Result<Option<usize>> {
        match g.get(&key(s)) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|v| Some(v as usize))
                .ok_or_else(|| Error::config(path, format!("`{}` must be an integer", key(s)))),
        }
    };
    let need = |s: &str| -> Result<usize> {
        opt(s)?.ok_or_else(|| Error::config(path, format!("missing metadata key `{}`", key(s))))
    };
    let k_len = match opt("attention.key_length_mla")? {
        Some(v) => v,
        None => need("attention.key_length")?,
    };
    let v_len = match opt("attention.value_length_mla")? {
        Some(v) => v,
        None => need("attention.value_length")?,
    };
    let rope = need("rope.dimension_count")?;
    if rope == 0 || rope % 2 != 0 || rope >= k_len {
        return Err(Error::config(
            path,
            format!("rope.dimension_count {rope} must be even and below key_length {k_len}"),
        ));
    }
    // llama.cpp's gating functions: 0 (unset, read as softmax), 1 softmax, 2 sigmoid.
    let gating = opt("expert_gating_func")?.filter(|&f| f != 0);
    if let Some(f) = gating.filter(|&f| f > 2) {
        return Err(Error::config(
            path,
            format!(
                "`{}` = {f} is not supported (1: softmax, 2: sigmoid)",
                key("expert_gating_func")
            ),
        ));
    }
    let sigmoid =
        gating == Some(2) || (cfg.architecture == Architecture::DeepseekV3 && gating.is_none());
    let n_group = opt("expert_group_count")?.unwrap_or(1).max(1);
    let topk_group = opt("expert_group_used_count")?.unwrap_or(n_group).max(1);
    let moe = cfg
        .family
        .moe
        .as_mut()
        .ok_or_else(|| Error::config(path, "DeepSeek metadata without experts"))?;
    let n_shared = opt("expert_shared_count")?.unwrap_or(0);
    moe.shared_expert_intermediate = (n_shared > 0).then_some(n_shared * moe.expert_intermediate);
    if let Some(dense) = opt("leading_dense_block_count")? {
        for (l, s) in moe.sparse_layers.iter_mut().enumerate() {
            *s = *s && l >= dense;
        }
    }
    if moe.num_experts % n_group != 0 || topk_group > n_group {
        return Err(Error::config(
            path,
            format!(
                "{} experts in {n_group} groups, {topk_group} kept: inconsistent",
                moe.num_experts
            ),
        ));
    }
    let d = DeepseekParams {
        q_lora_rank: opt("attention.q_lora_rank")?.filter(|&r| r > 0),
        kv_lora_rank: need("attention.kv_lora_rank")?,
        qk_nope_head_dim: k_len - rope,
        qk_rope_head_dim: rope,
        v_head_dim: v_len,
        rope_interleave: true,
        sigmoid,
        group_score: if n_group > 1 { GroupScore::Top2Sum } else { GroupScore::None },
        n_group,
        topk_group,
        routed_scaling_factor: g.opt_f64(&key("expert_weights_scale"))?.unwrap_or(1.0),
        n_shared_experts: n_shared,
        yarn: match g.opt_str(&key("rope.scaling.type")) {
            Some("yarn") => {
                let need = |s: &str| {
                    g.opt_f64(&key(s))?.ok_or_else(|| {
                        Error::config(path, format!("missing metadata key `{}`", key(s)))
                    })
                };
                // llama.cpp keeps 0.1 · mscale_all_dim as yarn_log_multiplier and assumes
                // mscale = mscale_all_dim (rotated dims unscaled).
                let m = g.opt_f64(&key("rope.scaling.yarn_log_multiplier"))?.map(|v| v / 0.1);
                Some(Yarn {
                    factor: need("rope.scaling.factor")?,
                    original_max_position_embeddings: need("rope.scaling.original_context_length")?,
                    beta_fast: g.opt_f64(&key("rope.scaling.yarn_beta_fast"))?.unwrap_or(32.0),
                    beta_slow: g.opt_f64(&key("rope.scaling.yarn_beta_slow"))?.unwrap_or(1.0),
                    mscale: m,
                    mscale_all_dim: m,
                    attention_factor: None,
                    truncate: true,
                })
            }
            Some("none") | None => None,
            Some(other) => {
                return Err(Error::config(
                    path,
                    format!("DeepSeek rope scaling `{other}` is not supported (yarn)"),
                ))
            }
        },
    };
    cfg.rope_scaling = None;
    cfg.family.deepseek = Some(d.clone());
    cfg.set_mla_shapes(d);
    Ok(())
}
