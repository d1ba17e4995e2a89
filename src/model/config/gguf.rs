//! Hyper-parameters from GGUF metadata (`{arch}.block_count`, ...), with llama.cpp's
//! defaults where it hard-codes them.

use super::{check_expert_count, check_layer_count, SUPPORTED_ARCHITECTURES};
use super::{
    deepseek_gguf, Architecture, FamilyParams, HiddenAct, ModelConfig, MoeParams, RopeScaling,
};
use crate::io::gguf::GgufFile;
use crate::{Error, Result};

impl ModelConfig {
    /// Read the hyper-parameters from GGUF metadata (`{arch}.block_count`, ...), with
    /// llama.cpp's defaults where it hard-codes them (Gemma 2 alternating and Gemma 3 1-in-6
    /// full-attention layers, Gemma 3's local RoPE base 10000, the 27B Gemmas' attention scale).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        use Architecture as A;
        let path = g.path();
        let arch_name = g
            .opt_str("general.architecture")
            .ok_or_else(|| Error::config(path, "missing metadata key `general.architecture`"))?;
        let architecture =
            Architecture::from_name(arch_name).ok_or_else(|| Error::UnknownArchitecture {
                path: path.to_path_buf(),
                arch: arch_name.to_string(),
                supported: SUPPORTED_ARCHITECTURES.to_string(),
            })?;
        let k = |s: &str| format!("{arch_name}.{s}");
        // llama.cpp writes Mixtral as a `llama` with experts.
        let experts = g.get(&k("expert_count")).and_then(|v| v.as_u64()).unwrap_or(0);
        let architecture = match architecture {
            A::Llama | A::Mistral if experts > 0 => A::Mixtral,
            // llama.cpp writes DeepSeek-V3 as `deepseek2` with sigmoid gating (and a selection
            // bias `exp_probs_b`).
            A::DeepseekV2 | A::DeepseekV3
                if g.get(&k("expert_gating_func")).and_then(|v| v.as_u64()) == Some(2)
                    || g.tensors.iter().any(|t| t.name.ends_with(".exp_probs_b.bias")) =>
            {
                A::DeepseekV3
            }
            a => a,
        };
        let as_usize = |key: &str| -> Result<usize> {
            let v = g.require_u64(&k(key))?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| Error::config(path, format!("`{}` must be positive", k(key))))
        };
        let opt_usize = |key: &str| -> Result<Option<usize>> {
            match g.get(&k(key)) {
                Some(_) => as_usize(key).map(Some),
                None => Ok(None),
            }
        };
        let hidden_size = as_usize("embedding_length")?;
        let num_heads = as_usize("attention.head_count")?;
        let num_kv_heads = opt_usize("attention.head_count_kv")?.unwrap_or(num_heads);
        let head_dim = opt_usize("attention.key_length")?.unwrap_or(hidden_size / num_heads);
        let num_layers = check_layer_count(path, &k("block_count"), as_usize("block_count")?)?;
        let emb = g
            .tensor("token_embd.weight")
            .ok_or_else(|| Error::format(path, "missing tensor `token_embd.weight`"))?;
        let vocab_size = match g.get(&k("vocab_size")) {
            Some(_) => as_usize("vocab_size")?,
            None => emb.dims.get(1).map_or(0, |&d| d as usize),
        };
        let rope_scaling = match g.opt_str(&k("rope.scaling.type")) {
            Some("linear") => {
                g.opt_f64(&k("rope.scaling.factor"))?.map(|factor| RopeScaling::Linear { factor })
            }
            _ => None,
        };
        let rms_norm_eps = match g.opt_f64(&k("attention.layer_norm_rms_epsilon"))? {
            Some(e) => e,
            None => g.opt_f64(&k("attention.layer_norm_epsilon"))?.unwrap_or(1e-5),
        };
        let sliding_window = match architecture {
            A::Gemma2 | A::Gemma3 | A::Phi3 | A::Mixtral => opt_usize("attention.sliding_window")?,
            _ => None,
        };
        let sliding_layers = match (sliding_window, g.get(&k("attention.sliding_window_pattern"))) {
            (None, _) => Vec::new(),
            (Some(_), Some(crate::io::gguf::GgufValue::Array(a))) => {
                a.iter().map(|v| v.as_bool()).collect::<Option<Vec<bool>>>().ok_or_else(|| {
                    Error::config(
                        path,
                        format!(
                            "`{}` is not a list of booleans",
                            k("attention.sliding_window_pattern")
                        ),
                    )
                })?
            }
            (Some(_), pattern) => {
                let default = match architecture {
                    A::Gemma2 => 2,
                    A::Gemma3 => 6,
                    _ => 0,
                };
                let n = match pattern {
                    Some(v) => v.as_u64().map_or(0, |v| v as usize),
                    None => default,
                };
                // llama.cpp: layer l slides unless it is the last of each group of n.
                if n == 0 {
                    Vec::new()
                } else {
                    (0..num_layers).map(|l| l % n < n - 1).collect()
                }
            }
        };
        let rotary_dim = opt_usize("rope.dimension_count")?.filter(|&r| r != head_dim);
        let query_pre_attn_scalar = match architecture {
            A::Gemma2 | A::Gemma3 => Some(match g.opt_f64(&k("attention.scale"))? {
                Some(s) if s > 0.0 && s.is_finite() => 1.0 / (s * s),
                // 0 is llama.cpp's "unset".
                Some(s) if s != 0.0 => {
                    return Err(Error::config(
                        path,
                        format!("`{}` = {s} must be a positive number", k("attention.scale")),
                    ))
                }
                // llama.cpp: the 27B models scale by (hidden / heads)^-1/2, the others by
                // head_dim^-1/2.
                _ if (architecture == A::Gemma2 && num_layers == 46)
                    || (architecture == A::Gemma3 && num_layers == 62) =>
                {
                    (hidden_size / num_heads) as f64
                }
                _ => head_dim as f64,
            }),
            _ => None,
        };
        let family = FamilyParams {
            sliding_layers,
            rope_local_theta: match architecture {
                A::Gemma3 => Some(g.opt_f64(&k("rope.freq_base_swa"))?.unwrap_or(10000.0)),
                _ => None,
            },
            rotary_dim,
            query_pre_attn_scalar,
            attn_logit_softcapping: match architecture {
                A::Gemma2 => g.opt_f64(&k("attn_logit_softcapping"))?,
                _ => None,
            },
            final_logit_softcapping: match architecture {
                A::Gemma2 | A::Gemma3 => g.opt_f64(&k("final_logit_softcapping"))?,
                _ => None,
            },
            clip_qkv: match architecture {
                A::Olmo | A::Olmoe => g.opt_f64(&k("attention.clamp_kqv"))?.filter(|&c| c > 0.0),
                _ => None,
            },
            parallel_residual: architecture == A::GptNeoX
                && g.get(&k("use_parallel_residual")).and_then(|v| v.as_bool()).unwrap_or(true),
            scale_attn_by_inverse_layer_idx: false,
            hidden_act: match architecture {
                A::Gemma | A::Gemma2 | A::Gemma3 | A::Gpt2 => HiddenAct::GeluTanh,
                A::GptNeoX => HiddenAct::Gelu,
                _ => HiddenAct::Silu,
            },
            moe: if architecture.is_moe() {
                let ffn = as_usize("feed_forward_length")?;
                Some(MoeParams {
                    num_experts: check_expert_count(
                        path,
                        &k("expert_count"),
                        as_usize("expert_count")?,
                    )?,
                    top_k: as_usize("expert_used_count")?,
                    expert_intermediate: opt_usize("expert_feed_forward_length")?.unwrap_or(ffn),
                    // llama.cpp renormalizes for Mixtral and Qwen3-MoE unless told otherwise.
                    norm_topk_prob: g
                        .get(&k("expert_weights_norm"))
                        .and_then(|v| v.as_bool())
                        .unwrap_or(matches!(architecture, A::Mixtral | A::Qwen3Moe)),
                    shared_expert_intermediate: opt_usize("expert_shared_feed_forward_length")?,
                    sparse_layers: (0..num_layers)
                        .map(|l| g.tensor(&format!("blk.{l}.ffn_gate_inp.weight")).is_some())
                        .collect(),
                })
            } else {
                None
            },
            deepseek: None,
        };
        let mut cfg = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: as_usize("feed_forward_length")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            max_position_embeddings: g
                .get(&k("context_length"))
                .and_then(|v| v.as_u64())
                .map_or(4096, |v| v as usize),
            rope_theta: g.opt_f64(&k("rope.freq_base"))?.unwrap_or(10000.0),
            rope_scaling,
            rms_norm_eps,
            tie_word_embeddings: g.tensor("output.weight").is_none(),
            attention_bias: g.tensor("blk.0.attn_q.bias").is_some()
                || g.tensor("blk.0.attn_qkv.bias").is_some(),
            sliding_window,
            family,
        };
        if architecture.is_deepseek() {
            deepseek_gguf(g, &mut cfg)?;
        }
        cfg.validate(path)?;
        Ok(cfg)
    }
}
