//! Greedy generation with a KV cache.

use crate::eval::logits::LogitsBackend;
use crate::model::arch::Logits;
use crate::{Model, Result};

/// Index of the largest logit (first on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedily extend `prompt` by up to `max_new` tokens, stopping at an end-of-generation token
/// (or when the sequence fills a GPT-2's learned positions).
/// Returns the new token ids (the stop token included when one was produced).
pub fn greedy(
    model: &Model,
    prompt: &[u32],
    max_new: usize,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    let stops: Vec<u32> =
        model.tokenizer.as_ref().map(|t| t.eos_ids().to_vec()).unwrap_or_default();
    greedy_with(model, prompt, max_new, &stops, |next, _| on_token(next))
}

/// [`greedy`] on any backend, stopping after any of `stops`, or when prompt and continuation
/// fill the model's positions ([`LogitsBackend::position_limit`]); `on_token(next, logits)`
/// sees each chosen token with the logits it was chosen from.
pub fn greedy_with<B: LogitsBackend>(
    model: &B,
    prompt: &[u32],
    max_new: usize,
    stops: &[u32],
    mut on_token: impl FnMut(u32, &[f32]),
) -> Result<Vec<u32>> {
    let max_new = match model.position_limit() {
        Some(limit) if prompt.len() <= limit => max_new.min(limit - prompt.len()),
        _ => max_new,
    };
    let mut cache = model.new_cache()?;
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    for _ in 0..max_new {
        let logits = model.logits_with(&input, &mut cache, Logits::Last)?;
        let next = argmax(&logits);
        out.push(next);
        on_token(next, &logits);
        if stops.contains(&next) {
            break;
        }
        input = vec![next];
    }
    Ok(out)
}
