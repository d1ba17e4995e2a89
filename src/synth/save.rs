//! Writing a plain Llama (a synthetic one, say) as a Hugging Face directory, so that what
//! reads real checkpoints (memory-mapped safetensors, layer streaming) can be tested and timed
//! on models of any shape.

use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::backend::WeightDtype;
use crate::model::{Architecture, ModelConfig};
use crate::{Error, Model, Result};

/// Write `model` into `dir` (created if missing) as `config.json` and one `model.safetensors`
/// with every tensor stored as `dtype`, as `torch_dtype` would store it: loading the directory
/// gives `model`'s weights rounded to `dtype` (bf16, f16: to nearest even). Only plain Llamas
/// (no RoPE scaling, no biases, no sliding window) are written; other configurations, and
/// f16 values out of its range, are errors.
pub fn save_llama(model: &Model, dir: &Path, dtype: WeightDtype) -> Result<()> {
    let c = &model.config;
    let plain = ModelConfig {
        rope_scaling: None,
        attention_bias: false,
        sliding_window: None,
        family: Default::default(),
        ..c.clone()
    };
    if c.architecture != Architecture::Llama || *c != plain {
        return Err(Error::Invalid(format!(
            "{}: only plain Llama models can be saved (this one is {}{})",
            dir.display(),
            c.architecture.name(),
            if c.architecture == Architecture::Llama { " with extra settings" } else { "" }
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let (st_dtype, torch_dtype) = match dtype {
        WeightDtype::F32 => (Dtype::F32, "float32"),
        WeightDtype::Bf16 => (Dtype::BF16, "bfloat16"),
        WeightDtype::F16 => (Dtype::F16, "float16"),
    };
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": torch_dtype,
    });
    let path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&config)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;

    let width = dtype.bytes();
    let encoded: Vec<(&str, &[usize], Vec<u8>)> = model
        .weights
        .iter()
        .map(|(name, t)| {
            let mut bytes = vec![0u8; t.data.len() * width];
            dtype.encode_slice(&t.data, &mut bytes, name)?;
            Ok((name, t.shape.as_slice(), bytes))
        })
        .collect::<Result<_>>()?;
    let path = dir.join("model.safetensors");
    let views = encoded
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(st_dtype, shape.to_vec(), bytes)
                .map(|v| (name.to_string(), v))
                .map_err(|e| Error::tensor(*name, format!("cannot be saved: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, &path)
        .map_err(|e| Error::format(&path, format!("cannot write safetensors: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{random_llama, SynthSpec};

    /// Saved and loaded again, a random Llama has its configuration and, in every dtype, its
    /// weights rounded as the device stores them, bit for bit.
    #[test]
    fn a_saved_llama_loads_back_rounded_to_its_dtype() {
        let spec = SynthSpec { layers: 2, ..SynthSpec::tiny() };
        let m = random_llama(&spec, 5).unwrap();
        for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
            let dir = tempfile::tempdir().unwrap();
            save_llama(&m, dir.path(), dtype).unwrap();
            let back = Model::load(dir.path().to_str().unwrap()).unwrap();
            assert_eq!(back.config, m.config, "{dtype:?}");
            assert_eq!(back.weights.names().count(), m.weights.names().count());
            for (name, t) in m.weights.iter() {
                let b = back.weights.get(name).unwrap();
                assert_eq!(b.shape, t.shape, "{name}");
                let same = b
                    .data
                    .iter()
                    .zip(&t.data)
                    .all(|(&got, &v)| got.to_bits() == dtype.stored_bits(v).unwrap());
                assert!(same, "{name} as {dtype:?}");
            }
        }
    }

    #[test]
    fn only_plain_llamas_are_saved() {
        let mut m = random_llama(&SynthSpec::tiny(), 1).unwrap();
        m.config.sliding_window = Some(8);
        let dir = tempfile::tempdir().unwrap();
        let e = save_llama(&m, dir.path(), WeightDtype::Bf16).unwrap_err().to_string();
        assert!(e.contains("only plain Llama"), "{e}");
        m.config.sliding_window = None;
        m.weights.get_mut("model.norm.weight").unwrap().data[0] = 1e6;
        let e = save_llama(&m, dir.path(), WeightDtype::F16).unwrap_err().to_string();
        assert!(e.contains("model.norm.weight") && e.contains("f16"), "{e}");
    }
}
