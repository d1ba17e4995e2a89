//! Model hyper-parameters, read from a Hugging Face `config.json` (hf.rs) or GGUF metadata
//! (gguf.rs); DeepSeek's keys in both (deepseek.rs).

use std::path::Path;

use serde::Serialize;

use crate::{Error, Result};

mod deepseek;
mod gguf;
mod hf;
use deepseek::{deepseek_gguf, deepseek_hf};
pub use deepseek::{DeepseekParams, GroupScore, Yarn};
use hf::Hf;

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

/// The most transformer blocks a config may declare (the largest published models have
/// about 130): a larger count is a corrupt or hand-edited config, refused before anything is
/// sized by it.
pub const MAX_LAYERS: usize = 1 << 12;

/// `n` layers, declared by `key` in the config at `path`, if it is at most [`MAX_LAYERS`].
pub(crate) fn check_layer_count(path: &Path, key: &str, n: usize) -> Result<usize> {
    check_count(path, key, n, MAX_LAYERS, "layers")
}

/// The most routed experts a config may declare per layer (published mixtures have at most a
/// few hundred): more is a corrupt or hand-edited config, refused before anything is sized
/// by it.
pub const MAX_EXPERTS: usize = 1 << 12;

/// `n` routed experts, declared by `key` in the config at `path`, if at most [`MAX_EXPERTS`].
pub(crate) fn check_expert_count(path: &Path, key: &str, n: usize) -> Result<usize> {
    check_count(path, key, n, MAX_EXPERTS, "experts")
}

/// `n` `what`s, declared by `key` in the config at `path`, if at most `max`.
fn check_count(path: &Path, key: &str, n: usize, max: usize, what: &str) -> Result<usize> {
    if n > max {
        return Err(Error::config(
            path,
            format!("`{key}` = {n} {what} is implausible: swk reads at most {max}"),
        ));
    }
    Ok(n)
}

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

impl ModelConfig {
    fn validate(&self, path: &Path) -> Result<()> {
        self.validate_scalars(path)?;
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

    /// The real-valued hyper-parameters: finite, and positive where the forward pass divides
    /// by them or takes their logarithm (a norm's epsilon may be 0). Anything else would give
    /// NaN logits or panic later.
    fn validate_scalars(&self, path: &Path) -> Result<()> {
        let f = &self.family;
        let mut positive = vec![
            ("rope theta", Some(self.rope_theta)),
            ("local RoPE theta", f.rope_local_theta),
            ("query_pre_attn_scalar", f.query_pre_attn_scalar),
            ("attention logit softcapping", f.attn_logit_softcapping),
            ("final logit softcapping", f.final_logit_softcapping),
            ("clip_qkv", f.clip_qkv),
        ];
        match self.rope_scaling {
            Some(RopeScaling::Linear { factor }) => {
                positive.push(("RoPE scaling factor", Some(factor)))
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => positive.extend([
                ("RoPE scaling factor", Some(factor)),
                ("RoPE low_freq_factor", Some(low_freq_factor)),
                ("RoPE high_freq_factor", Some(high_freq_factor)),
                ("RoPE original_max_position_embeddings", Some(original_max_position_embeddings)),
            ]),
            None => {}
        }
        if let Some(y) = f.deepseek.as_ref().and_then(|d| d.yarn.as_ref()) {
            positive.extend([
                ("YaRN factor", Some(y.factor)),
                ("YaRN original_max_position_embeddings", Some(y.original_max_position_embeddings)),
                ("YaRN beta_fast", Some(y.beta_fast)),
                ("YaRN beta_slow", Some(y.beta_slow)),
            ]);
        }
        for (what, v) in positive {
            if let Some(v) = v.filter(|v| !(v.is_finite() && *v > 0.0)) {
                return Err(Error::config(
                    path,
                    format!("{what} must be a positive number, not {v}"),
                ));
            }
        }
        if let Some(d) = &f.deepseek {
            let r = d.routed_scaling_factor;
            if !r.is_finite() {
                return Err(Error::config(
                    path,
                    format!("routed_scaling_factor {r} is not finite"),
                ));
            }
        }
        let eps = self.rms_norm_eps;
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(Error::config(path, format!("norm epsilon must be 0 or more, not {eps}")));
        }
        Ok(())
    }

    /// The most positions a sequence may hold, when the model has a hard limit: GPT-2's
    /// learned position embeddings. Rotary models have none (quality fades past training).
    pub fn position_limit(&self) -> Option<usize> {
        (self.architecture == Architecture::Gpt2).then_some(self.max_position_embeddings)
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

    /// Whether q, k and v have biases: GPT-2 always, the others with `attention_bias`.
    pub fn has_qkv_bias(&self) -> bool {
        self.attention_bias || self.architecture == Architecture::Gpt2
    }

    /// Whether `o_proj` has a bias: GPT-2 always; Llama, Qwen3, OLMo and GPT-NeoX checkpoints
    /// with `attention_bias` have one on all four projections (as transformers builds them);
    /// Qwen2 only on q/k/v; Mistral none.
    pub fn has_o_proj_bias(&self) -> bool {
        self.architecture == Architecture::Gpt2
            || self.attention_bias
                && matches!(
                    self.architecture,
                    Architecture::Llama
                        | Architecture::Qwen3
                        | Architecture::Olmo
                        | Architecture::Olmo2
                        | Architecture::GptNeoX
                )
    }

    /// The parameter count, from the shapes: every tensor a checkpoint of this config holds
    /// (embedding, blocks with their norms and biases, final norm, head; equal to a loaded
    /// model's element count for every family fixture).
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
        let bias = if self.has_qkv_bias() { q + 2 * kv } else { 0 }
            + if self.has_o_proj_bias() { h } else { 0 };
        // LayerNorms with biases (GPT-2, GPT-NeoX), parameter-free ones (OLMo), and Gemma 2/3's
        // four norms a block.
        let gpt = matches!(self.architecture, Architecture::Gpt2 | Architecture::GptNeoX);
        let (norms, final_norm) = match self.architecture {
            Architecture::Gpt2 | Architecture::GptNeoX => (4 * h, 2 * h),
            Architecture::Olmo => (0, 0),
            Architecture::Gemma2 | Architecture::Gemma3 => (4 * h, h),
            _ => (2 * h, h),
        };
        let qk_norm = match self.architecture {
            Architecture::Qwen3 | Architecture::Qwen3Moe | Architecture::Gemma3 => {
                2 * self.head_dim as u64
            }
            Architecture::Olmo2 | Architecture::Olmoe => q + kv,
            _ => 0,
        };
        let attn = h * q + 2 * h * kv + q * h + bias + qk_norm;
        let mlp = if self.architecture.gated_mlp() { 3 * h * i } else { 2 * h * i }
            + if gpt { i + h } else { 0 };
        let block = attn + mlp + norms;
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
        v * h + positions + l * block + sparse + final_norm + head
    }
}
