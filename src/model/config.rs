//! Model hyper-parameters, read from a Hugging Face `config.json` or GGUF metadata.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::io::gguf::GgufFile;
use crate::{Error, Result};

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
}

/// Comma-separated list of supported architecture names, for error messages.
pub const SUPPORTED_ARCHITECTURES: &str = "llama, mistral, qwen2";

impl Architecture {
    /// Parse a `model_type` / GGUF `general.architecture` name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "llama" | "smollm" => Some(Architecture::Llama),
            "mistral" => Some(Architecture::Mistral),
            "qwen2" => Some(Architecture::Qwen2),
            _ => None,
        }
    }
    /// Parse a `config.json` `architectures[0]` class name.
    pub fn from_class(class: &str) -> Option<Self> {
        match class {
            "LlamaForCausalLM" => Some(Architecture::Llama),
            "MistralForCausalLM" => Some(Architecture::Mistral),
            "Qwen2ForCausalLM" => Some(Architecture::Qwen2),
            _ => None,
        }
    }
    /// The lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
        }
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
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether the LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections carry biases.
    pub attention_bias: bool,
    /// Sliding-window attention width, if any.
    pub sliding_window: Option<usize>,
}

fn field<'a>(path: &Path, j: &'a Value, key: &str) -> Result<&'a Value> {
    j.get(key)
        .filter(|v| !v.is_null())
        .ok_or_else(|| Error::config(path, format!("missing field `{key}`")))
}

fn usize_field(path: &Path, j: &Value, key: &str) -> Result<usize> {
    field(path, j, key)?
        .as_u64()
        .and_then(|v| usize::try_from(v).ok())
        .filter(|&v| v > 0)
        .ok_or_else(|| Error::config(path, format!("`{key}` must be a positive integer")))
}

fn f64_field(path: &Path, j: &Value, key: &str) -> Result<f64> {
    field(path, j, key)?
        .as_f64()
        .ok_or_else(|| Error::config(path, format!("`{key}` must be a number")))
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
    pub fn from_hf_value(path: &Path, j: &Value) -> Result<Self> {
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
        let hidden_size = usize_field(path, j, "hidden_size")?;
        let num_heads = usize_field(path, j, "num_attention_heads")?;
        let num_kv_heads = match j.get("num_key_value_heads").filter(|v| !v.is_null()) {
            Some(_) => usize_field(path, j, "num_key_value_heads")?,
            None => num_heads,
        };
        let head_dim = match j.get("head_dim").filter(|v| !v.is_null()) {
            Some(_) => usize_field(path, j, "head_dim")?,
            None => hidden_size / num_heads,
        };
        let rope_theta = match j.get("rope_theta") {
            Some(v) if !v.is_null() => f64_field(path, j, "rope_theta")?,
            _ => j
                .get("rope_parameters")
                .and_then(|r| r.get("rope_theta"))
                .and_then(Value::as_f64)
                .unwrap_or(10000.0),
        };
        let rope_scaling = parse_rope_scaling(path, j)?;
        let cfg = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: usize_field(path, j, "intermediate_size")?,
            num_layers: usize_field(path, j, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: usize_field(path, j, "vocab_size")?,
            max_position_embeddings: j
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .map_or(4096, |v| v as usize),
            rope_theta,
            rope_scaling,
            rms_norm_eps: f64_field(path, j, "rms_norm_eps")?,
            tie_word_embeddings: j
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            attention_bias: match architecture {
                Architecture::Qwen2 => true,
                _ => j.get("attention_bias").and_then(Value::as_bool).unwrap_or(false),
            },
            sliding_window: match architecture {
                Architecture::Mistral => {
                    j.get("sliding_window").and_then(Value::as_u64).map(|v| v as usize)
                }
                // Qwen2 declares a window but only applies it with use_sliding_window.
                Architecture::Qwen2 if j.get("use_sliding_window") == Some(&Value::Bool(true)) => {
                    j.get("sliding_window").and_then(Value::as_u64).map(|v| v as usize)
                }
                _ => None,
            },
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Read the hyper-parameters from GGUF metadata (`{arch}.block_count`, ...).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
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
        let as_usize = |key: &str| -> Result<usize> {
            let v = g.require_u64(&k(key))?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| Error::config(path, format!("`{}` must be positive", k(key))))
        };
        let hidden_size = as_usize("embedding_length")?;
        let num_heads = as_usize("attention.head_count")?;
        let num_kv_heads = match g.get(&k("attention.head_count_kv")) {
            Some(_) => as_usize("attention.head_count_kv")?,
            None => num_heads,
        };
        let head_dim = match g.get(&k("attention.key_length")) {
            Some(_) => as_usize("attention.key_length")?,
            None => hidden_size / num_heads,
        };
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
        let cfg = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: as_usize("feed_forward_length")?,
            num_layers: as_usize("block_count")?,
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
            rms_norm_eps: g.opt_f64(&k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            tie_word_embeddings: g.tensor("output.weight").is_none(),
            attention_bias: g.tensor("blk.0.attn_q.bias").is_some(),
            sliding_window: None,
        };
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
        Ok(())
    }

    /// Approximate parameter count from the shapes (embedding, blocks, head).
    pub fn parameter_count(&self) -> u64 {
        let (h, i, l, v) = (
            self.hidden_size as u64,
            self.intermediate_size as u64,
            self.num_layers as u64,
            self.vocab_size as u64,
        );
        let q = (self.num_heads * self.head_dim) as u64;
        let kv = (self.num_kv_heads * self.head_dim) as u64;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let attn = h * q + 2 * h * kv + q * h + bias;
        let mlp = 3 * h * i;
        let block = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + l * block + h + head
    }
}

fn parse_rope_scaling(path: &Path, j: &Value) -> Result<Option<RopeScaling>> {
    let Some(rs) = j.get("rope_scaling").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
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
