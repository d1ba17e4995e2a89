//! Forward passes, one module per architecture family, and what they share: the KV cache and
//! the per-call options (hooks, spike statistics, which logits to compute).

pub mod deepseek;
pub mod gemma;
pub mod gpt2;
pub mod gpt_neox;
pub mod llama;
pub mod moe;
pub mod olmo;
pub mod phi3;
mod shared;

use crate::hooks::{Hooks, SpikeStats};
use crate::model::{Architecture, Model};
use crate::{Error, Result};

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every position (perplexity).
    All,
    /// Only the last position (generation).
    Last,
    /// None (detection, activation capture).
    None,
}

/// Where a forward pass starts.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// Token ids, appended after what the cache holds.
    Tokens(&'a [u32]),
    /// The residual stream `[rows, hidden]` entering block `layer`, for rows at positions
    /// `pos0..`. The cache must hold valid keys/values of blocks `< layer` for positions up to
    /// `pos0 + rows` (e.g. a clone of the cache of an unedited run): re-running only the
    /// blocks after an edit gives the same result as a full pass.
    Residual {
        /// First block to run.
        layer: usize,
        /// The residual stream entering it.
        x: &'a [f32],
        /// Position of the first row.
        pos0: usize,
    },
}

/// Keys and values of past positions, per layer, `[positions, n_kv * head_dim]`.
#[derive(Clone)]
pub struct KvCache {
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    len: usize,
}

impl KvCache {
    /// An empty cache for `model`.
    pub fn new(model: &Model) -> Self {
        KvCache { layers: vec![(Vec::new(), Vec::new()); model.config.num_layers], len: 0 }
    }
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Per layer (keys, values), `[positions, n_kv * head_dim]`.
    pub fn layers(&self) -> &[(Vec<f32>, Vec<f32>)] {
        &self.layers
    }
    /// Drop every cached position.
    pub fn clear(&mut self) {
        for (k, v) in &mut self.layers {
            k.clear();
            v.clear();
        }
        self.len = 0;
    }
}

/// Options of one forward call.
pub struct ForwardOptions<'a, 'f> {
    /// Hooks to run, if any.
    pub hooks: Option<&'a mut Hooks<'f>>,
    /// Spike statistics to accumulate, if any.
    pub stats: Option<&'a mut SpikeStats>,
    /// Which logits to compute.
    pub logits: Logits,
}

impl Default for ForwardOptions<'_, '_> {
    fn default() -> Self {
        ForwardOptions { hooks: None, stats: None, logits: Logits::All }
    }
}

impl Model {
    /// Run `tokens` (appended after what `cache` holds) through the model. Returns logits
    /// `[rows, vocab]` for the rows asked by `opts.logits`.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        opts: ForwardOptions<'_, '_>,
    ) -> Result<Vec<f32>> {
        self.forward_input(Input::Tokens(tokens), cache, opts)
    }

    /// Run from tokens or from a residual stream at some block (see [`Input`]).
    pub fn forward_input(
        &self,
        input: Input<'_>,
        cache: &mut KvCache,
        opts: ForwardOptions<'_, '_>,
    ) -> Result<Vec<f32>> {
        match input {
            Input::Tokens(tokens) => {
                if tokens.is_empty() {
                    return Ok(Vec::new());
                }
                let vocab = self.config.vocab_size;
                if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
                    return Err(Error::Invalid(format!(
                        "token id {bad} is outside the vocabulary ({vocab})"
                    )));
                }
            }
            Input::Residual { layer, x, pos0 } => {
                let h = self.config.hidden_size;
                if layer > self.config.num_layers || x.is_empty() || x.len() % h != 0 {
                    return Err(Error::Invalid(format!(
                        "residual input for block {layer}: {} values is not a whole number of rows of {h}",
                        x.len()
                    )));
                }
                let rows = x.len() / h;
                let kvd = self.config.num_kv_heads * self.config.head_dim;
                if cache.layers[..layer].iter().any(|(k, _)| k.len() < (pos0 + rows) * kvd) {
                    return Err(Error::Invalid(format!(
                        "the cache does not hold blocks 0..{layer} up to position {}",
                        pos0 + rows
                    )));
                }
            }
        }
        if let Some(s) = &opts.stats {
            if s.layers.len() != self.config.num_layers {
                return Err(Error::Invalid("spike statistics sized for another model".into()));
            }
        }
        match self.config.architecture {
            Architecture::Llama
            | Architecture::Mistral
            | Architecture::Qwen2
            | Architecture::Qwen3 => llama::forward(self, input, cache, opts),
            Architecture::Gemma | Architecture::Gemma2 | Architecture::Gemma3 => {
                gemma::forward(self, input, cache, opts)
            }
            Architecture::Phi3 => phi3::forward(self, input, cache, opts),
            Architecture::Olmo | Architecture::Olmo2 => olmo::forward(self, input, cache, opts),
            Architecture::Gpt2 => gpt2::forward(self, input, cache, opts),
            Architecture::GptNeoX => gpt_neox::forward(self, input, cache, opts),
            Architecture::Mixtral
            | Architecture::Olmoe
            | Architecture::Qwen2Moe
            | Architecture::Qwen3Moe => moe::forward(self, input, cache, opts),
            Architecture::DeepseekV2 | Architecture::DeepseekV3 => {
                deepseek::forward(self, input, cache, opts)
            }
        }
    }

    /// Convenience: logits of every position of `tokens`, from an empty cache.
    pub fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.forward(tokens, &mut KvCache::new(self), ForwardOptions::default())
    }
}

/// Check that every tensor the forward pass needs exists with the right shape.
pub fn validate(model: &Model) -> Result<()> {
    match model.config.architecture {
        Architecture::Llama | Architecture::Mistral | Architecture::Qwen2 | Architecture::Qwen3 => {
            llama::validate(model)
        }
        Architecture::Gemma | Architecture::Gemma2 | Architecture::Gemma3 => gemma::validate(model),
        Architecture::Phi3 => phi3::validate(model),
        Architecture::Olmo | Architecture::Olmo2 => olmo::validate(model),
        Architecture::Gpt2 => gpt2::validate(model),
        Architecture::GptNeoX => gpt_neox::validate(model),
        Architecture::Mixtral
        | Architecture::Olmoe
        | Architecture::Qwen2Moe
        | Architecture::Qwen3Moe => moe::validate(model),
        Architecture::DeepseekV2 | Architecture::DeepseekV3 => deepseek::validate(model),
    }
}
