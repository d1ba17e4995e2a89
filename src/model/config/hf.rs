//! Hyper-parameters from a Hugging Face `config.json`: the keys of every family, with
//! their aliases (GPT-2's `n_embd`, ...), both RoPE layouts and the mixture-of-experts keys.

use std::path::Path;

use serde_json::Value;

use super::{check_expert_count, check_layer_count, SUPPORTED_ARCHITECTURES};
use super::{
    deepseek_hf, Architecture, FamilyParams, HiddenAct, ModelConfig, MoeParams, RopeScaling,
};
use crate::{Error, Result};

/// Typed look-ups in a parsed `config.json`, with key aliases (GPT-2 spells `hidden_size`
/// `n_embd`, ...). A key that is absent or `null` counts as missing.
pub(super) struct Hf<'a> {
    pub(super) path: &'a Path,
    pub(super) j: &'a Value,
}

impl<'a> Hf<'a> {
    pub(super) fn get(&self, key: &str) -> Option<&'a Value> {
        self.j.get(key).filter(|v| !v.is_null())
    }
    /// The first of `keys` that is present, with its name.
    pub(super) fn first(&self, keys: &[&'static str]) -> Option<(&'static str, &'a Value)> {
        keys.iter().find_map(|&k| self.get(k).map(|v| (k, v)))
    }
    pub(super) fn usize_opt(&self, keys: &[&'static str]) -> Result<Option<usize>> {
        match self.first(keys) {
            None => Ok(None),
            Some((k, v)) => v
                .as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .filter(|&v| v > 0)
                .map(Some)
                .ok_or_else(|| {
                    Error::config(self.path, format!("`{k}` must be a positive integer"))
                }),
        }
    }
    pub(super) fn usize_or(&self, keys: &[&'static str], default: Option<usize>) -> Result<usize> {
        self.usize_opt(keys)?.or(default).ok_or_else(|| {
            Error::config(self.path, format!("missing field `{}`", keys.join("` or `")))
        })
    }
    pub(super) fn f64_opt(&self, keys: &[&'static str]) -> Result<Option<f64>> {
        match self.first(keys) {
            None => Ok(None),
            Some((k, v)) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Error::config(self.path, format!("`{k}` must be a number"))),
        }
    }
    /// A number that may be present-but-null (disabled): `Ok(None)` for null, `default` when
    /// the key is absent.
    pub(super) fn nullable_f64(&self, key: &str, default: Option<f64>) -> Result<Option<f64>> {
        match self.j.get(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Error::config(self.path, format!("`{key}` must be a number"))),
        }
    }
    pub(super) fn bool_or(&self, key: &str, default: bool) -> bool {
        self.get(key).and_then(Value::as_bool).unwrap_or(default)
    }
}

impl ModelConfig {
    /// Read a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let j: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Json { path: path.to_path_buf(), source: e })?;
        Self::from_hf_value(path, &j)
    }

    /// Interpret a parsed `config.json` (`path` is used in error messages).
    ///
    /// Besides the Llama-style keys this reads GPT-2's (`n_embd`, `n_layer`, `n_head`,
    /// `n_inner`, `n_positions`, `layer_norm_epsilon`), GPT-NeoX's (`rotary_pct`,
    /// `rotary_emb_base`, `use_parallel_residual`), Gemma's (`query_pre_attn_scalar`,
    /// soft-capping, `layer_types` or `sliding_window_pattern`, `rope_local_base_freq`) and
    /// both the classic (`rope_theta`, `rope_scaling`) and the transformers-5
    /// (`rope_parameters`) RoPE layouts. A Gemma 3 multimodal config is read from its
    /// `text_config`, with Gemma 3's defaults for the keys it leaves out.
    pub fn from_hf_value(path: &Path, j: &Value) -> Result<Self> {
        use Architecture as A;
        let model_type = j.get("model_type").and_then(Value::as_str);
        let class = j
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str);
        let architecture = model_type
            .and_then(Architecture::from_name)
            .or_else(|| class.and_then(Architecture::from_class))
            .ok_or_else(|| Error::UnknownArchitecture {
                path: path.to_path_buf(),
                arch: model_type.or(class).unwrap_or("<none given>").to_string(),
                supported: SUPPORTED_ARCHITECTURES.to_string(),
            })?;
        let j = match j.get("text_config") {
            Some(t) if architecture == A::Gemma3 && t.is_object() => t,
            _ => j,
        };
        let hf = Hf { path, j };
        // Gemma 3 configs (above all the text_config of the multimodal ones) omit keys whose
        // transformers default they use.
        let g3 = architecture == A::Gemma3;
        let d = |v: usize| if g3 { Some(v) } else { None };

        let hidden_size = hf.usize_or(&["hidden_size", "n_embd"], d(2304))?;
        let num_heads = hf.usize_or(&["num_attention_heads", "n_head"], d(8))?;
        let num_kv_heads =
            hf.usize_or(&["num_key_value_heads"], Some(if g3 { 4 } else { num_heads }))?;
        let head_dim =
            hf.usize_or(&["head_dim"], Some(if g3 { 256 } else { hidden_size / num_heads }))?;
        let intermediate_default = match architecture {
            A::Gpt2 => Some(4 * hidden_size),
            _ => d(9216),
        };
        let intermediate_size =
            hf.usize_or(&["intermediate_size", "n_inner"], intermediate_default)?;
        let layer_keys = ["num_hidden_layers", "n_layer"];
        let num_layers = check_layer_count(
            path,
            hf.first(&layer_keys).map_or(layer_keys[0], |(k, _)| k),
            hf.usize_or(&layer_keys, d(26))?,
        )?;
        let vocab_size = hf.usize_or(&["vocab_size"], d(262_208))?;
        let max_position_embeddings = hf
            .usize_opt(&["max_position_embeddings", "n_positions"])?
            .unwrap_or(if g3 { 131_072 } else { 4096 });
        let rms_norm_eps = match architecture {
            // OLMo's LayerNorm has a fixed epsilon and its config names none.
            A::Olmo => 1e-5,
            _ => match hf.f64_opt(&["rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"])? {
                Some(e) => e,
                None if g3 => 1e-6,
                None if architecture == A::Gpt2 => 1e-5,
                None => return Err(Error::config(path, "missing field `rms_norm_eps`")),
            },
        };

        // RoPE: the classic top-level keys, or transformers-5 `rope_parameters` (flat, or per
        // layer type for Gemma 3).
        let rope_params = hf.get("rope_parameters");
        let per_type = |ty: &str| rope_params.and_then(|r| r.get(ty)).filter(|v| v.is_object());
        let global_params = per_type("full_attention").or(rope_params);
        let theta_in =
            |v: Option<&Value>| v.and_then(|r| r.get("rope_theta")).and_then(Value::as_f64);
        let rope_theta = match hf.f64_opt(&["rope_theta", "rotary_emb_base"])? {
            Some(t) => t,
            None => theta_in(global_params).unwrap_or(if g3 { 1_000_000.0 } else { 10000.0 }),
        };
        let rope_scaling = match hf.get("rope_scaling") {
            // DeepSeek's YaRN is read into its own parameters (`deepseek_hf`).
            _ if architecture.is_deepseek() => None,
            Some(rs) => parse_rope_scaling(path, rs)?,
            None => match global_params {
                Some(rs) => parse_rope_scaling(path, rs)?,
                None => None,
            },
        };
        let rope_local_theta = match architecture {
            A::Gemma3 => Some(match hf.f64_opt(&["rope_local_base_freq"])? {
                Some(t) => t,
                None => theta_in(per_type("sliding_attention")).unwrap_or(10000.0),
            }),
            _ => None,
        };
        let rotary_factor = match hf.f64_opt(&["partial_rotary_factor", "rotary_pct"])? {
            Some(f) => Some(f),
            None => rope_params
                .and_then(|r| r.get("partial_rotary_factor"))
                .and_then(Value::as_f64)
                .or((architecture == A::GptNeoX).then_some(0.25)),
        };
        let rotary_dim = match rotary_factor {
            Some(f) if !(f > 0.0 && f <= 1.0) => {
                return Err(Error::config(
                    path,
                    format!("partial rotary factor {f} is not in (0, 1]"),
                ))
            }
            Some(f) => Some((head_dim as f64 * f) as usize).filter(|&r| r != head_dim),
            None => None,
        };

        let sliding_window = match architecture {
            A::Mistral | A::Mixtral | A::Phi3 | A::Gemma2 | A::Gemma3 => {
                hf.usize_opt(&["sliding_window", "sliding_window_size"])?
            }
            // Qwen declares a window but only applies it with use_sliding_window.
            A::Qwen2 | A::Qwen3 | A::Qwen2Moe | A::Qwen3Moe
                if hf.bool_or("use_sliding_window", false) =>
            {
                hf.usize_opt(&["sliding_window"])?
            }
            _ => None,
        };
        let sliding_layers = match (sliding_window, hf.get("layer_types")) {
            (None, _) => Vec::new(),
            // transformers reads layer_types for these families only (Mistral ignores it).
            (Some(_), Some(types))
                if matches!(architecture, A::Qwen2 | A::Qwen3 | A::Gemma2 | A::Gemma3) =>
            {
                let types = types.as_array().ok_or_else(|| {
                    Error::config(path, "`layer_types` must be a list of strings")
                })?;
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("sliding_attention") => Ok(true),
                        Some("full_attention") => Ok(false),
                        _ => Err(Error::config(
                            path,
                            format!("`layer_types` entry {t} is not sliding_attention or full_attention"),
                        )),
                    })
                    .collect::<Result<Vec<bool>>>()?
            }
            (Some(_), _) => match architecture {
                A::Qwen2 | A::Qwen3 => {
                    let first = hf.usize_opt(&["max_window_layers"])?.unwrap_or(28);
                    (0..num_layers).map(|l| l >= first).collect()
                }
                A::Gemma2 => (0..num_layers).map(|l| l % 2 == 0).collect(),
                A::Gemma3 => {
                    let n = hf.usize_opt(&["sliding_window_pattern"])?.unwrap_or(6);
                    (0..num_layers).map(|l| (l + 1) % n != 0).collect()
                }
                _ => Vec::new(),
            },
        };
        if g3 && hf.bool_or("use_bidirectional_attention", false) {
            return Err(Error::config(
                path,
                "bidirectional Gemma 3 (embedding models) is not supported",
            ));
        }

        let act_name = hf
            .first(&["hidden_activation", "hidden_act", "activation_function"])
            .and_then(|(_, v)| v.as_str());
        let hidden_act = match architecture {
            // transformers runs every Gemma with the tanh GELU, whatever the config says.
            A::Gemma | A::Gemma2 | A::Gemma3 => HiddenAct::GeluTanh,
            _ => match act_name {
                Some(name) => HiddenAct::from_name(name).ok_or_else(|| {
                    Error::config(path, format!("activation `{name}` is not supported (silu, gelu, gelu_new, gelu_pytorch_tanh)"))
                })?,
                None if architecture == A::Gpt2 => HiddenAct::GeluTanh,
                None if architecture == A::GptNeoX => HiddenAct::Gelu,
                None => HiddenAct::Silu,
            },
        };
        let query_pre_attn_scalar = match architecture {
            A::Gemma2 | A::Gemma3 => Some(hf.f64_opt(&["query_pre_attn_scalar"])?.unwrap_or(256.0)),
            // GPT-2 without scale_attn_weights does not scale the scores at all.
            A::Gpt2 if !hf.bool_or("scale_attn_weights", true) => Some(1.0),
            _ => None,
        };
        let (moe, deepseek) = if architecture.is_deepseek() {
            let (m, d) = deepseek_hf(&hf, architecture, num_layers)?;
            (Some(m), Some(d))
        } else if architecture.is_moe() {
            (Some(moe_params(&hf, architecture, num_layers, intermediate_size)?), None)
        } else {
            (None, None)
        };
        let family = FamilyParams {
            sliding_layers,
            rope_local_theta,
            rotary_dim,
            query_pre_attn_scalar,
            // transformers applies the attention cap in Gemma 2 only.
            attn_logit_softcapping: match architecture {
                A::Gemma2 => hf.nullable_f64("attn_logit_softcapping", Some(50.0))?,
                _ => None,
            },
            final_logit_softcapping: match architecture {
                A::Gemma2 => hf.nullable_f64("final_logit_softcapping", Some(30.0))?,
                A::Gemma3 => hf.nullable_f64("final_logit_softcapping", None)?,
                _ => None,
            },
            clip_qkv: match architecture {
                A::Olmo | A::Olmoe => hf.f64_opt(&["clip_qkv"])?,
                _ => None,
            },
            parallel_residual: architecture == A::GptNeoX
                && hf.bool_or("use_parallel_residual", true),
            scale_attn_by_inverse_layer_idx: architecture == A::Gpt2
                && hf.bool_or("scale_attn_by_inverse_layer_idx", false),
            hidden_act,
            moe,
            deepseek,
        };
        let mut cfg = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            max_position_embeddings,
            rope_theta,
            rope_scaling,
            rms_norm_eps,
            tie_word_embeddings: hf.bool_or(
                "tie_word_embeddings",
                matches!(architecture, A::Gemma | A::Gemma2 | A::Gemma3 | A::Gpt2),
            ),
            attention_bias: match architecture {
                A::Qwen2 | A::Gpt2 => true,
                A::Qwen2Moe => hf.bool_or("qkv_bias", true),
                A::GptNeoX => hf.bool_or("attention_bias", true),
                _ => hf.bool_or("attention_bias", false),
            },
            sliding_window,
            family,
        };
        if let Some(d) = &cfg.family.deepseek {
            if cfg.attention_bias || hf.bool_or("mlp_bias", false) {
                return Err(Error::config(
                    path,
                    "DeepSeek with attention or MLP biases is not supported",
                ));
            }
            cfg.set_mla_shapes(d.clone());
        }
        cfg.validate(path)?;
        Ok(cfg)
    }
}

/// The mixture-of-experts keys of a `config.json`: `num_local_experts` or `num_experts`,
/// `num_experts_per_tok`, `moe_intermediate_size` (else `intermediate_size`),
/// `norm_topk_prob` (always true for Mixtral), `shared_expert_intermediate_size` (Qwen2-MoE),
/// and which layers are sparse (`decoder_sparse_step`, `mlp_only_layers`, as transformers'
/// Qwen MoE models decide).
fn moe_params(
    hf: &Hf<'_>,
    architecture: Architecture,
    num_layers: usize,
    intermediate_size: usize,
) -> Result<MoeParams> {
    use Architecture as A;
    let key =
        if hf.j.get("num_local_experts").is_some() { "num_local_experts" } else { "num_experts" };
    let num_experts = check_expert_count(
        hf.path,
        key,
        hf.usize_or(&["num_local_experts", "num_experts"], None)?,
    )?;
    let top_k = hf.usize_or(&["num_experts_per_tok"], Some(2))?;
    if top_k > num_experts {
        return Err(Error::config(
            hf.path,
            format!("num_experts_per_tok {top_k} exceeds the {num_experts} experts"),
        ));
    }
    let qwen = matches!(architecture, A::Qwen2Moe | A::Qwen3Moe);
    let expert_intermediate =
        if qwen { hf.usize_or(&["moe_intermediate_size"], None)? } else { intermediate_size };
    let norm_topk_prob = match architecture {
        A::Mixtral => true,
        _ => hf.bool_or("norm_topk_prob", false),
    };
    let shared_expert_intermediate = match architecture {
        A::Qwen2Moe => hf.usize_opt(&["shared_expert_intermediate_size"])?,
        _ => None,
    };
    let sparse_layers = if qwen {
        let step = hf.usize_opt(&["decoder_sparse_step"])?.unwrap_or(1);
        let dense: Vec<u64> = match hf.get("mlp_only_layers") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>())
                .ok_or_else(|| {
                    Error::config(hf.path, "`mlp_only_layers` must be a list of layer indices")
                })?,
        };
        (0..num_layers).map(|l| !dense.contains(&(l as u64)) && (l + 1) % step == 0).collect()
    } else {
        vec![true; num_layers]
    };
    Ok(MoeParams {
        num_experts,
        top_k,
        expert_intermediate,
        norm_topk_prob,
        shared_expert_intermediate,
        sparse_layers,
    })
}

/// Parse one RoPE scaling object (`rope_scaling`, or a transformers-5 `rope_parameters`).
fn parse_rope_scaling(path: &Path, rs: &Value) -> Result<Option<RopeScaling>> {
    let ty = rs.get("rope_type").or_else(|| rs.get("type")).and_then(Value::as_str).unwrap_or("");
    let num = |key: &str| {
        rs.get(key).and_then(Value::as_f64).ok_or_else(|| {
            Error::config(path, format!("rope_scaling.{key} missing or not a number"))
        })
    };
    match ty {
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        })),
        "linear" => Ok(Some(RopeScaling::Linear { factor: num("factor")? })),
        "default" | "" => Ok(None),
        other => Err(Error::config(path, format!("rope_scaling type `{other}` is not supported"))),
    }
}
