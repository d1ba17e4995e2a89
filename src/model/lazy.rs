//! A model whose weights stay in their memory-mapped files until asked for: each tensor is
//! read (and, for GGUF, dequantized) on demand, under the same name, shape and values as
//! [`Model::load`](crate::Model::load) gives it. Backends that cannot hold every weight at
//! once (the CUDA backend's layer streaming) read one layer at a time from here.
//!
//! Families whose safetensors checkpoints need renaming or reshaping at load (GPT-2,
//! GPT-NeoX, multimodal Gemma 3, the MoE families' fused experts) open only from GGUF.
//!
//! ```no_run
//! # fn main() -> swk::Result<()> {
//! let lazy = swk::model::LazyModel::open("tests/fixtures/tiny/llama")?;
//! let w = lazy.tensor("model.layers.0.mlp.down_proj.weight")?; // read now, nothing before
//! assert_eq!(w.shape, [lazy.config.hidden_size, lazy.config.intermediate_size]);
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use crate::io::gguf::GgufFile;
use crate::io::safetensors::{self, MappedCheckpoint, StoredTensor};
use crate::io::tokenizer::Tokenizer;
use crate::model::load::{
    gguf_layout_to_hf, gguf_source, gguf_targets, hf_source, hf_tokenizer, split_kv_b_part,
    ModelPath,
};
use crate::model::{Architecture, Model, ModelConfig, ModelSource, Tensor, Weights};
use crate::{Error, Result};

/// The mapped files (or, for a model built in memory, its weights).
enum Files {
    Safetensors(MappedCheckpoint),
    Gguf(GgufFile),
    Memory(Weights),
}

/// Where one tensor comes from.
#[derive(Debug, Clone)]
struct Entry {
    shape: Vec<usize>,
    /// Index of the GGUF tensor (unused for safetensors) and the expert of a stack.
    gguf: Option<(usize, Option<usize>)>,
}

/// A model opened without reading its weights. See the [module docs](self).
pub struct LazyModel {
    /// Hyper-parameters.
    pub config: ModelConfig,
    /// The tokenizer, when the model ships one.
    pub tokenizer: Option<Tokenizer>,
    /// Provenance (`load_seconds` is the time to open and index).
    pub source: ModelSource,
    files: Files,
    entries: BTreeMap<String, Entry>,
}

impl LazyModel {
    /// Open a `.gguf` file, a Hugging Face directory or a hub id (from the hf-hub cache),
    /// reading metadata, tokenizer and tensor headers only.
    pub fn open(spec: &str) -> Result<Self> {
        let start = Instant::now();
        let mut lazy = match crate::model::load::resolve(spec)? {
            ModelPath::Gguf(p) => Self::open_gguf(&p)?,
            ModelPath::HfDir(d) => Self::open_hf_dir(&d)?,
        };
        lazy.source.spec = spec.to_string();
        lazy.source.load_seconds = start.elapsed().as_secs_f64();
        Ok(lazy)
    }

    fn open_hf_dir(dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_hf_json(&dir.join("config.json"))?;
        let a = config.architecture;
        if a.is_moe()
            || matches!(a, Architecture::Gpt2 | Architecture::GptNeoX | Architecture::Gemma3)
        {
            return Err(Error::Invalid(format!(
                "{}: lazy (streamed) loading of {} safetensors checkpoints is not supported, as \
                 their tensors are renamed or reshaped at load; use a GGUF file or load the model \
                 whole",
                dir.display(),
                a.name()
            )));
        }
        let ckpt = MappedCheckpoint::open(&safetensors::checkpoint_files(dir)?)?;
        let mut entries = BTreeMap::new();
        for name in ckpt.names() {
            if config.tie_word_embeddings && name == "lm_head.weight" {
                continue;
            }
            let shape = ckpt.shape(name).map(<[usize]>::to_vec).unwrap_or_default();
            entries.insert(name.to_string(), Entry { shape, gguf: None });
        }
        Ok(LazyModel {
            config,
            tokenizer: hf_tokenizer(dir)?,
            source: hf_source(dir),
            files: Files::Safetensors(ckpt),
            entries,
        })
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let g = GgufFile::open(path)?;
        let config = ModelConfig::from_gguf(&g)?;
        let mut entries = BTreeMap::new();
        for (i, t) in g.tensors.iter().enumerate() {
            if split_kv_b_part(&config, &t.name).is_some() {
                return Err(Error::Invalid(format!(
                    "{}: lazy (streamed) loading of DeepSeek GGUF files with split \
                     `attn_k_b`/`attn_v_b` tensors is not supported; load the model whole",
                    path.display()
                )));
            }
            for target in gguf_targets(&g, &config, t)? {
                let e = Entry { shape: target.shape, gguf: Some((i, target.expert)) };
                entries.insert(target.name, e);
            }
        }
        Ok(LazyModel {
            config,
            tokenizer: Some(Tokenizer::from_gguf(&g)?),
            source: gguf_source(&g),
            files: Files::Gguf(g),
            entries,
        })
    }

    /// A model already in memory (e.g. a synthetic one from [`crate::synth`]) behind the same
    /// interface: for streaming tests and for running such a model through a streamed
    /// backend. Its tensors are copied out on each read.
    pub fn from_model(model: Model) -> Self {
        let entries = model
            .weights
            .iter()
            .map(|(n, t)| (n.to_string(), Entry { shape: t.shape.clone(), gguf: None }))
            .collect();
        LazyModel {
            config: model.config,
            tokenizer: model.tokenizer,
            source: model.source,
            files: Files::Memory(model.weights),
            entries,
        }
    }

    /// Tensor names (swk's HF names), sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Whether the model has a tensor.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// A tensor's HF shape, or an error naming it.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        self.entries
            .get(name)
            .map(|e| e.shape.as_slice())
            .ok_or_else(|| Error::tensor(name, "not found in the model"))
    }

    /// Read one tensor now: converted to f32 (GGUF: dequantized, llama.cpp's layout undone),
    /// bit-identical to the same tensor of [`Model::load`](crate::Model::load).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        match (&self.files, e.gguf) {
            (Files::Safetensors(ckpt), _) => ckpt.read(name),
            (Files::Memory(w), _) => w.get(name).cloned(),
            (Files::Gguf(g), Some((i, _))) => {
                self.gguf_tensor(g, name, e, g.dequantize(&g.tensors[i])?)
            }
            (Files::Gguf(g), None) => {
                Err(Error::format(g.path(), format!("tensor `{name}` has no GGUF source")))
            }
        }
    }

    /// Tensor `name`'s bytes as its file stores them, when they are exactly what
    /// [`Self::tensor`] reads as f32 (a safetensors checkpoint's f32, f16 or bf16 tensor, which
    /// loading neither renames nor reshapes); `None` for GGUF files and models in memory.
    pub fn stored(&self, name: &str) -> Result<Option<StoredTensor<'_>>> {
        self.entry(name)?;
        match &self.files {
            Files::Safetensors(ckpt) => ckpt.stored(name).map(Some),
            Files::Gguf(_) | Files::Memory(_) => Ok(None),
        }
    }

    /// Read the tensors `names` (as [`Self::tensor`]), handing each to `f` with its index in
    /// `names`, grouped by GGUF source: the experts of one stacked GGUF tensor (llama.cpp's
    /// `ffn_*_exps`) come from one dequantization of it, not one each. Memory: one source
    /// tensor and one output tensor at a time.
    pub fn read_grouped(
        &self,
        names: &[String],
        mut f: impl FnMut(usize, Tensor) -> Result<()>,
    ) -> Result<()> {
        let Files::Gguf(g) = &self.files else {
            return names.iter().enumerate().try_for_each(|(k, n)| f(k, self.tensor(n)?));
        };
        let mut order: Vec<(usize, usize)> = Vec::with_capacity(names.len());
        for (k, n) in names.iter().enumerate() {
            let source = self.entry(n)?.gguf.map_or(usize::MAX, |(i, _)| i);
            order.push((source, k));
        }
        order.sort_unstable();
        let mut held: Option<(usize, Vec<f32>)> = None;
        for (source, k) in order {
            let (name, e) = (&names[k], self.entry(&names[k])?);
            if source == usize::MAX {
                f(k, self.tensor(name)?)?;
                continue;
            }
            let t = match e.gguf {
                // A stack's expert: dequantize the stack once for all its experts.
                Some((_, Some(x))) => {
                    if held.as_ref().is_none_or(|(i, _)| *i != source) {
                        held = Some((source, g.dequantize(&g.tensors[source])?));
                    }
                    let full = held.as_ref().map_or(&[][..], |(_, d)| d.as_slice());
                    let part = expert_part(g, source, x, &e.shape, full)?;
                    let data = gguf_layout_to_hf(&self.config, name, &e.shape, part);
                    Tensor::new(name, e.shape.clone(), data, g.tensors[source].ty.name())?
                }
                _ => self.tensor(name)?,
            };
            f(k, t)?;
        }
        Ok(())
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| Error::tensor(name, "not found in the model"))
    }

    /// Tensor `name` (entry `e`) out of its dequantized GGUF source `full`: its expert's part
    /// of a stack, in the HF layout.
    fn gguf_tensor(&self, g: &GgufFile, name: &str, e: &Entry, full: Vec<f32>) -> Result<Tensor> {
        let Some((i, expert)) = e.gguf else {
            return Err(Error::format(g.path(), format!("tensor `{name}` has no GGUF source")));
        };
        let data = match expert {
            Some(x) => expert_part(g, i, x, &e.shape, &full)?,
            None => full,
        };
        let data = gguf_layout_to_hf(&self.config, name, &e.shape, data);
        Tensor::new(name, e.shape.clone(), data, g.tensors[i].ty.name())
    }

    /// Bytes the weights take as f32 (what [`Model::load`](crate::Model::load) holds in RAM).
    pub fn f32_bytes(&self) -> usize {
        self.entries.values().map(|e| 4 * e.shape.iter().product::<usize>()).sum()
    }

    /// Names of layer `layer`'s tensors (`model.layers.{layer}.*`), sorted.
    pub fn layer_names(&self, layer: usize) -> Vec<&str> {
        let prefix = format!("model.layers.{layer}.");
        self.entries
            .range(prefix.clone()..)
            .map(|(k, _)| k.as_str())
            .take_while(|k| k.starts_with(&prefix))
            .collect()
    }

    /// A [`Model`] with only the tensors `keep` accepts read (the others are absent): e.g.
    /// everything outside the layers, for a backend that streams the layers. With
    /// `|_| true` these are [`Model::load`](crate::Model::load)'s weights (not validated).
    pub fn materialize(&self, keep: impl Fn(&str) -> bool) -> Result<Model> {
        let mut weights = Weights::new();
        for name in self.names().filter(|n| keep(n)) {
            weights.insert(name.to_string(), self.tensor(name)?);
        }
        Ok(Model {
            config: self.config.clone(),
            weights,
            tokenizer: self.tokenizer.clone(),
            source: self.source.clone(),
        })
    }
}

/// Expert `x`'s part (`shape`) of the dequantized GGUF stack `full` (tensor `i` of `g`).
fn expert_part(
    g: &GgufFile,
    i: usize,
    x: usize,
    shape: &[usize],
    full: &[f32],
) -> Result<Vec<f32>> {
    let per: usize = shape.iter().product();
    full.get(x * per..(x + 1) * per).map(<[f32]>::to_vec).ok_or_else(|| {
        Error::format(g.path(), format!("`{}` has no expert {x}", g.tensors[i].name))
    })
}
