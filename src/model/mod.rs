//! A loaded model: configuration, weights, tokenizer, and where they came from.

pub mod arch;
pub mod config;
pub mod lazy;
pub mod load;
pub mod weights;

use std::path::PathBuf;

use serde::Serialize;

use crate::io::tokenizer::Tokenizer;
pub use config::{Architecture, ModelConfig};
pub use lazy::LazyModel;
pub use weights::{Tensor, Weights};

/// The on-disk format a model was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A single GGUF file.
    Gguf,
    /// A Hugging Face directory with safetensors.
    Safetensors,
}

/// Where a model came from.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSource {
    /// What the user asked for (path or hub id).
    pub spec: String,
    /// The resolved local path (file or directory).
    pub path: PathBuf,
    /// File format.
    pub format: Format,
    /// Seconds spent loading.
    pub load_seconds: f64,
    /// The model's own name, when the files give one (GGUF `general.name`, config
    /// `_name_or_path`).
    pub name: Option<String>,
}

impl ModelSource {
    /// Every name the model goes by, for catalog lookups.
    pub fn names(&self) -> Vec<String> {
        let mut v = vec![self.spec.clone()];
        if let Some(n) = self.path.file_name().and_then(|n| n.to_str()) {
            v.push(n.trim_end_matches(".gguf").to_string());
        }
        v.extend(self.name.clone());
        v
    }
}

/// A model ready to run: config, weights in HF naming, tokenizer.
pub struct Model {
    /// Hyper-parameters.
    pub config: ModelConfig,
    /// All weights (f32, HF names and layouts).
    pub weights: Weights,
    /// The tokenizer, when the model ships one.
    pub tokenizer: Option<Tokenizer>,
    /// Provenance.
    pub source: ModelSource,
}

impl Model {
    /// Load from a `.gguf` file, a Hugging Face directory, or a hub id.
    pub fn load(spec: &str) -> crate::Result<Self> {
        load::load(spec)
    }

    /// The tokenizer, or an error saying the model has none.
    pub fn tokenizer(&self) -> crate::Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            crate::Error::Tokenizer(format!("{} ships no tokenizer", self.source.path.display()))
        })
    }

    /// The HF name of layer `layer`'s MLP down-projection weight.
    pub fn down_proj_name(layer: usize) -> String {
        format!("model.layers.{layer}.mlp.down_proj.weight")
    }
}
