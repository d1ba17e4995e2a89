//! Turning a MODEL argument (GGUF file, HF directory, hub id) into a [`Model`].

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::io::gguf::GgufFile;
use crate::io::tokenizer::Tokenizer;
use crate::io::{hub, safetensors};
use crate::model::arch::deepseek;
use crate::model::{Architecture, Format, Model, ModelConfig, ModelSource, Tensor, Weights};
use crate::{Error, Result};

/// What a MODEL argument names, once resolved to local files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelPath {
    /// A single GGUF file.
    Gguf(PathBuf),
    /// A Hugging Face directory (local, or a hub id's snapshot in the hf-hub cache).
    HfDir(PathBuf),
}

/// Resolve a MODEL argument: an existing file (GGUF), a directory, or a hub id found in the
/// hf-hub cache. Errors name the argument.
pub fn resolve(spec: &str) -> Result<ModelPath> {
    let path = Path::new(spec);
    if path.is_file() {
        Ok(ModelPath::Gguf(path.to_path_buf()))
    } else if path.is_dir() {
        Ok(ModelPath::HfDir(path.to_path_buf()))
    } else if hub::looks_like_hub_id(spec) {
        Ok(ModelPath::HfDir(hub::resolve(spec)?))
    } else {
        Err(Error::NotFound {
            id: spec.to_string(),
            msg: "no such file or directory, and not a hub id of the form org/name".into(),
        })
    }
}

/// A model's configuration only (config.json, or the GGUF metadata), without its weights.
pub fn read_config(spec: &str) -> Result<ModelConfig> {
    match resolve(spec)? {
        ModelPath::Gguf(p) => ModelConfig::from_gguf(&GgufFile::open(&p)?),
        ModelPath::HfDir(d) => ModelConfig::from_hf_json(&d.join("config.json")),
    }
}

/// Load a model from a path or hub id.
pub fn load(spec: &str) -> Result<Model> {
    let start = Instant::now();
    let mut model = match resolve(spec)? {
        ModelPath::Gguf(p) => load_gguf(&p).map_err(naming(&p))?,
        ModelPath::HfDir(d) => load_hf_dir(&d).map_err(naming(&d))?,
    };
    model.source.spec = spec.to_string();
    model.source.load_seconds = start.elapsed().as_secs_f64();
    Ok(model)
}

/// Tensor errors raised while loading the model at `path`, with the model named (a missing
/// or misshapen tensor is the file's fault).
fn naming(path: &Path) -> impl FnOnce(Error) -> Error + '_ {
    move |e| match e {
        Error::Tensor { name, msg } => Error::format(path, format!("tensor `{name}`: {msg}")),
        e => e,
    }
}

/// Load a Hugging Face directory: `config.json`, safetensors, optional `tokenizer.json`.
pub fn load_hf_dir(dir: &Path) -> Result<Model> {
    let config = ModelConfig::from_hf_json(&dir.join("config.json"))?;
    let mut weights = Weights::new();
    let fp8_block = safetensors::fp8_block_size(&dir.join("config.json"))?;
    safetensors::load_into(&safetensors::checkpoint_files(dir)?, fp8_block, &mut weights)?;
    normalize_hf(&config, &mut weights)?;
    // Some checkpoints prefix nothing; normalize the tied head.
    if config.tie_word_embeddings {
        weights.remove("lm_head.weight");
    }
    let model = Model { config, weights, tokenizer: hf_tokenizer(dir)?, source: hf_source(dir) };
    crate::model::arch::validate(&model)?;
    Ok(model)
}

/// A Hugging Face directory's `tokenizer.json`, when it has one.
pub(crate) fn hf_tokenizer(dir: &Path) -> Result<Option<Tokenizer>> {
    let path = dir.join("tokenizer.json");
    if path.is_file() {
        Ok(Some(Tokenizer::from_file(&path)?))
    } else {
        Ok(None)
    }
}

/// Provenance of a Hugging Face directory (name from config.json's `_name_or_path`).
pub(crate) fn hf_source(dir: &Path) -> ModelSource {
    ModelSource {
        spec: dir.display().to_string(),
        path: dir.to_path_buf(),
        format: Format::Safetensors,
        load_seconds: 0.0,
        name: name_or_path(&dir.join("config.json")),
    }
}

/// Provenance of a GGUF file (name from `general.name`).
pub(crate) fn gguf_source(g: &GgufFile) -> ModelSource {
    ModelSource {
        spec: g.path().display().to_string(),
        path: g.path().to_path_buf(),
        format: Format::Gguf,
        load_seconds: 0.0,
        name: g.opt_str("general.name").map(str::to_string),
    }
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
    // DeepSeek's split MLA tensors (attn_k_b, attn_v_b), merged into kv_b_proj after the loop.
    let mut split_kv_b = std::collections::BTreeMap::new();
    for t in &g.tensors {
        if let Some((layer, is_k)) = split_kv_b_part(&config, &t.name) {
            let part = Tensor::new(&t.name, t.shape(), g.dequantize(t)?, t.ty.name())?;
            let e: &mut (Option<Tensor>, Option<Tensor>) = split_kv_b.entry(layer).or_default();
            if is_k {
                e.0 = Some(part);
            } else {
                e.1 = Some(part);
            }
            continue;
        }
        let data = g.dequantize(t)?;
        let targets = gguf_targets(&g, &config, t)?;
        let parts: Vec<Vec<f32>> = match &targets[..] {
            [] => Vec::new(),
            [_] => vec![data],
            _ => data.chunks(data.len() / targets.len()).map(<[f32]>::to_vec).collect(),
        };
        for (target, part) in targets.into_iter().zip(parts) {
            let data = gguf_layout_to_hf(&config, &target.name, &target.shape, part);
            let tensor = Tensor::new(&target.name, target.shape, data, t.ty.name())?;
            weights.insert(target.name, tensor);
        }
    }
    if !split_kv_b.is_empty() {
        deepseek::merge_kv_b(&config, split_kv_b, &mut weights, path)?;
    }
    let tokenizer = Some(Tokenizer::from_gguf(&g)?);
    let model = Model { config, weights, tokenizer, source: gguf_source(&g) };
    crate::model::arch::validate(&model)?;
    Ok(model)
}

/// `(layer, is_k)` of a DeepSeek GGUF's split MLA tensor (`blk.L.attn_k_b` / `attn_v_b`),
/// which only together give HF's `kv_b_proj`.
pub(crate) fn split_kv_b_part(config: &ModelConfig, gguf_name: &str) -> Option<(usize, bool)> {
    config.architecture.is_deepseek().then(|| deepseek::split_kv_b_name(gguf_name)).flatten()
}

/// One tensor swk makes of a GGUF tensor: its name, HF shape, and which expert of a
/// stacked-experts tensor it is.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GgufTarget {
    /// swk's (HF) name.
    pub name: String,
    /// HF shape.
    pub shape: Vec<usize>,
    /// The expert's index in a `blk.L.ffn_*_exps` stack.
    pub expert: Option<usize>,
}

/// The tensors GGUF tensor `t` becomes: one, or one per expert for a stacked-experts tensor
/// (`blk.L.ffn_{gate,up,down}_exps`, `[E, I, H]` / `[E, H, I]`, under HF's per-expert names).
/// Errors naming the file for a tensor swk does not know.
pub(crate) fn gguf_targets(
    g: &GgufFile,
    config: &ModelConfig,
    t: &crate::io::gguf::GgufTensorInfo,
) -> Result<Vec<GgufTarget>> {
    let shape = t.shape();
    if let Some((layer, what)) = expert_stack(&t.name) {
        let [n, rows, cols] = shape[..] else {
            return Err(Error::format(g.path(), format!("`{}` is not 3-D", t.name)));
        };
        return Ok((0..n)
            .map(|e| GgufTarget {
                name: crate::model::arch::moe::expert_name(layer, e, what),
                shape: vec![rows, cols],
                expert: Some(e),
            })
            .collect());
    }
    let Some(name) = hf_name_for(config.architecture, &t.name) else {
        return Err(Error::format(
            g.path(),
            format!("unexpected tensor `{}` for {}", t.name, config.architecture.name()),
        ));
    };
    // llama.cpp stores the shared-expert gate as a vector; HF as a [1, hidden] matrix.
    let shape = if name.ends_with("shared_expert_gate.weight") && shape.len() == 1 {
        vec![1, shape[0]]
    } else {
        shape
    };
    Ok(vec![GgufTarget { name, shape, expert: None }])
}

/// Undo llama.cpp's changes to a tensor's values (dequantized, HF shape `shape`): Gemma's
/// RMSNorm weights are stored as `1 + w`; Q/K rows (and biases) of the Llama-like families are
/// permuted for llama.cpp's interleaved RoPE.
pub(crate) fn gguf_layout_to_hf(
    config: &ModelConfig,
    name: &str,
    shape: &[usize],
    mut data: Vec<f32>,
) -> Vec<f32> {
    let arch = config.architecture;
    // llama.cpp permutes Q/K rows for its interleaved RoPE in these families only.
    let llama_like = matches!(
        arch,
        Architecture::Llama | Architecture::Mistral | Architecture::Mixtral | Architecture::Olmo
    );
    // llama.cpp stores Gemma's RMSNorm weights as 1 + w; swk keeps the HF weight w.
    let gemma = matches!(arch, Architecture::Gemma | Architecture::Gemma2 | Architecture::Gemma3);
    if gemma && name.ends_with("norm.weight") {
        data.iter_mut().for_each(|v| *v -= 1.0);
    }
    if llama_like {
        let heads = if name.ends_with("q_proj.weight") || name.ends_with("q_proj.bias") {
            Some(config.num_heads)
        } else if name.ends_with("k_proj.weight") || name.ends_with("k_proj.bias") {
            Some(config.num_kv_heads)
        } else {
            None
        };
        if let Some(heads) = heads {
            let cols = if shape.len() == 2 { shape[1] } else { 1 };
            data = unpermute_rows(&data, shape[0], cols, heads);
        }
    }
    data
}
