//! Model hyper-parameters, read from a Hugging Face `config.json` or GGUF metadata.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::io::gguf::GgufFile;
use crate::{Error, Result};

mod deepseek;
use deepseek::{deepseek_gguf, deepseek_hf};
pub use deepseek::{DeepseekParams, GroupScore, Yarn};

/// The architectures swk runs, as named in `config.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 1/2/3, SmolLM and other `LlamaForCausalLM` models.
    Llama,
    /// Mistral (Llama with an optional sliding window).
    Mistral,
    /// Qwen2 / Qwen2.5 (Llama with q/k/v biases).
    Qwen2,
    /// Qwen3 (Llama with RMSNorm on each q/k head before RoPE).
    Qwen3,
    /// Gemma (GeGLU, `(1 + w)` RMSNorm, embedding scaled by √hidden).
    Gemma,
    /// Gemma 2 (Gemma with norms after attention and MLP, soft-capping, alternating windows).
    Gemma2,
    /// Gemma 3 (Gemma 2 with QK-norm and a local RoPE base on sliding-window layers).
    Gemma3,
    /// Phi-3 (fused `qkv_proj` and `gate_up_proj`).
    Phi3,
    /// OLMo (non-parametric LayerNorm, optional q/k/v clipping).
    Olmo,
    /// OLMo 2 (norms after attention and MLP, QK-norm over the whole projections).
    Olmo2,
    /// GPT-2 (learned positions, LayerNorm with bias, GELU MLP, biases everywhere).
    Gpt2,
    /// GPT-NeoX / Pythia (parallel residual, partial rotary, fused per-head q/k/v).
    GptNeoX,
    /// Mixtral (Mistral attention, softmax top-k experts renormalized).
    Mixtral,
    /// OLMoE (OLMo 2-style QK-norm over whole projections, pre-norm blocks, top-k experts).
    Olmoe,
    /// Qwen2-MoE (Qwen2 attention, top-k experts plus a sigmoid-gated shared expert).
    Qwen2Moe,
    /// Qwen3-MoE (Qwen3 attention, top-k experts).
    Qwen3Moe,
    /// DeepSeek-V2 (multi-head latent attention, softmax-routed experts plus shared experts).
    #[serde(rename = "deepseek2")]
    DeepseekV2,
    /// DeepSeek-V3 (DeepSeek-V2 with sigmoid routing, a selection bias and expert groups).
    #[serde(rename = "deepseek3")]
    DeepseekV3,
}

/// Comma-separated list of supported architecture names, for error messages.
pub const SUPPORTED_ARCHITECTURES: &str =
    "llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3, phi3, olmo, olmo2, gpt2, gptneox, \
     mixtral, olmoe, qwen2moe, qwen3moe, deepseek2, deepseek3";

impl Architecture {
    /// Parse a `model_type` / GGUF `general.architecture` name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "llama" | "smollm" => Some(Architecture::Llama),
            "mistral" => Some(Architecture::Mistral),
            "qwen2" => Some(Architecture::Qwen2),
            "qwen3" => Some(Architecture::Qwen3),
            "gemma" => Some(Architecture::Gemma),
            "gemma2" => Some(Architecture::Gemma2),
            "gemma3" | "gemma3_text" => Some(Architecture::Gemma3),
            "phi3" => Some(Architecture::Phi3),
            "olmo" => Some(Architecture::Olmo),
            "olmo2" => Some(Architecture::Olmo2),
            "gpt2" => Some(Architecture::Gpt2),
            "gpt_neox" | "gptneox" => Some(Architecture::GptNeoX),
            "mixtral" => Some(Architecture::Mixtral),
            "olmoe" => Some(Architecture::Olmoe),
            "qwen2_moe" | "qwen2moe" => Some(Architecture::Qwen2Moe),
            "qwen3_moe" | "qwen3moe" => Some(Architecture::Qwen3Moe),
            // llama.cpp names both DeepSeek-V2 and -V3 `deepseek2` (see `from_gguf`).
            "deepseek_v2" | "deepseekv2" | "deepseek2" => Some(Architecture::DeepseekV2),
            "deepseek_v3" | "deepseekv3" | "deepseek3" => Some(Architecture::DeepseekV3),
            _ => None,
        }
    }
    /// Parse a `config.json` `architectures[0]` class name.
    pub fn from_class(class: &str) -> Option<Self> {
        match class {
            "LlamaForCausalLM" => Some(Architecture::Llama),
            "MistralForCausalLM" => Some(Architecture::Mistral),
            "Qwen2ForCausalLM" => Some(Architecture::Qwen2),
            "Qwen3ForCausalLM" => Some(Architecture::Qwen3),
            "GemmaForCausalLM" => Some(Architecture::Gemma),
            "Gemma2ForCausalLM" => Some(Architecture::Gemma2),
            "Gemma3ForCausalLM" | "Gemma3ForConditionalGeneration" => Some(Architecture::Gemma3),
            "Phi3ForCausalLM" => Some(Architecture::Phi3),
            "OlmoForCausalLM" | "OLMoForCausalLM" => Some(Architecture::Olmo),
            "Olmo2ForCausalLM" => Some(Architecture::Olmo2),
            "GPT2LMHeadModel" => Some(Architecture::Gpt2),
            "GPTNeoXForCausalLM" => Some(Architecture::GptNeoX),
            "MixtralForCausalLM" => Some(Architecture::Mixtral),
            "OlmoeForCausalLM" => Some(Architecture::Olmoe),
            "Qwen2MoeForCausalLM" => Some(Architecture::Qwen2Moe),
            "Qwen3MoeForCausalLM" => Some(Architecture::Qwen3Moe),
            "DeepseekV2ForCausalLM" => Some(Architecture::DeepseekV2),
            "DeepseekV3ForCausalLM" => Some(Architecture::DeepseekV3),
            _ => None,
        }
    }
    /// The lowercase name (llama.cpp's `general.architecture` spelling; `deepseek3` for
    /// DeepSeek-V3, which llama.cpp also calls `deepseek2`).
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Gemma => "gemma",
            Architecture::Gemma2 => "gemma2",
            Architecture::Gemma3 => "gemma3",
            Architecture::Phi3 => "phi3",
            Architecture::Olmo => "olmo",
            Architecture::Olmo2 => "olmo2",
            Architecture::Gpt2 => "gpt2",
            Architecture::GptNeoX => "gptneox",
            Architecture::Mixtral => "mixtral",
            Architecture::Olmoe => "olmoe",
            Architecture::Qwen2Moe => "qwen2moe",
            Architecture::Qwen3Moe => "qwen3moe",
            Architecture::DeepseekV2 => "deepseek2",
            Architecture::DeepseekV3 => "deepseek3",
        }
    }
    /// Whether the family routes tokens to mixture-of-experts MLPs.
    pub fn is_moe(self) -> bool {
        matches!(
            self,
            Architecture::Mixtral
                | Architecture::Olmoe
                | Architecture::Qwen2Moe
                | Architecture::Qwen3Moe
                | Architecture::DeepseekV2
                | Architecture::DeepseekV3
        )
    }
    /// Whether the family is DeepSeek-V2/V3 (multi-head latent attention, shared experts).
    pub fn is_deepseek(self) -> bool {
        matches!(self, Architecture::DeepseekV2 | Architecture::DeepseekV3)
    }
    /// Whether the family is Gemma, Gemma 2 or Gemma 3 (RMSNorm by `1 + w`, GeGLU, the
    /// embedding scaled by √hidden).
    pub fn is_gemma(self) -> bool {
        matches!(self, Architecture::Gemma | Architecture::Gemma2 | Architecture::Gemma3)
    }
    /// Whether the MLP is gated (`act(gate) ⊙ up`); GPT-2 and GPT-NeoX use `act(up)`.
    pub fn gated_mlp(self) -> bool {
        !matches!(self, Architecture::Gpt2 | Architecture::GptNeoX)
    }
}

/// The MLP activation function.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// `x · sigmoid(x)`.
    #[default]
    Silu,
    /// GELU, tanh approximation: `x/2 · (1 + tanh(√(2/π) (x + 0.044715 x³)))`.
    GeluTanh,
    /// GELU, exact: `x/2 · (1 + erf(x/√2))`.
    Gelu,
}

impl HiddenAct {
    /// Parse a `hidden_act` / `activation_function` name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(HiddenAct::Silu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" | "gelu_tanh" => {
                Some(HiddenAct::GeluTanh)
            }
            "gelu" => Some(HiddenAct::Gelu),
            _ => None,
        }
    }
}

/// Hyper-parameters that only some families use. The defaults describe a plain Llama.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FamilyParams {
    /// Per layer, whether it uses the sliding window (`ModelConfig::sliding_window`); empty
    /// when every layer does (Mistral). Gemma 2 alternates, Gemma 3 has a pattern.
    pub sliding_layers: Vec<bool>,
    /// RoPE base of the sliding-window layers when it differs from `rope_theta` (Gemma 3's
    /// `rope_local_base_freq`; these layers use no RoPE scaling).
    pub rope_local_theta: Option<f64>,
    /// Rotated dims per head when RoPE is partial (GPT-NeoX `rotary_pct`, Phi
    /// `partial_rotary_factor`); `None` rotates the whole head.
    pub rotary_dim: Option<usize>,
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2` instead of
    /// `head_dim^-1/2` (Gemma 2/3).
    pub query_pre_attn_scalar: Option<f64>,
    /// Attention logits soft-capped to `cap · tanh(s / cap)` before the mask (Gemma 2).
    pub attn_logit_softcapping: Option<f64>,
    /// Final logits soft-capped to `cap · tanh(z / cap)` (Gemma 2/3).
    pub final_logit_softcapping: Option<f64>,
    /// q, k and v clamped to `[-clip, clip]` after their projections (OLMo `clip_qkv`).
    pub clip_qkv: Option<f64>,
    /// Attention and MLP both read the block's input and add into it (GPT-NeoX).
    pub parallel_residual: bool,
    /// Attention scores also divided by `layer + 1` (GPT-2 `scale_attn_by_inverse_layer_idx`).
    pub scale_attn_by_inverse_layer_idx: bool,
    /// The MLP activation.
    pub hidden_act: HiddenAct,
    /// Mixture-of-experts settings (MoE families only).
    pub moe: Option<MoeParams>,
    /// DeepSeek-V2/V3 attention and routing settings (DeepSeek only).
    pub deepseek: Option<DeepseekParams>,
}

/// Mixture-of-experts hyper-parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MoeParams {
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// Inner width of one expert (columns of its `down_proj`).
    pub expert_intermediate: usize,
    /// Whether the top-k routing probabilities are renormalized to sum to 1.
    pub norm_topk_prob: bool,
    /// Inner width of the always-on shared expert (Qwen2-MoE), if any.
    pub shared_expert_intermediate: Option<usize>,
    /// Per layer, whether its MLP is a mixture of experts (otherwise a dense MLP of
    /// `intermediate_size`).
    pub sparse_layers: Vec<bool>,
}

impl MoeParams {
    /// Whether layer `l` routes to experts.
    pub fn is_sparse(&self, l: usize) -> bool {
        self.sparse_layers.get(l).copied().unwrap_or(false)
    }
}

/// RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Llama 3.1 style: low frequencies divided by `factor`, a smooth ramp between.
    Llama3 {
        /// Scale for low frequencies.
        factor: f64,
        /// Wavelength boundary factor for the low band.
        low_freq_factor: f64,
        /// Wavelength boundary factor for the high band.
        high_freq_factor: f64,
        /// Context length the model was trained with before scaling.
        original_max_position_embeddings: f64,
    },
    /// Positions divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
}

/// Hyper-parameters of a decoder-only transformer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    /// Architecture family member.
    pub architecture: Architecture,
    /// Residual stream width.
    pub hidden_size: usize,
    /// MLP inner width (columns of `down_proj`).
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// Optional RoPE scaling.
    pub rope_scaling: Option<RopeScaling>,
    /// Epsilon of every norm (RMSNorm or LayerNorm, whichever the family uses).
    pub rms_norm_eps: f64,
    /// Whether the LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections carry biases.
    pub attention_bias: bool,
    /// Sliding-window attention width, if any (which layers use it: `family.sliding_layers`).
    pub sliding_window: Option<usize>,
    /// Hyper-parameters of the non-Llama families (defaults for the Llama family).
    pub family: FamilyParams,
}

/// Typed look-ups in a parsed `config.json`, with key aliases (GPT-2 spells `hidden_size`
/// `n_embd`, ...). A key that is absent or `null` counts as missing.
struct Hf<'a> {
    path: &'a Path,
    j: &'a Value,
}

impl<'a> Hf<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.j.get(key).filter(|v| !v.is_null())
    }
    /// The first of `keys` that is present, with its name.
    fn first(&self, keys: &[&'static str]) -> Option<(&'static str, &'a Value)> {
        keys.iter().find_map(|&k| self.get(k).map(|v| (k, v)))
    }
    fn usize_opt(&self, keys: &[&'static str]) -> Result<Option<usize>> {
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
    fn usize_or(&self, keys: &[&'static str], default: Option<usize>) -> Result<usize> {
        self.usize_opt(keys)?.or(default).ok_or_else(|| {
            Error::config(self.path, format!("missing field `{}`", keys.join("` or `")))
        })
    }
    fn f64_opt(&self, keys: &[&'static str]) -> Result<Option<f64>> {
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
    fn nullable_f64(&self, key: &str, default: Option<f64>) -> Result<Option<f64>> {
        match self.j.get(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Error::config(self.path, format!("`{key}` must be a number"))),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> bool {
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
        let num_layers = hf.usize_or(&["num_hidden_layers", "n_layer"], d(26))?;
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
        let num_layers = as_usize("block_count")?;
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
                Some(s) if s > 0.0 => 1.0 / (s * s),
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
                    num_experts: as_usize("expert_count")?,
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

    fn validate(&self, path: &Path) -> Result<()> {
        if self.num_heads % self.num_kv_heads != 0 {
            return Err(Error::config(
                path,
                format!(
                    "{} attention heads are not a multiple of {} key/value heads",
                    self.num_heads, self.num_kv_heads
                ),
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(Error::config(
                path,
                format!("head_dim {} must be even for RoPE", self.head_dim),
            ));
        }
        if let Some(r) = self.family.rotary_dim {
            if r == 0 || r % 2 != 0 || r > self.head_dim {
                return Err(Error::config(
                    path,
                    format!("rotary dims {r} must be even and at most head_dim {}", self.head_dim),
                ));
            }
        }
        let layers = &self.family.sliding_layers;
        if !layers.is_empty() && layers.len() != self.num_layers {
            return Err(Error::config(
                path,
                format!("{} layer types for {} layers", layers.len(), self.num_layers),
            ));
        }
        let fused_heads = matches!(self.architecture, Architecture::Gpt2 | Architecture::GptNeoX);
        if fused_heads
            && (self.num_kv_heads != self.num_heads
                || self.head_dim * self.num_heads != self.hidden_size)
        {
            return Err(Error::config(
                path,
                format!(
                    "{} needs num_heads · head_dim = hidden_size and no GQA",
                    self.architecture.name()
                ),
            ));
        }
        Ok(())
    }

    /// The sliding window of layer `layer`, if it uses one.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        let slides = self.family.sliding_layers.get(layer).copied().unwrap_or(true);
        self.sliding_window.filter(|_| slides)
    }

    /// The factor attention scores `q·k` are multiplied by in layer `layer`.
    pub fn attention_scale(&self, layer: usize) -> f32 {
        let base = self.family.query_pre_attn_scalar.unwrap_or(self.head_dim as f64);
        let mut s = 1.0 / base.sqrt();
        if self.family.scale_attn_by_inverse_layer_idx {
            s /= (layer + 1) as f64;
        }
        s as f32
    }

    /// Rotated dims per head (all of them unless RoPE is partial).
    pub fn rotary_dim(&self) -> usize {
        self.family.rotary_dim.unwrap_or(self.head_dim)
    }

    /// Approximate parameter count from the shapes (embedding, blocks, head).
    pub fn parameter_count(&self) -> u64 {
        if let Some(d) = &self.family.deepseek {
            return self.deepseek_parameter_count(d);
        }
        let (h, i, l, v) = (
            self.hidden_size as u64,
            self.intermediate_size as u64,
            self.num_layers as u64,
            self.vocab_size as u64,
        );
        let q = (self.num_heads * self.head_dim) as u64;
        let kv = (self.num_kv_heads * self.head_dim) as u64;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let qk_norm = match self.architecture {
            Architecture::Qwen3 | Architecture::Qwen3Moe | Architecture::Gemma3 => {
                2 * self.head_dim as u64
            }
            Architecture::Olmo2 | Architecture::Olmoe => q + kv,
            _ => 0,
        };
        let attn = h * q + 2 * h * kv + q * h + bias + qk_norm;
        let mlp = if self.architecture.gated_mlp() { 3 * h * i } else { 2 * h * i };
        let block = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        let positions = if self.architecture == Architecture::Gpt2 {
            self.max_position_embeddings as u64 * h
        } else {
            0
        };
        // A sparse layer holds its router and experts (and shared expert) instead of the MLP.
        let sparse: u64 = match &self.family.moe {
            None => 0,
            Some(m) => {
                let (ne, ei) = (m.num_experts as u64, m.expert_intermediate as u64);
                let shared = m.shared_expert_intermediate.map_or(0, |si| 3 * h * si as u64 + h);
                let n = m.sparse_layers.iter().filter(|&&s| s).count() as u64;
                n * (ne * h + ne * 3 * h * ei + shared) - n * mlp
            }
        };
        v * h + positions + l * block + sparse + h + head
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
    let num_experts = hf.usize_or(&["num_local_experts", "num_experts"], None)?;
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
