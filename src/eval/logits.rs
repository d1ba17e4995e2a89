//! [`LogitsBackend`]: forward passes that return logits, with a KV cache, on any backend. The
//! analyses that read only the model's outputs (vocabulary effects, compare-generate,
//! multiple choice) are written against it and [`EditTarget`], so they run on the CPU
//! [`Model`] and on the CUDA backend alike: edits through an
//! [`EditGuard`](crate::edit::EditGuard) over the backend, passes through the guard's target.

#[cfg(doc)]
use crate::edit::EditTarget;
use crate::model::arch::{ForwardOptions, KvCache, Logits};
use crate::{Model, Result};

/// A model that runs token sequences through a KV cache and returns their logits.
pub trait LogitsBackend {
    /// The backend's KV cache.
    type Cache;
    /// Vocabulary size (the width of a logits row).
    fn vocab(&self) -> usize;
    /// An empty cache.
    fn new_cache(&self) -> Result<Self::Cache>;
    /// A copy of `cache` (e.g. to score several continuations of one context).
    fn fork_cache(&self, cache: &Self::Cache) -> Result<Self::Cache>;
    /// Run `tokens` after what `cache` holds; logits `[rows, vocab]` of the rows `which`
    /// asks for.
    fn logits_with(
        &self,
        tokens: &[u32],
        cache: &mut Self::Cache,
        which: Logits,
    ) -> Result<Vec<f32>>;
    /// The most positions a sequence may hold, if the model has a hard limit (see
    /// [`crate::model::ModelConfig::position_limit`]).
    fn position_limit(&self) -> Option<usize> {
        None
    }
    /// Logits of every position of `tokens` from an empty cache.
    fn all_logits(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.logits_with(tokens, &mut self.new_cache()?, Logits::All)
    }
}

impl LogitsBackend for Model {
    type Cache = KvCache;
    fn vocab(&self) -> usize {
        self.config.vocab_size
    }
    fn new_cache(&self) -> Result<KvCache> {
        Ok(KvCache::new(self))
    }
    fn position_limit(&self) -> Option<usize> {
        self.config.position_limit()
    }
    fn fork_cache(&self, cache: &KvCache) -> Result<KvCache> {
        Ok(cache.clone())
    }
    fn logits_with(&self, tokens: &[u32], cache: &mut KvCache, which: Logits) -> Result<Vec<f32>> {
        self.forward(tokens, cache, ForwardOptions { logits: which, ..Default::default() })
    }
}
