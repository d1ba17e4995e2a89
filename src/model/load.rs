//! Turning a MODEL argument (GGUF file, HF directory, hub id) into a [`Model`].

use std::path::Path;
use std::time::Instant;

use crate::io::gguf::GgufFile;
use crate::io::tokenizer::Tokenizer;
use crate::io::{hub, safetensors};
use crate::model::{Architecture, Format, Model, ModelConfig, ModelSource, Tensor, Weights};
use crate::{Error, Result};

/// Load a model from a path or hub id.
pub fn load(spec: &str) -> Result<Model> {
    let start = Instant::now();
    let path = Path::new(spec);
    let mut model = if path.is_file() {
        load_gguf(path)?
    } else if path.is_dir() {
        load_hf_dir(path)?
    } else if hub::looks_like_hub_id(spec) {
        load_hf_dir(&hub::resolve(spec)?)?
    } else {
        return Err(Error::NotFound {
            id: spec.to_string(),
            msg: "no such file or directory, and not a hub id of the form org/name".into(),
        });
    };
    model.source.spec = spec.to_string();
    model.source.load_seconds = start.elapsed().as_secs_f64();
    Ok(model)
}

/// Load a Hugging Face directory: `config.json`, safetensors, optional `tokenizer.json`.
pub fn load_hf_dir(dir: &Path) -> Result<Model> {
    let config = ModelConfig::from_hf_json(&dir.join("config.json"))?;
    let mut weights = Weights::new();
    safetensors::load_into(&safetensors::checkpoint_files(dir)?, &mut weights)?;
    // Some checkpoints prefix nothing; normalize the tied head.
    if config.tie_word_embeddings {
        weights.remove("lm_head.weight");
    }
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.is_file() { Some(Tokenizer::from_file(&tok_path)?) } else { None };
    let model = Model {
        config,
        weights,
        tokenizer,
        source: ModelSource {
            spec: dir.display().to_string(),
            path: dir.to_path_buf(),
            format: Format::Safetensors,
            load_seconds: 0.0,
            name: name_or_path(&dir.join("config.json")),
        },
    };
    crate::model::arch::validate(&model)?;
    Ok(model)
}

/// `_name_or_path` of a config.json, if any.
fn name_or_path(config: &Path) -> Option<String> {
    let text = std::fs::read_to_string(config).ok()?;
    let j: serde_json::Value = serde_json::from_str(&text).ok()?;
    j.get("_name_or_path")?.as_str().filter(|s| !s.is_empty()).map(str::to_string)
}

/// The HF name of a llama.cpp tensor name, when it is one swk knows.
pub fn hf_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        "rope_freqs.weight" => Some("rope_freqs.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undo llama.cpp's Q/K row permutation: within each head, GGUF stores rotary pairs
/// interleaved (row `2i + j`), HF stores them as halves (row `j * d/2 + i`).
pub fn unpermute_rows(data: &[f32], rows: usize, cols: usize, n_heads: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    let d = rows / n_heads;
    let half = d / 2;
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * d + 2 * i + j;
                let dst = h * d + j * half + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Load a GGUF file: metadata to config, tensors dequantized to f32 under HF names.
pub fn load_gguf(path: &Path) -> Result<Model> {
    let g = GgufFile::open(path)?;
    let config = ModelConfig::from_gguf(&g)?;
    let mut weights = Weights::new();
    for t in &g.tensors {
        let Some(name) = hf_name(&t.name) else {
            return Err(Error::format(
                path,
                format!("unexpected tensor `{}` for {}", t.name, config.architecture.name()),
            ));
        };
        let shape = t.shape();
        let mut data = g.dequantize(t)?;
        let llama_like = matches!(config.architecture, Architecture::Llama | Architecture::Mistral);
        if llama_like && shape.len() == 2 {
            if name.ends_with("q_proj.weight") {
                data = unpermute_rows(&data, shape[0], shape[1], config.num_heads);
            } else if name.ends_with("k_proj.weight") {
                data = unpermute_rows(&data, shape[0], shape[1], config.num_kv_heads);
            }
        }
        if llama_like && shape.len() == 1 {
            if name.ends_with("q_proj.bias") {
                data = unpermute_rows(&data, shape[0], 1, config.num_heads);
            } else if name.ends_with("k_proj.bias") {
                data = unpermute_rows(&data, shape[0], 1, config.num_kv_heads);
            }
        }
        weights.insert(name.clone(), Tensor::new(&name, shape, data, t.ty.name())?);
    }
    let tokenizer = Some(Tokenizer::from_gguf(&g)?);
    let model = Model {
        config,
        weights,
        tokenizer,
        source: ModelSource {
            spec: path.display().to_string(),
            path: path.to_path_buf(),
            format: Format::Gguf,
            load_seconds: 0.0,
            name: g.opt_str("general.name").map(str::to_string),
        },
    };
    crate::model::arch::validate(&model)?;
    Ok(model)
}
