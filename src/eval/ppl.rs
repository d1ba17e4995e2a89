//! Perplexity with swk's fixed protocol.
//!
//! Tokenize the whole text without special tokens; cut it into non-overlapping windows of
//! `context` text tokens (the last may be shorter); feed each window preceded by BOS only when
//! the tokenizer adds BOS by default; score every fed token that has at least one token before
//! it; perplexity = exp(total NLL / tokens scored).

use std::time::Instant;

use serde::Serialize;

use crate::model::arch::{ForwardOptions, KvCache, Logits};
use crate::{Error, Model, Result};

/// The outcome of a perplexity run.
#[derive(Debug, Clone, Serialize)]
pub struct Perplexity {
    /// exp(nll_sum / tokens_scored).
    pub perplexity: f64,
    /// Number of predicted tokens.
    pub tokens_scored: usize,
    /// Sum of negative log-likelihoods (nats).
    pub nll_sum: f64,
    /// Wall time of the forward passes.
    pub seconds: f64,
    /// Window length in text tokens.
    pub context: usize,
    /// Number of windows fed.
    pub windows: usize,
}

/// Negative log-likelihood of `target` under one row of logits (log-sum-exp in f64).
pub fn nll(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    max + sum.ln() - logits[target as usize] as f64
}

/// The text's tokens, as the protocol tokenizes it.
pub fn text_tokens(model: &Model, text: &str) -> Result<Vec<u32>> {
    model.tokenizer()?.encode(text, false)
}

/// The sequences the protocol feeds: windows of `context` text tokens, each preceded by BOS
/// when the tokenizer adds BOS by default.
pub fn windows(model: &Model, tokens: &[u32], context: usize) -> Result<Vec<Vec<u32>>> {
    if context < 2 {
        return Err(Error::Invalid(format!("context {context} is too short (at least 2)")));
    }
    let bos = match model.tokenizer.as_ref() {
        Some(t) if t.adds_bos() => t.bos_id(),
        _ => None,
    };
    Ok(tokens.chunks(context).map(|w| bos.into_iter().chain(w.iter().copied()).collect()).collect())
}

/// Sum of NLL over a fed sequence given its logits `[fed.len(), vocab]`: every token after
/// the first is scored. Returns (nll sum, tokens scored).
pub fn score(logits: &[f32], fed: &[u32], vocab: usize) -> (f64, usize) {
    let n = fed.len().saturating_sub(1);
    let nll_sum = (1..fed.len()).map(|p| nll(&logits[(p - 1) * vocab..p * vocab], fed[p])).sum();
    (nll_sum, n)
}

/// Perplexity of `tokens` (already tokenized without special tokens). `on_window(done, total)`
/// is called after each window (for progress bars).
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    context: usize,
    mut on_window: impl FnMut(usize, usize),
) -> Result<Perplexity> {
    let start = Instant::now();
    let windows = windows(model, tokens, context)?;
    let (mut nll_sum, mut scored) = (0f64, 0usize);
    let mut cache = KvCache::new(model);
    for (wi, fed) in windows.iter().enumerate() {
        if fed.len() >= 2 {
            cache.clear();
            let logits = model.forward(
                fed,
                &mut cache,
                ForwardOptions { logits: Logits::All, ..Default::default() },
            )?;
            let (n, k) = score(&logits, fed, model.config.vocab_size);
            nll_sum += n;
            scored += k;
        }
        on_window(wi + 1, windows.len());
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
