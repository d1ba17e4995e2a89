//! A model whose weights stay in their memory-mapped files until asked for: each tensor is
//! read (and, for GGUF, dequantized) on demand, under the same name, shape and values as
//! [`Model::load`](crate::Model::load) gives it. Backends that cannot hold every weight at
//! once (the CUDA backend's layer streaming) read one layer at a time from here.
//!
//! A mixture of experts' safetensors tensors are found under the per-expert names loading
//! gives them (Mixtral's `w1/w3/w2` renamed, transformers 5's fused stacks cut per expert,
//! each expert a contiguous run of the stored tensor). Families whose safetensors
//! checkpoints need transposing or other rewriting at load (GPT-2, GPT-NeoX, multimodal
//! Gemma 3) open only from GGUF.
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
use crate::io::safetensors::{self, Fp8Tensor, MappedCheckpoint, StoredTensor};
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
#[derive(Debug, Clone, Default)]
struct Entry {
    shape: Vec<usize>,
    /// Index of the GGUF tensor (unused for safetensors) and the expert of a stack.
    gguf: Option<(usize, Option<usize>)>,
    /// A safetensors tensor stored under another name, or as part of a fused one: that
    /// name, and the index of its first element there.
    stored_as: Option<(String, usize)>,
    /// DeepSeek's `kv_b_proj` of a GGUF that splits it: the layer, and the GGUF indices of
    /// its `attn_k_b` and `attn_v_b`.
    kv_b: Option<[usize; 3]>,
}

/// Whether loading a Hugging Face checkpoint of family `a` renames or reshapes its tensors
/// beyond what [`LazyModel`] maps (so it opens only from GGUF).
fn rewritten_at_load(a: Architecture) -> bool {
    matches!(a, Architecture::Gpt2 | Architecture::GptNeoX | Architecture::Gemma3)
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

    /// Whether [`Self::open`] can open `spec` lazily: any GGUF file; a Hugging Face directory
    /// unless its family's tensors are rewritten at load (GPT-2, GPT-NeoX, multimodal
    /// Gemma 3), which [`Model::load`](crate::Model::load) loads whole. Reads the config only.
    pub fn can_open(spec: &str) -> Result<bool> {
        Ok(match crate::model::load::resolve(spec)? {
            ModelPath::Gguf(_) => true,
            ModelPath::HfDir(d) => {
                !rewritten_at_load(ModelConfig::from_hf_json(&d.join("config.json"))?.architecture)
            }
        })
    }

    fn open_hf_dir(dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_hf_json(&dir.join("config.json"))?;
        let a = config.architecture;
        if rewritten_at_load(a) {
            return Err(Error::Invalid(format!(
                "{}: lazy (streamed) loading of {} safetensors checkpoints is not supported, as \
                 their tensors are renamed or reshaped at load; use a GGUF file or load the model \
                 whole",
                dir.display(),
                a.name()
            )));
        }
        let fp8_block = safetensors::fp8_block_size(&dir.join("config.json"))?;
        let ckpt =
            MappedCheckpoint::open(&safetensors::checkpoint_files(dir)?)?.with_fp8_block(fp8_block);
        let mut entries = BTreeMap::new();
        for name in ckpt.names() {
            if config.tie_word_embeddings && name == "lm_head.weight" {
                continue;
            }
            let shape = ckpt.shape(name).unwrap_or_default();
            if !a.is_moe() {
                entries
                    .insert(name.to_string(), Entry { shape: shape.to_vec(), ..Entry::default() });
                continue;
            }
            // A mixture of experts' tensors under their per-expert names, as loading
            // renames and splits them.
            let parts = crate::model::arch::moe::hf_parts(&config, name, shape)
                .map_err(|e| Error::format(dir, e.to_string()))?;
            for p in parts {
                let stored_as =
                    (p.name != name || p.shape != shape).then(|| (name.to_string(), p.offset));
                entries.insert(p.name, Entry { shape: p.shape, stored_as, ..Entry::default() });
            }
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
        // DeepSeek's split MLA tensors: per layer, the GGUF indices of attn_k_b and attn_v_b.
        let mut split: BTreeMap<usize, [Option<usize>; 2]> = BTreeMap::new();
        for (i, t) in g.tensors.iter().enumerate() {
            if let Some((l, is_k)) = split_kv_b_part(&config, &t.name) {
                split.entry(l).or_default()[usize::from(!is_k)] = Some(i);
                continue;
            }
            for target in gguf_targets(&g, &config, t)? {
                let gguf = Some((i, target.expert));
                entries
                    .insert(target.name, Entry { shape: target.shape, gguf, ..Entry::default() });
            }
        }
        // Each layer's kv_b_proj, rebuilt from its two parts on every read.
        for (l, parts) in split {
            let [Some(k), Some(v)] = parts else {
                return Err(Error::format(
                    path,
                    format!("layer {l} has only one of attn_k_b / attn_v_b"),
                ));
            };
            let d = crate::model::arch::deepseek::params(&config)?;
            let rows = config.num_heads * (d.qk_nope_head_dim + d.v_head_dim);
            let name = format!("model.layers.{l}.self_attn.kv_b_proj.weight");
            let e = Entry {
                shape: vec![rows, d.kv_lora_rank],
                kv_b: Some([l, k, v]),
                ..Entry::default()
            };
            entries.insert(name, e);
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
            .map(|(n, t)| (n.to_string(), Entry { shape: t.shape.clone(), ..Entry::default() }))
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
    /// bit-identical to the same tensor of [`Model::load`](crate::Model::load). One expert of
    /// a stacked GGUF tensor (llama.cpp's `ffn_*_exps`) is dequantized alone.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        match (&self.files, e.gguf) {
            (Files::Safetensors(ckpt), _) => match &e.stored_as {
                // Renamed whole (FP8 weights included), or cut from a fused stack.
                Some((stored, 0)) if ckpt.shape(stored) == Some(&e.shape) => ckpt.read(stored),
                Some((stored, offset)) => ckpt.read_part(stored, *offset, &e.shape, name),
                None => ckpt.read(name),
            },
            (Files::Memory(w), _) => w.get(name).cloned(),
            (Files::Gguf(g), Some((i, expert))) => {
                let t = &g.tensors[i];
                let data = match expert {
                    Some(x) => {
                        let per: usize = e.shape.iter().product();
                        let parts = (t.n_elements() as usize).checked_div(per).unwrap_or(0);
                        g.dequantize_part(t, x, parts)?
                    }
                    None => g.dequantize(t)?,
                };
                let data = gguf_layout_to_hf(&self.config, name, &e.shape, data);
                Tensor::new(name, e.shape.clone(), data, t.ty.name())
            }
            (Files::Gguf(g), None) => match e.kv_b {
                Some([l, k, v]) => {
                    let part = |i: usize| {
                        let t = &g.tensors[i];
                        Tensor::new(&t.name, t.shape(), g.dequantize(t)?, t.ty.name())
                    };
                    let (k, v) = (part(k)?, part(v)?);
                    crate::model::arch::deepseek::merge_kv_b_layer(
                        &self.config,
                        l,
                        &k,
                        &v,
                        g.path(),
                    )
                }
                None => Err(Error::format(g.path(), format!("tensor `{name}` has no GGUF source"))),
            },
        }
    }

    /// Tensor `name`'s bytes as its file stores them, when they are exactly what
    /// [`Self::tensor`] reads as f32 (a safetensors checkpoint's f32, f16 or bf16 tensor, or
    /// its part that loading renames or cuts from a fused mixture of experts); `None` for GGUF
    /// files and models in memory.
    pub fn stored(&self, name: &str) -> Result<Option<StoredTensor<'_>>> {
        let e = self.entry(name)?;
        let Files::Safetensors(ckpt) = &self.files else { return Ok(None) };
        match &e.stored_as {
            Some((stored, offset)) => {
                let len = e.shape.iter().product();
                let (dtype, bytes) = ckpt.stored_part(stored, *offset, len)?;
                Ok(Some(StoredTensor { dtype, shape: &e.shape, bytes }))
            }
            None => ckpt.stored(name).map(Some),
        }
    }

    /// Tensor `name` as its FP8 bytes and block scales, when a safetensors checkpoint stores
    /// it whole as `F8_E4M3` (DeepSeek-V3, Qwen3-FP8); `None` otherwise. Its f32 values are
    /// [`Self::tensor`]'s.
    pub fn fp8(&self, name: &str) -> Result<Option<Fp8Tensor<'_>>> {
        let e = self.entry(name)?;
        let Files::Safetensors(ckpt) = &self.files else { return Ok(None) };
        match &e.stored_as {
            Some((stored, 0)) if ckpt.shape(stored) == Some(&e.shape) => ckpt.fp8(stored),
            Some(_) => Ok(None),
            None => ckpt.fp8(name),
        }
    }

    /// The dtype tensor `name` is stored in, as [`Tensor::source_dtype`] names it once read
    /// (`BF16`, `F8_E4M3`, `Q4_K`, ...), without reading it.
    pub fn source_dtype(&self, name: &str) -> Result<String> {
        let e = self.entry(name)?;
        let missing = || Error::tensor(name, "has no stored tensor");
        match &self.files {
            Files::Safetensors(ckpt) => {
                let stored = e.stored_as.as_ref().map_or(name, |(s, _)| s.as_str());
                ckpt.dtype_name(stored).ok_or_else(missing)
            }
            Files::Gguf(g) => {
                let i = e.gguf.map(|(i, _)| i).or(e.kv_b.map(|[_, k, _]| k)).ok_or_else(missing)?;
                Ok(g.tensors[i].ty.name().to_string())
            }
            Files::Memory(w) => Ok(w.get(name)?.source_dtype.clone()),
        }
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| Error::tensor(name, "not found in the model"))
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
