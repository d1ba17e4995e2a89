//! Perplexity scoring and greedy generation on the device, as `eval::ppl` and
//! `eval::generate` do on the host: the NLL of each window is summed on the device from its
//! logits, a resident model replays a CUDA graph per window shape, and a streamed model
//! scores batches of windows layer-major (one read of its layers per batch).

use std::time::Instant;

use super::driver::CudaSlice;
use super::forward::CudaKvCache;
use super::model::CudaModel;
use crate::eval::logits::LogitsBackend;
use crate::eval::ppl::Perplexity;
use crate::model::arch::Logits;
use crate::{Error, Result};

impl CudaModel {
    /// Sum of NLL over a fed sequence (every token after the first is scored), computed on
    /// the device from the logits, as `eval::ppl::score` does on the host. Appends `fed` to
    /// `cache`. Returns (nll sum, tokens scored).
    pub fn score(&self, fed: &[u32], cache: &mut CudaKvCache) -> Result<(f64, usize)> {
        if fed.len() < 2 {
            if !fed.is_empty() {
                self.run(fed, cache, None, Logits::None)?;
            }
            return Ok((0.0, 0));
        }
        let Some((logits, _)) = self.run(fed, cache, None, Logits::All)? else {
            return Ok((0.0, 0));
        };
        self.nll_of(&logits, fed)
    }

    /// NLL sum over `fed[1..]` given the logits of every position of `fed` (≥ 2 tokens).
    fn nll_of(&self, logits: &CudaSlice<f32>, fed: &[u32]) -> Result<(f64, usize)> {
        let n = fed.len() - 1;
        let targets = self.dev.upload(&fed[1..])?;
        let out = self.dev.alloc::<f64>(n)?;
        self.dev.nll(
            self.dev.ptr(logits),
            self.dev.ptr(&targets),
            self.dev.ptr(&out),
            n,
            self.config.vocab_size,
        )?;
        let nll = self.dev.download(&out, 0, n)?;
        Ok((nll.iter().sum(), n))
    }

    /// [`Self::score`] of each window from an empty cache, the windows going through each
    /// layer together ([`Self::run_many`]): a streamed model reads its layers once for all.
    fn score_many(&self, windows: &[&[u32]]) -> Result<Vec<(f64, usize)>> {
        let mut caches: Vec<CudaKvCache> = windows.iter().map(|_| CudaKvCache::new(self)).collect();
        let mut seqs: Vec<(&[u32], &mut CudaKvCache)> =
            windows.iter().copied().zip(caches.iter_mut()).collect();
        let outs = self.run_many(&mut seqs, None, Logits::All)?;
        windows
            .iter()
            .zip(outs)
            .map(|(fed, out)| match out {
                Some((logits, _)) if fed.len() >= 2 => self.nll_of(&logits, fed),
                _ => Ok((0.0, 0)),
            })
            .collect()
    }

    /// How many windows of up to `longest` tokens a streamed model scores together: as many
    /// as half the free device memory holds (KV cache, residual stream and logits of each).
    fn window_batch(&self, longest: usize) -> Result<usize> {
        let c = &self.config;
        let kvd = c.num_kv_heads * c.head_dim;
        let cap = longest.max(16).next_multiple_of(16);
        let per =
            4 * (2 * c.num_layers * cap * kvd + longest * c.hidden_size + longest * c.vocab_size);
        let (free, _) = self.dev.memory()?;
        Ok((free / 2 / per.max(1)).max(1))
    }

    /// Perplexity over `windows` (from `eval::ppl::windows`, which adds BOS per the model's
    /// tokenizer), as `eval::ppl::perplexity` computes it; `on_window(done, total)` after each.
    pub fn perplexity(
        &self,
        windows: &[Vec<u32>],
        context: usize,
        mut on_window: impl FnMut(usize, usize),
    ) -> Result<Perplexity> {
        let start = Instant::now();
        let (mut nll_sum, mut scored) = (0f64, 0usize);
        if self.is_streamed() {
            // Layer-major over batches of windows: one read of the layers per batch.
            let longest = windows.iter().map(Vec::len).max().unwrap_or(0);
            let batch = self.window_batch(longest)?;
            let mut done = 0;
            for group in windows.chunks(batch) {
                let refs: Vec<&[u32]> = group.iter().map(Vec::as_slice).collect();
                for (n, k) in self.score_many(&refs)? {
                    nll_sum += n;
                    scored += k;
                }
                done += group.len();
                on_window(done, windows.len());
            }
        } else {
            let mut cache = CudaKvCache::new(self);
            for (wi, fed) in windows.iter().enumerate() {
                if fed.len() >= 2 {
                    let graphed =
                        self.run_graph(fed, None, Logits::All, |logits| match logits {
                            Some(l) => self.nll_of(l, fed),
                            None => Err(Error::Backend("a scoring graph without logits".into())),
                        })?;
                    let (n, k) = match graphed {
                        Some(r) => r,
                        None => {
                            cache.clear();
                            self.score(fed, &mut cache)?
                        }
                    };
                    nll_sum += n;
                    scored += k;
                }
                on_window(wi + 1, windows.len());
            }
        }
        if scored == 0 {
            return Err(Error::Invalid("the text is too short to score any token".into()));
        }
        Ok(Perplexity {
            perplexity: (nll_sum / scored as f64).exp(),
            tokens_scored: scored,
            nll_sum,
            seconds: start.elapsed().as_secs_f64(),
            context,
            windows: windows.len(),
        })
    }

    /// Greedily extend `prompt` by up to `max_new` tokens, stopping after any of `stops`
    /// (as `eval::generate::greedy`, with the stop ids given by the caller).
    pub fn greedy(
        &self,
        prompt: &[u32],
        max_new: usize,
        stops: &[u32],
        mut on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>> {
        crate::eval::generate::greedy_with(self, prompt, max_new, stops, |next, _| on_token(next))
    }
}

/// The CUDA backend for the analyses that read only logits (vocabulary effects,
/// compare-generate, multiple choice): logits come back to the host.
impl LogitsBackend for CudaModel {
    type Cache = CudaKvCache;
    fn vocab(&self) -> usize {
        self.config.vocab_size
    }
    fn new_cache(&self) -> Result<CudaKvCache> {
        Ok(CudaKvCache::new(self))
    }
    fn position_limit(&self) -> Option<usize> {
        self.config.position_limit()
    }
    fn fork_cache(&self, cache: &CudaKvCache) -> Result<CudaKvCache> {
        CudaModel::fork_cache(self, cache)
    }
    fn logits_with(
        &self,
        tokens: &[u32],
        cache: &mut CudaKvCache,
        which: Logits,
    ) -> Result<Vec<f32>> {
        self.forward(tokens, cache, None, which)
    }
}
