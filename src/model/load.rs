//! Turning a MODEL argument (GGUF file, HF directory, hub id) into a [`Model`].

use std::path::Path;
use std::time::Instant;

use crate::io::gguf::GgufFile;
use crate::io::tokenizer::Tokenizer;
use crate::io::{hub, safetensors};
use crate::model::arch::deepseek;
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
    normalize_hf(&config, &mut weights)?;
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

/// Bring a Hugging Face checkpoint's tensors into swk's naming and layout, per family:
/// Gemma 3 multimodal checkpoints lose their vision tower and the `language_model` prefix;
/// GPT-2 and GPT-NeoX tensors are renamed (and reshaped) as their modules document.
fn normalize_hf(config: &ModelConfig, weights: &mut Weights) -> Result<()> {
    match config.architecture {
        Architecture::Gemma3 => crate::model::arch::gemma::strip_multimodal(weights),
        Architecture::Gpt2 => crate::model::arch::gpt2::rename_hf(weights),
        Architecture::GptNeoX => crate::model::arch::gpt_neox::rename_hf(config, weights),
        a if a.is_moe() => crate::model::arch::moe::normalize_hf(config, weights),
        _ => Ok(()),
    }
}

/// The HF name of a llama.cpp tensor name of a Llama-family model, when it is one swk knows.
pub fn hf_name(gguf_name: &str) -> Option<String> {
    hf_name_for(Architecture::Llama, gguf_name)
}

/// The name swk gives a llama.cpp tensor of an `arch` model (HF names; for GPT-2 and
/// GPT-NeoX the swk names their modules document), when it is one swk knows.
pub fn hf_name_for(arch: Architecture, gguf_name: &str) -> Option<String> {
    use Architecture as A;
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "position_embd.weight" if arch == A::Gpt2 => Some("model.embed_positions.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output_norm.bias" if matches!(arch, A::Gpt2 | A::GptNeoX) => Some("model.norm.bias"),
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
    if arch.is_deepseek() {
        if let Some(n) = deepseek_hf_name(part, kind) {
            return Some(format!("model.layers.{layer}.{n}"));
        }
    }
    let special = match (arch, part) {
        (A::Gemma2 | A::Gemma3, "ffn_norm") => Some("pre_feedforward_layernorm"),
        (A::Gemma2 | A::Gemma3 | A::Olmo2, "post_attention_norm") => {
            Some("post_attention_layernorm")
        }
        (A::Gemma2 | A::Gemma3 | A::Olmo2, "post_ffw_norm") => Some("post_feedforward_layernorm"),
        (A::Qwen3 | A::Gemma3 | A::Olmo2 | A::Olmoe | A::Qwen3Moe, "attn_q_norm") => {
            Some("self_attn.q_norm")
        }
        (A::Qwen3 | A::Gemma3 | A::Olmo2 | A::Olmoe | A::Qwen3Moe, "attn_k_norm") => {
            Some("self_attn.k_norm")
        }
        (_, "ffn_gate_inp") if arch.is_moe() => Some("mlp.gate"),
        (_, "ffn_gate_inp_shexp") if arch.is_moe() => Some("mlp.shared_expert_gate"),
        (_, "ffn_gate_shexp") if arch.is_moe() => Some("mlp.shared_expert.gate_proj"),
        (_, "ffn_up_shexp") if arch.is_moe() => Some("mlp.shared_expert.up_proj"),
        (_, "ffn_down_shexp") if arch.is_moe() => Some("mlp.shared_expert.down_proj"),
        (A::Phi3 | A::Gpt2 | A::GptNeoX, "attn_qkv") => Some("self_attn.qkv_proj"),
        (A::Phi3, "ffn_up") => Some("mlp.gate_up_proj"),
        _ => None,
    };
    let hf = match special {
        Some(s) => s,
        None => match part {
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
        },
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// The HF name (after `model.layers.L.`) of llama.cpp's DeepSeek-only tensor `part.kind`:
/// MLA projections and norms, the router's selection bias, the shared experts.
fn deepseek_hf_name(part: &str, kind: &str) -> Option<String> {
    let hf = match part {
        "attn_q_a" => "self_attn.q_a_proj",
        "attn_q_a_norm" => "self_attn.q_a_layernorm",
        "attn_q_b" => "self_attn.q_b_proj",
        "attn_kv_a_mqa" => "self_attn.kv_a_proj_with_mqa",
        "attn_kv_a_norm" => "self_attn.kv_a_layernorm",
        "attn_kv_b" => "self_attn.kv_b_proj",
        "exp_probs_b" => return Some("mlp.gate.e_score_correction_bias".to_string()),
        "ffn_gate_shexp" => "mlp.shared_experts.gate_proj",
        "ffn_up_shexp" => "mlp.shared_experts.up_proj",
        "ffn_down_shexp" => "mlp.shared_experts.down_proj",
        _ => return None,
    };
    Some(format!("{hf}.{kind}"))
}

/// `(layer, projection)` of a llama.cpp stacked-experts tensor name
/// (`blk.L.ffn_gate_exps.weight` -> `(L, "gate_proj")`).
fn expert_stack(gguf_name: &str) -> Option<(usize, &'static str)> {
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let what = match rest {
        "ffn_gate_exps.weight" => "gate_proj",
        "ffn_up_exps.weight" => "up_proj",
        "ffn_down_exps.weight" => "down_proj",
        _ => return None,
    };
    Some((layer.parse().ok()?, what))
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
    let arch = config.architecture;
    // llama.cpp permutes Q/K rows for its interleaved RoPE in these families only.
    let llama_like = matches!(
        arch,
        Architecture::Llama | Architecture::Mistral | Architecture::Mixtral | Architecture::Olmo
    );
    // llama.cpp stores Gemma's RMSNorm weights as 1 + w; swk keeps the HF weight w.
    let gemma = matches!(arch, Architecture::Gemma | Architecture::Gemma2 | Architecture::Gemma3);
    // DeepSeek's split MLA tensors (attn_k_b, attn_v_b), merged into kv_b_proj after the loop.
    let mut split_kv_b = std::collections::BTreeMap::new();
    for t in &g.tensors {
        if let Some((layer, is_k)) =
            arch.is_deepseek().then(|| deepseek::split_kv_b_name(&t.name)).flatten()
        {
            let part = Tensor::new(&t.name, t.shape(), g.dequantize(t)?, t.ty.name())?;
            let e: &mut (Option<Tensor>, Option<Tensor>) = split_kv_b.entry(layer).or_default();
            if is_k {
                e.0 = Some(part);
            } else {
                e.1 = Some(part);
            }
            continue;
        }
        // Stacked experts `blk.L.ffn_{gate,up,down}_exps` ([E, I, H] / [E, H, I]) become one
        // tensor per expert under HF's per-expert names.
        if let Some((layer, what)) = expert_stack(&t.name) {
            let shape = t.shape();
            let data = g.dequantize(t)?;
            let [n, rows, cols] = shape[..] else {
                return Err(Error::format(path, format!("`{}` is not 3-D", t.name)));
            };
            for (e, part) in data.chunks(rows * cols).take(n).enumerate() {
                let name = crate::model::arch::moe::expert_name(layer, e, what);
                let piece = Tensor::new(&name, vec![rows, cols], part.to_vec(), t.ty.name())?;
                weights.insert(name, piece);
            }
            continue;
        }
        let Some(name) = hf_name_for(arch, &t.name) else {
            return Err(Error::format(
                path,
                format!("unexpected tensor `{}` for {}", t.name, config.architecture.name()),
            ));
        };
        let shape = t.shape();
        let mut data = g.dequantize(t)?;
        if gemma && name.ends_with("norm.weight") {
            data.iter_mut().for_each(|v| *v -= 1.0);
        }
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
        // llama.cpp stores the shared-expert gate as a vector; HF as a [1, hidden] matrix.
        let shape = if name.ends_with("shared_expert_gate.weight") && shape.len() == 1 {
            vec![1, shape[0]]
        } else {
            shape
        };
        weights.insert(name.clone(), Tensor::new(&name, shape, data, t.ty.name())?);
    }
    if !split_kv_b.is_empty() {
        deepseek::merge_kv_b(&config, split_kv_b, &mut weights, path)?;
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
